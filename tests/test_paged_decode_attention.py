"""toyllm::paged_decode_attention against a float64 reference of masked attention over the
gathered keys, and against toyllm's contiguous decode_attention on the same K/V: dtypes, GQA
ratios and MQA, block sizes 1 to 256, head dims 64/128 and odd ones, ragged lengths (0, 1, on
and across block boundaries), shuffled non-contiguous block tables whose unused blocks and
slots hold NaN/inf; the end-to-end path through PagedKVCache (reserve, paged_kv_write, fork,
copy_on_write); bad inputs; CUDA-graph capture and replay after the tables change through
sync_device()."""

from __future__ import annotations

import re

import pytest
import torch
from attention_reference import TOLERANCE, assert_close_rows, reference_attention

from toyllm.engine.ops.kv_cache import decode_attention
from toyllm.engine.ops.paged_cache import PagedKVCache, paged_decode_attention, paged_kv_write

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (num_q_heads, num_kv_heads): GQA ratios 1, 4, 16 and MQA.
HEADS = [(4, 4), (8, 2), (32, 2), (8, 1)]


def paged_copy(
    k: torch.Tensor,  # [batch, max_len, num_kv_heads, head_dim]
    v: torch.Tensor,
    seq_lens: list[int],
    block_size: int,
    g: torch.Generator,
    spare_blocks: int = 3,
    spare_columns: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same keys in pools [num_blocks, block_size, H, D] under a shuffled block table
    [batch, width] (-1 past each row's blocks). Slots no key maps to hold NaN (K) and inf (V),
    so a kernel reading past a row's length or into a foreign block shows it."""
    batch, max_len, heads, head_dim = k.shape
    width = -(-max_len // block_size) + spare_columns
    used = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(used) + spare_blocks
    order = torch.randperm(num_blocks, generator=g).tolist()
    k_pool = torch.full((num_blocks, block_size, heads, head_dim), float("nan"), dtype=k.dtype)
    v_pool = torch.full((num_blocks, block_size, heads, head_dim), float("inf"), dtype=v.dtype)
    table = torch.full((batch, width), -1, dtype=torch.int32)
    for b, length in enumerate(seq_lens):
        for i in range(used[b]):
            block = order.pop()
            table[b, i] = block
            n = min(block_size, length - i * block_size)
            k_pool[block, :n] = k[b, i * block_size: i * block_size + n].cpu()
            v_pool[block, :n] = v[b, i * block_size: i * block_size + n].cpu()
    device = k.device
    return k_pool.to(device), v_pool.to(device), table.to(device)


def random_qkv(device: str, dtype: torch.dtype, batch: int, max_len: int, heads: tuple[int, int],
               head_dim: int, g: torch.Generator):
    num_q_heads, num_kv_heads = heads
    q = torch.randn(batch, num_q_heads, head_dim, generator=g)
    k = torch.randn(batch, max_len, num_kv_heads, head_dim, generator=g)
    v = torch.randn(batch, max_len, num_kv_heads, head_dim, generator=g)
    return q.to(dtype).to(device), k.to(dtype).to(device), v.to(dtype).to(device)


def run_case(device: str, dtype: torch.dtype, heads: tuple[int, int], head_dim: int,
             block_size: int, seq_lens: list[int], seed: int = 0, **options) -> None:
    """paged_decode_attention on shuffled blocks against the float64 reference, and against
    decode_attention on a contiguous cache of the table's width in tokens: bit for bit where the
    arithmetic is the same (CUDA: the same kernels and plan; CPU fp32: the same loop), else
    within the dtype's tolerance."""
    g = torch.Generator().manual_seed(seed)
    max_len = max(max(seq_lens), 1)
    q, k, v = random_qkv(device, dtype, len(seq_lens), max_len, heads, head_dim, g)
    k_pool, v_pool, table = paged_copy(k, v, seq_lens, block_size, g)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    out = paged_decode_attention(q, k_pool, v_pool, table, lens, scale, **options)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    assert bool(torch.isfinite(out).all())
    assert_close_rows(out, reference_attention(q, k, v, seq_lens, scale), seq_lens,
                      TOLERANCE[dtype])
    # The contiguous cache decode_attention reads: rows of table.size(1) * block_size slots, the
    # same keys, zeros past them.
    capacity = table.shape[1] * block_size
    k_cache = torch.zeros(len(seq_lens), capacity, *k.shape[2:], dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    k_cache[:, :max_len], v_cache[:, :max_len] = k, v
    want = decode_attention(q, k_cache, v_cache, lens, scale, **options)
    if device == "cuda" or dtype == torch.float32:
        assert torch.equal(out, want)
    else:
        assert_close_rows(out, want.double().cpu(), seq_lens, TOLERANCE[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"q{h[0]}kv{h[1]}")
@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_matches_reference_and_decode_attention_for_ragged_lengths(
    device: str, dtype: torch.dtype, heads: tuple[int, int], block_size: int
) -> None:
    # Lengths 0, 1, one block, one block + 1, two blocks - 1, and one spanning several tiles.
    lens = [0, 1, block_size, block_size + 1, 2 * block_size - 1, 300]
    run_case(device, dtype, heads, 64, block_size, lens)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [128, 72, 33])
@pytest.mark.parametrize("block_size", [8, 256])
def test_matches_reference_for_other_head_dims_and_block_sizes(
    device: str, dtype: torch.dtype, head_dim: int, block_size: int
) -> None:
    run_case(device, dtype, (8, 2), head_dim, block_size, [257, 5, 0, 128], seed=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_for_a_long_context_split_across_blocks(
    device: str, dtype: torch.dtype
) -> None:
    run_case(device, dtype, (32, 8), 128, 16, [4096, 3001], seed=2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tile", [64, 128])
@pytest.mark.parametrize("tensor_cores", [True, False])
@pytest.mark.parametrize("reverse", [True, False])
def test_cuda_options_match_decode_attention_bit_for_bit(
    dtype: torch.dtype, tile: int, tensor_cores: bool, reverse: bool
) -> None:
    run_case("cuda", dtype, (16, 2), 64, 32, [1000, 63, 64, 65, 0], seed=3, tile=tile,
             tensor_cores=tensor_cores, reverse=reverse)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_through_the_cache_reserve_write_fork_copy_on_write(device: str, dtype: torch.dtype):
    """A prompt written block by block through slot_mapping, a fork that diverges after
    copy_on_write: each sequence attends over its own tokens, whatever blocks hold them."""
    g = torch.Generator().manual_seed(4)
    heads, head_dim, block_size = (8, 2), 64, 16
    cache = PagedKVCache(2, 16, block_size, heads[1], head_dim, dtype, device, 4, 8)
    layer = 1
    k_pool, v_pool = cache.key_pool(layer), cache.value_pool(layer)

    def write(seq: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[0]
        start = cache.sequence_length(seq)
        cache.reserve(seq, n)
        cache.copy_on_write(seq)
        slots = torch.tensor(cache.slot_mapping(seq, start, n), device=device)
        paged_kv_write(k_pool, v_pool, k, v, slots)
        cache.advance(seq, n)

    def rand(n: int) -> torch.Tensor:
        return torch.randn(n, heads[1], head_dim, generator=g).to(dtype).to(device)

    parent = cache.add_sequence()
    prompt_k, prompt_v = rand(37), rand(37)
    write(parent, prompt_k, prompt_v)
    child = cache.fork(parent)
    tail = {parent: (rand(5), rand(5)), child: (rand(20), rand(20))}
    for seq, (k, v) in tail.items():
        write(seq, k, v)
    assert cache.sequence_blocks(parent)[2] != cache.sequence_blocks(child)[2]  # copied
    assert cache.sequence_blocks(parent)[:2] == cache.sequence_blocks(child)[:2]  # shared
    cache.sync_device()
    rows = torch.tensor([child, parent], device=device)
    q = torch.randn(2, heads[0], head_dim, generator=g).to(dtype).to(device)
    out = paged_decode_attention(q, k_pool, v_pool, cache.block_tables()[rows],
                                 cache.sequence_lengths()[rows])
    lens = [37 + 20, 37 + 5]
    k_all = torch.zeros(2, 57, heads[1], head_dim, dtype=dtype, device=device)
    v_all = torch.zeros_like(k_all)
    for row, seq in enumerate((child, parent)):
        k_all[row, :37], v_all[row, :37] = prompt_k, prompt_v
        k_all[row, 37: lens[row]], v_all[row, 37: lens[row]] = tail[seq]
    ref = reference_attention(q, k_all, v_all, lens, head_dim**-0.5)
    assert_close_rows(out, ref, lens, TOLERANCE[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_a_column_slice_of_the_cache_tables_is_read_in_place(device: str) -> None:
    g = torch.Generator().manual_seed(5)
    q, k, v = random_qkv(device, torch.float32, 2, 40, (4, 2), 32, g)
    k_pool, v_pool, table = paged_copy(k, v, [40, 17], 8, g, spare_columns=5)
    lens = torch.tensor([40, 17], dtype=torch.int32, device=device)
    sliced = table[:, :5]  # row stride 10, entries side by side
    assert not sliced.is_contiguous()
    out = paged_decode_attention(q, k_pool, v_pool, sliced, lens)
    assert torch.equal(out, paged_decode_attention(q, k_pool, v_pool, sliced.contiguous(), lens))
    assert_close_rows(out, reference_attention(q, k, v, [40, 17], 32**-0.5), [40, 17], 1e-5)


def _good_args(device: str = "cpu") -> dict:
    return {
        "q": torch.zeros(2, 4, 16, device=device),
        "k_pool": torch.zeros(6, 4, 2, 16, device=device),
        "v_pool": torch.zeros(6, 4, 2, 16, device=device),
        "block_tables": torch.tensor([[0, 1, -1], [5, -1, -1]], dtype=torch.int32, device=device),
        "seq_lens": torch.tensor([5, 4], dtype=torch.int32, device=device),
        "scale": 0.25,
    }


BAD = [
    ({"q": torch.zeros(4, 16)}, "expected q of 3 dims [batch, num_q_heads, head_dim], got shape "
                                 "[4, 16]"),
    ({"k_pool": torch.zeros(24, 2, 16)}, "expected k_pool of 4 dims [num_blocks, block_size, "
                                          "num_kv_heads, head_dim], got shape [24, 2, 16]"),
    ({"v_pool": torch.zeros(6, 4, 2, 8)}, "expected v_pool of k_pool's shape [6, 4, 2, 16], got "
                                           "[6, 4, 2, 8]"),
    ({"q": torch.zeros(2, 4, 8)}, "expected k_pool of shape [num_blocks, block_size, "
                                   "num_kv_heads, 8] (q's head_dim), got [6, 4, 2, 16]"),
    ({"q": torch.zeros(2, 3, 16)}, "expected num_q_heads (3) to be a positive multiple of "
                                    "num_kv_heads, got num_kv_heads 2"),
    ({"k_pool": torch.zeros(6, 3, 2, 16), "v_pool": torch.zeros(6, 3, 2, 16)},
     "expected block_size (k_pool.size(1)) a power of two, got 3"),
    ({"q": torch.zeros(2, 4, 300), "k_pool": torch.zeros(6, 4, 2, 300),
      "v_pool": torch.zeros(6, 4, 2, 300)}, "expected head_dim in [1, 256], got 300"),
    ({"q": torch.zeros(2, 4, 16, dtype=torch.float64)},
     "expected q of dtype torch.float32, torch.float16 or torch.bfloat16, got torch.float64"),
    ({"k_pool": torch.zeros(6, 4, 2, 16, dtype=torch.float16)},
     "expected k_pool of dtype torch.float32 (q's), got torch.float16"),
    ({"v_pool": torch.zeros(6, 4, 2, 16, dtype=torch.bfloat16)},
     "expected v_pool of dtype torch.float32 (q's), got torch.bfloat16"),
    ({"block_tables": torch.zeros(2, 3, dtype=torch.int64)},
     "expected block_tables of dtype torch.int32, got torch.int64"),
    ({"block_tables": torch.zeros(3, 3, dtype=torch.int32)},
     "expected block_tables of shape [2, max_blocks >= 1] (q's batch), got [3, 3]"),
    ({"block_tables": torch.zeros(2, 0, dtype=torch.int32)},
     "expected block_tables of shape [2, max_blocks >= 1]"),
    ({"block_tables": torch.zeros(3, 2, dtype=torch.int32).t()},
     "expected block_tables with each row contiguous (stride 1 between entries), got strides "
     "[1, 2]"),
    ({"seq_lens": torch.tensor([5, 4])}, "expected seq_lens of dtype torch.int32, got torch.int64"),
    ({"seq_lens": torch.tensor([5], dtype=torch.int32)},
     "expected seq_lens of shape [2] (q's batch), got [1]"),
    ({"seq_lens": torch.tensor([5, 0, 4, 0], dtype=torch.int32)[::2]},
     "expected a contiguous seq_lens"),
    ({"q": torch.zeros(2, 16, 4).transpose(1, 2)}, "expected a contiguous q"),
    ({"k_pool": torch.zeros(6, 4, 16, 2).transpose(2, 3)}, "expected a contiguous k_pool"),
    ({"scale": 0.0}, "expected a finite scale > 0, got 0"),
    ({"scale": float("nan")}, "expected a finite scale > 0, got nan"),
    ({"tile": 32}, "expected tile to be 0 (default), 64 or 128, got 32"),
    ({"seq_lens": torch.tensor([13, 4], dtype=torch.int32)},
     "expected seq_lens[0] in [0, block_tables.size(1) * block_size = 12], got 13"),
    ({"seq_lens": torch.tensor([5, -1], dtype=torch.int32)},
     "expected seq_lens[1] in [0, block_tables.size(1) * block_size = 12], got -1"),
    ({"seq_lens": torch.tensor([9, 4], dtype=torch.int32)},
     "expected block_tables[0, 2] in [0, num_blocks 6) (it holds keys of seq_lens[0] = 9), "
     "got -1"),
    ({"block_tables": torch.tensor([[0, 6, -1], [5, -1, -1]], dtype=torch.int32)},
     "expected block_tables[0, 1] in [0, num_blocks 6) (it holds keys of seq_lens[0] = 5), "
     "got 6"),
]


@pytest.mark.parametrize(("change", "message"), BAD)
def test_bad_arguments_raise_value_error_naming_expected_and_given(change: dict, message: str):
    args = {**_good_args(), **change}
    scale = args.pop("scale")
    tile = args.pop("tile", 0)
    with pytest.raises(ValueError, match=re.escape(message)):
        paged_decode_attention(*args.values(), scale, tile=tile)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["k_pool", "v_pool", "block_tables", "seq_lens"])
def test_tensors_on_another_device_raise(name: str):
    args = _good_args("cuda")
    args[name] = args[name].cpu()
    scale = args.pop("scale")
    with pytest.raises(ValueError, match=re.escape(f"expected {name} on cuda:0 (q's device), "
                                                   "got cpu")):
        paged_decode_attention(*args.values(), scale)


@pytest.mark.cuda
def test_cuda_clamps_lengths_and_reads_bad_table_entries_as_zeros():
    """What the host cannot check without a sync: a length past the table is clamped to it,
    an entry outside the pool reads zeros (never memory outside the pool)."""
    args = _good_args("cuda")
    g = torch.Generator().manual_seed(6)
    args["q"] = torch.randn(2, 4, 16, generator=g).cuda()
    args["k_pool"] = torch.randn(6, 4, 2, 16, generator=g).cuda()
    args["v_pool"] = torch.randn(6, 4, 2, 16, generator=g).cuda()
    scale = args.pop("scale")
    base = paged_decode_attention(*args.values(), scale)
    args["seq_lens"] = torch.tensor([5, 100], dtype=torch.int32, device="cuda")
    clamped = paged_decode_attention(*args.values(), scale)
    args["seq_lens"] = torch.tensor([5, 12], dtype=torch.int32, device="cuda")
    full = paged_decode_attention(*args.values(), scale)
    assert torch.equal(clamped[0], base[0]) and torch.equal(clamped[1], full[1])
    # Row 1's keys 4..11 sit in blocks -1, -1: zeros, i.e. score 0 and value 0.
    k1 = torch.zeros(12, 2, 16, device="cuda")
    v1 = torch.zeros(12, 2, 16, device="cuda")
    k1[:4], v1[:4] = args["k_pool"][5], args["v_pool"][5]
    ref = reference_attention(args["q"][1:], k1[None], v1[None], [12], scale)
    assert_close_rows(full[1:], ref, [12], 1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_graph_replays_with_tables_changed_through_sync_device(
    dtype: torch.dtype, head_dim: int
) -> None:
    """Capture paged_kv_write + paged_decode_attention over the cache's own mirrors once;
    grow, fork, copy-on-write and free sequences between replays: each replay equals an eager
    call on the tables of that moment."""
    device = "cuda"
    g = torch.Generator().manual_seed(7)
    heads, block_size, max_seqs = (16, 2), 16, 4
    cache = PagedKVCache(1, 64, block_size, heads[1], head_dim, dtype, device, max_seqs, 32)
    k_pool, v_pool = cache.key_pool(0), cache.value_pool(0)
    cache.storage().copy_(torch.randn(cache.storage().shape, generator=g).to(dtype))
    q = torch.zeros(max_seqs, heads[0], head_dim, dtype=dtype, device=device)
    new_k = torch.zeros(max_seqs, heads[1], head_dim, dtype=dtype, device=device)
    new_v = torch.zeros_like(new_k)
    slots = torch.full((max_seqs,), -1, dtype=torch.int64, device=device)
    # The attention reads lengths + 1 (the new token): a static buffer the step refreshes.
    attend = torch.zeros(max_seqs, dtype=torch.int32, device=device)

    def step() -> torch.Tensor:
        paged_kv_write(k_pool, v_pool, new_k, new_v, slots)
        return paged_decode_attention(q, k_pool, v_pool, cache.block_tables(), attend)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up (opts the kernels into their shared memory before capture)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    seqs: list[int] = []
    for round_ in range(6):
        if round_ == 0:
            seqs = [cache.add_sequence(), cache.add_sequence()]
            for s, n in zip(seqs, (40, 17), strict=True):
                cache.reserve(s, n)
                cache.advance(s, n)
        elif round_ == 2:
            seqs.append(cache.fork(seqs[0]))
        elif round_ == 4:
            cache.free_sequence(seqs.pop(1))
        # One new token per live sequence: room, its own block, its slot.
        slot_list = [-1] * max_seqs
        for s in seqs:
            cache.reserve(s, 1)
            cache.copy_on_write(s)
            slot_list[s] = cache.slot_mapping(s, cache.sequence_length(s), 1)[0]
        cache.sync_device()
        slots.copy_(torch.tensor(slot_list))
        attend.copy_(cache.sequence_lengths() + (slots >= 0).int())
        q.copy_(torch.randn(q.shape, generator=g).to(dtype))
        new_k.copy_(torch.randn(new_k.shape, generator=g).to(dtype))
        new_v.copy_(torch.randn(new_v.shape, generator=g).to(dtype))
        before = cache.storage().clone()
        graph.replay()
        torch.cuda.synchronize()
        after = cache.storage().clone()
        cache.storage().copy_(before)
        eager = step()
        assert torch.equal(cache.storage(), after)
        assert torch.equal(out, eager), f"round {round_}"
        for s in seqs:
            cache.advance(s, 1)
        for s in range(max_seqs):
            if s not in seqs:
                assert torch.equal(out[s], torch.zeros_like(out[s]))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_accepts_the_paged_decode_attention_operator(device: str) -> None:
    args = _good_args(device)
    args["q"] = torch.randn(args["q"].shape, device=device)
    torch.library.opcheck(torch.ops.toyllm.paged_decode_attention.default, tuple(args.values()))
