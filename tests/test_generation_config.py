"""A checkpoint's generation_config.json sets the CLI's sampling defaults
(models/generation_config.py, engine/sampling.py's sampling_fields); options given on the command
line win; a bad file is refused in one line naming the file, the field and the value."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from toyllm.engine.cli import app
from toyllm.engine.sampling import CLI_SAMPLING_DEFAULTS, sampling_fields
from toyllm.models.generation_config import (
    GenerationConfigError,
    read_sampling_defaults,
)
from toyllm.models.model_source import DEFAULT_MODEL_DIR

runner = CliRunner()


def test_fields_read_and_others_ignored(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
         "do_sample": True, "max_length": 100, "eos_token_id": [1, 2], "top_a": None}))
    assert read_sampling_defaults(tmp_path) == {
        "temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1}
    assert read_sampling_defaults(tmp_path / "nothing-here") == {}


@pytest.mark.parametrize("text, fragment", [
    ("{", "expected a JSON object"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"temperature": "hot"}', "temperature must be a number, got 'hot'"),
    ('{"temperature": -0.5}', "temperature must be >= 0.0, got -0.5"),
    ('{"temperature": true}', "temperature must be a number, got True"),
    ('{"top_k": 2.5}', "top_k must be an integer, got 2.5"),
    ('{"top_k": -1}', "top_k must be >= 0, got -1"),
    ('{"top_p": 0}', "top_p must be in (0, 1], got 0"),
    ('{"top_p": 1.5}', "top_p must be in (0, 1], got 1.5"),
    ('{"min_p": 2}', "min_p must be in [0.0, 1.0], got 2"),
    ('{"repetition_penalty": 0}', "repetition_penalty must be > 0, got 0"),
    ('{"repetition_penalty": 1e999}', "repetition_penalty must be a number, got inf"),
])
def test_bad_files_refused(tmp_path: Path, text: str, fragment: str) -> None:
    (tmp_path / "generation_config.json").write_text(text)
    with pytest.raises(GenerationConfigError) as info:
        read_sampling_defaults(tmp_path)
    assert fragment in str(info.value) and "generation_config.json" in str(info.value)


def test_given_beats_model_beats_cli_defaults() -> None:
    fields = sampling_fields({"temperature": 0.0, "top_k": None, "min_p": None},
                             {"top_k": 40, "temperature": 0.9})
    assert fields == {**CLI_SAMPLING_DEFAULTS, "temperature": 0.0, "top_k": 40}


def test_shipped_model_has_its_sampling() -> None:
    """The shipped model's defaults (docs/DEFAULT_MODEL.md says why these values)."""
    assert read_sampling_defaults(DEFAULT_MODEL_DIR) == {
        "temperature": 0.7, "top_p": 0.95, "min_p": 0.05, "repetition_penalty": 1.1}


@pytest.fixture(scope="module")
def checkpoint_copy(tmp_path_factory) -> Path:
    """The shipped checkpoint copied, so that its generation_config.json can be rewritten."""
    out = tmp_path_factory.mktemp("ckpt")
    for f in DEFAULT_MODEL_DIR.iterdir():
        if f.is_file():
            shutil.copyfile(f, out / f.name)
    return out


def _text(args: list[str]) -> str:
    result = runner.invoke(app, ["generate", "def ", "--max-new-tokens", "12", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["completions"][0]["token_ids"]


def test_cli_takes_the_checkpoints_defaults(checkpoint_copy: Path) -> None:
    """A checkpoint asking for greedy decoding gets it without flags, and what it sets equals
    the same values given as flags on a checkpoint without the file; a flag overrides it."""
    gen = checkpoint_copy / "generation_config.json"
    gen.write_text('{"temperature": 0, "repetition_penalty": 1.3}')
    from_file = _text(["--model", str(checkpoint_copy)])
    assert from_file == _text(["--model", str(checkpoint_copy), "--seed", "5"])  # greedy
    gen.unlink()
    assert from_file == _text(["--model", str(checkpoint_copy), "--temperature", "0",
                               "--repetition-penalty", "1.3"])
    gen.write_text('{"temperature": 0, "repetition_penalty": 1.3}')
    assert _text(["--model", str(checkpoint_copy), "--repetition-penalty", "1"]) == \
        _text(["--model", str(checkpoint_copy), "--temperature", "0", "--repetition-penalty",
               "1", "--min-p", "0"])


def test_cli_refuses_a_bad_file(checkpoint_copy: Path) -> None:
    (checkpoint_copy / "generation_config.json").write_text('{"top_p": 7}')
    try:
        for command in (["generate", "def "], ["chat", "--prompt", "hi"]):
            result = runner.invoke(app, [*command, "--model", str(checkpoint_copy)])
            assert result.exit_code == 2, result.output
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            assert len(lines) == 1 and "top_p must be in (0, 1], got 7" in lines[0], lines
    finally:
        (checkpoint_copy / "generation_config.json").unlink()
