"""HTTP serving benchmark (issue 20): the random workload of the serving benchmark (256 requests,
prompt and output lengths uniform in [100, 1024], EOS ignored, fixed seed; token-id prompts)
replayed through `toyllm serve` at several request rates (Poisson arrivals; `inf`: all at once),
and the same arrivals through the Python API (ServingEngine.add_request / step) in the same run,
to show what HTTP costs.

    python scripts/bench_server.py --model llama-1b --device cuda --dtype bf16 --rates 4,16,inf

A shipped config name (llama-1b, stories15m, ...) runs with random weights and the shipped
tokenizer, whose 4,096 pieces set the vocabulary (a server streams text, so the model and the
tokenizer must agree): the LM head is smaller than the real model's, so the figures compare
HTTP with the API, not with docs/PERF.md's serving table. A checkpoint directory or .gguf runs
as it is.

Reported per rate and path: output tokens/s (all requests' output tokens over the time from the
first arrival to the last token), time to first token and inter-token latency percentiles (over
HTTP: per SSE chunk as the client receives it; through the API: per sampled token).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from toyllm.engine.tools.serving_bench import Workload, percentiles, random_workload


class HttpBenchError(ValueError):
    """An option the benchmark cannot run with (one line)."""


@dataclass
class Result:
    path: str  # "http" or "api"
    rate: float
    duration_s: float = 0.0
    output_tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    failures: int = 0

    def summary(self) -> dict:
        return {"path": self.path, "rate": self.rate, "duration_s": self.duration_s,
                "output_tokens": self.output_tokens, "failures": self.failures,
                "output_tok_per_s": self.output_tokens / self.duration_s if self.duration_s
                else 0.0, "ttft_s": percentiles(self.ttft), "itl_s": percentiles(self.itl)}


def arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """Seconds after the start at which each request arrives: a Poisson process of `rate`
    requests per second (all at 0 for inf)."""
    if math.isinf(rate):
        return [0.0] * n
    g = torch.Generator().manual_seed(seed)
    gaps = torch.empty(n, dtype=torch.float64).exponential_(rate, generator=g)
    return torch.cumsum(gaps, 0).tolist()


# through HTTP -------------------------------------------------------------------------------------
async def replay_http(url: str, model: str, work: Workload, rate: float,
                      headers: dict[str, str] | None = None) -> Result:
    import httpx

    result = Result("http", rate)
    times = arrivals(len(work.prompts), rate)
    limits = httpx.Limits(max_connections=len(work.prompts) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits,
                                 headers=headers) as client:
        start = time.perf_counter()
        ends: list[float] = []

        async def one(i: int) -> None:
            await asyncio.sleep(max(0.0, start + times[i] - time.perf_counter()))
            body = {"model": model, "prompt": work.prompts[i], "max_tokens": work.outputs[i],
                    "temperature": 0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            sent = time.perf_counter()
            last = None
            async with client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    result.failures += 1
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    now = time.perf_counter()
                    if chunk.get("usage"):
                        result.output_tokens += chunk["usage"]["completion_tokens"]
                    if chunk.get("choices") and chunk["choices"][0]["text"]:
                        if last is None:
                            result.ttft.append(now - sent)
                        else:
                            result.itl.append(now - last)
                        last = now
            ends.append(time.perf_counter())

        await asyncio.gather(*(one(i) for i in range(len(work.prompts))))
    result.duration_s = (max(ends) if ends else time.perf_counter()) - start
    return result


def spawn_server(args: list[str], timeout_s: float = 600) -> tuple[subprocess.Popen, str]:
    """`toyllm serve --port 0 ARGS` in a subprocess; its process and URL once it listens."""
    code = "from toyllm.engine.cli import app; app()"
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--port", "0", *args],
                            stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout_s
    line = ""
    while time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 0.5)[0]:
            line = proc.stdout.readline()
            break
    match = re.search(r"on (http://\S+) ", line)
    if match is None:
        proc.kill()
        raise HttpBenchError(f"toyllm serve did not start: {line.strip() or proc.poll()}")
    return proc, match.group(1)


# through the Python API ------------------------------------------------------------------------
def replay_api(engine, work: Workload, rate: float) -> Result:
    """The same arrivals through ServingEngine.add_request and step, in this thread."""
    from toyllm.engine.sampling import SamplingParams

    result = Result("api", rate)
    times = arrivals(len(work.prompts), rate)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    next_i = 0
    done = 0
    last_end = start
    while done < len(work.prompts):
        now = time.perf_counter() - start
        while next_i < len(times) and times[next_i] <= now:
            engine.add_request(work.prompts[next_i], SamplingParams(
                max_new_tokens=work.outputs[next_i], temperature=0.0, stop_at_eos=False))
            next_i += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, times[next_i] - now))
            continue
        outputs = engine.step()
        sync()
        for out in outputs:
            if not out.finished:
                continue
            done += 1
            result.output_tokens += out.completion_tokens
            t = out.timings
            if t is not None and t.time_to_first_token is not None:
                result.ttft.append(t.time_to_first_token)
                result.itl += t.inter_token_latencies()
            last_end = time.perf_counter()
    result.duration_s = last_end - start
    return result


# the run -----------------------------------------------------------------------------------------
def _model_source(name: str, tmp: Path) -> tuple[str, bool]:
    """A checkpoint or .gguf as it is; a shipped config with the shipped tokenizer's
    vocabulary, random weights (see the module doc)."""
    from toyllm.models.config import load_config
    from toyllm.models.model_source import DEFAULT_MODEL_DIR
    from toyllm.models.shipped import resolve_config
    from toyllm.models.tokenizer import Tokenizer

    path = Path(resolve_config(name))
    if path.is_dir() or path.suffix == ".gguf":
        return str(path), False
    vocab = Tokenizer.from_file(DEFAULT_MODEL_DIR / "tokenizer.model").vocab_size
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"(?m)^vocab_size\s*=.*$", f"vocab_size = {vocab}", text)
    out = tmp / f"{path.stem}-vocab{vocab}.toml"
    out.write_text(text, encoding="utf-8")
    load_config(out)  # checked before the server starts
    return str(out), True


def run(a: argparse.Namespace) -> list[dict]:
    from toyllm.engine.cli_numbers import integer, memory_amount
    from toyllm.engine.device import resolve_device, resolve_dtype
    from toyllm.engine.serving import ServingEngine
    from toyllm.models.model_source import load_model

    try:
        rates = [float(r) for r in a.rates.split(",")]
    except ValueError:
        raise HttpBenchError(f"--rates: expected numbers or inf, got {a.rates!r}") from None
    if not rates or any(not r > 0 for r in rates):
        raise HttpBenchError(f"--rates: expected positive numbers or inf, got {a.rates!r}")
    integer("--requests", a.requests)
    integer("--low", a.low)
    integer("--high", a.high, minimum=a.low)
    pool = memory_amount("--kv-memory", a.kv_memory)
    dev = resolve_device(a.device)
    dt = resolve_dtype(a.dtype, dev)
    rows: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        source, random_weights = _model_source(a.model, Path(tmp))
        loaded = load_model(source, dev, dt, random_weights=random_weights)
        if loaded.config.max_seq_len < 2 * a.high:
            raise HttpBenchError(f"the workload needs a context of {2 * a.high} tokens; the "
                                 f"model holds {loaded.config.max_seq_len}")
        work = random_workload(loaded.config.vocab_size, a.requests, a.low, a.high)
        serve_args = ["--model", source, "--device", str(dev), "--dtype", a.dtype,
                      "--kv-memory", a.kv_memory, "--max-running", str(a.max_running),
                      "--max-waiting", str(a.requests), "--served-model-name", "bench"]
        if random_weights:
            serve_args.append("--random-weights")
        # the server first, alone on the device; then the API in this process
        del loaded
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        proc, url = spawn_server(serve_args)
        try:
            for rate in rates:
                rows.append(asyncio.run(replay_http(url, "bench", work, rate)))
                _print_row(rows[-1])
        finally:
            proc.terminate()
            proc.wait(timeout=120)
        loaded = load_model(source, dev, dt, random_weights=random_weights)
        engine = ServingEngine(loaded.model, loaded.tokenizer, kv_memory=pool,
                               max_running=a.max_running,
                               cuda_graph=dev.type == "cuda")
        for rate in rates:
            rows.append(replay_api(engine, work, rate))
            _print_row(rows[-1])
    summaries = [r.summary() for r in rows]
    if a.json is not None:
        a.json.write_text(json.dumps({"model": a.model, "device": str(dev), "dtype": a.dtype,
                                      "requests": a.requests, "rows": summaries}, indent=2))
    return summaries


def _print_row(r: Result) -> None:
    s = r.summary()
    ms = lambda d, k: f"{d[k] * 1e3:8.1f}" if k in d else "       -"  # noqa: E731
    print(f"{s['path']:>4} rate {s['rate']:>6g}/s: {s['output_tok_per_s']:9.1f} out tok/s in "
          f"{s['duration_s']:7.2f} s | TTFT ms p50 {ms(s['ttft_s'], 'p50')} p90 "
          f"{ms(s['ttft_s'], 'p90')} p99 {ms(s['ttft_s'], 'p99')} | ITL ms p50 "
          f"{ms(s['itl_s'], 'p50')} p90 {ms(s['itl_s'], 'p90')} p99 {ms(s['itl_s'], 'p99')}"
          f"{f' | {r.failures} failed' if r.failures else ''}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_server.py", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-1b",
                    help="a shipped config name, a .toml, a checkpoint directory or a .gguf")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--low", type=int, default=100, help="shortest prompt and output")
    ap.add_argument("--high", type=int, default=1024, help="longest prompt and output")
    ap.add_argument("--rates", default="4,16,inf", help="requests per second, or inf")
    ap.add_argument("--kv-memory", default="0.5")
    ap.add_argument("--max-running", type=int, default=256)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    try:
        run(a)
    except ValueError as exc:  # every toyllm error class is one: one line, exit 2
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
