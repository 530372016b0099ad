"""The PNG figures of `toyllm sweep`, drawn from its rows (matplotlib, no display needed).

* kv_memory_vs_context.png (always; arithmetic): KV-cache bytes of one sequence against the
  context length, one line per model variant (KV-head count first): the memory side of
  MHA vs GQA vs MQA at a glance.
* decode_vs_batch.png (when batch_size takes 2+ values and points were measured): aggregate
  decode tok/s against batch size, one line per variant and mode (eager solid, graph dashed).
* decode_vs_context.png (when context takes 2+ values and points were measured): decode tok/s
  and prefill ms against context.
* error_vs_dtype.png (when the harness ran): its worst-step ||a-b||/||b|| and max |a-b| per
  dtype, log scale (an exact 0 is drawn at 1e-12 and says so).

Figures are built on `matplotlib.figure.Figure` directly, never through pyplot's global
state, so the Agg canvas renders them whatever backend the process has.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

MODEL_ORDER = ("num_kv_heads", "num_heads", "head_dim", "num_layers", "hidden_size")
ZERO_FLOOR = 1e-12  # where an exact zero error is drawn on a log axis
MODE_STYLE = {"eager": "-", "graph": "--"}


def write_plots(rows: list[dict[str, Any]], axes: Sequence[str], out_dir: Path) -> list[Path]:
    """Every figure the rows support, as PNG files in out_dir; the paths written."""
    out_dir = Path(out_dir)
    axes = [a for a in axes if len({repr(r[a]) for r in rows}) > 1]  # constants label nothing
    written = [_kv_memory(rows, axes, out_dir)]
    ok = [r for r in rows if r["status"] == "ok"]
    for draw in (_decode_vs_batch, _decode_vs_context, _error_vs_dtype):
        path = draw(ok, axes, out_dir)
        if path is not None:
            written.append(path)
    return written


def variant(row: dict[str, Any], axes: Sequence[str], leave_out: Sequence[str]) -> str:
    """A line's label: the row's values of the varied axes, minus those on the x axis.
    The KV-head count always leads (the figures compare attention layouts first)."""
    keys = [a for a in MODEL_ORDER if a in axes or a == "num_kv_heads"]
    keys = list(dict.fromkeys(keys + list(axes)))
    parts = [f"{_short(k)}={row[k]}" for k in keys if k not in leave_out]
    return ", ".join(parts)


def _short(axis: str) -> str:
    return {"num_kv_heads": "kv_heads", "batch_size": "batch"}.get(axis, axis)


def _legend(ax: Any) -> None:
    """Inside the axes when short; to the right of them when it would hide the lines."""
    if len(ax.get_legend_handles_labels()[1]) <= 4:
        ax.legend(fontsize=8)
    else:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _kv_memory(rows: list[dict[str, Any]], axes: Sequence[str], out_dir: Path) -> Path:
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.subplots()
    grid_contexts = sorted({r["context"] for r in rows})
    lines: dict[str, tuple[int, int]] = {}  # label -> (bytes per token, max_seq_len)
    for r in rows:
        label = variant(r, axes, ("context", "batch_size", "dtype"))
        if "kv_dtype" not in axes:
            label += f" ({r['kv_dtype']})"
        lines.setdefault(label, (r["kv_bytes_per_token"], r["max_seq_len"]))
    curves = {label: (grid_contexts if len(grid_contexts) > 1 else _powers_of_two(max_len),
                      per_token) for label, (per_token, max_len) in lines.items()}
    biggest = max(per_token * max(xs) for xs, per_token in curves.values())
    unit, scale = next((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10),
                                           ("B", 1)) if biggest >= s)
    for label, (xs, per_token) in curves.items():
        ax.plot(xs, [per_token * x / scale for x in xs], marker="o", markersize=3, label=label)
    _log2_x(ax)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: ""))
    ax.set_xlabel("context (positions per sequence)")
    ax.set_ylabel(f"KV cache per sequence ({unit})")
    ax.set_title("KV-cache memory vs context (arithmetic; times batch size for a batch)")
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax)
    return _save(fig, out_dir / "kv_memory_vs_context.png")


def _log2_x(ax: Any) -> None:
    """A base-2 log x axis labelled 64, 128, ... rather than 2^6, 2^7."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))


def _powers_of_two(limit: int) -> list[int]:
    xs, x = [], 128
    while x < limit:
        xs.append(x)
        x *= 2
    return xs + [limit]


def _modes(rows: list[dict[str, Any]]) -> list[str]:
    return [m for m in MODE_STYLE if any(r.get(f"decode_tok_s_{m}") is not None for r in rows)]


def _decode_vs_batch(rows: list[dict[str, Any]], axes: Sequence[str], out_dir: Path
                     ) -> Path | None:
    if len({r["batch_size"] for r in rows}) < 2 or not _modes(rows):
        return None
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.subplots()
    for mode in _modes(rows):
        series = _series(rows, axes, "batch_size", f"decode_tok_s_{mode}")
        for label, points in series.items():
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, MODE_STYLE[mode], marker="o", label=f"{label} [{mode}]")
    _log2_x(ax)
    ax.set_xlabel("batch size (sequences decoded together)")
    ax.set_ylabel("decode tokens/s (all sequences)")
    ax.set_title("Decode throughput vs batch size")
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax)
    return _save(fig, out_dir / "decode_vs_batch.png")


def _decode_vs_context(rows: list[dict[str, Any]], axes: Sequence[str], out_dir: Path
                       ) -> Path | None:
    if len({r["context"] for r in rows}) < 2 or not _modes(rows):
        return None
    fig = Figure(figsize=(8, 8), layout="constrained")
    left, right = fig.subplots(2, 1)
    for mode in _modes(rows):
        for label, points in _series(rows, axes, "context", f"decode_tok_s_{mode}").items():
            xs, ys = zip(*points, strict=True)
            left.plot(xs, ys, MODE_STYLE[mode], marker="o", label=f"{label} [{mode}]")
    for label, points in _series(rows, axes, "context", "prefill_ms").items():
        xs, ys = zip(*points, strict=True)
        right.plot(xs, ys, marker="o", label=label)
    left.set_ylabel("decode tokens/s (all sequences)")
    left.set_title("Decode throughput vs context")
    right.set_ylabel("prefill ms (whole batch)")
    right.set_yscale("log")
    right.set_title("Prefill time vs context")
    for ax in (left, right):
        _log2_x(ax)
        ax.set_xlabel("context (KV-cache positions per sequence)")
        ax.grid(True, which="both", alpha=0.3)
        _legend(ax)
    return _save(fig, out_dir / "decode_vs_context.png")


def _series(rows: list[dict[str, Any]], axes: Sequence[str], x: str, y: str
            ) -> dict[str, list[tuple[float, float]]]:
    """label -> sorted (x, y) points of the rows that have a y value."""
    out: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if isinstance(r.get(y), (int, float)):
            out.setdefault(variant(r, axes, (x,)), []).append((r[x], r[y]))
    return {k: sorted(v) for k, v in out.items()}


def _error_vs_dtype(rows: list[dict[str, Any]], axes: Sequence[str], out_dir: Path
                    ) -> Path | None:
    checked = [r for r in rows if isinstance(r.get("check_rel"), (int, float))]
    if not checked:
        return None
    order = [d for d in ("fp32", "fp16", "bf16") if any(r["dtype"] == d for r in checked)]
    fig = Figure(figsize=(12, 5), layout="constrained")
    panels = fig.subplots(1, 2)
    fig.suptitle("cached engine vs no-cache reference (toyllm check), per dtype")
    limits = _tolerance_limits()
    floored = False
    for ax, key, title in zip(panels, ("check_rel", "check_max_abs"),
                              ("worst step ||a-b|| / ||b||", "max |a-b| over logits"),
                              strict=True):
        groups: dict[str, list[tuple[int, float]]] = {}
        values = []
        for r in checked:
            value = r.get(key)
            if not isinstance(value, (int, float)):
                continue
            floored |= value <= 0
            values.append(max(value, ZERO_FLOOR))
            label = variant(r, axes, ("dtype", "batch_size", "context"))
            groups.setdefault(label, []).append((order.index(r["dtype"]), values[-1]))
        for i, (label, points) in enumerate(groups.items()):
            xs, ys = zip(*points, strict=True)
            offset = (i - (len(groups) - 1) / 2) * 0.08  # side by side, not on top
            ax.scatter([x + offset for x in xs], ys, label=label or "model", s=24)
        for x, dtype in enumerate(order):  # the tolerance the harness judges this dtype by
            metric, threshold = limits.get(dtype, (None, None))
            if metric == key:
                ax.hlines(threshold, x - 0.35, x + 0.35, colors="red", linestyles=":")
                ax.annotate("tolerance", (x + 0.35, threshold), fontsize=7, color="red")
        ax.set_xticks(range(len(order)), order)
        ax.set_xlim(-0.6, len(order) - 0.4)
        if values:  # a fixed span, so fp32 and bf16 errors read on one scale
            ax.set_ylim(min(1e-8, min(values) / 3), max(1e-1, max(values) * 3))
        ax.set_yscale("log")
        ax.set_xlabel("dtype (model and KV cache)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        _legend(ax)
    if floored:
        fig.text(0.5, -0.02, f"an exact 0 is drawn at {ZERO_FLOOR:g}", ha="center", fontsize=8)
    return _save(fig, out_dir / "error_vs_dtype.png")


def _tolerance_limits() -> dict[str, tuple[str, float]]:
    """dtype -> (row key of the metric it is judged by, threshold), from engine/tolerances.py."""
    from toyllm.engine.check.tolerances import TOLERANCES

    keys = {"rel": "check_rel", "max_abs": "check_max_abs"}
    return {name: (keys[t.metric], t.threshold) for name, t in TOLERANCES.items()}
