"""Kernel time breakdown of decode steps: where a step's time goes beyond the weight read.

    python scripts/profile_decode.py --model llama-1b --dtype bf16 --steps 16 [--graph]

Prints the kernels by total GPU time over `steps` decode steps and the kernel launches. Eager
by default (each kernel launched alone, so its time is its own); --graph profiles the CUDA-graph
replays the engine serves with, where programmatic launch lets a kernel start before the one
ahead of it ends (its time then includes its wait for that kernel's results), so the sum of
kernel times can exceed the wall time.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from toyllm.engine.device import cuda_kernels_missing, resolve_dtype
from toyllm.engine.generate import Engine
from toyllm.engine.sampling import SamplingParams
from toyllm.models.config import load_config
from toyllm.models.llama import build_model
from toyllm.models.shipped import resolve_config


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-1b", help="shipped config name or config .toml")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--graph", action="store_true", help="profile CUDA-graph replays")
    args = ap.parse_args()
    missing = cuda_kernels_missing()
    if missing:
        print(f"profile_decode: {missing}", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    model = build_model(load_config(resolve_config(args.model)), device=device,
                        dtype=resolve_dtype(args.dtype, device))
    engine = Engine(model, cuda_graph=args.graph)
    prompt = [[5] * args.context]
    engine.generate(prompt, SamplingParams(max_new_tokens=4, stop_at_eos=False))
    cache = engine.prepare_cache(1, args.context + args.steps + 1)
    engine.prefill(cache, 0, prompt[0])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.generate(prompt, SamplingParams(max_new_tokens=args.steps + 1, stop_at_eos=False))
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events)
    launches = sum(e.count for e in events)
    mode = "CUDA graphs" if args.graph else "eager"
    print(f"{args.model} {args.dtype} ctx {args.context}, {mode}: {args.steps + 1} generated "
          f"tokens (prefill included): {launches} kernels, {total / 1e3:.2f} ms GPU time")
    for e in events[:25]:
        print(f"{e.device_time_total / 1e3:9.3f} ms  {e.count:6d}x  {e.key[:110]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
