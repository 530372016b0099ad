"""Benchmark of the greedy argmax: toyllm::argmax (csrc/argmax.cu) against torch.argmax on decode
logits, both measured in one run on one GPU.

    python scripts/bench_argmax.py [--json out/bench_argmax.json] [--reps 20]

Cases: rows 1 and 16, vocab 32000 (Llama-2) and 128256 (Llama-3), fp32 and bf16 logits. "graph"
is the GPU time per call over a CUDA graph of --graph-calls calls on the same logits (no launch
cost; toyllm.engine.tools.timing's timer, median of --reps replays); the logits stay in L2, as
they do right after the lm_head product wrote them. "eager" is one call issued from Python
between two CUDA events (dispatch and launch included; the engine samples eagerly after the
decode graph). For bf16 the table also times what the engine did before: torch.argmax of
``logits.float()`` (two kernels). "same" says whether the two answers agree on these logits;
the exit status is 1 when one does not. Exits with status 2 and a one-line message where there
is no GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch

from toyllm.engine.device import cuda_kernels_missing
from toyllm.engine.tools.timing import time_eager, time_graph

ROWS = (1, 16)
VOCABS = (32000, 128256)
DTYPES = ("float32", "bfloat16")


@dataclass
class Row:
    rows: int
    vocab: int
    dtype: str
    ours_graph_us: float
    torch_graph_us: float
    speedup_graph: float
    ours_eager_us: float
    torch_eager_us: float
    float_then_torch_graph_us: float | None  # bf16: torch.argmax(logits.float()), the old path
    same: bool


def measure(rows: int, vocab: int, dtype: torch.dtype, graph_calls: int, reps: int) -> Row:

    gen = torch.Generator(device="cuda").manual_seed(rows * vocab)
    logits = torch.randn(rows, vocab, generator=gen, device="cuda").mul(3).to(dtype)
    ours_fn = torch.ops.toyllm.argmax.default

    def ours() -> None:
        ours_fn(logits)

    def theirs() -> None:
        logits.argmax(dim=-1)

    def float_then_theirs() -> None:
        logits.float().argmax(dim=-1)

    same = torch.equal(ours_fn(logits), logits.argmax(dim=-1))
    ours_graph = time_graph(ours, graph_calls, reps)
    torch_graph = time_graph(theirs, graph_calls, reps)
    old = None if dtype == torch.float32 else time_graph(float_then_theirs, graph_calls, reps)
    return Row(rows, vocab, str(dtype).removeprefix("torch."), ours_graph, torch_graph,
               torch_graph / ours_graph, time_eager(ours, reps * 10), time_eager(theirs, reps * 10),
               old, same)


def run(graph_calls: int, reps: int) -> dict:
    rows = [measure(r, v, getattr(torch, d), graph_calls, reps)
            for d in DTYPES for v in VOCABS for r in ROWS]
    return {
        "device": torch.cuda.get_device_name(),
        "sm_count": torch.cuda.get_device_properties(0).multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "graph_calls": graph_calls,
        "rows": [asdict(r) for r in rows],
    }


def print_table(result: dict) -> None:
    print(
        f"greedy argmax on {result['device']} ({result['sm_count']} SMs, torch "
        f"{result['torch']}, CUDA {result['cuda']}): GPU time per call over a CUDA graph of "
        f"{result['graph_calls']} calls, and one eager call"
    )
    headers = ["rows", "vocab", "dtype", "ours us", "torch us", "x torch", "ours eager",
               "torch eager", "float()+torch us", "same"]
    body = []
    for r in result["rows"]:
        old = r["float_then_torch_graph_us"]
        body.append([str(r["rows"]), str(r["vocab"]), r["dtype"], f"{r['ours_graph_us']:.2f}",
                     f"{r['torch_graph_us']:.2f}", f"{r['speedup_graph']:.2f}",
                     f"{r['ours_eager_us']:.2f}", f"{r['torch_eager_us']:.2f}",
                     "-" if old is None else f"{old:.2f}", "yes" if r["same"] else "NO"])
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for row in body:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--reps", type=int, default=20, help="timed graph replays (median)")
    parser.add_argument("--graph-calls", type=int, default=64, help="calls per CUDA graph")
    args = parser.parse_args(argv)

    missing = cuda_kernels_missing()
    if missing:
        print(f"bench_argmax: {missing}", file=sys.stderr)
        return 2

    result = run(args.graph_calls, args.reps)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0 if all(r["same"] for r in result["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
