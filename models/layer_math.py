"""The elementwise math of a Llama layer in plain torch: RMSNorm (alone and after the residual
add) and SwiGLU's silu(gate) * up.

These functions are the definition. engine/ops/elementwise.py has one-kernel CUDA versions that
must give the same bits (RMSNorm: up to the order of its fp32 sum); the engine's forward
(engine/forward.py) calls those, the reference model (models/llama.py) these. RoPE, the third
such piece, is `apply_rope` in models/rope.py. Nothing in models/ imports the engine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [..., hidden], weight [hidden] -> [..., hidden]: x / rms(x) * weight.

    Normalises in fp32 whatever the model dtype, then scales in the model dtype (the order
    Hugging Face uses, so low-precision results agree too).
    """
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x, residual [..., hidden], weight [hidden] -> (s, rms_norm(s)) with s = x + residual.

    A layer's residual add and the RMSNorm that reads its result (the next sub-block's input
    norm): the norm sees s rounded to the model dtype, as when the two run one after the other.
    """
    s = x + residual
    return s, rms_norm(s, weight, eps)


def silu_mul(gate_up: Tensor) -> Tensor:
    """gate_up [..., 2 * I] (gate then up, one fused product) -> silu(gate) * up [..., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
