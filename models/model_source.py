"""Where a model comes from: the shipped default, a Hugging Face-layout directory, or a config
TOML with random weights (for experiments). One function, `load_model`, for every command."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from toyllm.models.checkpoint import CheckpointError, load_checkpoint
from toyllm.models.config import ConfigError, ModelConfig, load_config
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


def load_model(
    source: str | Path | None,
    device: torch.device,
    dtype: torch.dtype,
    random_weights: bool = False,
    seed: int = 0,
    tokenizer_path: str | Path | None = None,
) -> LoadedModel:
    """source None: the shipped default model. A directory: a checkpoint. A .gguf: a llama.cpp
    file (weights and tokenizer). A .toml: a config,
    which needs random_weights=True (its tokenizer is the default one when the vocab fits)."""
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
    if not path.exists():
        raise ModelSourceError(
            f"model not found: {path} (expected a checkpoint directory, a .gguf file or a config "
            ".toml)"
        )
    if path.is_dir():
        if random_weights:
            raise ModelSourceError("--random-weights goes with a config .toml, not a checkpoint")
        try:
            model, config = load_checkpoint(path, device=device, dtype=dtype)
        except (CheckpointError, ConfigError) as exc:
            raise ModelSourceError(str(exc)) from None
        # tokenizer.json first, then tokenizer.model, with the side files (tokenizer_files.py)
        tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else find_tokenizer(path)
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
        model = build_model(config, device=device, dtype=dtype, seed=seed)
        tok_file = Path(tokenizer_path) if tokenizer_path else DEFAULT_MODEL_DIR / "tokenizer.model"
        tokenizer = None
        if tok_file.exists():
            candidate = load_tokenizer(tok_file)
            if candidate.vocab_size <= config.vocab_size:
                tokenizer = candidate
            elif tokenizer_path:
                raise ModelSourceError(
                    f"tokenizer {tok_file} has {candidate.vocab_size} pieces but the config's "
                    f"vocab_size is {config.vocab_size}"
                )
    else:
        raise ModelSourceError(
            f"{path}: expected a checkpoint directory (config.json + safetensors), a .gguf file "
            "or a config .toml"
        )
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise ModelSourceError(
            f"tokenizer has {tokenizer.vocab_size} pieces, more than the model's vocab_size "
            f"{config.vocab_size}"
        )
    return LoadedModel(model, config, tokenizer, str(path), time.perf_counter() - t0)
