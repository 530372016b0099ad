"""Attention over the paged cache for one scheduler step: the `step` of engine/forward.py.

A step computes the chunks the scheduler planned (engine/scheduler.py) in one forward pass:
their tokens are flattened in plan order, decode rows (one token each) first, then the prefill
chunks, each token at its own RoPE position. In every layer `attend(layer, q, k, v)`:

1. writes the step's K/V with `paged_kv_write` at the flat pool slots the host computed
   (`PagedKVCache.slot_mapping`; slot -1 skips a padding row of a CUDA-graph bucket);
2. attends the decode rows with `paged_decode_attention`: each reads its keys through its
   row of the block table, in place (no gather);
3. attends the prefill chunks, each over its sequence's keys 0..start+n-1, in one of two ways:
   * packed (`PackedPrefill`, CUDA fp16/bf16: engine/forward.py's paged_prefill_varlen):
     every chunk in one FlashAttention varlen call (engine/varlen_attention.py), whose causal
     mask is aligned to each chunk's bottom right, so a chunk after a prefix needs no mask
     tensor. Where every chunk starts at position 0 its keys are the step's own new K/V (no
     read back); otherwise the keys of all chunks are gathered from the pool in one
     index_select per K and V at slots the host computed (a copy of the chunks' sequences'
     K/V, small beside the chunks' products);
   * per segment (the CPU, fp32, or ServingEngine(packed_prefill=False)): a chunk that starts at
     position 0 attends over its own new K/V (SDPA's causal kernel, nothing read back); a
     later chunk (chunked prefill, or a prompt after a prefix-cache hit) gathers the blocks
     holding its keys (index_select on the pool, a copy) and runs SDPA with a causal mask
     offset by its start.

The decode-only fusions of engine/forward.py (rope_kv_update, gemv_add_rms_norm_rope_kv) write
K/V through the contiguous cache's views at positions, so the forward takes its unfused path
through `attend` for this step (RoPE, then the paged write here).

    shapes: q [B, T, Hq, D], k/v [B, T, Hkv, D] with B * T = the step's tokens in plan order
            (eager: B = 1; a CUDA-graph decode step: T = 1, one row per sequence)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from toyllm.engine.cached_attention import _causal, grouped_attention
from toyllm.engine.ops.paged_cache import paged_decode_attention, paged_kv_write
from toyllm.engine.varlen_attention import varlen_causal_attention
from toyllm.models.rope import gather_cos_sin

#: (q, k, v, cu_q, cu_k, max_q, max_k, scale) -> out: how a PackedPrefill attends
VarlenAttention = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, int, int, float], Tensor]


@dataclass
class PrefillSegment:
    """A prefill chunk: tokens offset..offset+n-1 of the step, at positions start..start+n-1."""

    offset: int
    start: int
    num_tokens: int
    blocks: Tensor  # [ceil((start + n) / block_size)] its sequence's blocks, int32 or int64
    allowed: Tensor | None  # bool [1, n, start + n]: token i sees keys 0..start+i (None: start 0)


def prefill_segment(offset: int, start: int, n: int, blocks: Tensor) -> PrefillSegment:
    """A segment with its causal mask (built once per step, shared by every layer)."""
    allowed = None
    if start > 0:
        qi = torch.arange(n, device=blocks.device).unsqueeze(1)
        kj = torch.arange(start + n, device=blocks.device).unsqueeze(0)
        allowed = (kj <= qi + start).unsqueeze(0)
    return PrefillSegment(offset, start, n, blocks, allowed)


@dataclass
class PackedPrefill:
    """Every prefill chunk of a step as one varlen attention (engine/varlen_attention.py): the
    chunks' queries are the step's tokens num_decode.. in plan order."""

    cu_q: Tensor  # int32 [S + 1]: chunk s's queries are rows cu_q[s]..cu_q[s+1]-1
    cu_k: Tensor  # int32 [S + 1]: its keys, rows cu_k[s]..cu_k[s+1]-1 of the packed keys
    max_q: int  # the longest chunk's queries
    max_k: int  # the longest chunk's keys (start + n)
    # int64 [cu_k[S]]: flat pool slot of every chunk's keys 0..start+n-1 in order; None when
    # every chunk starts at 0 (its keys are its own new K/V, cu_k = cu_q)
    key_slots: Tensor | None
    attention: VarlenAttention = varlen_causal_attention


@dataclass
class PagedStep:
    k_pools: list[Tensor]  # per layer [num_blocks, block_size, Hkv, D] (PagedKVCache.key_pool)
    v_pools: list[Tensor]
    slots: Tensor  # int64 [tokens]: flat pool slot of each token of the step (-1: padding)
    num_decode: int  # the first num_decode tokens are decode rows
    decode_tables: Tensor | None  # int32 [num_decode, W]: block-table rows of the decode rows
    decode_lens: Tensor | None  # int32 [num_decode]: keys each decode row attends over (0: pad)
    segments: list[PrefillSegment]  # the prefill chunks, each attended alone (packed: None)
    # models/rope.py's rope_table and the decode rows' positions (int, [num_decode]) for a
    # decode step that gathers RoPE's cos/sin on the device (CUDA graphs); None: the forward
    # computes cos/sin from the positions it is given
    rope_table: Tensor | None = None
    rope_index: Tensor | None = None
    packed: PackedPrefill | None = None  # the prefill chunks in one call instead of `segments`

    def decode_only(self) -> bool:
        """Every token of the step is a decode row: no prefill chunk."""
        return self.decode_tables is not None and not self.segments and self.packed is None

    def rope_cos_sin(self) -> tuple[Tensor, Tensor] | None:
        """cos, sin [rows, 1, 1, D] of a decode step's positions, from rope_table; None
        without one (padding rows carry position -1: clamped to 0)."""
        if self.rope_table is None or self.rope_index is None:
            return None
        last = self.rope_table.shape[0] - 1
        return gather_cos_sin(self.rope_table, self.rope_index.clamp(0, last))

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        hq, d = q.shape[-2], q.shape[-1]
        hkv = k.shape[-2]
        qf = q.reshape(-1, hq, d)  # [tokens, Hq, D]
        kf, vf = k.reshape(-1, hkv, d), v.reshape(-1, hkv, d)  # [tokens, Hkv, D]
        k_pool, v_pool = self.k_pools[layer], self.v_pools[layer]
        paged_kv_write(k_pool, v_pool, kf, vf, self.slots)
        outs = []
        nd = self.num_decode
        if nd:
            outs.append(paged_decode_attention(qf[:nd].contiguous(), k_pool, v_pool,
                                               self.decode_tables, self.decode_lens, d ** -0.5))
        if self.packed is not None:
            outs.append(self._attend_packed(layer, qf, kf, vf))
        for seg in self.segments:
            mine = slice(seg.offset, seg.offset + seg.num_tokens)
            qs = qf[mine].unsqueeze(0)  # [1, n, Hq, D]
            if seg.start == 0:  # its keys are its own, just computed: no gather
                out = _causal(qs, kf[mine].unsqueeze(0), vf[mine].unsqueeze(0))
            else:
                length = seg.start + seg.num_tokens
                # [blocks, block_size, Hkv, D] -> keys 0..length-1 [1, length, Hkv, D] (a copy)
                keys = k_pool.index_select(0, seg.blocks).flatten(0, 1)[:length].unsqueeze(0)
                values = v_pool.index_select(0, seg.blocks).flatten(0, 1)[:length].unsqueeze(0)
                out = grouped_attention(qs, keys, values, seg.allowed)
            outs.append(out[0])
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.view(q.shape)

    def _attend_packed(self, layer: int, qf: Tensor, kf: Tensor, vf: Tensor) -> Tensor:
        """The prefill chunks' outputs [total_q, Hq, D] in one varlen call; qf [tokens, Hq, D],
        kf / vf [tokens, Hkv, D] the step's (already in the pool)."""
        p = self.packed
        assert p is not None
        nd = self.num_decode
        if p.key_slots is None:  # every chunk starts at 0: its keys are its new K/V
            keys, values = kf[nd:], vf[nd:]
        else:  # [blocks, block_size, Hkv, D] -> slots -> [total_k, Hkv, D] (a copy)
            keys = self.k_pools[layer].flatten(0, 1).index_select(0, p.key_slots)
            values = self.v_pools[layer].flatten(0, 1).index_select(0, p.key_slots)
        return p.attention(qf[nd:], keys, values, p.cu_q, p.cu_k, p.max_q, p.max_k,
                           qf.shape[-1] ** -0.5)
