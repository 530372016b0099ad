"""The serving engine's CPU decode against its baselines, in one process: greedy completions of
1 and 4 prompts through

* ServingEngine, its decode-only steps in one toyllm::cpu_decode_step over the paged pools
  (the default at Settings.fusion FULL: engine/forward.py);
* the same engine with that step declined, its decode through the separate operators (what it
  ran before the step took block tables);
* the static engine (Engine: contiguous cache, its own one-call step).

Rounds alternate the three; the table gives each one's median and range of output tok/s, and
whether the three gave the same tokens.

    python scripts/bench_serving_cpu.py                       # the shipped model, ~1 min
    python scripts/bench_serving_cpu.py --model CHECKPOINT_DIR --rounds 7 --new-tokens 256
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from toyllm.engine.forward import EngineForward
from toyllm.engine.generate import Engine
from toyllm.engine.sampling import SamplingParams
from toyllm.engine.serving import ServingEngine
from toyllm.models.model_source import ModelSourceError, load_model

PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park", "One day"]
PATHS = ("serving, one-call step", "serving, separate ops", "static engine")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None,
                        help="a checkpoint directory or .gguf file; default: the shipped model")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.new_tokens < 1:
        parser.error("--rounds and --new-tokens: expected at least 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.model is not None and not Path(args.model).exists():
        parser.error(f"--model: expected a checkpoint directory or .gguf file, got {args.model}")
    if args.model is not None and args.model.endswith(".toml"):
        parser.error(f"--model: expected a checkpoint directory or .gguf file (the prompts are "
                     f"text), got the config {args.model}")
    try:
        loaded = load_model(args.model, torch.device("cpu"), torch.float32)
    except ModelSourceError as e:  # one line, as the CLI says it
        parser.error(str(e))
    if loaded.tokenizer is None:
        parser.error(f"{loaded.source}: expected a model with a tokenizer (the prompts are text)")
    model, tokenizer = loaded.model, loaded.tokenizer
    params = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens, stop_at_eos=False)
    block = 16  # the engine's default block size; the context a multiple of it
    context = min(model.config.max_seq_len, -(-(64 + args.new_tokens) // block) * block)
    serving = ServingEngine(model, tokenizer, block_size=block, max_running=8,
                            max_seq_len=context)
    static = Engine(model, tokenizer)
    paged_step = EngineForward._cpu_paged_step

    def run(path: str, prompts: list[str]) -> tuple[float, list[list[int]]]:
        if path == PATHS[1]:  # the step declined: the separate operators
            EngineForward._cpu_paged_step = lambda *a, **k: None
        try:
            engine = static if path == PATHS[2] else serving
            start = time.perf_counter()
            result = engine.generate(prompts, params)
            seconds = time.perf_counter() - start
        finally:
            EngineForward._cpu_paged_step = paged_step
        tokens = [c.token_ids for c in result.completions]
        return sum(map(len, tokens)) / seconds, tokens

    print(f"model: {loaded.source}; {torch.get_num_threads()} threads; greedy, "
          f"{args.new_tokens} new tokens a prompt; {args.rounds} alternating rounds")
    print(f"| prompts | {' | '.join(PATHS)} | step / separate | same tokens |")
    print(f"|---:|{'---:|' * len(PATHS)}---:|---|")
    for count in (1, 4):
        prompts = PROMPTS[:count]
        speeds: dict[str, list[float]] = {p: [] for p in PATHS}
        tokens: dict[str, list[list[int]]] = {}
        for path in PATHS:  # warm-up
            run(path, prompts)
        for _ in range(args.rounds):
            for path in PATHS:
                speed, tokens[path] = run(path, prompts)
                speeds[path].append(speed)
        cells = [f"{statistics.median(v):,.1f} ({min(v):,.0f}-{max(v):,.0f})"
                 for v in speeds.values()]
        ratio = statistics.median(speeds[PATHS[0]]) / statistics.median(speeds[PATHS[1]])
        same = all(t == tokens[PATHS[0]] for t in tokens.values())
        print(f"| {count} | {' | '.join(cells)} | {ratio:.2f}x | {'yes' if same else 'NO'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
