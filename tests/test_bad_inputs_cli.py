"""Numbers and options on the command line: any value is run or refused in one line with exit
code 2 and no traceback; help tells the truth (-h, --version, no value labels on flags)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from toyllm.engine import cli
from toyllm.engine.cli import app
from toyllm.engine.tools import bench
from toyllm.models.model_source import DEFAULT_MODEL_DIR

runner = CliRunner()
FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TOKENIZER = DEFAULT_MODEL_DIR / "tokenizer.model"

# what a hand types where a number goes
NUMBERS = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", " ", "abc", "1e-300", "1e308", "-0", "0x10", "1_000", "nan", "-inf",
                     "2**64", "18446744073709551616", "1,2", "１"]),
)


def one_line_or_ok(result) -> None:
    assert result.exit_code in (0, 2), (result.exit_code, result.output)
    assert "Traceback" not in result.stderr  # (stdout may be generated text: any word)
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    if result.exit_code == 2:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr


def refused(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    one_line_or_ok(result)
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture(scope="module")
def tiny_toml(tmp_path_factory) -> Path:
    """A random-weight model with the shipped tokenizer's vocabulary and a 16-token context,
    so any accepted number generates at most a few tokens."""
    path = tmp_path_factory.mktemp("m") / "m.toml"
    path.write_text("vocab_size = 4096\nhidden_size = 16\nnum_layers = 1\nnum_heads = 2\n"
                    "num_kv_heads = 1\nintermediate_size = 16\nmax_seq_len = 16\n")
    return path


@pytest.mark.skipif(not TOKENIZER.is_file(), reason="default tokenizer not built")
@settings(max_examples=50, **FUZZ)
@given(option=st.sampled_from(["--max-new-tokens", "--temperature", "--top-k", "--top-p",
                               "--min-p", "--repetition-penalty", "--seed", "--prefill-chunk",
                               "--max-context"]),
       value=NUMBERS)
def test_any_generate_number_runs_or_is_refused_in_one_line(tiny_toml: Path, option: str,
                                                             value: str) -> None:
    result = runner.invoke(app, ["generate", "x", "--model", str(tiny_toml), "--random-weights",
                                 "--json", option, value])
    one_line_or_ok(result)


@settings(max_examples=50, **FUZZ)
@given(option=st.sampled_from(["--batches", "--contexts", "--new-tokens", "--positions",
                               "--prefill"]),
       value=NUMBERS)
def test_any_bench_number_is_checked_before_anything_runs(monkeypatch: pytest.MonkeyPatch,
                                                         option: str, value: str) -> None:
    ran = []
    monkeypatch.setattr(bench, "run", lambda args: ran.append(args) or 0)
    result = runner.invoke(app, ["bench", "--device", "cpu", "--models", "default",
                                 "--contexts", "8", option, value]
                           if option != "--contexts" else
                           ["bench", "--device", "cpu", "--models", "default", option, value])
    one_line_or_ok(result)
    if result.exit_code == 2:
        assert not ran
    else:
        (args,) = ran
        assert all(b >= 1 for b in args.batches) and args.new_tokens >= 2


@pytest.mark.parametrize("args, message", [
    (["bench", "--batches", "abc"], "--batches: expected"),
    (["bench", "--new-tokens", "0"], "--new-tokens: expected an integer in [2,"),
    (["bench", "--new-tokens", "1"], "--new-tokens"),
    (["bench", "--models", ""], "--models"),
    (["bench", "--models", "nope"], "nope"),
    (["bench", "--contexts", "2000", "--models", "default"], "no context fits"),
    (["bench", "--positions", "x"], "--positions"),
    (["check", "--configs", ""], "--configs: expected case names"),
    (["check", "--configs", ",", "--no-hf"], "--configs"),
    (["check", "--json", "/nonexistent/dir/r.json"], "does not exist"),
    (["generate", "x", "--seed", str(2**64)], "seed: expected an integer in [0, 2**64 - 1]"),
    (["generate", "x", "--seed", "-1"], "seed"),
    (["generate", "x", "--max-new-tokens", "abc"], "--max-new-tokens"),
    *[([command, *args, flag, value], message)
      for command, args in (("generate", ["x"]), ("chat", ["--prompt", "x"]))
      for flag, value, message in (
          ("--min-p", "nan", "--min-p: expected a finite number in [0.0, 1.0], got nan"),
          ("--min-p", "-0.1", "--min-p: expected a finite number in [0.0, 1.0], got -0.1"),
          ("--min-p", "1.5", "--min-p: expected a finite number in [0.0, 1.0], got 1.5"),
          ("--min-p", "inf", "--min-p: expected a finite number in [0.0, 1.0], got inf"),
          ("--min-p", "abc", "'--min-p'"),
          ("--repetition-penalty", "0", "--repetition-penalty: expected a finite number > 0, "
                                        "got 0.0"),
          ("--repetition-penalty", "-1.2", "--repetition-penalty: expected a finite number > 0,"
                                           " got -1.2"),
          ("--repetition-penalty", "nan", "--repetition-penalty: expected a finite number > 0"),
          ("--repetition-penalty", "inf", "--repetition-penalty: expected a finite number > 0"),
          ("--repetition-penalty", "x1", "'--repetition-penalty'"))],
    (["generate", "x", "--no-such-flag"], "No such option"),
    (["info", "--batch", str(10**40)], "--batch"),
    (["nope"], "No such command"),
])
def test_bad_cli_input_is_one_line_exit_2(monkeypatch: pytest.MonkeyPatch, args: list[str],
                                          message: str) -> None:
    monkeypatch.setattr(bench, "run", lambda a: pytest.fail("bench ran"))
    refused(runner.invoke(app, args), message)


def test_bench_defaults_are_its_documented_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    ran = []
    monkeypatch.setattr(bench, "run", lambda args: ran.append(args) or 0)
    assert runner.invoke(app, ["bench", "--device", "cpu"]).exit_code == 0
    (args,) = ran
    assert (args.models, args.batches, args.contexts, args.new_tokens) == \
        (["stories15m"], [1], [32], 64)


@pytest.mark.parametrize("command", ["", "generate", "bench", "check", "info", "sweep"])
def test_help_has_h_and_no_value_labels_on_flags(command: str) -> None:
    args = [command] if command else []
    short = runner.invoke(app, [*args, "-h"])
    long = runner.invoke(app, [*args, "--help"])
    assert short.exit_code == long.exit_code == 0
    assert short.stdout == long.stdout
    assert "<bool>" not in short.stdout and "BOOLEAN" not in short.stdout
    if command in ("generate", "bench"):
        assert "--json" in short.stdout and "--no-" in short.stdout


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.startswith("toyllm ") and len(result.stdout.splitlines()) == 1


def test_the_error_handler_survives_a_module_that_fails_to_import(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad TOYLLM_* value makes a module raise at import; the handler must not import it
    again and fail the same way (the double traceback of issue 17)."""
    monkeypatch.setitem(sys.modules, "toyllm.engine.settings", None)  # import raises

    class SettingsError(ValueError):
        pass

    SettingsError.__module__ = "toyllm.engine.settings"
    assert cli.is_user_error(SettingsError("TOYLLM_X: expected 0 or 1, got 'maybe'"))
    assert not cli.is_user_error(ValueError("a bug"))
    assert not cli.is_user_error(RuntimeError("a bug"))

    def body() -> None:
        raise SettingsError("TOYLLM_X: expected 0 or 1, got 'maybe'")

    with pytest.raises(Exception) as info:
        cli._run(body)
    assert info.type.__name__ == "Exit" and info.value.exit_code == 2
