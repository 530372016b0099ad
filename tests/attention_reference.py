"""The float64 witness of decode attention and the row check that the contiguous and the paged
decode-attention tests (test_decode_attention.py, test_paged_decode_attention.py) both hold
their outputs to."""

from __future__ import annotations

import torch

# Largest relative error of an output row, ||out - ref|| / ||ref||, per dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def reference_attention(
    q: torch.Tensor,  # [batch, num_q_heads, head_dim]
    k_cache: torch.Tensor,  # [batch, max_seq_len, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [batch, max_seq_len, num_kv_heads, head_dim]
    seq_lens: list[int],
    scale: float,
) -> torch.Tensor:  # [batch, num_q_heads, head_dim], float64
    """softmax(scale * q . K[:L]) @ V[:L] per sequence and query head, in float64."""
    batch, num_q_heads, head_dim = q.shape
    group = num_q_heads // k_cache.shape[2]
    out = torch.zeros(batch, num_q_heads, head_dim, dtype=torch.float64)
    for b, length in enumerate(seq_lens):
        if length == 0:
            continue
        # [L, Hkv, D] -> [L, Hq, D]: query head h reads KV head h // group.
        k = k_cache[b, :length].double().cpu().repeat_interleave(group, dim=1)
        v = v_cache[b, :length].double().cpu().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[b].double().cpu(), k) * scale
        out[b] = torch.einsum("hl,lhd->hd", scores.softmax(dim=-1), v)
    return out


def assert_close_rows(out: torch.Tensor, ref: torch.Tensor, seq_lens: list[int], tol: float):
    """Each (b, h) row within `tol` relative error; rows of empty sequences exactly zero."""
    out = out.double().cpu()
    for b, length in enumerate(seq_lens):
        if length == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b])), f"row {b} (seq_len 0)"
            continue
        err = (out[b] - ref[b]).norm(dim=-1) / ref[b].norm(dim=-1).clamp_min(1e-30)
        assert float(err.max()) <= tol, f"row {b} (seq_len {length}): rel err {float(err.max())}"
