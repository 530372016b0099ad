"""The serving engine's overlapped decode steps (ServingEngine(overlap=True), engine/serving.py
step()) run on the CPU: the same pipelined logic as on CUDA (steps planned ahead of the previous
step's tokens, those tokens gathered on the device, accepted a step later), where the device is
the host. Each test runs a workload with the overlap and without it: the tokens, texts and
finish reasons are the synchronous engine's, the steps ahead did happen, and no block leaks."""

from __future__ import annotations

import pytest
import torch
from test_serving import ReplayOnCPU, model_for, pool, random_ids

from toyllm.engine.check.serving import WORKLOADS, block_problems, check_serving
from toyllm.engine.generate import GenerationError
from toyllm.engine.sampling import SamplingParams
from toyllm.engine.serving import RequestOutput, ServingEngine


def run_check(model, name: str, overlap: bool):
    build, options = WORKLOADS[name]
    options = {k: v(model) if callable(v) else v for k, v in options.items()}
    return check_serving(model, build(model.config.vocab_size), overlap=overlap, **options)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_overlapped_steps_pass_the_serving_check_with_the_synchronous_tokens(name: str) -> None:
    # join-leave: requests joining mid-decode; shared-prefix: prefix-cache hits (the blocks are
    # named a step later, when their tokens are known); fork-cow: forks of a request whose
    # next token is in flight, sampled and greedy; preempt: a pool too small for all
    model = model_for()
    sync = run_check(model, name, overlap=False)
    ahead = run_check(model, name, overlap=True)
    assert sync.ok, sync.problems
    assert ahead.ok, ahead.problems
    if name == "fork-cow":
        # request 3 forks request 1 (itself a fork) before a given call; with the overlap a
        # fork's first token comes one call later (the step in flight was launched without
        # it), so request 3 branches off one token earlier: the check above judged it
        del ahead.outputs[3], sync.outputs[3]
    assert ahead.outputs == sync.outputs
    assert sync.steps_ahead == 0 < ahead.steps_ahead
    assert ahead.prefix_hit_blocks == sync.prefix_hit_blocks
    if name == "preempt":
        assert ahead.preemptions > 0


def _generate(model, prompts, params, overlap: bool, eos: int | None = None, **kw):
    engine = ServingEngine(model, overlap=overlap, **kw)
    if eos is not None:
        engine.eos_ids = frozenset({eos})
    result = engine.generate(prompts, params)
    assert not block_problems(engine)
    return engine, result


def test_a_request_ending_at_eos_mid_run_drops_the_row_computed_after_it() -> None:
    model = model_for()
    prompts = [random_ids(n, 40 + n) for n in (3, 8, 15, 6, 11, 2)]
    kw = dict(block_size=4, kv_memory=pool(model, 128, 4))
    free = ServingEngine(model, **kw).generate(
        prompts, SamplingParams(max_new_tokens=24, stop_at_eos=False))
    eos = free.completions[0].token_ids[5]  # sampled mid-run: the EOS of this test
    params = SamplingParams(max_new_tokens=24)
    sync_engine, sync = _generate(model, prompts, params, False, eos, **kw)
    ahead_engine, ahead = _generate(model, prompts, params, True, eos, **kw)
    assert [(c.token_ids, c.finish_reason) for c in ahead.completions] == \
        [(c.token_ids, c.finish_reason) for c in sync.completions]
    ended = [c for c in sync.completions if c.finish_reason == "eos"]
    assert ended and all(len(c.token_ids) < 24 for c in ended)
    # the rows computed after an EOS: one per request that ended at EOS
    assert ahead_engine.stats().decode_tokens == sync_engine.stats().decode_tokens + len(ended)
    assert ahead_engine.stats().steps_ahead > 0


def test_rows_with_a_repetition_penalty_or_logprobs_run_synchronously() -> None:
    model = model_for()
    prompts = [random_ids(7, 1), random_ids(12, 2)]
    kw = dict(block_size=4, kv_memory=pool(model, 64, 4))
    for special in (SamplingParams(max_new_tokens=16, repetition_penalty=1.3,
                                   stop_at_eos=False),
                    SamplingParams(max_new_tokens=16, logprobs=2, stop_at_eos=False)):
        params = [SamplingParams(max_new_tokens=16, temperature=0.8, seed=5,
                                 stop_at_eos=False), special]
        _, sync = _generate(model, prompts, params, False, **kw)
        engine, ahead = _generate(model, prompts, params, True, **kw)
        assert [c.token_ids for c in ahead.completions] == [c.token_ids for c in sync.completions]
        assert engine.stats().steps_ahead == 0


def test_seeded_sampling_gives_the_synchronous_tokens() -> None:
    model = model_for()
    prompts = [random_ids(4 + 5 * i, 10 + i) for i in range(6)]
    params = [SamplingParams(max_new_tokens=6 + 4 * i, temperature=0.7 + 0.1 * i,
                             top_k=(0, 20)[i % 2], top_p=(1.0, 0.9)[i % 2 == 0 and i > 0],
                             min_p=0.05 * (i % 3), seed=100 + i, stop_at_eos=False)
              for i in range(6)]
    kw = dict(block_size=4, kv_memory=pool(model, 128, 4))
    _, sync = _generate(model, prompts, params, False, **kw)
    engine, ahead = _generate(model, prompts, params, True, **kw)
    assert [c.token_ids for c in ahead.completions] == [c.token_ids for c in sync.completions]
    assert engine.stats().steps_ahead > 0


def test_stop_strings_streams_and_timings_are_the_synchronous_ones() -> None:
    from toyllm.models.model_source import load_model

    loaded = load_model(None, torch.device("cpu"), torch.float32)
    prompts = ["def fib(n):", "import os\n", "class Stack:", "    return"]
    base = ServingEngine(loaded.model, loaded.tokenizer, kv_memory=2**24).generate(
        prompts[:1], SamplingParams(max_new_tokens=40)).completions[0].text
    words = [w for w in base.split() if len(w) >= 3]
    assert len(words) >= 2, base
    params = [SamplingParams(max_new_tokens=40, stop=(words[1],)),
              SamplingParams(max_new_tokens=30, stop=("\n\n", "os.")),
              SamplingParams(max_new_tokens=25, temperature=0.8, seed=3),
              SamplingParams(max_new_tokens=60)]
    runs = {}
    for overlap in (False, True):
        engine = ServingEngine(loaded.model, loaded.tokenizer, kv_memory=2**24, overlap=overlap)
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
        streamed = {rid: "" for rid in ids}
        last: dict[str, RequestOutput] = {}
        while engine.has_unfinished():
            for out in engine.step():
                assert out.request_id not in last or not last[out.request_id].finished
                streamed[out.request_id] += out.new_text
                last[out.request_id] = out
        for rid in ids:
            timings = last[rid].timings
            assert timings is not None and timings.first_token is not None
            assert len(timings.token_times) >= last[rid].completion_tokens
            assert timings.token_times == sorted(timings.token_times)
        runs[overlap] = [(streamed[r], last[r].finish_reason, last[r].completion_tokens)
                         for r in ids]
        assert not block_problems(engine)
    assert runs[True] == runs[False]
    assert {reason for _, reason, _ in runs[True]} >= {"stop"}


def _drive(engine: ServingEngine, joins: dict[int, list[tuple[list[int], int]]],
           aborts: dict[int, list[int]]) -> tuple[dict[str, list[int]], dict[str, str]]:
    """step() until done; before call k, add joins[k] (prompt, max_new_tokens) and abort the
    requests numbered aborts[k]. Each call reports a request at most once, nothing after its
    finish. Returns each request's tokens and finish reason, by request number."""
    ids: list[str] = []
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    call = 0
    while call <= max(joins) or engine.has_unfinished():
        for prompt, n in joins.get(call, []):
            ids.append(engine.add_request(prompt, SamplingParams(max_new_tokens=n,
                                                                 stop_at_eos=False)))
            tokens[ids[-1]] = []
        for k in aborts.get(call, []):
            engine.abort(ids[k])
        seen = set()
        for out in engine.step():
            assert out.request_id not in seen and out.request_id not in reasons
            seen.add(out.request_id)
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        call += 1
    return ({str(i): tokens[r] for i, r in enumerate(ids)},
            {str(i): reasons[r] for i, r in enumerate(ids)})


def test_requests_joining_and_aborted_mid_run_and_a_small_pool() -> None:
    model = model_for()
    joins = {0: [(random_ids(n, n), 18 + n) for n in (5, 9, 2)],
             4: [(random_ids(11, 50), 12)],
             9: [(random_ids(3, 51), 20), (random_ids(14, 52), 9)]}
    aborts = {6: [1], 12: [4]}
    for blocks in (128, 18):  # 18 blocks of 4: preemptions
        kw = dict(block_size=4, kv_memory=pool(model, blocks, 4), max_running=4)
        sync_engine = ServingEngine(model, overlap=False, **kw)
        ahead_engine = ServingEngine(model, overlap=True, **kw)
        sync_tokens, sync_reasons = _drive(sync_engine, joins, aborts)
        ahead_tokens, ahead_reasons = _drive(ahead_engine, joins, aborts)
        assert ahead_reasons == sync_reasons
        assert sync_reasons["1"] == sync_reasons["4"] == "abort"
        for i, reason in sync_reasons.items():
            if reason == "abort":  # cut at another step: the same tokens as far as they go
                n = min(len(sync_tokens[i]), len(ahead_tokens[i]))
                assert ahead_tokens[i][:n] == sync_tokens[i][:n]
            else:
                assert ahead_tokens[i] == sync_tokens[i]
        assert ahead_engine.stats().steps_ahead > 0
        if blocks == 18:
            assert ahead_engine.stats().preemptions > 0
        assert not block_problems(sync_engine) and not block_problems(ahead_engine)


def test_the_graph_path_gathers_the_tokens_in_flight_on_the_device() -> None:
    """PagedDecodeGraphs.run with a step planned ahead, its graph replayed eagerly on the CPU
    by a stand-in (as in tests/test_serving.py): the buffer's tokens row is gathered from the
    previous step's sampled tokens; the tokens are the eager synchronous engine's."""

    model = model_for()
    kw = dict(block_size=4, kv_memory=pool(model, 128, 4))
    prompts = [random_ids(n, n) for n in (5, 17, 1, 9, 3)]
    params = [SamplingParams(max_new_tokens=m, stop_at_eos=False) for m in (12, 30, 7, 21, 3)]
    eager = ServingEngine(model, **kw).generate(prompts, params)
    replayed = ServingEngine(model, overlap=True, **kw)
    replayed.cuda_graph = True
    replayed._graphs = ReplayOnCPU(replayed)
    got = replayed.generate(prompts, params)
    assert [c.token_ids for c in got.completions] == [c.token_ids for c in eager.completions]
    assert replayed.stats().steps_ahead > 0
    assert not block_problems(replayed)


def test_a_bad_overlap_is_refused() -> None:
    model = model_for()
    with pytest.raises(GenerationError, match="overlap: expected True, False or None"):
        ServingEngine(model, kv_memory=pool(model, 8, 4), block_size=4, overlap="yes")


def test_requests_waiting_for_a_running_slot_keep_the_pipeline_and_their_tokens() -> None:
    # max_running 3 of 7 requests: the others wait while every slot is taken; steps go on
    # ahead until a row is known to end (max_new_tokens) or ends at EOS (then the next request
    # is admitted a step later than without the overlap: the same tokens)
    model = model_for()
    prompts = [random_ids(n, 60 + n) for n in (4, 9, 13, 2, 7, 16, 5)]
    kw = dict(block_size=4, kv_memory=pool(model, 128, 4), max_running=3)
    free = ServingEngine(model, **kw).generate(
        prompts, SamplingParams(max_new_tokens=20, stop_at_eos=False))
    eos = free.completions[2].token_ids[6]
    for params in ([SamplingParams(max_new_tokens=8 + 3 * i, stop_at_eos=False)
                    for i in range(7)], SamplingParams(max_new_tokens=20)):
        sync_engine, sync = _generate(model, prompts, params, False, eos, **kw)
        ahead_engine, ahead = _generate(model, prompts, params, True, eos, **kw)
        assert [(c.token_ids, c.finish_reason) for c in ahead.completions] == \
            [(c.token_ids, c.finish_reason) for c in sync.completions]
        assert ahead_engine.stats().steps_ahead > 0


def test_aborting_every_request_of_the_step_in_flight_leaves_the_engine_idle_and_usable() -> None:
    model = model_for()
    kw = dict(block_size=4, kv_memory=pool(model, 64, 4))
    engine = ServingEngine(model, overlap=True, **kw)
    prompts = [random_ids(n, 70 + n) for n in (6, 10, 3)]
    params = SamplingParams(max_new_tokens=20, stop_at_eos=False)
    ids = [engine.add_request(p, params) for p in prompts]
    for _ in range(5):
        engine.step()
    assert engine._ahead is not None
    for rid in ids:
        engine.abort(rid)
    assert engine._ahead is None  # nothing of it was wanted any more
    outputs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outputs] == [(r, "abort") for r in ids]
    assert not engine.has_unfinished() and not block_problems(engine)
    again = engine.generate(prompts, params)
    alone = ServingEngine(model, **kw).generate(prompts, params)
    assert [c.token_ids for c in again.completions] == [c.token_ids for c in alone.completions]


def test_the_servers_engine_loop_streams_and_aborts_with_the_overlap() -> None:
    """The HTTP server's engine loop (engine/server/engine_loop.py) over an overlapped engine:
    streamed requests get the tokens the engine gives alone, an abort mid-stream ends its
    request with "abort", and every block comes back."""
    import asyncio

    from toyllm.engine.server.engine_face import Accepted
    from toyllm.engine.server.engine_loop import EngineLoop
    from toyllm.engine.server.metrics import Metrics

    model = model_for()
    kw = dict(block_size=4, kv_memory=pool(model, 128, 4))
    prompts = [random_ids(n, 80 + n) for n in (5, 11, 3, 8)]
    params = SamplingParams(max_new_tokens=25, stop_at_eos=False)
    alone = ServingEngine(model, **kw).generate(prompts, params)
    engine = ServingEngine(model, overlap=True, **kw)
    loop = EngineLoop(engine, Metrics(), max_waiting=8)
    loop.start()

    async def run() -> tuple[list[list[int]], list[str]]:
        streams = [loop.submit(p, params) for p in prompts]
        tokens: list[list[int]] = [[] for _ in streams]
        reasons = [""] * len(streams)
        for stream in streams:
            assert isinstance(await stream.get(), Accepted)
        done = 0
        while done < len(streams):
            for i, stream in enumerate(streams):
                if reasons[i]:
                    continue
                out = await stream.get()
                tokens[i] += out.new_token_ids
                if i == 2 and len(tokens[i]) >= 6 and not out.finished:
                    loop.abort(stream.request_id)
                if out.finished:
                    reasons[i] = out.finish_reason
                    done += 1
        return tokens, reasons

    try:
        tokens, reasons = asyncio.run(run())
    finally:
        loop.stop()
    assert reasons == ["max_new_tokens", "max_new_tokens", "abort", "max_new_tokens"]
    for i in (0, 1, 3):
        assert tokens[i] == alone.completions[i].token_ids
    assert tokens[2] == alone.completions[2].token_ids[:len(tokens[2])]
    assert engine.stats().steps_ahead > 0
    assert not block_problems(engine)
