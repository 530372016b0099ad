"""Benchmark of the decode GEMV: toyllm::gemv (csrc/gemv.cu) against F.linear (cuBLAS) on the
weight shapes of a Llama-1B decode step, with a device-to-device copy as the bandwidth ceiling,
all measured in one run on one GPU; and the MLP's down product with silu(gate) * up fused in
(toyllm::gemv_silu_mul, csrc/gemv_silu_mul.cu) against the two kernels it replaces.

    python scripts/bench_gemv.py [--json out/bench_gemv.json] [--rows 1,4] [--reps 20]

Shapes (bf16 by default): the fused q/k/v [3072, 2048], o_proj [2048, 2048], the fused
gate/up [16384, 2048], down [2048, 8192] and lm_head [128256, 2048], at 1 and 4 rows of x. Each
method is timed as the GPU time per call over a CUDA graph of --graph-calls calls (no launch
cost; scripts/bench_kv_update.py's timer, median of --reps replays). The calls of one graph
cycle through enough copies of the weight (>= 256 MiB in all) that no call finds its weight in
L2 (50-60 MB on an H100/H200), as in a real decode step. GB/s counts the weight bytes read per
call. The "decode step" rows add up the products of one step of the 16-layer model.

The second table times down [2048, 8192] from one row of gate_up [1, 16384]: gemv_silu_mul (one
kernel) against toyllm::silu_mul then toyllm::gemv (the engine's path at
fusion level rope_kv) and silu_mul then F.linear, in graphs of the same kind, and says
whether the fused output has the bits of the two kernels'. The third times q/k/v [3072, 2048]
and gate/up [16384, 2048] after a residual add and RMSNorm of one row: gemv_add_rms_norm (one
kernel) against toyllm::add_rms_norm then toyllm::gemv (the engine's path at fusion level
silu_gemv), likewise, and gate/up with silu(gate) * up in the same
kernel (gemv_add_rms_norm_silu_mul) against those two and toyllm::silu_mul.
Exits with status 2 and a one-line message where there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from toyllm.engine.device import cuda_kernels_missing
from toyllm.engine.tools.timing import copy_ceiling_gb_per_s, time_graph

LAYERS = 16  # Llama-1B (Llama-3.2-1B: hidden 2048, 16 layers, MLP 8192, vocab 128256)
SHAPES = {  # name: (out, in, calls per decode step)
    "qkv": (3072, 2048, LAYERS),
    "o_proj": (2048, 2048, LAYERS),
    "gate_up": (16384, 2048, LAYERS),
    "down": (2048, 8192, LAYERS),
    "lm_head": (128256, 2048, 1),
}
L2_FLUSH_BYTES = 256 * 2**20  # weights per graph, at least: well past any L2


@dataclass
class Row:
    shape: str
    out: int
    inp: int
    rows: int
    weight_bytes: int
    ours_us: float
    cublas_us: float
    ours_gb_per_s: float
    cublas_gb_per_s: float
    speedup: float
    max_diff_ulps: float  # ours vs cuBLAS, in ulps of the dtype at cuBLAS's value


@dataclass
class SiluDownRow:
    rows: int
    out: int
    inp: int
    weight_bytes: int
    fused_us: float  # toyllm::gemv_silu_mul: one kernel
    two_kernels_us: float  # toyllm::silu_mul, then toyllm::gemv
    cublas_us: float  # toyllm::silu_mul, then F.linear
    fused_gb_per_s: float
    speedup: float  # two_kernels_us / fused_us
    same_bits: bool  # the fused output equals the two kernels', bit for bit


@dataclass
class NormRow:
    shape: str
    out: int
    inp: int
    weight_bytes: int
    fused_us: float  # toyllm::gemv_add_rms_norm: one kernel
    two_kernels_us: float  # toyllm::add_rms_norm, then toyllm::gemv
    fused_gb_per_s: float
    speedup: float  # two_kernels_us / fused_us
    same_bits: bool  # the fused outputs equal the two kernels', bit for bit


def max_diff_ulps(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |ours - ref| in units of the dtype's spacing at |ref|."""
    ref64 = ref.double()
    _, e = torch.frexp(ref64)
    mantissa = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[ref.dtype]
    spacing = torch.exp2((e - 1 - mantissa).double().clamp_min(-126 - mantissa))
    return ((ours.double() - ref64).abs() / spacing).max().item()


def weight_copies(out: int, inp: int, dtype: torch.dtype, graph_calls: int,
                  gen: torch.Generator) -> list[torch.Tensor]:
    """Enough copies of an [out, inp] weight (>= L2_FLUSH_BYTES in all, at most one per call of a
    graph) that no call of a graph finds its weight in L2."""
    weight_bytes = out * inp * (torch.finfo(dtype).bits // 8)
    copies = max(1, min(graph_calls, math.ceil(L2_FLUSH_BYTES / weight_bytes)))
    return [
        (torch.randn(out, inp, generator=gen, device="cuda") * inp**-0.5).to(dtype)
        for _ in range(copies)
    ]


def cycling(fn, x: torch.Tensor, weights: list[torch.Tensor]):
    """fn(x, weight) as a call without arguments that reads the next copy of the weight each
    time it is called (each captured call of a graph reads its own copy)."""
    state = {"i": 0}

    def one() -> None:
        fn(x, weights[state["i"] % len(weights)])
        state["i"] += 1

    return one


def measure(name: str, rows: int, dtype: torch.dtype, graph_calls: int, reps: int) -> Row:

    out, inp, _ = SHAPES[name]
    weight_bytes = out * inp * (torch.finfo(dtype).bits // 8)
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = weight_copies(out, inp, dtype, graph_calls, gen)
    x = torch.randn(rows, inp, generator=gen, device="cuda").to(dtype)
    gemv = torch.ops.toyllm.gemv.default
    ours_y, ref_y = gemv(x, weights[0]), F.linear(x, weights[0])
    diff = max_diff_ulps(ours_y, ref_y)

    ours = time_graph(cycling(gemv, x, weights), graph_calls, reps)
    cublas = time_graph(cycling(F.linear, x, weights), graph_calls, reps)
    return Row(name, out, inp, rows, weight_bytes, ours, cublas, weight_bytes / ours / 1e3,
               weight_bytes / cublas / 1e3, cublas / ours, diff)


def measure_silu_down(rows: int, dtype: torch.dtype, graph_calls: int,
                      reps: int) -> SiluDownRow:
    """Llama-1B's down product from the fused gate/up output: one kernel against two."""

    out, inp, _ = SHAPES["down"]
    weight_bytes = out * inp * (torch.finfo(dtype).bits // 8)
    gen = torch.Generator(device="cuda").manual_seed(1)
    weights = weight_copies(out, inp, dtype, graph_calls, gen)
    gate_up = torch.randn(rows, 2 * inp, generator=gen, device="cuda").to(dtype)
    ops = torch.ops.toyllm
    fused = ops.gemv_silu_mul.default

    def two_kernels(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return ops.gemv.default(ops.silu_mul.default(g), w)

    def with_cublas(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(ops.silu_mul.default(g), w)

    bits = torch.int32 if dtype == torch.float32 else torch.int16
    same = torch.equal(fused(gate_up, weights[0]).view(bits),
                       two_kernels(gate_up, weights[0]).view(bits))
    fused_us = time_graph(cycling(fused, gate_up, weights), graph_calls, reps)
    two_us = time_graph(cycling(two_kernels, gate_up, weights), graph_calls, reps)
    cublas_us = time_graph(cycling(with_cublas, gate_up, weights), graph_calls, reps)
    return SiluDownRow(rows, out, inp, weight_bytes, fused_us, two_us, cublas_us,
                       weight_bytes / fused_us / 1e3, two_us / fused_us, same)


def measure_norm_product(name: str, dtype: torch.dtype, graph_calls: int, reps: int,
                         silu: bool = False) -> NormRow:
    """A product after the residual add and RMSNorm of one row: one kernel against two (silu:
    with silu(gate) * up of the product in the kernel, against three)."""
    out, inp, _ = SHAPES[name]
    weight_bytes = out * inp * (torch.finfo(dtype).bits // 8)
    gen = torch.Generator(device="cuda").manual_seed(2)
    weights = weight_copies(out, inp, dtype, graph_calls, gen)
    x, r = (torch.randn(1, inp, generator=gen, device="cuda").to(dtype) for _ in range(2))
    norm_weight = torch.rand(inp, generator=gen, device="cuda").to(dtype) + 0.5
    ops = torch.ops.toyllm

    fused_op = ops.gemv_add_rms_norm_silu_mul if silu else ops.gemv_add_rms_norm

    def fused(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fused_op.default(x, r, norm_weight, 1e-5, w)

    def two_kernels(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, n = ops.add_rms_norm.default(x, r, norm_weight, 1e-5)
        y = ops.gemv.default(n, w)
        return s, ops.silu_mul.default(y) if silu else y

    bits = torch.int32 if dtype == torch.float32 else torch.int16
    same = all(torch.equal(a.view(bits), b.view(bits))
               for a, b in zip(fused(x, weights[0]), two_kernels(x, weights[0]), strict=True))
    fused_us = time_graph(cycling(fused, x, weights), graph_calls, reps)
    two_us = time_graph(cycling(two_kernels, x, weights), graph_calls, reps)
    return NormRow(name + "+silu" if silu else name, out, inp, weight_bytes, fused_us, two_us,
                   weight_bytes / fused_us / 1e3, two_us / fused_us, same)


def run(rows_list: list[int], dtype: torch.dtype, graph_calls: int, reps: int) -> dict:

    ceiling, ceiling_bytes = copy_ceiling_gb_per_s(200)
    rows = []
    for r in rows_list:
        for name in SHAPES:
            rows.append(measure(name, r, dtype, graph_calls, reps))
            torch.cuda.empty_cache()  # the last shape's weight copies
    steps = {}
    for r in rows_list:
        mine = [row for row in rows if row.rows == r]
        steps[r] = {
            "weight_bytes": sum(row.weight_bytes * SHAPES[row.shape][2] for row in mine),
            "ours_us": sum(row.ours_us * SHAPES[row.shape][2] for row in mine),
            "cublas_us": sum(row.cublas_us * SHAPES[row.shape][2] for row in mine),
        }
    # one row: the fused kernel's only shape (2-4 rows run silu_mul's and gemv's kernels)
    silu_down = [measure_silu_down(1, dtype, graph_calls, reps)]
    torch.cuda.empty_cache()
    norm_products = []
    for name, silu in (("qkv", False), ("gate_up", False), ("gate_up", True)):
        norm_products.append(measure_norm_product(name, dtype, graph_calls, reps, silu))
        torch.cuda.empty_cache()
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": str(dtype).removeprefix("torch."),
        "graph_calls": graph_calls,
        "copy_ceiling": {"bytes": ceiling_bytes, "gb_per_s": ceiling},
        "rows": [asdict(r) for r in rows],
        "decode_step": {str(k): v for k, v in steps.items()},
        "silu_down": [asdict(r) for r in silu_down],
        "norm_products": [asdict(r) for r in norm_products],
    }


def print_table(result: dict) -> None:
    ceiling = result["copy_ceiling"]["gb_per_s"]
    print(
        f"decode GEMV on {result['device']} (torch {result['torch']}, CUDA {result['cuda']}), "
        f"{result['dtype']}, GPU time per call over a CUDA graph of {result['graph_calls']} "
        f"calls; copy ceiling {ceiling:.0f} GB/s (1 GiB device-to-device, read+write)"
    )
    headers = ["shape", "[out, in]", "rows", "weight", "ours us", "cuBLAS us", "ours GB/s",
               "cuBLAS GB/s", "ours % copy", "x cuBLAS", "max diff"]
    body = []
    for r in result["rows"]:
        body.append([r["shape"], f"[{r['out']}, {r['inp']}]", str(r["rows"]),
                     f"{r['weight_bytes'] / 2**20:.1f} MiB", f"{r['ours_us']:.2f}",
                     f"{r['cublas_us']:.2f}", f"{r['ours_gb_per_s']:.0f}",
                     f"{r['cublas_gb_per_s']:.0f}", f"{100 * r['ours_gb_per_s'] / ceiling:.0f}%",
                     f"{r['speedup']:.2f}", f"{r['max_diff_ulps']:.1f} ulp"])
    for rows, s in result["decode_step"].items():
        ours_gbs = s["weight_bytes"] / s["ours_us"] / 1e3
        cublas_gbs = s["weight_bytes"] / s["cublas_us"] / 1e3
        body.append([f"decode step ({LAYERS} layers + lm_head)", "", rows,
                     f"{s['weight_bytes'] / 2**20:.0f} MiB", f"{s['ours_us']:.1f}",
                     f"{s['cublas_us']:.1f}", f"{ours_gbs:.0f}", f"{cublas_gbs:.0f}",
                     f"{100 * ours_gbs / ceiling:.0f}%", f"{s['cublas_us'] / s['ours_us']:.2f}",
                     ""])
    print_columns(headers, body)

    out, inp, layers = SHAPES["down"]
    print()
    print(f"down [{out}, {inp}] from gate_up [rows, {2 * inp}]: silu(gate) * up inside the "
          "product (toyllm::gemv_silu_mul) against toyllm::silu_mul then toyllm::gemv or "
          f"F.linear; GPU time per call, same graphs; saved per decode step: x {layers} layers")
    headers = ["rows", "fused us", "silu_mul+gemv us", "silu_mul+cuBLAS us", "fused GB/s",
               "fused % copy", "x two kernels", "saved per step", "same bits"]
    body = []
    for r in result["silu_down"]:
        saved = (r["two_kernels_us"] - r["fused_us"]) * layers
        body.append([str(r["rows"]), f"{r['fused_us']:.2f}", f"{r['two_kernels_us']:.2f}",
                     f"{r['cublas_us']:.2f}", f"{r['fused_gb_per_s']:.0f}",
                     f"{100 * r['fused_gb_per_s'] / ceiling:.0f}%", f"{r['speedup']:.2f}",
                     f"{saved:.1f} us", "yes" if r["same_bits"] else "NO"])
    print_columns(headers, body)
    print()
    print("the product after a residual add and RMSNorm of one row: the norm inside the "
          "product (toyllm::gemv_add_rms_norm) against toyllm::add_rms_norm then toyllm::gemv; "
          f"GPU time per call, same graphs; saved per decode step: x {layers} layers")
    headers = ["shape", "[out, in]", "fused us", "add_rms_norm+gemv(+silu_mul) us", "fused GB/s",
               "fused % copy", "x two kernels", "saved per step", "same bits"]
    body = []
    for r in result.get("norm_products", []):
        saved = (r["two_kernels_us"] - r["fused_us"]) * layers
        body.append([r["shape"], f"[{r['out']}, {r['inp']}]", f"{r['fused_us']:.2f}",
                     f"{r['two_kernels_us']:.2f}", f"{r['fused_gb_per_s']:.0f}",
                     f"{100 * r['fused_gb_per_s'] / ceiling:.0f}%", f"{r['speedup']:.2f}",
                     f"{saved:.1f} us", "yes" if r["same_bits"] else "NO"])
    print_columns(headers, body)


def print_columns(headers: list[str], body: list[list[str]]) -> None:
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for row in body:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--rows", default="1,4", help="comma-separated rows of x (1 to 4)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--reps", type=int, default=20, help="timed graph replays (median)")
    parser.add_argument("--graph-calls", type=int, default=64, help="calls per CUDA graph")
    args = parser.parse_args(argv)
    try:
        rows_list = [int(r) for r in args.rows.split(",")]
    except ValueError:
        parser.error(f"--rows: expected comma-separated integers like 1,4, got {args.rows!r}")
    if not all(1 <= r <= 4 for r in rows_list):
        parser.error(f"--rows: expected values from 1 to 4, got {args.rows!r}")

    missing = cuda_kernels_missing()
    if missing:
        print(f"bench_gemv: {missing}", file=sys.stderr)
        return 2

    result = run(rows_list, getattr(torch, args.dtype), args.graph_calls, args.reps)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
