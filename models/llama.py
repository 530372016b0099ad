"""A Llama-style decoder in plain torch: RMSNorm (fp32), RoPE, grouped-query attention, SwiGLU.

This is the reference. `Transformer.forward(tokens, positions)` is the plain causal forward that
`toyllm check` and the tests treat as the witness: it runs torch's own kernels on every device
and shares none of the extension's, so it stays independent of the fast path it checks.

The one seam for a KV cache is the `attend` callback: with one, each layer hands it its
new q/k/v (RoPE applied) and takes back the attention output, `attend(layer_index, q, k, v)`
(engine/cached_attention.py writes K/V into the cache there and attends over everything written
so far). The engine's own forward (engine/forward.py) runs these same weights through the
extension's fused kernels.

Module names follow Hugging Face's LlamaForCausalLM without the "model." prefix, so the
checkpoint mapping (models/checkpoint.py) is a prefix rule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toyllm.models.config import ModelConfig
from toyllm.models.layer_math import rms_norm
from toyllm.models.rope import apply_rope, inverse_frequencies, rope_cos_sin

#: attend(layer_index, q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, D]) -> [B, T, Hq, D]
Attend = Callable[[int, Tensor, Tensor, Tensor], Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalise in fp32 whatever the model dtype, then scale in the model dtype
        return rms_norm(x, self.weight, self.eps)


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

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attend: Attend | None) -> Tensor:
        b, t, _ = x.shape
        hq, hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q = apply_rope(self.q_proj(x).view(b, t, hq, hd), cos, sin)
        k = apply_rope(self.k_proj(x).view(b, t, hkv, hd), cos, sin)
        v = self.v_proj(x).view(b, t, hkv, hd)
        if attend is None:
            out = causal_attention(q, k, v)
        else:
            out = attend(self.layer_index, q, k, v)
        return self.o_proj(out.reshape(b, t, hq * hd))


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

    def forward(self, x: Tensor) -> Tensor:  # SwiGLU
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attend: Attend | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


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
        positions: Tensor,
        attend: Attend | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """tokens, positions: int64 [B, T] -> logits [B, T, vocab] ([B, 1, vocab] if last_only).

        Without `attend` the T tokens attend causally to each other only (positions feed RoPE);
        with it, each layer's attention is `attend(layer_index, q, k, v)` (a KV cache's).
        """
        x = self.embed_tokens(tokens)  # [B, T, hidden]
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, attend)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # .to(dtype) would cast the RoPE frequencies too; keep them fp32 on the new device.
        super()._apply(fn, recurse)
        self.inv_freq = inverse_frequencies(self.config).to(self.embed_tokens.weight.device)
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
