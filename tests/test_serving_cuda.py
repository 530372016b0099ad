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
