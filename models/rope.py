"""Rotary position embeddings in the Hugging Face rotate-half convention.

The frequencies (and llama3 scaling) follow transformers' `_compute_llama3_parameters`, so
the same checkpoint gives the same logits here and in `LlamaForCausalLM`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from toyllm.models.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> Tensor:
    """inv_freq[i] = theta^(-2i/d) for i < d/2, with llama3 or linear scaling applied."""
    dim = config.head_dim
    # explicitly on the CPU in fp32, also when a model is built under torch.device("meta")
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly.
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin of shape [B, T, 1, head_dim] for integer positions [B, T] (computed in fp32)."""
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(2)  # [B, T, 1, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_table(inv_freq: Tensor, length: int, dtype: torch.dtype) -> Tensor:
    """[length, 2, head_dim]: row p holds rope_cos_sin's cos and sin for position p, the same
    bits (the same elementwise ops on the same fp32 values), on inv_freq's device. A decode step
    gathers its rows (`gather_cos_sin`): one kernel where rope_cos_sin takes seven."""
    positions = torch.arange(length, device=inv_freq.device).unsqueeze(0)  # [1, length]
    cos, sin = rope_cos_sin(inv_freq, positions, dtype)  # [1, length, 1, D]
    return torch.stack((cos[0, :, 0], sin[0, :, 0]), dim=1)


def gather_cos_sin(table: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin [B, 1, 1, head_dim] for positions index [B] (int32 or int64, each in
    [0, table rows)) from a `rope_table`: rope_cos_sin(inv_freq, index[:, None], dtype)'s
    values, as views of one gathered [B, 2, head_dim] tensor (last dim contiguous)."""
    rows = table.index_select(0, index)  # [B, 2, D]
    return rows[:, 0].unsqueeze(1).unsqueeze(1), rows[:, 1].unsqueeze(1).unsqueeze(1)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, T, H, D]; cos/sin: [B, T, 1, D]. Rotates pairs (i, i + D/2) by position * freq."""
    return x * cos + _rotate_half(x) * sin
