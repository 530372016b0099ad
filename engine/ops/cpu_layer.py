"""A whole decoder layer of a CPU decode step in one call: ``torch.ops.toyllm.cpu_decode_layer``.

A CPU decode step through the separate operators makes ~60 calls a layer from Python (norms,
products, RoPE and the K/V write, attention, silu, views and checks), each a few microseconds
of dispatch, allocation and thread wake-up: for a small model that overhead was a third of the
step (docs/PERF.md, "CPU decode"). The operator (csrc/layer/cpu_decode_layer.cpp) runs the
layer's residual add, input RMSNorm, fused q/k/v product, RoPE, K/V write, one-token attention,
o product, residual add, post-attention RMSNorm, fused gate/up product, silu(gate) * up and down
product in C++, with the same code as those operators, so the same bits:

    s2, out = cpu_decode_layer(x, residual, input_norm, qkv_weight, o_weight, post_norm,
                               gate_up_weight, down_weight, eps, cos, sin, k_cache, v_cache,
                               positions, num_q_heads)

x and residual are the residual stream before the layer as x + residual (residual None for the
first layer); the stream after it is s2 + out, which the next layer adds. fp32 CPU tensors,
one new token per row ([rows, 1, hidden]), weights in nn.Linear's contiguous [out, in] layout
(q/k/v and gate/up fused as engine/forward.py fuses them).

`weights_apply` and `applies` say where the engine takes it (engine/forward.py, Settings.fusion
FULL with the extension's CPU GEMV): the weights once, the step's tensors per step.

Example::

    >>> import torch
    >>> from toyllm.engine.ops.cpu_layer import cpu_decode_layer
    >>> hidden, heads, head_dim, inter = 4, 1, 4, 2
    >>> x = torch.ones(1, 1, hidden)
    >>> k_cache, v_cache = torch.zeros(1, 8, heads, head_dim), torch.zeros(1, 8, heads, head_dim)
    >>> cos, sin = torch.ones(1, 1, 1, head_dim), torch.zeros(1, 1, 1, head_dim)  # position 0
    >>> qkv_weight = torch.eye(hidden).repeat(3, 1)  # q = k = v = the normed x (1s, eps 0)
    >>> s2, out = cpu_decode_layer(
    ...     x, None, torch.ones(hidden), qkv_weight, torch.eye(hidden), torch.ones(hidden),
    ...     torch.ones(2 * inter, hidden), torch.ones(hidden, inter), 0.0, cos, sin, k_cache,
    ...     v_cache, torch.tensor([0], dtype=torch.int32), num_q_heads=heads)
    >>> s2  # x + the attention over the one key (v: 1s) through the identity o
    tensor([[[2., 2., 2., 2.]]])
    >>> k_cache[0, 0, 0].tolist(), bool(k_cache[0, 1:].any())  # k written at position 0 only
    ([1.0, 1.0, 1.0, 1.0], False)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from toyllm.engine.ops.gemv import MAX_ROWS

__all__ = ["MAX_ROWS", "applies", "cpu_decode_layer", "weights_apply"]

_op = torch.ops.toyllm.cpu_decode_layer.default


def weights_apply(weights: Iterable[Tensor]) -> bool:
    """Every weight of the layers (norm vectors and [out, in] matrices) is one the operator
    takes: fp32, on the CPU, contiguous. Asked once per engine."""
    return all(w.dtype == torch.float32 and w.device.type == "cpu" and w.is_contiguous()
               for w in weights)


def applies(x: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """The step's tensors are ones the operator takes: x [rows, 1, hidden] fp32 on the CPU,
    contiguous, at most MAX_ROWS rows (more rows take MKL's products, as the separate ops do);
    cos and sin fp32 with a contiguous last dim; autograd off (the operator has no backward, and
    the weights require grad). Asked once per step."""
    if torch.is_grad_enabled():
        return False
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 3 or x.shape[1] != 1:
        return False
    if not (1 <= x.shape[0] <= MAX_ROWS and x.is_contiguous()):
        return False
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.dim() == 4
               and t.stride(-1) == 1 for t in (cos, sin))


def cpu_decode_layer(
    x: Tensor,  # [rows, 1, hidden]
    residual: Tensor | None,  # [rows, 1, hidden]; None: the first layer (stream = x)
    input_norm: Tensor,  # [hidden]
    qkv_weight: Tensor,  # [(Hq + 2 * Hkv) * D, hidden]: q, k, v rows
    o_weight: Tensor,  # [hidden, Hq * D]
    post_norm: Tensor,  # [hidden]
    gate_up_weight: Tensor,  # [2 * intermediate, hidden]: gate, then up rows
    down_weight: Tensor,  # [hidden, intermediate]
    eps: float,
    cos: Tensor,  # [rows, 1, 1, D]
    sin: Tensor,  # [rows, 1, 1, D]
    k_cache: Tensor,  # [rows, max_seq_len, Hkv, D], written in place
    v_cache: Tensor,  # [rows, max_seq_len, Hkv, D], written in place
    positions: Tensor,  # int32 [rows]: where this token's K/V go; < 0: a finished row
    num_q_heads: int,
) -> tuple[Tensor, Tensor]:  # (stream after attention, the MLP's output), each [rows, 1, hidden]
    """One decoder layer of a decode step; see the module's docstring. Raises ValueError,
    before anything is written, for arguments it does not take (a position past the cache's
    end included)."""
    return _op(x, residual, input_norm, qkv_weight, o_weight, post_norm, gate_up_weight,
               down_weight, float(eps), cos, sin, k_cache, v_cache, positions, num_q_heads)


# ---------------------------------------------------------------------------------------------
# Fake (meta) implementation for torch.compile and opcheck: the outputs' shapes, after the C++
# checks of shapes, dtypes and devices (same messages), so that a call mixing in meta tensors,
# which the dispatcher routes here, fails as eager mode does. Contiguity and the positions'
# values (data) are checked in C++ only.
