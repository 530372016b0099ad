"""The presentation of `toyllm check`: the JSON report assembled from the cases' results
(versions, tolerances, strict-JSON numbers) and written to disk, and the rich table, tolerances,
failures and verdict line printed from it. engine/check.py runs the cases; the result
dataclasses both use are in engine/check_result.py.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from toyllm.engine.check.cases import Case
from toyllm.engine.check.result import FAIL, PASS, CaseResult
from toyllm.engine.check.tolerances import tolerances_report

TABLE_WIDTH = 160


# the JSON report ------------------------------------------------------------------------------
def versions() -> dict[str, str | None]:
    try:
        import transformers

        hf_version: str | None = transformers.__version__
    except ImportError:
        hf_version = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": hf_version,
        "toyllm": _toyllm_version(),
    }


def _toyllm_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("toyllm")
    except PackageNotFoundError:
        return None


def build_report(
    results: Sequence[tuple[Case, CaseResult]],
    hf_witness: str,
    devices: dict[str, str],
    started: float,
) -> dict[str, Any]:
    """The JSON-ready report of a run of the matrix: cases (metrics, failures, margins),
    tolerances, versions, devices (`devices`), date and the overall verdict; `hf_witness` is
    the witness's state ("on", "off", "transformers not installed") and `started` the
    `time.perf_counter()` the run began at."""
    failed = [r.name + "/" + r.dtype + "/" + r.device for _, r in results if not r.passed]
    return _json_safe({
        "tool": "toyllm check",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        "devices": devices,
        "hf_witness": hf_witness,
        "tolerances": tolerances_report(),
        "cases": [_case_entry(c, r) for c, r in results],
        "summary": {
            "total": len(results),
            "passed": len(results) - len(failed),
            "failed": failed,
            "seconds": round(time.perf_counter() - started, 2),
            "verdict": PASS if not failed else FAIL,
        },
    })


def _case_entry(case: Case, result: CaseResult) -> dict[str, Any]:
    entry = asdict(result)
    entry["case"] = {k: v for k, v in asdict(case).items() if k not in ("name", "dtype", "device")}
    try:
        entry["case"]["config"] = case.model_config().to_dict()
    except Exception:  # the config itself is what failed (reported as the case's error)
        pass
    entry["margin"] = None if result.worst_divergence is None else \
        result.worst_divergence.margin
    entry["seconds"] = round(result.seconds, 3)
    return entry


def _json_safe(value: Any) -> Any:
    """NaN and infinities as strings, so the report is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# the JSON file --------------------------------------------------------------------------------
def write_report(report: dict[str, Any], json_path: Path, console: Console) -> None:
    """The report as JSON at json_path, and a line saying where it went."""
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    console.print(f"report written to {json_path}", markup=False)


# the terminal ---------------------------------------------------------------------------------
def render_report(report: dict[str, Any], console: Console) -> None:
    """The table (one row per case), the tolerances, the failures, the verdict line."""
    table = Table(title="toyllm check: cached engine vs no-cache reference"
                  + (" vs HF transformers" if report["hf_witness"] == "on" else ""))
    for col in ("case", "dtype", "device"):
        table.add_column(col)
    for col in ("max|diff|", "rel", "fp32 e/r", "argmax", "greedy", "margin", "HF rel", "s"):
        table.add_column(col, justify="right")
    table.add_column("verdict")
    for e in report["cases"]:
        greedy = "-" if e["greedy_match"] is None else \
            f"{e['greedy_tokens']}/{e['greedy_expected']}"
        div = max(e["divergences"], key=lambda d: (not d["near_tie"], d["gap"]), default=None)
        if div is not None:
            greedy += " near-tie" if div["near_tie"] else " diverged"
        # the reference's top-2 margin where the run diverged; else the smallest one met
        margin = _fmt(div["margin"]) if div is not None else \
            "-" if e["min_margin"] is None else f"[dim]>={_fmt(e['min_margin'])}[/]"
        hf = _fmt(e["hf_rel"]) if e["hf_rel"] is not None else "skip" if e["hf_note"] else "-"
        if e["hf_greedy_match"] is False:
            hf += " tok!"
        agree = "-" if e["argmax_agree"] is None else f"{100 * e['argmax_agree']:.1f}%"
        # low precision: engine's distance from fp32 over the reference's own distance
        ratio = _ratio(e["engine_fp32_rel"], e["reference_fp32_rel"])
        style = "green" if e["verdict"] == PASS else "bold red"
        verdict = e["verdict"]
        table.add_row(e["name"], e["dtype"], e["device"], _fmt(e["max_abs"]), _fmt(e["rel"]),
                      ratio, agree, greedy, margin, hf, f"{e['seconds']:.1f}",
                      f"[{style}]{verdict}[/]")
    _wide(console).print(table)
    tols = report["tolerances"]
    console.print("tolerances:", markup=False)
    for name, t in tols["dtypes"].items():
        console.print(f"  {name}: {t['description']}", markup=False, soft_wrap=True)
    console.print(f"  HF transformers, fp32: ||a-b||/||b|| <= {tols['hf_fp32_rel']:g} and the "
                  f"same greedy tokens ({report['hf_witness']})", markup=False, soft_wrap=True)
    if any(e["engine_fp32_rel"] is not None for e in report["cases"]):
        console.print("  e/r: the engine's distance from fp32 over the same-dtype reference's "
                      "(<= 1: the cache path is as accurate as the no-cache path); "
                      "diagnostic only, never a pass", markup=False, soft_wrap=True)
    for e in report["cases"]:
        label = f"{e['name']}/{e['dtype']}/{e['device']}"
        for why in e["failures"]:
            console.print(f"  [red]{label}[/]: {escape(why)}", soft_wrap=True)
        if e["error"]:
            console.print(f"  [red]{label}[/]: error: {escape(e['error'])}", soft_wrap=True)
    s = report["summary"]
    devices = "; ".join(f"{k}: {v}" for k, v in report["devices"].items())
    if s["verdict"] == PASS:
        console.print(f"[bold green]PASS[/]: {s['passed']}/{s['total']} cases in "
                      f"{s['seconds']:.1f} s ({devices})")
    else:
        console.print(f"[bold red]FAIL[/]: {len(s['failed'])} of {s['total']} cases failed "
                      f"in {s['seconds']:.1f} s: {', '.join(s['failed'])} ({devices})")


def _wide(console: Console) -> Console:
    """The table never folds its columns in a log: off a terminal (CI, a pipe, a file) it is
    printed at TABLE_WIDTH columns whatever the console's default width."""
    if console.is_terminal or console.width >= TABLE_WIDTH:
        return console
    return Console(file=console.file, width=TABLE_WIDTH, highlight=False,
                   color_system=console.color_system, no_color=console.no_color)


def _ratio(a: Any, b: Any) -> str:
    if not isinstance(a, float) or not isinstance(b, float):
        return "-" if a is None else str(a)
    return f"{a / b:.2f}x" if b > 0 else ("1.00x" if a == 0 else "inf")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):  # "nan", "inf" from _json_safe
        return value
    return f"{value:.2e}"
