"""`toyllm sweep EXPERIMENT.toml`: vary a model config along axes, measure every point.

An experiment file names a base config and the axes to vary::

    name = "attention-variants"
    base = "../llama-1b.toml"        # relative to the experiment file
    device = "auto"                   # optional: auto | cpu | cuda | cuda:N
    description = "MHA vs GQA vs MQA" # optional
    [model]                           # optional: fixed overrides of the base config
    max_seq_len = 4096
    [grid]                            # the axes: every combination is one point
    num_kv_heads = [1, 8, 32]
    dtype = ["bf16"]
    batch_size = [1, 16]
    context = [1024]
    [run]                             # optional: how each point is measured
    prompt_tokens = 128               # or "fill": context - new_tokens
    new_tokens = 64
    check = true                      # the harness verdict per point

Axes are ModelConfig fields (not `name` or `rope_scaling`) plus `dtype` (fp32/fp16/bf16/auto),
`batch_size`, `context` (the KV cache's positions per sequence; default the config's
max_seq_len) and `kv_dtype` (memory arithmetic only: the engine stores the cache in the model's
dtype, so a point whose kv_dtype differs from its dtype is reported as analytic-only, never
measured). Every point's ModelConfig is built, and every size checked, before any work starts;
a mistake is an `ExperimentError` naming the key, the point and what was expected.

Per point: parameters, weight bytes, KV bytes per token, KV cache bytes at the context for the
batch (arithmetic), then, on random weights: the cache the engine allocated, prefill ms, decode
tok/s in eager mode and (on CUDA) with CUDA graphs, and `engine.check.check_model`'s verdict
with its errors. A point that fails (out of memory, a dtype the device lacks...) gets
"error: ..." in its status column and the sweep goes on.
"""

from __future__ import annotations

import csv
import datetime
import gc
import itertools
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from engine.model_info import ELEMENT_SIZES, attention_kind, format_bytes, format_count
from models.config import ConfigError, ModelConfig, load_config


class ExperimentError(ValueError):
    """An experiment file that cannot run: reported before any point is measured."""


MODEL_AXES: tuple[str, ...] = tuple(
    f.name for f in fields(ModelConfig) if f.name not in ("name", "rope_scaling")
)
RUN_AXES: tuple[str, ...] = ("dtype", "kv_dtype", "context", "batch_size")
DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16",
               "half": "fp16", "bf16": "bf16", "bfloat16": "bf16"}
MODES = ("eager", "graph")
LIVE_ROWS = 20  # rows of the live table while a sweep runs (the final table has all)
TOP_KEYS = ("name", "base", "device", "description", "model", "grid", "run")

# The columns of the CSV/JSON rows, in order (ModelConfig axes outside this list are appended).
COLUMNS: tuple[str, ...] = (
    "index", "status", "device", "dtype", "kv_dtype", "batch_size", "context", "prompt_tokens",
    "new_tokens", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
    "head_dim", "intermediate_size", "max_seq_len", "tie_embeddings", "attention", "params",
    "weight_bytes", "kv_bytes_per_token", "kv_cache_bytes", "cache_bytes_allocated",
    "prefill_ms", "prefill_tok_s", "decode_tok_s_eager", "decode_tok_s_graph", "check",
    "check_max_abs", "check_rel", "check_note", "seconds",
)


@dataclass(frozen=True)
class RunSettings:
    """The `[run]` table: how each point is measured."""

    prompt_tokens: int | str = 32  # tokens per prompt, or "fill" (context - new_tokens)
    new_tokens: int = 32  # decoded tokens per sequence (>= 2: the first comes from prefill)
    check: bool = True  # run the correctness harness (engine/check.py) per model/dtype
    check_tokens: int = 16  # harness: teacher-forced steps and greedy tokens per row
    modes: tuple[str, ...] = ()  # eager and/or graph; () = eager, plus graph on CUDA
    warmup: int = 1  # untimed generate calls before the timed ones (graph capture, autotune)
    repeats: int = 1  # timed generate calls; the median is reported
    seed: int = 0  # weights and prompts
    measure: bool = True  # false: arithmetic columns only, no model is built
    threads: int = 0  # torch CPU threads while the sweep runs (0: leave torch's setting)


@dataclass(frozen=True)
class Point:
    """One combination of the grid, validated."""

    index: int
    values: dict[str, Any]  # axis -> this point's value, for the varied axes only
    config: ModelConfig
    dtype: str
    kv_dtype: str
    batch_size: int
    context: int
    prompt_tokens: int

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.values.items())

    @property
    def analytic_only(self) -> bool:
        return self.kv_dtype != self.dtype


@dataclass
class Experiment:
    name: str
    path: Path
    base: Path
    description: str
    device: str  # resolved: "cpu", "cuda:0", ...
    grid: dict[str, list[Any]]
    run: RunSettings
    modes: tuple[str, ...]
    points: list[Point] = field(default_factory=list)


# parsing and validation ---------------------------------------------------------------------
def load_experiment(path: str | Path, device: str | None = None) -> Experiment:
    """Read and validate an experiment file: every point's config is built and every size is
    checked here, so nothing runs unless the whole grid can. device overrides the file's."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"experiment file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ExperimentError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise ExperimentError(
            f"{path}: unknown key(s) {unknown}; expected some of {list(TOP_KEYS)}"
        )
    name = _string(path, "name", data.get("name", path.stem))
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ExperimentError(f"{path}: name: expected a plain file-name word, got {name!r}")
    base = _base_config(path, data)
    dev = _device(path, device if device is not None else data.get("device", "auto"))
    run = _run_settings(path, data.get("run", {}))
    modes = _modes(path, run, dev)
    grid = _grid(path, data.get("grid"))
    description = _string(path, "description", data.get("description", ""))
    exp = Experiment(name, path, path.parent / data["base"], description, dev, grid, run, modes)
    exp.points = _points(path, base, grid, run, dev)
    return exp


def _string(path: Path, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ExperimentError(f"{path}: {key}: expected a string, got {value!r}")
    return value


def _base_config(path: Path, data: dict[str, Any]) -> ModelConfig:
    if "base" not in data:
        raise ExperimentError(f"{path}: missing key 'base' (the config the grid varies)")
    base_path = path.parent / _string(path, "base", data["base"])
    if not base_path.exists():
        raise ExperimentError(f"{path}: base config not found: {base_path}")
    try:
        config = load_config(base_path)
    except ConfigError as exc:
        raise ExperimentError(f"{path}: base config: {exc}") from None
    overrides = data.get("model", {})
    if not isinstance(overrides, dict):
        raise ExperimentError(f"{path}: [model] must be a table, got {overrides!r}")
    bad = sorted(set(overrides) - set(MODEL_AXES))
    if bad:
        raise ExperimentError(
            f"{path}: [model]: unknown key(s) {bad}; expected ModelConfig fields "
            f"{list(MODEL_AXES)}"
        )
    try:
        return config.with_overrides(**overrides)
    except (ConfigError, TypeError) as exc:
        raise ExperimentError(f"{path}: [model]: {exc}") from None


def _device(path: Path, name: Any) -> str:
    from engine.device import DeviceError, resolve_device

    if not isinstance(name, str):
        raise ExperimentError(f"{path}: device: expected a string, got {name!r}")
    try:
        return str(resolve_device(name))
    except DeviceError as exc:
        raise ExperimentError(f"{path}: device: {exc}") from None


def _positive(path: Path, key: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ExperimentError(
            f"{path}: {key}: expected an integer >= {minimum}, got {value!r}"
        )
    return value


def _run_settings(path: Path, table: Any) -> RunSettings:
    if not isinstance(table, dict):
        raise ExperimentError(f"{path}: [run] must be a table, got {table!r}")
    known = {f.name for f in fields(RunSettings)}
    bad = sorted(set(table) - known)
    if bad:
        raise ExperimentError(
            f"{path}: [run]: unknown key(s) {bad}; expected some of {sorted(known)}"
        )
    kw = dict(table)
    prompt = kw.get("prompt_tokens", RunSettings.prompt_tokens)
    if prompt != "fill" and (isinstance(prompt, bool) or not isinstance(prompt, int)
                             or prompt < 1):
        raise ExperimentError(
            f"{path}: [run] prompt_tokens: expected an integer >= 1 or \"fill\", got {prompt!r}"
        )
    _positive(path, "[run] new_tokens", kw.get("new_tokens", RunSettings.new_tokens), 2)
    _positive(path, "[run] check_tokens", kw.get("check_tokens", RunSettings.check_tokens), 2)
    _positive(path, "[run] warmup", kw.get("warmup", RunSettings.warmup), 0)
    _positive(path, "[run] repeats", kw.get("repeats", RunSettings.repeats))
    _positive(path, "[run] seed", kw.get("seed", RunSettings.seed), 0)
    _positive(path, "[run] threads", kw.get("threads", RunSettings.threads), 0)
    for flag in ("check", "measure"):
        if not isinstance(kw.get(flag, True), bool):
            raise ExperimentError(f"{path}: [run] {flag}: expected true or false, "
                                  f"got {kw[flag]!r}")
    modes = kw.get("modes", [])
    if not isinstance(modes, list) or any(m not in MODES for m in modes):
        raise ExperimentError(
            f"{path}: [run] modes: expected a list of {list(MODES)}, got {modes!r}"
        )
    kw["modes"] = tuple(dict.fromkeys(modes))
    return RunSettings(**kw)


def _modes(path: Path, run: RunSettings, device: str) -> tuple[str, ...]:
    cuda = device.startswith("cuda")
    if not run.modes:
        return MODES if cuda else ("eager",)
    if "graph" in run.modes and not cuda:
        raise ExperimentError(
            f"{path}: [run] modes: 'graph' (CUDA graphs) needs a CUDA device, got {device}"
        )
    return run.modes


def _grid(path: Path, grid: Any) -> dict[str, list[Any]]:
    if grid is None:
        raise ExperimentError(f"{path}: missing [grid] table (the axes to vary)")
    if not isinstance(grid, dict):
        raise ExperimentError(f"{path}: [grid] must be a table, got {grid!r}")
    if not grid:
        raise ExperimentError(
            f"{path}: empty grid: [grid] names no axis; expected at least one of "
            f"{list(MODEL_AXES + RUN_AXES)}"
        )
    out: dict[str, list[Any]] = {}
    for axis, values in grid.items():
        if axis not in MODEL_AXES and axis not in RUN_AXES:
            hint = " (set it in the base config or [model])" if axis in ("name", "rope_scaling") \
                else ""
            raise ExperimentError(
                f"{path}: [grid]: unknown axis {axis!r}{hint}; expected ModelConfig fields "
                f"{list(MODEL_AXES)} or {list(RUN_AXES)}"
            )
        if not isinstance(values, list):
            raise ExperimentError(
                f"{path}: [grid] {axis}: expected a list of values, got {values!r}"
            )
        if not values:
            raise ExperimentError(f"{path}: [grid] {axis}: empty list, so the grid is empty")
        if any(isinstance(v, (dict, list)) for v in values):
            raise ExperimentError(f"{path}: [grid] {axis}: expected plain values, got {values!r}")
        if axis in ("dtype", "kv_dtype"):
            values = [_dtype_word(path, axis, v) for v in values]
        if axis in ("batch_size", "context"):
            values = [_positive(path, f"[grid] {axis}", v) for v in values]
        if len(set(map(repr, values))) != len(values):
            raise ExperimentError(f"{path}: [grid] {axis}: repeated value in {values!r}")
        out[axis] = values
    order = [a for a in grid if a in MODEL_AXES] + [a for a in RUN_AXES if a in grid]
    return {a: out[a] for a in order}  # batch_size last: consecutive points share a model


def _dtype_word(path: Path, axis: str, value: Any) -> str:
    if value == "auto":
        return "auto"
    word = DTYPE_NAMES.get(value.lower()) if isinstance(value, str) else None
    if word is None:
        raise ExperimentError(
            f"{path}: [grid] {axis}: unknown dtype {value!r}; expected fp32, fp16, bf16 or auto"
        )
    return word


def _points(path: Path, base: ModelConfig, grid: dict[str, list[Any]], run: RunSettings,
            device: str) -> list[Point]:
    """Every combination, shapes first (each ModelConfig is built, so its own checks run),
    then whether the request fits each point's context."""
    combos = [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())]
    if not combos:  # unreachable with non-empty lists, kept as the contract
        raise ExperimentError(f"{path}: the grid has no point")
    configs = []
    for index, values in enumerate(combos):
        try:
            configs.append(base.with_overrides(
                **{k: v for k, v in values.items() if k in MODEL_AXES}))
        except (ConfigError, TypeError) as exc:
            raise ExperimentError(
                f"{_where(path, index, values)}: impossible shape: {exc}") from None
    auto = "bf16" if device.startswith("cuda") else "fp32"
    points = []
    for index, (values, config) in enumerate(zip(combos, configs, strict=True)):
        where = _where(path, index, values)
        dtype = values.get("dtype", "auto")
        dtype = auto if dtype == "auto" else dtype
        kv_dtype = values.get("kv_dtype", dtype)
        kv_dtype = dtype if kv_dtype == "auto" else kv_dtype
        context = values.get("context", config.max_seq_len)
        if context > config.max_seq_len:
            raise ExperimentError(
                f"{where}: context {context} is longer than max_seq_len {config.max_seq_len}; "
                "raise max_seq_len in [model] or the base config"
            )
        prompt = context - run.new_tokens if run.prompt_tokens == "fill" else run.prompt_tokens
        if prompt < 1 or prompt + run.new_tokens > context:
            raise ExperimentError(
                f"{where}: prompt_tokens ({run.prompt_tokens}) + new_tokens ({run.new_tokens}) "
                f"must fit in the context ({context}) with at least one prompt token"
            )
        if run.check and run.check_tokens >= context:
            raise ExperimentError(
                f"{where}: check_tokens ({run.check_tokens}) must be less than the context "
                f"({context})"
            )
        points.append(Point(index, values, config, dtype, kv_dtype,
                            values.get("batch_size", 1), context, prompt))
    return points


def _where(path: Path, index: int, values: dict[str, Any]) -> str:
    return f"{path}: point {index} ({', '.join(f'{k}={v}' for k, v in values.items())})"


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
        from engine.device import DTYPES
        from models.llama import build_model

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

    from engine.cuda_graph import bucket_for
    from engine.generate import Engine
    from engine.sampling import SamplingParams

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
    from engine.check import check_model

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
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
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


def write_csv(path: Path, columns: Sequence[str], rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})


def write_outputs(exp: Experiment, out_dir: Path, rows: list[dict[str, Any]], complete: bool,
                  seconds: float) -> dict[str, Path]:
    """sweep.csv, the PNG plots and sweep.json in out_dir; the paths written, by kind. A
    figure that cannot be drawn is noted in the JSON and costs neither table."""
    from engine.sweep_plots import write_plots

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "sweep.csv", "json": out_dir / "sweep.json"}
    write_csv(paths["csv"], columns_for(exp), rows)
    plots: list[Path] = []
    plot_error = None
    try:
        plots = write_plots(rows, list(exp.grid), out_dir) if rows else []
    except Exception as exc:  # the measurements matter more than their pictures
        plot_error = f"{type(exc).__name__}: {_first_line(exc)}"
    doc = report(exp, rows, [p.name for p in plots], complete, seconds)
    if plot_error is not None:
        doc["plot_error"] = plot_error
    paths["json"].write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    paths.update({p.stem: p for p in plots})
    return paths


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
    live table and progress bar, write CSV/JSON/PNG. 0 when every point ran and every check
    passed, 1 otherwise."""
    console = console or Console(highlight=False)
    exp = load_experiment(path, device)
    if dry_run:
        preview = [dict(analytic_row(exp, p), status="not run (--dry-run)") for p in exp.points]
        print_wide(console, render_table(exp, preview))
        console.print(f"{len(exp.points)} point(s) valid; nothing measured (--dry-run)")
        return 0
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"sweep-{exp.name}"
    rows: list[dict[str, Any]] = []
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console)
    task = progress.add_task("starting", total=len(exp.points))
    t0 = time.perf_counter()
    complete = False
    # While it runs: the rows so far above a progress bar (redrawn in place on a terminal);
    # at the end the whole table once, at full width.
    with Live(progress, console=console, refresh_per_second=4, transient=True) as live:
        def on_start(point: Point) -> None:
            progress.update(task, description=f"point {point.index}: {point.label}")

        def on_row(_: int, row: dict[str, Any]) -> None:
            rows.append(row)
            progress.advance(task)
            live.update(Group(render_table(exp, rows[-LIVE_ROWS:]), progress))

        try:
            run_points(exp, on_row=on_row, on_start=on_start)
            complete = True
        finally:  # an interrupted sweep still leaves what it measured
            paths = write_outputs(exp, out, rows, complete, time.perf_counter() - t0)
    print_wide(console, render_table(exp, rows))
    bad = [r for r in rows if r["status"].startswith("error")
           or r.get("check") not in (None, "PASS")]
    for row in bad:
        why = row["status"] if row["status"] != "ok" else row.get("check_note")
        console.print(f"[red]point {row['index']}[/]: {escape(str(why))}")
    console.print(f"{len(rows)} point(s) in {time.perf_counter() - t0:.1f} s on {exp.device}; "
                  f"written: " + ", ".join(str(p) for p in paths.values()), markup=False)
    return 1 if bad else 0
