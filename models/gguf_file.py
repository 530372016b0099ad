"""Llama-architecture GGUF files (llama.cpp's format), read with the `gguf` package, llama.cpp's
own reader: metadata into a ModelConfig, tensors dequantised into the model, and the tokenizer
and chat template from the file (models/gguf_tokenizer.py).

    model, config, tokenizer = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)

Tensor names map to ours by one table (`blk.N.attn_q.weight` -> `layers.N.self_attn.q_proj.weight`);
GGUF writes dims innermost first, so a [out, in] matrix is stored as ne = (in, out) and reads
back as numpy [out, in]. Quantised tensors (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K, IQ*,
BF16: whatever `gguf.quants.dequantize` knows) are dequantised to fp32 on the CPU at load, then
cast to the chosen dtype.

llama.cpp's converter permutes the rows of Llama's Q and K projections so that each head's two
RoPE halves interleave (its kernels rotate adjacent pairs); `_unpermute` undoes that, giving back
the rotate-half layout of Hugging Face weights (transformers' GGUF loader does the same).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toyllm.models.checkpoint import CheckpointError
from toyllm.models.config import ConfigError, ModelConfig, RopeScaling
from toyllm.models.hf_tokenizer import HFTokenizer
from toyllm.models.llama import Transformer

ARCHITECTURES = ("llama",)  # what `general.architecture` may say

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight$")
# tensors llama.cpp writes that are not weights of ours (read into the config instead)
_SKIP = {"rope_freqs.weight"}


class GGUFError(CheckpointError):
    """A GGUF file that cannot be read, or holds what toyllm does not run."""


def our_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `layers.3.self_attn.q_proj.weight`; None if not a Llama name."""
    m = _BLOCK.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    stem = gguf_name.removesuffix(".weight")
    if gguf_name.endswith(".weight") and stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.weight"
    return None


def permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Q (n_head = heads) and K (n_head = kv
    heads) rows: [n_head, 2, half, in] -> [n_head, half, 2, in]. For tests and writers."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of permute_for_gguf: back to rotate-half rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def _open(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except ValueError as exc:
        msg = str(exc)
        if "is not a valid GGMLQuantizationType" in msg:
            raise GGUFError(f"{path}: unknown GGUF tensor type ({msg})") from None
        raise GGUFError(f"{path}: not a readable GGUF file ({msg})") from None
    except (OSError, IndexError, KeyError, TypeError, struct_error()) as exc:
        raise GGUFError(
            f"{path}: not a readable GGUF file, or truncated ({type(exc).__name__}: {exc})"
        ) from None


def struct_error() -> type[Exception]:
    import struct

    return struct.error


def read_metadata(reader) -> dict[str, Any]:
    """Every key -> its Python value (strings, numbers, lists)."""
    meta = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            meta[name] = field.contents()
        except Exception:  # a value type this version of gguf cannot decode: not ours to need
            continue
    return meta


def _check_architecture(meta: dict[str, Any], source: str) -> str:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{source}: architecture {arch!r} is not supported; expected one of "
                        f"{list(ARCHITECTURES)}")
    return arch


def config_from_gguf(meta: dict[str, Any], vocab_size: int, tied: bool,
                     source: str = "GGUF") -> ModelConfig:
    """ModelConfig from the `<arch>.*` metadata llama.cpp writes."""
    arch = _check_architecture(meta, source)

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise GGUFError(f"{source}: missing metadata {arch}.{key}")
        return value

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    rope_dims = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise GGUFError(
            f"{source}: partial RoPE ({arch}.rope.dimension_count {rope_dims} < head_dim "
            f"{head_dim}) is not supported"
        )
    scaling = None
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "linear":
        scaling = RopeScaling(rope_type="linear", factor=_f32(get("rope.scaling.factor")))
    elif kind not in ("none", None):
        raise GGUFError(f"{source}: RoPE scaling {kind!r} is not supported (expected linear)")
    bos = meta.get("tokenizer.ggml.bos_token_id", 1)
    eos = meta.get("tokenizer.ggml.eos_token_id", 2)
    try:
        return ModelConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
            intermediate_size=int(get("feed_forward_length")),
            head_dim=head_dim,
            rope_theta=_f32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            norm_eps=_f32(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            max_seq_len=int(get("context_length")),
            tie_embeddings=tied,
            bos_id=bos if 0 <= bos < vocab_size else 0,
            eos_id=eos if 0 <= eos < vocab_size else 0,
            name=str(meta.get("general.name", "")),
        )
    except ConfigError as exc:
        raise GGUFError(f"{source}: {exc}") from None


def llama3_scaling_from_factors(factors: np.ndarray, config: ModelConfig, meta: dict[str, Any],
                                source: str) -> RopeScaling:
    """llama.cpp stores Llama 3.1-style RoPE scaling as a tensor of per-frequency divisors
    (rope_freqs.weight, [head_dim / 2]) instead of its parameters. Recover the parameters: the
    factor is the largest divisor; low/high_freq_factor and the original context are Meta's
    (1, 4, 8192, or the file's original_context_length); they must reproduce the tensor."""
    from toyllm.models.rope import inverse_frequencies

    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if factors.shape[0] != config.head_dim // 2:
        raise GGUFError(f"{source}: rope_freqs.weight has {factors.shape[0]} entries, expected "
                        f"head_dim / 2 = {config.head_dim // 2}")
    arch = meta.get("general.architecture")
    context = int(meta.get(f"{arch}.rope.scaling.original_context_length", 8192))
    base = inverse_frequencies(replace(config, rope_scaling=None)).double().numpy()
    for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0)):
        scaling = RopeScaling(rope_type="llama3", factor=_f32(factors.max()), low_freq_factor=low,
                              high_freq_factor=high, original_max_position_embeddings=context)
        implied = base / inverse_frequencies(replace(config, rope_scaling=scaling)).double().numpy()
        if np.allclose(implied, factors, rtol=1e-4, atol=0):
            return scaling
    raise GGUFError(
        f"{source}: rope_freqs.weight (per-frequency RoPE divisors, max {factors.max():.4g}) "
        "matches no Llama 3 rope scaling (low/high_freq_factor 1/4, 1/2 or 2/4, original "
        f"context {context}); this scaling is not supported"
    )


def _f32(value: Any) -> float:
    """A float32 metadata value as the decimal it was written from (1e-06, not 9.99999997e-07):
    the shortest repr of the float32."""
    return float(str(np.float32(value)))


def _dequantize(tensor, source: str) -> np.ndarray:
    """fp32 numpy array in our [out, in] order."""
    from gguf import GGMLQuantizationType, quants

    kind = tensor.tensor_type
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    try:
        if kind == GGMLQuantizationType.F32:
            data = np.asarray(tensor.data, dtype=np.float32)
        else:
            data = quants.dequantize(tensor.data, kind)
    except NotImplementedError:
        raise GGUFError(
            f"{source}: tensor {tensor.name} has type {kind.name}, which cannot be dequantised "
            "(supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, IQ*)"
        ) from None
    return data.reshape(shape)


def read_gguf_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a GGUF file from its metadata and tensor shapes (nothing dequantised)."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"GGUF file not found: {path}")
    reader = _open(path)
    meta = read_metadata(reader)
    _check_architecture(meta, str(path))
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise GGUFError(f"{path}: no token_embd.weight tensor")
    return config_from_gguf(meta, int(names["token_embd.weight"].shape[1]),
                            tied="output.weight" not in names, source=str(path))


def load_gguf(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[Transformer, ModelConfig, HFTokenizer]:
    """Model (dtype None: fp32), config and tokenizer of a Llama GGUF file."""
    from toyllm.models.gguf_tokenizer import tokenizer_from_gguf

    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"GGUF file not found: {path}")
    reader = _open(path)
    meta = read_metadata(reader)
    source = str(path)
    _check_architecture(meta, source)
    by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise GGUFError(f"{source}: no token_embd.weight tensor")
    vocab_size = int(by_name["token_embd.weight"].shape[1])
    config = config_from_gguf(meta, vocab_size, tied="output.weight" not in by_name,
                              source=source)
    if "rope_freqs.weight" in by_name:
        factors = _dequantize(by_name["rope_freqs.weight"], source)
        config = replace(config, rope_scaling=llama3_scaling_from_factors(factors, config, meta,
                                                                          source))
    with torch.device("meta"):
        model = Transformer(config)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if config.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    target = dtype or torch.float32
    state: dict[str, torch.Tensor] = {}
    for name, tensor in by_name.items():
        ours = our_name(name)
        if ours is None:
            if name in _SKIP:
                continue
            raise GGUFError(f"{source}: unexpected tensor {name} for a Llama model")
        want = shapes.get(ours)
        got = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if want is None:
            raise GGUFError(f"{source}: unexpected tensor {name}")
        if got != want:
            raise GGUFError(
                f"{source}: tensor {name} has shape {list(got)}, expected {list(want)} from the "
                "metadata"
            )
        w = _dequantize(tensor, source)
        if ".attn_q." in name:
            w = _unpermute(w, config.num_heads)
        elif ".attn_k." in name:
            w = _unpermute(w, config.num_kv_heads)
        if not (w.flags.writeable and w.flags.c_contiguous):  # a view of the mapped file
            w = np.array(w, dtype=np.float32, order="C")
        state[ours] = torch.from_numpy(w).to(device=device, dtype=target)
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise GGUFError(f"{source}: missing tensors for {missing[:8]}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = model.inv_freq.to(device)
    from toyllm.models.tokenizer import TokenizerError

    try:
        tokenizer = tokenizer_from_gguf(meta, source)
    except TokenizerError as exc:
        raise GGUFError(str(exc)) from None
    return model.eval(), config, tokenizer
