"""The serving step's packed prefill (engine/paged_step.py's PackedPrefill) on the CPU.

FlashAttention's varlen kernel runs on CUDA only (tests/test_paged_prefill_varlen_cuda.py); here
the packed step runs through varlen_causal_reference, the same definition in plain torch, so
what the host builds for it (the chunks' bounds, the key slots of chunks after a prefix, the
order of the outputs) is checked against the no-cache reference and the static Engine by the
serving check, at the fp32 tolerance, on workloads with chunked prefill, prefix-cache hits,
forks and preemption. A planted bug in the packing must fail the check.
"""

from __future__ import annotations

import pytest
import torch
from test_serving import join_and_leave, model_for, pool, random_ids, shared_prefix

import toyllm.engine.serving as serving
from toyllm.engine.check.serving import Arrival, check_serving
from toyllm.engine.forward import EngineForward, paged_prefill_varlen
from toyllm.engine.sampling import SamplingParams
from toyllm.engine.serving import ServingEngine
from toyllm.engine.varlen_attention import varlen_causal_reference


class Calls:
    """The reference varlen attention, counting its calls and those with a prefix."""

    def __init__(self) -> None:
        self.calls = self.after_prefix = 0

    def __call__(self, q, k, v, cu_q, cu_k, max_q, max_k, scale):
        self.calls += 1
        n_q, n_k = torch.diff(cu_q).tolist(), torch.diff(cu_k).tolist()
        assert max(n_q) == max_q and max(n_k) == max_k  # the launch sizes the host gave
        assert q.shape[0] == sum(n_q) and k.shape[0] == v.shape[0] == sum(n_k)
        self.after_prefix += int(n_q != n_k)
        return varlen_causal_reference(q, k, v, cu_q, cu_k, max_q, max_k, scale)


@pytest.fixture
def packed(monkeypatch) -> Calls:
    """Every ServingEngine built in the test takes the packed prefill, through the reference."""
    calls = Calls()
    monkeypatch.setattr(EngineForward, "paged_prefill_varlen", lambda self: True)
    monkeypatch.setattr(serving, "PACKED_PREFILL", True)  # the default, pinned for the test
    monkeypatch.setattr(serving, "varlen_causal_attention", calls)
    return calls


@pytest.mark.parametrize("block_size,budget", [(4, 64), (16, 8), (1, 7)])
def test_packed_prefill_matches_reference_and_static_engine(packed: Calls, block_size: int,
                                                            budget: int) -> None:
    model = model_for("gqa")
    report = check_serving(model, join_and_leave(), block_size=block_size, token_budget=budget,
                           kv_memory=pool(model, 512 // block_size + 64, block_size))
    assert report.ok, report.problems
    assert report.max_abs <= 1e-4
    assert packed.calls > 0
    if budget < 30:  # the longest prompt is chunked: chunks that start after position 0
        assert packed.after_prefix > 0


def test_packed_prefill_with_prefix_hits_forks_and_mqa(packed: Calls) -> None:
    model = model_for("mqa_hd32")
    kw = dict(block_size=8, token_budget=64, kv_memory=pool(model, 80, 8))
    report = check_serving(model, shared_prefix(), **kw)
    assert report.ok, report.problems
    assert report.max_abs <= 1e-4 and report.prefix_hit_blocks > 0
    prompt = random_ids(13, 5)
    forks = [Arrival(prompt, 20, 0), Arrival([], 16, 2, fork_of=0), Arrival(random_ids(30, 6),
                                                                            10, 3)]
    report = check_serving(model, forks, block_size=4, token_budget=16,
                           kv_memory=pool(model, 64, 4))
    assert report.ok, report.problems
    assert packed.after_prefix > 0


def test_packed_prefill_under_preemption(packed: Calls) -> None:
    model = model_for()
    workload = [Arrival(random_ids(n, 30 + n), m, s)
                for n, m, s in [(10, 30, 0), (14, 25, 0), (6, 40, 1), (20, 12, 2), (3, 30, 4)]]
    report = check_serving(model, workload, block_size=4, kv_memory=pool(model, 14, 4),
                           max_running=5)
    assert report.ok, report.problems
    assert report.preemptions > 0


def test_packed_prefill_gives_the_segment_steps_tokens(packed: Calls) -> None:
    model = model_for()
    prompts = [random_ids(n, n) for n in (5, 40, 1, 33, 17)]
    params = SamplingParams(max_new_tokens=12, stop_at_eos=False)
    kw = dict(block_size=4, token_budget=24, kv_memory=pool(model, 128, 4))
    a = ServingEngine(model, **kw).generate(prompts, params)
    calls = packed.calls
    plain = ServingEngine(model, packed_prefill=False, **kw)
    plain._prefill_varlen = False  # the fixture's patch said True for every engine
    b = plain.generate(prompts, params)
    assert packed.calls == calls  # the segment engine did not take the packed path
    assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]


def test_a_wrong_key_gather_fails_the_check(monkeypatch) -> None:
    """Keys read one slot off for chunks after a prefix: the check must see it."""
    calls = Calls()

    def shifted(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        if not torch.equal(cu_q, cu_k):
            k, v = k.roll(1, 0), v.roll(1, 0)
        return calls(q, k, v, cu_q, cu_k, max_q, max_k, scale)

    monkeypatch.setattr(EngineForward, "paged_prefill_varlen", lambda self: True)
    monkeypatch.setattr(serving, "PACKED_PREFILL", True)
    monkeypatch.setattr(serving, "varlen_causal_attention", shifted)
    model = model_for()
    report = check_serving(model, join_and_leave(), block_size=4, token_budget=8,
                           kv_memory=pool(model, 192, 4))
    assert calls.after_prefix > 0
    assert report.problems


def test_the_packed_path_is_chosen_only_where_flash_runs() -> None:
    cpu, f32, bf16 = torch.device("cpu"), torch.float32, torch.bfloat16
    assert not paged_prefill_varlen(cpu, bf16, 64, 32, 8)  # CUDA only
    assert not paged_prefill_varlen(cpu, f32, 64, 32, 8)
    if torch.cuda.is_available():  # pragma: no cover - CUDA machines
        cuda = torch.device("cuda")
        assert not paged_prefill_varlen(cuda, f32, 64, 32, 8)  # flash: fp16/bf16
        assert not paged_prefill_varlen(cuda, bf16, 60, 32, 8)  # head_dim % 8
        model = model_for().to("cuda", bf16)
        assert ServingEngine(model, kv_memory=2**20, packed_prefill=True)._prefill_varlen
        assert not ServingEngine(model, kv_memory=2**20, packed_prefill=False)._prefill_varlen
    assert not ServingEngine(model_for(), kv_memory=2**20)._prefill_varlen


def test_varlen_reference_is_per_chunk_causal_sdpa() -> None:
    """The reference against one plain softmax per query, GQA and a chunk after a prefix."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(7, 4, 8, generator=g)
    k = torch.randn(10, 2, 8, generator=g)
    v = torch.randn(10, 2, 8, generator=g)
    cu_q = torch.tensor([0, 3, 7], dtype=torch.int32)  # 3 queries from 0, 4 after a prefix of 2
    cu_k = torch.tensor([0, 3, 9], dtype=torch.int32)  # (k row 9 belongs to no chunk)
    out = varlen_causal_reference(q, k, v, cu_q, cu_k, 4, 6)
    for row, (base, start, i) in enumerate([(0, 0, 0), (0, 0, 1), (0, 0, 2), (3, 2, 0),
                                            (3, 2, 1), (3, 2, 2), (3, 2, 3)]):
        for h in range(4):
            keys = k[base:base + start + i + 1, h // 2]
            want = torch.softmax(keys @ q[row, h] / 8 ** 0.5, dim=0) @ v[base:base + start + i
                                                                       + 1, h // 2]
            assert torch.allclose(out[row, h], want, atol=1e-5), (row, h)


def test_decode_slots_on_the_device_are_the_caches_slot_mapping() -> None:
    """The graph decode step derives each row's slot from its block-table row
    (engine/paged_graphs.py): the host's PagedKVCache.slot_mapping, and -1 for padding."""
    from toyllm.engine.ops.paged_cache import PagedKVCache
    from toyllm.engine.paged_graphs import decode_slots

    cache = PagedKVCache(num_layers=1, num_blocks=40, block_size=4, num_kv_heads=1, head_dim=4,
                         dtype=torch.float32, device="cpu", max_seqs=4, max_blocks_per_seq=8)
    lengths = [13, 1, 30]
    seqs = []
    for n in lengths:
        seq = cache.add_sequence()
        cache.reserve(seq, n)
        seqs.append(seq)
    cache.sync_device()
    rows = [(s, p) for s, n in zip(seqs, lengths, strict=True) for p in range(n)]
    rows.append((0, -1))  # a padding row
    seq_t = torch.tensor([s for s, _ in rows])
    pos_t = torch.tensor([p for _, p in rows])
    got = decode_slots(cache.block_tables().index_select(0, seq_t), pos_t, 4).tolist()
    want = [cache.slot_mapping(s, p, 1)[0] for s, p in rows[:-1]] + [-1]
    assert got == want
