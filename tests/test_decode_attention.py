"""toyllm::decode_attention against a float64 reference of masked attention: ragged seq_lens
(0, 1 and max_seq_len included), GQA ratios 1/4/8/16 and MQA, head dims 64/128/256 and odd
ones, fp32/fp16/bf16; long contexts that the CUDA kernel splits across blocks; CUDA-graph
replay with new lengths; the CPU loop's thread split (bit for bit) and its skipped keys whose
softmax weight underflows; bad inputs; opcheck."""

from __future__ import annotations

import pytest
import torch
from attention_reference import TOLERANCE, assert_close_rows, reference_attention

from toyllm.engine.ops.kv_cache import decode_attention

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (num_q_heads, num_kv_heads): GQA ratios 1, 4, 8, 16 and MQA.
HEADS = [(4, 4), (8, 2), (16, 2), (32, 2), (8, 1)]
HEAD_DIMS = [64, 128, 256, 72, 33]


def random_inputs(
    device: str,
    dtype: torch.dtype,
    batch: int,
    max_seq_len: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, num_q_heads, head_dim, generator=g)
    k = torch.randn(batch, max_seq_len, num_kv_heads, head_dim, generator=g)
    v = torch.randn(batch, max_seq_len, num_kv_heads, head_dim, generator=g)
    return q.to(dtype).to(device), k.to(dtype).to(device), v.to(dtype).to(device)


def run_case(
    device: str,
    dtype: torch.dtype,
    heads: tuple[int, int],
    head_dim: int,
    max_seq_len: int,
    seq_lens: list[int],
    seed: int = 0,
    **options: int | bool,
) -> None:
    """One decode_attention call against the float64 reference; `options` are the op's tile,
    reverse and tensor_cores."""
    num_q_heads, num_kv_heads = heads
    q, k, v = random_inputs(
        device, dtype, len(seq_lens), max_seq_len, num_q_heads, num_kv_heads, head_dim, seed
    )
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    out = torch.ops.toyllm.decode_attention(q, k, v, lens, scale, **options)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    assert_close_rows(
        out, reference_attention(q, k, v, seq_lens, scale), seq_lens, TOLERANCE[dtype]
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"q{h[0]}kv{h[1]}")
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_matches_float64_reference_for_ragged_lengths(
    device: str, dtype: torch.dtype, heads: tuple[int, int], head_dim: int
) -> None:
    # 257 slots: several chunks on CUDA, the last one partial; lengths max, 1, ragged, 0.
    run_case(device, dtype, heads, head_dim, max_seq_len=257, seq_lens=[257, 1, 100, 0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_for_a_long_context_split_across_blocks(
    device: str, dtype: torch.dtype
) -> None:
    run_case(device, dtype, (32, 8), 128, max_seq_len=4096, seq_lens=[4096, 3001], seed=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_for_a_short_cache_in_one_chunk(device: str, dtype: torch.dtype) -> None:
    run_case(device, dtype, (8, 2), 64, max_seq_len=16, seq_lens=[16, 5, 1], seed=2)


@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference_for_a_large_batch(device: str) -> None:
    lengths = [(7 * i) % 301 for i in range(33)]
    run_case(device, torch.float16, (16, 4), 128, max_seq_len=300, seq_lens=lengths, seed=3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_keys_and_values_past_seq_len_never_affect_the_output(
    device: str, dtype: torch.dtype
) -> None:
    seq_lens = [5, 40, 0]
    q, k, v = random_inputs(device, dtype, 3, 64, 8, 2, 64, seed=4)
    for b, length in enumerate(seq_lens):  # poison every slot past the valid keys
        k[b, length:] = float("nan")
        v[b, length:] = float("inf")
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    out = torch.ops.toyllm.decode_attention(q, k, v, lens, 0.125)
    assert bool(torch.isfinite(out).all())
    assert_close_rows(
        out, reference_attention(q, k, v, seq_lens, 0.125), seq_lens, TOLERANCE[dtype]
    )


@pytest.mark.parametrize("device", DEVICES)
def test_one_key_returns_its_value_exactly(device: str) -> None:
    q, k, v = random_inputs(device, torch.float32, 2, 8, 4, 2, 16, seed=5)
    out = torch.ops.toyllm.decode_attention(
        q, k, v, torch.tensor([1, 1], dtype=torch.int32, device=device), 1.0
    )
    expected = v[:, 0].repeat_interleave(2, dim=1)  # [B, Hq, D]: softmax of one score is 1
    assert torch.allclose(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("heads", [(6, 6), (8, 2), (3, 1)], ids=lambda h: f"q{h[0]}kv{h[1]}")
def test_cpu_one_and_two_threads_give_the_same_bits(heads: tuple[int, int]) -> None:
    """The CPU loop splits (sequence, head) pairs over the threads and walks a thread's heads
    of one sequence key by key; a split inside a sequence's heads changes no bit."""
    seq_lens = [200, 1, 150, 0, 77]
    q, k, v = random_inputs("cpu", torch.float32, len(seq_lens), 200, *heads, 48, seed=8)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.toyllm.decode_attention(q, k, v, lens, 0.15)
        torch.set_num_threads(2)
        two = torch.ops.toyllm.decode_attention(q, k, v, lens, 0.15)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)
    assert_close_rows(one, reference_attention(q, k, v, seq_lens, 0.15), seq_lens,
                      TOLERANCE[torch.float32])


def test_cpu_keys_whose_weight_underflows_change_nothing() -> None:
    """Keys scored 87.5 to 120 below the best have softmax weights under FLT_MIN (0 or a
    denormal; the CPU loop skips them rather than pay a microcode assist per product): the
    output is the best key's value bit for bit, as the exact weights (< 1e-38) round to."""
    head_dim, length = 16, 40
    q = torch.zeros(1, 1, head_dim)
    q[0, 0, 0] = 1.0
    k = torch.zeros(1, length, 1, head_dim)
    k[0, :, 0, 0] = -torch.linspace(87.5, 120.0, length)  # scores below the best key's 0
    k[0, 7, 0, 0] = 0.0  # the best key
    v = torch.randn(1, length, 1, head_dim, generator=torch.Generator().manual_seed(9)) * 100
    lens = torch.tensor([length], dtype=torch.int32)
    out = torch.ops.toyllm.decode_attention(q, k, v, lens, 1.0)
    assert torch.equal(out[0, 0], v[0, 7, 0])
    assert_close_rows(out, reference_attention(q, k, v, [length], 1.0), [length],
                      TOLERANCE[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_wrapper_defaults_scale_to_inverse_sqrt_head_dim(device: str) -> None:
    q, k, v = random_inputs(device, torch.float32, 1, 10, 2, 1, 16, seed=6)
    lens = torch.tensor([10], dtype=torch.int32, device=device)
    expected = torch.ops.toyllm.decode_attention(q, k, v, lens, 0.25)
    assert torch.equal(decode_attention(q, k, v, lens), expected)


def _good_args(device: str = "cpu") -> dict:
    q, k, v = random_inputs(device, torch.float16, 2, 8, 4, 2, 16)
    return {
        "q": q,
        "k_cache": k,
        "v_cache": v,
        "seq_lens": torch.tensor([3, 8], dtype=torch.int32, device=device),
        "scale": 0.25,
    }


BAD_CASES = {
    "q_rank": ("q", lambda a: a["q"][0], r"expected q of 3 dims .*got shape \[4, 16\]"),
    "cache_shape": (
        "v_cache",
        lambda a: a["v_cache"][:, :4],
        r"expected v_cache of k_cache's shape \[2, 8, 2, 16\], got \[2, 4, 2, 16\]",
    ),
    "head_dim": (
        "q",
        lambda a: torch.zeros(2, 4, 8, dtype=torch.float16),
        r"expected k_cache of shape \[2, max_seq_len, num_kv_heads, 8\] .*"
        r"got \[2, 8, 2, 16\]",
    ),
    "gqa": (
        "q",
        lambda a: torch.zeros(2, 3, 16, dtype=torch.float16),
        r"expected num_q_heads \(3\) to be a positive multiple of num_kv_heads, "
        r"got num_kv_heads 2",
    ),
    "dtype": (
        "k_cache",
        lambda a: a["k_cache"].float(),
        r"expected k_cache of dtype torch.float16 \(q's\), got torch.float32",
    ),
    "seq_lens_dtype": (
        "seq_lens",
        lambda a: a["seq_lens"].long(),
        r"expected seq_lens of dtype torch.int32, got torch.int64",
    ),
    "seq_lens_shape": (
        "seq_lens",
        lambda a: a["seq_lens"][:1],
        r"expected seq_lens of shape \[2\] \(q's batch\), got \[1\]",
    ),
    "seq_lens_range": (
        "seq_lens",
        lambda a: torch.tensor([3, 9], dtype=torch.int32),
        r"expected seq_lens\[1\] in \[0, max_seq_len 8\], got 9",
    ),
    "negative_len": (
        "seq_lens",
        lambda a: torch.tensor([-1, 2], dtype=torch.int32),
        r"expected seq_lens\[0\] in \[0, max_seq_len 8\], got -1",
    ),
    "non_contiguous": (
        "q",
        lambda a: a["q"].transpose(0, 1).contiguous().transpose(0, 1),
        r"expected a contiguous q, got strides",
    ),
    "scale": ("scale", lambda a: float("nan"), r"expected a finite scale > 0, got nan"),
    "too_wide": (
        "q",
        lambda a: torch.zeros(2, 4, 257, dtype=torch.float16),
        r"expected (k_cache of shape|head_dim in \[1, 256\])",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_raises_value_error_naming_expected_and_given(case: str) -> None:
    args = _good_args()
    name, make_bad, pattern = BAD_CASES[case]
    args[name] = make_bad(args)
    with pytest.raises(ValueError, match=pattern):
        torch.ops.toyllm.decode_attention(**args)


def test_head_dim_above_256_is_rejected() -> None:
    q, k, v = random_inputs("cpu", torch.float16, 1, 4, 2, 1, 264)
    with pytest.raises(ValueError, match=r"expected head_dim in \[1, 256\], got 264"):
        torch.ops.toyllm.decode_attention(q, k, v, torch.tensor([2], dtype=torch.int32), 0.1)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_accepts_the_decode_attention_operator(device: str) -> None:
    args = _good_args(device)
    torch.library.opcheck(torch.ops.toyllm.decode_attention.default, tuple(args.values()))


@pytest.mark.cuda
def test_cuda_graph_replay_uses_the_new_seq_lens() -> None:
    q, k, v = random_inputs("cuda", torch.bfloat16, 2, 1024, 16, 4, 64, seed=7)
    lens = torch.tensor([1, 1], dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.ops.toyllm.decode_attention(q, k, v, lens, 0.125)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.toyllm.decode_attention(q, k, v, lens, 0.125)
    for seq_lens in ([1, 1], [700, 3], [1024, 0], [129, 1000]):
        lens.copy_(torch.tensor(seq_lens, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        ref = reference_attention(q, k, v, seq_lens, 0.125)
        assert_close_rows(out, ref, seq_lens, TOLERANCE[torch.bfloat16])


@pytest.mark.cuda
@pytest.mark.parametrize("tile", [64, 128])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("tensor_cores", [True, False], ids=["tensor-cores", "cuda-cores"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_tile_setting_matches_the_reference(
    tile: int, reverse: bool, tensor_cores: bool, dtype: torch.dtype
) -> None:
    # Both tile sizes in both orders, on both kinds of core: one chunk (batch 4, 300 keys at
    # most: ~8 blocks per chunk) and many (batch 1 x 5000 keys), with a last tile cut short.
    # (Tensor cores take fp16/bf16 with 64 x 64, 64 x 128 and 128 x 64 head_dim x tile; the
    # other settings run on CUDA cores whatever tensor_cores says.)
    options = {"tile": tile, "reverse": reverse, "tensor_cores": tensor_cores}
    run_case("cuda", dtype, (32, 8), 64, max_seq_len=300, seq_lens=[300, 129, 1, 0], seed=8,
             **options)
    run_case("cuda", dtype, (32, 8), 128, max_seq_len=5000, seq_lens=[4999], seed=9, **options)


@pytest.mark.cuda
@pytest.mark.parametrize("tensor_cores", [True, False], ids=["tensor-cores", "cuda-cores"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads", HEADS + [(32, 1), (64, 4)], ids=lambda h: f"q{h[0]}kv{h[1]}")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_both_kernels_match_the_reference(
    tensor_cores: bool, dtype: torch.dtype, heads: tuple[int, int], head_dim: int
) -> None:
    # Pass 1 on tensor cores (the default for these shapes) and on CUDA cores: groups of 1 to
    # 32 query heads (32: two blocks of 16 on tensor cores), rows of several chunks with a
    # last tile cut short, one key, one tile exactly, none.
    run_case("cuda", dtype, heads, head_dim, max_seq_len=700,
             seq_lens=[700, 1, 129, 0, 385, 128, 64], seed=11, tensor_cores=tensor_cores)


@pytest.mark.cuda
@pytest.mark.parametrize("tensor_cores", [True, False], ids=["tensor-cores", "cuda-cores"])
def test_a_cache_not_16_byte_aligned_still_gives_the_right_output(tensor_cores: bool) -> None:
    # K/V views 2 bytes past a 16-byte boundary: the tensor-core pass cannot take them (its
    # copies are 16 bytes), so the plan keeps the CUDA cores.
    batch, max_seq_len, hq, hkv, d = 3, 300, 16, 4, 64
    q, k, v = random_inputs("cuda", torch.bfloat16, batch, max_seq_len, hq, hkv, d, seed=12)
    shape, n = k.shape, k.numel()
    k_off = torch.empty(n + 1, dtype=k.dtype, device="cuda")[1:].view(shape).copy_(k)
    v_off = torch.empty(n + 1, dtype=v.dtype, device="cuda")[1:].view(shape).copy_(v)
    assert k_off.data_ptr() % 16 != 0
    seq_lens = [300, 7, 150]
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    out = torch.ops.toyllm.decode_attention(q, k_off, v_off, lens, d**-0.5,
                                            tensor_cores=tensor_cores)
    assert_close_rows(out, reference_attention(q, k, v, seq_lens, d**-0.5), seq_lens,
                      TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tile", [32, 7, -64])
def test_a_bad_tile_is_a_value_error(device: str, tile: int) -> None:
    # Checked on every device (the CPU has no tiles, but takes the same arguments).
    args = _good_args(device)
    with pytest.raises(ValueError, match=rf"decode_attention: expected tile to be 0 \(default\), "
                                         rf"64 or 128, got {tile}"):
        torch.ops.toyllm.decode_attention(**args, tile=tile)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", [{"tile": 64}, {"tile": 128, "reverse": False},
                                     {"tensor_cores": False}], ids=str)
def test_the_kernel_options_keep_the_result(device: str, options: dict) -> None:
    # Any tile, order and kind of core computes the same attention (to rounding).
    run_case(device, torch.float16, (8, 2), 64, max_seq_len=300, seq_lens=[300, 129, 1, 0],
             seed=13, **options)


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 128])
def test_matches_reference_for_batch_16_long_contexts(head_dim: int) -> None:
    # The engine's large-batch decode: 16 rows of different lengths up to 4096 keys.
    lengths = [4096 - 250 * i for i in range(16)]
    run_case("cuda", torch.bfloat16, (32, 8), head_dim, max_seq_len=4096, seq_lens=lengths,
             seed=10)
