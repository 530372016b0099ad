"""toyllm::rms_norm, ::add_rms_norm, ::rope and ::silu_mul against the torch code they replace
(models/layer_math.py, models/rope.py): bit for bit on the CPU (but fp32 rms_norm, a C++
loop: within 4 ulps); on CUDA rope, silu_mul and add_rms_norm's sum bit for bit and rms_norm
(alone or add_rms_norm's) within an ulp; fp32/fp16/bf16, odd head dims and hidden sizes,
strided inputs; bad inputs; opcheck; CUDA-graph replay; the engine's forward (engine/forward.py)
with and without them (Settings.fusion ELEMENTWISE against NONE, and against the model's own
forward; fusing the residual adds changes no bit); models/ imports nothing of the engine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from engine_helpers import NoCache, engine_logits

import toyllm.engine.ops.elementwise as fused_ops
from toyllm.engine.forward import EngineForward
from toyllm.engine.settings import Fusion, Settings
from toyllm.models import layer_math
from toyllm.models.config import ModelConfig
from toyllm.models.llama import build_model
from toyllm.models.rope import apply_rope, rope_cos_sin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OPS = torch.ops.toyllm
# [..., hidden]: hidden sizes that are and are not multiples of 8 (the 16-byte loads' width).
NORM_SHAPES = [(1, 1, 64), (2, 3, 128), (4, 36), (5, 34), (3, 7), (2, 1, 4096), (1, 100)]
# (batch, tokens, heads, head_dim): model-like, odd head dims (34, 36), a one-pair head.
ROPE_SHAPES = [(1, 1, 6, 64), (2, 5, 4, 128), (2, 3, 3, 34), (1, 4, 2, 36), (3, 2, 1, 2)]
# [..., 2 * intermediate]
SILU_SHAPES = [(1, 1, 2 * 64), (2, 3, 2 * 36), (4, 2 * 7), (2, 2 * 1), (3, 2 * 1376)]


def randn(shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int = 0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(device)


def rms_norm_inputs(shape, dtype, device, seed=0):
    x = randn(shape, dtype, device, seed, scale=3.0)
    weight = (1.0 + 0.5 * randn((shape[-1],), torch.float32, "cpu", seed + 1)).to(dtype)
    return x, weight.to(device), 1e-5


def add_rms_norm_inputs(shape, dtype, device, seed=0):
    """x, residual (x + residual rounds in fp16/bf16, and in fp32 most of the time), weight,
    eps."""
    x, weight, eps = rms_norm_inputs(shape, dtype, device, seed)
    residual = randn(shape, dtype, device, seed + 2, scale=0.7)
    return x, residual, weight, eps


def rope_inputs(shape, dtype, device, seed=0, strided=False):
    """x [B, T, H, D]; strided=True slices it out of a wider [B, T, H + 3, D] tensor (as the
    model slices q and k heads out of its fused qkv product)."""
    b, t, h, d = shape
    if strided:
        x = randn((b, t, h + 3, d), dtype, device, seed, scale=2.0)[:, :, :h]
        assert x.stride(1) == (h + 3) * d  # (contiguous anyway when b = t = 1)
    else:
        x = randn(shape, dtype, device, seed, scale=2.0)
    g = torch.Generator().manual_seed(seed + 1)
    positions = torch.randint(0, 4096, (b, t), generator=g)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    cos, sin = rope_cos_sin(inv_freq, positions, dtype)
    return x, cos.to(device), sin.to(device)


def ulps(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|out - ref| in units of the last place of ref's dtype at ref's magnitude."""
    eps = torch.finfo(ref.dtype).eps  # the ulp of 1.0
    ref64, out64 = ref.double(), out.double()
    _, exponent = torch.frexp(ref64.abs().clamp_min(torch.finfo(ref.dtype).tiny))
    ulp = eps * torch.pow(2.0, (exponent - 1).double())
    return (out64 - ref64).abs() / ulp


# ---------------------------------------------------------------------------------------------
# The CPU implementation is the torch code


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_rms_norm_cpu_equals_the_torch_code(shape, dtype) -> None:
    x, weight, eps = rms_norm_inputs(shape, dtype, "cpu")
    out = OPS.rms_norm(x, weight, eps)
    ref = layer_math.rms_norm(x, weight, eps)
    assert out.dtype == dtype and out.shape == x.shape
    if dtype == torch.float32:  # a C++ loop: the sum of squares in another order
        torch.testing.assert_close(out, ref, atol=0.0, rtol=1e-6)
        assert float(ulps(out, ref).max()) <= 4.0  # seen: 3 (hidden 64)
    else:
        assert torch.equal(out, ref)  # the same ATen ops, so the same bits


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_add_rms_norm_cpu_equals_the_torch_code(shape, dtype) -> None:
    x, residual, weight, eps = add_rms_norm_inputs(shape, dtype, "cpu")
    total, normed = OPS.add_rms_norm(x, residual, weight, eps)
    ref_total, ref_normed = layer_math.add_rms_norm(x, residual, weight, eps)
    for out in (total, normed):
        assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    assert torch.equal(total, x + residual)  # torch's own add
    if dtype == torch.float32:  # rms_norm's C++ loop on the sum: its bits, within 4 ulps
        assert torch.equal(normed, OPS.rms_norm(total, weight, eps))
        assert float(ulps(normed, ref_normed).max()) <= 4.0
    else:
        assert torch.equal(normed, ref_normed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_cpu_of_strided_views_equals_the_contiguous_copies(dtype) -> None:
    x, _, weight, eps = add_rms_norm_inputs((3, 5, 64), dtype, "cpu")
    wide = randn((3, 1, 128), dtype, "cpu", seed=4)
    views = (x[:, -1:], wide[..., 64:])  # rows at a pitch of 320 and of 128 elements
    got = OPS.add_rms_norm(*views, weight, eps)
    want = OPS.add_rms_norm(*(v.contiguous() for v in views), weight, eps)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def _torch_code_refused(*args):
    raise AssertionError("the wrapper fell back to models.layer_math.add_rms_norm")


def test_add_rms_norm_wrapper_takes_the_op_or_the_torch_code_on_the_cpu(monkeypatch) -> None:
    x, residual, weight, eps = add_rms_norm_inputs((2, 3, 64), torch.float32, "cpu")
    with monkeypatch.context() as patch:  # fp32: the operator (its loop), not the torch code
        patch.setattr(layer_math, "add_rms_norm", _torch_code_refused)
        fused = fused_ops.add_rms_norm(x, residual, weight, eps)
    assert all(torch.equal(f, o) for f, o in
               zip(fused, OPS.add_rms_norm(x, residual, weight, eps), strict=True))
    # bf16, a residual broadcast over the batch, autograd: the torch code, bit for bit
    cases = [(x.bfloat16(), residual.bfloat16(), weight.bfloat16()), (x, residual[:1], weight)]
    for args in cases:
        got = fused_ops.add_rms_norm(*args, eps)
        want = layer_math.add_rms_norm(*args, eps)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    weight = weight.clone().requires_grad_(True)
    fused_ops.add_rms_norm(x, residual, weight, eps)[1].sum().backward()
    assert weight.grad is not None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("shape", ROPE_SHAPES)
def test_rope_cpu_equals_the_torch_code(shape, strided, dtype) -> None:
    x, cos, sin = rope_inputs(shape, dtype, "cpu", strided=strided)
    out = OPS.rope(x, cos, sin)
    assert out.is_contiguous() and out.shape == x.shape and out.dtype == dtype
    assert torch.equal(out, apply_rope(x, cos, sin))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SILU_SHAPES)
def test_silu_mul_cpu_equals_the_torch_code(shape, dtype) -> None:
    gate_up = randn(shape, dtype, "cpu", scale=4.0)
    out = OPS.silu_mul(gate_up)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    assert torch.equal(out, layer_math.silu_mul(gate_up))


# fp32 silu_mul is one loop repeating ATen's silu (csrc/elementwise/cpu_silu_fp32.h: which
# elements its vector exp computes and which std::exp, ~4% of results differ between the two):
# widths around its vector runs, rows, the split of a silu above ATen's grain (32,768 elements)
# over the threads (mid-row at 3 x 10,923), 1 and 2 threads, and values where exp under- or
# overflows, subnormals and signed zeros.
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(1, 2 * 31), (1, 2 * 32), (1, 2 * 33), (3, 2 * 50),
                                   (2, 5, 2 * 97), (1, 2 * 40001), (3, 2 * 10923),
                                   (4, 2 * 8200), (2, 2 * 20011)])
def test_silu_mul_fp32_loop_gives_the_bits_of_the_torch_code(shape, threads) -> None:
    gate_up = randn(shape, torch.float32, "cpu", scale=8.0)
    special = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 87.0, 88.8, -87.4, -88.8, -104.0, 104.0,
                            -1e30, 1e30, 3e38, -3e38, 0.5, -0.5])
    spots = gate_up.view(-1)[:: max(1, gate_up.numel() // special.numel())]  # a view
    spots[: special.numel()] = special[: spots.numel()]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got, want = OPS.silu_mul(gate_up), layer_math.silu_mul(gate_up)
    finally:
        torch.set_num_threads(before)
    assert got.shape == want.shape
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_wrappers_on_the_cpu_run_the_torch_code() -> None:
    x, weight, eps = rms_norm_inputs((2, 3, 64), torch.bfloat16, "cpu")
    assert torch.equal(fused_ops.rms_norm(x, weight, eps), layer_math.rms_norm(x, weight, eps))
    q, cos, sin = rope_inputs((2, 3, 4, 64), torch.bfloat16, "cpu", strided=True)
    assert torch.equal(fused_ops.rope(q, cos, sin), apply_rope(q, cos, sin))
    gate_up = randn((2, 3, 128), torch.bfloat16, "cpu")
    assert torch.equal(fused_ops.silu_mul(gate_up), layer_math.silu_mul(gate_up))


def test_silu_mul_doubles_as_swiglu_of_the_unfused_model() -> None:
    """The fused-weights MLP (silu_mul of one product) equals the unfused one on the CPU: the
    engine's forward against the model's own (separate gate and up products)."""
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_layers=1,
                         num_heads=4, num_kv_heads=2, max_seq_len=16)
    model = build_model(config)
    tokens = torch.randint(0, 64, (2, 5))
    positions = torch.arange(5).expand(2, 5)
    with torch.no_grad():
        unfused = model(tokens, positions)
        for fusion in (Fusion.NONE, Fusion.FULL):
            fused = engine_logits(model, tokens, positions, Settings(fusion=fusion))
            torch.testing.assert_close(fused, unfused, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad inputs: every message names what was expected and what was given


def _bad_inputs() -> list:
    f32, f16 = torch.float32, torch.float16
    x = torch.randn(2, 3, 64)
    w = torch.ones(64)
    q = torch.randn(2, 3, 4, 8)
    c = torch.randn(2, 3, 1, 8)
    return [
        ("rms_norm int x", lambda: OPS.rms_norm(x.long(), w.long(), 1e-5),
         r"expected x of dtype torch.float32, torch.float16 or torch.bfloat16, got torch.int64"),
        ("rms_norm dtype mix", lambda: OPS.rms_norm(x, w.to(f16), 1e-5),
         r"expected weight of dtype torch.float32 \(x's\), got torch.float16"),
        ("rms_norm weight shape", lambda: OPS.rms_norm(x, torch.ones(63), 1e-5),
         r"expected weight of shape \[64\] \(x's last dim\), got \[63\]"),
        ("rms_norm strided last dim", lambda: OPS.rms_norm(x[..., ::2], w[:32], 1e-5),
         r"expected x with a contiguous last dim \(stride 1\), got strides \[192, 64, 2\]"),
        ("rms_norm bad eps", lambda: OPS.rms_norm(x, w, float("nan")),
         r"expected a finite eps >= 0, got nan"),
        ("add_rms_norm residual shape", lambda: OPS.add_rms_norm(x, x[:1], w, 1e-5),
         r"add_rms_norm: expected residual of x's shape \[2, 3, 64\], got \[1, 3, 64\]"),
        ("add_rms_norm residual dtype", lambda: OPS.add_rms_norm(x, x.to(f16), w, 1e-5),
         r"add_rms_norm: expected residual of dtype torch.float32 \(x's\), got torch.float16"),
        ("add_rms_norm residual strided last dim",
         lambda: OPS.add_rms_norm(x[..., :32], x[..., ::2], w[:32], 1e-5),
         r"add_rms_norm: expected residual with a contiguous last dim \(stride 1\), got strides "
         r"\[192, 64, 2\]"),
        ("add_rms_norm weight shape", lambda: OPS.add_rms_norm(x, x, torch.ones(63), 1e-5),
         r"add_rms_norm: expected weight of shape \[64\] \(x's last dim\), got \[63\]"),
        ("add_rms_norm weight dtype", lambda: OPS.add_rms_norm(x, x, w.to(f16), 1e-5),
         r"add_rms_norm: expected weight of dtype torch.float32 \(x's\), got torch.float16"),
        ("add_rms_norm int x", lambda: OPS.add_rms_norm(x.long(), x.long(), w.long(), 1e-5),
         r"add_rms_norm: expected x of dtype torch.float32, torch.float16 or torch.bfloat16, "
         r"got torch.int64"),
        ("add_rms_norm 0-dim x", lambda: OPS.add_rms_norm(x[0, 0, 0], x[0, 0, 0], w, 1e-5),
         r"add_rms_norm: expected x of at least 1 dim \[\.\.\., hidden\], got shape \[\]"),
        ("add_rms_norm bad eps", lambda: OPS.add_rms_norm(x, x, w, -1.0),
         r"add_rms_norm: expected a finite eps >= 0, got -1"),
        ("rope 3-dim x", lambda: OPS.rope(x, c, c),
         r"expected x of 4 dims \[batch, tokens, heads, head_dim\], got shape \[2, 3, 64\]"),
        ("rope odd head_dim", lambda: OPS.rope(q[..., :7], c[..., :7], c[..., :7]),
         r"expected an even head_dim \(x.size\(3\)\), got 7"),
        ("rope cos shape", lambda: OPS.rope(q, c[:1], c[:1]),
         r"expected cos of shape \[2, 3, 1, 8\] \(x's batch, tokens and head_dim\), got "
         r"\[1, 3, 1, 8\]"),
        ("rope sin shape", lambda: OPS.rope(q, c, c[:, :2]),
         r"expected sin of cos's shape \[2, 3, 1, 8\], got \[2, 2, 1, 8\]"),
        ("rope dtype mix", lambda: OPS.rope(q, c, c.to(f16)),
         r"expected sin of dtype torch.float32 \(x's\), got torch.float16"),
        ("rope int x", lambda: OPS.rope(q.int(), c.int(), c.int()),
         r"expected x of dtype torch.float32, torch.float16 or torch.bfloat16, got torch.int32"),
        ("rope strided last dim", lambda: OPS.rope(q[..., ::2], c[..., :4], c[..., :4]),
         r"expected x with a contiguous last dim \(stride 1\), got strides \[96, 32, 8, 2\]"),
        ("silu_mul odd last dim", lambda: OPS.silu_mul(torch.randn(2, 7)),
         r"expected an even last dim >= 2 \(gate and up side by side\), got 7"),
        ("silu_mul int", lambda: OPS.silu_mul(torch.ones(2, 8, dtype=torch.int64)),
         r"expected gate_up of dtype torch.float32, torch.float16 or torch.bfloat16, got "
         r"torch.int64"),
        ("silu_mul strided last dim", lambda: OPS.silu_mul(torch.randn(8, 4).t()),
         r"expected gate_up with a contiguous last dim \(stride 1\), got strides \[1, 4\]"),
        ("silu_mul 0-dim", lambda: OPS.silu_mul(torch.tensor(1.0, dtype=f32)),
         r"expected gate_up of at least 1 dim"),
    ]


BAD_INPUTS = _bad_inputs()


@pytest.mark.parametrize("call,message", [b[1:] for b in BAD_INPUTS],
                         ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_naming_expected_and_given(call, message) -> None:
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.cuda
def test_cuda_inputs_mixed_with_cpu_tensors_raise() -> None:
    # (the dispatcher hands a call with any CUDA tensor to the CUDA operator, which checks)
    x, weight, eps = rms_norm_inputs((2, 64), torch.float32, "cuda")
    with pytest.raises(ValueError, match=r"expected weight on cuda:0 \(x's device\), got cpu"):
        OPS.rms_norm(x, weight.cpu(), eps)
    with pytest.raises(ValueError, match=r"expected residual on cuda:0 \(x's device\), got cpu"):
        OPS.add_rms_norm(x, x.cpu(), weight, eps)
    with pytest.raises(ValueError, match=r"add_rms_norm: expected weight on cuda:0 \(x's "
                                         r"device\), got cpu"):
        OPS.add_rms_norm(x, x, weight.cpu(), eps)
    q, cos, sin = rope_inputs((1, 2, 3, 8), torch.float32, "cuda")
    with pytest.raises(ValueError, match=r"expected cos on cuda:0 \(x's device\), got cpu"):
        OPS.rope(q, cos.cpu(), sin)
    with pytest.raises(ValueError, match=r"expected sin on cuda:0 \(x's device\), got cpu"):
        OPS.rope(q, cos, sin.cpu())


# ---------------------------------------------------------------------------------------------
# opcheck (schema, fake implementation, dispatch) on each op


def _opcheck_cases(device: str) -> list:
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        cases.append((OPS.rms_norm.default, rms_norm_inputs((2, 3, 36), dtype, device)))
        cases.append((OPS.add_rms_norm.default, add_rms_norm_inputs((2, 3, 36), dtype, device)))
        cases.append((OPS.rope.default, rope_inputs((2, 3, 4, 34), dtype, device, strided=True)))
        cases.append((OPS.silu_mul.default, (randn((2, 3, 72), dtype, device),)))
    return cases


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_accepts_the_fused_operators(device: str) -> None:
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, tuple(args))


# ---------------------------------------------------------------------------------------------
# CUDA kernels against the torch code on CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_rms_norm_cuda_is_within_an_ulp_of_the_torch_code(shape, dtype) -> None:
    x, weight, eps = rms_norm_inputs(shape, dtype, "cuda")
    out = OPS.rms_norm(x, weight, eps)
    ref = layer_math.rms_norm(x, weight, eps)
    assert out.dtype == dtype and out.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=0.0, rtol=2e-6)
    else:
        # Only the fp32 sum's order differs, moving the fp32 factor by an ulp or so. That flips
        # the rounding of the normalised value n now and then (1 ulp of n), and the product
        # weight * n, rounded again, can then land 2 ulps away (an emulation on the CPU with
        # the factor moved by one ulp on every row: 1-2e-5 of the elements differ, by 2 ulps
        # at most). More would be a bug.
        assert float(ulps(out, ref).max()) <= 2.0
        # (in fp32 a moved factor moves most of its row by an ulp, so no such count there)
        same = (out == ref).double().mean().item()
        assert same >= 0.99, f"only {same:.4f} of the elements are bit-equal"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_cuda_of_a_strided_view_equals_the_contiguous_copy(dtype) -> None:
    x, weight, eps = rms_norm_inputs((3, 5, 64), dtype, "cuda")
    last = x[:, -1:]  # the model's last_only view: rows at a pitch of 5 rows
    packed = last.contiguous()
    assert torch.equal(OPS.rms_norm(last, weight, eps), OPS.rms_norm(packed, weight, eps))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_add_rms_norm_cuda_sum_is_torchs_and_norm_is_rms_norms(shape, dtype) -> None:
    x, residual, weight, eps = add_rms_norm_inputs(shape, dtype, "cuda")
    total, normed = OPS.add_rms_norm(x, residual, weight, eps)
    for out in (total, normed):
        assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    assert torch.equal(total, x + residual)  # the sum: torch's CUDA add, bit for bit
    # The norm: toyllm::rms_norm's kernel code on the rounded sum, with the same launch (all
    # pointers are fresh, 16-byte aligned allocations), so the same bits; and hence within
    # test_rms_norm_cuda_is_within_an_ulp_of_the_torch_code's bounds of the torch code.
    assert torch.equal(normed, OPS.rms_norm(total, weight, eps))
    ref = layer_math.rms_norm(x + residual, weight, eps)
    if dtype == torch.float32:
        torch.testing.assert_close(normed, ref, atol=0.0, rtol=2e-6)
    else:
        assert float(ulps(normed, ref).max()) <= 2.0
        same = (normed == ref).double().mean().item()
        assert same >= 0.99, f"only {same:.4f} of the elements are bit-equal"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_cuda_of_strided_views_equals_the_contiguous_copies(dtype) -> None:
    x, residual, weight, eps = add_rms_norm_inputs((3, 5, 64), dtype, "cuda")
    views = (x[:, -1:], residual[:, -1:])  # the model's last_only views: rows at a pitch of 5
    got = OPS.add_rms_norm(*views, weight, eps)
    want = OPS.add_rms_norm(*(v.contiguous() for v in views), weight, eps)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_add_rms_norm_cuda_misaligned_inputs_take_the_narrow_path_and_agree(dtype) -> None:
    """A residual starting one element into its storage forbids 16-byte loads: the sum is
    still torch's; the norm may sum its squares in another order than rms_norm's vector path."""
    x, _, weight, eps = add_rms_norm_inputs((3, 64), dtype, "cuda")
    residual = randn((3 * 64 + 1,), dtype, "cuda", seed=7)[1:].view(3, 64)
    total, normed = OPS.add_rms_norm(x, residual, weight, eps)
    assert torch.equal(total, x + residual)
    ref = layer_math.rms_norm(x + residual, weight, eps)
    if dtype == torch.float32:  # the bounds of test_rms_norm_cuda_is_within_an_ulp_of_...
        torch.testing.assert_close(normed, ref, atol=0.0, rtol=2e-6)
    else:
        assert float(ulps(normed, ref).max()) <= 2.0


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("shape", ROPE_SHAPES)
def test_rope_cuda_equals_the_torch_code(shape, strided, dtype) -> None:
    x, cos, sin = rope_inputs(shape, dtype, "cuda", strided=strided)
    out = OPS.rope(x, cos, sin)
    assert out.is_contiguous() and out.shape == x.shape
    assert torch.equal(out, apply_rope(x, cos, sin))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SILU_SHAPES)
def test_silu_mul_cuda_equals_the_torch_code(shape, dtype) -> None:
    gate_up = randn(shape, dtype, "cuda", scale=4.0)
    assert torch.equal(OPS.silu_mul(gate_up), layer_math.silu_mul(gate_up))


@pytest.mark.cuda
def test_misaligned_inputs_take_the_narrow_path_and_agree() -> None:
    """Views starting 2 bytes into their storage cannot use 16-byte loads; same results (for
    rms_norm up to its sum order, which differs between the two paths)."""
    base = randn((2 * 64 + 1,), torch.float16, "cuda", scale=3.0)
    x, weight = base[1:65].view(1, 64), base[65:129]
    out = OPS.rms_norm(x, weight, 1e-5)
    assert float(ulps(out, layer_math.rms_norm(x, weight, 1e-5)).max()) <= 2.0
    assert float(ulps(out, OPS.rms_norm(x.clone(), weight.clone(), 1e-5)).max()) <= 2.0
    gate_up = randn((3 * 128 + 1,), torch.bfloat16, "cuda")[1:].view(3, 128)
    assert torch.equal(OPS.silu_mul(gate_up), layer_math.silu_mul(gate_up))


@pytest.mark.cuda
def test_wrappers_keep_the_torch_code_when_autograd_records() -> None:
    x, weight, eps = rms_norm_inputs((2, 64), torch.float32, "cuda")
    weight.requires_grad_(True)
    fused_ops.rms_norm(x, weight, eps).sum().backward()
    assert weight.grad is not None
    residual = randn((2, 64), torch.float32, "cuda", seed=3).requires_grad_(True)
    total, normed = fused_ops.add_rms_norm(x, residual, weight, eps)
    (total.sum() + normed.sum()).backward()
    assert residual.grad is not None


@pytest.mark.cuda
def test_add_rms_norm_wrapper_takes_the_op_on_cuda(monkeypatch) -> None:
    x, residual, weight, eps = add_rms_norm_inputs((2, 3, 64), torch.bfloat16, "cuda")
    monkeypatch.setattr(layer_math, "add_rms_norm", _torch_code_refused)
    got = fused_ops.add_rms_norm(x, residual, weight, eps)
    want = OPS.add_rms_norm(x, residual, weight, eps)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


# ---------------------------------------------------------------------------------------------
# CUDA graphs


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_reads_the_new_inputs(dtype) -> None:
    x, weight, eps = rms_norm_inputs((2, 3, 128), dtype, "cuda", seed=0)
    q, cos, sin = rope_inputs((2, 3, 4, 64), dtype, "cuda", seed=0, strided=True)
    gate_up = randn((2, 3, 256), dtype, "cuda", seed=0)

    def step():
        return OPS.rms_norm(x, weight, eps), OPS.rope(q, cos, sin), OPS.silu_mul(gate_up)

    stream = torch.cuda.Stream()  # warm up off the default stream, as capture requires
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()

    x2, _, _ = rms_norm_inputs((2, 3, 128), dtype, "cuda", seed=5)
    q2, cos2, sin2 = rope_inputs((2, 3, 4, 64), dtype, "cuda", seed=5, strided=True)
    for static, new in ((x, x2), (q, q2), (cos, cos2), (sin, sin2)):
        static.copy_(new)
    gate_up.copy_(randn((2, 3, 256), dtype, "cuda", seed=5))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(outs, step(), strict=True):
        assert torch.equal(got, want)
    assert not torch.equal(outs[0], OPS.rms_norm(*rms_norm_inputs((2, 3, 128), dtype, "cuda")))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_cuda_graph_replay_reads_the_new_inputs(dtype) -> None:
    x, residual, weight, eps = add_rms_norm_inputs((2, 3, 128), dtype, "cuda", seed=0)
    stream = torch.cuda.Stream()  # warm up off the default stream, as capture requires
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        OPS.add_rms_norm(x, residual, weight, eps)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = OPS.add_rms_norm(x, residual, weight, eps)

    first = [o.clone() for o in outs]
    x2, residual2, _, _ = add_rms_norm_inputs((2, 3, 128), dtype, "cuda", seed=5)
    x.copy_(x2)
    residual.copy_(residual2)
    graph.replay()
    torch.cuda.synchronize()
    for got, want, old in zip(outs, OPS.add_rms_norm(x2, residual2, weight, eps), first,
                              strict=True):
        assert torch.equal(got, want) and not torch.equal(got, old)


# ---------------------------------------------------------------------------------------------
# The model with and without the fused ops


class AddThenNorm(EngineForward):
    """The engine's forward as it was before add_rms_norm: every residual add its own torch op,
    then the norm alone (the fused rms_norm where the settings take it)."""

    def _add_norm(self, x, residual, norm_weight):
        if residual is not None:
            x = x + residual
        return x, self.rms_norm(x, norm_weight, self.eps)


def unfused_forward(model, tokens, positions, settings, last_only=False):
    """AddThenNorm's logits without a cache."""
    return AddThenNorm(model, settings)(tokens, positions, NoCache(), last_only=last_only)


def torch_forward(model, tokens, positions, last_only=False):
    """The add-then-norm forward in the model's own modules (plain torch), written out."""
    x = model.embed_tokens(tokens)
    cos, sin = rope_cos_sin(model.inv_freq, positions, x.dtype)
    for layer in model.layers:
        x = x + layer.self_attn(layer.input_layernorm(x), cos, sin, None)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    if last_only:
        x = x[:, -1:]
    return model.lm_head(model.norm(x))


def _model_inputs(config: ModelConfig, batch: int, tokens: int, device: str):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, tokens), generator=g).to(device)
    return ids, torch.arange(tokens, device=device).expand(batch, tokens)


SMALL = ModelConfig(vocab_size=256, hidden_size=36, intermediate_size=52, num_layers=3,
                    num_heads=3, num_kv_heads=1, max_seq_len=64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fusion", [Fusion.FULL, Fusion.ELEMENTWISE, Fusion.NONE],
                         ids=["full", "fp32_loops", "torch_code"])
def test_llama_cpu_forward_fusing_the_residual_adds_changes_no_bit(dtype, fusion) -> None:
    """The engine's add_rms_norm path against the add-then-norm forward it replaced: equal bits
    on the CPU, with the fp32 loops (fp32: add_rms_norm's loop is rms_norm's) or without."""
    model = build_model(SMALL, dtype=dtype)
    settings = Settings(fusion=fusion)
    tokens, positions = _model_inputs(SMALL, 2, 9, "cpu")
    with torch.no_grad():
        for last_only in (False, True):
            got = engine_logits(model, tokens, positions, settings, last_only=last_only)
            want = unfused_forward(model, tokens, positions, settings, last_only)
            assert torch.equal(got, want)
            # ... and both within the fp32 loops' ulps of the model's own forward
            ref = model(tokens, positions, last_only=last_only)
            tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
            assert float((got.float() - ref.float()).norm() / ref.float().norm()) <= tol


def test_llama_training_forward_and_gradients_are_todays_torch_code() -> None:
    """The model trains on the torch code alone (models/ calls no operator): the loss and every
    gradient are those of the add-then-norm forward written out in torch."""
    model = build_model(SMALL)
    tokens, positions = _model_inputs(SMALL, 2, 9, "cpu")
    grads = []
    for forward in (model, lambda t, p: torch_forward(model, t, p)):
        model.zero_grad()
        loss = forward(tokens, positions).float().logsumexp(-1).mean()
        loss.backward()
        grads.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


@pytest.mark.parametrize("fusion", list(Fusion), ids=lambda f: f.name.lower())
def test_llama_fuses_every_residual_add_into_a_norm(fusion, monkeypatch) -> None:
    """L layers: 2L residual adds, 2L + 1 norms. Layer 0's input norm has nothing to add; every
    other norm runs add_rms_norm (CPU fp32: the operator), and no norm runs alone twice. From
    Fusion.ELEMENTWISE on the engine takes engine/ops/elementwise.py's wrappers (on the CPU:
    the operators' fp32 loops); at NONE the torch code of models/layer_math.py."""
    calls = {}
    for module in (fused_ops, layer_math):
        for name in ("rms_norm", "add_rms_norm"):
            real = getattr(module, name)
            key = f"{module.__name__.rsplit('.', 1)[1]}.{name}"
            calls[key] = 0

            def counted(*args, _real=real, _key=key):
                calls[_key] += 1
                return _real(*args)

            monkeypatch.setattr(module, name, counted)
    model = build_model(SMALL)
    tokens, positions = _model_inputs(SMALL, 1, 4, "cpu")
    forward = EngineForward(model, Settings(fusion=fusion))  # binds the functions it will call
    with torch.no_grad():
        forward(tokens, positions, NoCache())
    adds = 2 * SMALL.num_layers
    if fusion >= Fusion.ELEMENTWISE:
        # (the wrappers' own fallback to layer_math would count there too: it must not happen)
        assert calls == {"elementwise.rms_norm": 1, "elementwise.add_rms_norm": adds,
                         "layer_math.rms_norm": 0, "layer_math.add_rms_norm": 0}
    else:  # (layer_math.add_rms_norm is the add, then layer_math.rms_norm)
        assert calls == {"elementwise.rms_norm": 0, "elementwise.add_rms_norm": 0,
                         "layer_math.rms_norm": 1 + adds, "layer_math.add_rms_norm": adds}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2),
                                       (torch.float16, 2e-3)])
def test_llama_forward_with_fused_ops_matches_the_torch_code(dtype, tol) -> None:
    """The engine's forward with every fusion against the model's own forward (plain torch)."""
    config = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_layers=2,
                         num_heads=4, num_kv_heads=2, max_seq_len=64)
    model = build_model(config, device="cuda", dtype=dtype)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, 9), generator=g).cuda()
    positions = torch.arange(9, device="cuda").expand(2, 9)
    with torch.no_grad():
        fused = engine_logits(model, tokens, positions, Settings(fusion=Fusion.FULL)).float()
        plain = model(tokens, positions).float()
    if dtype == torch.float32:
        assert float((fused - plain).abs().max()) <= tol
    else:  # the tolerances of engine/check/tolerances.py: relative norm of the difference
        assert float((fused - plain).norm() / plain.norm()) <= tol


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_llama_cuda_forward_fusing_the_residual_adds_changes_no_bit(dtype) -> None:
    """add_rms_norm against the old forward's torch add + toyllm::rms_norm: the same sum, and
    the same norm kernel code with the same launch (fresh, aligned tensors), so equal logits
    (cuBLAS and SDPA see equal inputs in both)."""
    config = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_layers=2,
                         num_heads=4, num_kv_heads=2, max_seq_len=64)
    model = build_model(config, device="cuda", dtype=dtype)
    settings = Settings(fusion=Fusion.FULL)
    tokens, positions = _model_inputs(config, 2, 9, "cuda")
    with torch.no_grad():
        for last_only in (False, True):
            got = engine_logits(model, tokens, positions, settings, last_only=last_only)
            want = unfused_forward(model, tokens, positions, settings, last_only)
            assert torch.equal(got, want)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 1e-2),
                                       ("float16", 2e-3)])
def test_llama_cuda_forward_with_and_without_toyllm_fused_ops(dtype, tol, monkeypatch) -> None:
    """The setting itself, through an Engine that reads it from the environment:
    TOYLLM_FUSION=full runs the fused kernels (add_rms_norm included), =none the torch code;
    the logits agree to the tolerances above."""
    from toyllm.engine.generate import Engine

    config = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_layers=2,
                         num_heads=4, num_kv_heads=2, max_seq_len=64)
    model = build_model(config, device="cuda", dtype=getattr(torch, dtype))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, 9), generator=g).cuda()
    positions = torch.arange(9, device="cuda").expand(2, 9)
    logits = {}
    for switch, fusion in (("full", Fusion.FULL), ("none", Fusion.NONE)):
        monkeypatch.setenv("TOYLLM_FUSION", switch)
        engine = Engine(model, cuda_graph=False)
        assert engine.settings.fusion == fusion
        fused_ops_bound = engine.forward.rms_norm is fused_ops.rms_norm
        assert fused_ops_bound == (fusion >= Fusion.ELEMENTWISE)
        with torch.no_grad():
            logits[switch] = engine.forward(tokens, positions, NoCache()).float().cpu()
    fused, plain = logits["full"], logits["none"]
    if dtype == "float32":
        assert float((fused - plain).abs().max()) <= tol
    else:
        assert float((fused - plain).norm() / plain.norm()) <= tol


def test_llama_cpu_forward_with_the_fp32_loops_matches_the_torch_code() -> None:
    config = ModelConfig(vocab_size=256, hidden_size=36, intermediate_size=52, num_layers=2,
                         num_heads=3, num_kv_heads=1, max_seq_len=64)
    model = build_model(config)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, 9), generator=g)
    positions = torch.arange(9).expand(2, 9)
    with torch.no_grad():
        fused = engine_logits(model, tokens, positions, Settings(fusion=Fusion.ELEMENTWISE))
        plain = engine_logits(model, tokens, positions, Settings(fusion=Fusion.NONE))
        reference = model(tokens, positions)
    assert float((fused - plain).abs().max()) <= 1e-5
    assert float((fused - reference).abs().max()) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Settings and layering


def _python(code: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_models_import_without_the_extension_and_use_the_torch_code() -> None:
    code = (
        "import sys; sys.modules['toyllm.engine.ops._C'] = None\n"  # importing _C now fails
        "import torch, toyllm.models.llama as m\n"
        "from toyllm.models.config import ModelConfig\n"
        "cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=1,"
        " num_heads=2, num_kv_heads=1, max_seq_len=8)\n"
        "model = m.build_model(cfg)\n"
        "print(tuple(model(torch.zeros(1, 3, dtype=torch.long), torch.arange(3)[None]).shape))\n"
        "print(sorted(n for n, mod in sys.modules.items()"
        " if n.startswith('toyllm.engine') and mod is not None))"
    )
    assert _python(code).splitlines() == ["(1, 3, 32)", "[]"]


def test_fusion_none_turns_the_fused_path_off() -> None:
    """Fusion.NONE (TOYLLM_FUSION=none): the engine's norms, RoPE and silu*up are the torch
    code of models/; from ELEMENTWISE on, engine/ops/elementwise.py's wrappers."""
    model = build_model(SMALL)
    off = EngineForward(model, Settings.from_env({"TOYLLM_FUSION": "none"}))
    assert off.fusion == Fusion.NONE
    assert (off.rms_norm, off.add_rms_norm, off.rope, off.silu_mul) == (
        layer_math.rms_norm, layer_math.add_rms_norm, apply_rope, layer_math.silu_mul)
    for fusion in list(Fusion)[1:]:
        on = EngineForward(model, Settings(fusion=fusion))
        assert (on.rms_norm, on.add_rms_norm, on.rope, on.silu_mul) == (
            fused_ops.rms_norm, fused_ops.add_rms_norm, fused_ops.rope, fused_ops.silu_mul)
