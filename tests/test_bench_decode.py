"""`toyllm bench` on the CPU: one small run writes a table and JSON with its baselines."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from toyllm.engine.cli import app


def test_cpu_bench_writes_rows_for_each_engine_and_the_roofline(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(app, ["bench", "--device", "cpu", "--models", "tiny",
                                 "--new-tokens", "6", "--no-hf", "--json", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    engines = {row["engine"] for row in report["rows"]}
    assert {"toyllm eager", "no-cache reference", "toyllm eager, bf16-valued weights"} <= engines
    # random fp32 weights: a second row with them rounded to bf16 values, its distance from the
    # fp32 logits measured and its roofline over the matrices' bf16 bytes
    rel = report["models"]["tiny"]["bf16_valued_logits_rel"]
    assert 0 < rel < 1e-2
    roof = {row["engine"]: row["roofline_tok_per_s"] for row in report["rows"]}
    assert roof["toyllm eager, bf16-valued weights"] > roof["toyllm eager"]
    assert report["copy_bandwidth_gbs"] > 0
    # the CPU roofline reads the weights' bytes where they sit, not a 256 MiB copy
    assert report["models"]["tiny"]["roofline"].startswith("weight-read bandwidth")
    assert report["models"]["tiny"]["roofline_bandwidth_gbs"] > 0
    for row in report["rows"]:
        # the timings only as arithmetic: where a row lands against the roofline is the bench's
        # to report (beside a busy process the bandwidth's torch.sum loses a core every round
        # while the decode step runs alone on one: rows then land far above it)
        assert row["tok_per_s"] > 0 and row["roofline_tok_per_s"] > 0, row
        assert abs(row["frac_roofline"] * row["roofline_tok_per_s"] - row["tok_per_s"]) <= (
            1e-9 * row["tok_per_s"]), row
        assert abs(row["frac_roofline"] * row["roofline_tok_per_s"] - row["tok_per_s"]) <= (
            1e-9 * row["tok_per_s"]), row


def test_bench_rejects_an_unknown_option() -> None:
    r = CliRunner().invoke(app, ["bench", "--colour", "red"])
    assert r.exit_code == 2
    assert "Traceback" not in r.output
