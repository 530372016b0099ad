"""`toyllm sweep EXPERIMENT.toml`: vary a model config along axes, measure every point.

The experiment file (its format, its axes, and the grid built and validated before any work,
with `ExperimentError`) is engine/sweep_spec.py; this module runs the points and writes the
outputs.

Per point: parameters, weight bytes, KV bytes per token, KV cache bytes at the context for the
batch (arithmetic), then, on random weights: the cache the engine allocated, prefill ms, decode
tok/s in eager mode and (on CUDA) with CUDA graphs, and `engine.check.check_model`'s verdict
with its errors. A point that fails (out of memory, a dtype the device lacks...) gets
"error: ..." in its status column and the sweep goes on.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import gc
import io
import json
import math
import os
import platform
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from toyllm.engine.tools.info import ELEMENT_SIZES, attention_kind, format_bytes, format_count
from toyllm.engine.tools.sweep_spec import (
    MODEL_AXES,
    Experiment,
    Point,
    RunSettings,
    load_experiment,
)
from toyllm.engine.tools.sweep_spec import (
    ExperimentError as ExperimentError,  # re-exported for the CLI
)
from toyllm.models.config import ModelConfig

LIVE_ROWS = 20  # rows of the live table while a sweep runs (the final table has all)
DRY_RUN_ROWS = 200  # rows a --dry-run prints (it says how many points there are)

# The columns of the CSV/JSON rows, in order (ModelConfig axes outside this list are appended).
COLUMNS: tuple[str, ...] = (
    "index", "status", "device", "dtype", "kv_dtype", "batch_size", "context", "prompt_tokens",
    "new_tokens", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
    "head_dim", "intermediate_size", "max_seq_len", "tie_embeddings", "attention", "params",
    "weight_bytes", "kv_bytes_per_token", "kv_cache_bytes", "cache_bytes_allocated",
    "prefill_ms", "prefill_tok_s", "decode_tok_s_eager", "decode_tok_s_graph", "check",
    "check_max_abs", "check_rel", "check_note", "seconds",
)


# one point ------------------------------------------------------------------------------------
def analytic_row(exp: Experiment, point: Point) -> dict[str, Any]:
    """Every column that arithmetic alone gives; the measured ones are None."""
    c = point.config
    per_token = c.kv_bytes_per_token(ELEMENT_SIZES[point.kv_dtype])
    row: dict[str, Any] = dict.fromkeys(columns_for(exp))
    row.update(
        index=point.index, status="pending", device=exp.device, dtype=point.dtype,
        kv_dtype=point.kv_dtype, batch_size=point.batch_size, context=point.context,
        prompt_tokens=point.prompt_tokens, new_tokens=exp.run.new_tokens,
        attention=attention_kind(c), params=c.num_params(),
        weight_bytes=c.num_params() * ELEMENT_SIZES[point.dtype], kv_bytes_per_token=per_token,
        kv_cache_bytes=per_token * point.context * point.batch_size,
    )
    row.update({k: getattr(c, k) for k in MODEL_AXES if k in row})
    return row


def columns_for(exp: Experiment) -> list[str]:
    extra = [a for a in exp.grid if a in MODEL_AXES and a not in COLUMNS]
    return list(COLUMNS) + extra


class _Models:
    """The model of the current (config, dtype): built once, shared by consecutive points
    that differ only in run axes (batch size, context), dropped when the shape changes."""

    def __init__(self, device: str, seed: int) -> None:
        self.device, self.seed = device, seed
        self.key: tuple[ModelConfig, str] | None = None
        self.model: Any = None

    def get(self, config: ModelConfig, dtype: str) -> Any:
        from toyllm.engine.device import DTYPES
        from toyllm.models.llama import build_model

        if self.key != (config, dtype):
            self.drop()
            self.model = build_model(config, device=self.device, dtype=DTYPES[dtype],
                                     seed=self.seed)
            self.key = (config, dtype)
        return self.model

    def drop(self) -> None:
        self.key, self.model = None, None
        free_memory()


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(model: Any, point: Point, run: RunSettings, modes: Sequence[str],
            out: dict[str, Any] | None = None) -> dict[str, Any]:
    """Timed generate calls on random prompts: prefill ms and decode tok/s per mode, and the
    bytes of the cache the engine allocated (batch_size rows, or the CUDA-graph bucket,
    times `context` positions). Results go into `out` as each mode finishes, so a mode that
    fails (CUDA graphs out of memory, say) leaves the ones before it in the row."""
    import torch

    from toyllm.engine.cuda_graph import bucket_for
    from toyllm.engine.generate import Engine
    from toyllm.engine.sampling import SamplingParams

    gen = torch.Generator().manual_seed(run.seed + 1)
    prompts = torch.randint(3, point.config.vocab_size, (point.batch_size, point.prompt_tokens),
                            generator=gen).tolist()
    params = SamplingParams(max_new_tokens=run.new_tokens, stop_at_eos=False)
    warm = SamplingParams(max_new_tokens=2, stop_at_eos=False)
    out = {} if out is None else out
    for mode in modes:
        graph = mode == "graph"
        engine = Engine(model, cuda_graph=graph, max_seq_len=point.context)
        # Allocate the whole context up front: the cache then holds `context` positions as
        # it would serving requests of that length, and every timed call reuses it.
        engine.prepare_cache(bucket_for(point.batch_size) if graph else point.batch_size,
                             point.context)
        for _ in range(run.warmup):
            engine.generate(prompts, warm)
        stats = [engine.generate(prompts, params).stats for _ in range(run.repeats)]
        out[f"decode_tok_s_{mode}"] = statistics.median(s.decode_tok_per_s for s in stats)
        if out.get("prefill_ms") is None:  # the first mode's prefill (prefill never uses graphs)
            prefill_ms = statistics.median(s.prefill_ms for s in stats)
            out["prefill_ms"] = prefill_ms
            out["prefill_tok_s"] = stats[0].prefill_tokens / (prefill_ms / 1e3) \
                if prefill_ms > 0 else None
            out["cache_bytes_allocated"] = stats[0].cache_bytes
        del engine, stats
        free_memory()
    return out


def check_point(model: Any, point: Point, run: RunSettings) -> dict[str, Any]:
    """The harness on this point's model: two ragged rows, the longer as long as the point's
    prompt (capped so that check_tokens still fit in the context)."""
    from toyllm.engine.check.harness import check_model

    length = max(1, min(point.prompt_tokens, point.context - run.check_tokens))
    result = check_model(model, name=point.label, prompt_lens=(length, max(1, length // 3)),
                         new_tokens=run.check_tokens, greedy_tokens=run.check_tokens,
                         seed=run.seed)
    note = result.error or "; ".join(result.failures)
    return {"check": result.verdict, "check_max_abs": _finite(result.max_abs),
            "check_rel": _finite(result.rel), "check_note": note or None}


def _finite(value: float | None) -> float | str | None:
    if value is None or math.isfinite(value):
        return value
    return str(value)  # "nan" / "inf": strict JSON, and still visibly bad


def run_point(exp: Experiment, point: Point, models: _Models,
              checks: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    """One row: arithmetic, then measurement and check; an exception becomes the status."""
    row = analytic_row(exp, point)
    t0 = time.perf_counter()
    if not exp.run.measure:
        row["status"] = "analytic (measure = false)"
        return row
    if point.analytic_only:
        row["status"] = (f"analytic only: the engine stores the KV cache in the model dtype "
                         f"({point.dtype}), not {point.kv_dtype}")
        return row
    failed = False
    try:
        model = models.get(point.config, point.dtype)
        measure(model, point, exp.run, exp.modes, out=row)
        if exp.run.check:
            # Rows that differ only in batch size share one check of their model and prompt.
            key = (point.config, point.dtype, point.context, point.prompt_tokens)
            if key not in checks:
                checks[key] = check_point(model, point, exp.run)
            row.update(checks[key])
        row["status"] = "ok"
    except Exception as exc:  # a failing point is a result; the sweep goes on
        row["status"] = f"error: {type(exc).__name__}: {_first_line(exc)}"
        failed = True
    if failed:  # outside the handler, so the traceback no longer pins the engine's memory
        models.drop()
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


# the whole sweep ------------------------------------------------------------------------------
def run_points(exp: Experiment, on_row: Callable[[int, dict[str, Any]], None] | None = None,
               on_start: Callable[[Point], None] | None = None) -> list[dict[str, Any]]:
    """Every point in grid order (batch size fastest); a row per point, errors included."""
    import torch

    models = _Models(exp.device, exp.run.seed)
    checks: dict[Any, dict[str, Any]] = {}
    rows = []
    threads = torch.get_num_threads()
    if exp.run.threads:
        torch.set_num_threads(exp.run.threads)
    try:
        for point in exp.points:
            if on_start is not None:
                on_start(point)
            rows.append(run_point(exp, point, models, checks))
            if on_row is not None:
                on_row(point.index, rows[-1])
    finally:
        models.drop()
        torch.set_num_threads(threads)
    return rows


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def report(exp: Experiment, rows: list[dict[str, Any]], plots: list[str], complete: bool,
           seconds: float) -> dict[str, Any]:
    """The JSON document: the experiment, where and when it ran, and every row."""
    import torch

    return {
        "tool": "toyllm sweep",
        "name": exp.name,
        "description": exp.description,
        "file": str(exp.path),
        "base": str(exp.base),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": exp.device,
        "device_name": device_name(exp.device),
        "cpu_threads": exp.run.threads or torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.version.cuda},
        "grid": exp.grid,
        "run": dict(asdict(exp.run), modes=list(exp.modes)),
        "complete": complete,
        "seconds": round(seconds, 2),
        "columns": columns_for(exp),
        "rows": rows,
        "plots": plots,
    }


def write_csv(target: Path | IO[str], columns: Sequence[str],
              rows: list[dict[str, Any]]) -> None:
    """The rows as CSV, to a path or an open text buffer."""
    if isinstance(target, Path):
        with target.open("w", newline="", encoding="utf-8") as f:
            write_csv(f, columns, rows)
        return
    writer = csv.DictWriter(target, fieldnames=list(columns))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})


def check_out_dir(out_dir: Path) -> None:
    """The output directory must be a directory (or creatable as one) that can be written:
    checked before any point runs. Raises ExperimentError."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExperimentError(f"--out {out_dir}: exists and is not a directory")
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ExperimentError(f"--out {out_dir}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ExperimentError(f"--out {out_dir}: {existing} is not writable")
    for name in ("sweep.csv", "sweep.json"):
        target = out_dir / name
        if target.is_dir() or (target.exists() and not os.access(target, os.W_OK)):
            raise ExperimentError(f"--out {out_dir}: {target} cannot be written")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExperimentError(f"--out {out_dir}: cannot be created ({exc.strerror})") from None


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and a rename: a kill mid-write leaves the old file whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8", newline="")
    os.replace(tmp, path)


def write_tables(exp: Experiment, out_dir: Path, rows: list[dict[str, Any]], complete: bool,
                 seconds: float, plots: Sequence[str] = (),
                 plot_error: str | None = None) -> dict[str, Path]:
    """sweep.csv and sweep.json (rows so far; "complete" says whether every point ran)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "sweep.csv", "json": out_dir / "sweep.json"}
    buffer = io.StringIO()
    write_csv(buffer, columns_for(exp), rows)
    _write_atomic(paths["csv"], buffer.getvalue())
    doc = report(exp, rows, list(plots), complete, seconds)
    if plot_error is not None:
        doc["plot_error"] = plot_error
    _write_atomic(paths["json"], json.dumps(doc, indent=2) + "\n")
    return paths


def write_outputs(exp: Experiment, out_dir: Path, rows: list[dict[str, Any]], complete: bool,
                  seconds: float) -> dict[str, Path]:
    """sweep.csv, the PNG plots and sweep.json in out_dir; the paths written, by kind. A
    figure that cannot be drawn is noted in the JSON and costs neither table."""
    from toyllm.engine.tools.sweep_plots import write_plots

    out_dir.mkdir(parents=True, exist_ok=True)
    plots: list[Path] = []
    plot_error = None
    try:
        plots = write_plots(rows, list(exp.grid), out_dir) if rows else []
    except Exception as exc:  # the measurements matter more than their pictures
        plot_error = f"{type(exc).__name__}: {_first_line(exc)}"
    paths = write_tables(exp, out_dir, rows, complete, seconds, [p.name for p in plots],
                         plot_error)
    paths.update({p.stem: p for p in plots})
    return paths


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a kill, a job scheduler's timeout) stops the sweep as Ctrl-C does: the points
    measured so far are written. Only the main thread can own signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# the terminal ---------------------------------------------------------------------------------
def render_table(exp: Experiment, rows: list[dict[str, Any]]) -> Table:
    """One line per point: the varied axes, the arithmetic, the measurements, the verdict."""
    table = Table(title=f"toyllm sweep {exp.name} on {exp.device}")
    table.add_column("#", justify="right")
    for axis in exp.grid:
        table.add_column(axis, justify="right")
    for col in ("params", "KV/token", "KV cache", "prefill ms"):
        table.add_column(col, justify="right")
    for mode in exp.modes:
        table.add_column(f"tok/s {mode}", justify="right")
    if exp.run.check:
        for col in ("check", "max|diff|", "rel"):
            table.add_column(col, justify="right")
    table.add_column("status")
    for row in rows:
        cells = [str(row["index"])] + [str(row[a]) for a in exp.grid]  # axes are columns
        cells += [format_count(row["params"]), format_bytes(row["kv_bytes_per_token"]),
                  format_bytes(row["kv_cache_bytes"]), _num(row["prefill_ms"], ".1f")]
        cells += [_num(row.get(f"decode_tok_s_{m}"), ".1f") for m in exp.modes]
        if exp.run.check:
            verdict = row.get("check") or "-"
            style = "green" if verdict == "PASS" else "bold red" if verdict != "-" else ""
            cells += [f"[{style}]{verdict}[/]" if style else verdict,
                      _num(row.get("check_max_abs"), ".2e"), _num(row.get("check_rel"), ".2e")]
        status = row["status"]
        cells.append(escape(status) if status == "ok" else f"[red]{escape(status)}[/]"
                     if status.startswith("error") else f"[dim]{escape(status)}[/]")
        table.add_row(*cells)
    return table


def _num(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return format(value, spec)


def print_wide(console: Console, table: Table, width: int = 170) -> None:
    """A terminal keeps its own width; a file or pipe (CI logs, tests) gets `width` columns
    instead of rich's default 80, which would squeeze a sweep table into ellipses."""
    if console.is_terminal:
        console.print(table)
        return
    saved = console.width
    console.width = max(saved, width)
    try:
        console.print(table)
    finally:
        console.width = saved


def run_experiment(path: str | Path, out_dir: str | Path | None = None,
                   device: str | None = None, console: Console | None = None,
                   dry_run: bool = False) -> int:
    """`toyllm sweep`: validate (ExperimentError before any work), run every point with a
    live table and progress bar, write CSV/JSON/PNG (the tables after every point). 0 when
    every point ran and every check passed, 1 otherwise, 130 when interrupted (Ctrl-C or
    SIGTERM: what was measured is written first)."""
    console = console or Console(highlight=False)
    exp = load_experiment(path, device)
    if dry_run:
        shown = exp.points[:DRY_RUN_ROWS]
        preview = [dict(analytic_row(exp, p), status="not run (--dry-run)") for p in shown]
        print_wide(console, render_table(exp, preview))
        more = f" (the first {len(shown)} shown)" if len(shown) < len(exp.points) else ""
        console.print(f"{len(exp.points)} point(s) valid{more}; nothing measured (--dry-run)")
        return 0
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"sweep-{exp.name}"
    check_out_dir(out)  # before any point runs: a bad --out must not cost the measurements
    rows: list[dict[str, Any]] = []
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console)
    task = progress.add_task("starting", total=len(exp.points))
    t0 = time.perf_counter()
    complete = False
    # While it runs: the rows so far above a progress bar (redrawn in place on a terminal);
    # at the end the whole table once, at full width.
    with Live(progress, console=console, refresh_per_second=4, transient=True) as live, \
            sigterm_as_interrupt():
        def on_start(point: Point) -> None:
            progress.update(task, description=f"point {point.index}: {point.label}")

        def on_row(_: int, row: dict[str, Any]) -> None:
            rows.append(row)
            # the tables on disk after every point, so a kill at any moment keeps them
            write_tables(exp, out, rows, False, time.perf_counter() - t0)
            progress.advance(task)
            live.update(Group(render_table(exp, rows[-LIVE_ROWS:]), progress))

        interrupted = False
        try:
            run_points(exp, on_row=on_row, on_start=on_start)
            complete = True
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM
            interrupted = True
        finally:  # an interrupted sweep still leaves what it measured, and its figures
            paths = write_outputs(exp, out, rows, complete, time.perf_counter() - t0)
    if interrupted:
        print_wide(console, render_table(exp, rows))
        console.print(f"interrupted after {len(rows)} of {len(exp.points)} point(s); written: "
                      + ", ".join(str(p) for p in paths.values()), markup=False)
        return 130
    print_wide(console, render_table(exp, rows))
    bad = [r for r in rows if r["status"].startswith("error")
           or r.get("check") not in (None, "PASS")]
    for row in bad:
        why = row["status"] if row["status"] != "ok" else row.get("check_note")
        console.print(f"[red]point {row['index']}[/]: {escape(str(why))}")
    console.print(f"{len(rows)} point(s) in {time.perf_counter() - t0:.1f} s on {exp.device}; "
                  f"written: " + ", ".join(str(p) for p in paths.values()), markup=False)
    return 1 if bad else 0
