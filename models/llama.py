"""A Llama-style decoder: RMSNorm (fp32), RoPE, grouped-query attention, SwiGLU MLP.

`Transformer.forward(tokens, positions, cache=None)` with no cache is the plain causal
forward that the rest of the project treats as the reference. With a cache, each layer hands
its new q/k/v to `cache.attend(layer_index, q, k, v)`, which writes K/V into the KV cache
and attends over everything written so far (see engine/cached_attention.py); the model itself
does not know how or where K/V are stored. A cache that offers `attend_qkv` (a decode step) is
handed the fused q/k/v projection before RoPE instead, so RoPE and the K/V write can be one op.

Each residual add is done by the norm that reads its sum (one kernel on CUDA), so a layer takes
and returns the residual stream as a pair (x, pending) whose sum is the stream: see
DecoderLayer.forward.

Module names follow Hugging Face's LlamaForCausalLM without the "model." prefix, so the
checkpoint mapping (models/checkpoint.py) is a prefix rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from toyllm.models.config import ModelConfig
from toyllm.models.layer_math import rms_norm, silu_mul
from toyllm.models.rope import apply_rope, inverse_frequencies, rope_cos_sin

# One-kernel CUDA versions of RMSNorm (alone and after the residual add), RoPE and silu * up
# (engine/fused_ops.py), used for CUDA tensors when the extension is built with CUDA and
# TOYLLM_FUSED_OPS is not 0. models/ must import without the extension (training machines have
# no build): then the torch code of layer_math.py and rope.py runs everywhere.
try:
    from toyllm.engine.ops import elementwise as _fused_ops
except ImportError:
    _fused_ops = None
_fused = _fused_ops if _fused_ops is not None and _fused_ops.AVAILABLE else None
# On the CPU: the wrappers of engine/fused_ops.py, which take the operators' fp32 C++ loops for
# rms_norm, add_rms_norm and rope (and the torch code for anything else).
_fused_cpu = _fused_ops if _fused_ops is not None and _fused_ops.ENABLED else None

# The extension's matrix-vector product (engine/gemv.py) for the few-row products of decode,
# CPU and CUDA; F.linear (MKL, cuBLAS) everywhere else, and everywhere without the extension.
# _silu_mul_linear(gate_up, w, silu_mul) = _linear(silu_mul(gate_up), w): one kernel at one CUDA
# row (toyllm::gemv_silu_mul, TOYLLM_FUSED_SILU_GEMV=0 to turn off), the two calls elsewhere.
try:
    from toyllm.engine.ops.gemv import linear as _linear
    from toyllm.engine.ops.gemv import silu_mul_linear as _silu_mul_linear
except ImportError:
    _linear = F.linear

    def _silu_mul_linear(
        gate_up: Tensor, weight: Tensor, silu: Callable[[Tensor], Tensor]
    ) -> Tensor:
        return F.linear(silu(gate_up), weight)


# (x + r, _linear(rms_norm(x + r), w)) in one kernel at one CUDA row (toyllm::gemv_add_rms_norm,
# engine/gemv_add_rms_norm.py; TOYLLM_FUSED_NORM_GEMV=0 to turn off): RMSNorm.add_norm_linear.
# The gate/up product after the post-attention norm may also take silu(gate) * up in its
# epilogue (toyllm::gemv_add_rms_norm_silu_mul): then the down product is a plain _linear.
try:
    from toyllm.engine.ops.gemv_norm import add_rms_norm_linear as _add_rms_norm_linear
    from toyllm.engine.ops.gemv_norm import add_rms_norm_silu_mul as _add_rms_norm_silu_mul
    from toyllm.engine.ops.gemv_norm import silu_applies as _norm_silu_applies
except ImportError:
    _add_rms_norm_linear = _add_rms_norm_silu_mul = _norm_silu_applies = None


class AttentionCache(Protocol):
    """What a layer needs from a KV cache during a cached forward.

    A cache may also offer ``attend_qkv(layer, qkv, cos, sin, num_q_heads) -> Tensor | None``:
    `attend` from the fused projection before RoPE, qkv [B, T, Hq + 2 Hkv, D], RoPE included
    (engine/cached_attention.py's DecodeStep: RoPE and the K/V write in one op). A layer with
    fused q/k/v weights calls it where it exists and, when it returns None, does RoPE itself
    and calls `attend`. It may also offer ``attend_norm_qkv(layer, x, residual, norm_weight,
    eps, qkv_weight, cos, sin, num_q_heads) -> (x + residual, attention output) | None``: the
    residual add, the input norm and the q/k/v product too (DecodeStep: all in one kernel);
    where it returns None the layer does those itself.
    """

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q [B, T, Hq, D], k/v [B, T, Hkv, D] -> attention output [B, T, Hq, D]."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 whatever the model dtype, then scale in the model dtype
        # (layer_math.rms_norm; one kernel instead of eight on CUDA).
        if x.is_cuda and _fused is not None:
            return _fused.rms_norm(x, self.weight, self.eps)
        if _fused_cpu is not None and not x.is_cuda:
            return _fused_cpu.rms_norm(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)

    def add_norm(self, x: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        """(s, norm(s)) with s = x + residual (x when residual is None): the residual add
        before a norm and the norm, one kernel on CUDA (layer_math.add_rms_norm)."""
        if residual is None:
            return x, self(x)
        if x.is_cuda and _fused is not None:
            return _fused.add_rms_norm(x, residual, self.weight, self.eps)
        if _fused_cpu is not None and not x.is_cuda:
            return _fused_cpu.add_rms_norm(x, residual, self.weight, self.eps)
        x = x + residual
        return x, rms_norm(x, self.weight, self.eps)

    def add_norm_linear(
        self, x: Tensor, residual: Tensor | None, weight: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(s, linear(norm(s), weight)) with s = x + residual (x when residual is None): the
        residual add, the norm and the product that reads it. One kernel at one CUDA row
        (engine/gemv_add_rms_norm.py, the same bits as add_norm then the product); add_norm
        then the product elsewhere."""
        if residual is not None and _add_rms_norm_linear is not None:
            return _add_rms_norm_linear(x, residual, self.weight, self.eps, weight, self.add_norm)
        x, h = self.add_norm(x, residual)
        return x, _linear(h, weight)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        d, hd = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(d, config.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, config.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, config.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(config.num_heads * hd, d, bias=False)
        self.qkv_weight: Tensor | None = None  # set by fuse_projections(): [q; k; v] rows

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: AttentionCache | None) -> Tensor:
        b, t, _ = x.shape
        hq, hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        rope = _rope_for(x)
        if self.qkv_weight is not None:  # one matmul for q, k and v
            return self.from_qkv(_linear(x, self.qkv_weight), cos, sin, cache)
        q = rope(_linear(x, self.q_proj.weight).view(b, t, hq, hd), cos, sin)
        k = rope(_linear(x, self.k_proj.weight).view(b, t, hkv, hd), cos, sin)
        v = _linear(x, self.v_proj.weight).view(b, t, hkv, hd)
        return self._attend(q, k, v, cache)

    def from_qkv(
        self, qkv: Tensor, cos: Tensor, sin: Tensor, cache: AttentionCache | None
    ) -> Tensor:
        """The rest of forward from the fused projection qkv [B, T, (Hq + 2 Hkv) * D] (q, k, v
        heads side by side, before RoPE)."""
        b, t, _ = qkv.shape
        hq, hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = qkv.view(b, t, hq + 2 * hkv, hd)
        attend_qkv = getattr(cache, "attend_qkv", None)
        out = None if attend_qkv is None else attend_qkv(self.layer_index, qkv, cos, sin, hq)
        if out is not None:  # a decode step: RoPE and the K/V write were one op
            return self.project_out(out)
        # one RoPE for q and k (heads side by side)
        qk = _rope_for(qkv)(qkv[:, :, : hq + hkv], cos, sin)
        q, k, v = qk[:, :, :hq], qk[:, :, hq:], qkv[:, :, hq + hkv :]
        return self._attend(q, k, v, cache)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, cache: AttentionCache | None) -> Tensor:
        if cache is None:
            return self.project_out(causal_attention(q, k, v))
        return self.project_out(cache.attend(self.layer_index, q, k, v))

    def project_out(self, out: Tensor) -> Tensor:
        """o_proj of the attention output [B, T, Hq, D]."""
        b, t = out.shape[:2]
        return _linear(out.reshape(b, t, self.num_heads * self.head_dim), self.o_proj.weight)


def _rope_for(x: Tensor) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The RoPE for x's device: the fused kernel on CUDA (1 kernel, not 5), the operator's fp32
    loop on the CPU, else the torch code."""
    if x.is_cuda:
        return _fused.rope if _fused is not None else apply_rope
    return _fused_cpu.rope if _fused_cpu is not None else apply_rope


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Plain causal attention over one block of tokens: q [B,T,Hq,D], k/v [B,T,Hkv,D]."""
    group = q.shape[2] // k.shape[2]
    if group > 1:
        k = k.repeat_interleave(group, dim=2)
        v = v.repeat_interleave(group, dim=2)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    )
    return out.transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_weight: Tensor | None = None  # set by fuse_projections(): [gate; up] rows

    def forward(self, x: Tensor) -> Tensor:  # SwiGLU
        if self.gate_up_weight is not None:
            return self.from_gate_up(_linear(x, self.gate_up_weight))
        gate = F.silu(_linear(x, self.gate_proj.weight))
        return _linear(gate * _linear(x, self.up_proj.weight), self.down_proj.weight)

    def from_gate_up(self, gate_up: Tensor) -> Tensor:
        """The rest of forward from the fused product gate_up [..., 2 * intermediate] (gate,
        then up)."""
        if gate_up.is_cuda and _fused is not None:
            # silu_mul is one kernel; at one row it runs inside the down product's kernel
            return _silu_mul_linear(gate_up, self.down_proj.weight, _fused.silu_mul)
        return _linear(silu_mul(gate_up), self.down_proj.weight)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: Tensor, pending: Tensor | None, cos: Tensor, sin: Tensor,
        cache: AttentionCache | None,
    ) -> tuple[Tensor, Tensor]:
        """The layer on the residual stream x + pending (pending None: x): the usual
            x = x + attn(input_layernorm(x)); x = x + mlp(post_attention_layernorm(x))
        but each residual add is left to the norm that reads its sum, so it runs in the norm's
        kernel (RMSNorm.add_norm). Hence the MLP's output is returned as the next pending
        residual: the stream after this layer is the sum of the two returned tensors, added by
        the next layer's input norm or the model's final norm."""
        attn, mlp = self.self_attn, self.mlp
        if attn.qkv_weight is not None and mlp.gate_up_weight is not None:
            # with fused weights each norm and the product that reads it can be one kernel
            norm = self.input_layernorm
            attend_norm_qkv = getattr(cache, "attend_norm_qkv", None)  # see AttentionCache
            fused = None
            if attend_norm_qkv is not None and pending is not None:
                fused = attend_norm_qkv(attn.layer_index, x, pending, norm.weight, norm.eps,
                                        attn.qkv_weight, cos, sin, attn.num_heads)
            if fused is not None:
                x, out = fused
                attn_out = attn.project_out(out)
            else:
                x, qkv = norm.add_norm_linear(x, pending, attn.qkv_weight)
                attn_out = attn.from_qkv(qkv, cos, sin, cache)
            norm = self.post_attention_layernorm
            gate_up_weight = mlp.gate_up_weight
            if _norm_silu_applies is not None and _norm_silu_applies(
                x, attn_out, norm.weight, gate_up_weight
            ):  # the norm, gate/up and silu(gate) * up in one kernel
                x, h = _add_rms_norm_silu_mul(x, attn_out, norm.weight, norm.eps, gate_up_weight)
                return x, _linear(h, mlp.down_proj.weight)
            x, gate_up = norm.add_norm_linear(x, attn_out, mlp.gate_up_weight)
            return x, mlp.from_gate_up(gate_up)
        x, h = self.input_layernorm.add_norm(x, pending)
        x, h = self.post_attention_layernorm.add_norm(x, attn(h, cos, sin, cache))
        return x, mlp(h)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # uninitialised (build_model or load_checkpoint fills it): drawing random numbers
        # on the meta device would import torch._dynamo, seconds of model-load time
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size,
            _weight=torch.empty(config.vocab_size, config.hidden_size),
        )
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", inverse_frequencies(config), persistent=False)

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor | None,
        cache: AttentionCache | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """tokens, positions: int64 [B, T] -> logits [B, T, vocab] ([B, 1, vocab] if last_only).

        Without a cache the T tokens attend causally to each other only (positions feed RoPE).
        positions may be None when the cache gives RoPE's cos/sin itself (a decode step with a
        table: DecodeStep.rope_cos_sin).
        """
        x = self.embed_tokens(tokens)  # [B, T, hidden]
        # a decode step may hold a table of cos/sin by position (DecodeStep.rope_cos_sin)
        gathered = getattr(cache, "rope_cos_sin", None)
        cos_sin = gathered() if gathered is not None else None
        if cos_sin is None:
            if positions is None:
                raise ValueError("expected positions [B, T]: the cache gives no RoPE cos/sin")
            cos_sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        cos, sin = cos_sin
        pending: Tensor | None = None  # the residual stream is x + pending (DecoderLayer)
        for layer in self.layers:
            x, pending = layer(x, pending, cos, sin, cache)
        if last_only:  # the sum's last token is the sum of the last tokens
            x = x[:, -1:]
            pending = pending[:, -1:] if pending is not None else None
        _, h = self.norm.add_norm(x, pending)
        return _linear(h, self.lm_head.weight)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # .to(dtype) would cast the RoPE frequencies too; keep them fp32 on the new device.
        super()._apply(fn, recurse)
        self.inv_freq = inverse_frequencies(self.config).to(self.embed_tokens.weight.device)
        for layer in self.layers:  # fused weights were views of the old storage
            layer.self_attn.qkv_weight = layer.mlp.gate_up_weight = None
        return self

    @torch.no_grad()
    def fuse_projections(self) -> Transformer:
        """Store q/k/v and gate/up of every layer as one matrix each, so a forward does 4
        matrix products per layer instead of 7. The separate weights become views into the
        fused storage: same values, same state_dict, no extra memory. Idempotent; undone by
        moving the model (.to / .cuda)."""
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if attn.qkv_weight is None:
                attn.qkv_weight = _fuse_rows([attn.q_proj, attn.k_proj, attn.v_proj])
            if mlp.gate_up_weight is None:
                mlp.gate_up_weight = _fuse_rows([mlp.gate_proj, mlp.up_proj])
        return self

    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Random weights as Hugging Face initialises Llama: N(0, std), norms at 1.
        Drawn on the parameters' own device (seeded per device)."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("layernorm.weight") or name == "norm.weight":
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, std, generator=gen)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype


def _fuse_rows(linears: list[nn.Linear]) -> Tensor:
    """One [sum of out, in] weight for several linears of the same input; each linear's
    weight becomes a view of its rows. Keeps the storage order: input-major weights (see
    engine/cpu_layout.py) give an input-major fused matrix."""
    weights = [lin.weight for lin in linears]
    if all(w.stride() == (1, w.shape[0]) for w in weights):
        fused = torch.cat([w.t() for w in weights], dim=1).t()  # [in, out] storage
    else:
        fused = torch.cat(list(weights), dim=0)
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight.data = fused[start : start + rows]
        start += rows
    return fused


def build_model(
    config: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    seed: int | None = 0,
) -> Transformer:
    """A model with random weights (seeded), on `device` in `dtype`."""
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device=device).to(dtype)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.init_weights(seed if seed is not None else 0)
    return model.eval()
