"""toyllm::cpu_decode_step: a whole CPU decode step in one call (engine/ops/cpu_step.py).

The engine at Settings.fusion FULL takes it for CPU decode steps of up to 4 rows; below FULL the
same step runs the separate ops. The two give the same logits and caches bit for bit (compared
as integers) for the stories15M-like shape, GQA, head_dim not a multiple of 8 and odd widths, an
untied head, one row and ragged batches with a finished row, 1 or 2 threads; so does the
operator alone against the separate operators composed here, over random caches, its first
layer (no residual) against a residual of zeros; greedy decoding through it equals the no-cache
reference (fp32: max |logit diff| <= 1e-4, the same tokens for 64 steps). The products' weights
may be bf16: the same bits as fp32 weights of the same values, and the engine narrows exactly
the weights whose values are bf16 values. Bad inputs are
refused with one clear message each before anything is written (the C++ checks; the fake only
gives the output shape: tests/test_op_fakes.py).
"""

from __future__ import annotations

import pytest
import torch
from cpu_decode_models import CONFIGS, model_for, prompts, step_args_over_random_caches
from same_bits import assert_same_bits

from toyllm.engine.check.reference import reference_greedy, reference_logits
from toyllm.engine.forward import layer_weights
from toyllm.engine.generate import Engine
from toyllm.engine.ops import cpu_step
from toyllm.engine.sampling import SamplingParams
from toyllm.engine.settings import Fusion, Settings
from toyllm.models.rope import rope_cos_sin

OPS = torch.ops.toyllm
def counting(monkeypatch) -> list[int]:
    """Counts the calls of the operator through the engine."""
    calls: list[int] = []
    real = cpu_step._op
    monkeypatch.setattr(cpu_step, "_op", lambda *a: calls.append(1) or real(*a))
    return calls


def teacher_forced(
    model, fusion: Fusion, lengths: list[int], steps: int, finished: int | None = None,
    decode_threads: int | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Logits [rows, vocab] of `steps` decode steps fed the same random tokens, after prefilling
    prompts of `lengths` (row `finished` set inactive first), and the caches after them. With
    `decode_threads`, the decode steps run on that many threads (the prefill on the caller's)."""
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
        threads = torch.get_num_threads()
        try:
            if decode_threads is not None:
                torch.set_num_threads(decode_threads)
            for _ in range(steps):
                tokens = torch.randint(3, vocab, (rows,), generator=g)
                logits.append(engine.decode_step(cache, rows, tokens).clone())
        finally:
            torch.set_num_threads(threads)
    return logits, [t.clone() for t in ks + vs]


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("lengths, finished", [([9], None), ([5, 17, 1, 11], 2), ([4, 30], None)],
                         ids=["one_row", "ragged4_finished", "ragged2"])
def test_the_step_gives_the_bits_of_the_separate_ops(name, lengths, finished, monkeypatch):
    model = model_for(name)
    calls = counting(monkeypatch)
    fused, fused_caches = teacher_forced(model, Fusion.FULL, lengths, 6, finished)
    assert len(calls) == 6  # every step, in one call
    calls.clear()
    separate, separate_caches = teacher_forced(model, Fusion.SILU_GEMV, lengths, 6, finished)
    assert not calls
    for a, b in zip(fused, separate, strict=True):
        assert_same_bits(a, b)
    for a, b in zip(fused_caches, separate_caches, strict=True):
        assert_same_bits(a, b)


def test_the_bits_do_not_depend_on_the_number_of_threads():
    # the decode steps on 1 and on 2 threads after the same prefill (on the caller's threads: the
    # prefill's MKL products may round otherwise on another number of threads)
    model = model_for("mha", seed=4)
    one, one_caches = teacher_forced(model, Fusion.FULL, [6, 40], 4, decode_threads=1)
    two, two_caches = teacher_forced(model, Fusion.FULL, [6, 40], 4, decode_threads=2)
    for a, b in zip(one + one_caches, two + two_caches, strict=True):
        assert_same_bits(a, b)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_through_the_step_equals_the_no_cache_reference(name, monkeypatch):
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
    assert len(calls) == 63


def test_engine_generate_takes_the_step_and_matches_the_reference(monkeypatch):
    model = model_for("gqa_hd6", seed=5)
    calls = counting(monkeypatch)
    batch = prompts([5, 12, 3], model.config.vocab_size, seed=6)
    engine = Engine(model, cuda_graph=False, settings=Settings(fusion=Fusion.FULL))
    result = engine.generate(batch, SamplingParams(max_new_tokens=64, stop_at_eos=False))
    for ids, completion in zip(batch, result.completions, strict=True):
        assert completion.token_ids == reference_greedy(model, ids, 64)[0]
    assert len(calls) == 63


@pytest.mark.parametrize("settings, rows", [
    (Settings(fusion=Fusion.SILU_GEMV), 1),  # below FULL: the separate ops
    (Settings(cpu_gemv=False), 1),  # MKL's products (input-major weights)
    (Settings(decode_attention="sdpa"), 1),  # SDPA attention
    (Settings(), 5),  # more rows than the GEMV takes: MKL's products
], ids=["silu_gemv", "mkl", "sdpa", "five_rows"])
def test_the_separate_ops_run_where_the_step_does_not_apply(settings, rows, monkeypatch):
    model = model_for("mha", seed=7)
    calls = counting(monkeypatch)
    engine = Engine(model, cuda_graph=False, settings=settings)
    batch = prompts([4] * rows, model.config.vocab_size, seed=8)
    result = engine.generate(batch, SamplingParams(max_new_tokens=8, stop_at_eos=False))
    assert not calls
    logits = reference_logits(model, batch[0] + result.completions[0].token_ids[:-1])
    assert result.completions[0].token_ids == logits[len(batch[0]) - 1:].argmax(-1).tolist()


# ---------------------------------------------------------------------------------------------
# the operator alone against the separate operators, over random caches


def separate_layer(x, residual, input_norm, qkv_w, o_w, post_norm, gate_up_w, down_w, eps, cos,
                   sin, k_cache, v_cache, positions, hq) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer through the separate operators the engine's unfused CPU decode layer calls
    (engine/forward.py below FULL), K/V written into the caches given: (s2, the MLP's output)."""
    rows, d, hkv = x.shape[0], k_cache.shape[-1], k_cache.shape[2]
    s, h = OPS.add_rms_norm(x, residual, input_norm, eps)
    qkv = OPS.gemv(h, qkv_w).view(rows, 1, hq + 2 * hkv, d)
    q = OPS.rope_kv_update(qkv, cos, sin, k_cache, v_cache, positions, hq)
    lens = (positions.clamp(min=0) + 1).to(torch.int32)
    a = OPS.decode_attention(q.reshape(rows, hq, d).contiguous(), k_cache, v_cache, lens,
                             d ** -0.5)
    s2, h2 = OPS.add_rms_norm(s, OPS.gemv(a.reshape(rows, 1, hq * d), o_w), post_norm, eps)
    return s2, OPS.gemv(OPS.silu_mul(OPS.gemv(h2, gate_up_w)), down_w)


def separate_step(args: list) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The step's arguments through the separate operators, on copies of the caches: (logits
    [rows, 1, vocab], the caches, K then V). The first layer adds a residual of zeros, which
    changes no bit of the operator's first layer, which has none."""
    tokens, embedding, weights, final_norm, head, eps, inv_freq, ks, vs, positions, hq = args
    ks, vs = [k.clone() for k in ks], [v.clone() for v in vs]
    x = embedding[tokens.view(-1)].unsqueeze(1)  # [rows, 1, hidden]
    cos, sin = rope_cos_sin(inv_freq, positions.clamp(min=0).long()[:, None], torch.float32)
    residual = torch.zeros_like(x)
    for i, (k_cache, v_cache) in enumerate(zip(ks, vs, strict=True)):
        x, residual = separate_layer(x, residual, *weights[6 * i : 6 * i + 6], eps, cos, sin,
                                     k_cache, v_cache, positions, hq)
    _, h = OPS.add_rms_norm(x, residual, final_norm, eps)
    return OPS.gemv(h, head), ks + vs


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("rows, positions", [(1, [9]), (4, [5, 17, -1, 11]), (2, [4, 30])],
                         ids=["one_row", "ragged4_finished", "ragged2"])
def test_the_operator_gives_the_bits_of_the_separate_ops(name, rows, positions):
    args = step_args_over_random_caches(name, rows, positions)
    want_logits, want_caches = separate_step(args)
    got = OPS.cpu_decode_step(*args)
    assert_same_bits(got, want_logits)
    for a, b in zip(args[7] + args[8], want_caches, strict=True):
        assert_same_bits(a, b)


# ---------------------------------------------------------------------------------------------
# the operator alone: arguments from a real model, then each argument spoiled

TOKENS, EMBEDDING, WEIGHTS, FINAL_NORM, HEAD, EPS, INV_FREQ, K, V, POSITIONS, HEADS = range(11)


def step_args(rows: int = 2, seed: int = 9) -> list:
    """The operator's arguments for the gqa_hd6 model (2 layers, caches of 16 positions), rows
    at positions 3, 7, ..."""
    config = CONFIGS["gqa_hd6"]
    model = model_for("gqa_hd6", seed=seed)
    weights = [t.detach() for w in layer_weights(model) for t in vars(w).values()]
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (rows, 1), generator=g)
    positions = torch.arange(rows, dtype=torch.int32) * 4 + 3
    shape = (rows, 16, config.num_kv_heads, config.head_dim)
    ks = [torch.randn(shape, generator=g) for _ in range(config.num_layers)]
    vs = [torch.randn(shape, generator=g) for _ in range(config.num_layers)]
    return [tokens, model.embed_tokens.weight.detach(), weights, model.norm.weight.detach(),
            model.lm_head.weight.detach(), config.norm_eps, model.inv_freq, ks, vs, positions,
            config.num_heads]


def test_the_wrappers_direct_call_is_the_operator():
    """cpu_step.cpu_decode_step calls the operator's C++ function without the dispatcher: the
    same logits and caches bit for bit, and the same refusal before anything is written."""
    args = step_args()
    again = [*args[:K], [t.clone() for t in args[K]], [t.clone() for t in args[V]], *args[V + 1:]]
    assert_same_bits(cpu_step.cpu_decode_step(*args), OPS.cpu_decode_step(*again))
    for a, b in zip(args[K] + args[V], again[K] + again[V], strict=True):
        assert_same_bits(a, b)
    args[POSITIONS] = torch.tensor([3, 16], dtype=torch.int32)  # past the caches' 16 positions
    before = [t.clone() for t in args[K] + args[V]]
    with pytest.raises(ValueError, match=r"^cpu_decode_step, layer 0: expected positions\[1\]"):
        cpu_step.cpu_decode_step(*args)
    for t, b in zip(args[K] + args[V], before, strict=True):
        assert torch.equal(t, b)


def test_opcheck_accepts_the_operator():
    torch.library.opcheck(OPS.cpu_decode_step.default, step_args(),
                          test_utils=("test_schema", "test_faketensor"))


def _bad_cases():
    args = step_args()

    def but(i, value):
        bad = list(args)
        bad[i] = value
        return bad

    def but_weight(j, value):
        weights = list(args[WEIGHTS])
        weights[j] = value
        return but(WEIGHTS, weights)

    yield "expected tokens of dtype torch.int64, got torch.int32", but(TOKENS, args[0].int())
    yield r"expected tokens of shape \[rows, 1\]", but(TOKENS, args[0].view(1, 2))
    yield r"expected token ids in \[0, 301\) \(embedding's rows\), got 301 at row 1", but(
        TOKENS, torch.tensor([[0], [301]]))
    yield "expected token ids in .* got -1 at row 0", but(TOKENS, torch.tensor([[-1], [2]]))
    yield "expected embedding of dtype torch.float32, got torch.float64", but(
        EMBEDDING, args[1].double())
    yield r"expected 12 layer_weights \(6 a layer", but(WEIGHTS, args[2][:-1])
    yield "expected 2 v_caches", but(V, args[8][:1])
    yield "expected one k_cache per layer", but(K, [])
    yield r"layer 1: expected qkv_weight of shape \[60, 36\]", but_weight(
        7, args[2][7][:-6])
    yield r"layer 0: expected input_norm of shape \[36\]", but_weight(
        0, args[2][0][:-1])
    yield ("layer 1: expected down_weight of dtype torch.float32 or torch.bfloat16, got "
           "torch.float16"), but_weight(11, args[2][11].half())
    yield r"layer 0: expected o_weight of shape \[36, 36\]", but_weight(2, args[2][2][:, :30])
    yield "layer 1: expected down_weight of shape", but_weight(11, args[2][11][:-1])
    yield r"layer 0: expected gate_up_weight of shape \[100, 36\]", but_weight(
        4, args[2][4][:-2])
    yield ("layer 1: expected gate_up_weight of dtype torch.float32 or torch.bfloat16, got "
           "torch.float64"), but_weight(10, args[2][10].double())
    # the products' weights may be bf16, the norms may not
    yield "layer 0: expected input_norm of dtype torch.float32, got torch.bfloat16", but_weight(
        0, args[2][0].bfloat16())
    yield "expected final_norm of dtype torch.float32, got torch.bfloat16", but(
        FINAL_NORM, args[3].bfloat16())
    yield "expected head_weight of dtype torch.float32 or torch.bfloat16, got torch.float16", but(
        HEAD, args[4].half())
    yield r"layer 0: expected k_cache of shape \[2, max_seq_len", but(K, [args[7][0][:1],
                                                                         args[7][1]])
    yield "layer 1: expected v_cache of k_cache's shape", but(V, [args[8][0],
                                                                args[8][1][..., :4]])
    yield "layer 1: expected v_cache of dtype torch.float32, got torch.bfloat16", but(
        V, [args[8][0], args[8][1].bfloat16()])
    yield "expected a finite eps >= 0, got nan", but(EPS, float("nan"))
    yield "layer 0: expected num_q_heads to be a positive multiple of num_kv_heads 2", but(
        HEADS, 5)
    yield r"expected final_norm of shape \[36\]", but(FINAL_NORM, args[3][:-1])
    yield r"expected head_weight of shape \[vocab, 36\]", but(HEAD, args[4][:, :-1])
    yield r"expected inv_freq of shape \[3\] \(head_dim / 2\)", but(INV_FREQ, args[6][:-1])
    yield "expected positions of dtype torch.int32, got torch.int64", but(POSITIONS,
                                                                          args[9].long())
    yield r"expected positions of shape \[2\]", but(POSITIONS, args[9][:1])
    yield r"layer 0: expected positions\[1\] \+ 1 <= max_seq_len 16", but(
        POSITIONS, torch.tensor([3, 16], dtype=torch.int32))


@pytest.mark.parametrize("message, args", list(_bad_cases()), ids=lambda v: str(v)[:40])
def test_bad_inputs_are_refused_before_anything_is_written(message, args):
    before = [t.clone() for t in args[K] + args[V]]
    # a layer's own argument is named with its layer
    prefix = "^cpu_decode_step, " if message.startswith("layer") else "^cpu_decode_step: "
    with pytest.raises(ValueError, match=prefix + message):
        OPS.cpu_decode_step(*args)
    for t, b in zip(args[K] + args[V], before, strict=True):
        assert torch.equal(t, b)


@pytest.mark.parametrize("index, why", [(TOKENS, "tokens"), (EMBEDDING, "embedding"),
                                        (HEAD, "head_weight")])
def test_non_contiguous_inputs_are_refused(index, why):
    args = step_args()
    t = args[index]
    # same values, other strides (tokens [rows, 1]: every other element of [rows, 2])
    args[index] = (t.repeat(1, 2)[:, :1] if index == TOKENS
                   else t.transpose(0, -1).contiguous().transpose(0, -1))
    with pytest.raises(ValueError, match=f"cpu_decode_step: expected a contiguous {why}"):
        OPS.cpu_decode_step(*args)


def _other_strides(t: torch.Tensor) -> torch.Tensor:
    """The same values as t with other strides (not contiguous)."""
    return t.transpose(0, -1).contiguous().transpose(0, -1)


@pytest.mark.parametrize("which", ["qkv_weight", "k_cache"])
def test_non_contiguous_layer_inputs_are_refused(which):
    args = step_args()
    if which == "qkv_weight":
        weights = list(args[WEIGHTS])
        weights[1] = _other_strides(weights[1])  # layer 0's q/k/v product
        args[WEIGHTS] = weights
    else:
        args[K] = [_other_strides(args[K][0]), args[K][1]]
    with pytest.raises(ValueError,
                       match=f"cpu_decode_step, layer 0: expected a contiguous {which}"):
        OPS.cpu_decode_step(*args)


# ---------------------------------------------------------------------------------------------
# bf16 weights: the products' weights read in bf16, the fp32 step's bits on their values

PRODUCTS = (1, 2, 4, 5)  # qkv, o, gate_up, down in each layer's six


def _bf16_valued(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().float()


@pytest.mark.parametrize("rows", [1, 2, 4])
def test_bf16_weights_give_the_bits_of_their_values_in_fp32(rows):
    # gqa_hd6's widths (hidden 36, intermediate 50) end every weight row in a partial vector
    args = step_args(rows=rows)
    args[WEIGHTS] = [_bf16_valued(w) if j % 6 in PRODUCTS else w
                     for j, w in enumerate(args[WEIGHTS])]
    args[HEAD] = _bf16_valued(args[HEAD])
    narrow = [*args[:K], [t.clone() for t in args[K]], [t.clone() for t in args[V]],
              *args[V + 1:]]
    narrow[WEIGHTS] = [w.bfloat16() if j % 6 in PRODUCTS else w
                       for j, w in enumerate(args[WEIGHTS])]
    narrow[HEAD] = args[HEAD].bfloat16()
    assert_same_bits(OPS.cpu_decode_step(*narrow), OPS.cpu_decode_step(*args))
    for a, b in zip(narrow[K] + narrow[V], args[K] + args[V], strict=True):
        assert_same_bits(a, b)


def test_bf16_if_exact_narrows_only_weights_of_bf16_values():
    w = _bf16_valued(torch.randn(64, 40))
    narrow = cpu_step.bf16_if_exact(w)
    assert narrow.dtype == torch.bfloat16 and torch.equal(narrow.float(), w)
    off = w.clone()
    off[63, 39] = 1.0 + 2.0**-20  # one value that bf16 cannot hold
    assert cpu_step.bf16_if_exact(off) is off
    transposed, half = w.t(), w.half()  # not contiguous; not fp32: each kept as it is
    assert cpu_step.bf16_if_exact(transposed) is transposed
    assert cpu_step.bf16_if_exact(half) is half


def test_the_engine_reads_bf16_valued_weights_in_bf16_with_the_same_bits(monkeypatch):
    model = model_for("gqa_hd6", seed=7)
    plain = Engine(model, cuda_graph=False, settings=Settings(fusion=Fusion.FULL))
    assert {t.dtype for t in plain.forward._step_weights} == {torch.float32}  # random fp32
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(_bf16_valued(p))
    engine = Engine(model, cuda_graph=False, settings=Settings(fusion=Fusion.FULL))
    weights = engine.forward._step_weights
    assert [t.dtype for j, t in enumerate(weights) if j % 6 in PRODUCTS] == (
        [torch.bfloat16] * (len(weights) // 6 * 4))
    assert engine.forward._step_head[2].dtype == torch.bfloat16  # the head
    calls = counting(monkeypatch)
    fused, fused_caches = teacher_forced(model, Fusion.FULL, [5, 17, 1, 11], 6, finished=2)
    assert len(calls) == 6
    separate, separate_caches = teacher_forced(model, Fusion.SILU_GEMV, [5, 17, 1, 11], 6,
                                               finished=2)
    for a, b in zip(fused + fused_caches, separate + separate_caches, strict=True):
        assert_same_bits(a, b)


def test_the_separate_products_read_the_same_bf16_copies(monkeypatch):
    # the serving engine's steps that carry prefill chunks run the separate operators: with a
    # token budget of 3 each has at most 3 tokens, whose products take the GEMV and read the
    # step's bf16 copies (Gemv.narrow); its greedy tokens are the no-cache reference's
    from toyllm.engine.serving import ServingEngine

    model = model_for("gqa_hd6", seed=8)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(_bf16_valued(p))
    engine = ServingEngine(model, block_size=8, kv_memory=2**20, token_budget=3)
    narrow = engine.forward.gemv.narrow
    assert len(narrow) == 4 * model.config.num_layers + 1  # every product and the head
    assert {t.dtype for t in narrow.values()} == {torch.bfloat16}
    read: list[torch.dtype] = []
    real = OPS.gemv.default
    monkeypatch.setattr("toyllm.engine.ops.gemv._gemv",
                        lambda x, w: read.append(w.dtype) or real(x, w))
    batch = prompts([5, 12], model.config.vocab_size, seed=9)
    result = engine.generate(batch, SamplingParams(max_new_tokens=16, stop_at_eos=False))
    for ids, completion in zip(batch, result.completions, strict=True):
        assert completion.token_ids == reference_greedy(model, ids, 16)[0]
    assert read and set(read) == {torch.bfloat16}


def test_a_finished_row_writes_nothing_and_the_others_write_their_position():
    args = step_args()
    args[POSITIONS] = torch.tensor([-1, 5], dtype=torch.int32)
    before = [t.clone() for t in args[K] + args[V]]
    logits = OPS.cpu_decode_step(*args)
    assert logits.shape == (2, 1, CONFIGS["gqa_hd6"].vocab_size)
    for t, b in zip(args[K] + args[V], before, strict=True):
        assert torch.equal(t[0], b[0])
        changed = (t[1] != b[1]).flatten(1).any(1)
        assert changed.tolist() == [p == 5 for p in range(16)]


def _on_cuda(args: list, name: str) -> tuple[list, str]:
    """args with `name` moved to CUDA ("all": every tensor), and the start of the message."""
    args = list(args)
    if name == "all":
        return ([[t.cuda() for t in a] if isinstance(a, list) else
                 a.cuda() if isinstance(a, torch.Tensor) else a for a in args],
                "cpu_decode_step: expected tokens")
    if name == "embedding":
        args[EMBEDDING] = args[EMBEDDING].cuda()
        return args, "cpu_decode_step: expected embedding"
    if name == "k_cache":
        args[K] = [args[K][0].cuda(), args[K][1]]
        return args, "cpu_decode_step, layer 0: expected k_cache"
    weights = list(args[WEIGHTS])
    j = {"qkv_weight": 1, "post_norm": 3}[name]
    weights[j] = weights[j].cuda()
    args[WEIGHTS] = weights
    return args, f"cpu_decode_step, layer 0: expected {name}"


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["all", "embedding", "k_cache", "qkv_weight", "post_norm"])
def test_cuda_tensors_are_refused_naming_the_device(name):
    args, message = _on_cuda(step_args(), name)
    with pytest.raises(ValueError, match=f"^{message} on the CPU, got cuda"):
        OPS.cpu_decode_step(*args)
