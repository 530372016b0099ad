"""Where a model comes from: the shipped default, a Hugging Face-layout directory, or a config
TOML with random weights (for experiments). One function, `load_model`, for every command."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from toyllm.models.checkpoint import CheckpointError, inside_checkpoint, load_checkpoint
from toyllm.models.config import ConfigError, ModelConfig, load_config
from toyllm.models.generation_config import GenerationConfigError, read_sampling_defaults
from toyllm.models.hf_tokenizer import HFTokenizer
from toyllm.models.llama import Transformer, build_model
from toyllm.models.shipped import config_names, resolve_config
from toyllm.models.tokenizer import Tokenizer
from toyllm.models.tokenizer_files import find_tokenizer, load_tokenizer

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default"


class ModelSourceError(ValueError):
    """A --model argument that names nothing loadable."""


@dataclass
class LoadedModel:
    model: Transformer
    config: ModelConfig
    tokenizer: Tokenizer | HFTokenizer | None
    source: str
    load_s: float
    # a checkpoint directory's generation_config.json sampling fields (models/generation_config.py)
    sampling_defaults: dict[str, float | int] = field(default_factory=dict)


def load_model(
    source: str | Path | None,
    device: torch.device,
    dtype: torch.dtype,
    random_weights: bool = False,
    seed: int = 0,
    tokenizer_path: str | Path | None = None,
) -> LoadedModel:
    """source None: the shipped default model. A directory: a checkpoint. A .gguf: a llama.cpp
    file (weights and tokenizer). A .toml (or a shipped config's name): a config, which needs
    random_weights=True (its tokenizer is the default one, or tokenizer_path). The tokenizer and
    the model must agree on the vocabulary (_check_vocab), checked before any weight is read."""
    if source is not None:  # a path that exists, else a shipped config's name
        try:
            source = resolve_config(source)
        except ConfigError:
            raise ModelSourceError(
                f"model not found: {source} (expected a checkpoint directory, a .gguf file, a "
                f"config .toml or a shipped config: {', '.join(config_names())})"
            ) from None
    t0 = time.perf_counter()
    if tokenizer_path is not None and not Path(tokenizer_path).exists():
        raise ModelSourceError(f"tokenizer not found: {tokenizer_path}")
    path = Path(source) if source is not None else DEFAULT_MODEL_DIR
    sampling_defaults: dict[str, float | int] = {}
    if not path.exists():
        raise ModelSourceError(
            f"model not found: {path} (expected a checkpoint directory, a .gguf file or a config "
            ".toml)"
        )
    if path.is_dir():
        if random_weights:
            raise ModelSourceError("--random-weights goes with a config .toml, not a checkpoint")
        try:
            if not tokenizer_path:  # the checkpoint's own tokenizer, like its weights,
                for name in ("tokenizer.json", "tokenizer.model"):  # resolves inside it
                    if (path / name).exists() or (path / name).is_symlink():
                        inside_checkpoint(path, name, str(path))
            # tokenizer.json first, then tokenizer.model, with the side files (tokenizer_files.py)
            tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else find_tokenizer(path)
            if tokenizer is not None and (path / "config.json").is_file():
                # the cheap check first: a mismatch is refused before any weight is read
                config_file = inside_checkpoint(path, "config.json", str(path))
                _check_vocab(path, tokenizer, load_config(config_file))
            sampling_defaults = read_sampling_defaults(path)  # before the weights: cheap
            model, config = load_checkpoint(path, device=device, dtype=dtype)
        except (CheckpointError, ConfigError, GenerationConfigError) as exc:
            raise ModelSourceError(str(exc)) from None
    elif path.suffix == ".gguf":
        if random_weights:
            raise ModelSourceError("--random-weights goes with a config .toml, not a GGUF file")
        from toyllm.models.gguf_file import load_gguf

        try:
            model, config, tokenizer = load_gguf(path, device=device, dtype=dtype)
        except (CheckpointError, ConfigError) as exc:
            raise ModelSourceError(str(exc)) from None
        if tokenizer_path:
            tokenizer = load_tokenizer(tokenizer_path)
    elif path.suffix == ".toml":
        if not random_weights:
            raise ModelSourceError(
                f"{path} is a config, not a checkpoint: add --random-weights to run it with "
                "random weights"
            )
        try:
            config = load_config(path)
        except ConfigError as exc:
            raise ModelSourceError(str(exc)) from None
        tok_file = Path(tokenizer_path) if tokenizer_path else DEFAULT_MODEL_DIR / "tokenizer.model"
        tokenizer = load_tokenizer(tok_file) if tok_file.exists() else None
        if tokenizer is not None:
            _check_vocab(path, tokenizer, config)  # before any weight is built
        model = build_model(config, device=device, dtype=dtype, seed=seed)
    else:
        raise ModelSourceError(
            f"{path}: expected a checkpoint directory (config.json + safetensors), a .gguf file "
            "or a config .toml"
        )
    if tokenizer is not None:
        _check_vocab(path, tokenizer, config)
    return LoadedModel(model, config, tokenizer, str(path), time.perf_counter() - t0,
                       sampling_defaults)


def _check_vocab(path: Path, tokenizer: Tokenizer | HFTokenizer, config: ModelConfig) -> None:
    """The tokenizer and the model must have the same vocabulary size. Fewer pieces: the model
    samples ids the tokenizer cannot decode (random weights do so at once, a trained model may
    later), ending the run mid-stream; more: a prompt can hold ids the model has no embedding
    for. Refused before anything runs, rather than sampling from part of the vocabulary, which
    would quietly change the model's distribution. One exception: a tokenizer.json may have
    fewer pieces than a checkpoint's embedding, which Hugging Face models often pad to a round
    size (the tokenizers library decodes a padding id to nothing)."""
    padded = isinstance(tokenizer, HFTokenizer) and path.suffix != ".toml"
    if tokenizer.vocab_size > config.vocab_size or (
            tokenizer.vocab_size < config.vocab_size and not padded):
        fix = (f"set vocab_size = {tokenizer.vocab_size} in the config or pass --tokenizer with "
               f"{config.vocab_size} pieces" if path.suffix == ".toml"
               else "pass --tokenizer with a matching tokenizer.model")
        raise ModelSourceError(
            f"{path}: the model's vocab_size is {config.vocab_size} but the tokenizer "
            f"{getattr(tokenizer, 'path', '')} has {tokenizer.vocab_size} pieces; {fix}"
        )
