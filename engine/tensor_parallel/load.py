"""One rank's shard of a model, read piece by piece: no rank ever holds the whole model.

Where the weights come from decides how little is read:

* a Hugging Face directory (and the shipped default model, which is one): safetensors'
  `get_slice` reads only this rank's rows or columns of each tensor from the file;
* a GGUF file: llama.cpp's quantised blocks run along a row and the Q/K rows are permuted per
  head, so each tensor is dequantised whole, one at a time, and only this rank's slice kept
  (at most one dequantised tensor beside the shard at any moment);
* a config .toml with random weights: each weight is drawn whole on the rank's device with the
  seeded generator in `build_model`'s order (so every rank draws the same numbers as a
  one-process model of that seed), and only the slice kept.

`model_config_of` reads a source's config alone (no weight), so the launcher refuses a rank
count that does not divide the model before any rank starts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from toyllm.engine.tensor_parallel.collectives import RankGroup
from toyllm.engine.tensor_parallel.layers import (
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelHead,
)
from toyllm.engine.tensor_parallel.plan import ShardPlan, shard_config
from toyllm.models.checkpoint import (
    CheckpointError,
    _weight_files,
    check_tensor,
    expected_shapes,
    from_hf_name,
    inside_checkpoint,
    to_hf_name,
)
from toyllm.models.config import ConfigError, ModelConfig, load_config
from toyllm.models.llama import Transformer
from toyllm.models.model_source import DEFAULT_MODEL_DIR, ModelSourceError, _check_vocab
from toyllm.models.shipped import config_names, resolve_config
from toyllm.models.tokenizer_files import find_tokenizer, load_tokenizer

#: reads this rank's slice of a weight: (our name, (dim, start, end) or None for all) -> tensor
SliceReader = Callable[[str, tuple[int, int, int] | None], Tensor]


@dataclass
class LoadedShard:
    model: Transformer  # this rank's shard (modules of layers.py), config = shard_config
    config: ModelConfig  # the whole model's
    tokenizer: object | None  # rank 0 only
    source: str
    load_s: float


def resolve_source(source: str | Path | None) -> Path:
    """The path a --model argument names (None: the shipped default model)."""
    if source is None:
        return DEFAULT_MODEL_DIR
    try:
        path = resolve_config(source)
    except ConfigError:
        raise ModelSourceError(
            f"model not found: {source} (expected a checkpoint directory, a .gguf file, a "
            f"config .toml or a shipped config: {', '.join(config_names())})") from None
    if not path.exists():
        raise ModelSourceError(f"model not found: {path}")
    return path


def model_config_of(source: str | Path | None, random_weights: bool = False) -> ModelConfig:
    """The whole model's config, read without any weight (for the rank-count check)."""
    path = resolve_source(source)
    try:
        if path.is_dir():
            if random_weights:
                raise ModelSourceError("--random-weights goes with a config .toml, not a "
                                       "checkpoint")
            return load_config(inside_checkpoint(path, "config.json", str(path)))
        if path.suffix == ".gguf":
            from toyllm.models.gguf_file import read_gguf_config

            return read_gguf_config(path)
        if path.suffix == ".toml":
            if not random_weights:
                raise ModelSourceError(f"{path} is a config, not a checkpoint: add "
                                       "--random-weights to run it with random weights")
            return load_config(path)
    except (CheckpointError, ConfigError) as exc:
        raise ModelSourceError(str(exc)) from None
    raise ModelSourceError(f"{path}: expected a checkpoint directory (config.json + "
                           "safetensors), a .gguf file or a config .toml")


def load_shard(source: str | Path | None, ranks: RankGroup, dtype: torch.dtype,
               random_weights: bool = False, seed: int = 0,
               tokenizer_path: str | Path | None = None,
               with_tokenizer: bool = True) -> LoadedShard:
    """This rank's shard of `source` on ranks.device in `dtype` (and on rank 0 the
    tokenizer, unless with_tokenizer is False: token-id requests, as benchmarks send), with
    every check `models.model_source.load_model` makes."""
    t0 = time.perf_counter()
    path = resolve_source(source)
    config = model_config_of(source, random_weights)
    plan = ShardPlan(config, ranks.rank, ranks.ranks)
    tokenizer = None
    try:
        if path.suffix == ".gguf":
            config, read, gguf_tokenizer = _gguf_reader(path, plan)
            plan = ShardPlan(config, ranks.rank, ranks.ranks)
            tokenizer = gguf_tokenizer if ranks.leader and tokenizer_path is None else None
        elif path.is_dir():
            read = _safetensors_reader(path, config)
        else:
            read = _random_reader(config, ranks.device, dtype, seed)
        if not with_tokenizer:
            tokenizer = None
        elif ranks.leader:
            if tokenizer_path is not None:
                if not Path(tokenizer_path).exists():
                    raise ModelSourceError(f"tokenizer not found: {tokenizer_path}")
                tokenizer = load_tokenizer(tokenizer_path)
            elif path.is_dir():
                tokenizer = find_tokenizer(path)
            elif path.suffix == ".toml" and (DEFAULT_MODEL_DIR / "tokenizer.model").exists():
                tokenizer = load_tokenizer(DEFAULT_MODEL_DIR / "tokenizer.model")
            if tokenizer is not None:
                _check_vocab(path, tokenizer, config)  # before any weight is read
        model = build_shard(config, plan, ranks, read, dtype, str(path))
    except (CheckpointError, ConfigError) as exc:
        raise ModelSourceError(str(exc)) from None
    return LoadedShard(model, config, tokenizer, str(path), time.perf_counter() - t0)


def build_shard(config: ModelConfig, plan: ShardPlan, ranks: RankGroup, read: SliceReader,
                dtype: torch.dtype, where: str) -> Transformer:
    """The rank's Transformer (shard_config shape, the modules of layers.py), each weight read
    through `read` as its slice of the whole, checked against the shard's shape."""
    sc = shard_config(config, plan.ranks)
    hidden, (start, end) = config.hidden_size, plan.vocab_rows()
    with torch.device("meta"):
        model = Transformer(sc)
        model.embed_tokens = VocabParallelEmbedding(start, end, hidden, ranks)
        model.lm_head = VocabParallelHead(hidden, end - start, ranks)
        for layer in model.layers:
            layer.self_attn.o_proj = RowParallelLinear(sc.num_heads * sc.head_dim, hidden, ranks)
            layer.mlp.down_proj = RowParallelLinear(sc.intermediate_size, hidden, ranks)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    whole = expected_shapes(config)
    state = {}
    for name, param in model.named_parameters():  # a tied head is listed once, as the embedding
        if plan.shard_shape(name, whole[name]) != tuple(param.shape):
            raise AssertionError(f"shard plan and shard model disagree on {name}")
        t = read(name, plan.split(name))
        if tuple(t.shape) != tuple(param.shape):
            raise CheckpointError(f"{where}: {to_hf_name(name)}: this rank's slice has shape "
                                  f"{list(t.shape)}, expected {list(param.shape)}")
        check_tensor(where, to_hf_name(name), t)
        state[name] = t.to(device=ranks.device, dtype=dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = model.inv_freq.to(ranks.device)
    return model.eval()


def _cut(t: Tensor, split: tuple[int, int, int] | None) -> Tensor:
    if split is None:
        return t
    dim, start, end = split
    return t.narrow(dim, start, end - start)


def _safetensors_reader(directory: Path, config: ModelConfig) -> SliceReader:
    """Reads slices straight from the files (get_slice: only the rank's bytes)."""
    shapes = expected_shapes(config)
    where: dict[str, tuple[Path, str]] = {}
    for file in _weight_files(directory):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for hf_name in f.keys():
                    where[from_hf_name(hf_name)] = (file, hf_name)
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{file}: cannot read safetensors ({exc})") from None
    if config.tie_embeddings:
        where.pop("lm_head.weight", None)  # some exporters write the tied copy anyway
    missing = sorted(set(shapes) - set(where))
    unexpected = sorted(set(where) - set(shapes))
    if missing:
        raise CheckpointError(f"{directory}: missing weights "
                              f"{[to_hf_name(n) for n in missing][:8]}")
    if unexpected:
        raise CheckpointError(f"{directory}: unexpected weights "
                              f"{[to_hf_name(n) for n in unexpected][:8]}")

    def read(name: str, split: tuple[int, int, int] | None) -> Tensor:
        file, hf_name = where[name]
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                piece = f.get_slice(hf_name)
                got = tuple(piece.get_shape())
                if got != shapes[name]:
                    raise CheckpointError(
                        f"{directory}: weight {hf_name} has shape {list(got)}, expected "
                        f"{list(shapes[name])} from config.json")
                if split is None:
                    return piece[:]
                dim, start, end = split
                return piece[start:end] if dim == 0 else piece[:, start:end]
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{file}: cannot read {hf_name} ({exc})") from None

    return read


def _random_reader(config: ModelConfig, device: torch.device, dtype: torch.dtype,
                   seed: int) -> SliceReader:
    """build_model's weights (init_weights: N(0, 0.02), norms 1, one generator in parameter
    order), each drawn whole and cut: the same numbers as one process with this seed."""
    with torch.device("meta"):
        order = [(n, tuple(p.shape)) for n, p in Transformer(config).named_parameters()]
    gen = torch.Generator(device=device).manual_seed(seed)
    drawn = _draw(order, gen, device, dtype)

    def read(name: str, split: tuple[int, int, int] | None) -> Tensor:
        got, t = next(drawn)
        if got != name:
            raise AssertionError(f"random weights drawn out of order: {got} before {name}")
        return _cut(t, split).clone()

    return read


def _draw(order: list[tuple[str, tuple[int, ...]]], gen: torch.Generator,
          device: torch.device, dtype: torch.dtype) -> Iterator[tuple[str, Tensor]]:
    for name, shape in order:
        t = torch.empty(shape, device=device, dtype=dtype)
        if name.endswith("layernorm.weight") or name == "norm.weight":
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=gen)
        yield name, t


def _gguf_reader(path: Path, plan: ShardPlan) -> tuple[ModelConfig, SliceReader, object]:
    """(config with its RoPE scaling, a reader, the file's tokenizer): each tensor dequantised
    whole when read, un-permuted (Q/K) and cut."""
    from dataclasses import replace

    import numpy as np

    from toyllm.models import gguf_file as g
    from toyllm.models.gguf_tokenizer import tokenizer_from_gguf
    from toyllm.models.tokenizer import TokenizerError

    reader = g._open(path)
    meta = g.read_metadata(reader)
    source = str(path)
    by_ours = {}
    for tensor in reader.tensors:
        ours = g.our_name(tensor.name)
        if ours is None:
            if tensor.name in g._SKIP:
                continue
            raise g.GGUFError(f"{source}: unexpected tensor {tensor.name} for a Llama model")
        by_ours[ours] = tensor
    config = plan.config
    if "rope_freqs.weight" in {t.name for t in reader.tensors}:
        factors = g._dequantize(next(t for t in reader.tensors
                                     if t.name == "rope_freqs.weight"), source)
        config = replace(config, rope_scaling=g.llama3_scaling_from_factors(factors, config, meta,
                                                                            source))
    shapes = expected_shapes(config)
    missing = sorted(set(shapes) - set(by_ours))
    if missing:
        raise g.GGUFError(f"{source}: missing tensors for {missing[:8]}")
    try:
        tokenizer = tokenizer_from_gguf(meta, source)
    except TokenizerError as exc:
        raise g.GGUFError(str(exc)) from None

    def read(name: str, split: tuple[int, int, int] | None) -> Tensor:
        tensor = by_ours[name]
        got = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if got != shapes[name]:
            raise g.GGUFError(f"{source}: tensor {tensor.name} has shape {list(got)}, expected "
                              f"{list(shapes[name])} from the metadata")
        w = g._dequantize(tensor, source)
        if ".attn_q." in tensor.name:
            w = g._unpermute(w, config.num_heads)
        elif ".attn_k." in tensor.name:
            w = g._unpermute(w, config.num_kv_heads)
        return _cut(torch.from_numpy(np.array(w, dtype=np.float32)), split).clone()

    return config, read, tokenizer
