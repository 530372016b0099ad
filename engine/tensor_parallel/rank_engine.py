"""The engine on each rank: rank 0 leads, the others follow its steps.

Every rank holds an `Engine` over its shard whose forward carries the collectives
(`ShardEngine`). Rank 0's (`LeaderEngine`) is the one that tokenizes, samples and decides when
each sequence stops: before each step that touches the model it broadcasts a 4-integer command,
and the followers (`follow`) run the same step on their own shard and cache:

    PREPARE rows seq_len        prepare_cache(rows, seq_len)   (reset or reallocate)
    PREFILL row n   + ids [n]    prefill(cache, row, ids)
    DECODE  rows f  (+ active flags [rows] when f) + tokens [rows]
                                 the rows' active flags as rank 0's, then decode_step(tokens)
    END                          the request is over; wait for the next one from the parent

So the sampled tokens reach the followers by broadcast, and every rank's cache has the same
positions and active rows at every step. Between requests the followers wait on their pipe
from the parent (not in a collective, which would time out while the engine sits idle).
`serve_ranks` is the target each rank runs (engine/tensor_parallel/launch.py starts it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from toyllm.engine.forward import EngineForward
from toyllm.engine.generate import Engine
from toyllm.engine.ops.kv_cache import KVCache
from toyllm.engine.tensor_parallel.collectives import RankGroup
from toyllm.engine.tensor_parallel.launch import receive, send
from toyllm.engine.tensor_parallel.load import load_shard
from toyllm.models.llama import Transformer

END, PREPARE, PREFILL, DECODE = 0, 1, 2, 3


class ShardEngine(Engine):
    """An Engine over one rank's shard: its forward sums the o and down products over the
    ranks and gathers the vocabulary (engine/forward.py's collectives)."""

    def __init__(self, model: Transformer, tokenizer: Any, ranks: RankGroup,
                 **options: Any) -> None:
        super().__init__(model, tokenizer, **options)
        self.ranks = ranks
        # the forward Engine built for one process, again with the collectives (it fused the
        # weights already: the new one takes the same views, no copy)
        self.forward = EngineForward(model, self.settings, collectives=ranks)
        self.decode_forward = self._make_decode_forward()

    def _ints(self, n: int) -> Tensor:
        return torch.empty(n, dtype=torch.int64, device=self.device)


class LeaderEngine(ShardEngine):
    """Rank 0: every step that touches the model is first announced to the followers."""

    def __init__(self, model: Transformer, tokenizer: Any, ranks: RankGroup,
                 **options: Any) -> None:
        super().__init__(model, tokenizer, ranks, **options)
        self.commands_sent = 0
        self._active_sent: list[bool] | None = None  # the followers' active flags
        ranks.guard_steps = True  # a forward pass outside an announced step fails at once

    def command(self, code: int, a: int = 0, b: int = 0) -> None:
        self.ranks.broadcast(torch.tensor([code, a, b, 0], dtype=torch.int64,
                                          device=self.device))
        self.commands_sent += 1

    @contextmanager
    def _announced(self) -> Iterator[None]:
        self.ranks.announced += 1
        try:
            yield
        finally:
            self.ranks.announced -= 1

    def end(self) -> None:
        """The request is over: the followers go back to waiting for the parent."""
        self.command(END)

    def prepare_cache(self, rows: int, seq_len: int) -> KVCache:
        self.command(PREPARE, rows, seq_len)
        self._active_sent = None  # a reset makes every row active again, on every rank
        with self._announced():
            return super().prepare_cache(rows, seq_len)

    def prefill(self, cache: KVCache, row: int, ids: Sequence[int]) -> Tensor:
        ids = [int(t) for t in ids]
        self.command(PREFILL, row, len(ids))
        self.ranks.broadcast(torch.tensor(ids, dtype=torch.int64, device=self.device))
        with self._announced():
            return super().prefill(cache, row, ids)

    def decode_step(self, cache: KVCache, rows: int, tokens: Tensor) -> Tensor:
        """tokens [rows] (sampled here) go to the followers with the rows' active flags when
        they changed since the last step."""
        active = [cache.is_active(r) for r in range(rows)]
        changed = active != self._active_sent
        self.command(DECODE, rows, int(changed))
        if changed:
            self.ranks.broadcast(torch.tensor(active, dtype=torch.int64, device=self.device))
            self._active_sent = active
        self.ranks.broadcast(tokens.reshape(rows).to(torch.int64).contiguous())
        with self._announced():
            return super().decode_step(cache, rows, tokens)


def follow(engine: ShardEngine) -> None:
    """Run rank 0's commands on this rank's shard until END."""
    ranks = engine.ranks
    header = engine._ints(4)
    while True:
        code, a, b, _ = ranks.broadcast(header).tolist()
        if code == END:
            return
        if code == PREPARE:
            engine.prepare_cache(a, b)
        elif code == PREFILL:
            ids = ranks.broadcast(engine._ints(b)).tolist()
            engine.prefill(engine.cache, a, ids)
        elif code == DECODE:
            cache = engine.cache
            if b:
                for r, flag in enumerate(ranks.broadcast(engine._ints(a)).tolist()):
                    if cache.is_active(r) != bool(flag):
                        cache.set_active(r, bool(flag))
            engine.decode_step(cache, a, ranks.broadcast(engine._ints(a)))
        else:
            raise RuntimeError(f"rank {ranks.rank}: unknown command {code} from rank 0")


@dataclass(frozen=True)
class ShardSpec:
    """What every rank loads and how its engine runs (picklable: it crosses to the ranks)."""

    source: str | None
    dtype: torch.dtype
    random_weights: bool = False
    seed: int = 0
    tokenizer_path: str | None = None
    engine_options: dict[str, Any] = field(default_factory=dict)  # Engine keyword arguments
    with_tokenizer: bool = True  # False: requests of token ids only (no tokenizer loaded)


def build_engine(spec: ShardSpec, ranks: RankGroup) -> tuple[ShardEngine, Any]:
    """(this rank's engine, its LoadedShard)."""
    shard = load_shard(spec.source, ranks, spec.dtype, spec.random_weights, spec.seed,
                       Path(spec.tokenizer_path) if spec.tokenizer_path else None,
                       spec.with_tokenizer)
    kind = LeaderEngine if ranks.leader else ShardEngine
    return kind(shard.model, shard.tokenizer, ranks, **spec.engine_options), shard


def serve_ranks(ranks: RankGroup, conn: Connection, spec: ShardSpec) -> None:
    """Each rank's life: load its shard, then serve the parent's requests until "stop"."""
    engine, shard = build_engine(spec, ranks)
    ranks.barrier()  # every shard loaded before rank 0 says ready
    if ranks.leader:
        send(conn, "ready", {"source": shard.source, "load_s": shard.load_s,
                             "config": shard.config, "tokenizer": shard.tokenizer is not None,
                             "device": str(ranks.device), "ranks": ranks.ranks})
    while True:
        msg = receive(conn)
        if msg[0] == "stop":
            return
        if msg[0] == "follow":
            follow(engine)
        elif msg[0] == "generate":
            assert isinstance(engine, LeaderEngine)
            serve_request(engine, conn, *msg[1:])
        else:
            raise RuntimeError(f"rank {ranks.rank}: unknown request {msg[0]!r} from the parent")


def serve_request(engine: LeaderEngine, conn: Connection, prompts: Any, params: Any,
                  stream: bool, chat: bool, system: str | None) -> None:
    """One generate request on rank 0: its result (or its error) goes to the parent; the text
    streams piece by piece when `stream`. An error raised before any command reached the
    followers (a prompt too long, an empty one...) is the request's alone: the followers are
    released and the ranks serve on. After that, it ends every rank (raised)."""
    start = engine.commands_sent
    try:
        inputs = prompts
        if chat:
            from toyllm.models.chat_template import chat_prompt_ids

            head = [{"role": "system", "content": system}] if system else []
            inputs = [chat_prompt_ids(engine.tokenizer, [*head, {"role": "user", "content": t}])
                      for t in prompts]
        def on_text(i: int, piece: str) -> None:
            send(conn, "text", i, piece)

        result = engine.generate(inputs, params, on_text=on_text if stream else None)
    except Exception as exc:
        if engine.commands_sent != start:
            raise
        engine.end()
        send(conn, "error", exc)
        return
    engine.end()
    send(conn, "result", result)
