"""Where a CPU decode step's time goes: operator calls and Python calls per token, by engine path.

    python scripts/profile_cpu_decode.py --model stories15m --steps 64 [--fusion full,silu_gemv]

For each Settings.fusion level named (full: one toyllm::cpu_decode_step call for the
forward; the levels below run the separate operators), one warm-up request, then: the decode
rate of a timed request; over `steps` greedy decode steps after a prefill (the engine's
decode_step and sample, as its generate loop runs them): the operators a token calls from
Python (torch.profiler's top-level events), all operators with those they call inside (self CPU
time per token), and the Python function calls (cProfile). At full, the step and the greedy
pick call their operators' C++ functions through the extension's binding, not the dispatcher
(engine/ops/cpu_step.py, argmax.py): the profiler then shows those ATen calls inside them that
go through the dispatcher (at::empty), not the two calls themselves. The machine is shared and
noisy: read the counts as exact and the times as one sample.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from toyllm.engine.generate import Engine
from toyllm.engine.sampling import SamplingParams, sample
from toyllm.engine.settings import Fusion, Settings
from toyllm.models.config import load_config
from toyllm.models.llama import build_model
from toyllm.models.shipped import resolve_config


def decoder(engine: Engine, prompt: list[int], steps: int,
            params: SamplingParams) -> Callable[[], None]:
    """A function running `steps` greedy decode steps, as Engine.generate runs them, after the
    prefill of `prompt` done here."""
    cache = engine.prepare_cache(1, len(prompt) + steps + 1)
    with torch.inference_mode():
        first = sample(engine.prefill(cache, 0, prompt)[None], params, None)

    @torch.inference_mode()
    def decode() -> None:
        tokens = first
        for _ in range(steps):
            tokens = sample(engine.decode_step(cache, 1, tokens), params, None)

    return decode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="stories15m", help="shipped config name or config .toml")
    ap.add_argument("--context", type=int, default=32)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--fusion", default="full,silu_gemv",
                    help="comma list of Settings.fusion levels to profile")
    ap.add_argument("--top", type=int, default=15, help="operators listed per level")
    args = ap.parse_args()
    try:
        levels = [Fusion[name.strip().upper()] for name in args.fusion.split(",")]
    except KeyError as exc:
        print(f"profile_cpu_decode: --fusion: expected names of {[f.name.lower() for f in Fusion]}"
              f", got {exc.args[0]!r}")
        return 2
    model = build_model(load_config(resolve_config(args.model)), device="cpu")
    prompt = [[5] * args.context]
    params = SamplingParams(max_new_tokens=args.steps + 1, stop_at_eos=False)
    print(f"{args.model} fp32 on the CPU, {torch.get_num_threads()} threads, context "
          f"{args.context}, {args.steps} decode steps")
    for fusion in levels:
        engine = Engine(model, cuda_graph=False, settings=Settings(fusion=fusion))
        engine.generate(prompt, params)
        stats = engine.generate(prompt, params).stats
        steps = args.steps
        decode = decoder(engine, prompt[0], steps, params)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            decode()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        top = sum(1 for e in prof.events() if e.cpu_parent is None) / steps
        nested = sum(e.count for e in events) / steps
        profiler = cProfile.Profile()
        decode = decoder(engine, prompt[0], steps, params)
        profiler.enable()
        decode()
        profiler.disable()
        calls = pstats.Stats(profiler).total_calls / steps
        print(f"\nfusion {fusion.name.lower()}: {stats.decode_tok_per_s:.1f} tok/s "
              f"({stats.decode_s / stats.decode_steps * 1e3:.3f} ms/token); per token: {top:.0f} "
              f"operator calls from Python ({nested:.0f} with those inside them), {calls:.0f} "
              "Python function calls")
        for e in events[: args.top]:
            print(f"  {e.self_cpu_time_total / steps:9.1f} us  {e.count / steps:6.1f}x  {e.key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
