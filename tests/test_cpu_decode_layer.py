"""toyllm::cpu_decode_layer: a whole CPU decode layer in one call (engine/ops/cpu_layer.py).

The engine at Settings.fusion FULL takes it for CPU decode steps of up to 4 rows; below FULL the
same step runs the separate ops. The two give the same logits and caches bit for bit (compared
as integers) for the stories15M-like shape, GQA, head_dim not a multiple of 8 and odd widths, one
row and ragged batches with a finished row, 1 or 2 threads; greedy decoding through it equals the
no-cache reference (fp32: max |logit diff| <= 1e-4, the same tokens for 64 steps). Bad inputs are
refused with one clear message each before anything is written (the C++ checks; the fake
implementation only gives the output shapes: tests/test_op_fakes.py).
"""

from __future__ import annotations

import pytest
import torch
from same_bits import assert_same_bits

from toyllm.engine.check.reference import reference_greedy, reference_logits
from toyllm.engine.forward import layer_weights
from toyllm.engine.generate import Engine
from toyllm.engine.ops import cpu_layer
from toyllm.engine.sampling import SamplingParams
from toyllm.engine.settings import Fusion, Settings
from toyllm.models.config import ModelConfig
from toyllm.models.llama import build_model
from toyllm.models.rope import inverse_frequencies, rope_cos_sin

OPS = torch.ops.toyllm
CONFIGS = {
    # stories15M's proportions, smaller: MHA, head_dim 48
    "mha": ModelConfig(vocab_size=320, hidden_size=96, num_layers=3, num_heads=2,
                       num_kv_heads=2, intermediate_size=256, max_seq_len=96),
    # GQA with head_dim 6 (not a multiple of 8), odd widths everywhere
    "gqa_hd6": ModelConfig(vocab_size=301, hidden_size=36, num_layers=2, num_heads=6,
                           num_kv_heads=2, intermediate_size=50, max_seq_len=96),
    # MQA, head_dim 10, untied head
    "mqa_hd10": ModelConfig(vocab_size=257, hidden_size=30, num_layers=2, num_heads=3,
                            num_kv_heads=1, head_dim=10, intermediate_size=33, max_seq_len=96,
                            tie_embeddings=False),
}


def model_for(name: str, seed: int = 0):
    model = build_model(CONFIGS[name], seed=seed)
    model.init_weights(seed, std=0.2)  # peaked logits: greedy ties are not a coin flip
    return model


def prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def counting(monkeypatch) -> list[int]:
    """Counts the calls of the operator through the engine."""
    calls: list[int] = []
    real = cpu_layer._op
    monkeypatch.setattr(cpu_layer, "_op", lambda *a: calls.append(1) or real(*a))
    return calls


def teacher_forced(model, fusion: Fusion, lengths: list[int], steps: int,
                   finished: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Logits [rows, vocab] of `steps` decode steps fed the same random tokens, after prefilling
    prompts of `lengths` (row `finished` set inactive first), and the caches after them."""
    engine = Engine(model, cuda_graph=False, settings=Settings(fusion=fusion, cpu_gemv=True))
    rows, vocab = len(lengths), model.config.vocab_size
    cache = engine.prepare_cache(rows, max(lengths) + steps)
    logits = []
    with torch.inference_mode():
        for r, ids in enumerate(prompts(lengths, vocab)):
            engine.prefill(cache, r, ids)
        if finished is not None:
            cache.set_active(finished, False)
        ks, vs, positions = engine.cache_views(rows)
        if finished is not None:
            assert positions[finished].item() == -1  # the finished row is exercised
        g = torch.Generator().manual_seed(3)
        for _ in range(steps):
            tokens = torch.randint(3, vocab, (rows,), generator=g)
            logits.append(engine.decode_step(cache, rows, tokens).clone())
    return logits, [t.clone() for t in ks + vs]


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("lengths, finished", [([9], None), ([5, 17, 1, 11], 2), ([4, 30], None)],
                         ids=["one_row", "ragged4_finished", "ragged2"])
def test_fused_layer_gives_the_bits_of_the_separate_ops(name, lengths, finished, monkeypatch):
    model = model_for(name)
    calls = counting(monkeypatch)
    fused, fused_caches = teacher_forced(model, Fusion.FULL, lengths, 6, finished)
    assert len(calls) == 6 * model.config.num_layers  # every layer of every step, in one call
    calls.clear()
    separate, separate_caches = teacher_forced(model, Fusion.SILU_GEMV, lengths, 6, finished)
    assert not calls
    for a, b in zip(fused, separate, strict=True):
        assert_same_bits(a, b)
    for a, b in zip(fused_caches, separate_caches, strict=True):
        assert_same_bits(a, b)


def test_the_bits_do_not_depend_on_the_number_of_threads():
    model = model_for("mha", seed=4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, one_caches = teacher_forced(model, Fusion.FULL, [6, 40], 4)
        torch.set_num_threads(2)
        two, two_caches = teacher_forced(model, Fusion.FULL, [6, 40], 4)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one + one_caches, two + two_caches, strict=True):
        assert_same_bits(a, b)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_through_the_fused_layer_equals_the_no_cache_reference(name, monkeypatch):
    model = model_for(name, seed=1)
    calls = counting(monkeypatch)
    engine = Engine(model, cuda_graph=False, settings=Settings(fusion=Fusion.FULL))
    (ids,) = prompts([7], model.config.vocab_size, seed=2)
    expected, expected_logits = reference_greedy(model, ids, 64)
    cache = engine.prepare_cache(1, len(ids) + 64)
    with torch.inference_mode():
        logits = engine.prefill(cache, 0, ids)
        got = []
        for step in range(64):
            if step:
                logits = engine.decode_step(cache, 1, torch.tensor([got[-1]]))[0]
            diff = (logits - expected_logits[step]).abs().max().item()
            assert diff <= 1e-4, f"step {step}: max |logit diff| {diff}"
            got.append(int(logits.argmax()))
    assert got == expected
    assert len(calls) == 63 * model.config.num_layers


def test_engine_generate_takes_the_fused_layer_and_matches_the_reference(monkeypatch):
    model = model_for("gqa_hd6", seed=5)
    calls = counting(monkeypatch)
    batch = prompts([5, 12, 3], model.config.vocab_size, seed=6)
    engine = Engine(model, cuda_graph=False, settings=Settings(fusion=Fusion.FULL))
    result = engine.generate(batch, SamplingParams(max_new_tokens=64, stop_at_eos=False))
    for ids, completion in zip(batch, result.completions, strict=True):
        assert completion.token_ids == reference_greedy(model, ids, 64)[0]
    assert len(calls) == 63 * model.config.num_layers


@pytest.mark.parametrize("settings, rows", [
    (Settings(fusion=Fusion.SILU_GEMV), 1),  # below FULL: the separate ops
    (Settings(cpu_gemv=False), 1),  # MKL's products (input-major weights)
    (Settings(decode_attention="sdpa"), 1),  # SDPA attention
    (Settings(), 5),  # more rows than the GEMV takes: MKL's products
], ids=["silu_gemv", "mkl", "sdpa", "five_rows"])
def test_the_separate_ops_run_where_the_fused_layer_does_not_apply(settings, rows, monkeypatch):
    model = model_for("mha", seed=7)
    calls = counting(monkeypatch)
    engine = Engine(model, cuda_graph=False, settings=settings)
    batch = prompts([4] * rows, model.config.vocab_size, seed=8)
    result = engine.generate(batch, SamplingParams(max_new_tokens=8, stop_at_eos=False))
    assert not calls
    logits = reference_logits(model, batch[0] + result.completions[0].token_ids[:-1])
    assert result.completions[0].token_ids == logits[len(batch[0]) - 1:].argmax(-1).tolist()


# ---------------------------------------------------------------------------------------------
# the operator alone: arguments from a real layer, then each argument spoiled


def layer_args(rows: int = 2, seed: int = 9) -> list:
    """The operator's arguments for layer 1 of the gqa_hd6 model, rows at positions 3, 7, ..."""
    config = CONFIGS["gqa_hd6"]
    model = model_for("gqa_hd6", seed=seed)
    w = layer_weights(model)[1]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 1, config.hidden_size, generator=g)
    residual = torch.randn(rows, 1, config.hidden_size, generator=g)
    positions = torch.arange(rows, dtype=torch.int32) * 4 + 3
    cos, sin = rope_cos_sin(inverse_frequencies(config), positions.long()[:, None], torch.float32)
    shape = (rows, 16, config.num_kv_heads, config.head_dim)
    k_cache, v_cache = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return [x, residual, w.input_norm.detach(), w.qkv.detach(), w.o.detach(),
            w.post_norm.detach(), w.gate_up.detach(), w.down.detach(), config.norm_eps, cos, sin,
            k_cache, v_cache, positions, config.num_heads]


def test_opcheck_accepts_the_operator():
    torch.library.opcheck(OPS.cpu_decode_layer.default, layer_args(),
                          test_utils=("test_schema", "test_faketensor"))


def _bad_cases():
    args = layer_args()

    def but(i, value):
        bad = list(args)
        bad[i] = value
        return bad

    yield "expected x of dtype torch.float32, got torch.float64", but(0, args[0].double())
    yield r"expected x of shape \[rows, 1, hidden\]", but(0, args[0].expand(2, 2, 36))
    yield "expected residual of x's shape", but(1, args[1][..., :8])
    yield "expected residual of dtype torch.float32, got torch.float16", but(1, args[1].half())
    yield r"expected input_norm of shape \[36\]", but(2, args[2][:-1])
    yield "expected a finite eps >= 0, got nan", but(8, float("nan"))
    yield r"expected k_cache of shape \[2, max_seq_len", but(11, args[11][:1])
    yield "expected v_cache of k_cache's shape", but(12, args[12][..., :4])
    yield "expected v_cache of dtype torch.float32, got torch.bfloat16", but(
        12, args[12].bfloat16())
    yield "expected num_q_heads to be a positive multiple of num_kv_heads 2", but(14, 5)
    yield r"expected qkv_weight of shape \[60, 36\]", but(3, args[3][:-6])
    yield r"expected o_weight of shape \[36, 36\]", but(4, args[4][:, :30])
    yield "expected down_weight of shape", but(7, args[7][:-1])
    yield r"expected gate_up_weight of shape \[100, 36\]", but(6, args[6][:-2])
    yield "expected gate_up_weight of dtype torch.float32, got torch.float64", but(
        6, args[6].double())
    yield r"expected cos of shape \[2, 1, 1, 6\]", but(9, args[9][:1])
    yield r"expected sin of shape \[2, 1, 1, 6\]", but(10, args[10][..., :4])
    yield "expected positions of dtype torch.int32, got torch.int64", but(13, args[13].long())
    yield r"expected positions of shape \[2\]", but(13, args[13][:1])


@pytest.mark.parametrize("message, args", list(_bad_cases()), ids=lambda v: str(v)[:40])
def test_bad_inputs_are_refused_before_anything_is_written(message, args):
    k_before, v_before = args[11].clone(), args[12].clone()
    with pytest.raises(ValueError, match=f"^cpu_decode_layer: {message}"):
        OPS.cpu_decode_layer(*args)
    if args[11].device.type == "cpu" and args[11].shape == k_before.shape:
        assert torch.equal(args[11], k_before) and torch.equal(args[12], v_before)


@pytest.mark.parametrize("index, why", [
    (0, "x"), (3, "qkv_weight"), (11, "k_cache"),
])
def test_non_contiguous_inputs_are_refused(index, why):
    args = layer_args()
    t = args[index]
    args[index] = t.transpose(0, -1).contiguous().transpose(0, -1)  # same values, other strides
    with pytest.raises(ValueError, match=f"cpu_decode_layer: expected a contiguous {why}"):
        OPS.cpu_decode_layer(*args)


def test_a_position_past_the_cache_is_refused_before_anything_is_written():
    args = layer_args()
    args[13] = torch.tensor([3, 16], dtype=torch.int32)  # the cache holds 16 positions
    k_before = args[11].clone()
    with pytest.raises(ValueError, match=r"expected positions\[1\] \+ 1 <= max_seq_len 16"):
        OPS.cpu_decode_layer(*args)
    assert torch.equal(args[11], k_before)


def test_a_finished_row_writes_nothing_and_the_others_write_their_position():
    args = layer_args()
    args[13] = torch.tensor([-1, 5], dtype=torch.int32)
    k_before, v_before = args[11].clone(), args[12].clone()
    OPS.cpu_decode_layer(*args)
    assert torch.equal(args[11][0], k_before[0]) and torch.equal(args[12][0], v_before[0])
    changed = (args[11][1] != k_before[1]).flatten(1).any(1)
    assert changed.tolist() == [p == 5 for p in range(16)]


@pytest.mark.cuda
@pytest.mark.parametrize("index, name", [(0, "x"), (11, "k_cache"), (3, "qkv_weight"),
                                         (5, "post_norm")])
def test_cuda_tensors_are_refused_naming_the_device(index, name):
    args = layer_args()
    if index == 0:  # all on CUDA
        args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    else:  # one argument on CUDA, the rest on the CPU
        args[index] = args[index].cuda()
    with pytest.raises(ValueError, match=f"cpu_decode_layer: expected {name} on the CPU, got cuda"):
        OPS.cpu_decode_layer(*args)
