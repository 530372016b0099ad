"""The engine: cached generation equals the no-cache reference; finishes, streaming, reuse."""

from __future__ import annotations

import pytest
import torch

from toyllm.engine.check.reference import reference_greedy, reference_logits
from toyllm.engine.generate import Engine, GenerationError
from toyllm.engine.sampling import SamplingParams
from toyllm.models.config import ModelConfig
from toyllm.models.llama import build_model

CONFIGS = {
    "gqa": ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, intermediate_size=96, max_seq_len=160),
    "mha_untied": ModelConfig(vocab_size=256, hidden_size=64, num_layers=3, num_heads=4,
                              num_kv_heads=4, intermediate_size=96, max_seq_len=160,
                              tie_embeddings=False),
    "mqa_hd32": ModelConfig(vocab_size=256, hidden_size=96, num_layers=2, num_heads=3,
                            num_kv_heads=1, head_dim=32, intermediate_size=128,
                            max_seq_len=160, tie_embeddings=True),
}
NO_EOS = SamplingParams(max_new_tokens=64, stop_at_eos=False)


def model_for(name: str, seed: int = 0):
    # std 0.2: a random model with peaked logits, so greedy ties are not a coin flip
    model = build_model(CONFIGS[name], seed=seed)
    model.init_weights(seed, std=0.2)
    return model


def prompts(lengths: list[int], vocab: int = 256, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("lengths", [[7], [5, 17, 1]], ids=["batch1", "ragged3"])
def test_cached_greedy_equals_no_cache_reference(name: str, lengths: list[int]) -> None:
    model = model_for(name)
    ps = prompts(lengths)
    result = Engine(model).generate(ps, NO_EOS)
    for p, c in zip(ps, result.completions, strict=True):
        expected, _ = reference_greedy(model, p, 64)
        assert c.token_ids == expected
        assert c.finish_reason == "max_new_tokens"
        assert c.prompt_tokens == len(p) and c.completion_tokens == 64


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_chunked_prefill_gives_the_same_logits_as_whole_prefill(chunk: int) -> None:
    model = model_for("gqa")
    (ids,) = prompts([21])
    whole = Engine(model)
    chunked = Engine(model, prefill_chunk=chunk)
    cache_w = whole.prepare_cache(1, 64)
    cache_c = chunked.prepare_cache(1, 64)
    lw = whole.prefill(cache_w, 0, ids)
    lc = chunked.prefill(cache_c, 0, ids)
    assert (lw - lc).abs().max().item() <= 1e-5
    assert (lw - reference_logits(model, ids)[-1]).abs().max().item() <= 1e-4
    assert cache_c.sequence_position(0) == 21
    n = 21
    assert torch.allclose(cache_w.keys(0)[0, :n], cache_c.keys(0)[0, :n], atol=1e-6)
    tokens_c = chunked.generate([ids], NO_EOS).completions[0].token_ids
    assert tokens_c == whole.generate([ids], NO_EOS).completions[0].token_ids


def test_eos_ends_generation_without_the_eos_token() -> None:
    model = model_for("gqa")
    (ids,) = prompts([6])
    expected, _ = reference_greedy(model, ids, 20)
    eos = expected[4]
    first = expected.index(eos)
    model.config = model.config.with_overrides(eos_id=eos)
    c = Engine(model).generate([ids], SamplingParams(max_new_tokens=20)).completions[0]
    assert c.finish_reason == "eos"
    assert c.token_ids == expected[:first]


def test_full_cache_ends_with_length_not_a_crash() -> None:
    model = model_for("gqa")
    (ids,) = prompts([10])
    engine = Engine(model, max_seq_len=24)
    c = engine.generate([ids], SamplingParams(max_new_tokens=100, stop_at_eos=False))
    comp = c.completions[0]
    assert comp.finish_reason == "length"
    # positions 10..23 are written by the 14 tokens after the first one sampled from prefill
    assert comp.completion_tokens == 24 - 10 + 1
    expected, _ = reference_greedy(model, ids, 100, max_seq_len=24)
    assert comp.token_ids == expected


def test_prompt_that_fills_the_cache_exactly_gets_one_token_and_length() -> None:
    model = model_for("gqa")
    (ids,) = prompts([24])
    comp = Engine(model, max_seq_len=24).generate([ids], NO_EOS).completions[0]
    assert comp.finish_reason == "length" and comp.completion_tokens == 1
    assert comp.token_ids == reference_greedy(model, ids, 1)[0]


def test_ragged_batch_finishes_each_sequence_on_its_own() -> None:
    model = model_for("mqa_hd32")
    ps = prompts([3, 30, 12])
    params = SamplingParams(max_new_tokens=30, stop_at_eos=False)
    result = Engine(model, max_seq_len=40).generate(ps, params)
    reasons = [c.finish_reason for c in result.completions]
    assert reasons == ["max_new_tokens", "length", "length"]
    assert [c.completion_tokens for c in result.completions] == [30, 11, 29]
    for p, c in zip(ps, result.completions, strict=True):
        assert c.token_ids == reference_greedy(model, p, 30, max_seq_len=40)[0]


def test_seeded_sampling_repeats_itself_and_seeds_differ() -> None:
    model = model_for("gqa")
    ps = prompts([4, 9])
    params = dict(max_new_tokens=24, temperature=1.0, top_k=50, top_p=0.9, stop_at_eos=False)
    engine = Engine(model)
    a = engine.generate(ps, SamplingParams(seed=1, **params))
    b = engine.generate(ps, SamplingParams(seed=1, **params))
    c = engine.generate(ps, SamplingParams(seed=2, **params))
    ids = lambda r: [x.token_ids for x in r.completions]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)


def test_engine_reuses_its_cache_across_requests() -> None:
    model = model_for("gqa")
    engine = Engine(model)
    ps = prompts([5, 8])
    first = engine.generate(ps, NO_EOS)
    cache = engine.cache
    second = engine.generate(prompts([3]), NO_EOS)
    third = engine.generate(ps, NO_EOS)
    assert engine.cache is cache  # reset and reused, not reallocated
    assert [c.token_ids for c in third.completions] == [c.token_ids for c in first.completions]
    assert second.completions[0].token_ids == reference_greedy(model, prompts([3])[0], 64)[0]


@pytest.mark.parametrize("bad, message", [
    ([[]], "empty"),
    ([], "no prompts"),
    ([[1] * 200], "context holds 160"),
    ([[1, 999]], r"token ids must be in \[0, 256\)"),
    (["text"], "need a tokenizer"),
])
def test_bad_requests_raise_clear_errors(bad, message: str) -> None:
    with pytest.raises(GenerationError, match=message):
        Engine(model_for("gqa")).generate(bad, NO_EOS)
