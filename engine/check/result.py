"""The result of one `toyllm check` case: the verdict words and the dataclasses that
engine/check.py fills while it runs a case and engine/check_report.py turns into the JSON report
and the table (a module of their own, so that check_report never imports check)."""

from __future__ import annotations

from dataclasses import dataclass, field

PASS, FAIL, ERROR = "PASS", "FAIL", "ERROR"


@dataclass
class Divergence:
    """Where a greedy run first left the reference's tokens."""

    row: int
    step: int  # index of the first differing new token
    expected: int  # the reference's token
    got: int  # the engine's token
    margin: float  # reference's top-1 minus top-2 logit at that step
    gap: float  # reference's logit of its token minus its logit of the engine's token
    near_tie_margin: float  # gap at or below this counts as a near-tie
    near_tie: bool


@dataclass
class CaseResult:
    """What one case measured and why it passed or failed."""

    name: str
    dtype: str
    device: str
    verdict: str = PASS  # PASS | FAIL | ERROR
    # teacher-forced: engine vs no-cache reference, same dtype
    max_abs: float | None = None  # max |a - b| over every compared logit
    rel: float | None = None  # worst step's ||a-b|| / ||b||
    argmax_agree: float | None = None  # fraction of steps with the same argmax
    argmax_flips: int = 0  # argmax disagreements beyond the near-tie margin
    steps: int = 0  # logit rows compared (all batch rows)
    # low precision: distances from the fp32 result (same weights upcast, no cache)
    engine_fp32_rel: float | None = None  # worst step's ||engine - fp32|| / ||fp32||
    reference_fp32_rel: float | None = None  # worst step's ||reference - fp32|| / ||fp32||
    # free-running greedy
    greedy_match: bool | None = None
    greedy_tokens: int = 0  # tokens that agreed before any divergence (all rows)
    greedy_expected: int = 0  # tokens the reference produced (all rows)
    divergences: list[Divergence] = field(default_factory=list)
    min_margin: float | None = None  # smallest reference top-2 margin over the compared steps
    # Hugging Face witness
    hf_rel: float | None = None
    hf_greedy_match: bool | None = None
    hf_note: str = ""
    # cache reset between requests
    reset_match: bool | None = None
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    traceback: str | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.verdict == PASS

    @property
    def worst_divergence(self) -> Divergence | None:
        """The divergence that matters most: a real one before a near-tie, then the
        largest gap."""
        if not self.divergences:
            return None
        return max(self.divergences, key=lambda d: (not d.near_tie, d.gap))
