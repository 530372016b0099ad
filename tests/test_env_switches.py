"""The numeric comparison switches read at import refuse values that are not whole numbers,
with a message naming the variable and the value (not a bare int() traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, module", [
    ("TOYLLM_DECODE_KERNEL_MAX_ROWS", "engine.cached_attention"),
    ("TOYLLM_CUDA_GEMV_MAX_MIB", "engine.gemv"),
])
@pytest.mark.parametrize("value", ["lots", "-1", "1.5"])
def test_a_bad_numeric_switch_names_itself_and_the_value(name: str, module: str,
                                                         value: str) -> None:
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, name: value})
    assert done.returncode != 0
    assert f"expected {name} to be a whole number" in done.stderr
    assert f"got '{value}'" in done.stderr
