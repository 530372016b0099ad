"""The bit-for-bit comparison of the fused operators' tests: a fused kernel must give exactly
the bits of the kernels it replaces, so results are compared as integers (NaNs and signed zeros
included), and the first difference is reported with both values."""

from __future__ import annotations

import torch

_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_same_bits(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert got.device == expected.device
    a = got.contiguous().view(_INT[got.dtype])
    b = expected.contiguous().view(_INT[got.dtype])
    if not torch.equal(a, b):
        i = int((a != b).flatten().nonzero()[0])
        raise AssertionError(
            f"{int((a != b).sum())} of {got.numel()} results differ, first at flat index {i}: "
            f"got {got.flatten()[i].item()!r}, expected {expected.flatten()[i].item()!r}"
        )
