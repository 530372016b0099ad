"""Serving benchmark: many requests of different lengths, as serving engines are compared.

    toyllm bench --workload random --models llama-1b --dtype bf16          # 256 requests
    toyllm bench --workload shared-prefix --models llama-1b --dtype bf16   # 64 share 1,000 tokens

* random: 256 requests, prompt and output lengths uniform in [100, 1024], EOS ignored, fixed
  seed (the workload nano-vllm and vLLM publish). Measured in one run: toyllm's ServingEngine
  (paged cache, continuous batching), toyllm's static Engine (all prompts as one batch, every
  row decoding to the longest; only each request's own tokens are counted) and transformers'
  continuous batching (its manager, per-request lengths; `--hf-requests` runs it on the first N
  requests only, where its time would be too long); on CUDA the ServingEngine again without
  its overlap of host and device work (ServingEngine(overlap=False)).
* shared-prefix: 64 requests whose prompts start with the same 1,000-token system prompt and
  end in 20-100 tokens of their own, 128 new tokens each: the ServingEngine with and without
  prefix caching (prefill tokens computed and peak KV memory, against one prefix plus every
  request's own tokens).

Reported: output tokens/s, time to first token and inter-token latency percentiles, peak
memory, preemptions, and the fraction of the roofline of the pure decode steps (weights + the
K/V each step reads, at the copy bandwidth measured here); for random, also the workload's lower
bound from bytes and FLOPs alone (every decode step reads the weights once, every request reads
its K/V once per token, prefill at the card's dense bf16 rate given by --peak-tflops).
"""

from __future__ import annotations

import gc
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from toyllm.engine.generate import Engine
from toyllm.engine.sampling import SamplingParams
from toyllm.engine.serving import ServingEngine
from toyllm.engine.tools.bench import BenchError, copy_bandwidth, hf_model, sync, weight_bytes
from toyllm.models.llama import Transformer

WORKLOADS = ("random", "shared-prefix")
# the longest request of each workload: prompt + output tokens
NEEDS_CONTEXT = {"random": 1024 + 1024, "shared-prefix": 1000 + 100 + 128}


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    outputs: list[int]  # new tokens per request

    @property
    def output_tokens(self) -> int:
        return sum(self.outputs)


def random_workload(vocab: int, requests: int = 256, low: int = 100, high: int = 1024,
                    seed: int = 0) -> Workload:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(low, high + 1, (requests, 2), generator=g).tolist()
    prompts = [torch.randint(3, vocab, (p,), generator=g).tolist() for p, _ in lens]
    return Workload("random", prompts, [o for _, o in lens])


def shared_prefix_workload(vocab: int, requests: int = 64, prefix: int = 1000,
                           new_tokens: int = 128, seed: int = 0) -> Workload:
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(3, vocab, (prefix,), generator=g).tolist()
    own = torch.randint(20, 101, (requests,), generator=g).tolist()
    prompts = [system + torch.randint(3, vocab, (n,), generator=g).tolist() for n in own]
    return Workload("shared-prefix", prompts, [new_tokens] * requests)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, int(q * len(v)))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


@dataclass
class Result:
    engine: str
    requests: int
    output_tokens: int
    seconds: float
    peak_mem_gb: float | None = None
    ttft_s: dict = field(default_factory=dict)
    itl_ms: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def tok_per_s(self) -> float:
        return self.output_tokens / self.seconds


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _free(device: torch.device) -> None:
    """Give the last run's cache back, so the next one has the same memory to start from."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def run_serving(model: Transformer, work: Workload, bandwidth: float, *, prefix_caching: bool,
                kv_memory: int | float, block_size: int, label: str,
                first_alone: bool = False, overlap: bool | None = None) -> Result:
    """Every request added at t0 (first_alone: the first one, then the others once it has its
    first token, so that they can find its prompt cached), then step() until all finish;
    per-step times for the roofline of the pure decode steps. overlap: ServingEngine's (None:
    its default, on for CUDA). With the overlap a step() call launches the next decode step and
    takes the tokens of the one before: its wall time is still one decode step's share."""
    config = model.config
    kv_token = config.kv_bytes_per_token(torch.empty((), dtype=model.dtype).element_size())
    wbytes = weight_bytes(model)
    engine = ServingEngine(model, kv_memory=kv_memory, block_size=block_size,
                           prefix_caching=prefix_caching, overlap=overlap)
    # warm-up: a decode graph is captured on the first step of each batch bucket; requests that
    # finish one step apart take the running count through every bucket before timing starts
    for i, p in enumerate(work.prompts):
        engine.add_request(p[:16], SamplingParams(max_new_tokens=2 + i, stop_at_eos=False))
    while engine.has_unfinished():
        engine.step()
    _reset_peak(model.device)
    before = engine.stats()
    lengths: dict[str, int] = {}
    ttft, itl = [], []
    decode_s = decode_roof_s = 0.0
    peak_blocks = 0
    sync(model.device)
    t0 = time.perf_counter()
    pending = list(zip(work.prompts, work.outputs, strict=True))
    first_prefill = None

    def add(items: list[tuple[list[int], int]]) -> None:
        for ids, n in items:
            rid = engine.add_request(ids, SamplingParams(max_new_tokens=n, stop_at_eos=False))
            lengths[rid] = len(ids)

    add(pending[:1] if first_alone else pending)
    pending = pending[1:] if first_alone else []
    while engine.has_unfinished() or pending:
        if pending and not engine.has_unfinished():
            raise RuntimeError("the first request finished before the others were added")
        s0 = engine.stats()
        ts = time.perf_counter()
        outputs = engine.step()  # ends in a host read of a step's sampled tokens
        dt = time.perf_counter() - ts
        s1 = engine.stats()
        peak_blocks = max(peak_blocks, s1.blocks_used)
        rows = [o for o in outputs if o.new_token_ids]
        if s1.prefill_tokens == s0.prefill_tokens and rows:  # a pure decode step
            kv = sum(lengths[o.request_id] for o in rows) * kv_token
            decode_s += dt
            decode_roof_s += (wbytes + kv) / bandwidth
        if pending and any(o.new_token_ids for o in outputs):  # the first has its first token
            first_prefill = s1.prefill_tokens - before.prefill_tokens
            add(pending)
            pending = []
        for o in outputs:
            lengths[o.request_id] = lengths.get(o.request_id, 0) + len(o.new_token_ids)
            if o.finished and o.timings is not None:
                if o.timings.time_to_first_token is not None:
                    ttft.append(o.timings.time_to_first_token)
                itl += [x * 1e3 for x in o.timings.inter_token_latencies()]
    sync(model.device)
    seconds = time.perf_counter() - t0
    after = engine.stats()
    extra = {
        "preemptions": after.preemptions - before.preemptions,
        "prefill_tokens": after.prefill_tokens - before.prefill_tokens,
        "decode_steps_frac_roofline": decode_roof_s / decode_s if decode_s else None,
        "decode_steps_s": decode_s,
        "steps": after.steps - before.steps,
        "steps_ahead": after.steps_ahead - before.steps_ahead,
        "peak_kv_bytes": peak_blocks * after.bytes_per_block,
        "prefix_hit_blocks": after.prefix_hit_blocks - before.prefix_hit_blocks,
        "blocks_total": after.blocks_total,
        "block_size": after.block_size,
    }
    if first_prefill is not None:
        extra["first_request_prefill_tokens"] = first_prefill
        extra["others_prefill_tokens"] = extra["prefill_tokens"] - first_prefill
    return Result(label, len(work.prompts), work.output_tokens, seconds, _peak_gb(model.device),
                  percentiles(ttft), percentiles(itl), extra)


def run_static(model: Transformer, work: Workload) -> Result:
    """All prompts as one batch of the static Engine; every row decodes to the longest output,
    only each request's own tokens are counted."""
    engine = Engine(model)
    engine.generate(work.prompts[:1], SamplingParams(max_new_tokens=4, stop_at_eos=False))
    _reset_peak(model.device)
    sync(model.device)
    t0 = time.perf_counter()
    res = engine.generate(work.prompts,
                          SamplingParams(max_new_tokens=max(work.outputs), stop_at_eos=False))
    sync(model.device)
    seconds = time.perf_counter() - t0
    peak = _peak_gb(model.device)
    del engine
    _free(model.device)
    return Result("toyllm static batch", len(work.prompts), work.output_tokens, seconds, peak,
                  extra={"decode_steps": res.stats.decode_steps,
                         "prefill_s": res.stats.prefill_s})


def run_transformers(model: Transformer, work: Workload, requests: int) -> Result:
    """transformers' continuous batching manager on the first `requests` requests."""
    from transformers import GenerationConfig

    hf = hf_model(model, None)
    prompts, outputs = work.prompts[:requests], work.outputs[:requests]
    cfg = GenerationConfig(do_sample=False, max_new_tokens=max(outputs), eos_token_id=None,
                           pad_token_id=0)
    manager = hf.init_continuous_batching(generation_config=cfg)
    manager.start()
    try:
        _reset_peak(model.device)
        t0 = time.perf_counter()
        ids = [manager.add_request(p, max_new_tokens=n) for p, n in zip(prompts, outputs,
                                                                        strict=True)]
        got = 0
        for _ in ids:
            if manager.get_result(timeout=600) is not None:
                got += 1
        sync(model.device)
        seconds = time.perf_counter() - t0
    finally:
        manager.stop(block=True)
    peak = _peak_gb(model.device)
    del hf, manager
    _free(model.device)
    return Result(f"transformers continuous batching ({requests} requests)", requests,
                  sum(outputs), seconds, peak, extra={"results": got})


def lower_bound_s(model: Transformer, work: Workload, bandwidth: float,
                  peak_flops: float) -> float:
    """Seconds the workload needs from bytes and FLOPs alone: max(outputs) steps reading the
    weights, every request's K/V read once per new token, 2 FLOPs per weight per prompt token."""
    config = model.config
    kv_token = config.kv_bytes_per_token(torch.empty((), dtype=model.dtype).element_size())
    wbytes = weight_bytes(model)
    kv = sum(sum(p + i for i in range(o)) for p, o in
             zip((len(p) for p in work.prompts), work.outputs, strict=True)) * kv_token
    params = wbytes / model.dtype.itemsize
    prefill = 2 * params * sum(len(p) for p in work.prompts)
    return (max(work.outputs) * wbytes + kv) / bandwidth + prefill / peak_flops


def run(model: Transformer, workload: str, *, hf: bool = True, hf_requests: int | None = None,
        kv_memory: int | float = 0.9, block_size: int = 16, peak_tflops: float = 989.0,
        static: bool = True, json_path: Path | None = None) -> list[Result]:
    device = model.device
    bandwidth = copy_bandwidth(device)
    vocab = model.config.vocab_size
    results: list[Result] = []
    if workload == "random":
        work = random_workload(vocab)
        results.append(run_serving(model, work, bandwidth, prefix_caching=True,
                                   kv_memory=kv_memory, block_size=block_size,
                                   label="toyllm serving (paged)"))
        _free(device)
        if static:
            results.append(run_static(model, work))
        if hf:
            results.append(run_transformers(model, work, hf_requests or len(work.prompts)))
        if device.type == "cuda":  # the overlap is on by default there: the same without it
            results.append(run_serving(model, work, bandwidth, prefix_caching=True,
                                       kv_memory=kv_memory, block_size=block_size,
                                       label="toyllm serving (paged), no overlap",
                                       overlap=False))
            _free(device)
        bound = lower_bound_s(model, work, bandwidth, peak_tflops * 1e12)
    else:
        work = shared_prefix_workload(vocab)
        for caching in (True, False):
            results.append(run_serving(
                model, work, bandwidth, prefix_caching=caching, kv_memory=kv_memory,
                block_size=block_size, first_alone=True,
                label=f"toyllm serving, prefix caching {'on' if caching else 'off'}"))
            _free(device)
        bound = None
    print_results(model, work, results, bandwidth, bound)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({
            "workload": work.name, "requests": len(work.prompts),
            "output_tokens": work.output_tokens, "date": time.strftime("%Y-%m-%d"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(model.dtype), "copy_bandwidth_gbs": bandwidth / 1e9,
            "lower_bound_s": bound,
            "results": [dict(r.__dict__, tok_per_s=r.tok_per_s) for r in results]}, indent=1))
    return results


def print_results(model: Transformer, work: Workload, results: list[Result], bandwidth: float,
                  bound: float | None) -> None:
    print(f"workload {work.name}: {len(work.prompts)} requests, "
          f"{sum(len(p) for p in work.prompts)} prompt tokens, {work.output_tokens} output "
          f"tokens; copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    head = (f"{'engine':<44} {'s':>7} {'tok/s':>9} {'TTFT p50/p99 s':>15} "
            f"{'ITL p50/p99 ms':>15} {'peak GB':>8}  notes")
    print(head)
    for r in results:
        ttft = f"{r.ttft_s['p50']:.2f}/{r.ttft_s['p99']:.2f}" if r.ttft_s else "-"
        itl = f"{r.itl_ms['p50']:.1f}/{r.itl_ms['p99']:.1f}" if r.itl_ms else "-"
        peak = f"{r.peak_mem_gb:.2f}" if r.peak_mem_gb is not None else "-"
        notes = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in r.extra.items() if v is not None)
        print(f"{r.engine:<44} {r.seconds:7.2f} {r.tok_per_s:9.1f} {ttft:>15} {itl:>15} "
              f"{peak:>8}  {notes}")
    if bound is not None:
        best = max(r.tok_per_s for r in results)
        print(f"lower bound {bound:.2f} s = {work.output_tokens / bound:.0f} tok/s; the best "
              f"run is at {best / (work.output_tokens / bound):.1%} of it")
    if len(results) >= 2:
        print(f"{results[0].engine} / {results[1].engine}: "
              f"{results[0].tok_per_s / results[1].tok_per_s:.2f}x")
    if work.name == "shared-prefix":
        kv_token = model.config.kv_bytes_per_token(
            torch.empty((), dtype=model.dtype).element_size())
        prefix = len(os.path.commonprefix(work.prompts))
        own = sum(len(p) - prefix + o for p, o in zip(work.prompts, work.outputs, strict=True))
        need = (prefix + own) * kv_token
        for r in results:
            first = r.extra.get("first_request_prefill_tokens")
            others = r.extra.get("others_prefill_tokens")
            each = others / (len(work.prompts) - 1) if first else 0.0
            share = (f"; prefill per later request: {each:.0f} tokens = {each / first:.1%} of "
                     f"the first's {first}" if first else "")
            print(f"{r.engine}: peak KV {r.extra['peak_kv_bytes'] / 1e6:.1f} MB = "
                  f"{r.extra['peak_kv_bytes'] / need:.2f}x one prefix + every request's own "
                  f"tokens ({need / 1e6:.1f} MB){share}")


def main(argv: list[str] | None = None) -> int:
    """scripts/bench_serving.py's entry (toyllm bench --workload takes the same options)."""
    import argparse

    ap = argparse.ArgumentParser(prog="bench_serving.py", description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=WORKLOADS, default="random")
    ap.add_argument("--model", default="llama-1b", help="a shipped config name or a .toml")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--no-hf", dest="hf", action="store_false")
    ap.add_argument("--hf-requests", type=int, default=None,
                    help="transformers on the first N requests only (default: all)")
    ap.add_argument("--no-static", dest="static", action="store_false")
    ap.add_argument("--kv-memory", default="0.5", help="the pool: a fraction of free memory "
                    "or bytes")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="dense bf16 rate for the lower bound (H100/H200 SXM: 989)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    return run_cli(a.workload, a.model, a.device, a.dtype, hf=a.hf, hf_requests=a.hf_requests,
                   static=a.static, kv_memory=a.kv_memory, block_size=a.block_size,
                   peak_tflops=a.peak_tflops, json_path=a.json)


def run_cli(workload: str, model_name: str, device: str, dtype: str, **kw) -> int:
    """Options checked (ValueError with one line) before the model is built, then run."""
    from toyllm.engine.cli_numbers import integer, memory_amount
    from toyllm.engine.device import resolve_device, resolve_dtype
    from toyllm.engine.serving import pool_bytes
    from toyllm.models.config import load_config
    from toyllm.models.llama import build_model
    from toyllm.models.shipped import resolve_config

    if workload not in WORKLOADS:
        raise BenchError(f"--workload: expected decode, {', '.join(WORKLOADS)}, got {workload!r}")
    if "," in model_name:
        raise BenchError(f"--models: a serving workload takes one model, got {model_name!r}")
    if kw.get("hf_requests") is not None:
        integer("--hf-requests", kw["hf_requests"])
    integer("--block-size", kw["block_size"])
    dev = resolve_device(device)
    kw["kv_memory"] = memory_amount("--kv-memory", str(kw["kv_memory"]))
    pool_bytes(kw["kv_memory"], dev)
    config = load_config(resolve_config(model_name))
    need = NEEDS_CONTEXT[workload]
    if config.max_seq_len < need:
        raise BenchError(f"--workload {workload} needs a context of {need} tokens; model "
                         f"{model_name} holds {config.max_seq_len}")
    model = build_model(config, device=dev, dtype=resolve_dtype(dtype, dev))
    run(model, workload, **kw)
    return 0
