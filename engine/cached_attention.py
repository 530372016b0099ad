"""Attention through the extension's KV cache: the `AttentionCache` the model calls per layer.

A `CacheStep` describes one forward pass over the cache:

* prefill of one sequence (row `seq`, new tokens at positions p..p+n-1): the layer's K/V are
  written with `KVCache.update(..., seq=row)` and the queries attend causally over the
  cache rows 0..p+n-1 of that sequence, read in place (a view, never a copy);
* prefill of rows that all start at the same position (teacher forcing, equal prompts);
* decode of a batch (one new token per active row, each row at its own position): K/V are
  written by the extension op at the device positions, and each row attends over exactly its
  own 0..p_b keys, through the extension's decode-attention op when it is built, otherwise
  through SDPA with a per-row length mask over the smallest slice that holds every row.

Nothing here advances positions: the engine does that only after the whole step succeeded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.kv_cache import KVCache, kv_update


def has_decode_attention(device: torch.device) -> bool:
    """True when the extension was built with its CUDA decode-attention kernel and `device`
    is a GPU (on the CPU, SDPA over in-place views is already the fast path)."""
    return device.type == "cuda" and hasattr(torch.ops.toyllm, "decode_attention")


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None) -> Tensor:
    """Grouped-query attention without repeating K/V.

    q: [B, n, Hq, D]; k, v: [B, L, Hkv, D] (may be strided views of the cache);
    allowed: bool [B, n, L] (True where query i may see key j), or None for "all".
    Returns [B, n, Hq, D]. The query heads of a group are folded into the query axis, so
    each K/V head is read once for its whole group.
    """
    b, n, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    # [B, n, Hkv, g, D] -> [B, Hkv, g*n, D]   (row r = gi * n + i is query token i)
    qg = q.view(b, n, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, g * n, d)
    mask = None
    if allowed is not None:
        mask = allowed.unsqueeze(1).unsqueeze(2).expand(b, 1, g, n, allowed.shape[-1])
        mask = mask.reshape(b, 1, g * n, allowed.shape[-1])
    out = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    # [B, Hkv, g*n, D] -> [B, n, Hq, D]
    return out.view(b, hkv, g, n, d).permute(0, 3, 1, 2, 4).reshape(b, n, hq, d)


@dataclass
class CacheStep:
    """One forward pass's view of the cache. Build with `prefill(...)` or `decode(...)`."""

    cache: KVCache
    kind: str  # "prefill" | "decode"
    start: int = 0  # prefill: position of the first new token (same for all rows written)
    seq: int | None = None  # prefill: the one row written, or None for rows [0, rows)
    rows: int = 1  # decode: rows [0, rows) of the cache take part
    use_kernel: bool = True  # decode: use the decode-attention op when it is built
    span: int | None = None  # decode: keys read per row for SDPA (None: max position + 1)

    @classmethod
    def prefill(cls, cache: KVCache, start: int, seq: int | None = None) -> CacheStep:
        return cls(cache, "prefill", start=start, seq=seq)

    @classmethod
    def decode(cls, cache: KVCache, rows: int, use_kernel: bool = True,
               span: int | None = None) -> CacheStep:
        return cls(cache, "decode", rows=rows, use_kernel=use_kernel, span=span)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.kind == "prefill":
            return self._prefill(layer, q, k, v)
        return self._decode(layer, q, k, v)

    # prefill ------------------------------------------------------------------------------
    def _prefill(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        n = q.shape[1]
        p = self.start
        if self.seq is None:
            self.cache.update(layer, k.contiguous(), v.contiguous())
            rows = slice(0, q.shape[0])
        else:
            self.cache.update(layer, k.contiguous(), v.contiguous(), seq=self.seq)
            rows = slice(self.seq, self.seq + 1)
        keys = self.cache.keys(layer)[rows, : p + n]  # [b, p+n, Hkv, D], in place
        values = self.cache.values(layer)[rows, : p + n]
        # query i (at position p+i) sees keys 0..p+i
        qi = torch.arange(n, device=q.device).unsqueeze(1)
        kj = torch.arange(p + n, device=q.device).unsqueeze(0)
        allowed = (kj <= qi + p).unsqueeze(0).expand(q.shape[0], n, p + n)
        return grouped_attention(q, keys, values, allowed)

    # decode -------------------------------------------------------------------------------
    def _decode(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        b = self.rows
        positions = self.cache.device_positions()[:b]  # int32 [b], -1 for finished rows
        k_cache = self.cache.keys(layer)[:b]  # [b, S, Hkv, D]
        v_cache = self.cache.values(layer)[:b]
        kv_update(k_cache, v_cache, k.contiguous(), v.contiguous(), positions)
        seq_lens = positions.clamp(min=0) + 1  # each row sees keys 0..p_b
        if self.use_kernel and has_decode_attention(q.device):
            scale = q.shape[-1] ** -0.5
            out = torch.ops.toyllm.decode_attention(
                q.reshape(b, q.shape[2], q.shape[3]).contiguous(), k_cache, v_cache,
                seq_lens.to(torch.int32), scale,
            )
            return out.view_as(q)
        span = self.span or k_cache.shape[1]
        kj = torch.arange(span, device=q.device)
        allowed = (kj.unsqueeze(0) < seq_lens.unsqueeze(1)).unsqueeze(1)  # [b, 1, span]
        return grouped_attention(q, k_cache[:, :span], v_cache[:, :span], allowed)
