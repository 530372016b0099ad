"""`toyllm sweep` with bad experiment files, bad output paths and interruptions: refused in one
line before any point runs, nothing written; results on disk after every point; SIGTERM and
Ctrl-C keep what was measured; oversized grids refused by their size, before expansion."""

from __future__ import annotations

import csv
import json
import os
import signal
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import toyllm.engine.tools.sweep as sweep
import toyllm.engine.tools.sweep_plots as sweep_plots
from toyllm.engine.cli import app
from toyllm.engine.tools.sweep_spec import MAX_POINTS

runner = CliRunner()
FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
BASE = ("vocab_size = 64\nhidden_size = 16\nnum_layers = 1\nnum_heads = 2\nnum_kv_heads = 1\n"
        "intermediate_size = 16\nmax_seq_len = 64\n")
EXPERIMENT = """name = "t"
base = "base.toml"
device = "cpu"
[model]
max_seq_len = 64
[grid]
num_kv_heads = [1, 2]
batch_size = [1, 2]
context = [32]
[run]
prompt_tokens = 8
new_tokens = 4
check_tokens = 4
threads = 1
seed = 0
"""


@pytest.fixture(autouse=True)
def no_measuring(monkeypatch: pytest.MonkeyPatch):
    """Points are 'measured' by arithmetic alone, and no figure is drawn: the tests are about
    what the sweep does around its points."""
    calls: list[int] = []

    def fake_point(exp, point, models, checks):
        calls.append(point.index)
        return dict(sweep.analytic_row(exp, point), status="ok")

    monkeypatch.setattr(sweep, "run_point", fake_point)
    monkeypatch.setattr(sweep_plots, "write_plots", lambda rows, axes, out: [])
    return calls


def write(tmp_path: Path, text: str = EXPERIMENT) -> Path:
    (tmp_path / "base.toml").write_text(BASE)
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return path


def invoke(*args) -> object:
    return runner.invoke(app, ["sweep", *map(str, args)])


def refused_in_one_line(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_the_experiment_runs(tmp_path: Path, no_measuring: list[int]) -> None:
    result = invoke(write(tmp_path), "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert no_measuring == [0, 1, 2, 3]
    assert json.loads((tmp_path / "out" / "sweep.json").read_text())["complete"] is True


VALUES = st.sampled_from(['"x"', "true", "1e11", "100000000000", "-1", "0", "nan", "[]",
                          "[0]", "[1e11]", '["fp8"]', "{}", "[[1]]", '"fill"', "[1, 1]",
                          "99999999999999999999", "[100000]"])


@settings(max_examples=50, **FUZZ)
@given(line=st.integers(min_value=0, max_value=EXPERIMENT.count("\n") - 1), value=VALUES)
def test_a_mutated_experiment_runs_or_is_refused_before_any_point(
        tmp_path: Path, no_measuring: list[int], line: int, value: str) -> None:
    lines = EXPERIMENT.splitlines()
    if "=" not in lines[line]:
        return
    lines[line] = lines[line].split("=")[0] + "= " + value
    out = tmp_path / f"out-{line}-{abs(hash(value))}"
    no_measuring.clear()
    result = invoke(write(tmp_path, "\n".join(lines) + "\n"), "--out", out)
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        refused_in_one_line(result)
        assert not no_measuring and not out.exists()


@settings(max_examples=25, **FUZZ)
@given(data=st.binary(max_size=48))
def test_arbitrary_bytes_as_an_experiment_are_refused_in_one_line(tmp_path: Path,
                                                                  data: bytes) -> None:
    (tmp_path / "exp.toml").write_bytes(data)
    refused_in_one_line(invoke(tmp_path / "exp.toml", "--out", tmp_path / "never"))
    assert not (tmp_path / "never").exists()


def test_out_that_is_a_file_is_refused_before_any_point(tmp_path: Path,
                                                        no_measuring: list[int]) -> None:
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    refused_in_one_line(invoke(write(tmp_path), "--out", target), "not a directory")
    assert target.read_text() == "keep me" and not no_measuring


def test_out_under_a_file_is_refused_before_any_point(tmp_path: Path,
                                                      no_measuring: list[int]) -> None:
    (tmp_path / "f").write_text("")
    refused_in_one_line(invoke(write(tmp_path), "--out", tmp_path / "f" / "sub"))
    assert not no_measuring


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_out_is_refused_before_any_point(tmp_path: Path,
                                                       no_measuring: list[int]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    refused_in_one_line(invoke(write(tmp_path), "--out", locked / "out"), "not writable")
    assert not no_measuring


def rows_on_disk(out: Path) -> list[dict]:
    with (out / "sweep.csv").open() as f:
        return list(csv.DictReader(f))


def test_the_tables_are_on_disk_after_every_point(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    seen = []

    def point(exp, p, models, checks):
        # what a kill -9 would leave at this moment: every earlier point
        seen.append(len(rows_on_disk(out)) if (out / "sweep.csv").exists() else 0)
        return dict(sweep.analytic_row(exp, p), status="ok")

    monkeypatch.setattr(sweep, "run_point", point)
    assert invoke(write(tmp_path), "--out", out).exit_code == 0
    assert seen == [0, 1, 2, 3]
    assert json.loads((out / "sweep.json").read_text())["complete"] is True


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_an_interrupted_sweep_keeps_what_it_measured(tmp_path: Path, how: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGTERM)

    def point(exp, p, models, checks):
        if p.index == 2:
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler interrupts this
                pytest.fail("SIGTERM did not stop the sweep")
            raise KeyboardInterrupt
        return dict(sweep.analytic_row(exp, p), status="ok")

    monkeypatch.setattr(sweep, "run_point", point)
    result = invoke(write(tmp_path), "--out", out)
    assert result.exit_code == 130, result.output
    assert "interrupted after 2 of 4" in result.stdout
    assert [r["index"] for r in rows_on_disk(out)] == ["0", "1"]
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["complete"] is False and len(doc["rows"]) == 2
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_huge_grid_is_refused_by_its_size_before_expansion(tmp_path: Path) -> None:
    axis = list(range(1, 101))
    text = EXPERIMENT.replace("num_kv_heads = [1, 2]\nbatch_size = [1, 2]\ncontext = [32]",
                              f"batch_size = {axis}\ncontext = {axis}\nnum_layers = {axis}")
    t0 = time.perf_counter()
    result = invoke(write(tmp_path, text), "--dry-run")
    assert time.perf_counter() - t0 < 10
    refused_in_one_line(result, "1,000,000 points", f"at most {MAX_POINTS:,}")


def test_a_dry_run_of_a_large_grid_prints_promptly_and_says_how_many(tmp_path: Path) -> None:
    text = EXPERIMENT.replace("batch_size = [1, 2]", f"batch_size = {list(range(1, 151))}")
    result = invoke(write(tmp_path, text), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "300 point(s) valid (the first 200 shown)" in result.stdout
