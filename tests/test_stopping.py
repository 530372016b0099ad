"""StopWatcher: stop strings found across pieces, partial matches held back, not lost."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from toyllm.engine.stopping import StopWatcher


def feed_all(pieces: list[str], stops: tuple[str, ...]) -> tuple[str, bool]:
    w = StopWatcher(stops)
    out = "".join(w.feed(p) for p in pieces)
    if not w.stopped:
        out += w.flush()
    return out, w.stopped


def test_stop_split_over_pieces_is_found() -> None:
    assert feed_all(["ab", "c\nde", "f"], ("\nd",)) == ("abc", True)


def test_partial_match_is_held_then_released() -> None:
    w = StopWatcher(("END",))
    assert w.feed("xxEN") == "xx"
    assert w.feed("x") == "ENx"


@given(st.lists(st.text(alphabet="abc\n", max_size=5), max_size=8),
       st.lists(st.text(alphabet="abc\n", min_size=1, max_size=3), max_size=3))
def test_output_is_the_text_up_to_the_first_stop(pieces: list[str], stops: list[str]) -> None:
    # The stream stops at the first piece after which some stop string has appeared, and
    # cuts at the earliest of the stop strings seen by then.
    text, expected, stopped = "", None, False
    for piece in pieces:
        text += piece
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            expected, stopped = text[: min(hits)], True
            break
    if expected is None:
        expected = text
    assert feed_all(pieces, tuple(stops)) == (expected, stopped)
