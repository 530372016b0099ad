"""scripts/bench_serving_host.py on a small workload: both engines' host parts are printed,
each part a time; bad options refused with one line and exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
from script_modules import load_script, script_path

SCRIPT = script_path("bench_serving_host")


def test_both_engines_host_parts_at_full_batch(capsys) -> None:
    module = load_script("bench_serving_host")
    assert module.main(["--requests", "8", "--lens", "4,12", "--rounds", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["engine", "total", *module.PARTS]
    for line, name in zip(lines[2:], ("overlap off", "overlap on"), strict=True):
        assert line.startswith(name)
        values = [float(x) for x in line[len(name):].split()]
        assert len(values) == 1 + len(module.PARTS) and values[0] > 0
        assert all(v >= 0 for v in values[1:])  # the rest: the step less the timed parts


@pytest.mark.parametrize("args,message", [
    (["--lens", "5"], "--lens: expected LOW,HIGH"),
    (["--lens", "20,2000"], "--lens: expected LOW,HIGH"),
    (["--requests", "0"], "--requests: expected a positive integer, got 0"),
    (["--rounds", "-1"], "--rounds: expected a positive integer, got -1"),
])
def test_bad_options_are_one_line_and_exit_2(args, message) -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)
    assert run.returncode == 2
    assert message in run.stderr and "Traceback" not in run.stderr
