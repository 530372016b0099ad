"""The serving workload of issue 19 through the ServingEngine and, in the same run, the static
Engine (every prompt in one batch, decoding to the longest request; only each request's own
tokens counted): output tokens per second, time to first token and inter-token latency
percentiles of the serving engine, peak memory.

    python scripts/bench_serving.py --model llama-1b --requests 256 --lengths 100,1024
    python scripts/bench_serving.py --model stories15m --device cpu --requests 8 --lengths 10,40

Random weights and token ids (fixed seed), EOS ignored: the issue's workload when run with the
defaults on a GPU. Prints one table; --json writes the rows too.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from toyllm.engine.generate import Engine
from toyllm.engine.sampling import SamplingParams
from toyllm.engine.serving import ServingEngine
from toyllm.models.config import load_config
from toyllm.models.llama import build_model
from toyllm.models.shipped import resolve_config


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-1b", help="a shipped config name or a .toml")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--lengths", default="100,1024",
                    help="LO,HI: prompt and output lengths uniform in [LO, HI]")
    ap.add_argument("--kv-memory", type=float, default=0.8,
                    help="the serving pool: a fraction of free memory (CUDA)")
    ap.add_argument("--no-static", action="store_true", help="skip the static baseline")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    lo, hi = (int(x) for x in args.lengths.split(","))
    if not 0 < lo <= hi or args.requests <= 0:
        ap.error(f"expected 0 < LO <= HI and --requests > 0, got {args.lengths} and "
                 f"{args.requests}")
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = build_model(load_config(resolve_config(args.model)), dev, dtype)
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(lo, hi + 1, (args.requests, 2), generator=g).tolist()
    prompts = [torch.randint(3, model.config.vocab_size, (p,), generator=g).tolist()
               for p, _ in lens]
    params = [SamplingParams(max_new_tokens=o, stop_at_eos=False) for _, o in lens]
    own = sum(o for _, o in lens)
    rows = []

    kv = args.kv_memory if cuda else 2**30
    engine = ServingEngine(model, kv_memory=kv)
    engine.generate(prompts[:4], [SamplingParams(max_new_tokens=4, stop_at_eos=False)] * 4)
    warm = engine.stats()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ttft, itl = [], []
    sync()
    t0 = time.perf_counter()
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    sync()
    seconds = time.perf_counter() - t0
    for rid in ids:
        t = done[rid].timings
        ttft.append(t.time_to_first_token)
        itl += t.inter_token_latencies()
    stats = engine.stats()
    rows.append(dict(engine="serving (paged, continuous)", tokens=own, seconds=seconds,
                     tok_per_s=own / seconds, ttft_p50=percentile(ttft, 0.5),
                     ttft_p99=percentile(ttft, 0.99), itl_p50=percentile(itl, 0.5),
                     itl_p99=percentile(itl, 0.99),
                     peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                     steps=stats.steps - warm.steps, preemptions=stats.preemptions,
                     blocks=stats.blocks_total))
    del engine
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    if not args.no_static:
        static = Engine(model)
        static.generate(prompts[:4], SamplingParams(max_new_tokens=4, stop_at_eos=False))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        static.generate(prompts, SamplingParams(max_new_tokens=max(o for _, o in lens),
                                                stop_at_eos=False))
        sync()
        seconds = time.perf_counter() - t0
        rows.append(dict(engine="static batch (to the longest)", tokens=own, seconds=seconds,
                         tok_per_s=own / seconds,
                         peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None))

    print(f"{args.model} {dtype} on {dev}: {args.requests} requests, prompt and output "
          f"lengths uniform in [{lo}, {hi}], {own} output tokens, EOS ignored")
    print(f"{'engine':32} {'tok/s':>9} {'s':>8} {'TTFT p50/p99 s':>16} "
          f"{'ITL p50/p99 ms':>16} {'peak GiB':>9}")
    for r in rows:
        lat = (f"{r['ttft_p50']:.2f}/{r['ttft_p99']:.2f}" if "ttft_p50" in r else "-")
        itl_s = (f"{r['itl_p50'] * 1e3:.1f}/{r['itl_p99'] * 1e3:.1f}" if "itl_p50" in r
                 else "-")
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        print(f"{r['engine']:32} {r['tok_per_s']:9.0f} {r['seconds']:8.1f} {lat:>16} "
              f"{itl_s:>16} {peak:>9}")
    if len(rows) == 2:
        print(f"serving / static: {rows[0]['tok_per_s'] / rows[1]['tok_per_s']:.2f}x")
    print(f"serving: {rows[0]['steps']} steps, {rows[0]['preemptions']} preemptions, "
          f"{rows[0]['blocks']} blocks")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
