"""The GPU-only scripts on a machine without a GPU: a one-line reason and exit status 2, no
traceback and nothing written (scripts/gpu_check.sh runs them on the GPU machine)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["bench_kv_update", "bench_decode_attention", "bench_paged_decode_attention",
           "bench_gemv", "bench_argmax", "probe_decode_rounding", "profile_decode"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("script", SCRIPTS)
def test_gpu_script_says_it_needs_a_gpu(script: str, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    args = [sys.executable, str(ROOT / "scripts" / f"{script}.py")]
    if script != "profile_decode":
        args += ["--json", str(out)]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{script}: needs a CUDA GPU" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert not out.exists()
