"""The serving engine's host work per decode step, the forward taken out: what the device idles
through in each step when host and device run in series (ServingEngine(overlap=False)), and
what the overlapped steps (overlap=True) hide behind the device.

    python scripts/bench_serving_host.py                 # 256 requests, 5 interleaved rounds
    python scripts/bench_serving_host.py --requests 64 --rounds 3

Runs on the CPU, a tiny model (2 layers, 256-token vocabulary): the prompts are prefilled with
the real forward, then every pure decode step goes through a stand-in for the captured decode
graph that replays nothing (its logits are fixed), so a step's time is the engine's host work
alone: planning (Scheduler.schedule / schedule_ahead), the step's inputs (sync_device, the
graph's input buffer, the device-side token gather), sampling, Scheduler.complete, and the rest
(accepting the tokens, the outputs). Both engines run in turns (rounds); the table gives, per
part, the median over the full-batch steps, then the median over the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict

import torch

from toyllm.engine.ops.paged_cache import PagedKVCache
from toyllm.engine.paged_graphs import PagedDecodeGraphs, padding_inputs
from toyllm.engine.sampling import SamplingParams
from toyllm.engine.serving import ServingEngine
from toyllm.models.config import ModelConfig
from toyllm.models.llama import Transformer, build_model

PARTS = ("plan", "inputs", "sample", "complete", "rest")
CONFIG = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                     head_dim=32, intermediate_size=128, max_seq_len=2048, tie_embeddings=True)
BLOCK_SIZE = 16


class NoForwardGraphs(PagedDecodeGraphs):
    """PagedDecodeGraphs whose 'graph' replays nothing: the buffers are filled as for a real
    replay, the logits stay fixed (token 7 wins every row)."""

    def __init__(self, engine: ServingEngine) -> None:
        self.engine = engine
        self.graphs = {}

    def _capture(self, rows: int) -> None:
        host = padding_inputs(rows)
        logits = torch.zeros(rows, self.engine.config.vocab_size)
        logits[:, 7] = 1.0

        class Nothing:
            def replay(self) -> None:
                pass

        self.graphs[rows] = (Nothing(), host.clone(), host, logits)


def workload(requests: int, low: int, high: int) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(low, high + 1, (requests, 2), generator=g).tolist()
    prompts = [torch.randint(3, CONFIG.vocab_size, (p,), generator=g).tolist() for p, _ in lens]
    return prompts, [o for _, o in lens]


def host_parts(model: Transformer, prompts: list[list[int]], outputs: list[int],
               overlap: bool) -> dict[str, float]:
    """ms per part of the steps at full batch (median over them), with their total."""
    per_block = PagedKVCache.block_bytes(CONFIG.num_layers, BLOCK_SIZE, CONFIG.num_kv_heads,
                                         CONFIG.head_dim, model.dtype)
    longest = max(len(p) + o for p, o in zip(prompts, outputs, strict=True))
    engine = ServingEngine(model, block_size=BLOCK_SIZE, max_running=len(prompts),
                           kv_memory=per_block * len(prompts) * (longest // BLOCK_SIZE + 1),
                           overlap=overlap)
    engine.cuda_graph = True  # pure decode steps through the graphs object: the stand-in
    engine._graphs = NoForwardGraphs(engine)
    for ids, n in zip(prompts, outputs, strict=True):
        engine.add_request(ids, SamplingParams(max_new_tokens=n, stop_at_eos=False))
    while engine.scheduler.waiting or any(r.num_pending > 1 for r in engine.scheduler.running):
        engine.step()  # the prompts, through the real forward
    spent: dict[str, float] = defaultdict(float)

    def timed(owner: object, attr: str, part: str) -> None:
        inner = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            out = inner(*args, **kwargs)
            spent[part] += time.perf_counter() - t
            return out

        setattr(owner, attr, wrapper)

    timed(engine.scheduler, "schedule", "plan")
    timed(engine.scheduler, "schedule_ahead", "plan")
    timed(engine, "_forward", "inputs")
    timed(engine, "_sample_tokens", "sample")
    timed(engine.scheduler, "complete", "complete")
    steps: dict[str, list[float]] = defaultdict(list)
    while engine.has_unfinished():
        rows = len(engine.scheduler.running)
        spent.clear()
        t = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - t
        if rows == len(prompts):
            for part in PARTS[:-1]:
                steps[part].append(spent[part])
            steps["rest"].append(wall - sum(spent.values()))
            steps["total"].append(wall)
    if not steps:
        raise RuntimeError("no decode step ran at full batch")
    return {part: statistics.median(v) * 1e3 for part, v in steps.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_serving_host.py",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--lens", default="100,300", help="prompt and output lengths: LOW,HIGH")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    try:
        low, high = (int(x) for x in a.lens.split(","))
    except ValueError:
        low = high = 0
    if not 1 <= low <= high or high * 2 > CONFIG.max_seq_len:
        print(f"bench_serving_host: --lens: expected LOW,HIGH with 1 <= LOW <= HIGH <= "
              f"{CONFIG.max_seq_len // 2}, got {a.lens!r}", file=sys.stderr)
        return 2
    for name, value in (("--requests", a.requests), ("--rounds", a.rounds)):
        if value < 1:
            print(f"bench_serving_host: {name}: expected a positive integer, got {value}",
                  file=sys.stderr)
            return 2
    torch.manual_seed(0)
    model = build_model(CONFIG, device=torch.device("cpu"), dtype=torch.float32)
    prompts, outputs = workload(a.requests, low, high)
    runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for _ in range(a.rounds):
        for overlap in (False, True):
            runs[overlap].append(host_parts(model, prompts, outputs, overlap))
    print(f"host ms per decode step at {a.requests} rows, forward taken out (median over the "
          f"steps, then over {a.rounds} rounds)")
    print(f"{'engine':<12} {'total':>8} " + " ".join(f"{p:>8}" for p in PARTS))
    for overlap, results in runs.items():
        med = {k: statistics.median(r[k] for r in results) for k in results[0]}
        print(f"{'overlap on' if overlap else 'overlap off':<12} {med['total']:8.3f} "
              + " ".join(f"{med[p]:8.3f}" for p in PARTS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
