"""Decode steps captured in CUDA graphs, one graph per batch-size bucket.

A decode step launches a few hundred small kernels; replaying them as one graph removes the
per-launch CPU cost that dominates small models. Everything a step needs lives in device
tensors with fixed addresses: the input tokens (a static buffer), the cache's device positions
(from which RoPE positions and attention lengths are derived on the GPU), and the cache
storage itself. All buckets' graphs share one memory pool, and a graph is captured the first
time its bucket is used.

NOTE: warm-up runs before capture really execute the step, so they write K/V at the rows'
current positions; the real step that follows writes the same slots again, so nothing stale
survives.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch
from torch import Tensor

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def bucket_for(n: int) -> int:
    """The smallest bucket that holds n rows (multiples of 64 past the last bucket)."""
    for b in BUCKETS:
        if n <= b:
            return b
    return -(-n // 64) * 64


class DecodeGraphs:
    """Captured decode steps, keyed by the number of rows (a bucket)."""

    def __init__(
        self,
        decode_forward: Callable[..., Tensor],
        views: Callable[[int], tuple[list[Tensor], list[Tensor], Tensor]],
    ) -> None:
        self.decode_forward = decode_forward  # (tokens, positions, k_caches, v_caches)
        self.views = views  # rows -> per-layer cache views and device positions
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}

    @torch.inference_mode()
    def _capture(self, rows: int) -> None:
        # An engine is a reference cycle (its decode function closes over it): collect dropped
        # engines now, or their graphs may be freed during this capture and invalidate it
        # (torch.cuda.graph collects only with force_cudagraph_gc).
        gc.collect()
        ks, vs, positions = self.views(rows)
        tokens = torch.zeros(rows, 1, dtype=torch.long, device=positions.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm up: lazy inits, compilation, autotuning stay outside
                self.decode_forward(tokens, positions, ks, vs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.decode_forward(tokens, positions, ks, vs)
        self.graphs[rows] = (graph, tokens, logits)

    def run(self, rows: int, tokens: Tensor) -> Tensor:
        """Replay the step for rows [0, rows) with these input tokens [rows]; the returned
        logits [rows, vocab] live in the graph's memory until the next replay."""
        if rows not in self.graphs:
            self._capture(rows)
        graph, static_tokens, logits = self.graphs[rows]
        static_tokens.copy_(tokens.view(rows, 1))
        graph.replay()
        return logits
