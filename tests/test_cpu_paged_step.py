"""toyllm::cpu_decode_step over the serving engine's paged pools (block_tables given).

The serving engine's decode-only CPU steps of up to 4 rows take the one-call step, each row's
keys read through its row of the block table and its K/V written at its position's slot
(engine/forward.py). These tests show:

* the operator over pools whose blocks are shuffled gives the bits of the same operator over
  contiguous caches holding the same keys, and writes K/V exactly at each row's slot (nothing
  else in the pools moves), for 1, 2 and 4 rows (one finished), block sizes 1, 4 and 16;
* fp32 toyllm::paged_decode_attention runs decode_attention's loop: the same bits as
  decode_attention over the keys gathered into a contiguous cache;
* the serving engine at FULL (the step) gives the logits of the engine at SILU_GEMV (the
  separate ops) bit for bit, over a workload with chunked prefill, shared prefixes, more
  requests than the step takes rows and requests that finish at different times; its greedy
  tokens are the no-cache reference's;
* bad tables and pools are refused with one line each, before anything is written.
"""

from __future__ import annotations

import pytest
import torch
from cpu_decode_models import CONFIGS, model_for, prompts, step_args_over_random_caches
from same_bits import assert_same_bits

from toyllm.engine.check.reference import reference_greedy
from toyllm.engine.ops import cpu_step
from toyllm.engine.sampling import SamplingParams
from toyllm.engine.serving import ServingEngine
from toyllm.engine.settings import Fusion, Settings

OPS = torch.ops.toyllm


def paged_copy(caches: list[torch.Tensor], block_size: int, spare: int = 3,
               seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The contiguous caches [rows, S, Hkv, D] as pools [rows * S / block_size + spare,
    block_size, Hkv, D] whose blocks are shuffled (the spare ones random), and the table
    int32 [rows, S / block_size] that finds each row's keys."""
    rows, length, hkv, d = caches[0].shape
    per_row = length // block_size
    num_blocks = rows * per_row + spare
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_blocks, generator=g)[: rows * per_row]
    table = order.view(rows, per_row).to(torch.int32)
    pools = []
    for cache in caches:
        pool = torch.randn(num_blocks, block_size, hkv, d, generator=g)
        pool[order] = cache.reshape(rows * per_row, block_size, hkv, d)
        pools.append(pool)
    return pools, table


def gathered(pool: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """A pool's keys as contiguous rows [rows, W * block_size, Hkv, D] through the table."""
    rows, width = table.shape
    return pool[table.long().flatten()].reshape(rows, width * pool.shape[1], *pool.shape[2:])


K, V, POSITIONS = 7, 8, 9


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("rows, positions", [(1, [9]), (4, [5, 17, -1, 31]), (2, [4, 30])],
                         ids=["one_row", "ragged4_finished", "ragged2"])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_paged_pools_give_the_bits_of_contiguous_caches(name, rows, positions, block_size):
    args = step_args_over_random_caches(name, rows, positions)
    k_pools, table = paged_copy(args[K], block_size, seed=1)
    v_pools, _ = paged_copy(args[V], block_size, seed=1)  # the same shuffle
    untouched = [p.clone() for p in k_pools + v_pools]
    want = OPS.cpu_decode_step(*args)  # writes the contiguous caches
    paged = [*args[:K], k_pools, v_pools, *args[K + 2:]]
    got = cpu_step.cpu_decode_step(*paged, block_tables=table)
    assert_same_bits(got, want)
    # through the table the pools hold the contiguous caches, the writes included
    for pool, cache in zip(k_pools + v_pools, args[K] + args[V], strict=True):
        assert_same_bits(gathered(pool, table), cache)
    # and nothing else moved: the spare blocks and every slot but the rows' positions
    written = torch.zeros(untouched[0].shape[:2], dtype=torch.bool)
    for r, p in enumerate(positions):
        if p >= 0:
            written[table[r, p // block_size].long(), p % block_size] = True
    for pool, before in zip(k_pools + v_pools, untouched, strict=True):
        assert torch.equal(pool[~written], before[~written])


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("hq, hkv, d", [(6, 2, 6), (3, 1, 10), (2, 2, 48)])
def test_paged_decode_attention_fp32_is_decode_attentions_loop(block_size, hq, hkv, d):
    g = torch.Generator().manual_seed(hq * d + block_size)
    rows, width = 3, 64 // block_size
    pool_k = torch.randn(rows * width + 2, block_size, hkv, d, generator=g)
    pool_v = torch.randn(rows * width + 2, block_size, hkv, d, generator=g)
    table = torch.randperm(rows * width + 2, generator=g)[: rows * width].view(rows, width)
    table = table.to(torch.int32)
    lens = torch.tensor([1, 37, 64], dtype=torch.int32)
    q = torch.randn(rows, hq, d, generator=g)
    got = OPS.paged_decode_attention(q, pool_k, pool_v, table, lens, d ** -0.5)
    want = OPS.decode_attention(q, gathered(pool_k, table), gathered(pool_v, table), lens,
                                d ** -0.5)
    assert_same_bits(got, want)


def recorded_logits(engine: ServingEngine) -> list[torch.Tensor]:
    """Every forward's logits, recorded as the engine runs."""
    out: list[torch.Tensor] = []
    forward = engine.forward

    def record(*args, **kwargs):
        logits = forward(*args, **kwargs)
        out.append(logits.clone())
        return logits

    engine.forward = record
    return out


def counting(monkeypatch) -> list[bool]:
    """Whether each call of the operator through the engine was given block tables."""
    calls: list[bool] = []
    real = cpu_step._op
    monkeypatch.setattr(cpu_step, "_op",
                        lambda *a: calls.append(a[-1] is not None) or real(*a))
    return calls


@pytest.mark.parametrize("name", ["gqa_hd6", "mha", "mqa_hd10"])
def test_the_serving_engine_gives_the_bits_of_the_separate_ops(name, monkeypatch):
    model = model_for(name, seed=4)
    vocab = model.config.vocab_size
    shared = prompts([9], vocab, seed=5)[0]
    # shared prefixes (prefix-cache hits read another request's blocks), 6 requests (more than
    # the step's 4 rows), different lengths and outputs (rows finish at different times)
    batch = [shared + p for p in prompts([3, 14, 1], vocab, seed=6)] + prompts([5, 21, 2], vocab)
    params = [SamplingParams(temperature=0, max_new_tokens=n, stop_at_eos=False)
              for n in (12, 5, 17, 9, 14, 3)]
    results, logits = [], []
    calls = counting(monkeypatch)
    for fusion in (Fusion.FULL, Fusion.SILU_GEMV):
        engine = ServingEngine(model, block_size=4, kv_memory=2**20, max_running=6,
                               token_budget=16, settings=Settings(fusion=fusion, cpu_gemv=True))
        logits.append(recorded_logits(engine))
        results.append(engine.generate(batch, params))
        if fusion is Fusion.FULL:  # the paged step ran, with tables, at 1 to 4 rows
            assert calls and all(calls)
            paged_steps = len(calls)
    assert len(calls) == paged_steps  # none below FULL
    assert len(logits[0]) == len(logits[1])
    for a, b in zip(*logits, strict=True):
        assert_same_bits(a, b)
    for a, b in zip(*(r.completions for r in results), strict=True):
        assert a.token_ids == b.token_ids


def test_greedy_through_the_paged_step_equals_the_no_cache_reference(monkeypatch):
    model = model_for("mha", seed=2)
    calls = counting(monkeypatch)
    engine = ServingEngine(model, block_size=8, kv_memory=2**20)
    batch = prompts([7, 19], model.config.vocab_size, seed=3)
    result = engine.generate(batch, SamplingParams(temperature=0, max_new_tokens=40,
                                                   stop_at_eos=False))
    assert len(calls) >= 39
    for ids, completion in zip(batch, result.completions, strict=True):
        assert completion.token_ids == reference_greedy(model, ids, 40)[0]


# ---------------------------------------------------------------------------------------------
# bad tables and pools: refused with one line, before anything is written


def _bad_cases():
    args = step_args_over_random_caches("gqa_hd6", 2, [3, 7])
    k_pools, table = paged_copy(args[K], 4)
    v_pools, _ = paged_copy(args[V], 4)
    good = [*args[:K], k_pools, v_pools, *args[K + 2:]]

    def but(table=table, k=None, v=None, positions=None):
        bad = list(good)
        if k is not None:
            bad[K] = k
        if v is not None:
            bad[V] = v
        if positions is not None:
            bad[POSITIONS] = torch.tensor(positions, dtype=torch.int32)
        return bad, table

    yield "expected block_tables of dtype torch.int32, got torch.int64", but(table.long())
    yield r"expected block_tables of shape \[2, blocks_per_row >= 1\]", but(table[:1])
    yield r"expected block_tables of shape \[2, blocks_per_row >= 1\]", but(table[:, :0])
    yield "expected block_tables with each row contiguous", but(table.t().contiguous().t())
    out_of_pool = table.clone()
    out_of_pool[1, 1] = k_pools[0].shape[0]
    yield (r"expected block_tables\[1, 1\] in \[0, num_blocks 19\) \(it holds keys of row 1 "
           r"up to position 7\), got 19"), but(out_of_pool)
    negative = table.clone()
    negative[0, 0] = -1  # a finished row still reads key 0
    yield r"expected block_tables\[0, 0\] in \[0, num_blocks 19\) .* got -1", but(
        negative, positions=[-1, 7])
    yield r"layer 0: expected positions\[1\] \+ 1 <= max_seq_len 32", but(positions=[3, 32])
    yield (r"layer 1: expected k_cache of layer 0's pool shape \[19, 4, 2, 6\] \(one block "
           r"table for every layer\)"), but(k=[k_pools[0], k_pools[1][:-1]],
                                            v=[v_pools[0], v_pools[1][:-1]])
    yield r"layer 0: expected a power-of-two block_size \(k_cache.size\(1\)\), got 3", but(
        k=[p[:, :3].contiguous() for p in k_pools], v=[p[:, :3].contiguous() for p in v_pools])
    yield r"layer 0: expected v_cache of k_cache's shape", but(v=[v_pools[0][:-1], v_pools[1]])


@pytest.mark.parametrize("message, case", list(_bad_cases()), ids=lambda v: str(v)[:40])
def test_bad_tables_and_pools_are_refused_before_anything_is_written(message, case):
    args, table = case
    before = [t.clone() for t in args[K] + args[V]]
    prefix = "^cpu_decode_step, " if message.startswith("layer") else "^cpu_decode_step: "
    with pytest.raises(ValueError, match=prefix + message):
        OPS.cpu_decode_step(*args, block_tables=table)
    for t, b in zip(args[K] + args[V], before, strict=True):
        assert torch.equal(t, b)


def test_opcheck_accepts_the_operator_with_tables():
    args = step_args_over_random_caches("gqa_hd6", 2, [3, 7])
    k_pools, table = paged_copy(args[K], 4)
    v_pools, _ = paged_copy(args[V], 4)
    torch.library.opcheck(OPS.cpu_decode_step.default,
                          [*args[:K], k_pools, v_pools, *args[K + 2:], table],
                          test_utils=("test_schema", "test_faketensor"))
