"""Pure-PyTorch reference of the extension's kv_update, for the tests that check it."""

from __future__ import annotations

import torch


def reference_update(
    k_cache: torch.Tensor,  # [batch, max_seq_len, num_kv_heads, head_dim], written in place
    v_cache: torch.Tensor,  # [batch, max_seq_len, num_kv_heads, head_dim], written in place
    new_k: torch.Tensor,  # [batch, num_tokens, num_kv_heads, head_dim]
    new_v: torch.Tensor,  # [batch, num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # int [batch]; -1 = inactive (skipped)
) -> None:
    """`kv_update` by slice assignment per sequence. Raises ValueError when an active
    sequence's rows would pass max_seq_len."""
    num_tokens = new_k.shape[1]
    max_seq_len = k_cache.shape[1]
    for b, p in enumerate(positions.tolist()):
        if p < 0:
            continue
        if p + num_tokens > max_seq_len:
            raise ValueError(
                f"reference_update: expected positions[{b}] + num_tokens <= {max_seq_len}, "
                f"got {p} + {num_tokens}"
            )
        k_cache[b, p : p + num_tokens] = new_k[b]
        v_cache[b, p : p + num_tokens] = new_v[b]
