"""A decode step's RoPE on q and k and its K/V write, one operator: ``toyllm::rope_kv_update``.

With fused q/k/v weights a decode step used to run, per layer: RoPE over the q and k heads of
the projection (``toyllm::rope``), ``toyllm::kv_update``, and the copies that make k and v
(and q at batch > 1) contiguous: 2 to 5 kernels. The operator takes the projection before RoPE,
``qkv [rows, 1, Hq + 2 * Hkv, D]``, whole; it returns the rotated q as a new contiguous
``[rows, 1, Hq, D]`` tensor and writes the rotated k and the v heads as they are into the cache
at each row's device position (rows at -1, finished, are skipped). On CUDA that is one kernel
(csrc/rope_kv_update.cu) that rotates with toyllm::rope's own device code; on the CPU it is the
old path's composition (toyllm::rope's CPU code, then kv_update's copy). Either way the bits are
those of the path it replaces.

The engine takes it (Settings.fusion ROPE_KV and above) where `applies` says so: a CPU tensor,
or a CUDA tensor with the extension built with CUDA; fp32, fp16 or bf16; nothing recording
autograd.

Example::

    >>> import torch
    >>> from toyllm.engine.ops.rope_kv import rope_kv_update
    >>> k_cache = torch.zeros(2, 4, 1, 2); v_cache = torch.zeros(2, 4, 1, 2)  # 1 KV head
    >>> qkv = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]).expand(2, 1, 3, 2)  # q, k, v
    >>> cos, sin = torch.zeros(2, 1, 1, 2), torch.ones(2, 1, 1, 2)  # a quarter turn
    >>> positions = torch.tensor([1, -1], dtype=torch.int32)  # row 1 has finished
    >>> q = rope_kv_update(qkv, cos, sin, k_cache, v_cache, positions, num_q_heads=1)
    >>> q[:, 0, 0].tolist()  # (x1, x2) -> (-x2, x1)
    [[-2.0, 1.0], [-2.0, 1.0]]
    >>> k_cache[0, 1, 0].tolist(), v_cache[0, 1, 0].tolist(), bool(k_cache[1].any())
    ([-4.0, 3.0], [5.0, 6.0], False)
"""

from __future__ import annotations

import torch
from torch import Tensor

from toyllm.engine.ops import DTYPES, WITH_CUDA, no_autograd

__all__ = ["applies", "rope_kv_update"]


def applies(qkv: Tensor, k_cache: Tensor) -> bool:
    """The operator can take this projection qkv [rows, 1, Hq + 2 * Hkv, D] for this cache:
    a supported dtype and device, nothing recording autograd."""
    if qkv.dtype not in DTYPES or qkv.dtype != k_cache.dtype:
        return False
    if qkv.device.type == "cuda":
        if not WITH_CUDA:
            return False
    elif qkv.device.type != "cpu":
        return False
    return no_autograd(qkv)


def rope_kv_update(
    qkv: Tensor,  # [rows, 1, Hq + 2 * Hkv, D]: q, k, v heads side by side, before RoPE
    cos: Tensor,  # [rows, 1, 1, D]
    sin: Tensor,  # [rows, 1, 1, D]
    k_cache: Tensor,  # [rows, max_seq_len, Hkv, D], written in place
    v_cache: Tensor,  # [rows, max_seq_len, Hkv, D], written in place
    positions: Tensor,  # int32 [rows] on the caches' device; -1 = finished (skipped)
    num_q_heads: int,
) -> Tensor:  # [rows, 1, Hq, D], contiguous
    """Rotated q; rotated k and raw v written to ``k_cache / v_cache[r, positions[r]]``.

    The bits of ``toyllm::rope`` over the q and k heads followed by ``kv_update``. On the CPU
    a position past the cache's end raises ValueError; on CUDA (where positions cannot be read
    without a sync) that row's write is skipped.
    """
    return torch.ops.toyllm.rope_kv_update(qkv, cos, sin, k_cache, v_cache, positions,
                                           num_q_heads)
