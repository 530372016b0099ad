"""What `GET /metrics` shows, in Prometheus' text format (version 0.0.4), written by hand:
counters of requests by how they ended and of tokens, gauges of the engine's state (requests
running and waiting, KV blocks used, free, cached and reclaimable) and histograms of time to
first token, inter-token latency, request latency, and of the engine loop's steps and the time
between them.

The engine loop thread records (`admitted`, `finished`, `generated`, `rejected` from the app);
the event loop renders (`render`); a lock keeps the two apart.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter, deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from toyllm.engine.server.step_loop import LoopSnapshot
    from toyllm.engine.serving import RequestOutput

# seconds; the same buckets for the three histograms (a step on a GPU is ~1-20 ms, on the CPU
# of this project's dev machine ~2-100 ms, a whole request up to minutes)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0)
# tokens/s is averaged over this many seconds of recent steps
RATE_WINDOW_S = 10.0


class Histogram:
    """Cumulative buckets, a sum and a count, as Prometheus exposes them."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last: above every bucket (+Inf only)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = []
        running = 0
        for bound, n in zip(self.buckets, self.counts, strict=False):
            running += n
            out.append(f'{name}_bucket{{le="{bound:g}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {self.sum:.6f}")
        out.append(f"{name}_count {self.count}")
        return out


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.finished_by_reason: Counter[str] = Counter()
        self.rejected_by_reason: Counter[str] = Counter()
        self.admitted_total = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram()
        self.inter_token = Histogram()
        self.e2e = Histogram()
        self.step = Histogram()
        self.between = Histogram()
        self._recent: deque[tuple[float, int]] = deque()  # (perf_counter, tokens) per step

    # recording (the engine loop thread, and the app for refusals) -----------------------------
    def admitted(self, prompt_tokens: int) -> None:
        with self._lock:
            self.admitted_total += 1
            self.prompt_tokens += prompt_tokens

    def rejected(self, reason: str) -> None:
        with self._lock:
            self.rejected_by_reason[reason] += 1

    def generated(self, now: float, tokens: int) -> None:
        with self._lock:
            self.generation_tokens += tokens
            self._recent.append((now, tokens))
            self._trim(now)

    def stepped(self, seconds: float) -> None:
        """One engine step took `seconds` (wall time of ServingEngine.step)."""
        with self._lock:
            self.step.observe(seconds)

    def between_steps(self, seconds: float) -> None:
        """The engine loop spent `seconds` from the end of a step to the start of the next
        one while requests were running: handing outputs over, taking commands, and waiting
        for the GIL while the event loop holds it."""
        with self._lock:
            self.between.observe(seconds)

    def finished(self, out: RequestOutput, now: float) -> None:
        with self._lock:
            self.finished_by_reason[out.finish_reason or "unknown"] += 1
            t = out.timings
            if t is None:
                return
            if t.time_to_first_token is not None:
                self.ttft.observe(t.time_to_first_token)
            for gap in t.inter_token_latencies():
                self.inter_token.observe(gap)
            self.e2e.observe(now - t.arrival)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()

    def tokens_per_second(self, now: float) -> float:
        """Output tokens per second over the last RATE_WINDOW_S seconds."""
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._recent) / RATE_WINDOW_S

    # rendering (the event loop) -----------------------------------------------------------------
    def render(self, snapshot: LoopSnapshot, in_flight: int, capacity: int) -> str:
        s = snapshot.stats
        rate = self.tokens_per_second(time.perf_counter())
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(samples)

        def gauge(name: str, help_text: str, value: float) -> None:
            metric(name, "gauge", help_text, [f"{name} {value:g}"])

        with self._lock:
            gauge("toyllm_requests_running", "Requests holding a cache slot (the engine's).",
                  s.running)
            gauge("toyllm_requests_waiting", "Requests queued in the engine's scheduler.",
                  s.waiting)
            gauge("toyllm_requests_in_flight", "Requests admitted by the server and not yet "
                  "finished (queued, waiting or running).", in_flight)
            gauge("toyllm_requests_capacity", "Most requests in flight (max running + max "
                  "waiting); beyond it the server answers 503.", capacity)
            metric("toyllm_requests_admitted_total", "counter", "Requests the engine queued.",
                   [f"toyllm_requests_admitted_total {self.admitted_total}"])
            metric("toyllm_requests_finished_total", "counter",
                   "Requests finished, by the engine's finish reason.",
                   [f'toyllm_requests_finished_total{{finish_reason="{r}"}} {n}'
                    for r, n in sorted(self.finished_by_reason.items())])
            metric("toyllm_requests_rejected_total", "counter",
                   "Requests refused before the engine ran them, by reason.",
                   [f'toyllm_requests_rejected_total{{reason="{r}"}} {n}'
                    for r, n in sorted(self.rejected_by_reason.items())])
            metric("toyllm_prompt_tokens_total", "counter", "Prompt tokens of admitted "
                   "requests.", [f"toyllm_prompt_tokens_total {self.prompt_tokens}"])
            metric("toyllm_generation_tokens_total", "counter", "Output tokens sampled.",
                   [f"toyllm_generation_tokens_total {self.generation_tokens}"])
            gauge("toyllm_generation_tokens_per_second",
                  f"Output tokens per second over the last {RATE_WINDOW_S:g} s.", rate)
            gauge("toyllm_kv_blocks_capacity", "KV blocks in the paged pool.", s.blocks_total)
            gauge("toyllm_kv_blocks_used", "KV blocks referenced by requests or the prefix "
                  "cache.", s.blocks_used)
            gauge("toyllm_kv_blocks_free", "KV blocks nobody references.", s.blocks_free)
            gauge("toyllm_kv_blocks_cached", "KV blocks named in the prefix cache.",
                  s.blocks_cached)
            gauge("toyllm_kv_blocks_reclaimable", "KV blocks a new request can have: free, "
                  "plus cached blocks only the prefix cache holds.", snapshot.blocks_reclaimable)
            gauge("toyllm_kv_block_size", "Tokens per KV block.", s.block_size)
            metric("toyllm_preemptions_total", "counter", "Running requests sent back to wait "
                   "for lack of KV blocks.", [f"toyllm_preemptions_total {s.preemptions}"])
            metric("toyllm_engine_steps_total", "counter", "Forward passes of the engine.",
                   [f"toyllm_engine_steps_total {s.steps}"])
            metric("toyllm_engine_step_seconds", "histogram",
                   "Wall time of one engine step (a forward pass and its sampling).",
                   self.step.lines("toyllm_engine_step_seconds"))
            metric("toyllm_engine_between_steps_seconds", "histogram",
                   "From the end of an engine step to the start of the next while requests "
                   "run: the engine loop's own work and its waits for the GIL.",
                   self.between.lines("toyllm_engine_between_steps_seconds"))
            metric("toyllm_time_to_first_token_seconds", "histogram",
                   "From arrival at the engine to the first sampled token.",
                   self.ttft.lines("toyllm_time_to_first_token_seconds"))
            metric("toyllm_inter_token_latency_seconds", "histogram",
                   "Between consecutive sampled tokens of a request.",
                   self.inter_token.lines("toyllm_inter_token_latency_seconds"))
            metric("toyllm_request_latency_seconds", "histogram",
                   "From arrival at the engine to the request's end.",
                   self.e2e.lines("toyllm_request_latency_seconds"))
        return "\n".join(lines) + "\n"
