"""engine/sampling.py: per-row parameters in one batch (sample_rows), min-p, the repetition
penalty, and the rule that a row's tokens depend on that row alone.

Witnesses: the definitions written out here on hand-made logits (vLLM's and transformers'
rules), transformers' own RepetitionPenaltyLogitsProcessor and MinPLogitsWarper, torch.argmax,
and the same row sampled alone. CUDA equivalents are marked `cuda`.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor

from toyllm.engine.check.reference import reference_logits
from toyllm.engine.generate import Engine
from toyllm.engine.ops.argmax import argmax
from toyllm.engine.sampling import (
    NONFINITE,
    SamplingError,
    SamplingParams,
    _chunked_mass_before,
    _mass_before,
    _top_p_drop,
    _top_p_drop_row,
    apply_repetition_penalty,
    filtered_logits,
    make_generator,
    sample,
    sample_rows,
    seen_mask,
)
from toyllm.models.config import ModelConfig
from toyllm.models.llama import build_model

NAN, INF = float("nan"), float("inf")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

# a mix of what requests ask for: greedy, each filter alone and together, penalties > and < 1
MIX = [
    SamplingParams(),
    SamplingParams(temperature=0.7, top_p=0.9, seed=1),
    SamplingParams(temperature=1.0, top_k=5, min_p=0.1, seed=2),
    SamplingParams(temperature=1.3, repetition_penalty=1.2, seed=3),
    SamplingParams(temperature=0.9, top_p=0.5, min_p=0.05, repetition_penalty=0.8, seed=4),
    SamplingParams(repetition_penalty=1.5),  # greedy with a penalty
    SamplingParams(temperature=2.0, top_k=40, top_p=0.8, seed=2**64 - 1),
    SamplingParams(temperature=1.0, seed=5),
]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _generators(params, device) -> list[torch.Generator | None]:
    return [make_generator(p, torch.device(device)) for p in params]


def _seen(rows: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(0, 40, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(rows)]


# --- SamplingParams ---------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, expected", [
    ("min_p", -0.1, "a number in [0, 1]"), ("min_p", 1.5, "a number in [0, 1]"),
    ("min_p", NAN, "a number in [0, 1]"), ("min_p", INF, "a number in [0, 1]"),
    ("min_p", True, "a number in [0, 1]"), ("min_p", "0.1", "a number in [0, 1]"),
    ("min_p", None, "a number in [0, 1]"),
    ("repetition_penalty", 0, "a finite number > 0"),
    ("repetition_penalty", -1.0, "a finite number > 0"),
    ("repetition_penalty", NAN, "a finite number > 0"),
    ("repetition_penalty", INF, "a finite number > 0"),
    ("repetition_penalty", False, "a finite number > 0"),
    ("repetition_penalty", "1.2", "a finite number > 0"),
    ("repetition_penalty", None, "a finite number > 0"),
])
def test_bad_min_p_and_repetition_penalty_are_refused_naming_field_expected_and_given(
        field: str, value, expected: str) -> None:
    with pytest.raises(SamplingError) as info:
        SamplingParams(**{field: value})
    assert str(info.value) == f"{field}: expected {expected}, got {value!r}"


@pytest.mark.parametrize("field, value", [("min_p", 0), ("min_p", 1), ("min_p", 0.05),
                                          ("repetition_penalty", 1e-3),
                                          ("repetition_penalty", 1), ("repetition_penalty", 100.0)])
def test_edge_values_are_taken_as_given_never_coerced(field: str, value) -> None:
    got = getattr(SamplingParams(**{field: value}), field)
    assert got == value and type(got) is type(value)


def test_defaults_filter_nothing() -> None:
    p = SamplingParams()
    assert (p.min_p, p.repetition_penalty) == (0.0, 1.0)


# --- the repetition penalty ----------------------------------------------------------------

def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    logits = torch.tensor([[2.0, -2.0, 0.0, 3.0, -1.0, 4.0]])
    mask = seen_mask([[0, 1, 2, 0]], [0], 6, torch.device("cpu"))  # token 0 twice: once
    got = apply_repetition_penalty(logits, torch.tensor([2.0]), mask)
    assert torch.equal(got, torch.tensor([[1.0, -4.0, 0.0, 3.0, -1.0, 4.0]]))
    # a penalty below 1 does the opposite: seen tokens become more likely
    got = apply_repetition_penalty(logits, torch.tensor([0.5]), mask)
    assert torch.equal(got, torch.tensor([[4.0, -1.0, 0.0, 3.0, -1.0, 4.0]]))


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_with_a_penalty_picks_what_the_rule_says(device: str) -> None:
    # row 0: token 0 leads (3 > 2) until seen: 3 / 2 = 1.5 < 2; row 1: all negative, token 0
    # leads (-1 > -1.5) until seen: -1 * 2 = -2 < -1.5
    logits = torch.tensor([[3.0, 2.0, -5.0], [-1.0, -1.5, -3.0]], device=device)
    params = [SamplingParams(repetition_penalty=2.0)] * 2
    assert sample_rows(logits, params, [None, None], [[], []]).tolist() == [0, 0]
    assert sample_rows(logits, params, [None, None], [[0], [0]]).tolist() == [1, 1]


@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.3, 7.0])
def test_repetition_penalty_equals_transformers_processor(penalty: float) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=g) * 5
    ids = torch.randint(0, 300, (4, 50), generator=g)  # with repeats
    expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    mask = seen_mask(ids.tolist(), range(4), 300, torch.device("cpu"))
    got = apply_repetition_penalty(logits, torch.full((4,), penalty), mask)
    assert torch.equal(_bits(got), _bits(expected))


def test_a_penalty_of_1_changes_nothing_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 500, generator=g)
    seen = _seen(3, 500, 1)
    mask = seen_mask(seen, range(3), 500, torch.device("cpu"))
    got = apply_repetition_penalty(logits, torch.ones(3), mask)
    assert torch.equal(_bits(got), _bits(logits))
    params = [SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1.0, seed=s)
              for s in range(3)]
    with_seen = sample_rows(logits, params, _generators(params, "cpu"), seen)
    without = sample_rows(logits, params, _generators(params, "cpu"), None)
    assert torch.equal(with_seen, without)


@pytest.mark.parametrize("device", DEVICES)
def test_an_overflowing_penalty_or_temperature_still_gives_a_token(device: str) -> None:
    logits = torch.tensor([[30.0, 20.0, -1.0, 5.0]], device=device)
    for p in (SamplingParams(repetition_penalty=1e-38),
              SamplingParams(temperature=1.0, repetition_penalty=1e-38, seed=0),
              SamplingParams(temperature=1e-5, seed=0)):
        tok = sample_rows(logits * (1e34 if p.temperature == 1e-5 else 1), [p],
                          _generators([p], device), [[0, 1]])
        assert 0 <= tok.item() < 4, p


# --- min-p -----------------------------------------------------------------------------------

def _kept(row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(row > -math.inf).flatten().tolist())


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.3, 0.9])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_min_p_keeps_exactly_the_tokens_with_p_at_least_min_p_times_p_max(
        min_p: float, temperature: float) -> None:
    g = torch.Generator().manual_seed(int(min_p * 100 + temperature * 10))
    logits = torch.randn(6, 200, generator=g) * 3
    params = [SamplingParams(temperature=temperature, min_p=min_p)] * 6
    got = filtered_logits(logits, params)
    probs = (logits.double() / temperature).softmax(-1)
    ratio = probs / probs.amax(-1, keepdim=True)
    clear = ((ratio - min_p).abs() > 1e-4).all(-1)  # rows with no token at the boundary
    assert int(clear.sum()) >= 3
    witness = MinPLogitsWarper(min_p)(None, logits / temperature)
    for r in range(6):
        if clear[r]:
            expected = {i for i in range(200) if probs[r, i] >= min_p * probs[r].max()}
            assert _kept(got[r]) == expected, r
            assert _kept(got[r]) == _kept(witness[r]), r
            kept = sorted(expected)  # kept logits are the scaled ones, untouched
            assert torch.equal(got[r, kept], (logits[r] / temperature)[kept])


def test_min_p_1_keeps_only_the_top_tokens_and_0_changes_nothing_bit_for_bit() -> None:
    logits = torch.tensor([[1.0, 5.0, 5.0, -2.0, 4.99]])
    assert _kept(filtered_logits(logits, [SamplingParams(temperature=1.0, min_p=1.0)])[0]) == \
        {1, 2}
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 333, generator=g)
    got = filtered_logits(logits, [SamplingParams(temperature=0.7, min_p=0.0)] * 4)
    assert torch.equal(_bits(got), _bits(logits / torch.tensor(0.7)))


@pytest.mark.parametrize("vocab", [300, 4096, 32000])
def test_cpu_top_p_among_the_likely_tokens_drops_what_the_whole_sort_drops(vocab: int) -> None:
    # _top_p_drop_row sorts only a row's most likely tokens where they hold top_p of the mass:
    # peaked rows (that path), flat rows (the whole sort), ties at the cut, rows an earlier
    # top-k left mostly at -inf, top_p from tiny to 1
    g = torch.Generator().manual_seed(vocab)
    for trial in range(40):
        scale = [0.3, 2.0, 6.0, 15.0][trial % 4]
        row = torch.randn(vocab, generator=g) * scale
        if trial % 5 == 0:
            row = row.round()  # many ties
        if trial % 7 == 0:
            row[torch.randperm(vocab, generator=g)[: vocab - 40]] = -math.inf  # after top-k
        for top_p in (1e-30, 0.1, 0.5, 0.9, 0.95, 0.999, 1.0):
            p32 = float(torch.tensor(top_p, dtype=torch.float32))
            want = _top_p_drop(row.unsqueeze(0), torch.tensor([p32]))[0]
            got = _top_p_drop_row(row, p32)
            assert torch.equal(got, want), (trial, top_p)


def test_min_p_decides_as_exp_of_the_unclamped_difference_would() -> None:
    # filtered_logits raises logit - max to log(min_p) - 1 before its exp (no underflow); every
    # token is still kept or dropped as exp(logit - max) >= min_p decides, for logits far below
    # the top one and for min_p down to a subnormal, rows without min-p beside them
    g = torch.Generator().manual_seed(11)
    logits = torch.cat([torch.randn(6, 300, generator=g) * 60,
                        torch.linspace(-200, 0, 300).expand(6, 300)], dim=-1)
    min_ps = [1e-40, 1e-30, 6e-39, 0.05, 1.0, 0.0]
    params = [SamplingParams(temperature=1.0, min_p=m) for m in min_ps]
    got = filtered_logits(logits, params)
    for r, m in enumerate(min_ps):
        ratio = (logits[r] - logits[r].max()).exp()
        expected = set(range(600)) if m == 0 else set(
            torch.nonzero(ratio >= torch.tensor(m)).flatten().tolist())
        assert _kept(got[r]) == expected, m


def test_min_p_applies_after_temperature() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 0.0]])
    kept = [len(_kept(filtered_logits(logits, [SamplingParams(temperature=t, min_p=0.2)])[0]))
            for t in (0.25, 1.0, 4.0)]
    assert kept == [1, 2, 4]  # exp(-1/T) >= 0.2 ... hotter keeps more


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_tokens_always_lie_in_the_min_p_set(device: str) -> None:
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(8, 1000, generator=g) * 4).to(device)
    params = [SamplingParams(temperature=1.0, min_p=0.2, seed=s) for s in range(8)]
    allowed = filtered_logits(logits, params) > -math.inf
    gens = _generators(params, device)
    for _ in range(20):
        tokens = sample_rows(logits, params, gens)
        assert allowed[torch.arange(8, device=device), tokens].all()


# --- one row, any neighbours -----------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunked", [False, True], ids=["device-path", "chunked"])
@pytest.mark.parametrize("vocab", [1, 7, 256, 257, 1000, 4097])
def test_prefix_mass_is_the_exclusive_cumsum_and_the_same_bits_in_any_batch(
        device: str, chunked: bool, vocab: int) -> None:
    mass = _chunked_mass_before if chunked else _mass_before
    g = torch.Generator().manual_seed(vocab)
    probs = (torch.rand(300, vocab, generator=g) * 8).softmax(-1).to(device)
    got = mass(probs)
    expected = probs.double().cumsum(-1) - probs.double()
    assert (got.double() - expected).abs().max().item() < 1e-5
    assert torch.equal(got[:, 0], torch.zeros(300, device=device))
    for rows in (1, 2, 3, 17, 64):
        assert torch.equal(_bits(mass(probs[:rows])), _bits(got[:rows])), rows
    assert torch.equal(_bits(mass(probs[5:6])), _bits(got[5:6]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_gives_the_same_tokens_alone_and_beside_rows_with_other_params(
        device: str, dtype: torch.dtype) -> None:
    vocab, rows = 1000, len(MIX)
    g = torch.Generator().manual_seed(7)
    steps = [(torch.randn(rows, vocab, generator=g) * 3).to(device, dtype) for _ in range(6)]
    seen = _seen(rows, vocab, 7)
    together_gens = _generators(MIX, device)
    alone_gens = [_generators([p], device)[0] for p in MIX]
    # the reverse order, each beside other neighbours
    order = list(reversed(range(rows)))
    moved_gens = [_generators([MIX[r]], device)[0] for r in order]
    for step, logits in enumerate(steps):
        together = sample_rows(logits, MIX, together_gens, seen)
        scaled = filtered_logits(logits.float(), MIX)
        moved = sample_rows(logits[order], [MIX[r] for r in order], moved_gens,
                            [seen[r] for r in order])
        for r, p in enumerate(MIX):
            alone = sample_rows(logits[r : r + 1], [p], [alone_gens[r]], [seen[r]])
            assert alone.item() == together[r].item(), (step, r)
            assert torch.equal(_bits(filtered_logits(logits[r : r + 1].float(), [p])),
                               _bits(scaled[r : r + 1])), (step, r)
        assert moved.tolist() == [together[r].item() for r in order], step
        for r, tok in enumerate(together.tolist()):
            seen[r].append(tok)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_rows_are_torch_argmax_beside_sampled_rows(device: str,
                                                          dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(9)
    logits = (torch.randn(len(MIX), 4097, generator=g) * 4).to(device, dtype)
    logits[0, 100] = logits[0, 200] = logits[0].max()  # a tie: the first index wins
    expected = torch.argmax(logits.float(), dim=-1)
    tokens = sample_rows(logits, MIX, _generators(MIX, device), _seen(len(MIX), 4097, 9))
    for r, p in enumerate(MIX):
        if p.greedy and p.repetition_penalty == 1:
            assert tokens[r].item() == expected[r].item(), r
    assert tokens[0].item() == 100
    every_greedy = [SamplingParams()] * len(MIX)
    for kernel in (True, False):
        tokens = sample_rows(logits, every_greedy, [None] * len(MIX), cuda_argmax=kernel)
        assert torch.equal(tokens, expected)
        assert torch.equal(tokens, argmax(logits, kernel=kernel))


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_rows_get_the_flag_and_the_other_rows_their_own_tokens(device: str) -> None:
    g = torch.Generator().manual_seed(11)
    logits = (torch.randn(len(MIX), 300, generator=g) * 2).to(device)
    seen = _seen(len(MIX), 300, 11)
    clean = sample_rows(logits, MIX, _generators(MIX, device), seen)
    bad = logits.clone()
    bad[0, 3], bad[1, 5], bad[4, 0], bad[5, 299] = NAN, INF, -INF, NAN  # greedy and sampled
    tokens = sample_rows(bad, MIX, _generators(MIX, device), seen)
    for r in range(len(MIX)):
        assert tokens[r].item() == (NONFINITE if r in (0, 1, 4, 5) else clean[r].item()), r


# --- bad arguments and the static engine's face -------------------------------------------

@pytest.mark.parametrize("call, message", [
    (lambda x: sample_rows(x, [SamplingParams()], [None, None]),
     "params: expected one per row (2), got 1"),
    (lambda x: sample_rows(x, [SamplingParams()] * 2, [None]),
     "generators: expected one per row (2), got 1"),
    (lambda x: sample_rows(x, [SamplingParams()] * 2, [None] * 2, [[1]]),
     "seen: expected one per row (2), got 1"),
    (lambda x: sample_rows(x, [SamplingParams(), {"temperature": 1}], [None] * 2),
     "params: expected SamplingParams, got dict"),
    (lambda x: sample_rows(x, [SamplingParams(repetition_penalty=1.1)] * 2, [None] * 2),
     "seen: expected each row's prompt and output token ids"),
    (lambda x: sample_rows(x, [SamplingParams(repetition_penalty=1.1)] * 2, [None] * 2,
                           [[1], [10]]), "seen: expected token ids in [0, 10), got 10"),
    (lambda x: sample_rows(x, [SamplingParams(repetition_penalty=1.1)] * 2, [None] * 2,
                           [[-1], [1]]), "seen: expected token ids in [0, 10), got -1"),
    (lambda x: sample_rows(x, [SamplingParams(repetition_penalty=1.1)] * 2, [None] * 2,
                           [[1.5], [1]]), "seen: expected integer token ids, got torch.float32"),
    (lambda x: sample_rows(x[0], [SamplingParams()], [None]), "logits: expected a float"),
    (lambda x: sample_rows(x.long(), [SamplingParams()] * 2, [None] * 2),
     "logits: expected a float"),
    (lambda x: sample(x, SamplingParams(temperature=1.0), [None] * 3),
     "generator: expected at most one per row (2), got 3"),
])
def test_bad_arguments_are_one_clear_error(call, message: str) -> None:
    with pytest.raises(SamplingError) as info:
        call(torch.zeros(2, 10))
    assert message in str(info.value)


def test_sample_is_sample_rows_with_one_params_and_pads_beyond_the_generators() -> None:
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(4, 100, generator=g)
    params = SamplingParams(temperature=1.0, top_k=20, min_p=0.05, repetition_penalty=1.2,
                            seed=3)
    seen = _seen(4, 100, 12)
    gens = [make_generator(params, torch.device("cpu")) for _ in range(3)]
    tokens = sample(logits, params, gens, seen=seen)
    expected = sample_rows(logits[:3], [params] * 3, _generators([params] * 3, "cpu"), seen[:3])
    assert tokens[:3].tolist() == expected.tolist() and tokens[3].item() == 0


# --- the engines -----------------------------------------------------------------------------

CONFIG = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, intermediate_size=96, max_seq_len=96)


@pytest.fixture(scope="module")
def model():
    m = build_model(CONFIG, seed=0)
    m.init_weights(0, std=0.2)
    return m


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(13)
    return [torch.randint(3, 256, (int(torch.randint(2, 12, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


def test_engine_greedy_with_a_penalty_equals_the_rule_on_the_no_cache_reference(model) -> None:
    penalty = 1.8
    for prompt in _prompts(3):
        got = Engine(model).generate([prompt], SamplingParams(
            max_new_tokens=16, repetition_penalty=penalty, stop_at_eos=False))
        seq = list(prompt)
        for _ in range(16):
            logits = reference_logits(model, seq)[-1].clone()
            for t in set(seq):
                logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
            seq.append(int(torch.argmax(logits)))
        assert got.completions[0].token_ids == seq[len(prompt):]
        plain = Engine(model).generate([prompt], SamplingParams(max_new_tokens=16,
                                                                stop_at_eos=False))
        assert len(set(got.completions[0].token_ids)) >= len(set(plain.completions[0].token_ids))


@pytest.mark.parametrize("device", DEVICES)
def test_engine_a_prompt_with_penalty_and_min_p_samples_the_same_alone_and_in_a_batch(
        model, device: str) -> None:
    m = model
    if device == "cuda":
        m = build_model(CONFIG, device="cuda", dtype=torch.float32, seed=0)
        m.load_state_dict(model.state_dict())
    for graph in ([False, True] if device == "cuda" else [False]):
        engine = Engine(m, cuda_graph=graph)
        params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, min_p=0.05,
                                repetition_penalty=1.3, seed=21, stop_at_eos=False)
        batch = _prompts(3)
        together = engine.generate(batch, params).completions
        for i, p in enumerate(batch):
            assert engine.generate([p], params).completions[0].token_ids == \
                together[i].token_ids, (graph, i)


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_rows_draw_torch_multinomials_tokens(device: str) -> None:
    # sample_rows draws as torch.multinomial does for one sample (without its host check):
    # per row, the same token from the same generator state, greedy rows mixed in
    params = [SamplingParams(temperature=0.9, seed=3), SamplingParams(),
              SamplingParams(temperature=1.3, top_k=40, seed=4),
              SamplingParams(temperature=0.7, top_p=0.8, seed=5)]
    g = torch.Generator().manual_seed(21)
    for draw in range(20):
        logits = (torch.randn(len(params), 500, generator=g) * 3).to(device)
        mine = [make_generator(p, torch.device(device)) for p in params]
        theirs = [make_generator(p, torch.device(device)) for p in params]
        for gen in mine + theirs:
            if gen is not None:
                gen.manual_seed(100 + draw)
        tokens = sample_rows(logits, params, mine)
        probs = filtered_logits(logits.float(), params).softmax(dim=-1)
        for r, p in enumerate(params):
            want = logits[r].argmax().item() if p.greedy else \
                torch.multinomial(probs[r:r + 1], 1, generator=theirs[r]).item()
            assert tokens[r].item() == want, (draw, r)
