"""Causal attention of many sequences' chunks in one call: the paged step's prefill (varlen).

A serving step computes prefill chunks of several requests at once (engine/paged_step.py).
Chunk s has n_s new queries at positions start_s..start_s+n_s-1 of its sequence and attends over
that sequence's keys 0..start_s+n_s-1: query i sees keys 0..start_s+i, a causal mask aligned to
the bottom right of the chunk's [n_s, start_s + n_s] score matrix (top-left when start_s = 0).
The chunks' queries and keys are packed one after the other ("varlen"):

    q [total_q, Hq, D], k / v [total_k, Hkv, D] (Hq a multiple of Hkv: GQA, K/V never repeated)
    cu_q int32 [S + 1]: chunk s's queries are rows cu_q[s]..cu_q[s+1]-1 of q
    cu_k int32 [S + 1]: its keys are rows cu_k[s]..cu_k[s+1]-1 of k and v
    -> out [total_q, Hq, D]

* `varlen_causal_attention`: FlashAttention-2's varlen kernel (torch.ops.aten._flash_attention_
  forward, the kernel behind SDPA's flash backend), whose causal mask is aligned to the bottom
  right: every chunk of the step in one launch per layer, no mask tensor, no per-chunk shapes
  (SDPA's cuDNN backend, preferred on Hopper by recent torch, plans a graph per new shape).
  CUDA only, fp16/bf16, head_dim a multiple of 8 up to 256, compute capability 8.0 or more:
  `flash_varlen_applies`.
* `varlen_causal_reference`: the same definition in plain torch, one SDPA per chunk with an
  explicit mask; any device and dtype (the tests' witness of the packing).

    >>> import torch
    >>> q = torch.randn(5, 2, 8); k = torch.randn(7, 1, 8); v = torch.randn(7, 1, 8)
    >>> cu_q = torch.tensor([0, 3, 5], dtype=torch.int32)  # chunks of 3 and 2 queries
    >>> cu_k = torch.tensor([0, 3, 7], dtype=torch.int32)  # the second after 2 cached keys
    >>> out = varlen_causal_reference(q, k, v, cu_q, cu_k)
    >>> torch.allclose(out[0], v[0].expand(2, 8))  # query 0 sees key 0 alone (both heads)
    True
    >>> out.shape
    torch.Size([5, 2, 8])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["flash_varlen_applies", "varlen_causal_attention", "varlen_causal_reference"]

#: dtypes FlashAttention-2 takes
FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256


def flash_varlen_applies(device: torch.device, dtype: torch.dtype, head_dim: int,
                         num_heads: int, num_kv_heads: int) -> bool:
    """Whether `varlen_causal_attention` runs on this device for these shapes."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if dtype not in FLASH_DTYPES or head_dim % 8 or head_dim > FLASH_MAX_HEAD_DIM:
        return False
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        return False
    if not torch.backends.cuda.is_flash_attention_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def varlen_causal_attention(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor,
                            max_q: int, max_k: int, scale: float | None = None) -> Tensor:
    """FlashAttention-2 varlen, causal (bottom-right per chunk): see the module doc.

    q [total_q, Hq, D], k / v [total_k, Hkv, D] (each last dim contiguous; made contiguous here
    otherwise), cu_q / cu_k int32 [S + 1] on q's device, max_q / max_k the longest chunk's
    queries and keys -> [total_q, Hq, D]."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    q, k, v = (t if t.is_contiguous() else t.contiguous() for t in (q, k, v))
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=scale)[0]
    return out


def varlen_causal_reference(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor,
                            max_q: int | None = None, max_k: int | None = None,
                            scale: float | None = None) -> Tensor:
    """The definition of `varlen_causal_attention` in plain torch: per chunk, SDPA over its
    keys with the bottom-right causal mask (fp32 softmax where SDPA's backend has it)."""
    del max_q, max_k  # the flash kernel's launch sizes: nothing to check here
    hq, hkv = q.shape[1], k.shape[1]
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    outs = []
    for s in range(len(bounds_q) - 1):
        qs = q[bounds_q[s]:bounds_q[s + 1]]  # [n, Hq, D]
        ks, vs = k[bounds_k[s]:bounds_k[s + 1]], v[bounds_k[s]:bounds_k[s + 1]]  # [L, Hkv, D]
        n, length = qs.shape[0], ks.shape[0]
        if n > length:
            raise ValueError(f"varlen chunk {s}: expected at most as many queries as keys, got "
                             f"{n} queries over {length} keys")
        qi = torch.arange(n, device=q.device).unsqueeze(1)
        kj = torch.arange(length, device=q.device).unsqueeze(0)
        allowed = kj <= qi + (length - n)  # [n, L]: query i at position length - n + i
        out = F.scaled_dot_product_attention(
            qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1), attn_mask=allowed,
            scale=scale, enable_gqa=hq != hkv)  # [Hq, n, D]
        outs.append(out.transpose(0, 1))
    return torch.cat(outs) if outs else q.new_empty(q.shape)
