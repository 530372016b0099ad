"""toyllm::gemv on CUDA (csrc/gemv/cuda_gemv.cpp, kernel csrc/gemv/gemv.cu) against the exact
product: F.linear in float64 from the same inputs. bf16/fp16 results are within 1 ulp of it
rounded to the dtype, fp32 results within 1e-6 of the sum of |terms| (plus, for every dtype, the
few fp32 ulps by which an fp32 sum can differ from the exact one). Shapes: 1 to 4 rows with
leading batch dims, in = 2048 and 8192 (16-byte loads, 1 to 4 warps per row), 33 and 4097
(element loads), out = 1, 3, 2048, 16384; misaligned pointers; strided x; empty sizes; bad
inputs; opcheck; CUDA-graph capture and replay with a new x; engine/ops/gemv.py's Gemv.linear
dispatch (Settings.cuda_gemv, cuda_gemv_max_mib); the engine's logits with the kernel on and
off.

Tests marked `cuda` need a GPU; Gemv's choices for CUDA are checked everywhere (fake CUDA
tensors need no GPU). The fake: tests/test_op_fakes.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from engine_helpers import engine_logits
from torch._subclasses.fake_tensor import FakeTensorMode

import toyllm.engine.ops.gemv as gemv
from toyllm.engine.settings import Settings
from toyllm.models.config import ModelConfig
from toyllm.models.llama import build_model

OPS = torch.ops.toyllm
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
IN_SIZES = [2048, 8192, 33, 4097]  # 16-byte loads (1 and 4 warps per row); element loads
OUT_SIZES = [1, 3, 2048, 16384]
# leading dims of x: 1 to 4 rows, with and without batch dims
ROW_SHAPES = [(1,), (2,), (3,), (4,), (1, 1), (2, 2), (1, 3, 1), ()]

_MANTISSA_BITS = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
_MIN_EXPONENT = {torch.float32: -126, torch.float16: -14, torch.bfloat16: -126}


def ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype`'s values at |v| (v float64): 2^(floor(log2 |v|) - mantissa bits),
    subnormals and zero taking the spacing of the smallest normal binade."""
    _, e = torch.frexp(v)  # v = m * 2^e with 0.5 <= |m| < 1
    emin = _MIN_EXPONENT[dtype]
    e = torch.where(v == 0, torch.full_like(e, emin), e - 1).clamp_min(emin)
    return torch.exp2((e - _MANTISSA_BITS[dtype]).double())


def assert_matches_exact_product(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """y = x @ w^T summed in fp32 and rounded once: within 1 ulp of the exact product rounded
    to the dtype (fp32: 1e-6 of the sum of |terms|)."""
    x64, w64 = x.double(), w.double()
    exact = F.linear(x64, w64)
    scale = F.linear(x64.abs(), w64.abs())  # sum of |x_i * w_i|: what fp32 rounding scales with
    assert y.shape == exact.shape and y.dtype == x.dtype and y.device == x.device
    diff = (y.double() - exact.to(x.dtype).double()).abs()
    fp32_sum_error = 1e-6 * scale
    if x.dtype == torch.float32:
        allowed = fp32_sum_error
    else:
        allowed = ulp(exact, x.dtype) + fp32_sum_error
    bad = diff > allowed
    if bad.any():
        i = int(torch.argmax((diff - allowed).flatten()))
        raise AssertionError(
            f"{int(bad.sum())} of {y.numel()} results off for x {list(x.shape)} {x.dtype}, "
            f"w {list(w.shape)}: worst at flat index {i}: got {y.flatten()[i].item()!r}, "
            f"exact {exact.flatten()[i].item()!r}, allowed diff {allowed.flatten()[i].item():.3g}"
        )


def randn(shape, dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(shape, generator=gen, device="cuda") * scale).to(dtype)


def weight(n_out: int, n_in: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return randn((n_out, n_in), dtype, seed, scale=n_in**-0.5)  # outputs ~ N(0, 1)


# ---------------------------------------------------------------------------------------------
# values


@pytest.mark.cuda
@pytest.mark.parametrize("n_out", OUT_SIZES)
@pytest.mark.parametrize("n_in", IN_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemv_cuda_is_within_an_ulp_of_the_exact_product(dtype, n_in, n_out) -> None:
    w = weight(n_out, n_in, dtype)
    for k, rows in enumerate(ROW_SHAPES):
        x = randn((*rows, n_in), dtype, seed=10 + k)
        assert_matches_exact_product(OPS.gemv(x, w), x, w)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemv_cuda_with_misaligned_pointers_takes_element_loads(dtype) -> None:
    # in = 2048 would take 16-byte loads; x and w starting one element past a 16-byte boundary
    # cannot, so the kernel reads single elements (and still gets the right sums)
    n_in, n_out = 2048, 2048
    w_store = weight(n_out * n_in + 1, 1, dtype).flatten()
    w = w_store[1:].view(n_out, n_in)
    assert w.is_contiguous() and w.data_ptr() % 16 != 0
    for rows in [1, 2, 3, 4]:
        x_store = randn(rows * n_in + 1, dtype, seed=rows)
        x = x_store[1:].view(rows, n_in)
        assert_matches_exact_product(OPS.gemv(x, w), x, w)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemv_cuda_packs_a_strided_x(dtype) -> None:
    w = weight(300, 256, dtype)
    x = randn((3, 512), dtype, seed=5)[:, ::2]  # stride 2 in the last dim
    assert not x.is_contiguous()
    y = OPS.gemv(x, w)
    assert_matches_exact_product(y, x, w)
    assert torch.equal(y, OPS.gemv(x.contiguous(), w))
    x2 = randn((4, 256), dtype, seed=6).t().contiguous().t()  # column-major rows
    assert torch.equal(OPS.gemv(x2, w), OPS.gemv(x2.contiguous(), w))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemv_cuda_repeats_its_bits(dtype) -> None:
    w = weight(2048, 8192, dtype)
    x = randn((4, 8192), dtype, seed=7)
    assert torch.equal(OPS.gemv(x, w), OPS.gemv(x, w))


@pytest.mark.cuda
def test_gemv_cuda_empty_shapes() -> None:
    bf16 = torch.bfloat16
    y = OPS.gemv(torch.zeros(0, 8, dtype=bf16, device="cuda"), torch.ones(5, 8, dtype=bf16,
                                                                           device="cuda"))
    assert y.shape == (0, 5) and y.dtype == bf16 and y.is_cuda
    y = OPS.gemv(torch.ones(2, 8, device="cuda"), torch.ones(0, 8, device="cuda"))
    assert y.shape == (2, 0)
    y = OPS.gemv(torch.ones(2, 0, device="cuda"), torch.ones(3, 0, device="cuda"))
    assert torch.equal(y, torch.zeros(2, 3, device="cuda"))  # empty sums are 0
    y = OPS.gemv(torch.ones(3, 0, 8, device="cuda"), torch.ones(5, 8, device="cuda"))
    assert y.shape == (3, 0, 5)


# ---------------------------------------------------------------------------------------------
# bad inputs: the operator (csrc/gemv/cuda_gemv.cpp)

Make = Callable[..., torch.Tensor]  # make(shape, dtype=bf16, device="cuda", stride=contiguous)


def _bad_inputs(make: Make) -> dict[str, tuple[torch.Tensor, torch.Tensor, str]]:
    bf16, f16 = torch.bfloat16, torch.float16
    return {
        "five rows": (make((5, 8)), make((4, 8)),
                      r"expected at most 4 rows of x on CUDA \(x\.numel\(\) / in\), got 5 "
                      r"\(x of shape \[5, 8\]\)"),
        "five rows in batch dims": (make((1, 5, 8)), make((4, 8)),
                                    r"expected at most 4 rows of x on CUDA .* got 5"),
        "dtypes differ": (make((1, 8), bf16), make((4, 8), f16),
                          r"expected weight of dtype torch\.bfloat16 \(x's dtype\), got "
                          r"torch\.float16"),
        "float64": (make((1, 8), torch.float64), make((4, 8), torch.float64),
                    r"expected x of dtype torch\.float32, torch\.float16 or torch\.bfloat16 on "
                    r"CUDA, got torch\.float64"),
        "strided weight": (make((1, 8)), make((4, 8), stride=(16, 2)),
                           r"expected a contiguous weight \[out, in\] \(strides \[in, 1\]\) on "
                           r"CUDA, got strides \[16, 2\] for shape \[4, 8\]"),
        "input-major weight": (make((1, 8)), make((4, 8), stride=(1, 4)),
                               r"expected a contiguous weight .* got strides \[1, 4\]"),
        "weight on the CPU": (make((1, 8)), make((4, 8), device="cpu"),
                              r"expected weight on cuda:0 \(x's device\), got cpu"),
        "x on the CPU": (make((1, 8), device="cpu"), make((4, 8)),
                         r"expected x on a CUDA device \(weight is on cuda:0\), got cpu"),
        "3-dim weight": (make((1, 8)), make((4, 8, 1)), r"expected weight of 2 dims \[out, in\]"),
        "0-dim x": (make(()), make((4, 8)), r"expected x of at least 1 dim \[\.\.\., in\]"),
        "in differs": (make((1, 7)), make((4, 8)),
                       r"expected x \[\.\.\., 8\] \(weight's in = weight\.size\(1\)\), got x of "
                       r"shape \[1, 7\] for weight of shape \[4, 8\]"),
    }


def _make(shape, dtype=torch.bfloat16, device="cuda", stride=None) -> torch.Tensor:
    if stride is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.empty_strided(shape, stride, dtype=dtype, device=device)


BAD_CASES = list(_bad_inputs(lambda shape, *a, **k: torch.empty(0)))


@pytest.mark.cuda
@pytest.mark.parametrize("case", BAD_CASES)
def test_gemv_cuda_rejects_bad_inputs(case) -> None:
    x, w, message = _bad_inputs(_make)[case]
    with pytest.raises(ValueError, match=message):
        OPS.gemv(x, w)


# ---------------------------------------------------------------------------------------------
# opcheck, CUDA graphs


@pytest.mark.cuda
@pytest.mark.parametrize(
    "dtype,rows,n_in,n_out",
    [(torch.bfloat16, (1,), 256, 96), (torch.float16, (2, 2), 8192, 24),
     (torch.float32, (3,), 2048, 40), (torch.bfloat16, (1, 4), 33, 7)],
    ids=str,
)
def test_gemv_cuda_opcheck(dtype, rows, n_in, n_out) -> None:
    x = randn((*rows, n_in), dtype, seed=8)
    torch.library.opcheck(OPS.gemv.default, (x, weight(n_out, n_in, dtype)))


@pytest.mark.cuda
@pytest.mark.parametrize("rows,n_in", [(1, 2048), (4, 8192), (3, 4097)])
def test_gemv_cuda_graph_replays_with_a_new_x(rows, n_in) -> None:
    dtype = torch.bfloat16
    w = weight(2048, n_in, dtype)
    x = randn((rows, n_in), dtype, seed=9)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        OPS.gemv(x, w)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = OPS.gemv(x, w)
    for seed in (10, 11):
        new_x = randn((rows, n_in), dtype, seed=seed)
        x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, OPS.gemv(new_x, w))
        assert_matches_exact_product(y, new_x, w)


# ---------------------------------------------------------------------------------------------
# Gemv.linear and the engine


@pytest.mark.cuda
def test_linear_dispatch_on_cuda(monkeypatch) -> None:
    g = gemv.Gemv()  # the default Settings: cuda_gemv, weights up to 128 MiB
    w = weight(16, 32, torch.bfloat16)
    x = randn((1, 32), torch.bfloat16, seed=12)
    expected = gemv.WITH_CUDA
    assert g.applies(x, w) == expected
    assert g.applies(randn((1, 1, 32), torch.bfloat16, seed=13), w) == expected
    # 2 to 4 rows: the operator takes them, linear() leaves them to cuBLAS (faster there)
    assert not g.applies(randn((2, 2, 32), torch.bfloat16, seed=13), w)
    assert g.applies(x.float(), w.float()) == expected
    assert not g.applies(randn((5, 32), torch.bfloat16, seed=14), w)  # prefill: cuBLAS
    assert not g.applies(x, w.half())  # dtypes differ
    assert not g.applies(x.double(), w.double())
    assert not g.applies(x, weight(32, 16, torch.bfloat16).t())  # not contiguous
    assert not g.applies(x, w.cpu())
    xg = x.float().requires_grad_()
    assert not g.applies(xg, w.float())  # no backward: autograd keeps F.linear
    with torch.no_grad():
        assert g.applies(xg, w.float()) == expected
    if expected:
        assert torch.equal(g.linear(x, w), OPS.gemv(x, w))
    assert torch.equal(g.linear(randn((6, 32), torch.bfloat16, seed=15), w),
                       F.linear(randn((6, 32), torch.bfloat16, seed=15), w))
    # Settings(cuda_gemv=False), and weights past cuda_gemv_max_mib: cuBLAS, the kernel not called
    calls = []
    monkeypatch.setattr(gemv, "_gemv", lambda *a: calls.append(1) or OPS.gemv(*a))
    for off in (gemv.Gemv(cuda=False), gemv.Gemv(cuda_max_bytes=w.numel() * 2 - 1)):
        assert not off.applies(x, w)
        assert torch.equal(off.linear(x, w), F.linear(x, w))
    assert not calls
    assert gemv.Gemv(cuda_max_bytes=w.numel() * 2).applies(x, w) == expected  # at the limit
    # the CPU's choice is its own
    assert gemv.Gemv(cuda=False).applies(x.float().cpu(), w.float().cpu())


def test_gemv_choices_for_cuda_tensors_follow_the_settings() -> None:
    """Gemv's CUDA rules without a GPU (fake CUDA tensors): cuda off, the size limit, rows."""
    with FakeTensorMode():
        w = torch.empty(16, 32, dtype=torch.bfloat16, device="cuda")
        x = torch.empty(1, 32, dtype=torch.bfloat16, device="cuda")
        bytes_ = w.numel() * w.element_size()
        assert gemv.Gemv().applies_cuda(x, w) == gemv.WITH_CUDA
        assert gemv.Gemv(cuda_max_bytes=bytes_).applies_cuda(x, w) == gemv.WITH_CUDA
        assert not gemv.Gemv(cuda_max_bytes=bytes_ - 1).applies_cuda(x, w)
        assert not gemv.Gemv(cuda=False).applies_cuda(x, w)
        assert not gemv.Gemv().applies_cuda(torch.empty(2, 32, dtype=torch.bfloat16,
                                                        device="cuda"), w)
    settings = Settings(cuda_gemv=False, cuda_gemv_max_mib=3)
    assert settings.cuda_gemv_max_bytes == 3 * 2**20


@pytest.mark.cuda
def test_model_logits_on_cuda_with_and_without_the_kernel(monkeypatch) -> None:
    config = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, intermediate_size=96, max_seq_len=64,
                         tie_embeddings=True)
    model = build_model(config, seed=3).cuda()
    # one row: the kernel takes one-row products only (engine/ops/gemv.py CUDA_MAX_ROWS)
    tokens = torch.randint(0, 300, (1, 1), generator=torch.Generator().manual_seed(0)).cuda()
    positions = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    calls = []
    monkeypatch.setattr(gemv, "_gemv", lambda *a: calls.append(1) or OPS.gemv(*a))
    with torch.inference_mode():
        on = engine_logits(model, tokens, positions, Settings(cuda_gemv=True))
        assert calls  # the kernel ran
        made = len(calls)
        off = engine_logits(model, tokens, positions, Settings(cuda_gemv=False))
        assert len(calls) == made  # cuBLAS's products
        # weights past cuda_gemv_max_mib go to cuBLAS too: the whole model is under 1 MiB
        small = engine_logits(model, tokens, positions, Settings(cuda_gemv_max_mib=0))
        assert len(calls) == made
    assert (on - off).abs().max().item() <= 1e-4 * off.abs().max().item()
    assert torch.equal(small, off)
