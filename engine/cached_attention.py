"""Attention through the extension's KV cache: the `AttentionCache` the model calls per layer.

Two kinds of step, each an `AttentionCache` (models/llama.py) for one forward pass:

* `PrefillStep`: one sequence (row `seq`, new tokens at positions p..p+n-1), or rows that all
  start at the same position; K/V are written with `KVCache.update` and the queries attend
  causally over the cache's keys 0..p+n-1, read in place (a view, never a copy);
* `DecodeStep`: one new token per row, each row at its own position; K/V are written by the
  extension op at the device positions, and each row attends over exactly its own keys. With
  fused q/k/v weights the layer hands it the projection before RoPE (`attend_qkv`): RoPE on q
  and k and the K/V write are then one op (engine/rope_kv_update.py).

Nothing here advances positions: the engine does that only after the whole step succeeded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from toyllm.engine.ops.gemv_norm import add_rms_norm_rope_kv
from toyllm.engine.ops.gemv_norm import rope_kv_applies as norm_rope_kv_applies
from toyllm.engine.ops.kv_cache import KVCache, kv_update
from toyllm.engine.ops.rope_kv import applies as rope_kv_applies
from toyllm.engine.ops.rope_kv import rope_kv_update
from toyllm.models.rope import gather_cos_sin

# Rows up to which decode attention takes the extension's kernel rather than SDPA with a length
# mask, when its pass 1 runs on CUDA cores: above, it lost to SDPA (bench_decode_attention.py,
# NVIDIA H200, 2026-11-27: 88 vs 72 us at 16 x 4096 keys), bound by the instructions per key.
# On tensor cores (fp16/bf16 with head_dim 64 or 128) the kernel is taken at every batch size.
# TOYLLM_DECODE_KERNEL_MAX_ROWS overrides both (to compare against SDPA).
DECODE_KERNEL_MAX_ROWS = 8
TENSOR_CORE_DTYPES = (torch.float16, torch.bfloat16)
TENSOR_CORE_HEAD_DIMS = (64, 128)
_MAX_ROWS_OVERRIDE = os.environ.get("TOYLLM_DECODE_KERNEL_MAX_ROWS")
if _MAX_ROWS_OVERRIDE is not None and not _MAX_ROWS_OVERRIDE.strip().isdigit():
    raise ValueError("expected TOYLLM_DECODE_KERNEL_MAX_ROWS to be a whole number of rows, got "
                     f"'{_MAX_ROWS_OVERRIDE}'")


# On the CPU the operator's fp32 implementation is a plain C++ loop: for a small model's decode
# step (stories15M shape, 2026-11-27) a few us per layer where the masked SDPA path below costs
# ~15 small ops (~100 us). TOYLLM_CPU_DECODE_ATTENTION=0 keeps SDPA (to compare).
CPU_DECODE_KERNEL = os.environ.get("TOYLLM_CPU_DECODE_ATTENTION", "1") != "0"


def decode_kernel_max_rows(dtype: torch.dtype | None, head_dim: int | None) -> int | None:
    """Rows up to which the CUDA decode-attention kernel is the faster path; None: any."""
    if _MAX_ROWS_OVERRIDE is not None:
        return int(_MAX_ROWS_OVERRIDE)
    if dtype in TENSOR_CORE_DTYPES and head_dim in TENSOR_CORE_HEAD_DIMS:
        return None
    return DECODE_KERNEL_MAX_ROWS


def has_decode_attention(device: torch.device, rows: int = 1,
                         dtype: torch.dtype | None = None, head_dim: int | None = None) -> bool:
    """True when the extension's decode-attention operator is the faster path for `rows`
    sequences on `device`: the CUDA kernel (up to decode_kernel_max_rows), or on the CPU its
    fp32 loop (`dtype` float32; for other dtypes SDPA over in-place views is the faster path
    there)."""
    if not hasattr(torch.ops.toyllm, "decode_attention"):
        return False
    if device.type == "cpu":
        return CPU_DECODE_KERNEL and dtype == torch.float32 and rows <= DECODE_KERNEL_MAX_ROWS
    if device.type != "cuda":
        return False
    most = decode_kernel_max_rows(dtype, head_dim)
    return most is None or rows <= most


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
    step can be traced by torch.compile and captured in a CUDA graph. K/V are written by the
    extension op at the device positions (rows at -1, finished, are skipped): kv_update
    (`attend`), or with RoPE in the same op (`attend_qkv`, the layers' path with fused q/k/v
    weights); each row then attends over exactly its keys 0..p_b: through the decode-attention
    kernel when it is built, otherwise SDPA with a per-row length mask over the first `span`
    positions.
    """

    k_caches: list[Tensor]  # per layer: [rows, max_seq_len, Hkv, D] views of the cache
    v_caches: list[Tensor]
    positions: Tensor  # int32 [rows]: where this step's token goes; -1 = finished row
    use_kernel: bool = True
    span: int | None = None  # keys read per row by SDPA (None: all max_seq_len)
    # models/rope.py's rope_table for positions 0..max_seq_len-1 (None: the model computes
    # cos/sin from rope_positions itself)
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
        return self._attend_cached(layer, q)

    def attend_qkv(self, layer: int, qkv: Tensor, cos: Tensor, sin: Tensor,
                   num_q_heads: int) -> Tensor | None:
        """`attend` from the fused projection before RoPE, qkv [rows, 1, Hq + 2 Hkv, D] (q, k,
        v heads side by side; cos/sin [rows, 1, 1, D]): RoPE on q and k and the K/V write are
        one op, toyllm::rope_kv_update, with the bits of RoPE then `attend`. None where that op
        does not apply (TOYLLM_FUSED_ROPE_KV=0, an unsupported dtype, autograd): the layer then
        rotates q and k itself and calls `attend`."""
        k_cache, v_cache = self.k_caches[layer], self.v_caches[layer]
        if not rope_kv_applies(qkv, k_cache):
            return None
        q = rope_kv_update(qkv, cos, sin, k_cache, v_cache, self.positions, num_q_heads)
        return self._attend_cached(layer, q)

    def attend_norm_qkv(
        self, layer: int, x: Tensor, residual: Tensor, norm_weight: Tensor, eps: float,
        qkv_weight: Tensor, cos: Tensor, sin: Tensor, num_q_heads: int,
    ) -> tuple[Tensor, Tensor] | None:
        """The layer's residual add, input norm, q/k/v product and `attend_qkv` in one go:
        (x + residual, attention output [rows, 1, Hq, D]), with the add, the norm, the product,
        RoPE and the K/V write in one kernel (toyllm::gemv_add_rms_norm_rope_kv, the bits of
        those ops one by one). None where that kernel does not apply (more than one row, the
        CPU, TOYLLM_FUSED_NORM_ROPE=0, ...): the layer then runs them itself."""
        k_cache, v_cache = self.k_caches[layer], self.v_caches[layer]
        if not norm_rope_kv_applies(x, residual, norm_weight, qkv_weight, cos, k_cache):
            return None
        s, q = add_rms_norm_rope_kv(x, residual, norm_weight, eps, qkv_weight, cos, sin,
                                    k_cache, v_cache, self.positions, num_q_heads)
        return s, self._attend_cached(layer, q)

    def _attend_cached(self, layer: int, q: Tensor) -> Tensor:
        """q [rows, 1, Hq, D] over each row's keys 0..p_b, already in the cache."""
        k_cache, v_cache = self.k_caches[layer], self.v_caches[layer]
        rows = q.shape[0]
        if self._seq_lens is None:
            self._seq_lens = (self.positions.clamp(min=0) + 1).to(torch.int32)  # keys 0..p_b
        if self.use_kernel and has_decode_attention(q.device, rows, q.dtype, q.shape[-1]):
            out = torch.ops.toyllm.decode_attention(
                q.reshape(rows, q.shape[2], q.shape[3]).contiguous(), k_cache, v_cache,
                self._seq_lens, q.shape[-1] ** -0.5,
            )
            return out.view_as(q)
        span = self.span or k_cache.shape[1]
        if self._allowed is None:
            kj = torch.arange(span, device=q.device)
            self._allowed = (kj.unsqueeze(0) < self._seq_lens.unsqueeze(1)).unsqueeze(1)
        # [rows, 1, span] mask: row b sees its own keys only
        return grouped_attention(q, k_cache[:, :span], v_cache[:, :span], self._allowed)
