"""toyllm::paged_kv_write against the pure-PyTorch reference write (index_copy_ of the rows of
the tokens whose slot is not negative), bit for bit, starting from pools of random bytes (so
untouched slots are checked too, and NaN payloads survive the copy): random shapes, dtypes,
token counts, padding slots and strided token rows; every bad argument raises before anything
is written; CUDA-graph replay with new slots."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from toyllm.engine.ops.paged_cache import PagedKVCache, paged_kv_write

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_bytes(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """A tensor of `dtype` whose bits are uniformly random (NaNs and infinities included)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * itemsize), dtype=torch.uint8,
                        generator=g)
    return raw.view(dtype)


def reference_write(pool: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """pool [num_blocks, block_size, H, D] with rows [T, H, D] at flat slots (>= 0), as bytes."""
    row_bytes = pool[0, 0].numel() * pool.element_size()
    flat = pool.cpu().clone().reshape(-1).view(torch.uint8).reshape(-1, row_bytes)
    keep = slots.cpu() >= 0
    new = rows.cpu()[keep].reshape(-1).view(torch.uint8).reshape(int(keep.sum()), row_bytes)
    flat.index_copy_(0, slots.cpu()[keep], new)
    return flat


@st.composite
def write_cases(draw: st.DrawFn) -> dict:
    num_blocks = draw(st.integers(1, 6))
    block_size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    num_slots = num_blocks * block_size
    num_tokens = draw(st.integers(0, min(num_slots, 12)))
    # Distinct slots (a real slot mapping never writes one slot twice), some padding.
    chosen = draw(st.permutations(range(num_slots)))[:num_tokens]
    pad = draw(st.lists(st.booleans(), min_size=num_tokens, max_size=num_tokens))
    slots = [-1 if p else s for s, p in zip(chosen, pad, strict=True)]
    return {
        "num_blocks": num_blocks,
        "block_size": block_size,
        "heads": draw(st.integers(1, 3)),
        "head_dim": draw(st.sampled_from([1, 3, 8, 64, 72])),
        "slots": slots,
        "strided": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def run_write_case(device: str, dtype: torch.dtype, case: dict) -> None:
    g = torch.Generator().manual_seed(case["seed"])
    shape = (case["num_blocks"], case["block_size"], case["heads"], case["head_dim"])
    k_pool = random_bytes(shape, dtype, g).to(device)
    v_pool = random_bytes(shape, dtype, g).to(device)
    k_before, v_before = k_pool.clone(), v_pool.clone()
    t = len(case["slots"])
    rows = (t, case["heads"], case["head_dim"])
    if case["strided"]:
        # k and v as views of one fused [T, 3, H, D] product: token rows apart, each contiguous.
        fused = random_bytes((t, 3, *rows[1:]), dtype, g).to(device)
        k, v = fused[:, 1], fused[:, 2]
    else:
        k, v = random_bytes(rows, dtype, g).to(device), random_bytes(rows, dtype, g).to(device)
    slots = torch.tensor(case["slots"], dtype=torch.int64, device=device)
    paged_kv_write(k_pool, v_pool, k, v, slots)
    want_k = reference_write(k_before, k, slots)
    want_v = reference_write(v_before, v, slots)
    got_k = k_pool.cpu().reshape(-1).view(torch.uint8).reshape(want_k.shape)
    got_v = v_pool.cpu().reshape(-1).view(torch.uint8).reshape(want_v.shape)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=40, deadline=None)
@given(case=write_cases())
def test_paged_kv_write_equals_reference_cpu(dtype: torch.dtype, case: dict):
    run_write_case("cpu", dtype, case)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=40, deadline=None)
@given(case=write_cases())
def test_paged_kv_write_equals_reference_cuda(dtype: torch.dtype, case: dict):
    run_write_case("cuda", dtype, case)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_kv_write_of_a_prefill_lands_where_slot_mapping_says(device: str):
    cache = PagedKVCache(2, 16, 4, 2, 8, torch.float16, device, 2, 8)
    seq = cache.add_sequence()
    cache.reserve(seq, 13)
    k = torch.randn(13, 2, 8, dtype=torch.float16, device=device)
    v = torch.randn(13, 2, 8, dtype=torch.float16, device=device)
    slots = torch.tensor(cache.slot_mapping(seq, 0, 13), device=device)
    paged_kv_write(cache.key_pool(1), cache.value_pool(1), k, v, slots)
    blocks = cache.sequence_blocks(seq)
    for p in range(13):
        b, o = blocks[p // 4], p % 4
        assert torch.equal(cache.key_pool(1)[b, o], k[p])
        assert torch.equal(cache.value_pool(1)[b, o], v[p])
    assert not cache.key_pool(0).any()  # the other layer is untouched


def good_args(device: str = "cpu") -> dict:
    return {
        "k_pool": torch.zeros(4, 2, 2, 8, device=device),
        "v_pool": torch.zeros(4, 2, 2, 8, device=device),
        "k": torch.ones(3, 2, 8, device=device),
        "v": torch.ones(3, 2, 8, device=device),
        "slots": torch.tensor([0, 5, -1], device=device),
    }


BAD = [
    ({"k_pool": torch.zeros(8, 2, 8)}, "expected k_pool of 4 dims [num_blocks, block_size, "
                                        "num_kv_heads, head_dim], got shape [8, 2, 8]"),
    ({"v_pool": torch.zeros(4, 2, 2, 4)}, "expected v_pool of k_pool's shape [4, 2, 2, 8], got "
                                           "[4, 2, 2, 4]"),
    ({"k": torch.ones(3, 1, 8)}, "expected k of shape [num_tokens, 2, 8] (the pool's heads and "
                                  "head_dim), got [3, 1, 8]"),
    ({"k": torch.ones(3, 16)}, "expected k of shape [num_tokens, 2, 8]"),
    ({"v": torch.ones(2, 2, 8)}, "expected v of k's shape [3, 2, 8], got [2, 2, 8]"),
    ({"k_pool": torch.zeros(4, 2, 2, 8, dtype=torch.int32),
      "v_pool": torch.zeros(4, 2, 2, 8, dtype=torch.int32)},
     "expected k_pool of dtype torch.float32, torch.float16 or torch.bfloat16, got torch.int32"),
    ({"v_pool": torch.zeros(4, 2, 2, 8, dtype=torch.float16)},
     "expected v_pool of dtype torch.float32 (k_pool's), got torch.float16"),
    ({"k": torch.ones(3, 2, 8, dtype=torch.bfloat16)},
     "expected k of dtype torch.float32 (the pool's), got torch.bfloat16"),
    ({"v": torch.ones(3, 2, 8, dtype=torch.float16)},
     "expected v of dtype torch.float32 (the pool's), got torch.float16"),
    ({"slots": torch.tensor([0, 5, -1], dtype=torch.int32)},
     "expected slots of dtype torch.int64, got torch.int32"),
    ({"slots": torch.tensor([0, 5])}, "expected slots of shape [3] (k's num_tokens), got [2]"),
    ({"slots": torch.tensor([[0, 5, -1]])}, "expected slots of shape [3]"),
    ({"slots": torch.tensor([0, 8, -1])},
     "expected slots[1] < num_blocks * block_size = 8 (or negative for a padding token), got 8"),
    ({"k_pool": torch.zeros(4, 2, 8, 2).transpose(2, 3)}, "expected a contiguous k_pool"),
    ({"k": torch.ones(3, 8, 2).transpose(1, 2)},
     "expected k with each token's [num_kv_heads, head_dim] row contiguous"),
    ({"v": torch.ones(2, 3, 8).transpose(0, 1)},
     "expected v with each token's [num_kv_heads, head_dim] row contiguous"),
    ({"slots": torch.tensor([0, 0, 5, 0, -1, 0])[::2]}, "expected a contiguous slots"),
]


@pytest.mark.parametrize(("change", "message"), BAD)
def test_bad_arguments_raise_before_anything_is_written(change: dict, message: str):
    args = {**good_args(), **change}
    before = (args["k_pool"].clone(), args["v_pool"].clone())
    with pytest.raises(ValueError, match=re.escape(message)):
        paged_kv_write(**args)
    assert torch.equal(args["k_pool"], before[0]) and torch.equal(args["v_pool"], before[1])


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["v_pool", "k", "v", "slots"])
def test_tensors_on_another_device_raise(name: str):
    args = good_args("cuda")
    args[name] = args[name].cpu()
    why = "k_pool's device" if name == "v_pool" else "the pool's device"
    with pytest.raises(ValueError, match=re.escape(f"expected {name} on cuda:0 ({why}), got cpu")):
        paged_kv_write(**args)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_graph_replay_writes_at_the_slots_of_the_replay(dtype: torch.dtype):
    device = "cuda"
    k_pool = torch.zeros(8, 4, 2, 64, dtype=dtype, device=device)
    v_pool = torch.zeros_like(k_pool)
    k = torch.zeros(3, 2, 64, dtype=dtype, device=device)
    v = torch.zeros_like(k)
    slots = torch.full((3,), -1, dtype=torch.int64, device=device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        paged_kv_write(k_pool, v_pool, k, v, slots)  # warm-up
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_kv_write(k_pool, v_pool, k, v, slots)
    for want in ([0, 9, -1], [31, -1, 4], [40, 7, 2]):
        k.copy_(torch.randn(k.shape, device=device).to(dtype))
        v.copy_(torch.randn(v.shape, device=device).to(dtype))
        slots.copy_(torch.tensor(want))
        before_k, before_v = k_pool.clone(), v_pool.clone()
        graph.replay()
        torch.cuda.synchronize()
        # Slot 40 is past the pool (32 slots): skipped on CUDA (the CPU raises).
        written = torch.tensor([s if s < 32 else -1 for s in want])
        ref_k = reference_write(before_k, k, written).reshape(-1).view(dtype).view(k_pool.shape)
        ref_v = reference_write(before_v, v, written).reshape(-1).view(dtype).view(v_pool.shape)
        assert torch.equal(k_pool.cpu(), ref_k) and torch.equal(v_pool.cpu(), ref_v)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_accepts_the_paged_kv_write_operator(device: str) -> None:
    args = tuple(good_args(device).values())
    torch.library.opcheck(torch.ops.toyllm.paged_kv_write.default, args)
