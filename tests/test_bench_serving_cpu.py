"""scripts/bench_serving_cpu.py: its table on a short run of the shipped model (the three paths
give the same tokens), the one-call step taken by the first path only, and bad options refused
with one line and exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
from script_modules import ROOT, load_script, script_path

from toyllm.engine.ops import cpu_step

SCRIPT = script_path("bench_serving_cpu")


def test_the_table_of_a_short_run(capsys, monkeypatch) -> None:
    tables: list[bool] = []  # whether each call of the step was over paged pools
    real = cpu_step._op
    monkeypatch.setattr(cpu_step, "_op", lambda *a: tables.append(a[-1] is not None) or real(*a))
    assert load_script("bench_serving_cpu").main(["--rounds", "1", "--new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].startswith("| prompts | serving, one-call step | serving, separate ops |")
    rows = [line.split(" | ") for line in lines[3:]]
    assert [r[0] for r in rows] == ["| 1", "| 4"]
    assert all(r[-1] == "yes |" and r[-2].endswith("x") for r in rows)
    # the serving engine's decode steps took it over the pools, the static engine's without
    assert any(tables) and not all(tables)


@pytest.mark.parametrize("args, message", [
    (["--rounds", "0"], "expected at least 1"),
    (["--model", "no/such/dir"], "--model: expected a checkpoint directory or .gguf file"),
    (["--model", str(ROOT / "configs" / "stories15m.toml")], "got the config"),
])
def test_bad_options_are_refused_with_one_line(args, message) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
