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

import torch
from torch import Tensor

from engine.cached_attention import CacheStep
from engine.kv_cache import KVCache
from models.llama import Transformer

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def bucket_for(n: int) -> int:
    """The smallest bucket that holds n rows (multiples of 64 past the last bucket)."""
    for b in BUCKETS:
        if n <= b:
            return b
    return -(-n // 64) * 64


class DecodeGraphs:
    def __init__(self, model: Transformer, cache: KVCache, use_kernel: bool = True) -> None:
        self.model = model
        self.cache = cache
        self.use_kernel = use_kernel
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}

    def _step(self, rows: int, tokens: Tensor) -> Tensor:
        positions = self.cache.device_positions()[:rows].clamp(min=0).long().unsqueeze(1)
        step = CacheStep.decode(self.cache, rows, use_kernel=self.use_kernel)
        return self.model(tokens, positions, step)[:, -1]

    @torch.inference_mode()
    def _capture(self, rows: int) -> None:
        tokens = torch.zeros(rows, 1, dtype=torch.long, device=self.cache.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm up: lazy inits and autotuning stay out of the graph
                self._step(rows, tokens)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._step(rows, tokens)
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
