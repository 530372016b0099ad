"""Small random-weight checkpoints on disk, for the tests that load a model as a user does
(the CLI, chat, the server): the same layer shapes everywhere, the vocabulary, context and
seed each test needs."""

from __future__ import annotations

from pathlib import Path

import torch

from toyllm.models.checkpoint import save_checkpoint
from toyllm.models.config import ModelConfig
from toyllm.models.llama import build_model


def save_tiny_checkpoint(path: Path, *, vocab_size: int, max_seq_len: int, seed: int,
                         tokenizer_path: Path | None = None) -> Path:
    """A 2-layer GQA model (hidden 64, 4 heads, 2 KV heads) saved in fp32 at `path`, with the
    tokenizer file at `tokenizer_path` copied beside it when given."""
    config = ModelConfig(vocab_size=vocab_size, hidden_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, intermediate_size=96, max_seq_len=max_seq_len)
    save_checkpoint(build_model(config, seed=seed), path, tokenizer_path=tokenizer_path,
                    dtype=torch.float32)
    return path
