"""Rank targets for the tensor-parallel tests: module-level functions, so spawned ranks can
import them by name (engine/tensor_parallel/launch.py runs `target(ranks, conn, *args)`)."""

from __future__ import annotations

import time
from typing import Any

import torch

from toyllm.engine.sampling import SamplingParams
from toyllm.engine.tensor_parallel.launch import send
from toyllm.engine.tensor_parallel.rank_engine import (
    LeaderEngine,
    ShardEngine,
    build_engine,
    follow,
    serve_ranks,
)


def raise_on_rank(ranks: Any, conn: Any, bad_rank: int) -> None:
    """Every rank joins one all-reduce; then `bad_rank` raises while the others wait in a
    second all-reduce that it will never join."""
    ranks.all_reduce(torch.ones(4, device=ranks.device))
    if ranks.rank == bad_rank:
        raise ValueError(f"injected failure on rank {bad_rank}")
    ranks.all_reduce(torch.ones(4, device=ranks.device))


def hang_on_rank(ranks: Any, conn: Any, bad_rank: int, seconds: float) -> None:
    """`bad_rank` sleeps (no collective, no error) while the others wait in an all-reduce:
    only the process group's timeout can end it."""
    if ranks.rank == bad_rank:
        time.sleep(seconds)
    ranks.all_reduce(torch.ones(4, device=ranks.device))


def serve_failing_decode(ranks: Any, conn: Any, spec: Any, bad_rank: int, step: int) -> None:
    """serve_ranks, with `bad_rank`'s engine raising at its `step`-th decode step (the others
    are then inside that step's collectives, or waiting for the next command)."""
    if ranks.rank == bad_rank:
        original = ShardEngine.decode_step
        calls = {"n": 0}

        def decode_step(self, cache, rows, tokens):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            if calls["n"] == step:
                raise RuntimeError(f"injected decode failure at step {step}")
            return original(self, cache, rows, tokens)

        ShardEngine.decode_step = decode_step  # this rank's process only
    serve_ranks(ranks, conn, spec)


def graph_probe(ranks: Any, conn: Any, spec: Any, prompts: list[list[int]],
                max_new_tokens: int) -> None:
    """One greedy request; rank 0 sends (tokens, the row buckets its decode graphs were
    captured for) so a test can see the step ran as a CUDA graph holding the all-reduces."""
    engine, _ = build_engine(spec, ranks)
    if not isinstance(engine, LeaderEngine):
        follow(engine)
        return
    params = SamplingParams(max_new_tokens=max_new_tokens, stop_at_eos=False)
    result = engine.generate(prompts, params)
    engine.end()
    graphs = sorted(engine._graphs.graphs) if engine._graphs is not None else []
    send(conn, "probe", [c.token_ids for c in result.completions], graphs)


def plain_forward_probe(ranks: Any, conn: Any, spec: Any, ids: list[int]) -> None:
    """The shard's own plain-torch forward (Transformer.forward through the modules of
    engine/tensor_parallel/layers.py, no cache, no engine); rank 0 sends its logits."""
    from toyllm.engine.tensor_parallel.load import load_shard

    shard = load_shard(spec.source, ranks, spec.dtype, spec.random_weights, spec.seed,
                       with_tokenizer=False)
    with torch.inference_mode():
        logits = shard.model(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0))[0]
    if ranks.leader:
        send(conn, "logits", logits)


def unannounced_forward(ranks: Any, conn: Any, spec: Any) -> None:
    """Rank 0 runs its engine's forward directly, outside prepare_cache / prefill /
    decode_step, while the followers wait for a command."""
    engine, _ = build_engine(spec, ranks)
    if not isinstance(engine, LeaderEngine):
        follow(engine)
        return
    cache = engine.prepare_cache(1, 8)
    from toyllm.engine.cached_attention import PrefillStep

    engine.forward(torch.tensor([[1, 2]]), torch.arange(2).unsqueeze(0), PrefillStep(cache, 0))


def die_on_rank(ranks: Any, conn: Any, bad_rank: int) -> None:
    """`bad_rank` exits at once with code 3 and no message (as a killed process would) while
    the others wait in an all-reduce."""
    import os

    ranks.all_reduce(torch.ones(4, device=ranks.device))
    if ranks.rank == bad_rank:
        os._exit(3)
    ranks.all_reduce(torch.ones(4, device=ranks.device))
