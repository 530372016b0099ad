"""Matrix-vector products of CPU decode: ``torch.ops.toyllm.gemv`` (csrc/cpu_gemv.cpp).

A decode step at batch 1 is 4 products per layer plus the output head, each reading its whole
weight once; on the CPU they are bound by how fast the weights stream from DRAM. The operator
computes ``F.linear(x, weight)`` (no bias) for fp32 CPU tensors with an AVX2 loop split over
the cores. Alone it streams about as fast as MKL's sgemv on the input-major layout; in the
model's decode step it is worth 1.96x -> 2.24x of transformers (docs/PERF.md, "CPU decode,
stories15M shape"). Its sums run in another order than MKL's: results agree to a few ulps.

``linear(x, weight)`` uses it where it pays: fp32 CPU tensors, at most ``MAX_ROWS`` rows
(prefill's many rows stay with MKL's matrix-matrix kernels), no autograd graph to record (the
operator has no backward) and ``TOYLLM_CPU_GEMV`` not set to ``0`` (read once, at import).

Example::

    >>> import torch
    >>> from engine.cpu_gemv import linear
    >>> linear(torch.ones(1, 3), torch.arange(6.0).view(2, 3))  # rows [0, 1, 2], [3, 4, 5]
    tensor([[ 3., 12.]])
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

import engine.kv_cache  # noqa: F401  (loads engine._C, which defines the operator)

if not hasattr(torch.ops.toyllm, "gemv"):
    raise ImportError(
        "engine._C predates the CPU GEMV operator (toyllm::gemv): rebuild it from the "
        "repository root with: pip install --no-build-isolation -e ."
    )

__all__ = ["ENABLED", "MAX_ROWS", "applies", "linear"]

#: False when the environment sets TOYLLM_CPU_GEMV=0 (to compare against MKL).
ENABLED: bool = os.environ.get("TOYLLM_CPU_GEMV", "1") != "0"
#: Products with more rows than this (prefill) go to MKL.
MAX_ROWS = 4

_gemv = torch.ops.toyllm.gemv.default


def applies(x: Tensor, weight: Tensor) -> bool:
    """True when ``linear`` hands (x, weight) to the operator."""
    if not ENABLED or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if x.device.type != "cpu" or weight.device.type != "cpu" or x.dim() == 0:
        return False
    n = x.shape[-1]
    if n == 0 or x.numel() > MAX_ROWS * n or weight.dim() != 2 or weight.shape[1] != n:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    return weight.is_contiguous() or weight.stride() == (1, weight.shape[0])


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """F.linear(x, weight) without bias: through the operator where it applies, else torch."""
    if applies(x, weight):
        return _gemv(x, weight)
    return F.linear(x, weight)


# ---------------------------------------------------------------------------------------------
# Fake (meta) implementation for torch.compile and opcheck: the C++ checks, same messages.


@torch.library.register_fake("toyllm::gemv")
def _gemv_fake(x: Tensor, weight: Tensor) -> Tensor:
    for name, t in (("x", x), ("weight", weight)):
        if t.dtype != torch.float32:
            raise ValueError(f"gemv: expected {name} of dtype torch.float32, got {t.dtype}")
    if weight.device != x.device:
        raise ValueError(f"gemv: expected weight on {x.device} (x's device), got {weight.device}")
    if weight.dim() != 2:
        raise ValueError(
            f"gemv: expected weight of 2 dims [out, in], got shape {list(weight.shape)}"
        )
    if x.dim() < 1:
        raise ValueError(f"gemv: expected x of at least 1 dim [..., in], got shape {list(x.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"gemv: expected x [..., {weight.shape[1]}] (weight's in = weight.size(1)), got x of "
            f"shape {list(x.shape)} for weight of shape {list(weight.shape)}"
        )
    out = weight.shape[0]
    if not (weight.is_contiguous() or weight.stride() == (1, max(out, 1))):
        raise ValueError(
            "gemv: expected weight [out, in] contiguous (strides [in, 1]) or the transposed view "
            "of a contiguous [in, out] matrix (strides [1, out]), got strides "
            f"{list(weight.stride())} for shape {list(weight.shape)}"
        )
    return x.new_empty((*x.shape[:-1], out))
