"""Where a serving step's time goes: step kinds, host against device time, top ops.

    python scripts/profile_serving.py                                  # CPU: tiny shape, < 1 min
    python scripts/profile_serving.py --device cuda                    # Llama-1B bf16, random
    python scripts/profile_serving.py --device cuda --profile-steps 40 --top 30

Runs a workload through ServingEngine (engine/serving.py) twice after a warm-up (which captures
the decode graphs on CUDA, as toyllm bench does):

1. timed, no profiler: each step's wall time (synchronized before and after), grouped by the
   kind of step: decode-only (every chunk one token: the CUDA-graph replay on CUDA), mixed
   (decode rows and prefill chunks) and prefill-only; and the host time of each part of a step
   (scheduling, building the step's tensors, the forward's launches, sampling, the rest).
2. under torch.profiler, the first --profile-steps steps (the prefill-carrying ones come
   first in a burst workload): per kind, the wall time, the device time (the kernels' sum) and
   the time the host waited in synchronizations; the count of host syncs per step; the top ops
   of the prefill-carrying steps by self host time and by device time.

Workloads: random (the bench's: --requests requests, prompt and output lengths uniform in
--prompt-lens and --output-lens) and shared-prefix (every prompt starts with --prefix tokens).
Defaults: on the CPU the tiny shape, 32 requests of 16-120 prompt and output tokens; on CUDA
the Llama-1B shape in bf16 and the bench's random workload (256 requests, 100-1024 each).
The engine runs without its overlap (ServingEngine(overlap=False)): each step's parts in
series, as the table needs them.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from toyllm.engine.device import resolve_device, resolve_dtype
from toyllm.engine.generate import GenerationError
from toyllm.engine.sampling import SamplingParams
from toyllm.engine.scheduler import StepPlan
from toyllm.engine.serving import ServingEngine
from toyllm.models.config import load_config
from toyllm.models.llama import build_model
from toyllm.models.shipped import resolve_config

KINDS = ("decode-only", "mixed", "prefill-only")
#: host-side parts of a step, timed by wrapping the engine's methods (outermost first)
PARTS = ("schedule", "prepare", "build_step", "forward", "decode_graph", "sample",
         "complete", "rest")
#: runtime calls in which the host waits for the device
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
              "cudaMemcpy", "cudaMemcpyAsync")


def step_kind(plan: StepPlan) -> str:
    decode = plan.num_decode
    if decode == len(plan.chunks):
        return "decode-only"
    return "mixed" if decode else "prefill-only"


@dataclass
class Workload:
    prompts: list[list[int]]
    outputs: list[int]


def make_workload(name: str, vocab: int, requests: int, prompt_lens: tuple[int, int],
                  output_lens: tuple[int, int], prefix: int, seed: int) -> Workload:
    g = torch.Generator().manual_seed(seed)
    plens = torch.randint(prompt_lens[0], prompt_lens[1] + 1, (requests,), generator=g).tolist()
    olens = torch.randint(output_lens[0], output_lens[1] + 1, (requests,), generator=g).tolist()
    shared = torch.randint(3, vocab, (prefix,), generator=g).tolist() if name != "random" else []
    prompts = [shared + torch.randint(3, vocab, (n,), generator=g).tolist() for n in plens]
    return Workload(prompts, olens)


@dataclass
class Timing:
    """Host seconds per part of the current step, filled by the wrappers."""

    parts: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    plan: StepPlan | None = None


def instrument(engine: ServingEngine, timing: Timing) -> None:
    """Wrap the engine's step parts (on this engine object only): each records its host time
    in `timing` and runs inside a profiler range of its name."""

    def wrap(owner: object, attr: str, part: str, keep_plan: bool = False) -> None:
        inner: Callable = getattr(owner, attr)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            with record_function(f"serving::{part}"):
                out = inner(*args, **kwargs)
            timing.parts[part] += time.perf_counter() - t
            if keep_plan:
                timing.plan = out
            return out

        setattr(owner, attr, timed)

    wrap(engine.scheduler, "schedule", "schedule", keep_plan=True)
    wrap(engine.scheduler, "complete", "complete")
    wrap(engine, "_forward", "step_forward")
    wrap(engine, "build_step", "build_step")
    wrap(engine, "forward", "forward")
    wrap(engine, "_sample", "sample")
    original_forward = engine._forward

    def forward_with_graph(plan: StepPlan):
        if engine._graphs is not None and not hasattr(engine._graphs, "_timed"):
            wrap(engine._graphs, "run", "decode_graph")
            engine._graphs._timed = True
        return original_forward(plan)

    engine._forward = forward_with_graph


def split_parts(parts: dict[str, float], wall: float) -> dict[str, float]:
    """The step's host parts as PARTS: prepare is _forward less what it calls (the cache's
    sync_device and the graph's lookup), rest the step's wall time less every part."""
    out = {p: parts.get(p, 0.0) for p in PARTS}
    out["prepare"] = parts.get("step_forward", 0.0) - (out["build_step"] + out["forward"]
                                                      + out["decode_graph"])
    out["rest"] = wall - sum(v for p, v in out.items() if p != "rest")
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def add_all(engine: ServingEngine, work: Workload) -> None:
    for ids, n in zip(work.prompts, work.outputs, strict=True):
        engine.add_request(ids, SamplingParams(max_new_tokens=n, stop_at_eos=False))


def warm_up(engine: ServingEngine, work: Workload) -> None:
    """As toyllm bench: short prompts, outputs one step apart, through every decode bucket."""
    for i, p in enumerate(work.prompts):
        engine.add_request(p[:16], SamplingParams(max_new_tokens=2 + i, stop_at_eos=False))
    while engine.has_unfinished():
        engine.step()


def timed_run(engine: ServingEngine, work: Workload, timing: Timing, device: torch.device,
              ) -> None:
    """Every step's wall time and host parts, by kind; printed as a table."""
    add_all(engine, work)
    wall: dict[str, list[float]] = defaultdict(list)
    parts: dict[str, dict[str, float]] = {k: defaultdict(float) for k in KINDS}
    tokens: dict[str, int] = defaultdict(int)
    sync(device)
    t0 = time.perf_counter()
    while engine.has_unfinished():
        timing.parts.clear()
        timing.plan = None
        ts = time.perf_counter()
        engine.step()
        sync(device)
        dt = time.perf_counter() - ts
        if timing.plan is None or not timing.plan.chunks:
            continue
        kind = step_kind(timing.plan)
        wall[kind].append(dt)
        tokens[kind] += timing.plan.num_tokens
        for part, s in split_parts(timing.parts, dt).items():
            parts[kind][part] += s
    total = time.perf_counter() - t0
    print(f"\n== timed run (no profiler): {total:.2f} s, {sum(work.outputs)} output tokens, "
          f"{sum(work.outputs) / total:.0f} tok/s")
    print(f"{'kind':<13} {'steps':>6} {'tokens':>8} {'total s':>8} {'mean ms':>8} "
          f"{'max ms':>8}  host ms per step: " + " ".join(f"{p:>8}" for p in PARTS))
    for kind in KINDS:
        w = wall[kind]
        if not w:
            continue
        n = len(w)
        host = " ".join(f"{parts[kind][p] / n * 1e3:8.2f}" for p in PARTS)
        print(f"{kind:<13} {n:6d} {tokens[kind]:8d} {sum(w):8.2f} {sum(w) / n * 1e3:8.2f} "
              f"{max(w) * 1e3:8.2f}  {' ' * 18}{host}")
    print("(host time of each part; on CUDA the device's time lands where the host first "
          "waits for it: in sample, whose read of the tokens waits for the forward. forward: "
          "the eager forward's launches; decode_graph: the graph replay's; prepare: the "
          "cache's sync_device; rest: the step's wall time less the parts, accepting tokens)")


def _walk(event, visit) -> None:
    stack = [event]
    while stack:
        e = stack.pop()
        visit(e)
        stack.extend(e.cpu_children)


def profiled_run(engine: ServingEngine, work: Workload, timing: Timing, device: torch.device,
                 steps: int, top: int, skip: int = 0) -> None:
    add_all(engine, work)
    for _ in range(skip):  # past the prefill burst, to profile the decode steps that follow
        if not engine.has_unfinished():
            break
        engine.step()
    sync(device)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    kinds: list[str] = []
    with profile(activities=activities) as prof:
        for i in range(steps):
            if not engine.has_unfinished():
                break
            with record_function(f"serving_step#{i}"):
                timing.plan = None
                engine.step()
                sync(device)
            kinds.append(step_kind(timing.plan) if timing.plan and timing.plan.chunks
                         else "none")
    while engine.has_unfinished():  # the rest, unprofiled (the engine is left empty)
        engine.step()
    t = time.perf_counter()
    step_events = {}
    for e in prof.events():  # the host ranges (CUDA also records a device-side copy of each)
        if e.name.startswith("serving_step#") and e.device_type == DeviceType.CPU:
            step_events[int(e.name.split("#")[1])] = e
    rows: dict[str, list[tuple[float, float, float, int]]] = defaultdict(list)
    host_ops: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])  # self cpu, dev, n
    for i, kind in enumerate(kinds):
        e = step_events.get(i)
        if e is None or kind == "none":
            continue
        wall_us = e.time_range.end - e.time_range.start
        waited = [0.0]
        syncs = [0]

        def visit(x, e=e, waited=waited, syncs=syncs, kind=kind) -> None:
            if any(x.name.startswith(s) for s in SYNC_CALLS):
                waited[0] += x.time_range.end - x.time_range.start
                syncs[0] += 1
            if kind != "decode-only" and x is not e and not x.name.startswith("serving"):
                acc = host_ops[x.name]
                acc[0] += x.self_cpu_time_total
                acc[1] += x.self_device_time_total
                acc[2] += 1

        _walk(e, visit)
        rows[kind].append((wall_us, e.device_time_total, waited[0], syncs[0]))
    print(f"\n== profiled run: {len(kinds)} steps after the first {skip} (times under the "
          f"profiler: its "
          f"overhead inflates host time; trace read in {time.perf_counter() - t:.1f} s)")
    print(f"{'kind':<13} {'steps':>6} {'wall ms':>9} {'device ms':>10} {'sync wait ms':>13} "
          f"{'host ms':>9} {'syncs':>6}   (per step, means)")
    for kind in KINDS:
        r = rows[kind]
        if not r:
            continue
        n = len(r)
        w, d, s, c = (sum(x[j] for x in r) / n for j in range(4))
        print(f"{kind:<13} {n:6d} {w / 1e3:9.2f} {d / 1e3:10.2f} {s / 1e3:13.2f} "
              f"{(w - s) / 1e3:9.2f} {c:6.1f}")
    print("(host ms = wall - sync wait: the host's own work; device ms = the kernels' sum)")
    if device.type == "cuda" and rows["decode-only"]:  # graph replays: their kernels by name
        n = len(rows["decode-only"])
        kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for e in prof.events():
            if e.device_type == DeviceType.CUDA and not e.name.startswith("serving"):
                kernels[e.name][0] += e.self_device_time_total
                kernels[e.name][1] += 1
        print(f"\ndevice time by kernel over the window (ms per step of its {n} decode-only "
              f"steps; prefill-carrying steps' kernels counted too when the window has them)")
        for name, (dev, calls) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]:
            print(f"{dev / n / 1e3:9.3f} ms  {calls / n:7.1f}x  {name[:100]}")
    carrying = sum(len(rows[k]) for k in ("mixed", "prefill-only"))
    if not carrying:
        print("no prefill-carrying step was profiled")
        return
    ops = sorted(host_ops.items(), key=lambda kv: kv[1][0], reverse=True)
    print(f"\ntop ops of the {carrying} prefill-carrying steps by self host time "
          f"(ms per step, calls per step)")
    for name, (cpu, dev, n) in ops[:top]:
        print(f"{cpu / carrying / 1e3:9.3f} ms  dev {dev / carrying / 1e3:8.3f} ms  "
              f"{n / carrying:7.1f}x  {name[:90]}")
    if device.type == "cuda":
        ops = sorted(host_ops.items(), key=lambda kv: kv[1][1], reverse=True)
        print("\ntop ops of the prefill-carrying steps by device time (ms per step)")
        for name, (cpu, dev, n) in ops[:top]:
            if dev <= 0:
                break
            print(f"{dev / carrying / 1e3:9.3f} ms  host {cpu / carrying / 1e3:8.3f} ms  "
                  f"{n / carrying:7.1f}x  {name[:90]}")


def pair(text: str) -> tuple[int, int]:
    try:
        low, high = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected LOW,HIGH (two integers), got {text!r}") from None
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError(f"expected 0 < LOW <= HIGH, got {text!r}")
    return low, high


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--model", default=None, help="shipped config name or .toml (default: "
                    "tiny on the CPU, llama-1b on CUDA)")
    ap.add_argument("--dtype", default=None, help="default: fp32 on the CPU, bf16 on CUDA")
    ap.add_argument("--workload", choices=("random", "shared-prefix"), default="random")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--prompt-lens", type=pair, default=None, help="LOW,HIGH")
    ap.add_argument("--output-lens", type=pair, default=None, help="LOW,HIGH")
    ap.add_argument("--prefix", type=int, default=None, help="shared-prefix: its tokens")
    ap.add_argument("--token-budget", type=int, default=None)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--kv-memory", type=float, default=0.5, help="fraction of free memory")
    ap.add_argument("--profile-steps", type=int, default=24,
                    help="steps of the profiled run (the rest runs unprofiled)")
    ap.add_argument("--profile-skip", type=int, default=0,
                    help="steps run unprofiled before the profiled ones (e.g. 100: decode "
                         "steps at full batch)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--no-timed", dest="timed", action="store_false",
                    help="skip the timed run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--segments", action="store_true",
                    help="prefill chunks one SDPA each (ServingEngine(packed_prefill=False)), "
                         "to compare with the packed varlen path")
    a = ap.parse_args(argv)
    try:
        device = resolve_device(a.device)
    except ValueError as exc:
        print(f"profile_serving: {exc}", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    model_name = a.model or ("llama-1b" if cuda else "tiny")
    dtype = resolve_dtype(a.dtype or ("bf16" if cuda else "fp32"), device)
    requests = a.requests if a.requests is not None else (256 if cuda else 32)
    prompt_lens = a.prompt_lens or ((100, 1024) if cuda else (16, 120))
    output_lens = a.output_lens or ((100, 1024) if cuda else (16, 120))
    prefix = a.prefix if a.prefix is not None else (1000 if cuda else 64)
    for name, value in (("--requests", requests), ("--profile-steps", a.profile_steps),
                        ("--top", a.top), ("--block-size", a.block_size),
                        ("--token-budget", 1 if a.token_budget is None else a.token_budget)):
        if value <= 0:
            print(f"profile_serving: {name}: expected a positive integer, got {value}",
                  file=sys.stderr)
            return 2
    if a.profile_skip < 0:
        print(f"profile_serving: --profile-skip: expected a count >= 0, got {a.profile_skip}",
              file=sys.stderr)
        return 2
    config = load_config(resolve_config(model_name))
    longest = prompt_lens[1] + output_lens[1] + (prefix if a.workload != "random" else 0)
    if longest > config.max_seq_len:
        print(f"profile_serving: the longest request ({longest} tokens) exceeds {model_name}'s "
              f"context of {config.max_seq_len}", file=sys.stderr)
        return 2
    torch.manual_seed(a.seed)
    model = build_model(config, device=device, dtype=dtype)
    budget = a.token_budget if a.token_budget is not None else (8192 if cuda else 256)
    try:
        # overlap off: the parts of each step are timed in series (with the overlap, the
        # host's work for one step runs during the device's for the one before)
        engine = ServingEngine(model, kv_memory=a.kv_memory, block_size=a.block_size,
                               token_budget=budget, packed_prefill=not a.segments,
                               overlap=False)
    except GenerationError as exc:  # a block size or pool size the engine refuses
        print(f"profile_serving: {exc}", file=sys.stderr)
        return 2
    timing = Timing()
    instrument(engine, timing)
    work = make_workload(a.workload, config.vocab_size, requests, prompt_lens, output_lens,
                         prefix, a.seed)
    print(f"{model_name} {dtype} on {device}: workload {a.workload}, {requests} requests, "
          f"{sum(map(len, work.prompts))} prompt + {sum(work.outputs)} output tokens; token "
          f"budget {budget}, block size {a.block_size}, {engine.cache.num_blocks} blocks")
    if cuda:  # which attention backends the segment path's SDPA calls would take
        order = getattr(torch._C, "_get_sdp_priority_order", None)
        print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, SDPA "
              f"priority {[str(b) for b in order()] if order else 'unknown'}; prefill "
              f"chunks: {'one varlen call' if engine._prefill_varlen else 'one SDPA each'}")
    t = time.perf_counter()
    warm_up(engine, work)
    print(f"warm-up {time.perf_counter() - t:.1f} s")
    if engine.prefix is not None:  # the timed and profiled runs start from the same cache
        engine.prefix.clear()
    if a.timed:
        timed_run(engine, work, timing, device)
        if engine.prefix is not None:
            engine.prefix.clear()
    profiled_run(engine, work, timing, device, a.profile_steps, a.top, a.profile_skip)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
