"""HTTP serving benchmark (issue 20): the random workload of the serving benchmark (256 requests,
prompt and output lengths uniform in [100, 1024], EOS ignored, fixed seed; token-id prompts)
replayed through `toyllm serve` at several request rates (Poisson arrivals; `inf`: all at once),
and the same arrivals through the Python API (ServingEngine.add_request / step) in the same run,
to show what HTTP costs.

    python scripts/bench_server.py --model llama-1b --device cuda --dtype bf16 --rates 4,16,inf \
        --clients 4

A shipped config name (llama-1b, stories15m, ...) runs with random weights and the shipped
tokenizer, whose 4,096 pieces set the vocabulary (a server streams text, so the model and the
tokenizer must agree): the LM head is smaller than the real model's, so the figures compare
HTTP with the API, not with docs/PERF.md's serving table. A checkpoint directory or .gguf runs
as it is.

Reported per rate and path: output tokens/s (all requests' output tokens over the time from the
first arrival to the last token), time to first token and inter-token latency percentiles (over
HTTP: per SSE chunk as the client receives it; through the API: per sampled token), and where the
time went: the engine's steps (count, mean wall time of a step, mean time between two steps
while busy: over HTTP read from the server's /metrics, so the server's engine thread is measured
under the event loop's load) and the client's CPU time (near the run's duration: the client
itself is the limit, not the server).

Before the timed runs, each path replays the workload once untimed (--no-warmup: not), so that
one-time costs (the first call of each shape, CUDA graph capture) fall outside both.
--server-python runs the server under another interpreter (another checkout's venv) with the
same client: before/after comparisons of the server alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import select
import subprocess
import sys
import tempfile
import threading
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
    steps: int | None = None  # engine steps of the run (None: the server does not say)
    step_s: float | None = None  # their total wall time
    between_steps_s: float | None = None  # total time from a step's end to the next's start
    client_cpu_s: float | None = None  # CPU time of the HTTP client's process during the run
    # Linux: seconds on a CPU of the server's main thread (its event loop) and of all its threads
    server_loop_cpu_s: float | None = None
    server_cpu_s: float | None = None
    # Linux: the engine's thread (over HTTP: the busiest thread but the main one of the
    # server's process and its engine process; a model on the CPU has torch's worker threads
    # too, so read these on a GPU or with --paced)
    engine_cpu_s: float | None = None  # on a CPU
    engine_runqueue_s: float | None = None  # runnable, waiting for a CPU (a busy machine)

    def summary(self) -> dict:
        def mean(total: float | None) -> float | None:
            return total / self.steps if total is not None and self.steps else None

        def per_token(cpu_s: float | None) -> float | None:
            return cpu_s / self.output_tokens * 1e6 if cpu_s is not None and self.output_tokens \
                else None

        return {"path": self.path, "rate": self.rate, "duration_s": self.duration_s,
                "output_tokens": self.output_tokens, "failures": self.failures,
                "output_tok_per_s": self.output_tokens / self.duration_s if self.duration_s
                else 0.0, "ttft_s": percentiles(self.ttft), "itl_s": percentiles(self.itl),
                "steps": self.steps, "mean_step_s": mean(self.step_s),
                "mean_between_steps_s": mean(self.between_steps_s),
                "client_cpu_s": self.client_cpu_s, "server_loop_cpu_s": self.server_loop_cpu_s,
                "server_cpu_s": self.server_cpu_s,
                "server_loop_cpu_us_per_token": per_token(self.server_loop_cpu_s),
                "server_cpu_us_per_token": per_token(self.server_cpu_s),
                "engine_cpu_s": self.engine_cpu_s, "engine_runqueue_s": self.engine_runqueue_s,
                "mean_engine_blocked_s": mean(self.blocked_s())}

    def blocked_s(self) -> float | None:
        """The engine thread's time in its steps and between them neither on a CPU nor waiting
        for one: asleep (the GIL held by another thread, a device sync that sleeps, the paced
        engine's wait). Over HTTP less the API's, per step: what the server's other threads
        cost the engine."""
        if self.engine_cpu_s is None or self.step_s is None or self.between_steps_s is None:
            return None
        return self.step_s + self.between_steps_s - self.engine_cpu_s - self.engine_runqueue_s


def arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """Seconds after the start at which each request arrives: a Poisson process of `rate`
    requests per second (all at 0 for inf)."""
    if math.isinf(rate):
        return [0.0] * n
    g = torch.Generator().manual_seed(seed)
    gaps = torch.empty(n, dtype=torch.float64).exponential_(rate, generator=g)
    return torch.cumsum(gaps, 0).tolist()


# through HTTP -------------------------------------------------------------------------------------
# The client is part of what is measured: at a GPU's rate (hundreds of streams, a token each every
# few ms) a client that spends tens of microseconds per chunk (httpx's line iterator, its
# connection pool's bookkeeping for hundreds of connections) is the limit, not the server. So the
# streams are read with asyncio's bare streams (HTTP/1.1, chunked transfer decoded here), and
# --clients spreads the requests over several processes.


@dataclass
class _Part:
    """What one client process measured."""

    output_tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    failures: int = 0
    last_end: float | None = None  # time.monotonic() of its last request's end
    cpu_s: float = 0.0


async def _stream_request(host: str, port: int, body: bytes, headers: dict[str, str],
                          part: _Part) -> None:
    """POST /v1/completions with `body` (a streamed request) on a connection of its own; its
    chunks' times into `part`."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sent = time.monotonic()
        writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                     f"Connection: close\r\n{head}\r\n".encode("latin-1") + body)
        status = (await reader.readline()).split(b" ", 2)
        chunked = False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        if len(status) < 2 or status[1] != b"200":
            await reader.read()
            part.failures += 1
            return
        last = None
        pending = ""  # text of an event not complete yet
        async for data in _body(reader, chunked):
            now = time.monotonic()
            events = (pending + data.decode("utf-8")).split("\n\n")
            pending = events.pop()
            for event in events:
                if not event.startswith("data: ") or event == "data: [DONE]":
                    continue
                chunk = json.loads(event[6:])
                if chunk.get("usage"):
                    part.output_tokens += chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0]["text"]:
                    if last is None:
                        part.ttft.append(now - sent)
                    else:
                        part.itl.append(now - last)
                    last = now
        part.last_end = time.monotonic()
    finally:
        writer.close()


async def _body(reader: asyncio.StreamReader, chunked: bool):
    """The response body as it arrives: each read's complete pieces, joined (chunked transfer
    decoded)."""
    if not chunked:
        while data := await reader.read(1 << 16):
            yield data
        return
    buf = bytearray()
    while True:
        pieces = []
        while (eol := buf.find(b"\r\n")) >= 0:
            size = int(bytes(buf[:eol]).split(b";")[0], 16)
            if size == 0:  # the last chunk
                if pieces:
                    yield b"".join(pieces)
                return
            if len(buf) < eol + 2 + size + 2:
                break
            pieces.append(bytes(buf[eol + 2:eol + 2 + size]))
            del buf[:eol + 2 + size + 2]
        if pieces:
            yield b"".join(pieces)
        data = await reader.read(1 << 16)
        if not data:
            return
        buf += data


async def _replay_part(url: str, model: str, work: Workload, indices: list[int],
                       times: list[float], start: float, headers: dict[str, str]) -> _Part:
    """Requests `indices` of the workload, request i at `start` + times[i] (time.monotonic)."""
    from urllib.parse import urlsplit

    where = urlsplit(url)
    part = _Part()
    cpu = time.process_time()

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, start + times[i] - time.monotonic()))
        body = json.dumps({"model": model, "prompt": work.prompts[i],
                           "max_tokens": work.outputs[i], "temperature": 0, "ignore_eos": True,
                           "stream": True, "stream_options": {"include_usage": True}})
        await _stream_request(where.hostname or "127.0.0.1", where.port or 80, body.encode(),
                              headers, part)

    await asyncio.gather(*(one(i) for i in indices))
    part.cpu_s = time.process_time() - cpu
    return part


def _replay_part_process(args: tuple) -> _Part:
    return asyncio.run(_replay_part(*args))


async def replay_http(url: str, model: str, work: Workload, rate: float,
                      headers: dict[str, str] | None = None,
                      server_pid: int | None = None, clients: int = 1) -> Result:
    """The workload through the server at `url`, from `clients` processes (1: this one), the
    requests dealt round-robin; with `server_pid` (Linux), the CPU time the server's process
    and its main thread spent during the run."""
    import httpx

    result = Result("http", rate)
    times = arrivals(len(work.prompts), rate)
    headers = dict(headers or {})
    shares = [list(range(k, len(work.prompts), clients)) for k in range(clients)]
    pool = None
    if clients > 1:
        import concurrent.futures
        import multiprocessing

        pool = concurrent.futures.ProcessPoolExecutor(
            clients, mp_context=multiprocessing.get_context("fork"))
        list(pool.map(time.sleep, [0.0] * clients))  # every process started before the clock
    try:
        async with httpx.AsyncClient(base_url=url, timeout=None, headers=headers) as client:
            before = await server_steps(client)
            server_before = server_thread_times(server_pid) if server_pid is not None \
                else None
            start = time.monotonic() + (0.05 if pool is not None else 0.0)
            if pool is None:
                parts = [await _replay_part(url, model, work, shares[0], times, start, headers)]
            else:
                jobs = [(url, model, work, share, times, start, headers) for share in shares]
                parts = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: list(pool.map(_replay_part_process, jobs)))
            server_after = server_thread_times(server_pid) if server_pid is not None \
                else None
            after = await server_steps(client)
    finally:
        if pool is not None:
            pool.shutdown()
    for part in parts:
        result.output_tokens += part.output_tokens
        result.ttft += part.ttft
        result.itl += part.itl
        result.failures += part.failures
    result.client_cpu_s = sum(part.cpu_s for part in parts)
    ends = [part.last_end for part in parts if part.last_end is not None]
    result.duration_s = (max(ends) if ends else time.monotonic()) - start
    threads = _thread_deltas(server_before, server_after)
    if server_pid in threads:
        result.server_loop_cpu_s = threads[server_pid][0]
        result.server_cpu_s = sum(t[0] for t in threads.values())
        others = [t for tid, t in threads.items() if tid != server_pid]
        if others:
            result.engine_cpu_s, result.engine_runqueue_s = max(others)
    if before is not None and after is not None:
        result.steps, result.step_s, result.between_steps_s = (
            a - b for a, b in zip(after, before, strict=True))
    return result


def server_thread_times(pid: int) -> dict[int, tuple[float, float]] | None:
    """thread_times of the server's process and of its child processes (the engine process
    of `toyllm serve`; thread ids are unique across processes)."""
    times = thread_times(pid)
    if times is None:
        return None
    for tid in list(times):
        try:
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                children = [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
        for child in children:
            times.update(thread_times(child) or {})
    return times


def thread_times(pid: int) -> dict[int, tuple[float, float]] | None:
    """Per thread of process `pid`: seconds on a CPU and seconds runnable but waiting for one
    (Linux /proc/PID/task/TID/schedstat; None where there is none)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    times = {}
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                on_cpu, waiting = f.read().split()[:2]
        except (OSError, ValueError):
            continue  # a thread that ended meanwhile
        times[int(tid)] = (int(on_cpu) / 1e9, int(waiting) / 1e9)
    return times or None


def _thread_deltas(before: dict[int, tuple[float, float]] | None,
                   after: dict[int, tuple[float, float]] | None
                   ) -> dict[int, tuple[float, float]]:
    if before is None or after is None:
        return {}
    return {tid: (a[0] - before[tid][0], a[1] - before[tid][1])
            for tid, a in after.items() if tid in before}


async def server_steps(client) -> tuple[int, float, float] | None:
    """The server's engine steps so far, their total time and the total time between them,
    from its /metrics (None: a server that does not show them)."""
    response = await client.get("/metrics")
    if response.status_code != 200:
        return None
    found = dict(re.findall(r"(?m)^(toyllm_engine_(?:step_seconds_count|step_seconds_sum|"
                            r"between_steps_seconds_sum)) (\S+)$", response.text))
    if len(found) != 3:
        return None
    return (int(found["toyllm_engine_step_seconds_count"]),
            float(found["toyllm_engine_step_seconds_sum"]),
            float(found["toyllm_engine_between_steps_seconds_sum"]))


def spawn_server(command: list[str], timeout_s: float = 600) -> tuple[subprocess.Popen, str]:
    """A server (`toyllm serve --port 0 ...`, or the paced engine's) in a subprocess; its
    process and URL once it printed them."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
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
    result.steps, result.step_s, result.between_steps_s = 0, 0.0, 0.0
    step_end: float | None = None  # while steps follow one another
    me = os.getpid()
    tid = threading.get_native_id()
    thread_before = thread_times(me)
    while done < len(work.prompts):
        now = time.perf_counter() - start
        while next_i < len(times) and times[next_i] <= now:
            engine.add_request(work.prompts[next_i], SamplingParams(
                max_new_tokens=work.outputs[next_i], temperature=0.0, stop_at_eos=False))
            next_i += 1
        if not engine.has_unfinished():
            step_end = None
            time.sleep(max(0.0, times[next_i] - now))
            continue
        step_start = time.perf_counter()
        if step_end is not None:
            result.between_steps_s += step_start - step_end
        outputs = engine.step()
        sync()
        step_end = time.perf_counter()
        result.steps += 1
        result.step_s += step_end - step_start
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
    threads = _thread_deltas(thread_before, thread_times(me))
    if tid in threads:
        result.engine_cpu_s, result.engine_runqueue_s = threads[tid]
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
    from toyllm.engine.cli_numbers import integer

    try:
        rates = [float(r) for r in a.rates.split(",")]
    except ValueError:
        raise HttpBenchError(f"--rates: expected numbers or inf, got {a.rates!r}") from None
    if not rates or any(not r > 0 for r in rates):
        raise HttpBenchError(f"--rates: expected positive numbers or inf, got {a.rates!r}")
    integer("--requests", a.requests)
    integer("--low", a.low)
    integer("--high", a.high, minimum=a.low)
    integer("--clients", a.clients)
    integer("--stream-interval", a.stream_interval)
    python = a.server_python or sys.executable
    if not Path(python).is_file():
        raise HttpBenchError(f"--server-python: {python} not found")
    rows: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        if a.paced is None:
            work, server, api_engine, where = _model_paths(a, Path(tmp))
        else:
            work, server, api_engine, where = _paced_paths(a)
        # the server first, alone on the device; then the API in this process
        proc, url = spawn_server([python, *server])
        try:
            if a.warmup:
                asyncio.run(replay_http(url, "bench", work, math.inf, clients=a.clients))
            for rate in rates:
                rows.append(asyncio.run(replay_http(url, "bench", work, rate,
                                                    server_pid=proc.pid, clients=a.clients)))
                _print_row(rows[-1])
        finally:
            proc.terminate()
            proc.wait(timeout=120)
        engine = api_engine()
        if a.warmup:
            replay_api(engine, work, math.inf)
        for rate in rates:
            rows.append(replay_api(engine, work, rate))
            _print_row(rows[-1])
    summaries = [r.summary() for r in rows]
    if a.json is not None:
        a.json.write_text(json.dumps({"model": a.model, **where, "engine": a.engine,
                                      "requests": a.requests,
                                      "rows": summaries}, indent=2))
    return summaries


def _model_paths(a: argparse.Namespace, tmp: Path):
    """The workload, the server's command (after the interpreter), a maker of the API's engine,
    and what ran, for a real model."""
    from toyllm.engine.cli_numbers import memory_amount
    from toyllm.engine.device import resolve_device, resolve_dtype
    from toyllm.engine.serving import ServingEngine
    from toyllm.models.model_source import load_model

    pool = memory_amount("--kv-memory", a.kv_memory)
    dev = resolve_device(a.device)
    dt = resolve_dtype(a.dtype, dev)
    source, random_weights = _model_source(a.model, tmp)
    loaded = load_model(source, dev, dt, random_weights=random_weights)
    if loaded.config.max_seq_len < 2 * a.high:
        raise HttpBenchError(f"the workload needs a context of {2 * a.high} tokens; the "
                             f"model holds {loaded.config.max_seq_len}")
    work = random_workload(loaded.config.vocab_size, a.requests, a.low, a.high)
    del loaded
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    server = ["-c", "from toyllm.engine.cli import app; app()", "serve", "--port", "0",
              "--model", source, "--device", str(dev), "--dtype", a.dtype,
              "--kv-memory", a.kv_memory, "--max-running", str(a.max_running),
              "--max-waiting", str(a.requests), "--served-model-name", "bench"]
    if random_weights:
        server.append("--random-weights")
    if a.stream_interval != 1:
        server += ["--stream-interval", str(a.stream_interval)]
    if a.engine != "process":  # a checkout without the engine process runs its thread anyway
        server += ["--engine", a.engine]

    def api_engine() -> ServingEngine:
        loaded = load_model(source, dev, dt, random_weights=random_weights)
        return ServingEngine(loaded.model, loaded.tokenizer, kv_memory=pool,
                             max_running=a.max_running, cuda_graph=dev.type == "cuda")

    return work, server, api_engine, {"device": str(dev), "dtype": a.dtype}


def _paced_paths(a: argparse.Namespace):
    """The same for --paced STEP_MS,HOLD_MS: engine/tools/paced_engine.py, no model."""
    from toyllm.engine.tools import paced_engine

    try:
        step_ms, hold_ms = (float(x) for x in a.paced.split(","))
    except ValueError:
        raise HttpBenchError(f"--paced: expected STEP_MS,HOLD_MS (two numbers), got "
                             f"{a.paced!r}") from None
    if not 0 <= hold_ms <= step_ms:
        raise HttpBenchError(f"--paced: expected 0 <= HOLD_MS <= STEP_MS, got {a.paced!r}")
    tokenizer = paced_engine.shipped_tokenizer()
    work = random_workload(tokenizer.vocab_size, a.requests, a.low, a.high)
    server = [paced_engine.__file__, "--port", "0", "--step-ms", str(step_ms),
              "--hold-ms", str(hold_ms), "--max-running", str(a.max_running),
              "--max-waiting", str(a.requests), "--stream-interval", str(a.stream_interval)]
    if a.engine != "process":
        server += ["--engine", a.engine]

    def api_engine() -> paced_engine.PacedEngine:
        return paced_engine.PacedEngine(tokenizer, step_s=step_ms / 1e3, hold_s=hold_ms / 1e3,
                                        max_running=a.max_running)

    return work, server, api_engine, {"device": "paced", "step_ms": step_ms,
                                      "hold_ms": hold_ms}


def _print_row(r: Result) -> None:
    s = r.summary()
    ms = lambda d, k: f"{d[k] * 1e3:8.1f}" if k in d else "       -"  # noqa: E731
    print(f"{s['path']:>4} rate {s['rate']:>6g}/s: {s['output_tok_per_s']:9.1f} out tok/s in "
          f"{s['duration_s']:7.2f} s | TTFT ms p50 {ms(s['ttft_s'], 'p50')} p90 "
          f"{ms(s['ttft_s'], 'p90')} p99 {ms(s['ttft_s'], 'p99')} | ITL ms p50 "
          f"{ms(s['itl_s'], 'p50')} p90 {ms(s['itl_s'], 'p90')} p99 {ms(s['itl_s'], 'p99')}"
          f" | {_steps(s)}{f' | {r.failures} failed' if r.failures else ''}", flush=True)


def _steps(s: dict) -> str:
    steps = "steps ?" if s["steps"] is None else \
        (f"{s['steps']} steps of {s['mean_step_s'] * 1e3:.2f} ms + "
         f"{s['mean_between_steps_s'] * 1e3:.2f} ms between" if s["steps"] else "0 steps")
    if s["mean_engine_blocked_s"] is not None:
        steps += (f" | engine thread per step: {s['mean_engine_blocked_s'] * 1e3:.2f} ms "
                  f"blocked, {s['engine_runqueue_s'] / s['steps'] * 1e3:.2f} ms waiting for a "
                  f"CPU")
    if s["server_loop_cpu_us_per_token"] is not None:
        steps += (f" | server CPU/token: event loop {s['server_loop_cpu_us_per_token']:.1f} us,"
                  f" all {s['server_cpu_us_per_token']:.1f} us")
    if s["client_cpu_s"] is not None:
        steps += f" | client CPU {s['client_cpu_s']:.2f} s"
    return steps


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
    ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                    help="replay the workload once, untimed, through each path first")
    ap.add_argument("--clients", type=int, default=1,
                    help="client processes sending the HTTP requests (a GPU's rate of chunks "
                         "can be more than one Python process reads)")
    ap.add_argument("--stream-interval", type=int, default=1,
                    help="the server's --stream-interval (1: its default)")
    ap.add_argument("--engine", choices=("process", "thread"), default="process",
                    help="the server's --engine: the engine in its own process, or a thread")
    ap.add_argument("--paced", default=None, metavar="STEP_MS,HOLD_MS",
                    help="no model: engine/tools/paced_engine.py's steps of STEP_MS, HOLD_MS of "
                         "them holding the GIL (the server's own cost at a GPU's step rate)")
    ap.add_argument("--server-python", default=None,
                    help="the interpreter that runs `toyllm serve` (another checkout's venv)")
    a = ap.parse_args(argv)
    try:
        run(a)
    except ValueError as exc:  # every toyllm error class is one: one line, exit 2
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
