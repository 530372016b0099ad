"""Benchmark of the KV-cache update: the extension's op against PyTorch's slice copy and
index_copy_, with a device-to-device copy of >= 1 GiB as the bandwidth ceiling, all measured
in one run on one GPU.

    python scripts/bench_kv_update.py [--json out/bench_kv_update.json] [--reps 200]

For every size (the spec's decode and prefill sizes, 8 KV heads x 128, and two large ones that
move >= 64 MB) and dtype (fp16, bf16), each method is timed with CUDA events after a warm-up
(median of --reps calls). "eager" is the time per call as issued from Python (dispatch and
launches included); for small sizes "graph" is the GPU time per call measured over a CUDA graph
of --graph-calls calls, i.e. without launch overhead. Bytes count what is read plus written
(K and V). Also counts the kernel launches of a decode-size update with torch.profiler.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from toyllm.engine.device import cuda_kernels_missing
from toyllm.engine.tools.timing import copy_ceiling_gb_per_s, time_eager, time_graph

GRAPH_MAX_BYTES = 64 * 2**20  # sizes below this are also timed through a CUDA graph


@dataclass(frozen=True)
class Case:
    name: str
    num_tokens: int
    num_kv_heads: int
    head_dim: int
    max_seq_len: int
    position: int


CASES = [
    Case("decode", 1, 8, 128, 4096, 100),
    Case("prefill 10", 10, 8, 128, 4096, 0),
    Case("prefill 100", 100, 8, 128, 4096, 0),
    Case("prefill 1000", 1000, 8, 128, 4096, 0),
    Case("large 16384x32x128", 16384, 32, 128, 16384, 0),
    Case("large 65536x8x128", 65536, 8, 128, 65536, 0),
]


@dataclass
class Row:
    case: str
    dtype: str
    method: str
    bytes_moved: int
    eager_us: float
    graph_us: float | None
    gb_per_s: float
    fraction_of_copy: float
    speedup_vs_slice: float | None = None


def make_methods(case: Case, dtype: torch.dtype) -> tuple[dict[str, Callable[[], None]], int]:
    from toyllm.engine.ops.kv_cache import kv_update

    shape_cache = (1, case.max_seq_len, case.num_kv_heads, case.head_dim)
    shape_new = (1, case.num_tokens, case.num_kv_heads, case.head_dim)
    kc = torch.zeros(shape_cache, dtype=dtype, device="cuda")
    vc = torch.zeros_like(kc)
    nk = torch.randn(shape_new, device="cuda").to(dtype)
    nv = torch.randn(shape_new, device="cuda").to(dtype)
    positions = torch.tensor([case.position], dtype=torch.int32, device="cuda")
    index = torch.arange(case.position, case.position + case.num_tokens, device="cuda")
    p, n = case.position, case.num_tokens

    def op() -> None:
        kv_update(kc, vc, nk, nv, positions)

    def slice_copy() -> None:
        kc[:, p : p + n].copy_(nk)
        vc[:, p : p + n].copy_(nv)

    def index_copy() -> None:
        kc.index_copy_(1, index, nk)
        vc.index_copy_(1, index, nv)

    bytes_moved = 2 * 2 * nk.numel() * nk.element_size()  # K and V, read + write
    methods = {"toyllm kv_update": op, "slice copy_": slice_copy, "index_copy_": index_copy}
    return methods, bytes_moved


def count_decode_launches(dtype: torch.dtype) -> int:
    """CUDA kernels launched by one decode-size (1 token x 8 x 128) update."""
    from torch.profiler import ProfilerActivity, profile

    methods, _ = make_methods(CASES[0], dtype)
    op = methods["toyllm kv_update"]
    op()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        op()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def run(reps: int, graph_calls: int, dtypes: list[torch.dtype]) -> dict:
    ceiling, ceiling_bytes = copy_ceiling_gb_per_s(reps)
    rows: list[Row] = []
    for dtype in dtypes:
        for case in CASES:
            methods, bytes_moved = make_methods(case, dtype)
            reps_here = reps if bytes_moved < GRAPH_MAX_BYTES else max(20, reps // 10)
            measured: dict[str, Row] = {}
            for method, fn in methods.items():
                eager = time_eager(fn, reps_here)
                graph = (
                    time_graph(fn, graph_calls, max(10, reps_here // 10))
                    if bytes_moved < GRAPH_MAX_BYTES
                    else None
                )
                best = graph if graph is not None else eager
                gbps = bytes_moved / (best * 1e-6) / 1e9
                measured[method] = Row(
                    case.name,
                    str(dtype).removeprefix("torch."),
                    method,
                    bytes_moved,
                    eager,
                    graph,
                    gbps,
                    gbps / ceiling,
                )
            slice_row = measured["slice copy_"]
            for row in measured.values():
                row.speedup_vs_slice = (slice_row.graph_us or slice_row.eager_us) / (
                    row.graph_us or row.eager_us
                )
                rows.append(row)
            del methods
            torch.cuda.empty_cache()
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "copy_ceiling": {"bytes": ceiling_bytes, "gb_per_s": ceiling},
        "decode_kernel_launches": count_decode_launches(dtypes[0]),
        "rows": [asdict(r) for r in rows],
    }


def print_table(result: dict) -> None:
    title = (
        f"KV update on {result['device']} (torch {result['torch']}, CUDA {result['cuda']}); "
        f"copy ceiling {result['copy_ceiling']['gb_per_s']:.0f} GB/s "
        f"(1 GiB device-to-device, read+write)"
    )
    headers = [
        "case",
        "dtype",
        "method",
        "moved",
        "eager us",
        "graph us",
        "GB/s",
        "% of copy",
        "x slice",
    ]
    body = []
    for r in result["rows"]:
        body.append(
            [
                r["case"],
                r["dtype"],
                r["method"],
                f"{r['bytes_moved'] / 2**20:.3f} MiB",
                f"{r['eager_us']:.2f}",
                "-" if r["graph_us"] is None else f"{r['graph_us']:.2f}",
                f"{r['gb_per_s']:.0f}",
                f"{100 * r['fraction_of_copy']:.0f}%",
                f"{r['speedup_vs_slice']:.2f}",
            ]
        )
    footer = f"kernel launches for one decode-size update: {result['decode_kernel_launches']}"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(headers)]
        print(title)
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
        for row in body:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        print(footer)
        return
    table = Table(title=title)
    for h in headers:
        table.add_column(h, justify="left" if h in ("case", "dtype", "method") else "right")
    for row in body:
        table.add_row(*row)
    console = Console(width=max(Console().width, 150))  # no wrapped cells when piped
    console.print(table)
    console.print(footer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--reps", type=int, default=200, help="timed calls per measurement")
    parser.add_argument(
        "--graph-calls",
        type=int,
        default=100,
        help="calls captured in the CUDA graph used for small sizes",
    )
    parser.add_argument(
        "--dtypes",
        default="float16,bfloat16",
        help="comma-separated dtypes (float16, bfloat16, float32)",
    )
    args = parser.parse_args(argv)

    missing = cuda_kernels_missing()
    if missing:
        print(f"bench_kv_update: {missing}", file=sys.stderr)
        return 2
    try:
        dtypes = [getattr(torch, name.strip()) for name in args.dtypes.split(",")]
    except AttributeError as exc:
        print(
            f"bench_kv_update: expected dtypes like float16,bfloat16, got {args.dtypes!r}",
            file=sys.stderr,
        )
        raise SystemExit(2) from exc

    result = run(args.reps, args.graph_calls, dtypes)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
