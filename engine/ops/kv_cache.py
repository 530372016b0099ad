"""The KV cache: Python face of the C++/CUDA extension `toyllm.engine.ops._C`.

`KVCache` keeps every layer's keys and values in one zero-initialised allocation
``[num_layers, 2, batch_size, max_seq_len, num_kv_heads, head_dim]`` and tracks a position per
sequence. ``update`` writes new rows at the current positions (without advancing);
``advance_position`` moves them. The write itself is the operator ``torch.ops.toyllm.kv_update``
(CPU and CUDA kernels; its fake is in engine/ops/fakes.py), which reads positions from a device
tensor so that a decode step can be captured in a CUDA graph.
``decode_attention`` (``torch.ops.toyllm.decode_attention``) attends one new query token per
sequence over its cached keys (flash-decoding kernel on CUDA, a C++ loop on the CPU).

Example::

    >>> import torch
    >>> from toyllm.engine.ops.kv_cache import KVCache
    >>> cache = KVCache(num_layers=2, max_seq_len=8, num_kv_heads=2, head_dim=4,
    ...                 dtype=torch.float32, device="cpu")
    >>> prompt_k = torch.randn(1, 3, 2, 4)  # [batch, num_tokens, num_kv_heads, head_dim]
    >>> prompt_v = torch.randn(1, 3, 2, 4)
    >>> cache.update(0, prompt_k, prompt_v)  # writes rows 0..2 of layer 0
    >>> cache.advance_position(3)
    >>> cache.position(), cache.remaining_capacity()
    (3, 5)
    >>> torch.equal(cache.keys(0)[:, :3], prompt_k)
    True
    >>> cache.advance_position(6)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    toyllm.engine.ops._C.KVCacheOverflowError: KV cache overflow: cannot advance position 3 ...
"""

from __future__ import annotations

import torch

from toyllm.engine.ops import _C, WITH_CUDA

KVCache = _C.KVCache
KVCacheOverflowError = _C.KVCacheOverflowError
# Programmatic dependent launch of the extension's CUDA kernels (csrc/common/programmatic_launch):
# on by default on Hopper; an Engine sets it from its Settings.programmatic_launch.
set_programmatic_launch = _C.set_programmatic_launch

__all__ = [
    "KVCache",
    "KVCacheOverflowError",
    "WITH_CUDA",
    "decode_attention",
    "kv_update",
    "set_programmatic_launch",
]


def kv_update(
    k_cache: torch.Tensor,  # [batch, max_seq_len, num_kv_heads, head_dim], written in place
    v_cache: torch.Tensor,  # [batch, max_seq_len, num_kv_heads, head_dim], written in place
    new_k: torch.Tensor,  # [batch, num_tokens, num_kv_heads, head_dim]
    new_v: torch.Tensor,  # [batch, num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # int32 [batch] on the caches' device; -1 = inactive (skipped)
) -> None:
    """Write ``new_k[b, t]`` to ``k_cache[b, positions[b] + t]`` (and V likewise) for all t.

    Sequences with a negative position are skipped. All tensors contiguous, same dtype and
    device. On the CPU a position whose rows would pass max_seq_len raises ValueError; on CUDA
    (where positions cannot be read without a sync) such a sequence is skipped whole.

    >>> k_cache = torch.zeros(2, 4, 1, 2); v_cache = torch.zeros(2, 4, 1, 2)
    >>> new = torch.ones(2, 1, 1, 2)
    >>> kv_update(k_cache, v_cache, new, new, torch.tensor([3, -1], dtype=torch.int32))
    >>> k_cache[:, :, 0, 0].tolist()
    [[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
    """
    torch.ops.toyllm.kv_update(k_cache, v_cache, new_k, new_v, positions)


def decode_attention(
    q: torch.Tensor,  # [batch, num_q_heads, head_dim]
    k_cache: torch.Tensor,  # [batch, max_seq_len, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [batch, max_seq_len, num_kv_heads, head_dim]
    seq_lens: torch.Tensor,  # int32 [batch] on q's device: valid keys per sequence
    scale: float | None = None,  # default head_dim ** -0.5
    *,
    tile: int = 0,  # CUDA: keys per tile, 0 = FlashAttention-2's choice (64 or 128)
    reverse: bool = True,  # CUDA: tiles walked last to first, as FlashAttention-2 does
    tensor_cores: bool = True,  # CUDA: pass 1 on tensor cores where it applies
) -> torch.Tensor:  # [batch, num_q_heads, head_dim], q's dtype
    """Attention of one query token per sequence over its first ``seq_lens[b]`` cached keys.

    Query head h uses KV head ``h // (num_q_heads // num_kv_heads)`` (GQA; MQA with one KV
    head). Softmax and accumulation in fp32; a sequence with ``seq_lens[b] == 0`` gets zeros.
    On the CPU, ``seq_lens`` outside [0, max_seq_len] raise ValueError; on CUDA they are
    clamped (checking would need a host sync).

    >>> q = torch.ones(1, 2, 4)
    >>> k = torch.zeros(1, 3, 1, 4); v = torch.arange(12.0).view(1, 3, 1, 4)
    >>> decode_attention(q, k, v, torch.tensor([2], dtype=torch.int32))[0, 0].tolist()
    [2.0, 3.0, 4.0, 5.0]
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if (tile, reverse, tensor_cores) == (0, True, True):
        return torch.ops.toyllm.decode_attention(q, k_cache, v_cache, seq_lens, float(scale))
    return torch.ops.toyllm.decode_attention(q, k_cache, v_cache, seq_lens, float(scale), tile,
                                             reverse, tensor_cores)
