"""The CPU GEMV's kernels per instruction set (csrc/gemv/cpu_gemv_kernels.cpp): AVX-512, AVX2
and the portable loops, each forced through the test-only binding `_cpu_gemv_with_isa`, against
float64 sums and one another on sizes that end in partial vectors and partial row blocks; the
product (toyllm::gemv) takes the best set the CPU runs; each set's bits do not depend on the
number of threads or on where a row falls in a block; a bf16 weight gives the bits of the fp32
weight of its values. On a CPU without AVX-512 (or AVX2) the
sets it lacks are not listed and are refused; the product then falls back to the next one."""

from __future__ import annotations

import pytest
import torch

import toyllm.engine.ops  # noqa: F401  (loads the extension and its operators)
from toyllm.engine.ops import _C

OPS = torch.ops.toyllm
ISAS = _C._cpu_gemv_isas()
# (in, out): below, at and above one 16-float AVX-512 vector and one 8-float AVX2 vector;
# outputs that end in a partial block of 4 rows; the model's widths.
SHAPES = [(1, 1), (7, 5), (8, 3), (15, 9), (16, 4), (17, 6), (31, 13), (33, 7), (47, 2),
          (288, 864), (768, 288), (100, 37), (288, 32000)]


def rand(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n_in,n_out", SHAPES)
@pytest.mark.parametrize("rows", [1, 3])
def test_each_set_reads_a_bf16_weight_as_the_fp32_of_its_values(isa: str, n_in: int, n_out: int,
                                                                  rows: int) -> None:
    # a bf16 weight gives the bits of the fp32 weight of the same values, set by set (the same
    # loops; only the load widens each value)
    w = (rand((n_out, n_in), 5) * n_in**-0.5).bfloat16()
    x = rand((rows, n_in), 6)
    want = _C._cpu_gemv_with_isa(x, w.float(), isa)
    got = _C._cpu_gemv_with_isa(x, w, isa)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    if isa == ISAS[-1]:  # the product takes the best set
        assert torch.equal(OPS.gemv(x, w).view(torch.int32), want.view(torch.int32))


def test_the_portable_loops_are_always_listed_and_the_sets_are_ordered() -> None:
    assert ISAS[0] == "portable"
    assert ISAS == [name for name in ("portable", "avx2", "avx512") if name in ISAS]
    assert len(set(ISAS)) == len(ISAS)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("input_major", [False, True])
@pytest.mark.parametrize("n_in,n_out", SHAPES)
@pytest.mark.parametrize("rows", [1, 3])
def test_each_set_matches_float64_sums(isa: str, n_in: int, n_out: int, rows: int,
                                       input_major: bool) -> None:
    w = rand((n_out, n_in), 1) * n_in**-0.5
    if input_major:
        w = w.t().contiguous().t()
    x = rand((rows, n_in), 2)
    y = _C._cpu_gemv_with_isa(x, w, isa)
    ref = x.double() @ w.double().t()
    scale = x.double().abs() @ w.double().abs().t()
    assert y.shape == (rows, n_out) and y.dtype == torch.float32
    # fp32 dot products of <= 768 terms: a few ulps of the sum of |terms|
    assert ((y.double() - ref).abs() / scale.clamp_min(1e-30)).max().item() <= 1e-5


@pytest.mark.parametrize("n_in,n_out", SHAPES)
def test_the_sets_agree_within_a_few_ulps_of_the_terms(n_in: int, n_out: int) -> None:
    w = rand((n_out, n_in), 3)
    x = rand((2, n_in), 4)
    scale = (x.double().abs() @ w.double().abs().t()).clamp_min(1e-30)
    outs = {isa: _C._cpu_gemv_with_isa(x, w, isa).double() for isa in ISAS}
    for isa, y in outs.items():
        assert ((y - outs["portable"]).abs() / scale).max().item() <= 1e-5, isa


def test_the_product_takes_the_best_set_this_cpu_runs() -> None:
    w = rand((301, 291), 5)  # neither a multiple of 16 inputs nor of 4 rows
    x = rand((2, 291), 6)
    assert torch.equal(OPS.gemv(x, w), _C._cpu_gemv_with_isa(x, w, ISAS[-1]))


@pytest.mark.parametrize("isa", ISAS)
def test_a_row_has_the_same_bits_in_a_block_or_alone(isa: str) -> None:
    """Rows 0-3 of an 8-row weight run in a 4-row block; as the last row of a 5-row weight,
    row 4 runs alone (the block's remainder): each output row is summed in one order."""
    w = rand((8, 37), 7)
    x = rand((1, 37), 8)
    full = _C._cpu_gemv_with_isa(x, w, isa)
    for j in range(8):
        alone = _C._cpu_gemv_with_isa(x, w[j : j + 1].contiguous(), isa)
        assert torch.equal(full[:, j : j + 1], alone), f"row {j}"


@pytest.mark.parametrize("isa", ISAS)
def test_one_and_two_threads_give_the_same_bits(isa: str) -> None:
    w = rand((32000, 288), 9)
    x = rand((1, 288), 10)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _C._cpu_gemv_with_isa(x, w, isa)
        torch.set_num_threads(2)
        two = _C._cpu_gemv_with_isa(x, w, isa)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


@pytest.mark.parametrize("isa", ["avx1024", "AVX2", ""])
def test_an_unknown_set_is_refused_naming_those_this_cpu_runs(isa: str) -> None:
    with pytest.raises(ValueError, match=f"expected an instruction set this CPU runs .*portable"
                                         f".*got '{isa}'"):
        _C._cpu_gemv_with_isa(torch.zeros(1, 8), torch.zeros(4, 8), isa)


@pytest.mark.parametrize("isa", [name for name in ("avx2", "avx512") if name not in ISAS])
def test_a_set_this_cpu_lacks_is_refused(isa: str) -> None:
    with pytest.raises(ValueError, match=f"got '{isa}'"):
        _C._cpu_gemv_with_isa(torch.zeros(1, 8), torch.zeros(4, 8), isa)


def test_the_binding_checks_its_arguments_as_the_operator_does() -> None:
    with pytest.raises(ValueError, match="expected x of dtype torch.float32"):
        _C._cpu_gemv_with_isa(torch.zeros(1, 8, dtype=torch.float64), torch.zeros(4, 8),
                              "portable")
    with pytest.raises(ValueError, match=r"expected x \[\.\.\., 8\]"):
        _C._cpu_gemv_with_isa(torch.zeros(1, 7), torch.zeros(4, 8), "portable")
