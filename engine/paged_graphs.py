"""The serving engine's pure decode steps captured in CUDA graphs, one per batch-size bucket.

A decode step of B requests reads everything from one static int64 buffer [4, bucket]: the
tokens, their positions and their sequences' rows in the cache's block table (the device
mirror, whose address never changes: PagedKVCache.sync_device refreshes it in place before each
step). RoPE's cos/sin are gathered from a table by position; the block-table rows by sequence,
the key lengths (position + 1) and the flat pool slot each token's K/V goes to (its block's id
times the block size plus its offset, PagedKVCache.slot_mapping's formula) are derived on the
device, inside the graph, so the host builds no per-row slot. Rows past B are padding:
position -1 (no keys: zeros out; slot -1: nothing written). The host fills the buffer with one
copy per step; the graph replays; logits rows [:B] are the step's.

A step planned ahead of the previous step's tokens (ServingEngine's overlap) gets its tokens on
the device: the buffer's fourth row holds, for each row, its request's row in the previous
step, and the previous step's sampled tokens are gathered from there into the tokens row
before the replay (clamped at 0: a row whose logits were not finite sampled -1; its request ends
when the previous step's tokens are taken, and its row here is dropped then).

NOTE: warm-up runs before a capture really execute the step: the buffer holds padding then, so
they write nothing into the pool.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from toyllm.engine.cuda_graph import bucket_for
from toyllm.engine.paged_step import PagedStep
from toyllm.engine.scheduler import StepPlan

if TYPE_CHECKING:
    from toyllm.engine.serving import ServingEngine

# rows of the static input buffer; SOURCE: a row's row in the previous step (planned ahead)
TOKENS, POSITIONS, SEQS, SOURCE = range(4)


def padding_inputs(rows: int, pin: bool = False) -> Tensor:
    """int64 [4, rows] of padding rows (pinned: the host side of a bucket's buffer)."""
    host = torch.zeros(4, rows, dtype=torch.int64, pin_memory=pin)
    host[POSITIONS].fill_(-1)
    return host


def decode_slots(tables: Tensor, positions: Tensor, block_size: int) -> Tensor:
    """int64 [rows]: the flat pool slot of each row's position (-1 for a padding row, position
    -1), from its block-table row (tables int32 [rows, W])."""
    at = positions.clamp(min=0)
    blocks = tables.gather(1, (at // block_size).unsqueeze(1)).squeeze(1).long()
    return torch.where(positions >= 0, blocks * block_size + at % block_size, -1)


class PagedDecodeGraphs:
    """Captured decode steps of one ServingEngine, keyed by bucket (rows)."""

    def __init__(self, engine: ServingEngine) -> None:
        self.engine = engine
        self.pool = torch.cuda.graph_pool_handle()
        # rows -> (graph, static inputs [4, rows] on the device, pinned host staging, logits)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor, Tensor, Tensor]] = {}
        # rows -> an event after the last copy from that bucket's host staging (CUDA only)
        self._copied: dict[int, torch.cuda.Event] = {}

    def decode_forward(self, inputs: Tensor) -> Tensor:
        """logits [rows, vocab] of one decode step whose inputs are the buffer [4, rows]."""
        engine = self.engine
        rows = inputs.shape[1]
        positions = inputs[POSITIONS]
        tables = engine.cache.block_tables().index_select(0, inputs[SEQS])  # [rows, W]
        lens = (positions + 1).to(torch.int32)  # keys 0..position; padding (-1): none
        slots = decode_slots(tables, positions, engine.block_size)
        table = engine.rope_table()
        step = PagedStep(engine.k_pools, engine.v_pools, slots, rows, tables, lens, [],
                         rope_table=table, rope_index=positions)
        rope_positions = None if table is not None else positions.clamp(min=0).unsqueeze(1)
        return engine.forward(inputs[TOKENS].unsqueeze(1), rope_positions, step)[:, -1]

    @torch.inference_mode()
    def _capture(self, rows: int) -> None:
        gc.collect()  # see engine/cuda_graph.py: no dropped graph may be freed mid-capture
        host = padding_inputs(rows, pin=True)
        inputs = host.to(self.engine.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm up: lazy inits and autotuning stay outside the capture
                self.decode_forward(inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.decode_forward(inputs)
        self.graphs[rows] = (graph, inputs, host, logits)

    def run(self, plan: StepPlan, ahead: tuple[Tensor, list[int]] | None = None) -> Tensor:
        """Replay the step of a pure decode plan; logits [B, vocab] in plan order (graph
        memory, valid until the next replay). `ahead`: the plan's tokens are on the device,
        (the previous step's sampled tokens int64 [M], each row's index in them)."""
        n = len(plan.chunks)
        rows = bucket_for(n)
        if rows not in self.graphs:
            self._capture(rows)
        graph, inputs, host, logits = self.graphs[rows]
        pad = rows - n
        tokens = [0] * rows if ahead is not None else \
            [c.request.token_ids[c.start] for c in plan.chunks] + [0] * pad
        fill = torch.tensor(
            [tokens,
             [c.start for c in plan.chunks] + [-1] * pad,
             [c.request.seq for c in plan.chunks] + [0] * pad,
             (ahead[1] if ahead is not None else [0] * n) + [0] * pad], dtype=torch.int64)
        copied = self._copied.get(rows) if inputs.is_cuda else None
        if copied is not None:
            # a step planned ahead is built while the step in flight may not have copied from
            # `host` yet; that copy is queued right behind the tokens the host last took, so
            # this wait is short (and nothing at all for a step after a host read)
            copied.synchronize()
        host.copy_(fill)
        inputs.copy_(host, non_blocking=True)
        if inputs.is_cuda:
            copied = self._copied[rows] = copied or torch.cuda.Event()
            copied.record()
        if ahead is not None:
            torch.index_select(ahead[0], 0, inputs[SOURCE, :n], out=inputs[TOKENS, :n])
            inputs[TOKENS, :n].clamp_(min=0)
        graph.replay()
        return logits[:n]
