"""Bad config files (config.json, config TOML): types checked, not coerced; every mutation of a
valid file is either accepted or refused in one line with exit code 2, no traceback, nothing
written."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from toyllm.engine.cli import app
from toyllm.models.config import ConfigError, load_config
from toyllm.models.model_source import DEFAULT_MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]
HF_CONFIG = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
TOML_CONFIG = (ROOT / "configs" / "tiny.toml").read_text()
runner = CliRunner()
FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# any JSON value, including the ones a careless hand writes
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=6,
)
HF_KEYS = sorted(HF_CONFIG) + ["rope_scaling", "rope_parameters", "head_dim", "sliding_window"]


def assert_refused_in_one_line(result, written_before: set[str], where: Path) -> None:
    """exit 0, or exit 2 with one `error:` line; never a traceback; nothing written."""
    assert result.exit_code in (0, 2), (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    if result.exit_code == 2:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert set(os.listdir(where)) == written_before


def info(path: Path):
    return runner.invoke(app, ["info", str(path), "--json"])


@settings(max_examples=50, **FUZZ)
@given(key=st.sampled_from(HF_KEYS), value=JSON_VALUES)
def test_a_mutated_config_json_is_accepted_or_refused_in_one_line(
        tmp_path: Path, key: str, value) -> None:
    data = dict(HF_CONFIG, **{key: value})
    (tmp_path / "config.json").write_text(json.dumps(data))
    before = set(os.listdir(tmp_path))
    result = info(tmp_path)
    assert_refused_in_one_line(result, before, tmp_path)


@settings(max_examples=25, **FUZZ)
@given(key=st.sampled_from(HF_KEYS), value=JSON_VALUES)
def test_a_mutated_config_json_never_coerces_types(tmp_path: Path, key: str, value) -> None:
    """What load_config accepts has the types the schema names: a string or a bool never
    stands in for a number, a number never for a bool."""
    (tmp_path / "config.json").write_text(json.dumps(dict(HF_CONFIG, **{key: value})))
    try:
        config = load_config(tmp_path / "config.json")
    except ConfigError:
        return
    assert isinstance(config.tie_embeddings, bool)
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                 "intermediate_size", "max_seq_len", "bos_id", "eos_id", "head_dim"):
        assert type(getattr(config, name)) is int, name
    for name in ("rope_theta", "norm_eps"):
        number = getattr(config, name)  # not `value`: the mutated value is asserted below
        assert type(number) in (int, float) and math.isfinite(number) and number > 0, name
    if key == "tie_word_embeddings":
        assert value is config.tie_embeddings
    if key in ("rope_theta", "rms_norm_eps"):
        assert type(value) in (int, float)


@settings(max_examples=50, **FUZZ)
@given(line=st.integers(min_value=0, max_value=TOML_CONFIG.count("\n") - 1),
       value=st.sampled_from(['"64"', "true", "1e11", "-1", "0", "nan", "inf", "[]", "{}",
                              "99999999999999999999", "1.5", '""', "[1, 2]"]))
def test_a_mutated_config_toml_is_accepted_or_refused_in_one_line(
        tmp_path: Path, line: int, value: str) -> None:
    lines = TOML_CONFIG.splitlines()
    if "=" not in lines[line]:
        return
    lines[line] = lines[line].split("=")[0] + "= " + value
    (tmp_path / "m.toml").write_text("\n".join(lines) + "\n")
    before = set(os.listdir(tmp_path))
    assert_refused_in_one_line(info(tmp_path / "m.toml"), before, tmp_path)


@settings(max_examples=25, **FUZZ)
@given(data=st.binary(max_size=64))
def test_arbitrary_bytes_as_a_config_file_are_refused_in_one_line(tmp_path: Path,
                                                                   data: bytes) -> None:
    for name in ("config.json", "m.toml"):
        (tmp_path / name).write_bytes(data)
    before = set(os.listdir(tmp_path))
    assert_refused_in_one_line(info(tmp_path), before, tmp_path)
    assert_refused_in_one_line(info(tmp_path / "m.toml"), before, tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"rope_theta": "10000"}, "rope_theta: expected a finite number > 0, got '10000'"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps: expected a finite number > 0"),
    ({"eos_token_id": []}, "eos_token_id: expected an integer or a non-empty list"),
    ({"eos_token_id": [2, "x"]}, "eos_token_id"),
    ({"rope_scaling": "llama3"}, "rope_scaling: expected a table"),
    ({"rope_parameters": 3}, "rope_parameters: expected a table"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings: expected true or false"),
    ({"tie_word_embeddings": 0}, "tie_word_embeddings: expected true or false"),
    ({"attention_bias": "false"}, "attention_bias: expected true or false"),
    ({"num_key_value_heads": 0}, "num_kv_heads: expected a positive integer"),
    ({"vocab_size": 2**40}, "vocab_size: expected a positive integer of at most 2**31 - 1"),
    ({"rope_theta": float("nan")}, "rope_theta"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "rope_scaling.factor"),
])
def test_issue_examples_are_config_errors_naming_the_key(tmp_path: Path, change: dict,
                                                          message: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(dict(HF_CONFIG, **change)))
    with pytest.raises(ConfigError) as info_:
        load_config(tmp_path)
    assert message in str(info_.value)
    assert "\n" not in str(info_.value)


@pytest.mark.parametrize("text", [b"\xff\xfe{", b"[" * 100_000,
                                  b'{"rope_theta": ' + b"9" * 5000 + b"}"])
def test_unreadable_json_is_a_config_error(tmp_path: Path, text: bytes) -> None:
    (tmp_path / "config.json").write_bytes(text)
    with pytest.raises(ConfigError):
        load_config(tmp_path)


def test_a_fifo_config_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "m.toml")
    with pytest.raises(ConfigError, match="FIFO"):
        load_config(tmp_path / "m.toml")


def test_a_string_is_not_a_bool_in_toml_either(tmp_path: Path) -> None:
    (tmp_path / "m.toml").write_text(TOML_CONFIG.replace("tie_embeddings = true",
                                                         'tie_embeddings = "false"'))
    with pytest.raises(ConfigError, match="tie_embeddings: expected true or false"):
        load_config(tmp_path / "m.toml")
