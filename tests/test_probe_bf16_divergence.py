"""scripts/probe_bf16_divergence.py, the layer-by-layer instrument of the bf16 check: on the CPU
the engine and the reference share the input norm's bits, the probe sees a rounding
point planted in the engine at the first point it touches, and bad arguments exit 2 in one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from script_modules import ROOT, load_script, script_path
from torch import Tensor

from toyllm.engine.check.cases import BASE_CASES
from toyllm.engine.check.harness import decode_steps
from toyllm.models import layer_math

SCRIPT = script_path("probe_bf16_divergence")
GQA_RAGGED = next(c for c in BASE_CASES if c.name == "gqa-ragged")


def probe(device: str, new_tokens: int = 5) -> dict[str, Any]:
    """The probe's result for the check's gqa-ragged case in bf16 (fewer decode steps)."""
    case = replace(GQA_RAGGED, device=device, dtype="bf16", new_tokens=new_tokens)
    return load_script("probe_bf16_divergence").probe_case(case, None, None, pad=0,
                                                           nudge_fraction=1e-3)


def points(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["point"]: p for p in result["points"]}


def test_cpu_probe_reports_every_point_and_the_input_norms_same_bits() -> None:
    result = probe("cpu")
    by_point = points(result)
    # every point of both layers, then the final norm and the logits
    assert list(by_point)[:9] == [f"L0.{p}" for p in load_script("probe_bf16_divergence").POINTS]
    assert list(by_point)[-2:] == ["norm", "logits"]
    # the input norm is the same torch code on both paths: the same bits
    assert by_point["L0.norm1"]["differing"] == 0.0
    # the logits of every compared step (each row's prompt-last token and fed tokens)
    steps = sum(1 + n for n in decode_steps(GQA_RAGGED.prompt_lens, 5))
    assert by_point["logits"]["eng-ref"]["n"] == steps
    assert by_point["logits"]["ref"]["mean"] > 0  # bf16 is measured against fp32
    assert result["worst_logits_step"]["rel"] == by_point["logits"]["eng-ref"]["max"]
    assert result["nudge"]["worst_logits_step"]["rel"] > 0


def test_a_rounding_point_planted_in_the_engine_shows_at_its_point(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's RMSNorm normalising in bf16 (no fp32 step): the probe's first differing
    point is the input norm. (The reference model binds its own rms_norm at import, so only the
    engine's torch code, which reads layer_math.rms_norm at each call, changes.)"""

    def bf16_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    monkeypatch.setattr(layer_math, "rms_norm", bf16_rms_norm)
    by_point = points(probe("cpu", new_tokens=2))
    assert by_point["L0.norm1"]["differing"] > 0
    assert by_point["L0.norm1"]["eng-ref"]["max"] > 0


@pytest.mark.parametrize("args, message", [
    (["--dtype", "fp8"], "--dtype: expected one of"),
    (["--configs", "nope"], "--configs: expected case names among"),
    (["--pad", "-1"], "--pad: expected >= 0"),
])
def test_bad_arguments_exit_2_in_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    done = subprocess.run([sys.executable, str(SCRIPT), *args, "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    text = done.stdout + done.stderr
    assert done.returncode == 2, text
    assert message in text and "Traceback" not in text
    assert len(text.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_exits_2(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "no CUDA GPU is available here" in done.stdout


@pytest.mark.cuda
def test_cuda_probe_writes_every_case_and_point(tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())
    assert [r["case"] for r in results] == ["mqa-ragged-chunked", "gqa-ragged-eager",
                                            "gqa-ragged-sdpa"]
    for r in results:
        names = [p["point"] for p in r["points"]]
        assert names[-2:] == ["norm", "logits"] and "L1.out" in names
        assert r["worst_logits_step"]["rel"] > 0
