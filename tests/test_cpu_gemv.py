"""toyllm::gemv on the CPU (csrc/cpu_gemv.cpp) against torch.matmul in fp32: both weight
layouts, 1 to 4 rows and more, sizes that are not multiples of the kernels' 8-float vectors,
4-row and 32-column blocks; non-contiguous x; bad inputs; opcheck; engine/ops/gemv.py's
Gemv.linear dispatch; one thread and two; the engine's logits with the operator on and off
(Settings.cpu_gemv). The CUDA kernel's tests: tests/test_cuda_gemv.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from engine_helpers import engine_logits

import toyllm.engine.ops.gemv as gemv
from toyllm.engine.settings import Settings
from toyllm.models.config import ModelConfig
from toyllm.models.llama import build_model

OPS = torch.ops.toyllm
# (in, out): model-like, odd, and below and above one block of either kernel.
SHAPES = [(288, 864), (288, 288), (768, 288), (288, 1536), (64, 300), (7, 5), (1, 1), (13, 33),
          (33, 13), (100, 37), (9, 31), (288, 32000), (17, 1), (1, 17), (129, 65)]
ROWS = [(1,), (2,), (3,), (4,), (1, 1), (2, 3), (7,)]


def rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def weight(n_in: int, n_out: int, input_major: bool, seed: int = 1) -> torch.Tensor:
    """[out, in]: contiguous, or the transposed view of a contiguous [in, out] matrix."""
    w = rand((n_out, n_in), seed) * n_in**-0.5
    return w.t().contiguous().t() if input_major else w


def close_to_matmul(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    ref = (x.double() @ w.double().t()).float()  # the exact sums, rounded once
    assert y.shape == ref.shape and y.dtype == torch.float32
    scale = (x.double().abs() @ w.double().abs().t()).float().clamp_min(1e-30)
    # fp32 dot products of <= 32000 terms: a few ulps of the sum of |terms|
    assert ((y - ref).abs() / scale).max().item() <= 1e-5
    assert (y - torch.matmul(x, w.t())).abs().max().item() <= 1e-5


@pytest.mark.parametrize("input_major", [False, True])
@pytest.mark.parametrize("n_in,n_out", SHAPES)
@pytest.mark.parametrize("rows", ROWS)
def test_gemv_matches_matmul(n_in, n_out, rows, input_major) -> None:
    w = weight(n_in, n_out, input_major)
    assert w.is_contiguous() != input_major or n_in == 1 or n_out == 1
    x = rand((*rows, n_in), 2)
    close_to_matmul(OPS.gemv(x, w), x, w)


@pytest.mark.parametrize("input_major", [False, True])
def test_gemv_one_and_two_threads_agree(input_major) -> None:
    w = weight(288, 1536, input_major)
    x = rand((1, 288), 3)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OPS.gemv(x, w)
        torch.set_num_threads(2)
        two = OPS.gemv(x, w)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)  # each output is one thread's sum, whoever computes it


def test_gemv_takes_non_contiguous_x() -> None:
    w = weight(96, 40, False)
    wide = rand((3, 2 * 96), 4)
    x = wide[:, ::2]  # stride 2 in the last dim
    assert not x.is_contiguous()
    close_to_matmul(OPS.gemv(x, w), x, w)
    x2 = rand((4, 96), 5).t().contiguous().t()  # [4, 96] column-major
    close_to_matmul(OPS.gemv(x2, w), x2, w)


def test_gemv_empty_shapes() -> None:
    assert OPS.gemv(torch.zeros(0, 8), torch.zeros(5, 8)).shape == (0, 5)
    assert OPS.gemv(torch.zeros(2, 8), torch.zeros(0, 8)).shape == (2, 0)
    assert torch.equal(OPS.gemv(torch.zeros(2, 0), torch.zeros(3, 0)), torch.zeros(2, 3))


@pytest.mark.parametrize(
    "x,w,message",
    [
        (torch.zeros(1, 8, dtype=torch.float64), torch.zeros(4, 8),
         "expected x of dtype torch.float32, got torch.float64"),
        (torch.zeros(1, 8), torch.zeros(4, 8, dtype=torch.float16),
         r"expected weight of dtype torch.float32 \(or torch.bfloat16, read as fp32 values\), "
         "got torch.float16"),
        (torch.zeros(1, 8), torch.zeros(8, 4, dtype=torch.bfloat16).t(),
         r"expected a bf16 weight \[out, in\] contiguous \(strides \[in, 1\]\), got strides "
         r"\[1, 4\]"),
        (torch.zeros(1, 8), torch.zeros(4, 8, 1), r"expected weight of 2 dims \[out, in\]"),
        (torch.zeros(()), torch.zeros(4, 8), r"expected x of at least 1 dim \[\.\.\., in\]"),
        (torch.zeros(1, 7), torch.zeros(4, 8), r"expected x \[\.\.\., 8\]"),
        (torch.zeros(1, 8), torch.zeros(4, 16)[:, ::2],
         r"expected weight \[out, in\] contiguous .* got strides \[16, 2\]"),
    ],
)
def test_gemv_rejects_bad_inputs(x, w, message) -> None:
    with pytest.raises(ValueError, match=message):
        OPS.gemv(x, w)


@pytest.mark.parametrize("input_major", [False, True])
@pytest.mark.parametrize("rows", [(1,), (2, 3)])
def test_gemv_opcheck(rows, input_major) -> None:
    w = weight(40, 24, input_major)
    torch.library.opcheck(OPS.gemv.default, (rand((*rows, 40), 6), w))


@pytest.mark.parametrize("cpu", [True, False], ids=["cpu_gemv", "mkl"])
def test_linear_dispatch(cpu, monkeypatch) -> None:
    g = gemv.Gemv(cpu=cpu)  # Settings.cpu_gemv
    w = weight(32, 16, False)
    assert g.applies(torch.zeros(1, 32), w) == cpu
    assert g.applies(torch.zeros(2, 2, 32), w.t().contiguous().t()) == cpu
    assert not g.applies(torch.zeros(5, 32), w)  # prefill rows: MKL
    assert not g.applies(torch.zeros(1, 32, dtype=torch.float64), w.double())
    assert not g.applies(torch.zeros(1, 32), torch.zeros(16, 64)[:, ::2])
    x = torch.zeros(1, 32, requires_grad=True)
    assert not g.applies(x, w)  # no backward: autograd keeps F.linear
    with torch.no_grad():
        assert g.applies(x, w) == cpu
    calls = []
    monkeypatch.setattr(gemv, "_gemv", lambda *a: calls.append(1) or OPS.gemv(*a))
    x = rand((3, 32), 7)
    assert (g.linear(x, w) - F.linear(x, w)).abs().max().item() <= 1e-5
    assert len(calls) == (1 if cpu else 0)
    assert torch.equal(g.linear(rand((6, 32), 8), w), F.linear(rand((6, 32), 8), w))
    assert len(calls) == (1 if cpu else 0)


def test_model_logits_with_and_without_the_operator(monkeypatch) -> None:
    config = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, intermediate_size=96, max_seq_len=64,
                         tie_embeddings=True)
    model = build_model(config, seed=3)
    tokens = torch.randint(0, 300, (1, 1), generator=torch.Generator().manual_seed(0))
    positions = torch.zeros(1, 1, dtype=torch.long)
    calls = []
    monkeypatch.setattr(gemv, "_gemv", lambda *a: calls.append(1) or OPS.gemv(*a))
    with torch.inference_mode():
        on = engine_logits(model, tokens, positions, Settings(cpu_gemv=True))
        # q/k/v, o, gate/up, down per layer, and the output head
        assert len(calls) == 4 * config.num_layers + 1
        off = engine_logits(model, tokens, positions, Settings(cpu_gemv=False))
        assert len(calls) == 4 * config.num_layers + 1  # MKL's products
        reference = model(tokens, positions)
    assert (on - off).abs().max().item() <= 1e-5
    assert (on - reference).abs().max().item() <= 1e-5
