"""toyllm::gemv_add_rms_norm_rope_kv(x, residual, norm_weight, eps, weight, cos, sin, k_cache,
v_cache, positions, num_q_heads, warps=8) -> (sum, q): a decode step's q/k/v product after the
residual add and input RMSNorm with RoPE and the K/V write in its epilogue (CUDA:
csrc/gemv/gemv_norm_rope_kv.cu for one row), against the ops it replaces,
toyllm::gemv_add_rms_norm then toyllm::rope_kv_update: the same bits for the sum, q and every
byte of both caches (compared as integers), fp32, fp16 and bf16, Llama-1B's shape and small odd
ones, positions 0, inside, last, finished (-1) and past the end; 2 rows (the two ops); bad
inputs (nothing written); opcheck; CUDA-graph replay; the decode step's logits with the epilogue
on and off (Settings.fusion FULL, FULL with the epilogue refused, SILU_GEMV). CPU: the
composition and its checks. The fake: tests/test_op_fakes.py.
"""

from __future__ import annotations

import pytest
import torch
from same_bits import assert_same_bits

import toyllm.engine.ops.gemv_norm as norm_gemv
from toyllm.engine.generate import Engine
from toyllm.engine.settings import Fusion, Settings
from toyllm.models.config import ModelConfig
from toyllm.models.llama import build_model
from toyllm.models.rope import inverse_frequencies, rope_cos_sin

OPS = torch.ops.toyllm
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
EPS = 1e-5
# (in, num_q_heads, num_kv_heads, head_dim): Llama-1B, head_dim 128, small, odd in (element loads)
SHAPES = [(2048, 32, 8, 64), (1024, 8, 2, 128), (64, 4, 2, 16), (33, 3, 1, 8)]


def make_case(shape, dtype, rows=1, max_seq_len=16, seed=0, device="cuda"):
    n_in, hq, hkv, d = shape
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*size, scale=1.0):
        return (torch.randn(size, generator=gen, device=device) * scale).to(dtype)

    x, r = rand(rows, 1, n_in, scale=3.0), rand(rows, 1, n_in)
    g = rand(n_in).abs() + 0.5
    w = rand((hq + 2 * hkv) * d, n_in, scale=n_in**-0.5)
    config = ModelConfig(vocab_size=8, hidden_size=hq * d, num_layers=1, num_heads=hq,
                         num_kv_heads=hkv, intermediate_size=8, max_seq_len=max_seq_len)
    positions = torch.arange(rows, dtype=torch.int32, device=device) * 3 + 5
    cos, sin = rope_cos_sin(inverse_frequencies(config).to(device), positions.long()[:, None],
                            dtype)
    k_cache, v_cache = rand(rows, max_seq_len, hkv, d), rand(rows, max_seq_len, hkv, d)
    return [x, r, g, EPS, w, cos, sin, k_cache, v_cache, positions, hq]


def run_both(args):
    """The fused operator and the two it replaces, each on its own copy of the caches."""
    fused_args = list(args)
    fused_args[7], fused_args[8] = args[7].clone(), args[8].clone()
    s, q = OPS.gemv_add_rms_norm_rope_kv(*fused_args)
    ref_args = list(args)
    ref_args[7], ref_args[8] = args[7].clone(), args[8].clone()
    s2, qkv = OPS.gemv_add_rms_norm(*ref_args[:5])
    rows, d = args[7].shape[0], args[7].shape[3]
    q2 = OPS.rope_kv_update(qkv.view(rows, 1, -1, d), *ref_args[5:])
    return (s, q, fused_args[7], fused_args[8]), (s2, q2, ref_args[7], ref_args[8])


def check(args):
    got, expected = run_both(args)
    for a, b in zip(got, expected, strict=True):
        assert_same_bits(a, b)
    return got


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_has_the_bits_of_gemv_add_rms_norm_then_rope_kv_update(dtype, shape):
    for position in (0, 7, 15):  # first, inside, last of max_seq_len 16
        args = make_case(shape, dtype, seed=position)
        args[9] = torch.tensor([position], dtype=torch.int32, device="cuda")
        s, q, k_cache, v_cache = check(args)
        assert not torch.equal(k_cache, args[7])  # the new token's K was written


@pytest.mark.cuda
@pytest.mark.parametrize("position", [-1, 16, 1000])
def test_cuda_writes_no_kv_for_a_finished_row_or_past_the_end(position):
    args = make_case(SHAPES[2], torch.bfloat16, seed=3)
    args[9] = torch.tensor([position], dtype=torch.int32, device="cuda")
    _, _, k_cache, v_cache = check(args)
    assert torch.equal(k_cache, args[7]) and torch.equal(v_cache, args[8])


@pytest.mark.cuda
def test_cuda_profile_is_one_kernel_at_one_row_and_two_ops_for_two_rows():
    args = make_case(SHAPES[0], torch.bfloat16, seed=4)
    OPS.gemv_add_rms_norm_rope_kv(*args)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        OPS.gemv_add_rms_norm_rope_kv(*args)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    assert len(names) == 1 and "gemv_norm_rope_kv_kernel<" in names[0], names
    check(make_case(SHAPES[0], torch.bfloat16, rows=2, seed=5))  # the two ops: same bits


@pytest.mark.cuda
def test_cuda_graph_replays_with_new_inputs_and_positions():
    args = make_case(SHAPES[0], torch.bfloat16, seed=6)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        OPS.gemv_add_rms_norm_rope_kv(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        s, q = OPS.gemv_add_rms_norm_rope_kv(*args)
    for seed, position in ((7, 2), (8, 11)):
        new = make_case(SHAPES[0], torch.bfloat16, seed=seed)
        for i in (0, 1, 5, 6):  # x, residual, cos, sin
            args[i].copy_(new[i])
        args[9].fill_(position)
        k_before, v_before = args[7].clone(), args[8].clone()
        graph.replay()
        torch.cuda.synchronize()
        ref = list(args)
        ref[7], ref[8] = k_before, v_before
        s2, qkv = OPS.gemv_add_rms_norm(*ref[:5])
        q2 = OPS.rope_kv_update(qkv.view(1, 1, -1, 64), *ref[5:])
        assert_same_bits(s, s2)
        assert_same_bits(q, q2)
        assert_same_bits(args[7], ref[7])
        assert_same_bits(args[8], ref[8])


def _bad_cases(device):
    args = make_case(SHAPES[2], torch.float32, seed=9, device=device)

    def but(i, value):
        bad = list(args)
        bad[i] = value
        return bad

    yield "whole heads", but(4, args[4][:-1])
    yield "residual of x's shape", but(1, args[1][..., :8])
    yield "num_q_heads >= 1", but(10, 0)
    yield "qkv of shape", but(10, 5)
    yield "positions of dtype torch.int32", but(9, args[9].long())
    yield "k_cache of dtype", but(7, args[7].double())
    yield "cos (and sin )?of shape", but(5, args[5][..., :8])
    two_rows = list(args)  # two rows of x, a cache of one
    two_rows[0], two_rows[1] = args[0].repeat(2, 1, 1), args[1].repeat(2, 1, 1)
    yield "qkv of shape", two_rows
    yield "finite eps", but(3, float("nan"))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_bad_inputs_are_refused_before_anything_is_written(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for message, args in _bad_cases(device):
        k_before, v_before = args[7].clone(), args[8].clone()
        with pytest.raises(ValueError, match=message):
            OPS.gemv_add_rms_norm_rope_kv(*args)
        assert torch.equal(args[7], k_before) and torch.equal(args[8], v_before), message


@pytest.mark.cuda
@pytest.mark.parametrize("warps", [4, 16])
def test_cuda_every_block_size_has_the_bits_of_the_default(warps):
    args = make_case(SHAPES[0], torch.bfloat16, seed=21)
    default, other = list(args), list(args)
    default[7], default[8] = args[7].clone(), args[8].clone()
    other[7], other[8] = args[7].clone(), args[8].clone()
    got = OPS.gemv_add_rms_norm_rope_kv(*default)
    expected = OPS.gemv_add_rms_norm_rope_kv(*other, warps)
    for a, b in zip((*got, default[7], default[8]), (*expected, other[7], other[8]), strict=True):
        assert_same_bits(a, b)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("warps", [5, 0, 32])
def test_warps_other_than_4_8_or_16_is_a_value_error(device, warps):
    args = make_case(SHAPES[2], torch.float32, seed=22, device=device)
    k_before = args[7].clone()
    with pytest.raises(ValueError, match=rf"gemv_add_rms_norm_rope_kv: expected warps to be 4, "
                                         rf"8 or 16, got {warps}"):
        OPS.gemv_add_rms_norm_rope_kv(*args, warps=warps)
    assert torch.equal(args[7], k_before)  # nothing written


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_is_gemv_add_rms_norm_then_rope_kv_update(dtype):
    check(make_case(SHAPES[2], dtype, rows=2, seed=10, device="cpu"))
    args = make_case(SHAPES[3], torch.float32, seed=11, device="cpu")
    torch.library.opcheck(OPS.gemv_add_rms_norm_rope_kv.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.cuda
def test_cuda_opcheck():
    args = make_case(SHAPES[2], torch.bfloat16, seed=12)
    torch.library.opcheck(OPS.gemv_add_rms_norm_rope_kv.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_logits_are_the_same_bits_with_the_epilogue_on_and_off(dtype, monkeypatch):
    config = ModelConfig(vocab_size=300, hidden_size=128, num_layers=3, num_heads=4,
                         num_kv_heads=2, intermediate_size=200, max_seq_len=64)
    model = build_model(config, seed=13, device="cuda", dtype=dtype)
    calls = []
    monkeypatch.setattr(norm_gemv, "_rope_op",
                        lambda *a: calls.append(1) or OPS.gemv_add_rms_norm_rope_kv(*a))
    real_rope_kv_applies = norm_gemv.rope_kv_applies
    logits, caches = {}, {}
    # "on": FULL; "refused": FULL with the epilogue refused (gemv_add_rms_norm, then
    # rope_kv_update); "off": SILU_GEMV (add_rms_norm, gemv, rope_kv_update)
    for case, fusion in (("on", Fusion.FULL), ("refused", Fusion.FULL),
                         ("off", Fusion.SILU_GEMV)):
        monkeypatch.setattr(norm_gemv, "rope_kv_applies",
                            (lambda *a: False) if case == "refused" else real_rope_kv_applies)
        # cuda_gemv: the epilogue needs a product the CUDA GEMV takes, whatever the environment
        engine = Engine(model, tokenizer=None, cuda_graph=False,
                        settings=Settings(fusion=fusion, cuda_gemv=True))
        cache = engine.prepare_cache(1, 32)
        with torch.inference_mode():
            engine.prefill(cache, 0, [1, 2, 3, 4, 5])
            ks, vs, positions = engine.cache_views(1)
            before = len(calls)
            logits[case] = engine.decode_forward(torch.tensor([[9]], device="cuda"), positions,
                                                 ks, vs)
            # every layer after the first (whose input norm has no residual to add)
            assert len(calls) - before == (config.num_layers - 1 if case == "on" else 0)
        caches[case] = [t.clone() for t in ks + vs]
    for case in ("refused", "off"):
        assert_same_bits(logits["on"], logits[case])
        for a, b in zip(caches["on"], caches[case], strict=True):
            assert_same_bits(a, b)
