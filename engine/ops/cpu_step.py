"""A whole CPU decode step in one call: ``torch.ops.toyllm.cpu_decode_step``.

Through the separate operators, a small model's CPU decode step is hundreds of calls from Python
a token; even with one call per layer, what was left beyond the products was the step around
the layers: the embedding, RoPE's cos/sin (seven ops), the final norm and the head's product,
and the forward's Python between them (docs/PERF.md, "CPU decode"). The operator
(csrc/layer/cpu_decode_step.cpp) runs the embedding, cos/sin, every layer, the final RMSNorm and
the head in C++, with the code of the operators it stands for, so the same bits:

    logits = cpu_decode_step(tokens, embedding, layer_weights, final_norm, head_weight, eps,
                             inv_freq, k_caches, v_caches, positions, num_q_heads)

tokens int64 [rows, 1] (one new token per row), fp32 CPU weights in nn.Linear's contiguous
[out, in] layout (q/k/v and gate/up fused as engine/forward.py fuses them), layer_weights the six
of each layer in turn (input_norm, qkv, o, post_norm, gate_up, down: engine/forward.py's
LayerWeights order), per-layer cache views [rows, max_seq_len, Hkv, D] and int32 positions
(< 0: a finished row, which writes nothing) -> logits [rows, 1, vocab]. Positions are not
advanced: the engine does that after the step.

With `block_tables` (int32 [rows, W]) the caches are the paged pools [num_blocks, block_size,
Hkv, D] of the serving engine (engine/serving.py): row r's key j sits in block
block_tables[r, j // block_size], as toyllm::paged_decode_attention reads it, and its new K/V go
to the slot of its position. The arithmetic is the same; the step then gives the bits of the
serving engine's separate operators (paged_kv_write, paged_decode_attention).

The products' weights (qkv, o, gate_up, down and the head) may also be bf16: each is read as the
fp32 of its value, so the step gives the fp32 step's bits on those values from half the bytes, and
a CPU decode step is bound by the bytes it streams. `bf16_if_exact` makes such a copy of a weight
whose fp32 values are all bf16 values (a checkpoint stored in bf16, as most are, the shipped
model's included, loaded in fp32 on the CPU): nothing changes but the bytes read.

`weights_apply` and `applies` say where the engine takes it (engine/forward.py, Settings.fusion
FULL with the extension's CPU GEMV): the weights once, the step's tokens per step.

`cpu_decode_step` calls the operator's C++ function through the extension's own binding
(`_C.cpu_decode_step`, csrc/layer/cpu_decode_step.h), not through the dispatcher: the same
code, checks and messages, without the dispatcher's path from Python, which costs tens of
microseconds a call once a decode step has streamed the weights through the CPU's caches
(docs/PERF.md, "CPU decode"). The registered operator ``torch.ops.toyllm.cpu_decode_step`` (its
schema, fake and opcheck: tests/) runs the same function.

Example (one layer whose products are identities on a 4-wide stream; eps 0)::

    >>> import torch
    >>> from toyllm.engine.ops.cpu_step import cpu_decode_step
    >>> hidden, inter = 4, 2
    >>> layer = [torch.ones(hidden), torch.eye(hidden).repeat(3, 1), torch.eye(hidden),
    ...          torch.ones(hidden), torch.zeros(2 * inter, hidden), torch.zeros(hidden, inter)]
    >>> k_cache, v_cache = torch.zeros(1, 8, 1, hidden), torch.zeros(1, 8, 1, hidden)
    >>> logits = cpu_decode_step(
    ...     torch.tensor([[1]]), torch.eye(hidden), layer, torch.ones(hidden), torch.eye(hidden),
    ...     0.0, torch.ones(hidden // 2), [k_cache], [v_cache],
    ...     torch.tensor([0], dtype=torch.int32), num_q_heads=1)
    >>> logits.shape, logits.argmax().item()  # token 1's one-hot row through the layer, the head
    (torch.Size([1, 1, 4]), 1)
    >>> bool(k_cache[0, 0].any()), bool(k_cache[0, 1:].any())  # k written at position 0 only
    (True, False)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from toyllm.engine.ops import _C
from toyllm.engine.ops.gemv import MAX_ROWS

__all__ = ["MAX_ROWS", "applies", "bf16_if_exact", "cpu_decode_step", "weights_apply"]

_op = _C.cpu_decode_step  # the operator's CPU function, without the dispatcher (above)


def weights_apply(weights: Iterable[Tensor]) -> bool:
    """Every weight of the step (norm vectors, [out, in] matrices, the embedding and RoPE's
    inverse frequencies) is one the operator takes: fp32, on the CPU, contiguous. Asked once
    per engine."""
    return all(w.dtype == torch.float32 and w.device.type == "cpu" and w.is_contiguous()
               for w in weights)


def bf16_if_exact(weight: Tensor) -> Tensor:
    """A contiguous bf16 copy of an fp32 `weight` whose every value is a bf16 value (the low 16
    bits of each float zero), so the copy holds the same numbers in half the bytes; else
    `weight` itself. Reads the weight once, in slices (no full-size temporary)."""
    if weight.dtype != torch.float32 or not weight.is_contiguous():
        return weight
    bits = weight.view(-1).view(torch.int32)
    chunk = 1 << 22
    for start in range(0, bits.numel(), chunk):
        if torch.any(torch.bitwise_and(bits[start:start + chunk], 0xFFFF)):
            return weight
    return weight.to(torch.bfloat16)


def applies(tokens: Tensor) -> bool:
    """The step's tokens are ones the operator takes: int64 [rows, 1] on the CPU, contiguous,
    1 to MAX_ROWS rows (more rows take MKL's products, as the separate ops do); autograd off
    (the operator has no backward, and the weights require grad). Asked once per step."""
    if torch.is_grad_enabled():
        return False
    return (tokens.dtype == torch.int64 and tokens.device.type == "cpu" and tokens.dim() == 2
            and tokens.shape[1] == 1 and 1 <= tokens.shape[0] <= MAX_ROWS
            and tokens.is_contiguous())


def cpu_decode_step(
    tokens: Tensor,  # int64 [rows, 1]
    embedding: Tensor,  # [vocab, hidden]
    layer_weights: Sequence[Tensor],  # per layer: input_norm, qkv, o, post_norm, gate_up, down
    final_norm: Tensor,  # [hidden]
    head_weight: Tensor,  # [vocab, hidden]
    eps: float,
    inv_freq: Tensor,  # [head_dim / 2]: models/rope.py's inverse frequencies
    k_caches: Sequence[Tensor],  # per layer [rows, max_seq_len, Hkv, D], written in place
    v_caches: Sequence[Tensor],  # per layer [rows, max_seq_len, Hkv, D], written in place
    positions: Tensor,  # int32 [rows]: where this token's K/V go; < 0: a finished row
    num_q_heads: int,
    block_tables: Tensor | None = None,  # int32 [rows, W]: the caches are paged pools
) -> Tensor:  # logits [rows, 1, vocab]
    """One decode step of the whole model; see the module's docstring. Raises ValueError,
    before anything is written, for arguments it does not take (a token id outside the
    embedding, a position past a cache's end and a table entry outside the pool included)."""
    return _op(tokens, embedding, layer_weights, final_norm, head_weight, float(eps), inv_freq,
               k_caches, v_caches, positions, num_q_heads, block_tables)
