"""Checkpoints: round trip, sharding, and clear errors for broken directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from toyllm.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from toyllm.models.config import ModelConfig
from toyllm.models.llama import build_model

CONFIG = ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=64, max_seq_len=64)


def saved(tmp_path: Path, **kw) -> Path:
    model = build_model(CONFIG, seed=3)
    return save_checkpoint(model, tmp_path / "ckpt", dtype=torch.float32, **kw)


def test_round_trip_keeps_weights_bit_exact(tmp_path: Path) -> None:
    model = build_model(CONFIG, seed=3)
    save_checkpoint(model, tmp_path / "ckpt", dtype=torch.float32)
    loaded, config = load_checkpoint(tmp_path / "ckpt")
    assert config == CONFIG
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_sharded_save_loads_the_same_model(tmp_path: Path) -> None:
    path = saved(tmp_path, max_shard_bytes=20_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model, _ = load_checkpoint(path)
    tokens = torch.randint(0, 128, (1, 9))
    ref = build_model(CONFIG, seed=3)
    pos = torch.arange(9).unsqueeze(0)
    assert torch.equal(model(tokens, pos), ref(tokens, pos))


def test_bf16_checkpoint_keeps_16_bit_storage(tmp_path: Path) -> None:
    path = save_checkpoint(build_model(CONFIG), tmp_path / "c", dtype=torch.bfloat16)
    tensors = load_file(str(path / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    model, _ = load_checkpoint(path)
    assert model.dtype == torch.bfloat16


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent")


def test_directory_without_config_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path)


def test_missing_weight_is_named(tmp_path: Path) -> None:
    path = saved(tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing weights.*layers.1.mlp.up_proj"):
        load_checkpoint(path)


def test_misshaped_weight_is_named_with_both_shapes(tmp_path: Path) -> None:
    path = saved(tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.norm.weight"] = torch.ones(31)
    save_file(tensors, str(path / "model.safetensors"))
    message = r"model.norm.weight has shape \[31\], expected \[32\]"
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_pickled_weights_are_refused_not_unpickled(tmp_path: Path) -> None:
    path = saved(tmp_path)
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_checkpoint(path)


def test_corrupt_safetensors_is_a_clear_error(tmp_path: Path) -> None:
    path = saved(tmp_path)
    (path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        load_checkpoint(path)
