"""The engine's forward pass: the model's weights through the extension's kernels.

This file is the one place that decides which kernel runs. `EngineForward` walks the layers of
a `models.llama.Transformer` (whose own forward is the plain-torch reference and is never
called here) with q/k/v and gate/up fused into one product each, each residual add left to the
norm that reads its sum, and at every step the fastest op that applies, as `Settings` allows:

    per layer         CUDA, one row (decode at batch 1)      CUDA, more rows    CPU (fp32)
    norm + q/k/v      gemv_add_rms_norm_rope_kv: the add,    add_rms_norm,      add_rms_norm
    + RoPE + K/V      the norm, the product, RoPE and the    cuBLAS, then       (C++ loop),
                      K/V write in one kernel (FULL)         rope_kv_update     gemv (AVX2),
                                                             (decode) or rope   rope_kv_update
                                                             + the cache write  or rope + write
    attention         decode_attention (split-K, tensor      decode_attention   decode_attention
                      cores for fp16/bf16)                   or SDPA (prefill;  (<= 8 rows) / SDPA
                                                             serving: varlen)
    o_proj            gemv                                   cuBLAS             gemv
    norm + gate/up    gemv_add_rms_norm_silu_mul (FULL)      add_rms_norm,      add_rms_norm, gemv
    + silu*up                                                cuBLAS, silu_mul   silu*up (torch)
    down              gemv                                   cuBLAS             gemv

On the CPU at FULL, a decode step of up to 4 rows whose products take the extension's GEMV
runs as one call, cpu_decode_step (engine/ops/cpu_step.py): the embedding, RoPE's cos/sin, every
layer (the ops of the CPU column above), the final norm and the head, in C++, with their bits.
The serving engine's decode-only steps take it too, over the paged pools through the rows'
block tables (the bits of paged_kv_write and paged_decode_attention).

The fused ops give the bits of the ops they replace (tests/ compare them as integers), so every
Fusion level computes the same numbers on one device; the GEMV choices (`Gemv`) do not: MKL and
cuBLAS sum in other orders. The first layer has no residual to add, so its input norm runs
alone. Positions are never advanced here: the Engine does it after a whole step succeeded.

The serving engine's other steps (engine/paged_step.py, over the paged cache) take the unfused
path for q/k/v: the decode fusions above that write K/V (rope_kv_update, gemv_add_rms_norm_rope_kv)
address the contiguous cache by position, so RoPE runs alone and the paged step writes K/V at
its slots; every other fusion applies to them as to the static engine's. Their prefill chunks
attend in one FlashAttention varlen call per layer where `paged_prefill_varlen` says so (CUDA,
fp16/bf16, unless ServingEngine(packed_prefill=False)), one SDPA per chunk otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn

from toyllm.engine import huge_pages
from toyllm.engine.cached_attention import DecodeStep, PrefillStep
from toyllm.engine.ops import WITH_CUDA, cpu_step, elementwise, gemv_norm, rope_kv
from toyllm.engine.ops.gemv import Gemv
from toyllm.engine.paged_step import PagedStep
from toyllm.engine.settings import Fusion, Settings
from toyllm.engine.varlen_attention import flash_varlen_applies
from toyllm.models import layer_math
from toyllm.models.llama import Transformer
from toyllm.models.rope import apply_rope, rope_cos_sin

#: Rows up to which decode attention takes the extension's kernel when its pass 1 runs on CUDA
#: cores (and on the CPU): above, SDPA with a length mask was faster (docs/PERF.md).
DECODE_KERNEL_MAX_ROWS = 8
#: Where the CUDA kernel's pass 1 runs on tensor cores; it is then taken at every batch size.
TENSOR_CORE_DTYPES = (torch.float16, torch.bfloat16)
TENSOR_CORE_HEAD_DIMS = (64, 128)

if TYPE_CHECKING:
    #: PagedStep (the serving engine's, engine/paged_step.py) is not a DecodeStep: the
    #: decode-only fusions that write K/V into the contiguous cache (rope_kv_update,
    #: gemv_add_rms_norm_rope_kv) never take it; it writes K/V at its pool slots in `attend`.
    Step = PrefillStep | DecodeStep | PagedStep


def decode_kernel_max_rows(settings: Settings, dtype: torch.dtype | None,
                           head_dim: int | None) -> int | None:
    """Rows up to which a decode step's attention takes the extension's kernel; None: any."""
    if settings.decode_kernel_max_rows is not None:
        return settings.decode_kernel_max_rows
    if dtype in TENSOR_CORE_DTYPES and head_dim in TENSOR_CORE_HEAD_DIMS:
        return None
    return DECODE_KERNEL_MAX_ROWS


def decode_attention_kernel(settings: Settings, device: torch.device, rows: int,
                            dtype: torch.dtype, head_dim: int) -> bool:
    """True when a decode step of `rows` rows attends through toyllm::decode_attention: the
    CUDA kernel (up to decode_kernel_max_rows), or on the CPU its fp32 loop (other dtypes:
    SDPA over in-place views is faster there)."""
    if settings.decode_attention != "kernel":
        return False
    if device.type == "cpu":
        if dtype != torch.float32:
            return False
        most = settings.decode_kernel_max_rows
        return rows <= (DECODE_KERNEL_MAX_ROWS if most is None else most)
    if device.type != "cuda" or not WITH_CUDA:
        return False
    most = decode_kernel_max_rows(settings, dtype, head_dim)
    return most is None or rows <= most


def paged_prefill_varlen(device: torch.device, dtype: torch.dtype, head_dim: int,
                         num_heads: int, num_kv_heads: int) -> bool:
    """True when the serving engine's steps can attend all their prefill chunks in one varlen
    FlashAttention call (engine/paged_step.py's PackedPrefill): where the kernel applies (CUDA,
    fp16/bf16; engine/varlen_attention.py). ServingEngine(packed_prefill=False) declines it."""
    return flash_varlen_applies(device, dtype, head_dim, num_heads, num_kv_heads)


class Collectives(Protocol):
    """What a tensor-parallel rank's forward needs from its process group
    (engine/tensor_parallel/): the sum over ranks of the row-sharded o and down products'
    partial outputs, and the whole vocabulary's logits from each rank's slice of them."""

    def all_reduce(self, partial: Tensor) -> Tensor: ...

    def gather_vocab(self, logits: Tensor) -> Tensor: ...


@dataclass
class LayerWeights:
    """One decoder layer's weights as the engine reads them: q/k/v and gate/up as one matrix
    each, whose row blocks the model's own parameters become views of."""

    input_norm: Tensor  # [hidden]
    qkv: Tensor  # [(Hq + 2 Hkv) * D, hidden]: q, k, v rows
    o: Tensor  # [hidden, Hq * D]
    post_norm: Tensor  # [hidden]
    gate_up: Tensor  # [2 * intermediate, hidden]: gate, then up rows
    down: Tensor  # [hidden, intermediate]


@torch.no_grad()
def fuse_rows(linears: list[nn.Linear]) -> Tensor:
    """One [sum of out, in] weight for several linears of the same input; each linear's weight
    becomes a view of its rows (same values, same state_dict, no extra memory). Keeps the
    storage order: input-major weights (engine/cpu_layout.py) give an input-major matrix.
    Weights that are already such views (an earlier engine fused them) are reused as they are."""
    weights = [lin.weight for lin in linears]
    fused = _fused_already(weights)
    if fused is not None:
        return fused
    if all(w.stride(0) == 1 and w.stride(1) >= w.shape[0] for w in weights):
        fused = torch.cat([w.t() for w in weights], dim=1).t()  # [in, out] storage
    else:
        fused = torch.cat(list(weights), dim=0)
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight.data = fused[start : start + rows]
        start += rows
    return fused


def _fused_already(weights: list[Tensor]) -> Tensor | None:
    """The fused matrix `weights` are consecutive row blocks of, or None."""
    base = weights[0]._base
    if base is None or base.dim() != 2 or any(w._base is not base for w in weights):
        return None
    rows, cols = sum(w.shape[0] for w in weights), weights[0].shape[1]
    if base.shape == (rows, cols):  # [out, in] storage: block i starts at row `start`
        fused, step = base, cols
    elif base.shape == (cols, rows):  # [in, out] storage: block i starts at column `start`
        fused, step = base.t(), 1
    else:
        return None
    start = 0
    for w in weights:
        if w.data_ptr() != base.data_ptr() + start * step * base.element_size():
            return None
        start += w.shape[0]
    return fused


def layer_weights(model: Transformer) -> list[LayerWeights]:
    """The engine's view of every layer's weights (fusing q/k/v and gate/up in place)."""
    out = []
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        out.append(LayerWeights(
            input_norm=layer.input_layernorm.weight,
            qkv=fuse_rows([attn.q_proj, attn.k_proj, attn.v_proj]),
            o=attn.o_proj.weight,
            post_norm=layer.post_attention_layernorm.weight,
            gate_up=fuse_rows([mlp.gate_proj, mlp.up_proj]),
            down=mlp.down_proj.weight,
        ))
    return out


class EngineForward:
    """forward(tokens, positions, step) -> logits, through the cache `step` attends over.

    Build it after the model has its final device, dtype and weight layout: it holds views of
    the model's weights (moving the model afterwards leaves them behind). `collectives`: one
    rank's shard of a tensor-parallel model (engine/tensor_parallel/) sums the o and down
    products over the ranks and gathers the logits; its embedding sums its own rows.
    """

    def __init__(self, model: Transformer, settings: Settings,
                 collectives: Collectives | None = None) -> None:
        self.model = model
        self.collectives = collectives
        self.settings = settings
        config = model.config
        self.eps = config.norm_eps
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.fusion = settings.fusion
        self.gemv = Gemv(cpu=settings.cpu_gemv, cuda=settings.cuda_gemv,
                         cuda_max_bytes=settings.cuda_gemv_max_bytes)
        fused = self.fusion >= Fusion.ELEMENTWISE  # one kernel each (CUDA), C++ loops (CPU)
        self.rms_norm = elementwise.rms_norm if fused else layer_math.rms_norm
        self.add_rms_norm = elementwise.add_rms_norm if fused else layer_math.add_rms_norm
        self.rope = elementwise.rope if fused else apply_rope
        self.silu_mul = elementwise.silu_mul if fused else layer_math.silu_mul
        self.layers = layer_weights(model)
        # the whole CPU decode step in one call: at FULL, with the extension's CPU GEMV, where
        # every weight is one cpu_decode_step takes (asked once; the step's tokens per step);
        # not for a rank of a tensor-parallel model, whose o and down products must be summed
        # over the ranks between the ops that the one call runs back to back
        step_weights = [t for w in self.layers for t in vars(w).values()]  # LayerWeights order
        self.cpu_step = (self.fusion >= Fusion.FULL and settings.cpu_gemv
                         and collectives is None
                         and model.device.type == "cpu" and cpu_step.weights_apply(
                             [*step_weights, model.embed_tokens.weight, model.norm.weight,
                              model.lm_head.weight, model.inv_freq]))
        # the products' weights in bf16 where their values are bf16 values (a bf16 checkpoint
        # loaded in fp32): the same numbers, half the bytes a token streams (cpu_step's docs)
        products = {"qkv", "o", "gate_up", "down"}
        self._step_weights = [cpu_step.bf16_if_exact(t) if name in products else t
                              for w in self.layers for name, t in vars(w).items()
                              ] if self.cpu_step else []
        # the step's other weights, read off the model once (nn.Module attribute lookups run
        # Python per token otherwise)
        self._step_head = ((model.embed_tokens.weight, model.norm.weight,
                            cpu_step.bf16_if_exact(model.lm_head.weight), model.inv_freq)
                           if self.cpu_step else ())
        if self.cpu_step:  # the weights the step streams a token, in huge pages where given
            huge_pages.advise([*self._step_weights, *self._step_head])
            # the separate operators' few-row products (the serving engine's decode steps, and
            # the engine's where the step does not apply) read the same bf16 copies
            fp32 = [*step_weights, model.lm_head.weight]
            self.gemv.narrow.update({id(a): b for a, b in zip(
                fp32, [*self._step_weights, self._step_head[2]], strict=True) if a is not b})

    def paged_prefill_varlen(self) -> bool:
        """Whether the serving engine's prefill chunks take the packed varlen attention."""
        return paged_prefill_varlen(self.model.device, self.model.dtype, self.head_dim,
                                    self.num_heads, self.num_kv_heads)

    def decode_kernel(self, rows: int) -> bool:
        """Whether a decode step of `rows` rows attends through the extension's kernel."""
        return decode_attention_kernel(self.settings, self.model.device, rows, self.model.dtype,
                                       self.head_dim)

    def __call__(self, tokens: Tensor, positions: Tensor | None, step: Step,
                 last_only: bool = False, select: Tensor | None = None) -> Tensor:
        """tokens [B, T] (positions int64 [B, T], or None for a decode step that gathers RoPE's
        cos/sin from its table) -> logits [B, T, vocab] ([B, 1, vocab] if last_only; with
        `select`, int64 [K] indices into the B * T tokens, [1, K, vocab]: only theirs)."""
        model = self.model
        # the whole CPU decode step computes its cos/sin itself (a step with a table takes
        # the layers below)
        if (self.cpu_step and isinstance(step, DecodeStep) and step.use_kernel
                and step.rope_table is None and not last_only and select is None
                and cpu_step.applies(tokens)):
            return self._cpu_step(tokens, step)
        if (self.cpu_step and isinstance(step, PagedStep) and step.decode_only()
                and step.rope_table is None and not last_only):
            logits = self._cpu_paged_step(tokens, step, select)
            if logits is not None:
                return logits
        x = model.embed_tokens(tokens)  # [B, T, hidden]
        # a decode step may gather RoPE's cos/sin from a table by position (DecodeStep,
        # PagedStep); None: computed here from `positions` (a DecodeStep's own by default)
        cos_sin = step.rope_cos_sin() if hasattr(step, "rope_cos_sin") else None
        if cos_sin is None:
            if positions is None and isinstance(step, DecodeStep):
                positions = step.rope_positions()
            if positions is None:
                raise ValueError("expected positions [B, T]: the step gives no RoPE cos/sin")
            cos_sin = rope_cos_sin(model.inv_freq, positions, x.dtype)
        cos, sin = cos_sin
        pending: Tensor | None = None  # the residual stream is x + pending
        for i, weights in enumerate(self.layers):
            x, pending = self._layer(i, weights, x, pending, cos, sin, step)
        if last_only:  # the sum's last token is the sum of the last tokens
            x = x[:, -1:]
            pending = pending[:, -1:] if pending is not None else None
        if select is not None:  # [B, T, hidden] -> [1, K, hidden]
            x = x.flatten(0, 1).index_select(0, select).unsqueeze(0)
            if pending is not None:
                pending = pending.flatten(0, 1).index_select(0, select).unsqueeze(0)
        _, h = self._add_norm(x, pending, model.norm.weight)
        logits = self.gemv.linear(h, model.lm_head.weight)
        return logits if self.collectives is None else self.collectives.gather_vocab(logits)

    def _reduce(self, partial: Tensor) -> Tensor:
        """The o or down product summed over the ranks (itself in one process)."""
        return partial if self.collectives is None else self.collectives.all_reduce(partial)

    def _layer(self, i: int, w: LayerWeights, x: Tensor, pending: Tensor | None, cos: Tensor,
               sin: Tensor, step: Step) -> tuple[Tensor, Tensor]:
        """The layer on the residual stream x + pending (pending None: x). Returns the stream
        after it as (x, pending) again: the MLP's output is left for the next norm to add."""
        out = None
        if (self.fusion >= Fusion.FULL and pending is not None and isinstance(step, DecodeStep)
                and gemv_norm.rope_kv_applies(x, pending, w.input_norm, w.qkv, cos,
                                              step.k_caches[i], self.gemv)):
            # the residual add, the input norm, q/k/v, RoPE and the K/V write: one kernel
            x, q = gemv_norm.add_rms_norm_rope_kv(
                x, pending, w.input_norm, self.eps, w.qkv, cos, sin, step.k_caches[i],
                step.v_caches[i], step.positions, self.num_heads)
            out = step.attend_cached(i, q)
        if out is None:
            x, qkv = self._add_norm_linear(x, pending, w.input_norm, w.qkv)
            out = self._attend(i, qkv, cos, sin, step)
        b, t = out.shape[:2]
        attn = self._reduce(self.gemv.linear(out.reshape(b, t, self.num_heads * self.head_dim),
                                             w.o))
        if self.fusion >= Fusion.FULL and gemv_norm.silu_applies(x, attn, w.post_norm,
                                                                 w.gate_up, self.gemv):
            # the residual add, the post-attention norm, gate/up and silu(gate) * up: one kernel
            x, h = gemv_norm.add_rms_norm_silu_mul(x, attn, w.post_norm, self.eps, w.gate_up)
            return x, self._reduce(self.gemv.linear(h, w.down))
        x, gate_up = self._add_norm_linear(x, attn, w.post_norm, w.gate_up)
        # silu(gate) * up inside the one-row CUDA down product from SILU_GEMV on
        return x, self._reduce(self.gemv.silu_mul_linear(gate_up, w.down, self.silu_mul,
                                                         fused=self.fusion >= Fusion.SILU_GEMV))

    def _cpu_step(self, tokens: Tensor, step: DecodeStep) -> Tensor:
        """The whole forward of a CPU decode step in one call (toyllm::cpu_decode_step), the
        same bits: tokens [rows, 1] -> logits [rows, 1, vocab]; K/V written at step.positions."""
        embedding, final_norm, head, inv_freq = self._step_head
        return cpu_step.cpu_decode_step(
            tokens, embedding, self._step_weights, final_norm, head, self.eps, inv_freq,
            step.k_caches, step.v_caches, step.positions, self.num_heads)

    def _cpu_paged_step(self, tokens: Tensor, step: PagedStep,
                        select: Tensor | None) -> Tensor | None:
        """A decode-only serving step (tokens [1, rows] eager, [rows, 1] in a graph's
        buffer: one per sequence) in one toyllm::cpu_decode_step over the paged pools, each
        row's keys through its block table and its K/V written at its position's slot: logits
        [*tokens.shape, vocab] ([1, K, vocab] of `select`), the bits of the separate ops. None
        where the operator does not take it: more rows than its products take, or a padding
        row (no keys: the operator's finished rows attend over key 0)."""
        rows = step.num_decode
        if tokens.numel() != rows:
            return None
        flat = tokens.reshape(rows, 1)
        if not cpu_step.applies(flat) or not bool(step.decode_lens.min() > 0):
            return None
        embedding, final_norm, head, inv_freq = self._step_head
        positions = step.decode_lens - 1  # int32: keys 0..position
        logits = cpu_step.cpu_decode_step(
            flat, embedding, self._step_weights, final_norm, head, self.eps, inv_freq,
            step.k_pools, step.v_pools, positions, self.num_heads, step.decode_tables)
        if select is not None:  # indices into the step's tokens
            return logits.view(1, rows, -1).index_select(1, select)
        return logits.view(*tokens.shape, -1)

    def cpu_decode(self, k_caches: list[Tensor], v_caches: list[Tensor],
                   positions: Tensor) -> Callable[[Tensor], Tensor] | None:
        """The whole decode step over these cache views (per layer [rows, max_seq_len, Hkv, D];
        int32 positions [rows]) as one call with its arguments bound, where this forward takes
        toyllm::cpu_decode_step for a DecodeStep of `rows` rows (None elsewhere): step(tokens
        int64 [rows, 1]) -> logits [rows, vocab], the bits of `self(tokens, None,
        DecodeStep(...))[:, -1]`. Made once per set of views: the engine's decode loop then
        runs no Python of this forward per token (docs/PERF.md, "CPU decode")."""
        rows = positions.shape[0]
        if not (self.cpu_step and 1 <= rows <= cpu_step.MAX_ROWS and self.decode_kernel(rows)):
            return None
        embedding, final_norm, head, inv_freq = self._step_head
        args = (embedding, self._step_weights, final_norm, head, self.eps, inv_freq,
                list(k_caches), list(v_caches), positions, self.num_heads)

        def step(tokens: Tensor) -> Tensor:
            return cpu_step.cpu_decode_step(tokens, *args).view(rows, -1)

        return step

    def _add_norm(self, x: Tensor, residual: Tensor | None,
                  norm_weight: Tensor) -> tuple[Tensor, Tensor]:
        """(s, rms_norm(s)) with s = x + residual (x when residual is None)."""
        if residual is None:
            return x, self.rms_norm(x, norm_weight, self.eps)
        return self.add_rms_norm(x, residual, norm_weight, self.eps)

    def _add_norm_linear(self, x: Tensor, residual: Tensor | None, norm_weight: Tensor,
                         weight: Tensor) -> tuple[Tensor, Tensor]:
        """(s, linear(rms_norm(s), weight)) with s = x + residual: one kernel at one CUDA row
        from FULL on (the bits of add_rms_norm then gemv)."""
        if (self.fusion >= Fusion.FULL and residual is not None
                and gemv_norm.applies(x, residual, norm_weight, weight, self.gemv)):
            return gemv_norm.add_rms_norm_linear(x, residual, norm_weight, self.eps, weight)
        x, h = self._add_norm(x, residual, norm_weight)
        return x, self.gemv.linear(h, weight)

    def _attend(self, i: int, qkv: Tensor, cos: Tensor, sin: Tensor, step: Step) -> Tensor:
        """Attention output [B, T, Hq, D] from the fused projection qkv [B, T, (Hq + 2 Hkv) D]
        (before RoPE), K/V written into the step's cache."""
        b, t, _ = qkv.shape
        hq, hkv = self.num_heads, self.num_kv_heads
        qkv = qkv.view(b, t, hq + 2 * hkv, self.head_dim)
        if (self.fusion >= Fusion.ROPE_KV and isinstance(step, DecodeStep)
                and rope_kv.applies(qkv, step.k_caches[i])):
            # RoPE on q and k and the K/V write: one op
            q = rope_kv.rope_kv_update(qkv, cos, sin, step.k_caches[i], step.v_caches[i],
                                       step.positions, hq)
            return step.attend_cached(i, q)
        qk = self.rope(qkv[:, :, : hq + hkv], cos, sin)  # one RoPE for q and k
        q, k, v = qk[:, :, :hq], qk[:, :, hq:], qkv[:, :, hq + hkv :]
        return step.attend(i, q, k, v)
