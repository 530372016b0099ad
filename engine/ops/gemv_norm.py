"""The product after a residual add and an RMSNorm, one CUDA kernel at decode:
``torch.ops.toyllm.gemv_add_rms_norm(x, residual, norm_weight, eps, weight) -> (sum, y)``.

A Llama layer at decode runs add_rms_norm (the residual add and the norm after it) and then a
product of the normalised row: q/k/v after the input norm, gate/up after the post-attention
norm. The operator does both in one kernel (csrc/gemv_add_rms_norm.cu): every block computes
the norm of the one row itself, into shared memory, while its first loads of the weight are
under way, then streams its rows of the weight (the staged GEMV of csrc/gemv_staged.cuh). Two
launches and one gap between kernels fewer per layer, and no normalised row written and read
back. It returns ``sum = x + residual`` (the residual stream) and ``y = F.linear(rms_norm(sum),
weight)``, with the same bits as toyllm::add_rms_norm then toyllm::gemv.

``torch.ops.toyllm.gemv_add_rms_norm_silu_mul`` is the same for a SwiGLU MLP's gate/up product
(weight = [gate; up]) with silu(gate) * up taken in the kernel's epilogue: it returns ``(sum,
h)``, h = silu_mul(y), the bits of add_rms_norm, gemv and silu_mul. The down product that reads
h is then a plain toyllm::gemv, which streams faster than toyllm::gemv_silu_mul (that kernel
computes h in every block before its product: scripts/bench_gemv.py).

``torch.ops.toyllm.gemv_add_rms_norm_rope_kv(x, residual, norm_weight, eps, weight, cos, sin,
k_cache, v_cache, positions, num_q_heads) -> (sum, q)`` is the q/k/v product after the input
norm with toyllm::rope_kv_update's work (RoPE on q and k, the K/V write) in its epilogue: the
bits of gemv_add_rms_norm then rope_kv_update, one kernel for a one-row decode step
(engine/forward.py takes it where ``rope_kv_applies``).

``applies`` / ``silu_applies`` / ``rope_kv_applies`` say where the operators take their
arguments (one CUDA row, fp32/fp16/bf16 throughout, contiguous tensors, a product the engine's
CUDA GEMV takes, no autograd); engine/forward.py calls them at Settings.fusion FULL. On the CPU
the operators are add_rms_norm then F.linear (and silu_mul): nothing fused, the engine does not
call them there. The staged kernels' warps per block are the operators' ``warps`` argument (4,
8 or 16; default 8), for scripts/bench_gemv.py.

Example::

    >>> import torch
    >>> from toyllm.engine.ops.gemv_norm import add_rms_norm_linear
    >>> s, y = add_rms_norm_linear(torch.ones(1, 2), torch.ones(1, 2), torch.ones(2), 1e-5,
    ...                            torch.eye(2))  # on the CPU: add_rms_norm, then F.linear
    >>> s, y
    (tensor([[2., 2.]]), tensor([[1.0000, 1.0000]]))
"""

from __future__ import annotations

import torch
from torch import Tensor

from toyllm.engine.ops import no_autograd
from toyllm.engine.ops.gemv import Gemv

__all__ = ["add_rms_norm_linear", "add_rms_norm_rope_kv", "add_rms_norm_silu_mul", "applies",
           "rope_kv_applies", "silu_applies"]

_op = torch.ops.toyllm.gemv_add_rms_norm.default
_silu_op = torch.ops.toyllm.gemv_add_rms_norm_silu_mul.default
_rope_op = torch.ops.toyllm.gemv_add_rms_norm_rope_kv.default


def applies(x: Tensor, residual: Tensor, norm_weight: Tensor, weight: Tensor, gemv: Gemv) -> bool:
    """True when the fused operator takes these arguments: one row of x [..., in] on CUDA,
    residual of x's shape, norm_weight [in], all contiguous and of one dtype, and a product
    `gemv` would give the CUDA kernel."""
    # CUDA only: a CPU decode step asks twice a layer, so it is told first
    if not x.is_cuda or x.dim() == 0 or weight.dim() != 2:
        return False
    n = x.shape[-1]
    if n == 0 or x.numel() != n or residual.shape != x.shape or weight.shape[1] != n:
        return False
    if norm_weight.shape != (n,) or norm_weight.dtype != x.dtype or residual.dtype != x.dtype:
        return False
    if norm_weight.device != x.device or residual.device != x.device:
        return False
    if not (x.is_contiguous() and residual.is_contiguous() and norm_weight.is_contiguous()):
        return False
    return no_autograd(x, residual, norm_weight, weight) and gemv.applies_cuda(x, weight)


def silu_applies(x: Tensor, residual: Tensor, norm_weight: Tensor, weight: Tensor,
                 gemv: Gemv) -> bool:
    """Where ``applies`` and weight has an even number of rows (gate, then up)."""
    if weight.dim() != 2 or weight.shape[0] % 2 != 0:
        return False
    return applies(x, residual, norm_weight, weight, gemv)


def rope_kv_applies(x: Tensor, residual: Tensor, norm_weight: Tensor, weight: Tensor,
                    cos: Tensor, k_cache: Tensor, gemv: Gemv) -> bool:
    """Where ``applies``, for a cache of one row (k_cache [1, max_seq_len, Hkv, D] of x's dtype,
    the weight's rows whole heads of D) and contiguous cos."""
    if k_cache.dim() != 4 or k_cache.shape[0] != 1 or k_cache.dtype != x.dtype:
        return False
    if not cos.is_contiguous() or weight.dim() != 2 or weight.shape[0] % k_cache.shape[3] != 0:
        return False
    return applies(x, residual, norm_weight, weight, gemv)


def add_rms_norm_rope_kv(
    x: Tensor, residual: Tensor, norm_weight: Tensor, eps: float, weight: Tensor, cos: Tensor,
    sin: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor, num_q_heads: int,
) -> tuple[Tensor, Tensor]:
    """(x + residual, q): the q/k/v product of rms_norm(x + residual) * norm_weight handed to
    toyllm::rope_kv_update (which returns q and writes K/V at the positions), by the fused
    operator: call it where ``rope_kv_applies``."""
    return _rope_op(x, residual, norm_weight, eps, weight, cos, sin, k_cache, v_cache, positions,
                    num_q_heads)


def add_rms_norm_silu_mul(
    x: Tensor, residual: Tensor, norm_weight: Tensor, eps: float, weight: Tensor
) -> tuple[Tensor, Tensor]:
    """(x + residual, silu_mul(linear(rms_norm(x + residual) * norm_weight, weight))) for weight
    = [gate; up], by the fused operator: call it where ``silu_applies`` (elsewhere it runs the
    separate kernels, or the CPU's ops)."""
    return _silu_op(x, residual, norm_weight, eps, weight)


def add_rms_norm_linear(
    x: Tensor, residual: Tensor, norm_weight: Tensor, eps: float, weight: Tensor
) -> tuple[Tensor, Tensor]:
    """(x + residual, linear(rms_norm(x + residual) * norm_weight, weight)), by the fused
    operator (the same bits as toyllm::add_rms_norm then toyllm::gemv on CUDA)."""
    return _op(x, residual, norm_weight, eps, weight)
