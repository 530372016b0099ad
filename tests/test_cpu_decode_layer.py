"""toyllm::cpu_decode_layer: a whole CPU decode layer in one call (engine/ops/cpu_layer.py).

Its math (csrc/layer/decode_layer_fp32.h) is what toyllm::cpu_decode_step runs for every layer
of a CPU decode step (the engine's path at FULL: tests/test_cpu_decode_step.py). The layer alone
gives the bits of the separate operators the engine's unfused layer calls (compared as integers)
for the stories15M-like shape, GQA, head_dim not a multiple of 8 and odd widths, one row and
ragged batches with a finished row, with and without a residual. Bad inputs are refused with one
clear message each before anything is written (the C++ checks; the fake implementation only
gives the output shapes: tests/test_op_fakes.py).
"""

from __future__ import annotations

import pytest
import torch
from cpu_decode_models import CONFIGS, model_for
from same_bits import assert_same_bits

from toyllm.engine.forward import layer_weights
from toyllm.models.rope import inverse_frequencies, rope_cos_sin

OPS = torch.ops.toyllm
def separate_ops(args: list) -> tuple[torch.Tensor, ...]:
    """The layer through the separate operators the engine's unfused CPU decode layer calls
    (engine/forward.py below FULL), on copies of the caches in `args`: (s2, out, the caches)."""
    (x, residual, input_norm, qkv_w, o_w, post_norm, gate_up_w, down_w, eps, cos, sin, k_cache,
     v_cache, positions, hq) = args
    rows, d = x.shape[0], k_cache.shape[-1]
    hkv = k_cache.shape[2]
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    s, h = OPS.add_rms_norm(x, residual, input_norm, eps)
    qkv = OPS.gemv(h, qkv_w).view(rows, 1, hq + 2 * hkv, d)
    q = OPS.rope_kv_update(qkv, cos, sin, k_cache, v_cache, positions, hq)
    lens = (positions.clamp(min=0) + 1).to(torch.int32)
    a = OPS.decode_attention(q.reshape(rows, hq, d).contiguous(), k_cache, v_cache, lens,
                             d ** -0.5)
    s2, h2 = OPS.add_rms_norm(s, OPS.gemv(a.reshape(rows, 1, hq * d), o_w), post_norm, eps)
    out = OPS.gemv(OPS.silu_mul(OPS.gemv(h2, gate_up_w)), down_w)
    return s2, out, k_cache, v_cache


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("rows, positions", [(1, [9]), (4, [5, 17, -1, 11]), (2, [4, 30])],
                         ids=["one_row", "ragged4_finished", "ragged2"])
@pytest.mark.parametrize("first", [False, True], ids=["residual", "first_layer"])
def test_the_layer_gives_the_bits_of_the_separate_ops(name, rows, positions, first):
    config = CONFIGS[name]
    model = model_for(name)
    w = layer_weights(model)[-1]
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1, config.hidden_size, generator=g)
    residual = torch.randn(rows, 1, config.hidden_size, generator=g)
    pos = torch.tensor(positions, dtype=torch.int32)
    cos, sin = rope_cos_sin(inverse_frequencies(config), pos.clamp(min=0).long()[:, None],
                            torch.float32)
    shape = (rows, 32, config.num_kv_heads, config.head_dim)
    k_cache, v_cache = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    args = [x, residual, w.input_norm.detach(), w.qkv.detach(), w.o.detach(),
            w.post_norm.detach(), w.gate_up.detach(), w.down.detach(), config.norm_eps, cos, sin,
            k_cache, v_cache, pos, config.num_heads]
    if first:  # no residual: the separate ops then add zeros, which changes no bit
        args[1] = torch.zeros_like(residual)
    want = separate_ops(args)
    if first:
        args[1] = None
    got = OPS.cpu_decode_layer(*args)
    for a, b in zip((*got, k_cache, v_cache), want, strict=True):
        assert_same_bits(a, b)


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
