"""One-kernel CUDA versions of a Llama layer's elementwise pieces: RMSNorm, RoPE, silu * up.

A decode step is launch-bound: in plain torch RMSNorm is 8 kernels, RoPE 5 and SwiGLU's
silu(gate) * up 2. The operators ``torch.ops.toyllm.rms_norm``, ``.rope`` and ``.silu_mul``
(csrc/elementwise/fused_kernels.cu) do each in one launch with the same rounding as the torch
code of models/layer_math.py and models/rope.py: rope and silu_mul bit for bit, rms_norm up to
the order of its fp32 sum of squares (an ulp of the normalising factor at most).
``torch.ops.toyllm.add_rms_norm`` adds the residual add that precedes each norm of a layer to
the same kernel: (x + residual, rms_norm(x + residual)), the sum bit for bit, the norm as
rms_norm's. On the CPU the operators run that same torch code in ATen, except in fp32, where
rms_norm (alone or after add_rms_norm's ATen add) and rope are plain C++ loops (rope the same
bits, rms_norm within a few ulps): a decode step of a small model spends more time dispatching
the ATen pieces than computing them.

The wrappers below use the operator where it applies: a CUDA tensor and an extension built with
CUDA, or (rms_norm, add_rms_norm and rope) an fp32 CPU tensor; nothing recording autograd (the
operators have no backward). Everything else runs the torch definitions. Whether the engine
calls these wrappers or the torch code at all is its Settings.fusion (engine/forward.py).

Example::

    >>> import torch
    >>> from toyllm.engine.ops.elementwise import silu_mul
    >>> silu_mul(torch.tensor([[0.0, 1.0, 2.0, 3.0]]))  # silu([0, 1]) * [2, 3]
    tensor([[0.0000, 2.1932]])
"""

from __future__ import annotations

import torch
from torch import Tensor

from toyllm.engine.ops import DTYPES, WITH_CUDA, no_autograd
from toyllm.models import layer_math
from toyllm.models.rope import apply_rope

__all__ = ["add_rms_norm", "rms_norm", "rope", "silu_mul"]


def _fusable(x: Tensor, *others: Tensor) -> bool:
    """The CUDA operator applies: CUDA x of a supported dtype, others alike, no autograd."""
    if not (WITH_CUDA and x.is_cuda and x.dtype in DTYPES):
        return False
    if any(t.dtype != x.dtype or t.device != x.device for t in others):
        return False
    return no_autograd(x, *others)


def _cpu_loop(x: Tensor, *others: Tensor) -> bool:
    """The operator's fp32 CPU loop applies (rms_norm, rope): fp32 CPU tensors, no autograd."""
    if not (x.dtype == torch.float32 and x.device.type == "cpu"):
        return False
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in others):
        return False
    return no_autograd(x, *others)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [..., hidden], weight [hidden] -> [..., hidden]: models.layer_math.rms_norm."""
    if _fusable(x, weight) or (_cpu_loop(x, weight) and x.shape[-1:] == weight.shape
                               and x.stride(-1) == 1 and weight.is_contiguous()):
        return torch.ops.toyllm.rms_norm(x, weight, float(eps))
    return layer_math.rms_norm(x, weight, eps)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x, residual [..., hidden], weight [hidden] -> (x + residual, rms_norm of it), both
    [..., hidden]: models.layer_math.add_rms_norm. A residual that broadcasts to x (a shape
    other than x's) takes the torch code."""
    if x.shape != residual.shape or x.shape[-1:] != weight.shape:
        return layer_math.add_rms_norm(x, residual, weight, eps)
    if _fusable(x, residual, weight) or (_cpu_loop(x, residual, weight) and x.stride(-1) == 1
                                         and residual.stride(-1) == 1
                                         and weight.is_contiguous()):
        return torch.ops.toyllm.add_rms_norm(x, residual, weight, float(eps))
    return layer_math.add_rms_norm(x, residual, weight, eps)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, T, H, D] (last dim contiguous), cos/sin [B, T, 1, D] -> models.rope.apply_rope.

    The fused result is a new contiguous tensor whatever x's strides.
    """
    if ((_fusable(x, cos, sin) or _cpu_loop(x, cos, sin)) and x.dim() == 4
            and cos.shape == (*x.shape[:2], 1, x.shape[3]) and sin.shape == cos.shape):
        return torch.ops.toyllm.rope(x, cos, sin)
    return apply_rope(x, cos, sin)


def silu_mul(gate_up: Tensor) -> Tensor:
    """gate_up [..., 2 * I] -> silu(gate) * up [..., I]: models.layer_math.silu_mul."""
    if _fusable(gate_up):
        return torch.ops.toyllm.silu_mul(gate_up)
    return layer_math.silu_mul(gate_up)
