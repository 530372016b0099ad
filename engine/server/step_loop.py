"""The engine's iteration loop, one for both places the engine runs: the engine process
(engine/server/engine_core.py) and the engine thread (engine/server/engine_loop.py). Whoever runs
it is the only code that calls the engine.

    each iteration: take the commands that came (waiting up to IDLE_WAIT_S for one when idle)
                    abort every live request once stopping, or past the drain deadline
                    step if any request is unfinished
                    report: the requests admitted and refused since the last report, the
                    step's outputs and timings, a fresh snapshot when due (at most every
                    SNAPSHOT_INTERVAL_S while busy, and whenever it goes idle)

A subclass says where commands come from (`_take_commands`, which calls `_add`), where an
iteration's report goes (`_report_iteration`: into a message to the server's process, or
straight to the event loop's side, EngineFace._take_iteration), and what the loop's end says
(`_stopped`, `_loop_failed`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from toyllm.engine.generate import GenerationError
from toyllm.engine.sampling import SamplingParams
from toyllm.engine.serving import RequestOutput, ServingEngine, ServingStats

# how often, at most, the loop refreshes the snapshot /metrics reads while it is busy
SNAPSHOT_INTERVAL_S = 0.25
# how long the idle loop waits for a command before it looks at the drain deadline again
IDLE_WAIT_S = 0.1

# (seconds since the previous step's end or None after an idle stretch, the step's seconds, its
# end on perf_counter's clock, which is the machine's monotonic clock, shared by processes)
StepTimes = tuple[float | None, float, float]


@dataclass(frozen=True)
class LoopSnapshot:
    """What /metrics shows of the engine, taken by the loop (no other code reads the engine):
    its stats, and the blocks a new request could have (free, plus cached blocks only the
    prefix cache holds)."""

    stats: ServingStats
    blocks_reclaimable: int
    taken_at: float


def take_snapshot(engine: ServingEngine) -> LoopSnapshot:
    """The engine's state for /metrics (called by whoever runs the engine, never another)."""
    stats = engine.stats()
    evictable = engine.prefix.evictable() if engine.prefix is not None else 0
    return LoopSnapshot(stats, stats.blocks_free + evictable, time.perf_counter())


class StepLoop:
    """The loop over one engine (ServingEngine's serving face). `_live` holds the ids of the
    requests admitted and not finished; `_deadline` (monotonic) is set by a drain."""

    # errors that end the loop as they are, without a report (the process's closed pipes)
    PASSED_THROUGH: tuple[type[BaseException], ...] = ()

    def __init__(self, engine: Any, log: logging.Logger) -> None:
        self.engine = engine
        self._live: set[str] = set()
        self._deadline: float | None = None
        self._log = log
        # since the last report: (request id, prompt tokens), (request id, why refused)
        self._accepted: list[tuple[str, int]] = []
        self._rejected: list[tuple[str, str]] = []

    def run(self) -> None:
        """Serve commands and step until stopped (and every request ended) or the loop failed."""
        engine = self.engine
        stopping = False
        last_snapshot = 0.0
        changed = False  # since the last snapshot
        last_step_end: float | None = None  # perf_counter, while steps follow one another
        try:
            while True:
                busy = engine.has_unfinished()
                took, stop = self._take_commands(block=not busy and not stopping)
                stopping |= stop
                changed |= took
                deadline = self._deadline
                if (stopping or (deadline is not None and time.monotonic() >= deadline)) \
                        and self._live:
                    for rid in list(self._live):
                        engine.abort(rid)
                if engine.has_unfinished():
                    started = time.perf_counter()
                    # since the previous step: reporting it, taking commands, GIL waits
                    between = None if last_step_end is None else started - last_step_end
                    outputs = engine.step()
                    now = last_step_end = time.perf_counter()
                    snapshot = None
                    if now - last_snapshot >= SNAPSHOT_INTERVAL_S:
                        snapshot, last_snapshot, changed = take_snapshot(engine), now, False
                    else:
                        changed = True
                    self._report(outputs, (between, now - started, now), snapshot)
                    continue
                last_step_end = None  # idle: the next step starts a new busy stretch
                snapshot = None
                if changed:  # idle now: show the state the engine rests in
                    snapshot, last_snapshot = take_snapshot(engine), time.perf_counter()
                    changed = False
                self._report([], None, snapshot)
                if stopping and not self._live:
                    self._stopped()
                    return
        except self.PASSED_THROUGH:
            raise
        except Exception as exc:  # a bug or a device failure: every request ends, say why
            self._log.exception("engine loop failed")
            self._loop_failed(f"the engine loop failed: {type(exc).__name__}: {exc}")

    def _add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request in the engine (the next report says whether it was admitted)."""
        try:
            self.engine.add_request(prompt_ids, params, request_id)
        except GenerationError as exc:
            self._rejected.append((request_id, str(exc)))
            return
        self._live.add(request_id)
        self._accepted.append((request_id, len(prompt_ids)))

    def _report(self, outputs: list[RequestOutput], step: StepTimes | None,
                snapshot: LoopSnapshot | None) -> None:
        if step is None and not (self._accepted or self._rejected or snapshot is not None):
            return  # idle, and nothing to say
        for out in outputs:
            if out.finished:
                self._live.discard(out.request_id)
        accepted, rejected = self._accepted, self._rejected
        self._accepted, self._rejected = [], []
        self._report_iteration(accepted, rejected, outputs, step, snapshot)

    # what a subclass provides ----------------------------------------------------------------
    def _take_commands(self, block: bool) -> tuple[bool, bool]:
        """Apply the commands that came (waiting up to IDLE_WAIT_S for one when `block`; an
        add calls `_add`): whether there were any, and whether one was stop."""
        raise NotImplementedError

    def _report_iteration(self, accepted: list[tuple[str, int]], rejected: list[tuple[str, str]],
                          outputs: list[RequestOutput], step: StepTimes | None,
                          snapshot: LoopSnapshot | None) -> None:
        """What an iteration did: the requests admitted and refused since the last report, the
        step's outputs and times (None: no step), a fresh snapshot (None: not due)."""
        raise NotImplementedError

    def _stopped(self) -> None:
        """Stopped, and every request ended: the loop returns."""

    def _loop_failed(self, message: str) -> None:
        """The loop raised (logged already) and ends: every request must end with `message`."""
        raise NotImplementedError
