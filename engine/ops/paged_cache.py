"""The paged KV cache: Python face of the C++/CUDA extension `toyllm.engine.ops._C`.

`PagedKVCache` keeps every layer's keys and values in fixed-size blocks of one zero-initialised
allocation ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``, hands blocks out
through a ref-counted allocator, and tracks sequences (slots ``0 .. max_seqs - 1``) that each
hold a list of blocks and a length. Position ``p`` of a sequence lives at flat pool slot
``blocks[p // block_size] * block_size + p % block_size``. Sequences share blocks (``fork``,
``append_block`` for a cached prefix), and ``copy_on_write`` gives a sequence its own copy of a
shared block before it writes there. ``block_tables()`` / ``sequence_lengths()`` are int32
mirrors on the cache's device that ``sync_device()`` refreshes in place, so a captured CUDA
graph reads the current tables. Every call checks its arguments (in C++) before it changes
anything; a full pool raises `PagedCacheFullError`.

The operators: ``paged_kv_write`` (``torch.ops.toyllm.paged_kv_write``) writes new K/V rows at
their slots, ``paged_decode_attention`` (``torch.ops.toyllm.paged_decode_attention``) attends
one query token per sequence over its blocks, read in place through the block table.

Example::

    >>> import torch
    >>> from toyllm.engine.ops.paged_cache import (
    ...     PagedKVCache, PagedCacheFullError, paged_kv_write, paged_decode_attention)
    >>> cache = PagedKVCache(num_layers=1, num_blocks=4, block_size=2, num_kv_heads=1,
    ...                      head_dim=4, dtype=torch.float32, device="cpu", max_seqs=2,
    ...                      max_blocks_per_seq=3)
    >>> seq = cache.add_sequence()
    >>> cache.reserve(seq, 3)  # room for 3 tokens: two blocks of 2
    >>> cache.sequence_blocks(seq), cache.num_free_blocks()
    ([0, 1], 2)
    >>> k = torch.randn(3, 1, 4); v = torch.randn(3, 1, 4)  # [tokens, kv_heads, head_dim]
    >>> slots = torch.tensor(cache.slot_mapping(seq, 0, 3))
    >>> paged_kv_write(cache.key_pool(0), cache.value_pool(0), k, v, slots)
    >>> cache.advance(seq, 3)
    >>> cache.sync_device()
    >>> q = torch.randn(1, 2, 4)  # [batch, q_heads, head_dim]: GQA, 2 query heads per KV head
    >>> out = paged_decode_attention(q, cache.key_pool(0), cache.value_pool(0),
    ...                              cache.block_tables()[seq:seq + 1],
    ...                              cache.sequence_lengths()[seq:seq + 1])
    >>> want = torch.softmax(q[0] @ k[:, 0].T / 2.0, dim=-1) @ v[:, 0]
    >>> torch.allclose(out[0], want, atol=1e-6)
    True
    >>> child = cache.fork(seq)  # shares both blocks
    >>> cache.ref_count(1), cache.copy_on_write(child), cache.ref_count(1)
    (2, True, 1)
    >>> cache.reserve(child, 10)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    toyllm.engine.ops._C.PagedCacheFullError: paged KV cache full: cannot reserve n=10 tokens ...
"""

from __future__ import annotations

import torch

from toyllm.engine.ops import _C

PagedKVCache = _C.PagedKVCache
PagedCacheFullError = _C.PagedCacheFullError

__all__ = [
    "PagedCacheFullError",
    "PagedKVCache",
    "paged_decode_attention",
    "paged_kv_write",
]


def paged_kv_write(
    k_pool: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], written in place
    v_pool: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], written in place
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], each token's row contiguous
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], each token's row contiguous
    slots: torch.Tensor,  # int64 [num_tokens] on the pools' device: flat slot per token
) -> None:
    """Write ``k[t]`` / ``v[t]`` to flat slot ``slots[t]`` of the pools (block
    ``slots[t] // block_size``, offset ``slots[t] % block_size``); ``slots[t] < 0`` skips a
    padding token. On the CPU a slot past the pool raises ValueError before anything is
    written; on CUDA (where slots cannot be read without a sync) such a token is skipped.

    >>> k_pool = torch.zeros(2, 2, 1, 1); v_pool = torch.zeros(2, 2, 1, 1)
    >>> new = torch.tensor([1.0, 2.0]).view(2, 1, 1)
    >>> paged_kv_write(k_pool, v_pool, new, new, torch.tensor([3, -1]))
    >>> k_pool.flatten().tolist()
    [0.0, 0.0, 0.0, 1.0]
    """
    torch.ops.toyllm.paged_kv_write(k_pool, v_pool, k, v, slots)


def paged_decode_attention(
    q: torch.Tensor,  # [batch, num_q_heads, head_dim]
    k_pool: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_pool: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # int32 [batch, max_blocks] on q's device, -1 = no block
    seq_lens: torch.Tensor,  # int32 [batch] on q's device: keys each row attends over
    scale: float | None = None,  # default head_dim ** -0.5
    *,
    tile: int = 0,  # CUDA: keys per tile, 0 = FlashAttention-2's choice (64 or 128)
    reverse: bool = True,  # CUDA: tiles walked last to first, as FlashAttention-2 does
    tensor_cores: bool = True,  # CUDA: pass 1 on tensor cores where it applies
) -> torch.Tensor:  # [batch, num_q_heads, head_dim], q's dtype
    """Attention of one query token per row over its first ``seq_lens[b]`` keys, key ``j`` read
    in place from block ``block_tables[b, j // block_size]`` at offset ``j % block_size``.

    Query head h uses KV head ``h // (num_q_heads // num_kv_heads)`` (GQA). Softmax and
    accumulation in fp32; a row with ``seq_lens[b] == 0`` gets zeros. The numbers are
    decode_attention's on the same keys (on CUDA the same kernels, tiles and rounding). On the
    CPU a length past the row's table or a table entry outside the pool (for a key the length
    covers) raises ValueError; on CUDA lengths are clamped to the table and such an entry reads
    as zeros (checking would need a host sync).

    >>> k_pool = torch.zeros(4, 2, 1, 4); v_pool = torch.arange(32.0).view(4, 2, 1, 4)
    >>> table = torch.tensor([[3, 1]], dtype=torch.int32)  # keys 0, 1 in block 3; key 2 in 1
    >>> out = paged_decode_attention(torch.ones(1, 1, 4), k_pool, v_pool, table,
    ...                              torch.tensor([3], dtype=torch.int32))
    >>> out[0, 0].tolist()  # equal scores: the mean of slots 6, 7 and 2
    [20.0, 21.0, 22.0, 23.0]
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if (tile, reverse, tensor_cores) == (0, True, True):
        return torch.ops.toyllm.paged_decode_attention(
            q, k_pool, v_pool, block_tables, seq_lens, float(scale)
        )
    return torch.ops.toyllm.paged_decode_attention(
        q, k_pool, v_pool, block_tables, seq_lens, float(scale), tile, reverse, tensor_cores
    )
