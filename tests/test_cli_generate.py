"""`toyllm generate`: works on a checkpoint, and every bad input is one clear line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_checkpoints import save_tiny_checkpoint
from typer.testing import CliRunner

from toyllm.engine.cli import app
from toyllm.models.model_source import DEFAULT_MODEL_DIR

TOKENIZER = DEFAULT_MODEL_DIR / "tokenizer.model"
pytestmark = pytest.mark.skipif(not TOKENIZER.is_file(), reason="default tokenizer not built")
runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), vocab_size=4096, max_seq_len=64,
                                seed=1, tokenizer_path=TOKENIZER)


def run(*args: str):
    return runner.invoke(app, list(args))


def test_help_lists_the_commands() -> None:
    result = run("--help")
    assert result.exit_code == 0
    assert "generate" in result.output


def test_generate_json_output(checkpoint: Path) -> None:
    r = run("generate", "def f(x):", "import os", "--model", str(checkpoint),
            "--max-new-tokens", "5", "--temperature", "0", "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [c["completion_tokens"] for c in data["completions"]] == [5, 5]
    assert data["stats"]["cache_bytes"] > 0


@pytest.mark.parametrize("flags, params", [
    (["--temperature", "0", "--repetition-penalty", "0.5"],
     dict(temperature=0.0, repetition_penalty=0.5)),
    (["--temperature", "1", "--min-p", "0.9", "--top-p", "1", "--seed", "4"],
     dict(temperature=1.0, min_p=0.9, seed=4)),
])
def test_min_p_and_repetition_penalty_reach_the_engine(checkpoint: Path, flags: list[str],
                                                       params: dict) -> None:
    from toyllm.engine.generate import Engine
    from toyllm.engine.sampling import SamplingParams
    from toyllm.models.model_source import load_model

    r = run("generate", "def f(x):", "--model", str(checkpoint), "--max-new-tokens", "8",
            "--json", "--device", "cpu", *flags)
    assert r.exit_code == 0, r.output
    loaded = load_model(str(checkpoint), torch.device("cpu"), torch.float32)
    want = Engine(loaded.model, loaded.tokenizer).generate(
        ["def f(x):"], SamplingParams(max_new_tokens=8, **params)).completions[0].token_ids
    plain = Engine(loaded.model, loaded.tokenizer).generate(
        ["def f(x):"], SamplingParams(max_new_tokens=8, **{**params, "min_p": 0.0,
                                                           "repetition_penalty": 1.0}))
    assert json.loads(r.stdout)["completions"][0]["token_ids"] == want
    assert want != plain.completions[0].token_ids  # the flag changed what came out


def test_generate_streams_one_prompt(checkpoint: Path) -> None:
    r = run("generate", "class A:", "--model", str(checkpoint), "--max-new-tokens", "4",
            "--seed", "0", "--stats")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("class A:")
    assert "tok/s" in r.stderr


def test_streamed_text_is_printed_as_the_model_wrote_it(checkpoint: Path, monkeypatch) -> None:
    # the stream is the completion's text exactly: no emoji codes or markup rendered in it
    from toyllm.engine.generate import Engine

    pieces = ["x = ", ":smile: ", "[bold]y[/bold]", " \\n"]
    real = Engine.generate

    def fake(self, inputs, params, on_text=None, **kw):
        result = real(self, inputs, params, **kw)
        for piece in pieces:
            on_text(0, piece)
        return result

    monkeypatch.setattr(Engine, "generate", fake)
    r = run("generate", "class A:", "--model", str(checkpoint), "--max-new-tokens", "2",
            "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert r.stdout == "class A:" + "".join(pieces) + "\n"


def test_prompts_file(checkpoint: Path, tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('"a = 1"\n{"prompt": "b = 2"}\n')
    r = run("generate", "--prompts-file", str(f), "--model", str(checkpoint),
            "--max-new-tokens", "3", "--json")
    assert r.exit_code == 0, r.output
    assert [c["prompt"] for c in json.loads(r.stdout)["completions"]] == ["a = 1", "b = 2"]


def test_random_weights_from_a_config(tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text("vocab_size = 4096\nhidden_size = 32\nnum_layers = 1\nnum_heads = 2\n"
                   "num_kv_heads = 1\nintermediate_size = 48\nmax_seq_len = 64\n")
    r = run("generate", "x", "--model", str(cfg), "--random-weights", "--max-new-tokens", "3",
            "--json")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("args, message", [
    (["", ], "empty"),
    (["x" * 2000, "--max-context", "64"], "context holds"),
    (["x", "--max-new-tokens", "0"], "max_new_tokens: expected a positive integer"),
    (["x", "--temperature", "-1"], "temperature: expected a finite number >= 0"),
    (["x", "--top-p", "0"], r"top_p: expected a number in \(0, 1\]"),
    (["x", "--top-p", "1.5"], r"top_p: expected a number in \(0, 1\]"),
    (["x", "--top-k", "-2"], "top_k"),
    (["x", "--device", "tpu"], "unknown device"),
    (["x", "--dtype", "fp8"], "unknown dtype"),
    (["x", "--prefill-chunk", "0"], "prefill-chunk"),
    (["x", "--stop", ""], "stop: expected non-empty"),
    (["--prompts-file", "/nonexistent/p.txt"], "prompts file not found"),
    ([], "no prompt given"),
    (["x", "--tokenizer", "/nonexistent/tokenizer.model"], "tokenizer not found"),
])
def test_bad_input_is_one_clear_line(checkpoint: Path, args: list[str], message: str) -> None:
    r = run("generate", *args, "--model", str(checkpoint))
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    assert message.replace("\\", "") in r.stderr.replace("\n", "") or \
        __import__("re").search(message, r.stderr.replace("\n", "")), r.stderr


@pytest.mark.parametrize("model, message", [
    ("/nonexistent/model", "model not found"),
    (".", "not a checkpoint"),
    ("configs/tiny.toml", "--random-weights"),
    ("README.md", "expected a checkpoint directory"),
])
def test_bad_model_path_is_one_clear_line(model: str, message: str) -> None:
    root = Path(__file__).resolve().parents[1]
    r = run("generate", "x", "--model", str(root / model))
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    assert message in r.stderr.replace("\n", ""), r.stderr


def test_a_checkpoint_written_by_transformers_runs_through_generate(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    import shutil

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    shutil.copyfile(TOKENIZER, tmp_path / "tokenizer.model")
    r = run("generate", "def f(x):", "--model", str(tmp_path), "--max-new-tokens", "8",
            "--temperature", "0", "--json")
    assert r.exit_code == 0, r.output
    (completion,) = json.loads(r.stdout)["completions"]
    assert completion["completion_tokens"] == 8 or completion["finish_reason"] == "eos"


def test_prompts_file_that_is_not_utf8_is_one_clear_line(checkpoint: Path, tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_bytes(b"\xff\xfe not text")
    r = run("generate", "--prompts-file", str(f), "--model", str(checkpoint))
    assert r.exit_code == 2, r.output
    assert "expected UTF-8 text" in r.stderr and "Traceback" not in r.output
