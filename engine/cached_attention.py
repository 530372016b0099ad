"""Attention through the extension's KV cache: the steps a forward pass attends through.

Two kinds of step, each with `attend(layer, q, k, v)` (the `models.llama.Attend` seam) for one
forward pass:

* `PrefillStep`: one sequence (row `seq`, new tokens at positions p..p+n-1), or rows that all
  start at the same position; K/V are written with `KVCache.update` and the queries attend
  causally over the cache's keys 0..p+n-1, read in place (a view, never a copy);
* `DecodeStep`: one new token per row, each row at its own position; K/V are written by the
  extension op at the device positions, and each row attends over exactly its own keys
  (`attend_cached`, also for K/V that a fused op wrote: engine/forward.py).

Nothing here advances positions: the engine does that only after the whole step succeeded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from toyllm.engine.ops.kv_cache import KVCache, decode_attention, kv_update
from toyllm.models.rope import gather_cos_sin


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
class PrefillStep:
    """Prefill through the cache: rows [0, batch) or the one row `seq`, new tokens at
    positions start..start+n-1. K/V go in with `KVCache.update` (bounds checked on the host
    before anything is written); queries attend causally over the row's keys 0..start+n-1,
    read in place from the cache."""

    cache: KVCache
    start: int
    seq: int | None = None

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        n, p = q.shape[1], self.start
        if self.seq is None:
            self.cache.update(layer, k.contiguous(), v.contiguous())
            rows = slice(0, q.shape[0])
        else:
            self.cache.update(layer, k.contiguous(), v.contiguous(), seq=self.seq)
            rows = slice(self.seq, self.seq + 1)
        keys = self.cache.keys(layer)[rows, : p + n]  # [b, p+n, Hkv, D], a view
        values = self.cache.values(layer)[rows, : p + n]
        if p == 0:
            return _causal(q, keys, values)
        # query i (at position p+i) sees keys 0..p+i
        qi = torch.arange(n, device=q.device).unsqueeze(1)
        kj = torch.arange(p + n, device=q.device).unsqueeze(0)
        allowed = (kj <= qi + p).unsqueeze(0).expand(q.shape[0], n, p + n)
        return grouped_attention(q, keys, values, allowed)


def _causal(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of n queries over the same n keys (a prefill from position 0),
    through SDPA's fused causal kernels; K/V heads are shared by their query group."""
    b, n, hq, d = q.shape
    hkv = k.shape[2]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
        enable_gqa=hq != hkv,
    )
    return out.transpose(1, 2)


@dataclass
class DecodeStep:
    """One new token for each of `rows` sequences, each at its own position.

    Holds only tensors (the per-layer cache views and the device positions), so the whole
    step can be captured in a CUDA graph. K/V are written by the extension op at the device
    positions (rows at -1, finished, are skipped): kv_update (`attend`), or a fused op of
    engine/forward.py; each row then attends over exactly its keys 0..p_b (`attend_cached`):
    through toyllm::decode_attention where `use_kernel` (engine/forward.py chooses), otherwise
    SDPA with a per-row length mask over the first `span` positions.
    """

    k_caches: list[Tensor]  # per layer: [rows, max_seq_len, Hkv, D] views of the cache
    v_caches: list[Tensor]
    positions: Tensor  # int32 [rows]: where this step's token goes; -1 = finished row
    use_kernel: bool = True
    span: int | None = None  # keys read per row by SDPA (None: all max_seq_len)
    # models/rope.py's rope_table for positions 0..max_seq_len-1 (None: the engine's forward
    # computes cos/sin from rope_positions itself)
    rope_table: Tensor | None = None
    # per step, not per layer: row b's key lengths and SDPA mask, made on first use
    _seq_lens: Tensor | None = field(default=None, init=False, repr=False)
    _allowed: Tensor | None = field(default=None, init=False, repr=False)

    def rope_positions(self) -> Tensor:
        """int64 [rows, 1] RoPE positions of this step's tokens (0 for finished rows)."""
        return self.positions.clamp(min=0).long().unsqueeze(1)

    def rope_cos_sin(self) -> tuple[Tensor, Tensor] | None:
        """cos, sin [rows, 1, 1, D] of the rope_positions, gathered from rope_table (two
        kernels: the clamp and the gather); None without a table."""
        if self.rope_table is None:
            return None
        last = self.rope_table.shape[0] - 1
        return gather_cos_sin(self.rope_table, self.positions.clamp(0, last))

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k_cache, v_cache = self.k_caches[layer], self.v_caches[layer]
        kv_update(k_cache, v_cache, k.contiguous(), v.contiguous(), self.positions)
        return self.attend_cached(layer, q)

    def attend_cached(self, layer: int, q: Tensor) -> Tensor:
        """q [rows, 1, Hq, D] over each row's keys 0..p_b, already in the cache."""
        k_cache, v_cache = self.k_caches[layer], self.v_caches[layer]
        rows = q.shape[0]
        if self._seq_lens is None:
            self._seq_lens = (self.positions.clamp(min=0) + 1).to(torch.int32)  # keys 0..p_b
        if self.use_kernel:
            out = decode_attention(q.reshape(rows, q.shape[2], q.shape[3]).contiguous(), k_cache,
                                   v_cache, self._seq_lens, q.shape[-1] ** -0.5)
            return out.view_as(q)
        span = self.span or k_cache.shape[1]
        if self._allowed is None:
            kj = torch.arange(span, device=q.device)
            self._allowed = (kj.unsqueeze(0) < self._seq_lens.unsqueeze(1)).unsqueeze(1)
        # [rows, 1, span] mask: row b sees its own keys only
        return grouped_attention(q, k_cache[:, :span], v_cache[:, :span], self._allowed)
