"""The experiment file of `toyllm sweep`: its schema, its axes, and the grid of points built
and validated before any work starts (engine/sweep.py runs the points and writes the outputs).

An experiment file names a base config and the axes to vary::

    name = "attention-variants"
    base = "../llama-1b.toml"        # relative to the experiment file, or a shipped name
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
"""

from __future__ import annotations

import itertools
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from toyllm.models import validate
from toyllm.models.config import ConfigError, ModelConfig, load_config
from toyllm.models.shipped import resolve_config, resolve_experiment


class ExperimentError(ValueError):
    """An experiment file that cannot run: reported before any point is measured."""


# The most points a grid may have: the product of its axes' lengths, computed before anything
# is expanded. Beyond it a sweep is a typo (or days of work) and is refused with its size.
MAX_POINTS = 4096
MAX_THREADS = 1024  # [run] threads: more is not a machine, it is a typo


MODEL_AXES: tuple[str, ...] = tuple(
    f.name for f in fields(ModelConfig) if f.name not in ("name", "rope_scaling")
)
RUN_AXES: tuple[str, ...] = ("dtype", "kv_dtype", "context", "batch_size")
DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16",
               "half": "fp16", "bf16": "bf16", "bfloat16": "bf16"}
MODES = ("eager", "graph")
TOP_KEYS = ("name", "base", "device", "description", "model", "grid", "run")


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
    try:
        path = resolve_experiment(path)
    except ConfigError as exc:
        raise ExperimentError(str(exc)) from None
    if path.is_dir():
        raise ExperimentError(f"{path}: expected an experiment .toml file, got a directory")
    text = validate.read_text(path, "experiment file", ExperimentError)
    try:
        data = tomllib.loads(text)
    except (ValueError, RecursionError) as exc:  # TOMLDecodeError is a ValueError
        raise ExperimentError(f"{path}: not valid TOML ({str(exc)[:200]})") from None
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise ExperimentError(
            f"{path}: unknown key(s) {unknown}; expected some of {list(TOP_KEYS)}"
        )
    name = _string(path, "name", data.get("name", path.stem))
    if not name or any(c in name for c in "/\\") or name.startswith(".") or \
            not name.isprintable() or len(name) > 200:
        raise ExperimentError(f"{path}: name: expected a plain file-name word, got {name!r}")
    base_path, base = _base_config(path, data)
    dev = _device(path, device if device is not None else data.get("device", "auto"))
    run = _run_settings(path, data.get("run", {}))
    modes = _modes(path, run, dev)
    grid = _grid(path, data.get("grid"))
    description = _string(path, "description", data.get("description", ""))
    exp = Experiment(name, path, base_path, description, dev, grid, run, modes)
    exp.points = _points(path, base, grid, run, dev)
    return exp


def _string(path: Path, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ExperimentError(f"{path}: {key}: expected a string, got {value!r}")
    return value


def _base_config(path: Path, data: dict[str, Any]) -> tuple[Path, ModelConfig]:
    """The base config: a path relative to the experiment file, or a shipped config's name."""
    if "base" not in data:
        raise ExperimentError(f"{path}: missing key 'base' (the config the grid varies)")
    try:
        base_path = resolve_config(_string(path, "base", data["base"]), relative_to=path.parent)
    except ConfigError as exc:
        raise ExperimentError(f"{path}: base {exc}") from None
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
        return base_path, config.with_overrides(**overrides)
    except (ConfigError, TypeError) as exc:
        raise ExperimentError(f"{path}: [model]: {exc}") from None


def _device(path: Path, name: Any) -> str:
    from toyllm.engine.device import DeviceError, resolve_device

    if not isinstance(name, str):
        raise ExperimentError(f"{path}: device: expected a string, got {name!r}")
    try:
        return str(resolve_device(name))
    except DeviceError as exc:
        raise ExperimentError(f"{path}: device: {exc}") from None


def _positive(path: Path, key: str, value: Any, minimum: int = 1,
              maximum: int = validate.MAX_SIZE) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ExperimentError(
            f"{path}: {key}: expected an integer in [{minimum}, {maximum}], got "
            f"{validate.describe(value)}"
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
                             or not 1 <= prompt <= validate.MAX_SIZE):
        raise ExperimentError(
            f"{path}: [run] prompt_tokens: expected an integer >= 1 or \"fill\", got {prompt!r}"
        )
    _positive(path, "[run] new_tokens", kw.get("new_tokens", RunSettings.new_tokens), 2)
    _positive(path, "[run] check_tokens", kw.get("check_tokens", RunSettings.check_tokens), 2)
    _positive(path, "[run] warmup", kw.get("warmup", RunSettings.warmup), 0)
    _positive(path, "[run] repeats", kw.get("repeats", RunSettings.repeats))
    _positive(path, "[run] seed", kw.get("seed", RunSettings.seed), 0, 2**63 - 2)
    _positive(path, "[run] threads", kw.get("threads", RunSettings.threads), 0, MAX_THREADS)
    for flag in ("check", "measure"):
        if not isinstance(kw.get(flag, True), bool):
            raise ExperimentError(f"{path}: [run] {flag}: expected true or false, "
                                  f"got {kw[flag]!r}")
    modes = kw.get("modes", [])
    if not isinstance(modes, list) or any(not isinstance(m, str) or m not in MODES
                                          for m in modes):
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
    size = 1
    for values in grid.values():
        size *= len(values) if isinstance(values, list) else 1
    if size > MAX_POINTS:  # before any value is checked or any point built
        shape = " x ".join(f"{len(v) if isinstance(v, list) else 1} {a}" for a, v in grid.items())
        raise ExperimentError(
            f"{path}: [grid] has {size:,} points ({shape}); at most {MAX_POINTS:,} are allowed: "
            "split it into several experiments"
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
