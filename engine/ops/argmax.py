"""The greedy pick of a decode step: ``torch.ops.toyllm.argmax``
(csrc/sampling/argmax_ops.cpp, CUDA kernel in csrc/sampling/argmax.cu), torch.argmax(logits,
dim=-1) of [rows, vocab] logits; with ``flag_nonfinite``, -1 for a row that holds a NaN or an
inf.

The answer is torch's bit for bit: the first index of each row's maximum, NaN counting as the
maximum (the first NaN wins), -0.0 equal to +0.0. fp16 and bf16 logits are compared after their
exact widening to fp32, so ``argmax(logits)`` is also ``torch.argmax(logits.float(), -1)`` and
the engine hands the model's logits over as they are (no ``.float()`` kernel before greedy).

* CPU: fp32 logits in a plain loop of two passes, the maximum (with the row's finiteness) and
  then its first index, a small part of the time torch.argmax and the isfinite check take
  (docs/PERF.md, "CPU decode"); rows holding a NaN or an inf, and other dtypes, take
  at::argmax.
* CUDA: one kernel that splits each row over many blocks and lets the last block of a row to
  finish combine their results (plus a memset of per-row counters). torch's reduction took
  ~27 us for one row of Llama-1B's 128,256 logits on an H200 (docs/PERF.md);
  ``scripts/bench_argmax.py`` compares the two.

``argmax(logits)`` uses the operator where it applies: a CUDA tensor of 2 dims with a non-empty
vocab, fp32, fp16 or bf16, and an extension built with CUDA (the engine's Settings.cuda_argmax
may turn it off: ``argmax(logits, kernel=False)``), and fp32 CPU logits of 2 dims with a
non-empty vocab. Everything else is ``logits.argmax(dim=-1)``. On the CPU it calls the
operator's C++ function through the extension's own binding (``_C.argmax_cpu``), not through the
dispatcher, whose path from Python costs tens of microseconds a call once a decode step has
streamed the weights through the caches (docs/PERF.md, "CPU decode"): the same code and answer.

Example::

    >>> import torch
    >>> from toyllm.engine.ops.argmax import argmax
    >>> argmax(torch.tensor([[1.0, 3.0, 3.0], [float("nan"), 2.0, float("nan")]]))
    tensor([1, 0])
"""

from __future__ import annotations

import torch
from torch import Tensor

from toyllm.engine.ops import _C, DTYPES, WITH_CUDA

__all__ = ["applies", "argmax"]

_argmax = torch.ops.toyllm.argmax.default
_argmax_cpu = _C.argmax_cpu  # the operator's CPU function, without the dispatcher (above)


def applies(logits: Tensor) -> bool:
    """True when ``argmax`` hands these logits to the CUDA kernel."""
    return (WITH_CUDA and logits.is_cuda and logits.dim() == 2 and logits.shape[1] > 0
            and logits.dtype in DTYPES)


def applies_cpu(logits: Tensor) -> bool:
    """True when ``argmax`` hands these logits to the operator's fp32 CPU loop."""
    return (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
            and logits.shape[1] > 0)


def argmax(logits: Tensor, kernel: bool = True, flag_nonfinite: bool = False) -> Tensor:
    """logits [rows, vocab] -> int64 [rows]: torch.argmax(logits, dim=-1), through the CUDA
    kernel where it applies (and `kernel`), and through the operator's CPU loop for fp32 CPU
    logits. flag_nonfinite: -1 for each row holding a NaN or an inf (the kernel and the loop
    find them in the pass that finds the maximum)."""
    if applies_cpu(logits):
        return _argmax_cpu(logits, flag_nonfinite)
    if kernel and applies(logits):
        return _argmax(logits, flag_nonfinite)
    index = logits.argmax(dim=-1)
    if flag_nonfinite:
        index = index.masked_fill(~torch.isfinite(logits).all(dim=-1), -1)
    return index
