"""Matrix-vector products of decode: ``torch.ops.toyllm.gemv`` on the CPU (csrc/cpu_gemv.cpp)
and on CUDA (csrc/cuda_gemv.cpp, kernel in csrc/gemv.cu), and ``torch.ops.toyllm.gemv_silu_mul``,
a SwiGLU MLP's down product with silu(gate) * up computed in the same CUDA kernel
(csrc/gemv_silu_mul.cu).

A decode step at batch 1 is 4 products per layer plus the output head, each reading its whole
weight once; they are bound by how fast the weights stream from memory. The operator computes
``F.linear(x, weight)`` (no bias):

* CPU: fp32 tensors (the weight may also be bf16, contiguous: read as the fp32 of its values,
  the fp32 product's bits from half the bytes; `narrow` below), an AVX2 or AVX-512 loop split
  over the cores. Alone it streams about as fast as
  MKL's sgemv on the input-major layout; in the model's decode step it is worth 1.96x -> 2.24x
  of transformers (docs/PERF.md, "CPU decode, stories15M shape"). Its sums run in another order
  than MKL's: results agree to a few ulps.
* CUDA: fp32, fp16 or bf16 (x and weight alike), at most 4 rows, a contiguous [out, in]
  weight; one kernel that streams the weight with 16-byte loads and sums in fp32, rounding
  once to the dtype (within 1 ulp of cuBLAS's fp32-accumulated result). It replaces cuBLAS's
  GEMV and split-K reduce kernels of a decode step (scripts/bench_gemv.py measures both).

``Gemv(cpu=..., cuda=..., cuda_max_bytes=...)`` is the engine's choice of products (from its
Settings): ``Gemv.linear(x, weight)`` hands (x, weight) to the operator where it applies, at
most ``MAX_ROWS`` rows on the CPU and ``CUDA_MAX_ROWS`` on CUDA, where it beats MKL / cuBLAS
(prefill's many rows stay with their matrix-matrix kernels), and nothing records autograd.
``Gemv.silu_mul_linear(gate_up, weight, silu_mul, fused)`` is ``linear(silu_mul(gate_up),
weight)``: with ``fused``, where the one-row CUDA kernel would take that product, it hands
gate_up to ``gemv_silu_mul`` instead, one kernel instead of silu_mul's and gemv's, with the same
bits (h is computed by silu_mul's own device code, the sums by gemv's). The CPU operator is
silu_mul then gemv (no gain, so the engine does not use it there).

Example::

    >>> import torch
    >>> from toyllm.engine.ops.gemv import Gemv
    >>> Gemv().linear(torch.ones(1, 3), torch.arange(6.0).view(2, 3))  # rows [0, 1, 2], [3, 4, 5]
    tensor([[ 3., 12.]])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from toyllm.engine.ops import DTYPES, WITH_CUDA, no_autograd

__all__ = ["CUDA_MAX_ROWS", "MAX_ROWS", "Gemv"]

#: Products with more rows than this (prefill) go to MKL / cuBLAS; the CUDA kernel takes no more.
MAX_ROWS = 4
#: The engine hands CUDA products to the kernel up to this many rows: at one row it beats
#: cuBLAS, at four it loses (four fp32 accumulators per lane slow the loop; docs/PERF.md).
CUDA_MAX_ROWS = 1

_gemv = torch.ops.toyllm.gemv.default
_gemv_silu_mul = torch.ops.toyllm.gemv_silu_mul.default


@dataclass(frozen=True)
class Gemv:
    """Where the decode products take toyllm::gemv (engine Settings: cpu_gemv, cuda_gemv,
    cuda_gemv_max_mib); F.linear everywhere else."""

    cpu: bool = True  # fp32 CPU products of up to MAX_ROWS rows
    cuda: bool = True  # CUDA products of up to CUDA_MAX_ROWS rows ...
    cuda_max_bytes: int = 128 * 2**20  # ... of weights up to this size (larger: cuBLAS)
    # fp32 CPU weights -> bf16 copies of the same values (cpu_step.bf16_if_exact), keyed by the
    # weight's id: the operator reads the copy, the fp32 weight stays for MKL's many rows
    narrow: dict[int, Tensor] = field(default_factory=dict, compare=False, repr=False)

    def applies_cpu(self, x: Tensor, weight: Tensor) -> bool:
        if not self.cpu or x.dtype != torch.float32 or weight.dtype != torch.float32:
            return False
        if x.device.type != "cpu" or weight.device.type != "cpu":
            return False
        return weight.is_contiguous() or weight.stride() == (1, weight.shape[0])

    def applies_cuda(self, x: Tensor, weight: Tensor) -> bool:
        """The one-row CUDA kernel takes (x, weight) (shapes aside: see `applies`)."""
        if not (self.cuda and WITH_CUDA and x.is_cuda) or weight.device != x.device:
            return False
        if x.numel() > CUDA_MAX_ROWS * x.shape[-1]:
            return False
        if x.dtype not in DTYPES or weight.dtype != x.dtype:
            return False
        if weight.numel() * weight.element_size() > self.cuda_max_bytes:
            return False
        return weight.is_contiguous()

    def applies(self, x: Tensor, weight: Tensor) -> bool:
        """True when ``linear`` hands (x, weight) to the operator."""
        if x.dim() == 0:
            return False
        n = x.shape[-1]
        if n == 0 or x.numel() > MAX_ROWS * n or weight.dim() != 2 or weight.shape[1] != n:
            return False
        if not no_autograd(x, weight):
            return False
        return self.applies_cpu(x, weight) or self.applies_cuda(x, weight)

    def linear(self, x: Tensor, weight: Tensor) -> Tensor:
        """F.linear(x, weight) without bias: through the operator where it applies."""
        if self.applies(x, weight):
            return _gemv(x, self.narrow.get(id(weight), weight) if self.narrow else weight)
        return F.linear(x, weight)

    def silu_mul_applies(self, gate_up: Tensor, weight: Tensor) -> bool:
        """True when gate_up [..., 2 * in] for weight [out, in] can go to ``gemv_silu_mul``:
        the product of its silu_mul, [..., in], is one the CUDA kernel takes."""
        if gate_up.dim() == 0 or weight.dim() != 2:
            return False
        n = weight.shape[1]
        if n == 0 or gate_up.shape[-1] != 2 * n or gate_up.numel() > CUDA_MAX_ROWS * 2 * n:
            return False
        return no_autograd(gate_up, weight) and self.applies_cuda(gate_up, weight)

    def silu_mul_linear(self, gate_up: Tensor, weight: Tensor,
                        silu_mul: Callable[[Tensor], Tensor], fused: bool = True) -> Tensor:
        """``linear(silu_mul(gate_up), weight)``: gate_up [..., 2 * in] (gate, then up), weight
        [out, in] -> [..., out]. One kernel where ``fused`` and ``silu_mul_applies``, with the
        same bits as toyllm::silu_mul then toyllm::gemv; else ``silu_mul`` (the caller's: the
        fused operator or the torch code, which agree bit for bit) then ``linear``."""
        if fused and self.silu_mul_applies(gate_up, weight):
            return _gemv_silu_mul(gate_up, weight)
        return self.linear(silu_mul(gate_up), weight)
