"""The fake of every toyllm:: operator: its outputs' shapes, dtype and device, nothing more.

PyTorch runs these instead of the kernels on fake and meta tensors: under FakeTensorMode, in
torch.library.opcheck and when torch.compile traces a call (the engine itself compiles
nothing). They check nothing: every operator checks its arguments once, in C++ (csrc/), with
the messages users see, when it runs. A shape below is read with slices (``shape[:1]``, not
``shape[0]``) where an argument of the wrong rank would otherwise raise IndexError here before
the operator could say what is wrong. Every output is contiguous, as the operators' are.

    >>> import torch
    >>> from torch._subclasses.fake_tensor import FakeTensorMode
    >>> import toyllm.engine.ops  # registers these
    >>> with FakeTensorMode():  # a fake CUDA tensor needs no GPU
    ...     y = torch.ops.toyllm.gemv(torch.empty(1, 2048, device="cuda", dtype=torch.bfloat16),
    ...                               torch.empty(512, 2048, device="cuda", dtype=torch.bfloat16))
    >>> y.shape, y.dtype, y.device.type
    (torch.Size([1, 512]), torch.bfloat16, 'cuda')
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__: list[str] = []
_fake = torch.library.register_fake


# --- the KV cache (csrc/cache/) and decode attention (csrc/attention/)


@_fake("toyllm::kv_update")
def _kv_update(k_cache: Tensor, v_cache: Tensor, new_k: Tensor, new_v: Tensor,
               positions: Tensor) -> None:
    """Nothing to describe: the op writes k_cache / v_cache in place and returns nothing."""


@_fake("toyllm::decode_attention")
def _decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, seq_lens: Tensor,
                      scale: float, tile: int = 0, reverse: bool = True,
                      tensor_cores: bool = True) -> Tensor:
    return q.new_empty(q.shape)  # [batch, num_q_heads, head_dim]


@_fake("toyllm::paged_kv_write")
def _paged_kv_write(k_pool: Tensor, v_pool: Tensor, k: Tensor, v: Tensor, slots: Tensor) -> None:
    """Nothing to describe: the op writes the pools in place and returns nothing."""


@_fake("toyllm::paged_decode_attention")
def _paged_decode_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor,
                            seq_lens: Tensor, scale: float, tile: int = 0, reverse: bool = True,
                            tensor_cores: bool = True) -> Tensor:
    return q.new_empty(q.shape)  # [batch, num_q_heads, head_dim]


@_fake("toyllm::cpu_decode_step")
def _cpu_decode_step(tokens: Tensor, embedding: Tensor, layer_weights: list[Tensor],
                     final_norm: Tensor, head_weight: Tensor, eps: float, inv_freq: Tensor,
                     k_caches: list[Tensor], v_caches: list[Tensor], positions: Tensor,
                     num_q_heads: int, block_tables: Tensor | None = None) -> Tensor:
    return embedding.new_empty((*tokens.shape[:1], 1, *head_weight.shape[:1]))  # [rows, 1, V]


# --- elementwise (csrc/elementwise/)


@_fake("toyllm::rms_norm")
def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x.new_empty(x.shape)


@_fake("toyllm::add_rms_norm")
def _add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor,
                  eps: float) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), x.new_empty(x.shape)  # (x + residual, its norm)


@_fake("toyllm::rope")
def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x.new_empty(x.shape)  # contiguous whatever x's strides


@_fake("toyllm::silu_mul")
def _silu_mul(gate_up: Tensor) -> Tensor:
    half = [width // 2 for width in gate_up.shape[-1:]]
    return gate_up.new_empty((*gate_up.shape[:-1], *half))  # [..., 2 * I] -> [..., I]


@_fake("toyllm::rope_kv_update")
def _rope_kv_update(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                    positions: Tensor, num_q_heads: int) -> Tensor:
    # qkv [rows, 1, Hq + 2 * Hkv, D] -> q [rows, 1, Hq, D]; K/V written in place
    return qkv.new_empty((*qkv.shape[:2], num_q_heads, *qkv.shape[3:4]))


# --- products (csrc/gemv/)


@_fake("toyllm::gemv")
def _gemv(x: Tensor, weight: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], *weight.shape[:1]))  # [..., in] -> [..., out]


@_fake("toyllm::gemv_silu_mul")
def _gemv_silu_mul(gate_up: Tensor, weight: Tensor) -> Tensor:
    return gate_up.new_empty((*gate_up.shape[:-1], *weight.shape[:1]))  # [..., out]


@_fake("toyllm::gemv_add_rms_norm")
def _gemv_add_rms_norm(x: Tensor, residual: Tensor, norm_weight: Tensor, eps: float,
                       weight: Tensor, warps: int = 8) -> tuple[Tensor, Tensor]:
    # (sum [..., in], y [..., out])
    return x.new_empty(x.shape), x.new_empty((*x.shape[:-1], *weight.shape[:1]))


@_fake("toyllm::gemv_add_rms_norm_silu_mul")
def _gemv_add_rms_norm_silu_mul(x: Tensor, residual: Tensor, norm_weight: Tensor, eps: float,
                                weight: Tensor, warps: int = 8) -> tuple[Tensor, Tensor]:
    # (sum [..., in], h [..., out / 2]) for weight [gate; up] of out rows
    half = [out // 2 for out in weight.shape[:1]]
    return x.new_empty(x.shape), x.new_empty((*x.shape[:-1], *half))


@_fake("toyllm::gemv_add_rms_norm_rope_kv")
def _gemv_add_rms_norm_rope_kv(x: Tensor, residual: Tensor, norm_weight: Tensor, eps: float,
                               weight: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor,
                               v_cache: Tensor, positions: Tensor, num_q_heads: int,
                               warps: int = 8) -> tuple[Tensor, Tensor]:
    # (sum [..., in], q [rows, 1, Hq, D]) with D = k_cache.size(3); K/V written in place
    rows = math.prod(x.shape[:-1])
    return x.new_empty(x.shape), x.new_empty((rows, 1, num_q_heads, *k_cache.shape[3:4]))


# --- sampling (csrc/sampling/)


@_fake("toyllm::argmax")
def _argmax(logits: Tensor, flag_nonfinite: bool = False) -> Tensor:
    return logits.new_empty(logits.shape[:1], dtype=torch.long)  # [rows, vocab] -> int64 [rows]
