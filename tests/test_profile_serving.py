"""scripts/profile_serving.py on the CPU: its tables on a small workload, and bad options
refused with one line and exit status 2 (the CUDA run is the lead's: docs/SERVING.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from script_modules import ROOT, load_script, script_path

SCRIPT = script_path("profile_serving")


def test_the_tables_of_a_small_run(capsys) -> None:
    rc = load_script("profile_serving").main([
        "--requests", "6", "--prompt-lens", "20,60", "--output-lens", "3,8", "--token-budget",
        "64", "--profile-steps", "6", "--top", "5"])
    out = capsys.readouterr().out
    assert rc == 0
    timed = out.split("== timed run")[1].split("== profiled run")[0]
    # 254 prompt tokens at 64 a step: prefill-only first, then mixed steps, then decode-only
    for kind in ("decode-only", "mixed", "prefill-only"):
        assert f"\n{kind} " in timed, kind
    profiled = out.split("== profiled run")[1]
    assert "prefill-only" in profiled and "top ops of the" in profiled
    tops = profiled.split("by self host time")[1].strip().splitlines()[1:6]
    assert len(tops) == 5 and all(" ms " in line for line in tops)


@pytest.mark.parametrize("args,message", [
    (["--requests", "0"], "--requests: expected a positive integer, got 0"),
    (["--token-budget", "0"], "--token-budget: expected a positive integer, got 0"),
    (["--block-size", "12"], "block_size: expected a positive power of two, got 12"),
    (["--prompt-lens", "200,250"], "exceeds tiny's context of 256"),
    (["--prompt-lens", "9"], "expected LOW,HIGH (two integers), got '9'"),
    (["--output-lens", "8,3"], "expected 0 < LOW <= HIGH, got '8,3'"),
    (["--profile-skip", "-1"], "--profile-skip: expected a count >= 0, got -1"),
])
def test_bad_options_are_refused(args: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
