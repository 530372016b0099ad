"""GPU timers of the benchmark scripts (scripts/bench_*.py): CUDA events around eager calls,
and the per-call time of a CUDA graph of many calls (GPU time without launch overhead).

They report medians, not means: a benchmark prints a table with its baseline measured in the
same run, and the median of many calls is what stays put between runs on a shared machine.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def time_eager(fn: Callable[[], None], reps: int, warmup: int = 10) -> float:
    """Median microseconds of one call, each call between its own pair of CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    pairs = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(reps)
    ]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in pairs) * 1e3


def time_graph(fn: Callable[[], None], calls: int, reps: int) -> float:
    """Median microseconds per call of a CUDA graph holding `calls` calls (no launch cost)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def copy_ceiling_gb_per_s(reps: int) -> tuple[float, int]:
    """Device-to-device copy of 1 GiB: (read + write) bytes per second, in GB/s."""
    nbytes = 2**30
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us = time_eager(lambda: dst.copy_(src), reps=max(10, reps // 10), warmup=3)
    return 2 * nbytes / (us * 1e-6) / 1e9, nbytes
