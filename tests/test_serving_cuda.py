"""The serving engine on CUDA: the same workloads as tests/test_serving.py against the no-cache
reference and the static Engine in fp32, with pure decode steps replayed from CUDA graphs per
batch bucket and without them; graph replays give the eager step's tokens; fp16/bf16 run
without leaking a block."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import collect_dead_graphs
from test_serving import join_and_leave, model_for, pool, random_ids, shared_prefix

from toyllm.engine.check.serving import Arrival, block_problems, check_serving
from toyllm.engine.generate import Engine
from toyllm.engine.sampling import SamplingParams
from toyllm.engine.serving import ServingEngine

pytestmark = pytest.mark.cuda


def cuda_model(name: str = "gqa", dtype: torch.dtype = torch.float32):
    return model_for(name).to("cuda", dtype)


def many_requests(n: int = 20) -> list[Arrival]:
    """Enough requests to cross the graph buckets 1, 2, 4, 8, 16 and 32 as they join and leave."""
    return [Arrival(random_ids(3 + (7 * i) % 29, 100 + i), 4 + (5 * i) % 23, i // 3)
            for i in range(n)]


@pytest.fixture(autouse=True)
def _graphs_of_dropped_engines_are_collected():
    collect_dead_graphs()
    yield
    collect_dead_graphs()


@pytest.mark.parametrize("cuda_graph", [True, False], ids=["graph", "eager"])
@pytest.mark.parametrize("workload", ["join_and_leave", "shared_prefix", "many"])
def test_fp32_serving_matches_reference_and_static_engine(cuda_graph: bool,
                                                          workload: str) -> None:
    model = cuda_model()
    arrivals = {"join_and_leave": join_and_leave, "shared_prefix": shared_prefix,
                "many": many_requests}[workload]()
    report = check_serving(model, arrivals, block_size=8, token_budget=64,
                           kv_memory=pool(model, 256, 8), cuda_graph=cuda_graph)
    assert report.ok, report.problems
    assert report.max_abs <= 1e-4


def test_fp32_preemption_and_forks_on_cuda() -> None:
    model = cuda_model()
    prompt = random_ids(13, 5)
    workload = [Arrival(prompt, 30, 0), Arrival([], 20, 3, fork_of=0),
                Arrival(random_ids(20, 6), 25, 1), Arrival(random_ids(9, 7), 30, 2)]
    report = check_serving(model, workload, block_size=4, kv_memory=pool(model, 20, 4),
                           cuda_graph=True)
    assert report.ok, report.problems
    assert report.preemptions > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_graph_replays_give_the_eager_tokens(dtype: torch.dtype) -> None:
    # four requests decoding together to the end: every decode step has 4 rows, a bucket, so
    # the graph's products have the eager step's shapes (a padded bucket may round otherwise)
    model = cuda_model("gqa", dtype)
    prompts = [random_ids(n, n) for n in (5, 17, 1, 33)]
    params = SamplingParams(max_new_tokens=24, stop_at_eos=False)
    kw = dict(block_size=16, kv_memory=pool(model, 64, 16))
    graph = ServingEngine(model, cuda_graph=True, **kw)
    eager = ServingEngine(model, cuda_graph=False, **kw)
    a = graph.generate(prompts, params)
    b = eager.generate(prompts, params)
    assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]
    assert not block_problems(graph) and not block_problems(eager)


def test_seeded_sampling_on_cuda_matches_the_static_engine() -> None:
    model = cuda_model()
    prompt = random_ids(11, 1)
    mine = SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.9, seed=1234,
                          stop_at_eos=False)
    static = Engine(model).generate([prompt], mine).completions[0].token_ids
    other = SamplingParams(max_new_tokens=30, temperature=1.1, seed=7, stop_at_eos=False)
    served = ServingEngine(model, block_size=8, kv_memory=pool(model, 64, 8)).generate(
        [random_ids(20, 2), prompt], [other, mine]).completions[1].token_ids
    assert served == static


# --- the overlapped decode steps (ServingEngine(overlap=True), the default on CUDA) ---------

def test_sync_device_does_not_wait_for_the_device() -> None:
    from toyllm.engine.ops.paged_cache import PagedKVCache

    cache = PagedKVCache(num_layers=1, num_blocks=8, block_size=4, num_kv_heads=1, head_dim=8,
                         dtype=torch.float16, device="cuda", max_seqs=2, max_blocks_per_seq=4)
    seq = cache.add_sequence()
    cache.reserve(seq, 6)
    torch.cuda.synchronize()
    torch.cuda._sleep(500_000_000)  # some 0.2 s of device time queued ahead of the copy
    slept = torch.cuda.Event()
    slept.record()
    cache.sync_device()  # staged in pinned memory: returns while the device still sleeps
    assert not slept.query()
    torch.cuda.synchronize()
    assert cache.block_tables()[seq, :2].tolist() == cache.sequence_blocks(seq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_overlapped_graph_steps_give_the_synchronous_tokens(dtype: torch.dtype) -> None:
    # every request queued at once, EOS ignored: each decode step has the same rows with and
    # without the overlap (rows that end are known ahead), so the same graphs replay and the
    # tokens agree bit for bit, bf16 included
    model = cuda_model("gqa", dtype)
    prompts = [random_ids(3 + (7 * i) % 29, 100 + i) for i in range(20)]
    params = [SamplingParams(max_new_tokens=4 + (5 * i) % 23, stop_at_eos=False,
                             temperature=0.0 if i % 3 else 0.9, seed=i) for i in range(20)]
    kw = dict(block_size=8, kv_memory=pool(model, 256, 8), cuda_graph=True)
    sync = ServingEngine(model, overlap=False, **kw)
    ahead = ServingEngine(model, overlap=True, **kw)
    a = sync.generate(prompts, params)
    b = ahead.generate(prompts, params)
    assert [c.token_ids for c in b.completions] == [c.token_ids for c in a.completions]
    assert ahead.stats().steps_ahead > 0 and sync.stats().steps_ahead == 0
    assert not block_problems(sync) and not block_problems(ahead)


@pytest.mark.parametrize("cuda_graph", [True, False], ids=["graph", "eager"])
@pytest.mark.parametrize("workload", ["join_and_leave", "shared_prefix", "many"])
def test_fp32_overlapped_serving_matches_reference_and_static_engine(cuda_graph: bool,
                                                                     workload: str) -> None:
    model = cuda_model()
    arrivals = {"join_and_leave": join_and_leave, "shared_prefix": shared_prefix,
                "many": many_requests}[workload]()
    report = check_serving(model, arrivals, block_size=8, token_budget=64,
                           kv_memory=pool(model, 256, 8), cuda_graph=cuda_graph, overlap=True)
    assert report.ok, report.problems
    assert report.max_abs <= 1e-4
    assert report.steps_ahead > 0


def test_fp32_overlapped_preemption_and_forks_on_cuda() -> None:
    model = cuda_model()
    prompt = random_ids(13, 5)
    workload = [Arrival(prompt, 30, 0), Arrival([], 20, 3, fork_of=0),
                Arrival(random_ids(20, 6), 25, 1), Arrival(random_ids(9, 7), 30, 2)]
    report = check_serving(model, workload, block_size=4, kv_memory=pool(model, 20, 4),
                           cuda_graph=True, overlap=True)
    assert report.ok, report.problems
    assert report.preemptions > 0


def test_overlapped_eos_mid_run_and_aborts_on_cuda() -> None:
    # fp32: a request's EOS leaves its row in the step in flight (dropped), which may put that
    # step in a larger bucket than the synchronous engine's: fp32 keeps the tokens exact
    model = cuda_model()
    prompts = [random_ids(n, 40 + n) for n in (3, 8, 15, 6, 11, 2)]
    kw = dict(block_size=4, kv_memory=pool(model, 128, 4), cuda_graph=True)
    free = ServingEngine(model, **kw).generate(
        prompts, SamplingParams(max_new_tokens=24, stop_at_eos=False))
    eos = free.completions[0].token_ids[5]
    results = []
    for overlap in (False, True):
        engine = ServingEngine(model, overlap=overlap, **kw)
        engine.eos_ids = frozenset({eos})
        done = engine.generate(prompts, SamplingParams(max_new_tokens=24))
        results.append([(c.token_ids, c.finish_reason) for c in done.completions])
        assert not block_problems(engine)
    assert results[0] == results[1]
    assert any(reason == "eos" for _, reason in results[0])
    engine = ServingEngine(model, overlap=True, **kw)
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=30, stop_at_eos=False))
           for p in prompts]
    for _ in range(8):
        engine.step()
    assert engine._ahead is not None  # a step is in flight: the aborts land on its rows
    engine.abort(ids[1])
    engine.abort(ids[4])
    reasons = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    assert reasons[ids[1]] == reasons[ids[4]] == "abort"
    assert sorted(reasons.values()).count("max_new_tokens") == len(prompts) - 2
    assert not block_problems(engine)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_a_step_ahead_is_launched_without_waiting_for_the_device(sampled: bool) -> None:
    # the host's part of a step planned ahead (schedule_ahead, sync_device with blocks entering
    # their tables every 4 tokens, the graph's input buffer and token gather, the replay,
    # sampling, the copy of the tokens) returns while the device is still busy: no host sync
    model = cuda_model("gqa", torch.bfloat16)
    kw = dict(block_size=4, kv_memory=pool(model, 128, 4), cuda_graph=True)
    prompts = [random_ids(n, 90 + n) for n in (5, 9, 3, 12)]
    params = SamplingParams(max_new_tokens=40, stop_at_eos=False, seed=1,
                            temperature=0.8 if sampled else 0.0)
    want = ServingEngine(model, overlap=False, **kw).generate(prompts, params)
    engine = ServingEngine(model, overlap=True, **kw)
    ids = [engine.add_request(p, params) for p in prompts]
    tokens = {rid: [] for rid in ids}
    for _ in range(6):  # the prompts, then the pipeline (its graph bucket captured)
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    for _ in range(8):  # steps ahead, each launched behind 0.2 s of device work
        current = engine._ahead
        assert current is not None
        torch.cuda._sleep(500_000_000)
        slept = torch.cuda.Event()
        slept.record()
        engine._ahead = engine._launch_ahead(current)
        assert engine._ahead is not None and not slept.query()
        for out in engine._take(current):
            tokens[out.request_id] += out.new_token_ids
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    assert [tokens[rid] for rid in ids] == [c.token_ids for c in want.completions]
    assert not block_problems(engine)
