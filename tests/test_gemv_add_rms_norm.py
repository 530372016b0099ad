"""toyllm::gemv_add_rms_norm(x, residual, norm_weight, eps, weight, warps=8) -> (sum, y), the
product after a residual add and an RMSNorm with the norm computed in its kernel, and
toyllm::gemv_add_rms_norm_silu_mul (the same for a SwiGLU gate/up product, with silu(gate) * up
in its epilogue, against add_rms_norm, gemv and silu_mul) (CUDA: csrc/gemv/gemv_add_rms_norm.cu
through csrc/gemv/cuda_gemv.cpp; CPU: csrc/gemv/cpu_gemv.cpp), against the two operators it
replaces, toyllm::add_rms_norm then toyllm::gemv: the same bits (compared as integers) for fp32,
fp16 and bf16.

CUDA (marked `cuda`): rows of 2048 (Llama-1B: 256 norm threads, 1 warp per row of W), 8192 and
4096 (4 and 2 warps), 4097, 33 and 1 (element accesses), 40,000 fp32 (the norm's 1024 threads
played by 512, each looping; shared memory past 48 KB) and 65,536 fp32 (past the device's limit:
two kernels); out 1, 3, 2048, 16384 (several rows per group of warps); 1 to 4 rows; misaligned x,
residual and weight; one kernel at one row; CUDA-graph replay; bad inputs; opcheck; blocks of 4
and 16 warps (the same bits as 8); the engine's logits with the fusions on and off
(Settings.fusion FULL against SILU_GEMV).

Everywhere: the CPU operator, its bad inputs, opcheck, and the engine's forward on the CPU (never
the operator). The fakes: tests/test_op_fakes.py.
"""

from __future__ import annotations

import re

import pytest
import torch
from engine_helpers import NoCache, engine_logits
from same_bits import assert_same_bits

import toyllm.engine.ops.gemv as gemv
import toyllm.engine.ops.gemv_norm as norm_gemv
from toyllm.engine.forward import EngineForward
from toyllm.engine.settings import Fusion, Settings
from toyllm.models.config import ModelConfig
from toyllm.models.llama import build_model

OPS = torch.ops.toyllm
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
IN_SIZES = [2048, 8192, 4096, 4097, 33, 1]
OUT_SIZES = [1, 3, 2048]
ROW_SHAPES = [(1,), (1, 1), (), (2,), (3,), (2, 2)]
EPS = 1e-5


def two_kernels(x, residual, norm_weight, w, eps=EPS):
    """What the fused operator stands for: toyllm::add_rms_norm, then toyllm::gemv (CUDA) or
    F.linear (CPU)."""
    s, n = OPS.add_rms_norm(x, residual, norm_weight, eps)
    if x.is_cuda:
        return s, OPS.gemv(n, w)
    return s, torch.nn.functional.linear(n, w)


def values(shape, dtype, seed: int, device: str = "cuda", scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(shape, generator=gen, device=device) * scale).to(dtype)


def inputs(rows, n_in, n_out, dtype, seed=0, device="cuda"):
    x = values((*rows, n_in), dtype, seed, device, scale=3.0)
    r = values((*rows, n_in), dtype, seed + 1, device)
    g = values((n_in,), dtype, seed + 2, device).abs() + 0.5
    w = values((n_out, n_in), dtype, seed + 3, device, scale=n_in**-0.5)
    return x, r, g, w


def check_case(rows, n_in, n_out, dtype, seed=0):
    x, r, g, w = inputs(rows, n_in, n_out, dtype, seed)
    s, y = OPS.gemv_add_rms_norm(x, r, g, EPS, w)
    s2, y2 = two_kernels(x, r, g, w)
    assert y2.abs().max().item() > 0  # not a vacuous comparison of zeros
    assert_same_bits(s, s2)
    assert_same_bits(y, y2)


# ---------------------------------------------------------------------------------------------
# CUDA: values


@pytest.mark.cuda
@pytest.mark.parametrize("n_out", OUT_SIZES)
@pytest.mark.parametrize("n_in", IN_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemv_add_rms_norm_cuda_has_the_bits_of_add_rms_norm_then_gemv(dtype, n_in, n_out):
    for k, rows in enumerate(ROW_SHAPES):
        check_case(rows, n_in, n_out, dtype, seed=10 * k)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemv_add_rms_norm_cuda_llama_1b_products(dtype):
    # q/k/v (3072 rows) and gate/up (16384 rows: ~8 rows per group of warps on an H100)
    for n_out in (3072, 16384):
        check_case((1, 1), 2048, n_out, dtype, seed=n_out)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,n_in", [
    (torch.float32, 40000),  # 10,000 packs: the norm's 1024 threads, played by 512, loop
    (torch.bfloat16, 24576),  # 48 KB of row: with the static memory, the kernel opts in
    (torch.float32, 65536),  # 256 KB: past the device's limit, add_rms_norm and gemv instead
], ids=str)
def test_gemv_add_rms_norm_cuda_long_rows(dtype, n_in):
    check_case((1,), n_in, 37, dtype, seed=5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemv_add_rms_norm_cuda_with_misaligned_pointers(dtype):
    n_in = 2048
    x, r, g, w = inputs((1,), n_in + 1, 64, dtype, seed=7)
    # views one element in: not 16-byte aligned (the norm, or the product, takes element
    # accesses); one row, so x[:, 1:] is still contiguous
    w_moved = w.flatten()[1 : 1 + 64 * n_in].view(64, n_in)
    for args in [
        (x[:, 1:], r[:, 1:], g[1:], w[:, 1:].contiguous()),  # the norm's inputs misaligned
        (x[:, :-1], r[:, :-1], g[:-1], w_moved),  # the weight misaligned
    ]:
        s, y = OPS.gemv_add_rms_norm(args[0], args[1], args[2], EPS, args[3])
        s2, y2 = two_kernels(*args)
        assert_same_bits(s, s2)
        assert_same_bits(y, y2)


@pytest.mark.cuda
def test_gemv_add_rms_norm_cuda_eps_and_zero_rows():
    x, r, g, w = inputs((1,), 256, 8, torch.float32, seed=9)
    for eps in (0.0, 1e-6, 1.0):
        s, y = OPS.gemv_add_rms_norm(x, r, g, eps, w)
        s2, y2 = two_kernels(x, r, g, w, eps)
        assert_same_bits(y, y2)
    zero = torch.zeros_like(x)
    s, y = OPS.gemv_add_rms_norm(zero, zero, g, 1e-6, w)  # a zero row: 0 * rsqrt(eps) = 0
    assert_same_bits(y, two_kernels(zero, zero, g, w, 1e-6)[1])
    # empty sizes: no rows, no output rows
    s, y = OPS.gemv_add_rms_norm(x[:0], r[:0], g, EPS, w)
    assert s.shape == (0, 256) and y.shape == (0, 8)
    s, y = OPS.gemv_add_rms_norm(x, r, g, EPS, w[:0])
    assert y.shape == (1, 0)
    assert_same_bits(s, x + r)


def _kernels_of(*args) -> list[str]:
    OPS.gemv_add_rms_norm(*args)  # warm-up (and the shared-memory opt-in)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        OPS.gemv_add_rms_norm(*args)
        torch.cuda.synchronize()
    return [e.name for e in prof.events()
            if e.device_type.name == "CUDA" and ("gemv" in e.name or "norm" in e.name)]


@pytest.mark.cuda
def test_gemv_add_rms_norm_cuda_profile_is_one_kernel_at_one_row_else_two():
    x, r, g, w = inputs((1, 1), 2048, 3072, torch.bfloat16, seed=11)
    names = _kernels_of(x, r, g, EPS, w)
    assert len(names) == 1 and "gemv_add_rms_norm_kernel<" in names[0], names
    x, r, g, w = inputs((2,), 2048, 64, torch.bfloat16, seed=12)
    names = _kernels_of(x, r, g, EPS, w)
    assert len(names) == 2, names
    assert any(re.search(r"\brms_norm_kernel<", n) for n in names), names
    assert any(re.search(r"\bgemv_kernel<", n) for n in names), names


@pytest.mark.cuda
def test_gemv_add_rms_norm_cuda_graph_replays_with_new_inputs():
    dtype = torch.bfloat16
    x, r, g, w = inputs((1,), 2048, 3072, dtype, seed=13)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        OPS.gemv_add_rms_norm(x, r, g, EPS, w)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        s, y = OPS.gemv_add_rms_norm(x, r, g, EPS, w)
    for seed in (14, 15):
        nx, nr, _, _ = inputs((1,), 2048, 3072, dtype, seed=seed)
        x.copy_(nx)
        r.copy_(nr)
        graph.replay()
        torch.cuda.synchronize()
        s2, y2 = two_kernels(nx, nr, g, w)
        assert_same_bits(s, s2)
        assert_same_bits(y, y2)


# ---------------------------------------------------------------------------------------------
# toyllm::gemv_add_rms_norm_silu_mul: the gate/up product with silu(gate) * up in its epilogue


def three_kernels(x, residual, norm_weight, w, eps=EPS):
    """What the silu operator stands for: add_rms_norm, then gemv (CUDA) or F.linear (CPU),
    then silu_mul."""
    s, y = two_kernels(x, residual, norm_weight, w, eps)
    return s, OPS.silu_mul(y)


def check_silu_case(rows, n_in, n_out, dtype, seed=0):
    x, r, g, w = inputs(rows, n_in, n_out, dtype, seed)
    s, h = OPS.gemv_add_rms_norm_silu_mul(x, r, g, EPS, w)
    s2, h2 = three_kernels(x, r, g, w)
    assert h2.abs().max().item() > 0
    assert h.shape == (*rows, n_out // 2)
    assert_same_bits(s, s2)
    assert_same_bits(h, h2)


@pytest.mark.cuda
@pytest.mark.parametrize("n_out", [2, 6, 4096])
@pytest.mark.parametrize("n_in", [2048, 8192, 4097, 33])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemv_add_rms_norm_silu_mul_cuda_has_the_bits_of_three_kernels(dtype, n_in, n_out):
    for k, rows in enumerate([(1,), (1, 1), (), (2,), (4,)]):
        check_silu_case(rows, n_in, n_out, dtype, seed=7 * k)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemv_add_rms_norm_silu_mul_cuda_llama_1b_gate_up(dtype):
    check_silu_case((1, 1), 2048, 16384, dtype, seed=16384)


@pytest.mark.cuda
def test_gemv_add_rms_norm_silu_mul_cuda_misaligned_and_long_rows():
    x, r, g, w = inputs((1,), 2049, 64, torch.bfloat16, seed=17)
    args = (x[:, 1:], r[:, 1:], g[1:], w.flatten()[1 : 1 + 64 * 2048].view(64, 2048))
    s, h = OPS.gemv_add_rms_norm_silu_mul(args[0], args[1], args[2], EPS, args[3])
    s2, h2 = three_kernels(*args)
    assert_same_bits(s, s2)
    assert_same_bits(h, h2)
    check_silu_case((1,), 40000, 10, torch.float32, seed=18)  # shared memory past 48 KB
    check_silu_case((1,), 65536, 10, torch.float32, seed=19)  # past the limit: three kernels


@pytest.mark.cuda
def test_gemv_add_rms_norm_silu_mul_cuda_profile_is_one_kernel_at_one_row():
    x, r, g, w = inputs((1, 1), 2048, 16384, torch.bfloat16, seed=20)
    OPS.gemv_add_rms_norm_silu_mul(x, r, g, EPS, w)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        OPS.gemv_add_rms_norm_silu_mul(x, r, g, EPS, w)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    assert len(names) == 1 and "gemv_add_rms_norm_silu_kernel<" in names[0], names


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemv_add_rms_norm_silu_mul_cpu_is_three_ops(dtype):
    x, r, g, w = inputs((2,), 48, 20, dtype, seed=21, device="cpu")
    s, h = OPS.gemv_add_rms_norm_silu_mul(x, r, g, EPS, w)
    s2, h2 = three_kernels(x, r, g, w)
    assert_same_bits(s, s2)
    assert_same_bits(h, h2)
    s, h = OPS.gemv_add_rms_norm_silu_mul(x, r, g, EPS, w[:0])
    assert h.shape == (2, 0)
    torch.library.opcheck(OPS.gemv_add_rms_norm_silu_mul.default, (x, r, g, EPS, w))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_gemv_add_rms_norm_silu_mul_rejects_an_odd_weight(device):
    x, r, g, w = inputs((1,), 16, 7, torch.float32, seed=22, device=device)
    with pytest.raises(ValueError, match="even number of rows"):
        OPS.gemv_add_rms_norm_silu_mul(x, r, g, EPS, w)
    with pytest.raises(ValueError, match="residual of x's shape"):
        OPS.gemv_add_rms_norm_silu_mul(x, r[:, :8], g, EPS, w[:6])


# ---------------------------------------------------------------------------------------------
# bad inputs: the operators' messages


def _bad_cases(device: str):
    x, r, g, w = inputs((1,), 16, 8, torch.float32, seed=20, device=device)
    yield "weight of 2 dims", (x, r, g, EPS, w[0])
    yield "x of at least 1 dim", (x[0, 0], r, g, EPS, w)
    yield r"expected x \[\.\.\., 16\]", (x[:, :8], r, g, EPS, w)
    yield "residual of x's shape", (x, r[:, :8].repeat(2, 1), g, EPS, w)
    yield r"norm_weight of shape \[16\]", (x, r, g[:8], EPS, w)
    yield "finite eps", (x, r, g, -1.0, w)
    yield "finite eps", (x, r, g, float("nan"), w)
    yield "in = x.size", (x[:, :0], r[:, :0], g[:0], EPS, w[:, :0])
    yield "residual of dtype", (x, r.double(), g, EPS, w)
    yield "norm_weight of dtype", (x, r, g.double(), EPS, w)
    if device == "cuda":
        yield "weight of dtype", (x, r, g, EPS, w.double())
        yield "torch.float32, torch.float16 or torch.bfloat16", (
            x.double(), r.double(), g.double(), EPS, w.double())
        yield "contiguous weight", (x, r, g, EPS, w.t().contiguous().t())
        yield "at most 4 rows", (x.repeat(5, 1), r.repeat(5, 1), g, EPS, w)
        yield "expected weight on cuda", (x, r, g, EPS, w.cpu())
        yield "expected residual on cuda", (x, r.cpu(), g, EPS, w)
        yield "contiguous norm_weight", (x, r, torch.stack((g, g), 1)[:, 0], EPS, w)
    else:
        yield "weight of dtype", (x, r, g, EPS, w.double())


@pytest.mark.parametrize("case", list(_bad_cases("cpu")), ids=lambda c: c[0])
def test_gemv_add_rms_norm_cpu_rejects_bad_inputs(case):
    message, args = case
    with pytest.raises(ValueError, match=message):
        OPS.gemv_add_rms_norm(*args)


@pytest.mark.cuda
@pytest.mark.parametrize("case", list(_bad_cases("cuda")) if torch.cuda.is_available() else [],
                         ids=lambda c: c[0])
def test_gemv_add_rms_norm_cuda_rejects_bad_inputs(case):
    message, args = case
    with pytest.raises(ValueError, match=message):
        OPS.gemv_add_rms_norm(*args)


# ---------------------------------------------------------------------------------------------
# warps: the block size of the one-row CUDA kernels, a launch choice that keeps the bits


@pytest.mark.cuda
@pytest.mark.parametrize("warps", [4, 16])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_block_size_has_the_bits_of_the_default(dtype, warps):
    # Llama-1B's hidden size and more rows than any grid takes at once (rows loop per group)
    x, r, g, w = inputs((1,), 2048, 16384, dtype, seed=40)
    for op in (OPS.gemv_add_rms_norm, OPS.gemv_add_rms_norm_silu_mul):
        s, y = op(x, r, g, EPS, w)
        s2, y2 = op(x, r, g, EPS, w, warps)
        assert_same_bits(s, s2)
        assert_same_bits(y, y2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("name", ["gemv_add_rms_norm", "gemv_add_rms_norm_silu_mul"])
@pytest.mark.parametrize("warps", [5, 0, 32])
def test_warps_other_than_4_8_or_16_is_a_value_error(device, name, warps):
    x, r, g, w = inputs((1,), 64, 8, torch.float32, seed=41, device=device)
    with pytest.raises(ValueError, match=rf"{name}: expected warps to be 4, 8 or 16, got {warps}"):
        getattr(OPS, name)(x, r, g, EPS, w, warps=warps)


# ---------------------------------------------------------------------------------------------
# CPU values and opcheck


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [(1,), (3,), (2, 2), ()])
def test_gemv_add_rms_norm_cpu_is_add_rms_norm_then_linear(dtype, rows):
    x, r, g, w = inputs(rows, 48, 20, dtype, seed=30, device="cpu")
    s, y = OPS.gemv_add_rms_norm(x, r, g, EPS, w)
    s2, y2 = two_kernels(x, r, g, w)
    assert_same_bits(s, s2)
    assert_same_bits(y, y2)


def test_gemv_add_rms_norm_cpu_opcheck():
    x, r, g, w = inputs((1,), 32, 8, torch.float32, seed=31, device="cpu")
    torch.library.opcheck(OPS.gemv_add_rms_norm.default, (x, r, g, EPS, w))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemv_add_rms_norm_cuda_opcheck(dtype):
    for rows in ((1,), (3,)):
        x, r, g, w = inputs(rows, 256, 40, dtype, seed=32)
        torch.library.opcheck(OPS.gemv_add_rms_norm.default, (x, r, g, EPS, w))


# ---------------------------------------------------------------------------------------------
# engine/ops/gemv_norm.py and the engine


@pytest.mark.cuda
def test_applies_where_the_one_row_cuda_gemv_does():
    g = gemv.Gemv(cuda=True)  # Settings.cuda_gemv, whatever the environment says
    x, r, nw, w = inputs((1, 1), 64, 16, torch.bfloat16, seed=40)
    assert norm_gemv.applies(x, r, nw, w, g)
    assert norm_gemv.applies(x.view(64), r.view(64), nw, w, g)
    assert not norm_gemv.applies(x.repeat(2, 1, 1), r.repeat(2, 1, 1), nw, w, g)  # two rows
    assert not norm_gemv.applies(x, r.view(1, 64), nw, w, g)  # shapes differ
    assert not norm_gemv.applies(x, r.float(), nw, w, g)
    assert not norm_gemv.applies(x, r, nw.float(), w, g)
    assert not norm_gemv.applies(x, r, nw, w.float(), g)
    assert not norm_gemv.applies(x, r, nw, values((64, 16), torch.bfloat16, 41).t(), g)
    assert not norm_gemv.applies(x, r, nw.cpu(), w, g)
    xs = values((1, 1, 128), torch.bfloat16, 42)[..., ::2]
    assert not norm_gemv.applies(xs, r, nw, w, g)  # strided x
    xg = x.float().requires_grad_()
    assert not norm_gemv.applies(xg, r.float(), nw.float(), w.float(), g)
    with torch.no_grad():
        assert norm_gemv.applies(xg, r.float(), nw.float(), w.float(), g)
    # a product the engine's GEMV would not give the CUDA kernel: Settings(cuda_gemv=False), or
    # a weight past cuda_gemv_max_mib
    assert not norm_gemv.applies(x, r, nw, w, gemv.Gemv(cuda=False))
    assert not norm_gemv.applies(x, r, nw, w, gemv.Gemv(cuda_max_bytes=w.numel() * 2 - 1))
    assert norm_gemv.silu_applies(x, r, nw, w, g)  # 16 rows: gate and up
    assert not norm_gemv.silu_applies(x, r, nw, w[:15], g)  # an odd number of rows


def test_applies_never_on_the_cpu():
    x, r, nw, w = inputs((1, 1), 32, 8, torch.float32, seed=43, device="cpu")
    with torch.no_grad():
        assert not norm_gemv.applies(x, r, nw, w, gemv.Gemv())
        assert not norm_gemv.silu_applies(x, r, nw, w, gemv.Gemv())


def test_add_rms_norm_linear_on_the_cpu_is_add_norm_then_linear(monkeypatch):
    """The engine's norm-then-product on the CPU: its add_rms_norm (the operator's loop at
    ELEMENTWISE and above), then its product; never the fused operator."""
    def refuse(*args):
        raise AssertionError("gemv_add_rms_norm called on the CPU")

    monkeypatch.setattr(norm_gemv, "_op", refuse)
    forward = EngineForward(_model(torch.float32, "cpu"), Settings(fusion=Fusion.FULL))
    x, r, nw, w = inputs((1, 1), 64, 8, torch.float32, seed=43, device="cpu")
    calls = []

    def add_norm(a, b, weight, eps):
        calls.append((a, b))
        return OPS.add_rms_norm(a, b, weight, eps)

    forward.add_rms_norm = add_norm
    with torch.no_grad():
        s, y = forward._add_norm_linear(x, r, nw, w)
    assert len(calls) == 1 and calls[0][0] is x and calls[0][1] is r
    s2, n = OPS.add_rms_norm(x, r, nw, forward.eps)
    assert_same_bits(s, s2)
    assert_same_bits(y, gemv.Gemv().linear(n, w))


def _model(dtype: torch.dtype, device: str):
    config = ModelConfig(vocab_size=300, hidden_size=64, num_layers=3, num_heads=4,
                         num_kv_heads=2, intermediate_size=200, max_seq_len=64,
                         tie_embeddings=True)
    return build_model(config, seed=3, device=device, dtype=dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logits_on_cuda_are_the_same_bits_with_the_fusions_on_and_off(dtype, monkeypatch):
    model = _model(dtype, "cuda")
    calls = {"norm": 0, "silu": 0, "down": 0}

    def counting(key, op):
        def call(*args):
            calls[key] += 1
            return op(*args)
        return call

    monkeypatch.setattr(norm_gemv, "_op", counting("norm", OPS.gemv_add_rms_norm))
    monkeypatch.setattr(norm_gemv, "_silu_op", counting("silu", OPS.gemv_add_rms_norm_silu_mul))
    monkeypatch.setattr(gemv, "_gemv_silu_mul", counting("down", OPS.gemv_silu_mul))
    real_silu_applies = norm_gemv.silu_applies
    gen = torch.Generator(device="cuda").manual_seed(44)
    tokens = torch.randint(0, 300, (1, 1), device="cuda", generator=gen)
    positions = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    logits = {}
    # (norm_on, silu_on): FULL; FULL with the gate/up product's silu epilogue refused;
    # SILU_GEMV (no norm fusion). A one-row forward without a cache: not a decode step, so the
    # q/k/v product is gemv_add_rms_norm's (its RoPE/KV epilogue: tests/test_gemv_norm_rope_kv.py)
    for norm_on, silu_on in ((True, True), (True, False), (False, False)):
        fusion = Fusion.FULL if norm_on else Fusion.SILU_GEMV
        forward = EngineForward(model, Settings(fusion=fusion, cuda_gemv=True))
        monkeypatch.setattr(norm_gemv, "silu_applies",
                            real_silu_applies if silu_on else lambda *args: False)
        before = dict(calls)
        with torch.inference_mode():
            logits[norm_on, silu_on] = forward(tokens, positions, NoCache())
        made = {k: calls[k] - before[k] for k in calls}
        # 3 layers: the input norms after the first layer's (2), the post-attention norms
        # (3) with or without the silu epilogue; the down product computes silu itself
        # where the gate/up product did not
        if norm_on and silu_on:
            assert made == {"norm": 2, "silu": 3, "down": 0}
        elif norm_on:
            assert made == {"norm": 2 + 3, "silu": 0, "down": 3}
        else:
            assert made == {"norm": 0, "silu": 0, "down": 3}
    monkeypatch.setattr(norm_gemv, "silu_applies", real_silu_applies)
    before = dict(calls)
    with torch.inference_mode():  # a batch: separate kernels
        engine_logits(model, tokens.repeat(2, 1), positions.repeat(2, 1),
                      Settings(fusion=Fusion.FULL))
    assert calls == before
    assert_same_bits(logits[True, True], logits[False, False])
    assert_same_bits(logits[True, False], logits[False, False])


def test_model_on_the_cpu_never_calls_the_operators(monkeypatch):
    from toyllm.engine.generate import Engine
    from toyllm.engine.sampling import SamplingParams

    def refuse(*args):
        raise AssertionError("gemv_add_rms_norm(_silu_mul, _rope_kv) called on the CPU")

    monkeypatch.setattr(norm_gemv, "_op", refuse)
    monkeypatch.setattr(norm_gemv, "_silu_op", refuse)
    monkeypatch.setattr(norm_gemv, "_rope_op", refuse)
    model = _model(torch.float32, "cpu")
    tokens = torch.randint(0, 300, (1, 1), generator=torch.Generator().manual_seed(45))
    with torch.inference_mode():
        engine_logits(model, tokens, torch.zeros(1, 1, dtype=torch.long),
                      Settings(fusion=Fusion.FULL))
    # and the decode steps of a generation (where the q/k/v product may take RoPE and the K/V
    # write on CUDA)
    done = Engine(model, settings=Settings(fusion=Fusion.FULL)).generate(
        [[1, 2, 3]], SamplingParams(max_new_tokens=3, stop_at_eos=False))
    assert len(done.completions[0].token_ids) == 3
