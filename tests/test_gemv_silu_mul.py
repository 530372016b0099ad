"""toyllm::gemv_silu_mul(gate_up, weight), a SwiGLU MLP's down product with silu(gate) * up
computed in its kernel (CUDA: csrc/gemv_silu_mul.cu through csrc/cuda_gemv.cpp; CPU:
csrc/cpu_gemv.cpp), against the two operators it replaces, toyllm::silu_mul then toyllm::gemv:
the same bits (compared as integers, so -0.0 and 0.0 differ) for fp32, fp16 and bf16.

CUDA (marked `cuda`): in = 8192 and 2048 (16-byte loads, 4 and 1 warps per row), 4096 (2
warps), 33, 4097, 1 (element loads); out = 1, 3, 2048; 1 to 4 rows with batch dims; gates over
silu's whole range (0, -0, saturating and overflowing exp); misaligned gate_up and weight;
strided gate_up; h near and past 48 KB of shared memory and past the device's limit; one kernel
at one row, silu_mul's and gemv's for 2 to 4 rows or a too big h; empty sizes; bad inputs;
opcheck; CUDA-graph replay (with the shared-memory opt-in); engine/ops/gemv.py's
Gemv.silu_mul_applies; the engine's MLP and logits with the fusion on and off (Settings.fusion
SILU_GEMV against ROPE_KV).

Everywhere: the CPU operator (fp32), its bad inputs, opcheck; the engine's forward on the CPU
(never the operator). The fake: tests/test_op_fakes.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from engine_helpers import NoCache, engine_logits
from same_bits import assert_same_bits

import toyllm.engine.ops.gemv as gemv
from toyllm.engine.forward import EngineForward
from toyllm.engine.settings import Fusion, Settings
from toyllm.models import layer_math
from toyllm.models.config import ModelConfig
from toyllm.models.llama import build_model

OPS = torch.ops.toyllm
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# 16-byte loads at 4, 1 and 2 warps per row (bf16: 8192, 2048, 4096); element loads (odd sizes)
IN_SIZES = [8192, 2048, 4096, 33, 4097, 1]
OUT_SIZES = [1, 3, 2048]
ROW_SHAPES = [(1,), (2,), (3,), (4,), (1, 1), (2, 2), (1, 3, 1), ()]
# gate values at silu's edges: zeros of both signs, exp(-g) overflowing (g < -88.7: silu = -0),
# exp(-g) vanishing (silu(g) = g), tiny gates (silu(g) ~ g / 2); all finite in fp16
SPECIAL_GATES = [0.0, -0.0, -100.0, -89.0, -20.0, 20.0, 100.0, 1e-3, -1e-3, 0.5, -0.5]


def two_kernels(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What the fused operator stands for: toyllm::silu_mul, then toyllm::gemv."""
    return OPS.gemv(OPS.silu_mul(gate_up), weight)


def gate_up_values(shape, dtype, seed: int, device: str = "cuda") -> torch.Tensor:
    """gate_up [..., 2 * in]: gates N(0, 3^2) with SPECIAL_GATES at the front, ups N(0, 1)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    values = torch.randn(shape, generator=gen, device=device)
    n_in = shape[-1] // 2
    values[..., :n_in] *= 3.0
    k = min(n_in // 2, len(SPECIAL_GATES))  # tiny rows keep random gates (not all zero)
    values[..., :k] = torch.tensor(SPECIAL_GATES[:k], device=device)
    return values.to(dtype)


def weight(n_out: int, n_in: int, dtype: torch.dtype, seed: int = 1,
           device: str = "cuda") -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn((n_out, n_in), generator=gen, device=device) * n_in**-0.5).to(dtype)


# ---------------------------------------------------------------------------------------------
# CUDA: values


@pytest.mark.cuda
@pytest.mark.parametrize("n_out", OUT_SIZES)
@pytest.mark.parametrize("n_in", IN_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemv_silu_mul_cuda_has_the_bits_of_silu_mul_then_gemv(dtype, n_in, n_out) -> None:
    w = weight(n_out, n_in, dtype)
    for k, rows in enumerate(ROW_SHAPES):
        gate_up = gate_up_values((*rows, 2 * n_in), dtype, seed=10 + k)
        expected = two_kernels(gate_up, w)
        assert expected.abs().max().item() > 0  # not a vacuous comparison of zeros
        assert_same_bits(OPS.gemv_silu_mul(gate_up, w), expected)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemv_silu_mul_cuda_h_is_silu_mul_of_the_torch_code(dtype) -> None:
    # with an identity weight, y = h: the kernel's h against models/layer_math.py's silu * up
    # (equal values: a sum that starts at +0 turns an h of -0 into +0)
    n_in = 64
    eye = torch.eye(n_in, device="cuda", dtype=dtype)
    gate_up = gate_up_values((1, 2 * n_in), dtype, seed=3)
    assert torch.equal(OPS.gemv_silu_mul(gate_up, eye), layer_math.silu_mul(gate_up))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemv_silu_mul_cuda_with_misaligned_pointers(dtype) -> None:
    # in = 2048 takes 16-byte packs; one element past a 16-byte boundary it cannot: a misaligned
    # gate_up is staged element by element, a misaligned weight read element by element (as
    # gemv reads it), each alone and both together
    n_in, n_out = 2048, 2048
    w_store = weight(n_out * n_in + 1, 1, dtype).flatten()
    w_odd = w_store[1:].view(n_out, n_in)
    w_even = w_store[:-1].view(n_out, n_in).clone()
    assert w_odd.data_ptr() % 16 != 0 and w_even.data_ptr() % 16 == 0
    for rows in [1, 2, 3, 4]:
        store = gate_up_values((rows * 2 * n_in + 1,), dtype, seed=rows)
        gu_odd = store[1:].view(rows, 2 * n_in)
        gu_even = gu_odd.clone()
        assert gu_odd.data_ptr() % 16 != 0 and gu_even.data_ptr() % 16 == 0
        for gu in (gu_odd, gu_even):
            for w in (w_odd, w_even):
                assert_same_bits(OPS.gemv_silu_mul(gu, w), two_kernels(gu, w))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemv_silu_mul_cuda_packs_a_strided_gate_up(dtype) -> None:
    w = weight(300, 256, dtype)
    gate_up = gate_up_values((3, 1024), dtype, seed=5)[:, ::2]  # stride 2 in the last dim
    assert not gate_up.is_contiguous() and gate_up.shape == (3, 512)
    y = OPS.gemv_silu_mul(gate_up, w)
    assert_same_bits(y, two_kernels(gate_up.contiguous(), w))
    assert_same_bits(y, OPS.gemv_silu_mul(gate_up.contiguous(), w))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,n_in", [
    (torch.bfloat16, 24000),  # 48,000 bytes of h: within the 48 KB a launch gets by default
    (torch.bfloat16, 24576),  # 48 KB of h: with the per-warp sums past it, the kernel opts in
    (torch.float32, 16384),   # 64 KB
    (torch.float32, 49152),   # 192 KB: within an H100's 227 KB
    (torch.float32, 65536),   # 256 KB: past an H100's limit, silu_mul and gemv instead
], ids=str)
def test_gemv_silu_mul_cuda_with_h_near_and_past_48_kb_of_shared_memory(dtype, n_in) -> None:
    w = weight(40, n_in, dtype)
    gate_up = gate_up_values((1, 2 * n_in), dtype, seed=6)
    assert_same_bits(OPS.gemv_silu_mul(gate_up, w), two_kernels(gate_up, w))


def _kernel_names(prof: torch.profiler.profile) -> list[str]:
    """Our GEMV and silu_mul kernels that ran on the GPU under `prof`."""
    return [e.name for e in prof.events()
            if e.device_type.name == "CUDA" and ("gemv" in e.name or "silu" in e.name)]


def _kernels_of(gate_up: torch.Tensor, w: torch.Tensor) -> list[str]:
    OPS.gemv_silu_mul(gate_up, w)  # warm-up (and the shared-memory opt-in)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        OPS.gemv_silu_mul(gate_up, w)
        torch.cuda.synchronize()
    return _kernel_names(prof)


def _is_two_kernels(names: list[str]) -> bool:
    """silu_mul's kernel and gemv's, once each (in either order: the profiler's list is not
    sorted by time)."""
    silu = [n for n in names if re.search(r"\bsilu_mul_kernel<", n)]
    plain = [n for n in names if re.search(r"\bgemv_kernel<", n)]
    return len(names) == 2 and len(silu) == 1 and len(plain) == 1


@pytest.mark.cuda
def test_gemv_silu_mul_cuda_profile_is_one_kernel_at_one_row() -> None:
    w = weight(2048, 8192, torch.bfloat16)  # Llama-1B's down product
    for shape in [(1, 1, 16384), (16384,), (1, 16384)]:
        names = _kernels_of(gate_up_values(shape, torch.bfloat16, seed=8), w)
        assert len(names) == 1 and "gemv_silu_mul_kernel<" in names[0], names


@pytest.mark.cuda
def test_gemv_silu_mul_cuda_profile_is_silu_mul_and_gemv_for_more_rows_or_a_big_h() -> None:
    w = weight(64, 2048, torch.bfloat16)
    for rows in [2, 3, 4]:
        names = _kernels_of(gate_up_values((rows, 4096), torch.bfloat16, seed=rows), w)
        assert _is_two_kernels(names), names
    # h of 65536 fp32 (256 KB) cannot sit in one block's shared memory on any current card
    # (227 KB on an H100/H200)
    limit = getattr(torch.cuda.get_device_properties(0), "shared_memory_per_block_optin", None)
    if limit is not None:
        assert 65536 * 4 > limit
    names = _kernels_of(gate_up_values((1, 2 * 65536), torch.float32, seed=7),
                        weight(7, 65536, torch.float32))
    assert _is_two_kernels(names), names


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemv_silu_mul_cuda_repeats_its_bits(dtype) -> None:
    w = weight(2048, 8192, dtype)
    gate_up = gate_up_values((1, 16384), dtype, seed=9)
    assert_same_bits(OPS.gemv_silu_mul(gate_up, w), OPS.gemv_silu_mul(gate_up, w))


@pytest.mark.cuda
def test_gemv_silu_mul_cuda_empty_shapes() -> None:
    bf16 = torch.bfloat16
    y = OPS.gemv_silu_mul(torch.zeros(0, 16, dtype=bf16, device="cuda"),
                          torch.ones(5, 8, dtype=bf16, device="cuda"))
    assert y.shape == (0, 5) and y.dtype == bf16 and y.is_cuda
    y = OPS.gemv_silu_mul(torch.ones(2, 16, device="cuda"), torch.ones(0, 8, device="cuda"))
    assert y.shape == (2, 0)
    y = OPS.gemv_silu_mul(torch.ones(2, 0, device="cuda"), torch.ones(3, 0, device="cuda"))
    assert torch.equal(y, torch.zeros(2, 3, device="cuda"))  # empty sums are 0
    y = OPS.gemv_silu_mul(torch.ones(3, 0, 16, device="cuda"), torch.ones(5, 8, device="cuda"))
    assert y.shape == (3, 0, 5)


# ---------------------------------------------------------------------------------------------
# bad inputs: the operators (csrc/gemv/cuda_gemv.cpp, csrc/gemv/cpu_gemv.cpp)

Make = Callable[..., torch.Tensor]  # make(shape, dtype=bf16, device="cuda", stride=contiguous)


def _bad_cuda_inputs(make: Make) -> dict[str, tuple[torch.Tensor, torch.Tensor, str]]:
    bf16, f16 = torch.bfloat16, torch.float16
    return {
        "five rows": (make((5, 16)), make((4, 8)),
                      r"gemv_silu_mul: expected at most 4 rows of gate_up on CUDA "
                      r"\(gate_up\.numel\(\) / \(2 \* in\)\), got 5 "
                      r"\(gate_up of shape \[5, 16\]\); use silu_mul and F\.linear for more"),
        "five rows in batch dims": (make((1, 5, 16)), make((4, 8)),
                                    r"expected at most 4 rows of gate_up on CUDA .* got 5"),
        "dtypes differ": (make((1, 16), bf16), make((4, 8), f16),
                          r"gemv_silu_mul: expected weight of dtype torch\.bfloat16 \(gate_up's "
                          r"dtype\), got torch\.float16"),
        "float64": (make((1, 16), torch.float64), make((4, 8), torch.float64),
                    r"gemv_silu_mul: expected gate_up of dtype torch\.float32, torch\.float16 or "
                    r"torch\.bfloat16 on CUDA, got torch\.float64"),
        "strided weight": (make((1, 16)), make((4, 8), stride=(16, 2)),
                           r"gemv_silu_mul: expected a contiguous weight \[out, in\] \(strides "
                           r"\[in, 1\]\) on CUDA, got strides \[16, 2\] for shape \[4, 8\]"),
        "weight on the CPU": (make((1, 16)), make((4, 8), device="cpu"),
                              r"gemv_silu_mul: expected weight on cuda:0 \(gate_up's device\), "
                              r"got cpu"),
        "gate_up on the CPU": (make((1, 16), device="cpu"), make((4, 8)),
                               r"gemv_silu_mul: expected gate_up on a CUDA device \(weight is on "
                               r"cuda:0\), got cpu"),
        "3-dim weight": (make((1, 16)), make((4, 8, 1)),
                         r"gemv_silu_mul: expected weight of 2 dims \[out, in\]"),
        "0-dim gate_up": (make(()), make((4, 8)),
                          r"gemv_silu_mul: expected gate_up of at least 1 dim \[\.\.\., 2 \* in\]"),
        "gate_up of width in": (make((1, 8)), make((4, 8)),
                                r"gemv_silu_mul: expected gate_up \[\.\.\., 16\] \(gate then up, "
                                r"each of weight's in = weight\.size\(1\)\), got gate_up of shape "
                                r"\[1, 8\] for weight of shape \[4, 8\]"),
        "odd width": (make((1, 15)), make((4, 8)), r"expected gate_up \[\.\.\., 16\]"),
    }


def _make(shape, dtype=torch.bfloat16, device="cuda", stride=None) -> torch.Tensor:
    if stride is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.empty_strided(shape, stride, dtype=dtype, device=device)


BAD_CUDA_CASES = list(_bad_cuda_inputs(lambda shape, *a, **k: torch.empty(0)))


@pytest.mark.cuda
@pytest.mark.parametrize("case", BAD_CUDA_CASES)
def test_gemv_silu_mul_cuda_rejects_bad_inputs(case) -> None:
    gate_up, w, message = _bad_cuda_inputs(_make)[case]
    with pytest.raises(ValueError, match=message):
        OPS.gemv_silu_mul(gate_up, w)


def _bad_cpu_inputs() -> dict[str, tuple[torch.Tensor, torch.Tensor, str]]:
    f32 = torch.float32
    return {
        "bf16": (torch.zeros(1, 16, dtype=torch.bfloat16), torch.zeros(4, 8, dtype=torch.bfloat16),
                 r"gemv_silu_mul: expected gate_up of dtype torch\.float32, got torch\.bfloat16"),
        "bf16 weight": (torch.zeros(1, 16), torch.zeros(4, 8, dtype=torch.bfloat16),
                        r"gemv_silu_mul: expected weight of dtype torch\.float32, got "
                        r"torch\.bfloat16"),
        "width in": (torch.zeros(2, 8), torch.zeros(4, 8),
                     r"gemv_silu_mul: expected gate_up \[\.\.\., 16\] \(gate then up, each of "
                     r"weight's in = weight\.size\(1\)\), got gate_up of shape \[2, 8\] for weight "
                     r"of shape \[4, 8\]"),
        "1-dim weight": (torch.zeros(1, 16), torch.zeros(8),
                         r"gemv_silu_mul: expected weight of 2 dims \[out, in\], got shape \[8\]"),
        "0-dim gate_up": (torch.tensor(1.0, dtype=f32), torch.zeros(4, 8),
                          r"gemv_silu_mul: expected gate_up of at least 1 dim"),
        "strided weight": (torch.zeros(1, 16), torch.empty_strided((4, 8), (16, 2)),
                           r"gemv_silu_mul: expected weight \[out, in\] contiguous \(strides "
                           r"\[in, 1\]\) or the transposed view of a contiguous \[in, out\] "
                           r"matrix \(strides \[1, out\]\), got strides \[16, 2\]"),
    }


@pytest.mark.parametrize("case", list(_bad_cpu_inputs()))
def test_gemv_silu_mul_cpu_rejects_bad_inputs(case) -> None:
    gate_up, w, message = _bad_cpu_inputs()[case]
    with pytest.raises(ValueError, match=message):
        OPS.gemv_silu_mul(gate_up, w)


# ---------------------------------------------------------------------------------------------
# CPU values (fp32)


@pytest.mark.parametrize("input_major", [False, True])
@pytest.mark.parametrize("n_in,n_out", [(768, 256), (33, 7), (1, 1), (100, 37)])
@pytest.mark.parametrize("rows", [(1,), (3,), (2, 3), (7,), ()])
def test_gemv_silu_mul_cpu_has_the_bits_of_silu_mul_then_gemv(rows, n_in, n_out,
                                                              input_major) -> None:
    w = weight(n_out, n_in, torch.float32, device="cpu")
    if input_major:
        w = w.t().contiguous().t()  # engine/cpu_layout.py's storage
    gate_up = gate_up_values((*rows, 2 * n_in), torch.float32, seed=11, device="cpu")
    expected = two_kernels(gate_up, w)
    assert_same_bits(OPS.gemv_silu_mul(gate_up, w), expected)
    assert_same_bits(expected, OPS.gemv(layer_math.silu_mul(gate_up), w))


def test_gemv_silu_mul_cpu_strided_and_empty_inputs() -> None:
    w = weight(5, 8, torch.float32, device="cpu")
    gate_up = gate_up_values((3, 32), torch.float32, seed=12, device="cpu")[:, ::2]
    assert_same_bits(OPS.gemv_silu_mul(gate_up, w), two_kernels(gate_up.contiguous(), w))
    assert torch.equal(OPS.gemv_silu_mul(torch.ones(2, 0), torch.ones(3, 0)), torch.zeros(2, 3))
    assert OPS.gemv_silu_mul(torch.ones(0, 16), w).shape == (0, 5)
    assert OPS.gemv_silu_mul(torch.ones(2, 16), torch.ones(0, 8)).shape == (2, 0)


# ---------------------------------------------------------------------------------------------
# opcheck, CUDA graphs


@pytest.mark.parametrize("rows,n_in,n_out", [((1,), 64, 24), ((2, 3), 33, 7), ((), 8, 1)],
                         ids=str)
def test_gemv_silu_mul_cpu_opcheck(rows, n_in, n_out) -> None:
    gate_up = gate_up_values((*rows, 2 * n_in), torch.float32, seed=13, device="cpu")
    torch.library.opcheck(OPS.gemv_silu_mul.default,
                          (gate_up, weight(n_out, n_in, torch.float32, device="cpu")))


@pytest.mark.cuda
@pytest.mark.parametrize(
    "dtype,rows,n_in,n_out",
    [(torch.bfloat16, (1,), 256, 96), (torch.float16, (1, 1), 8192, 24),
     (torch.float32, (1,), 16384, 8), (torch.bfloat16, (), 33, 7),
     (torch.float32, (3,), 2048, 40)],
    ids=str,
)
def test_gemv_silu_mul_cuda_opcheck(dtype, rows, n_in, n_out) -> None:
    gate_up = gate_up_values((*rows, 2 * n_in), dtype, seed=14)
    torch.library.opcheck(OPS.gemv_silu_mul.default, (gate_up, weight(n_out, n_in, dtype)))


@pytest.mark.cuda
@pytest.mark.parametrize("rows,n_in", [(1, 8192), (1, 4097), (1, 32768), (3, 2048)])
def test_gemv_silu_mul_cuda_graph_replays_with_a_new_gate_up(rows, n_in) -> None:
    dtype = torch.bfloat16
    w = weight(2048, n_in, dtype)
    gate_up = gate_up_values((rows, 2 * n_in), dtype, seed=15)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        OPS.gemv_silu_mul(gate_up, w)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = OPS.gemv_silu_mul(gate_up, w)
    for seed in (16, 17):
        new = gate_up_values((rows, 2 * n_in), dtype, seed=seed)
        gate_up.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        assert_same_bits(y, two_kernels(new, w))


# ---------------------------------------------------------------------------------------------
# Gemv.silu_mul_linear and the engine


@pytest.mark.cuda
def test_silu_mul_applies_where_the_one_row_cuda_gemv_does() -> None:
    g = gemv.Gemv(cuda=True)  # Settings.cuda_gemv, whatever the environment says
    w = weight(16, 32, torch.bfloat16)
    gu = gate_up_values((1, 64), torch.bfloat16, seed=18)
    assert g.silu_mul_applies(gu, w)
    assert g.silu_mul_applies(gu.view(1, 1, 64), w)
    assert g.silu_mul_applies(gu.view(64), w)
    assert g.silu_mul_applies(gu.float(), w.float())
    assert g.silu_mul_applies(gu.half(), w.half())
    h = OPS.silu_mul(gu)
    assert g.applies(h, w)  # where linear(h, w) is the one-row kernel
    assert not g.silu_mul_applies(gate_up_values((2, 64), torch.bfloat16, seed=19), w)
    assert not g.silu_mul_applies(gu[:, :32], w)  # gate_up of width in, not 2 * in
    assert not g.silu_mul_applies(gu, w.half())  # dtypes differ
    assert not g.silu_mul_applies(gu.double(), w.double())
    assert not g.silu_mul_applies(gu, weight(32, 16, torch.bfloat16).t())  # not contiguous
    assert not g.silu_mul_applies(gu, w.cpu())
    gg = gu.float().requires_grad_()
    assert not g.silu_mul_applies(gg, w.float())  # no backward: autograd keeps two ops
    with torch.no_grad():
        assert g.silu_mul_applies(gg, w.float())
    # Settings(cuda_gemv=False) or a weight past cuda_gemv_max_mib: no one-row kernel at all
    assert not gemv.Gemv(cuda=False).silu_mul_applies(gu, w)
    assert not gemv.Gemv(cuda_max_bytes=w.numel() * 2 - 1).silu_mul_applies(gu, w)
    # fused=False (Settings.fusion below SILU_GEMV): silu_mul, then the product
    assert_same_bits(g.silu_mul_linear(gu, w, OPS.silu_mul, fused=False), g.linear(h, w))
    assert_same_bits(g.silu_mul_linear(gu, w, OPS.silu_mul, fused=True), g.linear(h, w))


def test_silu_mul_linear_on_the_cpu_is_silu_mul_then_linear(monkeypatch) -> None:
    def refuse(*args):
        raise AssertionError("gemv_silu_mul called on the CPU")

    monkeypatch.setattr(gemv, "_gemv_silu_mul", refuse)
    g = gemv.Gemv()
    w = weight(16, 32, torch.float32, device="cpu")
    gu = gate_up_values((1, 64), torch.float32, seed=20, device="cpu")
    assert not g.silu_mul_applies(gu, w)
    calls = []

    def silu(t):
        calls.append(t)
        return layer_math.silu_mul(t)

    y = g.silu_mul_linear(gu, w, silu)
    assert len(calls) == 1 and calls[0] is gu
    assert_same_bits(y, g.linear(layer_math.silu_mul(gu), w))


def _mlp_model(dtype: torch.dtype, device: str):
    config = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, intermediate_size=200, max_seq_len=64,
                         tie_embeddings=True)
    return build_model(config, seed=3, device=device, dtype=dtype)


def _mlp(forward: EngineForward, x: torch.Tensor, layer: int = 0) -> torch.Tensor:
    """The engine's MLP of layer `layer` on an already normalised x: the gate/up product, then
    silu(gate) * up and the down product (one kernel from Fusion.SILU_GEMV on, where it
    applies)."""
    w = forward.layers[layer]
    return forward.gemv.silu_mul_linear(forward.gemv.linear(x, w.gate_up), w.down,
                                        forward.silu_mul,
                                        fused=forward.fusion >= Fusion.SILU_GEMV)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mlp_and_logits_on_cuda_are_the_same_bits_with_the_fusion_on_and_off(dtype,
                                                                            monkeypatch) -> None:
    # the layers' gate/up products leave silu(gate) * up to the down product: SILU_GEMV, below
    # FULL (the path with silu in the gate/up product's epilogue is
    # tests/test_gemv_add_rms_norm.py's); cuda_gemv whatever the environment says
    model = _mlp_model(dtype, "cuda")
    on = EngineForward(model, Settings(fusion=Fusion.SILU_GEMV, cuda_gemv=True))
    off = EngineForward(model, Settings(fusion=Fusion.ROPE_KV, cuda_gemv=True))
    calls = []
    monkeypatch.setattr(gemv, "_gemv_silu_mul",
                        lambda *a: calls.append(a) or OPS.gemv_silu_mul(*a))
    gen = torch.Generator(device="cuda").manual_seed(21)
    x = torch.randn(1, 1, 64, generator=gen, device="cuda").to(dtype)
    tokens = torch.randint(0, 300, (1, 1), device="cuda", generator=gen)
    positions = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    with torch.inference_mode():
        mlp_on, logits_on = _mlp(on, x), on(tokens, positions, NoCache())
        assert len(calls) == 1 + 2 and calls[0][0].shape == (1, 1, 400)  # the MLP + 2 layers
        mlp_off, logits_off = _mlp(off, x), off(tokens, positions, NoCache())
        assert len(calls) == 3  # off: silu_mul and gemv
        # two rows (a batch): cuBLAS's product, unchanged, the operator not called
        x2 = torch.randn(2, 1, 64, generator=gen, device="cuda").to(dtype)
        _mlp(on, x2)
        assert len(calls) == 3
    assert_same_bits(mlp_on, mlp_off)
    assert_same_bits(logits_on, logits_off)
    # the off path is what it was: silu_mul's kernel, then gemv
    w = off.layers[0]
    gate_up = off.gemv.linear(x, w.gate_up)
    assert_same_bits(mlp_off, OPS.gemv(OPS.silu_mul(gate_up), w.down))


def test_mlp_on_the_cpu_never_calls_the_operator(monkeypatch) -> None:
    def refuse(*args):
        raise AssertionError("gemv_silu_mul called on the CPU")

    monkeypatch.setattr(gemv, "_gemv_silu_mul", refuse)
    model = _mlp_model(torch.float32, "cpu")
    tokens = torch.randint(0, 300, (1, 1), generator=torch.Generator().manual_seed(22))
    positions = torch.zeros(1, 1, dtype=torch.long)
    with torch.inference_mode():
        on = engine_logits(model, tokens, positions, Settings(fusion=Fusion.FULL))
        off = engine_logits(model, tokens, positions, Settings(fusion=Fusion.ROPE_KV))
    assert_same_bits(on, off)
