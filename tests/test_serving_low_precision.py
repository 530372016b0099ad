"""check_serving's fp16/bf16 judge (tests/test_paged_prefill_varlen_cuda.py runs the serving
engine's packed prefill under it on CUDA): its mechanics on the CPU. A bf16 model on this CPU
sits above bf16's bound on these random models (rel ~2e-2: CPU bf16 products round otherwise
than the reference's), so the passing case judges an fp32 model by fp16's bound; a bf16 model
with a planted bug fails by far, and its greedy flips at near-ties are excused and named."""

from __future__ import annotations

import pytest
import torch
from test_serving import join_and_leave, model_for, pool

import toyllm.engine.paged_step as paged_step
from toyllm.engine.check.serving import check_serving
from toyllm.engine.check.tolerances import tolerance_for


def _check(model, **kw):
    return check_serving(model, join_and_leave(), block_size=4, token_budget=8,
                         kv_memory=pool(model, 192, 4), **kw)


def test_a_correct_engine_passes_the_low_precision_judge() -> None:
    report = _check(model_for(), low_precision=tolerance_for("fp16"))
    assert report.ok, report.problems
    assert 0 < report.rel <= 2e-3


def test_bf16_greedy_flips_at_near_ties_are_excused_and_named() -> None:
    report = _check(model_for().to(torch.bfloat16), low_precision=tolerance_for("bf16"))
    assert not any("greedy tokens differ" in p for p in report.problems), report.problems
    assert all("near-tie" in n for n in report.near_ties)
    assert report.rel < 0.1  # rounding, not a bug (see the module doc)


def test_a_planted_bug_fails_the_low_precision_judge(monkeypatch) -> None:
    write = paged_step.paged_kv_write

    def off_by_one(k_pool, v_pool, k, v, slots):
        write(k_pool, v_pool, k, v, torch.where(slots >= 0, slots + 1, slots))

    monkeypatch.setattr(paged_step, "paged_kv_write", off_by_one)
    report = _check(model_for().to(torch.bfloat16), low_precision=tolerance_for("bf16"))
    assert any("||a-b||/||b||" in p for p in report.problems), report.problems
    assert report.rel > 0.1  # far above the rounding of a correct bf16 run


def test_the_fp32_judge_is_refused_as_low_precision() -> None:
    with pytest.raises(ValueError, match="expected an fp16/bf16 tolerance"):
        _check(model_for(), low_precision=tolerance_for("fp32"))
