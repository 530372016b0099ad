"""At run time: per-request seeds (a request's tokens ignore its neighbours), non-finite logits
stop the request naming the step and the row, and extreme sampling numbers are handled."""

from __future__ import annotations

import pytest
import torch

from toyllm.engine.generate import Engine, GenerationError
from toyllm.engine.sampling import SamplingError, SamplingParams
from toyllm.models.config import ModelConfig
from toyllm.models.llama import build_model

CONFIG = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, intermediate_size=96, max_seq_len=96)


@pytest.fixture(scope="module")
def model():
    m = build_model(CONFIG, seed=0)
    m.init_weights(0, std=0.2)
    return m


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (int(torch.randint(1, 12, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 7, 2**64 - 1])
def test_a_prompt_samples_the_same_tokens_alone_and_anywhere_in_a_batch_of_four(
        model, seed: int) -> None:
    engine = Engine(model)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=seed,
                            stop_at_eos=False)
    batch = prompts(4, seed=seed % 1000)
    together = engine.generate(batch, params).completions
    for i, p in enumerate(batch):
        alone = engine.generate([p], params).completions[0]
        assert together[i].token_ids == alone.token_ids, f"prompt {i}"
    # and in another order, next to other neighbours
    moved = engine.generate([batch[3], *prompts(2, seed=99), batch[0]], params).completions
    assert moved[0].token_ids == together[3].token_ids
    assert moved[3].token_ids == together[0].token_ids


def test_seeds_still_differ_and_repeat(model) -> None:
    engine = Engine(model)
    p = prompts(1)
    run = lambda s: engine.generate(p, SamplingParams(max_new_tokens=16, temperature=1.0,  # noqa: E731
                                                      seed=s, stop_at_eos=False))
    assert run(1).completions[0].token_ids == run(1).completions[0].token_ids
    assert run(1).completions[0].token_ids != run(2).completions[0].token_ids


def test_a_temperature_below_1e_5_is_greedy_not_a_crash(model) -> None:
    engine = Engine(model)
    p = prompts(2)
    greedy = engine.generate(p, SamplingParams(max_new_tokens=8, stop_at_eos=False))
    tiny = engine.generate(p, SamplingParams(max_new_tokens=8, temperature=1e-300, seed=1,
                                             stop_at_eos=False))
    assert [c.token_ids for c in tiny.completions] == [c.token_ids for c in greedy.completions]


@pytest.mark.parametrize("field, value", [
    ("seed", -1), ("seed", 2**64), ("seed", 1.5), ("seed", True), ("temperature", float("inf")),
    ("temperature", float("nan")), ("top_p", float("nan")), ("top_p", True),
    ("max_new_tokens", 0), ("top_k", -1),
])
def test_out_of_range_sampling_numbers_are_refused(field: str, value) -> None:
    with pytest.raises(SamplingError, match=field):
        SamplingParams(**{field: value})


def _poisoned(model, token: int, device: str = "cpu"):
    """A copy of the model whose embedding of `token` is NaN: any row that reads it goes NaN."""
    m = build_model(CONFIG, device=device, seed=0)
    m.load_state_dict(model.state_dict())
    with torch.no_grad():
        m.embed_tokens.weight[token] = float("nan")
    return m


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nan_logits_after_prefill_stop_the_request_naming_step_0_and_the_row(
        model, temperature: float) -> None:
    engine = Engine(_poisoned(model, 5))
    params = SamplingParams(max_new_tokens=4, temperature=temperature, seed=0)
    with pytest.raises(GenerationError, match=r"NaN or inf at step 0 \(prefill\), row 1"):
        engine.generate([[10, 11], [12, 5, 13]], params)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nan_logits_during_decode_name_the_decode_step(model, temperature: float) -> None:
    params = SamplingParams(max_new_tokens=6, temperature=temperature, seed=3, stop_at_eos=False)
    first = Engine(model).generate([[10, 11]], params).completions[0].token_ids
    # poison a sampled token seen nowhere before: its embedding is first read by the decode
    # step after the one that sampled it
    fresh = [k for k in range(1, len(first) - 1) if first[k] not in [10, 11, *first[:k]]]
    if not fresh:
        pytest.skip("no fresh token among the sampled ones")
    k = fresh[0]
    with pytest.raises(GenerationError, match=rf"at step {k + 1} \(decode\), row 0"):
        Engine(_poisoned(model, first[k])).generate([[10, 11]], params)


@pytest.mark.cuda
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "cuda-graph"])
def test_on_cuda_a_prompt_samples_the_same_tokens_alone_and_in_a_batch(graph: bool) -> None:
    """On CUDA a batch of 3 runs in a graph bucket of 4 rows: the padding row draws nothing."""
    m = build_model(CONFIG, device="cuda", dtype=torch.float32, seed=0)
    m.init_weights(0, std=0.2)
    engine = Engine(m, cuda_graph=graph)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=50, seed=5,
                            stop_at_eos=False)
    batch = prompts(3, seed=4)
    together = engine.generate(batch, params).completions
    for i, p in enumerate(batch):
        assert engine.generate([p], params).completions[0].token_ids == together[i].token_ids


@pytest.mark.cuda
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "cuda-graph"])
def test_on_cuda_nan_logits_stop_the_request(model, temperature: float, graph: bool) -> None:
    m = _poisoned(model, 5, device="cuda")
    engine = Engine(m, cuda_graph=graph)
    params = SamplingParams(max_new_tokens=4, temperature=temperature, seed=0)
    with pytest.raises(GenerationError, match=r"NaN or inf at step 0 \(prefill\), row 1"):
        engine.generate([[10, 11], [12, 5, 13]], params)


def test_a_top_p_below_fp32_range_keeps_the_most_likely_token(model) -> None:
    engine = Engine(model)
    p = prompts(2)
    greedy = engine.generate(p, SamplingParams(max_new_tokens=6, stop_at_eos=False))
    tiny = engine.generate(p, SamplingParams(max_new_tokens=6, temperature=1.0, top_p=1e-300,
                                             seed=1, stop_at_eos=False))
    assert [c.token_ids for c in tiny.completions] == [c.token_ids for c in greedy.completions]
