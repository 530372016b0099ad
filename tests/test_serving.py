"""The serving engine (continuous batching over the paged cache) against the no-cache reference
and the static Engine: requests joining and leaving mid-decode, shared prefixes, forks and copy
on write, preemption, per-request seeds, aborts, blocks after every workload, bad input, and
planted bugs that the check must catch."""

from __future__ import annotations

import re

import pytest
import torch

from toyllm.engine.check.serving import Arrival, block_problems, check_serving
from toyllm.engine.generate import Engine, GenerationError
from toyllm.engine.ops.paged_cache import PagedKVCache
from toyllm.engine.paged_graphs import PagedDecodeGraphs, padding_inputs
from toyllm.engine.sampling import SamplingParams
from toyllm.engine.scheduler import Scheduler
from toyllm.engine.serving import ServingEngine
from toyllm.models.config import ModelConfig
from toyllm.models.llama import build_model

CONFIGS = {
    "gqa": ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, intermediate_size=96, max_seq_len=128),
    "mqa_hd32": ModelConfig(vocab_size=256, hidden_size=96, num_layers=2, num_heads=3,
                            num_kv_heads=1, head_dim=32, intermediate_size=128,
                            max_seq_len=128, tie_embeddings=True),
}


class ReplayOnCPU(PagedDecodeGraphs):
    """PagedDecodeGraphs whose "graph" replays eagerly on the CPU: each bucket's replay calls
    the same decode forward on the same static buffers a captured graph would read."""

    def __init__(self, engine: ServingEngine) -> None:
        self.engine = engine
        self.graphs = {}

    def _capture(self, rows: int) -> None:
        host = padding_inputs(rows)
        inputs = host.clone()
        logits = torch.empty(rows, self.engine.config.vocab_size)
        outer = self

        class Replay:
            def replay(self) -> None:
                logits.copy_(outer.decode_forward(inputs))

        self.graphs[rows] = (Replay(), inputs, host, logits)


def model_for(name: str = "gqa", seed: int = 0):
    # std 0.2: peaked logits, so greedy ties are not a coin flip (as tests/test_generate.py)
    model = build_model(CONFIGS[name], seed=seed)
    model.init_weights(seed, std=0.2)
    return model


def random_ids(n: int, seed: int, vocab: int = 256) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def block_bytes(model, block_size: int) -> int:
    c = model.config
    return PagedKVCache.block_bytes(c.num_layers, block_size, c.num_kv_heads, c.head_dim,
                                    model.dtype)


def pool(model, blocks: int, block_size: int) -> int:
    """kv_memory in bytes for a pool of `blocks` blocks."""
    return blocks * block_bytes(model, block_size)


def join_and_leave(seed: int = 0) -> list[Arrival]:
    """Requests of ragged lengths joining at different steps, leaving at different steps."""
    lens = [9, 1, 23, 5, 17, 30]
    news = [20, 7, 12, 25, 3, 9]
    steps = [0, 0, 2, 5, 5, 11]
    return [Arrival(random_ids(n, seed + i), m, s)
            for i, (n, m, s) in enumerate(zip(lens, news, steps, strict=True))]


def shared_prefix(seed: int = 0, prefix_len: int = 24) -> list[Arrival]:
    head = random_ids(prefix_len, seed)
    arrivals = [Arrival(head + random_ids(3 + i, seed + 10 + i), 8, 0 if i == 0 else 6 + i)
                for i in range(4)]
    arrivals.append(Arrival(list(head), 6, 20))  # the whole prompt cached (block multiple)
    arrivals.append(Arrival(list(arrivals[1].prompt), 5, 24))  # the same prompt again
    return arrivals


# --- against the witnesses -----------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("block_size,budget", [(4, 64), (16, 8), (1, 7)])
def test_requests_joining_and_leaving_match_reference_and_static_engine(
        name: str, block_size: int, budget: int) -> None:
    model = model_for(name)
    report = check_serving(model, join_and_leave(), block_size=block_size,
                           token_budget=budget, kv_memory=pool(model, 512 // block_size + 64,
                                                               block_size))
    assert report.ok, report.problems
    assert report.max_abs <= 1e-4


def test_shared_prefixes_are_prefilled_once_and_change_nothing() -> None:
    model = model_for()
    kw = dict(block_size=8, token_budget=64, kv_memory=pool(model, 80, 8))
    cached = check_serving(model, shared_prefix(), prefix_caching=True, **kw)
    plain = check_serving(model, shared_prefix(), prefix_caching=False, **kw)
    assert cached.ok, cached.problems
    assert plain.ok, plain.problems
    assert cached.outputs == plain.outputs
    # 3 later requests x 3 blocks of the 24-token head, the head alone (3 blocks, its last
    # token recomputed) and a repeated prompt (its full blocks)
    assert cached.prefix_hit_blocks >= 3 * 3 + 3 + 3
    assert plain.prefix_hit_blocks == 0
    assert plain.prefill_tokens - cached.prefill_tokens >= 3 * 24 + 23


def test_forked_requests_copy_the_shared_block_before_writing() -> None:
    model = model_for()
    prompt = random_ids(13, 5)  # 13 tokens, blocks of 4: the tail block is partial
    workload = [Arrival(prompt, 20, 0), Arrival([], 16, 2, fork_of=0, temperature=1.5, seed=1),
                Arrival([], 24, 7, fork_of=0), Arrival([], 18, 9, fork_of=1, temperature=1.5,
                                                       seed=2)]
    report = check_serving(model, workload, block_size=4, kv_memory=pool(model, 64, 4))
    assert report.ok, report.problems
    assert report.outputs[1][:2] == report.outputs[0][:2] != report.outputs[1][2:4]  # forked


def test_a_fully_cached_prompt_copies_its_last_block() -> None:
    model = model_for()
    prompt = random_ids(16, 9)
    engine = ServingEngine(model, block_size=8, kv_memory=pool(model, 32, 8))
    first = engine.generate([prompt], SamplingParams(max_new_tokens=6, stop_at_eos=False))
    used = engine.cache.num_used_blocks()
    named = engine.prefix.blocks()
    rid = engine.add_request(prompt, SamplingParams(max_new_tokens=2, stop_at_eos=False))
    engine.step()
    seq = engine._requests[rid].seq
    first_block, last_block = engine.cache.sequence_blocks(seq)
    assert first_block in named and last_block not in named  # adopted, then copied on write
    while engine.has_unfinished():
        engine.step()
    again = engine.generate([prompt], SamplingParams(max_new_tokens=6, stop_at_eos=False))
    assert again.completions[0].token_ids == first.completions[0].token_ids
    assert engine.stats().prefix_hit_blocks == 4
    assert again.stats.prefill_tokens == 1  # all cached; the last token recomputed for logits
    assert used >= 2 and not block_problems(engine)


@pytest.mark.parametrize("blocks", [12, 14, 20])
def test_a_small_pool_preempts_and_the_tokens_do_not_change(blocks: int) -> None:
    model = model_for()
    workload = [Arrival(random_ids(n, 30 + n), m, s)
                for n, m, s in [(10, 30, 0), (14, 25, 0), (6, 40, 1), (20, 12, 2), (3, 30, 4)]]
    report = check_serving(model, workload, block_size=4, kv_memory=pool(model, blocks, 4),
                           max_running=5)
    assert report.ok, report.problems
    assert report.preemptions > 0


def test_a_request_filling_the_context_finishes_with_length_like_the_static_engine() -> None:
    model = model_for()
    prompt = random_ids(120, 3)  # context 128: 8 positions left
    params = SamplingParams(max_new_tokens=30, stop_at_eos=False)
    static = Engine(model).generate([prompt], params).completions[0]
    served = ServingEngine(model, block_size=8, kv_memory=pool(model, 40, 8)).generate(
        [prompt], params).completions[0]
    assert served.finish_reason == static.finish_reason == "length"
    assert served.token_ids == static.token_ids


# --- sampling ------------------------------------------------------------------------------

def test_seeded_requests_give_the_same_tokens_alone_or_in_any_mix() -> None:
    model = model_for()
    prompt = random_ids(11, 1)
    mine = SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.9, seed=1234,
                          stop_at_eos=False)
    others = [SamplingParams(max_new_tokens=n, temperature=t, top_k=k, seed=s,
                             min_p=mp, repetition_penalty=rp, stop_at_eos=False)
              for n, t, k, s, mp, rp in [(30, 0.9, 0, 7, 0.0, 1.0), (5, 0.0, 0, None, 0.0, 1.5),
                                         (17, 1.3, 20, 99, 0.1, 1.2)]]
    kw = dict(block_size=4, kv_memory=pool(model, 128, 4))
    alone = ServingEngine(model, **kw).generate([prompt], mine).completions[0].token_ids
    static = Engine(model).generate([prompt], mine).completions[0].token_ids
    assert alone == static
    for order in ([0, 1, 2, 3], [3, 2, 0, 1], [1, 0]):
        prompts = [prompt if i == 0 else random_ids(4 + 3 * i, i) for i in order]
        params = [mine if i == 0 else others[i - 1] for i in order]
        got = ServingEngine(model, **kw).generate(prompts, params)
        assert got.completions[order.index(0)].token_ids == alone
    for i, p in enumerate(others):  # min-p and the repetition penalty: as the static Engine
        prompt_i = random_ids(4 + 3 * (i + 1), i + 1)
        assert ServingEngine(model, **kw).generate([prompt_i], p).completions[0].token_ids == \
            Engine(model).generate([prompt_i], p).completions[0].token_ids


# --- requests in flight --------------------------------------------------------------------

def test_abort_frees_every_block_and_the_others_go_on() -> None:
    model = model_for()
    engine = ServingEngine(model, block_size=4, kv_memory=pool(model, 64, 4), max_running=2)
    params = SamplingParams(max_new_tokens=20, stop_at_eos=False)
    prompts = [random_ids(n, n) for n in (9, 13, 6)]
    ids = [engine.add_request(p, params) for p in prompts]
    for _ in range(4):
        engine.step()
    assert engine.stats().running == 2 and engine.stats().waiting == 1
    engine.abort(ids[0])  # running
    engine.abort(ids[2])  # waiting
    engine.abort("never-added")  # not in flight: ignored
    outputs = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    assert outputs[ids[0]][-1].finish_reason == "abort"
    assert outputs[ids[2]][-1].finish_reason == "abort"
    assert outputs[ids[1]][-1].finish_reason == "max_new_tokens"
    assert not block_problems(engine)


def test_streamed_outputs_add_up_to_the_completion_and_timings_are_kept() -> None:
    from toyllm.models.model_source import load_model

    loaded = load_model(None, torch.device("cpu"), torch.float32)
    engine = ServingEngine(loaded.model, loaded.tokenizer, kv_memory=2**22)
    params = SamplingParams(max_new_tokens=12, stop_at_eos=False)
    rid = engine.add_request("def fib(n):", params)
    pieces, last = [], None
    while engine.has_unfinished():
        for out in engine.step():
            pieces.append(out.new_text)
            last = out
    assert last is not None and last.request_id == rid and last.finished
    static = Engine(loaded.model, loaded.tokenizer).generate(["def fib(n):"], params)
    assert "".join(pieces) == static.completions[0].text
    t = last.timings
    assert t is not None and t.first_token is not None and len(t.token_times) == 12
    assert t.time_to_first_token >= 0 and len(t.inter_token_latencies()) == 11


# --- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("block_size", [0, -4, 3, 12, True, 4.0, 256])
def test_a_bad_block_size_is_refused(block_size) -> None:
    with pytest.raises(GenerationError, match="block_size"):
        ServingEngine(model_for(), block_size=block_size, kv_memory=2**20)


@pytest.mark.parametrize("kv_memory", [0, -1, 1.5, 0.0, "1GiB", True, 100])
def test_a_bad_kv_memory_is_refused(kv_memory) -> None:
    with pytest.raises(GenerationError, match="kv_memory"):
        ServingEngine(model_for(), kv_memory=kv_memory)


@pytest.mark.parametrize("option,value", [("max_running", 0), ("token_budget", -1),
                                          ("max_running", 2.5), ("prefix_caching", "yes"),
                                          ("cuda_graph", "no"), ("cuda_graph", True),
                                          ("max_seq_len", 0)])
def test_bad_engine_options_are_refused(option: str, value) -> None:
    with pytest.raises(GenerationError, match=option):
        ServingEngine(model_for(), kv_memory=2**20, **{option: value})


def test_bad_requests_are_refused_with_nothing_queued_and_the_others_go_on() -> None:
    model = model_for()
    engine = ServingEngine(model, block_size=4, kv_memory=pool(model, 6, 4))  # 24 tokens
    params = SamplingParams(max_new_tokens=10, stop_at_eos=False)
    good = random_ids(7, 2)
    rid = engine.add_request(good, params, request_id="good")
    tokens = [t for o in engine.step() for t in o.new_token_ids]
    free = engine.cache.num_free_blocks()
    bad = [
        (random_ids(25, 1), params, "the pool has 6"),  # needs 7 blocks of 4
        (random_ids(129, 1), params, "context holds 128"),
        ([], params, "empty"),
        ([5, 256], params, "token ids must be in"),
        ("text", params, "need a tokenizer"),
        (good, {"max_new_tokens": 3}, "expected SamplingParams"),
        (good, SamplingParams(stop=("x",)), "stop strings need a tokenizer"),
    ]
    for prompt, p, message in bad:
        with pytest.raises(GenerationError, match=message):
            engine.add_request(prompt, p)
    with pytest.raises(GenerationError, match="already in flight"):
        engine.add_request(good, params, request_id="good")
    stats = engine.stats()
    assert (stats.waiting, stats.running) == (0, 1)
    assert engine.cache.num_free_blocks() == free  # nothing written
    while engine.has_unfinished():
        tokens += [t for o in engine.step() if o.request_id == rid for t in o.new_token_ids]
    assert tokens == Engine(model).generate([good], params).completions[0].token_ids


def test_generate_checks_every_prompt_before_queueing_any() -> None:
    model = model_for()
    engine = ServingEngine(model, block_size=4, kv_memory=pool(model, 16, 4))
    params = SamplingParams(max_new_tokens=4)
    with pytest.raises(GenerationError, match="prompt 1"):
        engine.generate([[5, 6], [], [7]], params)
    with pytest.raises(GenerationError, match="one SamplingParams per prompt"):
        engine.generate([[5, 6], [7]], [params])
    with pytest.raises(GenerationError, match="no prompts"):
        engine.generate([], params)
    assert not engine.has_unfinished()
    assert engine.cache.num_free_blocks() == engine.cache.num_blocks
    engine.add_request([5, 6], params)
    with pytest.raises(GenerationError, match="in flight"):  # its outputs would be lost
        engine.generate([[7]], params)
    assert engine.stats().waiting == 1  # the request in flight is untouched


# --- planted bugs: each must fail the check ------------------------------------------------

def _planted_workload() -> list[Arrival]:
    return shared_prefix(seed=3, prefix_len=16) + [Arrival(random_ids(9, 40), 12, 2)]


def _check(model) -> list[str]:
    return check_serving(model, _planted_workload(), block_size=4, token_budget=32,
                         kv_memory=pool(model, 48, 4)).problems


def test_the_check_passes_without_a_planted_bug() -> None:
    assert _check(model_for()) == []


def test_a_wrong_block_table_entry_fails_the_check(monkeypatch) -> None:
    model = model_for()
    build = ServingEngine.build_step

    def wrong_table(self, plan):
        tokens, positions, step, select = build(self, plan)
        if step.decode_tables is not None:
            tables = step.decode_tables.clone()
            tables[:, 0] = tables[:, 1].where(tables[:, 1] >= 0, tables[:, 0])  # block 0 -> 1
            step.decode_tables = tables
        return tokens, positions, step, select

    monkeypatch.setattr(ServingEngine, "build_step", wrong_table)
    assert _check(model)


def test_an_off_by_one_slot_fails_the_check(monkeypatch) -> None:
    import toyllm.engine.paged_step as paged_step

    write = paged_step.paged_kv_write

    def off_by_one(k_pool, v_pool, k, v, slots):
        write(k_pool, v_pool, k, v, torch.where(slots >= 0, slots + 1, slots))

    monkeypatch.setattr(paged_step, "paged_kv_write", off_by_one)
    assert _check(model_for())


def test_a_skipped_copy_on_write_fails_the_check(monkeypatch) -> None:
    """The fork shares the block holding positions 12..15 with 14 and 15 still to write: the
    sampled child's token at 15 differs from its parent's."""
    def reserve_without_copy(self, request, n):
        request.tail_may_be_shared = False  # the shared block is written in place
        if self._blocks_needed(request, n):
            self.cache.reserve(request.seq, n)

    model = model_for()
    workload = [Arrival(random_ids(13, 5), 20, 0),
                Arrival([], 16, 2, fork_of=0, temperature=1.5, seed=1)]
    kw = dict(block_size=4, kv_memory=pool(model, 64, 4))
    assert check_serving(model, workload, **kw).ok
    monkeypatch.setattr(Scheduler, "_reserve", reserve_without_copy)
    assert not check_serving(model, workload, **kw).ok


def test_a_block_freed_while_shared_fails_the_check(monkeypatch) -> None:
    release = Scheduler._release

    def release_one_too_many(self, request):
        if request.seq is not None:
            shared = [b for b in self.cache.sequence_blocks(request.seq)
                      if self.cache.ref_count(b) > 1]
            if shared:
                self.cache.decref(shared[0])  # gone while another holder still reads it
        release(self, request)

    monkeypatch.setattr(Scheduler, "_release", release_one_too_many)
    assert _check(model_for())


# --- the CUDA-graph decode step's inputs, replayed eagerly on the CPU ----------------------

def test_the_graph_decode_step_gives_the_eager_tokens_with_padding_rows() -> None:
    """PagedDecodeGraphs' static buffer (tokens, positions, slots, table rows; padding rows
    past the batch) and its decode forward, run on the CPU by a stand-in for the captured
    graph that calls the same function on the same buffer: the tokens of every request are
    the eager engine's and the reference's, through bucket changes as requests leave."""
    model = model_for()
    kw = dict(block_size=4, kv_memory=pool(model, 128, 4))
    prompts = [random_ids(n, n) for n in (5, 17, 1, 9, 3)]
    params = [SamplingParams(max_new_tokens=m, stop_at_eos=False) for m in (12, 30, 7, 21, 3)]
    eager = ServingEngine(model, **kw).generate(prompts, params)
    replayed = ServingEngine(model, **kw)
    replayed.cuda_graph = True
    replayed._graphs = ReplayOnCPU(replayed)
    got = replayed.generate(prompts, params)
    assert [c.token_ids for c in got.completions] == [c.token_ids for c in eager.completions]
    assert sorted(replayed._graphs.graphs) == [1, 2, 4, 8]  # 5 rows, then fewer
    for p, sp, c in zip(prompts, params, got.completions, strict=True):
        assert c.token_ids == Engine(model).generate([p], sp).completions[0].token_ids
    assert not block_problems(replayed)


def test_non_finite_logits_finish_that_request_with_an_error_and_the_others_go_on(
        monkeypatch) -> None:
    model = model_for()
    engine = ServingEngine(model, block_size=4, kv_memory=pool(model, 64, 4))
    params = SamplingParams(max_new_tokens=8, stop_at_eos=False)
    good, bad = random_ids(6, 1), random_ids(9, 2)
    ids = [engine.add_request(good, params), engine.add_request(bad, params)]
    forward = ServingEngine._forward

    def nan_for_the_second(self, plan):
        logits = forward(self, plan).clone()
        for i, c in enumerate([c for c in plan.chunks if c.samples]):
            if c.request.prompt_ids == bad and c.request.num_output_tokens == 3:
                logits[i, 5] = float("nan")
        return logits

    monkeypatch.setattr(ServingEngine, "_forward", nan_for_the_second)
    outs: dict[str, list] = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    last = outs[ids[1]][-1]
    assert last.finish_reason == "error" and "NaN or inf" in last.error
    assert last.completion_tokens == 3
    assert [t for o in outs[ids[0]] for t in o.new_token_ids] == \
        Engine(model).generate([good], params).completions[0].token_ids
    assert not block_problems(engine)
    with pytest.raises(GenerationError, match="NaN or inf"):
        engine.generate([good, bad], params)
    while engine.has_unfinished():  # generate aborted its other requests: reported here
        assert all(o.finish_reason == "abort" for o in engine.step())
    assert not block_problems(engine)


def test_generate_with_a_progress_bar_gives_the_same_completions(capsys) -> None:
    model = model_for()
    kw = dict(block_size=4, kv_memory=pool(model, 64, 4))
    prompts = [random_ids(n, n) for n in (4, 8, 2)]
    params = SamplingParams(max_new_tokens=5, stop_at_eos=False)
    plain = ServingEngine(model, **kw).generate(prompts, params)
    shown = ServingEngine(model, **kw).generate(prompts, params, progress=True)
    assert [c.token_ids for c in shown.completions] == [c.token_ids for c in plain.completions]
    assert capsys.readouterr().out == ""  # the bar goes to stderr


def test_text_stop_strings_and_eos_finish_as_in_the_static_engine() -> None:
    from toyllm.models.model_source import load_model

    loaded = load_model(None, torch.device("cpu"), torch.float32)
    prompts = ["def fib(n):", "import os\n", "class Stack:", "    return"]
    # a stop string the shipped model's greedy text for the first prompt does hold: a word of it
    # past its start (whatever model is shipped)
    free = Engine(loaded.model, loaded.tokenizer).generate(
        [prompts[0]], SamplingParams(max_new_tokens=40)).completions[0].text
    words = re.findall(r"[A-Za-z_]{4,}", free)
    assert len(words) >= 2, free
    params = [SamplingParams(max_new_tokens=40, stop=(words[1],)),
              SamplingParams(max_new_tokens=30, stop=("\n\n", "os.")),
              SamplingParams(max_new_tokens=25, temperature=0.8, seed=3),
              SamplingParams(max_new_tokens=60)]
    engine = ServingEngine(loaded.model, loaded.tokenizer, kv_memory=2**24)
    served = engine.generate(prompts, params)
    for prompt, p, c in zip(prompts, params, served.completions, strict=True):
        static = Engine(loaded.model, loaded.tokenizer).generate([prompt], p).completions[0]
        assert (c.text, c.token_ids, c.finish_reason) == \
            (static.text, static.token_ids, static.finish_reason)
    assert {c.finish_reason for c in served.completions} >= {"stop"}
    assert not block_problems(engine)


def test_a_burst_sharing_a_system_prompt_prefills_it_once() -> None:
    model = model_for()
    head = random_ids(64, 77)
    prompts = [head + random_ids(2 + i % 5, 300 + i) for i in range(16)]
    params = SamplingParams(max_new_tokens=4, stop_at_eos=False)
    kw = dict(block_size=8, kv_memory=pool(model, 256, 8))
    shared = ServingEngine(model, **kw)
    result = shared.generate(prompts, params)
    own = sum(len(p) - len(head) for p in prompts)
    # the head once (the first request's prompt), then only each other request's own tokens
    assert result.stats.prefill_tokens == len(head) + own
    assert shared.stats().prefill_tokens <= len(head) + own  # tokens the forward computed
    plain = ServingEngine(model, prefix_caching=False, **kw).generate(prompts, params)
    assert [c.token_ids for c in result.completions] == [c.token_ids for c in plain.completions]
    assert not block_problems(shared)
