"""Stop strings in streamed text: find them, and hold back text that may still become one.

Text is released only when no stop string can start inside it, so a stream never shows the
first half of a stop string that the final text will not contain.
"""

from __future__ import annotations


class StopWatcher:
    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self.stops = tuple(stops)
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add decoded text; return the part that is now safe to show."""
        if self.stopped:
            return ""
        self.pending += piece
        if not self.stops:
            out, self.pending = self.pending, ""
            return out
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            out, self.pending = self.pending[:cut], ""
            self.stopped = True
            return out
        hold = self._held_suffix()
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        """The held-back text, when the sequence ends for another reason."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def _held_suffix(self) -> int:
        """Length of the longest suffix of pending that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:k]):
                    best = k
                    break
        return best
