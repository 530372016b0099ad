"""A row of a ragged decode batch computes the same bits whatever the other rows hold.

The check's ragged cases (engine/check/cases.py) decode rows of different lengths together, and
rows that finished stay in the batch, inactive (position -1), fed a placeholder token. Nothing a
batched decode step does may let one row's values reach another's: each product row, each
attention row and each norm reads its own row only. So a row's logits must be bit-identical
whether a finished row is fed token 0 or another token, and whether another active row decodes
one sequence or another. (Only the values change between the two runs: rows, lengths and
positions stay, so every kernel makes the same choices and sums in the same order.)
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import collect_dead_graphs
from same_bits import assert_same_bits
from torch import Tensor

from toyllm.engine.generate import Engine
from toyllm.engine.settings import Settings
from toyllm.models.config import ModelConfig
from toyllm.models.llama import build_model

# GQA 4:2, head_dim 64 (the CUDA decode kernel's tensor-core path in fp16/bf16)
CONFIG = ModelConfig(name="ragged", vocab_size=256, hidden_size=256, intermediate_size=512,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, max_seq_len=64)
PROMPT_LENS = (5, 9, 1)  # row 0 is watched; row 1 finishes after FINISH steps; row 2 goes on
STEPS = 8
FINISH = 3


def ragged_decode(model, finished_token: int, other_seed: int, **engine_args) -> list[Tensor]:
    """Teacher-forced ragged decode (as engine/check/harness.py's): per step, the logits
    [rows, vocab]. Row 1 goes inactive after FINISH steps and is fed `finished_token` from then
    on; row 2's prompt and fed tokens are drawn from `other_seed`; row 0's never change."""
    gen = torch.Generator().manual_seed(0)
    other = torch.Generator().manual_seed(other_seed)
    prompts = [torch.randint(3, CONFIG.vocab_size, (n,), generator=g).tolist()
               for n, g in zip(PROMPT_LENS, (gen, gen, other), strict=True)]
    feeds = [torch.randint(3, CONFIG.vocab_size, (STEPS,), generator=g).tolist()
             for g in (gen, gen, other)]
    collect_dead_graphs()
    engine = Engine(model, **engine_args)
    rows = len(prompts)
    cache = engine.prepare_cache(rows, CONFIG.max_seq_len)
    for r in range(rows, cache.batch_size):
        cache.set_active(r, False)
    for r, p in enumerate(prompts):
        engine.prefill(cache, r, p)
    out = []
    for s in range(STEPS):
        if s == FINISH:
            cache.set_active(1, False)
        feed = [feeds[0][s], feeds[1][s] if s < FINISH else finished_token, feeds[2][s]]
        out.append(engine.decode_step(cache, rows, torch.tensor(feed, device=model.device))
                   .clone())
    return out


def assert_rows_do_not_leak(device: str, dtype: torch.dtype, **engine_args) -> None:
    model = build_model(CONFIG, device=device, dtype=dtype, seed=3)
    model.init_weights(3, std=CONFIG.hidden_size ** -0.5)
    base = ragged_decode(model, 0, 1, **engine_args)
    finished_fed_other = ragged_decode(model, 77, 1, **engine_args)
    other_row_changed = ragged_decode(model, 0, 2, **engine_args)
    assert all(torch.isfinite(step).all() for step in base)
    for s in range(STEPS):
        assert_same_bits(finished_fed_other[s][0], base[s][0])
        assert_same_bits(other_row_changed[s][0], base[s][0])
        if s < FINISH:  # row 1 is fed the same tokens until it finishes
            assert_same_bits(finished_fed_other[s][1], base[s][1])
    # the runs differ where they should: the other active row's logits (a test that compares
    # equal inputs would pass for nothing)
    assert not torch.equal(other_row_changed[0][2], base[0][2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("decode_attention", ["kernel", "sdpa"])
def test_cpu_ragged_rows_do_not_leak(dtype: torch.dtype, decode_attention: str) -> None:
    assert_rows_do_not_leak("cpu", dtype, settings=Settings(decode_attention=decode_attention))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("decode_attention", ["kernel", "sdpa"])
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "cuda_graph"])
def test_cuda_ragged_rows_do_not_leak(dtype: torch.dtype, decode_attention: str,
                                      graph: bool) -> None:
    assert_rows_do_not_leak("cuda", dtype, cuda_graph=graph,
                            settings=Settings(decode_attention=decode_attention))


def test_a_planted_leak_between_rows_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attention that lets each row see the batch's mean (a leak of 1% of it) is caught."""
    from toyllm.engine import cached_attention

    real = cached_attention.grouped_attention

    def leaking(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None) -> Tensor:
        out = real(q, k, v, allowed)
        return out + 0.01 * out.mean(0, keepdim=True)

    monkeypatch.setattr(cached_attention, "grouped_attention", leaking)
    with pytest.raises(AssertionError, match="results differ"):
        assert_rows_do_not_leak("cpu", torch.bfloat16, settings=Settings(decode_attention="sdpa"))
