"""Hostile and corrupted checkpoints, written by the tests: each is refused at load with one
line naming what is wrong (the tensor, the file), never opened outside the checkpoint
directory, never hangs."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from toyllm.engine.cli import app
from toyllm.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from toyllm.models.config import ModelConfig
from toyllm.models.llama import build_model
from toyllm.models.model_source import DEFAULT_MODEL_DIR

TOKENIZER = DEFAULT_MODEL_DIR / "tokenizer.model"
CONFIG = ModelConfig(vocab_size=4096, hidden_size=32, num_layers=1, num_heads=2,
                     num_kv_heads=1, intermediate_size=48, max_seq_len=32)
SHARD = "model-00001-of-00001.safetensors"
runner = CliRunner()


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good")
    save_checkpoint(build_model(CONFIG, seed=1), path, tokenizer_path=TOKENIZER,
                    dtype=torch.float32)
    return path


@pytest.fixture
def ckpt(good: Path, tmp_path: Path) -> Path:
    path = tmp_path / "ckpt"
    shutil.copytree(good, path)
    return path


@pytest.fixture(autouse=True)
def never_hang():
    """A FIFO or a loop that blocked would fail the test instead of hanging the suite."""
    def alarm(signum, frame):
        raise AssertionError("blocked for 20 s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def edit_tensors(path: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def as_index(path: Path, weight_map) -> None:
    """Turn the single file into an index naming `weight_map` (the real shard is kept)."""
    os.rename(path / "model.safetensors", path / SHARD)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def refused(path: Path, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_the_good_checkpoint_loads(good: Path) -> None:
    model, config = load_checkpoint(good)
    assert config.vocab_size == CONFIG.vocab_size


def test_truncated_safetensors_is_refused(ckpt: Path) -> None:
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    refused(ckpt, "model.safetensors", "cannot read safetensors")


def test_an_empty_safetensors_file_is_refused(ckpt: Path) -> None:
    (ckpt / "model.safetensors").write_bytes(b"")
    refused(ckpt, "cannot read safetensors")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_non_float_weights_are_refused_naming_the_tensor(ckpt: Path, dtype) -> None:
    def to_int(t):
        t["model.norm.weight"] = t["model.norm.weight"].to(dtype)

    edit_tensors(ckpt, to_int)
    refused(ckpt, "model.norm.weight", str(dtype).removeprefix("torch."), "floating-point")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_non_finite_weights_are_refused_naming_the_tensor(ckpt: Path, bad: float,
                                                           stored) -> None:
    def poison(t):
        w = t["model.layers.0.mlp.down_proj.weight"].to(stored).clone()
        w.view(-1)[7] = bad
        t["model.layers.0.mlp.down_proj.weight"] = w

    edit_tensors(ckpt, poison)
    refused(ckpt, "model.layers.0.mlp.down_proj.weight", "1 non-finite value")


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd",
                                  "sub/../../outside.safetensors"])
def test_an_index_naming_a_file_outside_the_directory_is_refused(ckpt: Path, name: str) -> None:
    shutil.copyfile(ckpt / "model.safetensors", ckpt.parent / "outside.safetensors")
    as_index(ckpt, {"model.embed_tokens.weight": name})
    refused(ckpt, "outside", "refused")


def test_an_index_naming_a_symlink_that_leaves_the_directory_is_refused(ckpt: Path) -> None:
    shutil.copyfile(ckpt / "model.safetensors", ckpt.parent / "outside.safetensors")
    os.symlink(ckpt.parent / "outside.safetensors", ckpt / "inner.safetensors")
    as_index(ckpt, {"model.embed_tokens.weight": "inner.safetensors"})
    refused(ckpt, "outside", "refused")


def test_a_weights_file_symlinked_outside_is_refused(ckpt: Path) -> None:
    os.rename(ckpt / "model.safetensors", ckpt.parent / "elsewhere.safetensors")
    os.symlink(ckpt.parent / "elsewhere.safetensors", ckpt / "model.safetensors")
    refused(ckpt, "outside", "refused")


def test_a_symlink_inside_the_directory_is_fine(ckpt: Path) -> None:
    os.rename(ckpt / "model.safetensors", ckpt / "real.safetensors")
    os.symlink("real.safetensors", ckpt / "model.safetensors")
    load_checkpoint(ckpt)


def test_a_symlink_loop_is_refused(ckpt: Path) -> None:
    os.remove(ckpt / "model.safetensors")
    os.symlink("model.safetensors", ckpt / "model.safetensors")
    refused(ckpt, "model.safetensors")


def test_a_two_link_loop_in_an_index_is_refused(ckpt: Path) -> None:
    os.symlink("b.safetensors", ckpt / "a.safetensors")
    os.symlink("a.safetensors", ckpt / "b.safetensors")
    as_index(ckpt, {"model.embed_tokens.weight": "a.safetensors"})
    refused(ckpt, "a.safetensors")


@pytest.mark.parametrize("name", ["model.safetensors", "config.json",
                                  "model.safetensors.index.json"])
def test_a_fifo_is_refused_without_blocking(ckpt: Path, name: str) -> None:
    (ckpt / name).unlink(missing_ok=True)
    os.mkfifo(ckpt / name)
    refused(ckpt, "FIFO")


@pytest.mark.parametrize("weight_map", [[1, 2], "model.safetensors", {}, None,
                                        {"model.embed_tokens.weight": 5},
                                        {"model.embed_tokens.weight": ""}])
def test_a_malformed_weight_map_is_refused(ckpt: Path, weight_map) -> None:
    as_index(ckpt, weight_map)
    refused(ckpt, "model.safetensors.index.json")


def test_an_index_naming_a_directory_or_a_missing_shard_is_refused(ckpt: Path) -> None:
    (ckpt / "shards").mkdir()
    as_index(ckpt, {"model.embed_tokens.weight": "shards"})
    refused(ckpt, "directory")
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.embed_tokens.weight": "nope.safetensors"}}))
    refused(ckpt, "does not exist", "nope.safetensors")


@pytest.mark.parametrize("text", ["{not json", "[]", "[" * 100_000])
def test_an_index_that_is_not_an_object_is_refused(ckpt: Path, text: str) -> None:
    (ckpt / "model.safetensors.index.json").write_text(text)
    refused(ckpt, "model.safetensors.index.json")


def test_a_hub_snapshot_linking_into_its_blobs_loads(good: Path, tmp_path: Path) -> None:
    """Hugging Face's cache links snapshots/<rev>/file -> ../../blobs/<hash>: inside."""
    repo = tmp_path / "models--x--y"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc"
    snap.mkdir(parents=True)
    for f in good.iterdir():
        shutil.copyfile(f, repo / "blobs" / f.name)
        os.symlink(Path("../../blobs") / f.name, snap / f.name)
    load_checkpoint(snap)


@pytest.mark.parametrize("corrupt", ["nan", "int32", "outside", "fifo"])
def test_generate_on_a_corrupted_checkpoint_is_one_line_exit_2(ckpt: Path, corrupt: str) -> None:
    if corrupt == "nan":
        edit_tensors(ckpt, lambda t: t["model.norm.weight"].fill_(float("nan")))
    elif corrupt == "int32":
        edit_tensors(ckpt, lambda t: t.update(
            {"model.norm.weight": t["model.norm.weight"].to(torch.int32)}))
    elif corrupt == "outside":
        as_index(ckpt, {"model.embed_tokens.weight": "/etc/passwd"})
    else:
        (ckpt / "model.safetensors").unlink()
        os.mkfifo(ckpt / "model.safetensors")
    result = runner.invoke(app, ["generate", "x", "--model", str(ckpt), "--max-new-tokens", "2"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr


def test_a_tokenizer_smaller_than_the_vocab_is_refused_before_the_weights(tmp_path: Path) -> None:
    big = tmp_path / "big"
    save_checkpoint(build_model(CONFIG.with_overrides(vocab_size=5000), seed=1), big,
                    tokenizer_path=TOKENIZER, dtype=torch.float32)
    (big / "model.safetensors").write_bytes(b"not read")  # proves the check comes first
    result = runner.invoke(app, ["generate", "x", "--model", str(big)])
    assert result.exit_code == 2
    assert "vocab_size is 5000" in result.stderr and "4096 pieces" in result.stderr


@pytest.mark.parametrize("name", ["config.json", "tokenizer.model"])
def test_a_config_or_tokenizer_linked_outside_the_checkpoint_is_refused(ckpt: Path,
                                                                        name: str) -> None:
    os.rename(ckpt / name, ckpt.parent / name)
    os.symlink(ckpt.parent / name, ckpt / name)
    result = runner.invoke(app, ["generate", "x", "--model", str(ckpt), "--max-new-tokens", "2"])
    assert result.exit_code == 2, result.output
    assert "outside" in result.stderr and "refused" in result.stderr
