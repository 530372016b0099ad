"""toyllm::rope_kv_update against the decode path it replaces (toyllm::rope over the q and k
heads, then kv_update) and against the torch code (models/rope.py's apply_rope, slice
assignment): bit for bit, on the CPU and on CUDA, fp32/fp16/bf16, MHA/GQA/MQA, head_dim 64 and
128 (and 34 and 36: the kernel's narrow path), batch 1 and ragged batches with a finished row
(-1), strided projections; every bad input (message, nothing written); opcheck; CUDA-graph
replay with moved positions; programmatic dependent launch on and off; the engine's decode
logits with the op and without it (Settings.fusion ROPE_KV against ELEMENTWISE), eager and in
CUDA graphs; the fusion levels that take it; prefill and the reference never use it."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import collect_dead_graphs
from kv_reference import reference_update

import toyllm.engine.ops.rope_kv as rope_kv_module
from toyllm.engine.check.reference import reference_logits
from toyllm.engine.generate import Engine
from toyllm.engine.ops.kv_cache import (
    decode_attention,
    kv_update,
    set_programmatic_launch,
)
from toyllm.engine.ops.rope_kv import rope_kv_update
from toyllm.engine.settings import Fusion, Settings
from toyllm.models.config import ModelConfig
from toyllm.models.llama import build_model
from toyllm.models.rope import apply_rope, rope_cos_sin

OPS = torch.ops.toyllm
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (num_q_heads, num_kv_heads)
LAYOUTS = {"mha": (4, 4), "gqa": (8, 2), "mqa": (4, 1)}
# per-row positions of the new token in a cache of MAX_SEQ_LEN: batch 1, and a ragged batch with
# a finished row (-1), a row at 0 and one at the cache's last slot
POSITIONS = {"batch1": [5], "ragged": [3, -1, 0, 15], "ten_rows": [1, 2, -1, 4, 5, 9, 0, 15, 3, 8]}
MAX_SEQ_LEN = 16


@pytest.fixture(autouse=True)
def _no_dead_graphs_left(request):
    """CUDA tests leave no dropped engine for the collector to find during a later capture."""
    yield
    if request.node.get_closest_marker("cuda") is not None:
        collect_dead_graphs()


def make_inputs(positions: list[int], num_q_heads: int, num_kv_heads: int, head_dim: int,
                dtype: torch.dtype, device: str, seed: int = 0, strided: bool = False,
                max_seq_len: int = MAX_SEQ_LEN) -> dict:
    """The op's arguments as a decode step makes them: qkv (a [rows, 1, width, D] view; strided:
    sliced out of a wider projection, rows at another pitch), cos/sin of the rows' positions (0
    for finished rows, as DecodeStep.rope_positions), caches full of random values (so a write
    of anything, zeros included, shows), int32 positions."""
    rows, width = len(positions), num_q_heads + 2 * num_kv_heads
    g = torch.Generator().manual_seed(seed)
    if strided:
        wide = torch.randn(rows, 1, width + 3, head_dim, generator=g) * 2
        qkv = wide.to(dtype).to(device)[:, :, 1 : width + 1]
    else:
        qkv = (torch.randn(rows, 1, width, head_dim, generator=g) * 2).to(dtype).to(device)
    pos = torch.tensor(positions, dtype=torch.int32)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    cos, sin = rope_cos_sin(inv_freq, (pos.clamp(min=0).long() * 37).unsqueeze(1), dtype)
    cache_shape = (rows, max_seq_len, num_kv_heads, head_dim)
    return {
        "qkv": qkv,
        "cos": cos.to(device),
        "sin": sin.to(device),
        "k_cache": torch.randn(cache_shape, generator=g).to(dtype).to(device),
        "v_cache": torch.randn(cache_shape, generator=g).to(dtype).to(device),
        "positions": pos.to(device),
        "num_q_heads": num_q_heads,
    }


def clone_args(args: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) and k.endswith("cache") else v
            for k, v in args.items()}


def old_decode_path(qkv, cos, sin, k_cache, v_cache, positions, num_q_heads):
    """What a decode step did before the op: toyllm::rope over the q and k heads, then kv_update
    of contiguous k and v; q made contiguous as decode attention takes it."""
    hq, hkv = num_q_heads, k_cache.shape[2]
    qk = OPS.rope(qkv[:, :, : hq + hkv], cos, sin)
    kv_update(k_cache, v_cache, qk[:, :, hq:].contiguous(), qkv[:, :, hq + hkv :].contiguous(),
              positions)
    return qk[:, :, :hq].contiguous()


def torch_code_path(qkv, cos, sin, k_cache, v_cache, positions, num_q_heads):
    """The same in plain torch: models/rope.py's apply_rope and slice assignment."""
    hq, hkv = num_q_heads, k_cache.shape[2]
    qk = apply_rope(qkv[:, :, : hq + hkv], cos, sin)
    reference_update(k_cache, v_cache, qk[:, :, hq:], qkv[:, :, hq + hkv :], positions.cpu())
    return qk[:, :, :hq].contiguous()


def assert_same_bits(args: dict, reference) -> None:
    """The op on args and `reference` on a copy: q, k_cache and v_cache equal bit for bit."""
    want_args = clone_args(args)
    got_args = clone_args(args)
    want = reference(**want_args)
    got = rope_kv_update(**got_args)
    assert got.shape == (args["qkv"].shape[0], 1, args["num_q_heads"], args["qkv"].shape[3])
    assert got.dtype == args["qkv"].dtype and got.is_contiguous()
    assert torch.equal(got, want)
    for name in ("k_cache", "v_cache"):
        assert torch.equal(got_args[name], want_args[name]), name


def active_rows(positions: list[int]) -> list[int]:
    return [r for r, p in enumerate(positions) if p >= 0]


# ---------------------------------------------------------------------------------------------
# The op against the old path and the torch code, CPU and CUDA


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("positions", sorted(POSITIONS))
def test_op_equals_rope_then_kv_update_bit_for_bit(device, dtype, layout, head_dim,
                                                   positions) -> None:
    args = make_inputs(POSITIONS[positions], *LAYOUTS[layout], head_dim, dtype, device)
    assert_same_bits(args, old_decode_path)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("head_dim", [64, 128])
def test_op_equals_the_torch_code_bit_for_bit(device, dtype, layout, head_dim) -> None:
    args = make_inputs(POSITIONS["ragged"], *LAYOUTS[layout], head_dim, dtype, device, seed=3)
    assert_same_bits(args, torch_code_path)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [34, 36, 2])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_op_of_odd_head_dims_and_strided_projections_equals_the_old_path(device, dtype, head_dim,
                                                                          strided) -> None:
    """head_dim / 2 not a multiple of a 16-byte pack (17, 18 in fp16/bf16; 17, 1 in fp32), or
    a projection whose heads start off a 16-byte boundary: the kernel's narrow path."""
    args = make_inputs(POSITIONS["ragged"], 3, 1, head_dim, dtype, device, seed=5,
                       strided=strided)
    assert_same_bits(args, old_decode_path)
    assert_same_bits(args, torch_code_path)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_of_a_wider_strided_projection_equals_its_contiguous_copy(device, dtype) -> None:
    args = make_inputs(POSITIONS["ragged"], 8, 2, 64, dtype, device, seed=7, strided=True)
    assert not args["qkv"].is_contiguous()
    packed = dict(clone_args(args), qkv=args["qkv"].contiguous())
    got_args = clone_args(args)
    assert torch.equal(rope_kv_update(**got_args), rope_kv_update(**packed))
    assert torch.equal(got_args["k_cache"], packed["k_cache"])
    assert torch.equal(got_args["v_cache"], packed["v_cache"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_writes_exactly_the_active_rows_slots_and_returns_every_rows_q(device, dtype) -> None:
    """Row r's new token lands at k_cache[r, positions[r]] only (the rotated k) and
    v_cache[r, positions[r]] (v's bits unchanged); a finished row's cache is untouched, but its
    q is still rotated (decode attention reads it and the engine drops the result)."""
    positions = POSITIONS["ragged"]
    hq, hkv, d = 8, 2, 64
    args = make_inputs(positions, hq, hkv, d, dtype, device, seed=11)
    before = clone_args(args)
    q = rope_kv_update(**args)
    qk = apply_rope(args["qkv"][:, :, : hq + hkv], args["cos"], args["sin"])
    assert torch.equal(q, qk[:, :, :hq])
    for name in ("k_cache", "v_cache"):
        changed = (args[name] != before[name]).any(-1).any(-1)  # [rows, max_seq_len]
        expected = torch.zeros_like(changed)
        for r in active_rows(positions):
            expected[r, positions[r]] = True
        assert torch.equal(changed, expected), name
    for r in active_rows(positions):
        p = positions[r]
        assert torch.equal(args["k_cache"][r, p], qk[r, 0, hq:])
        assert torch.equal(args["v_cache"][r, p], args["qkv"][r, 0, hq + hkv :])


# ---------------------------------------------------------------------------------------------
# Positions past the cache's end


def test_op_on_cpu_rejects_a_position_past_the_end_and_writes_nothing() -> None:
    args = make_inputs([2, MAX_SEQ_LEN], 4, 2, 8, torch.float32, "cpu")
    before = clone_args(args)
    with pytest.raises(ValueError, match=r"expected positions\[1\] \+ 1 <= max_seq_len 16 .*"
                                         r"got 16 \+ 1"):
        rope_kv_update(**args)
    assert torch.equal(args["k_cache"], before["k_cache"])
    assert torch.equal(args["v_cache"], before["v_cache"])


@pytest.mark.cuda
def test_op_on_cuda_skips_a_row_past_the_end_and_writes_the_others() -> None:
    """On CUDA the positions are not read on the host: the kernel skips the row instead (as
    kv_update's does), and every other row is written as usual."""
    args = make_inputs([2, MAX_SEQ_LEN, 40], 4, 2, 64, torch.bfloat16, "cuda")
    want = clone_args(args)
    want["positions"] = torch.tensor([2, -1, -1], dtype=torch.int32, device="cuda")
    expected_q = old_decode_path(**want)
    got = rope_kv_update(**args)
    assert torch.equal(got, expected_q)
    assert torch.equal(args["k_cache"], want["k_cache"])
    assert torch.equal(args["v_cache"], want["v_cache"])


# ---------------------------------------------------------------------------------------------
# Bad inputs: ValueError naming expected and given, nothing written


def _bad(**changes):
    def apply(args: dict) -> None:
        made = {name: make(args) for name, make in changes.items()}
        args.update(made)

    return apply


def _like(shape, what="qkv"):
    return lambda a: torch.zeros(shape, dtype=a[what].dtype, device=a[what].device)


# good arguments: 2 rows, 4 q heads and 2 KV heads of 8, a cache of 6 positions
BAD_CASES = {
    "qkv_rank": (_bad(qkv=lambda a: a["qkv"][0]),
                 r"expected qkv of shape \[2, 1, 8, 8\] .*got \[1, 8, 8\]"),
    "qkv_width": (_bad(num_q_heads=lambda a: 3),
                  r"expected qkv of shape \[2, 1, 7, 8\] .*num_q_heads 3 \+ 2 \* num_kv_heads 2"
                  r".*got \[2, 1, 8, 8\]"),
    "num_q_heads_zero": (_bad(num_q_heads=lambda a: 0), r"expected num_q_heads >= 1, got 0"),
    "two_tokens": (_bad(qkv=_like((2, 2, 8, 8))),
                   r"expected qkv of shape \[2, 1, 8, 8\] .*got \[2, 2, 8, 8\]"),
    "qkv_rows": (_bad(qkv=_like((3, 1, 8, 8))),
                 r"expected qkv of shape \[2, 1, 8, 8\] .*got \[3, 1, 8, 8\]"),
    "qkv_head_dim": (_bad(qkv=_like((2, 1, 8, 6))),
                     r"expected qkv of shape \[2, 1, 8, 8\] .*got \[2, 1, 8, 6\]"),
    "odd_head_dim": (_bad(qkv=_like((2, 1, 8, 7)), k_cache=_like((2, 6, 2, 7)),
                          v_cache=_like((2, 6, 2, 7))),
                     r"expected an even head_dim >= 2 \(k_cache.size\(3\)\), got 7"),
    "cos_shape": (_bad(cos=_like((2, 1, 1, 4))),
                  r"expected cos of shape \[2, 1, 1, 8\] .*got \[2, 1, 1, 4\]"),
    "sin_shape": (_bad(sin=_like((2, 1, 2, 8))),
                  r"expected sin of cos's shape \[2, 1, 1, 8\], got \[2, 1, 2, 8\]"),
    "k_cache_rank": (_bad(k_cache=lambda a: a["k_cache"][0]),
                     r"expected k_cache of 4 dims .*got shape \[6, 2, 8\]"),
    "v_cache_shape": (_bad(v_cache=_like((2, 5, 2, 8))),
                      r"expected v_cache of k_cache's shape \[2, 6, 2, 8\], got \[2, 5, 2, 8\]"),
    "empty_cache": (_bad(k_cache=_like((2, 0, 2, 8)), v_cache=_like((2, 0, 2, 8))),
                    r"expected max_seq_len \(k_cache.size\(1\)\) >= 1, got 0"),
    "qkv_dtype": (_bad(qkv=lambda a: a["qkv"].double(), cos=lambda a: a["cos"].double(),
                       sin=lambda a: a["sin"].double(), k_cache=lambda a: a["k_cache"].double(),
                       v_cache=lambda a: a["v_cache"].double()),
                  r"expected qkv of dtype torch.float32, torch.float16 or torch.bfloat16, "
                  r"got torch.float64"),
    "cos_dtype": (_bad(cos=lambda a: a["cos"].float()),
                  r"expected cos of dtype torch.float16 \(qkv's\), got torch.float32"),
    "k_cache_dtype": (_bad(k_cache=lambda a: a["k_cache"].bfloat16()),
                      r"expected k_cache of dtype torch.float16 \(qkv's\), got torch.bfloat16"),
    "v_cache_dtype": (_bad(v_cache=lambda a: a["v_cache"].float()),
                      r"expected v_cache of dtype torch.float16 \(qkv's\), got torch.float32"),
    "qkv_last_dim_strided": (_bad(qkv=lambda a: _like((2, 1, 8, 8))(a).transpose(2, 3)),
                             r"expected qkv with a contiguous last dim \(stride 1\), got strides"),
    "cos_last_dim_strided": (_bad(cos=lambda a: _like((2, 1, 1, 16))(a)[..., ::2]),
                             r"expected cos with a contiguous last dim \(stride 1\), got strides"),
    "k_cache_non_contiguous": (_bad(k_cache=lambda a: _like((2, 2, 6, 8))(a).transpose(1, 2)),
                               r"expected a contiguous k_cache, got strides"),
    "v_cache_non_contiguous": (_bad(v_cache=lambda a: _like((6, 2, 2, 8))(a).transpose(0, 1)),
                               r"expected a contiguous v_cache, got strides"),
    "positions_dtype": (_bad(positions=lambda a: a["positions"].long()),
                        r"expected positions of dtype torch.int32, got torch.int64"),
    "positions_shape": (_bad(positions=lambda a: a["positions"][:1]),
                        r"expected positions of shape \[2\] \(the cache's rows\), got \[1\]"),
    "positions_non_contiguous": (
        _bad(positions=lambda a: a["positions"].repeat_interleave(2)[::2]),
        r"expected contiguous positions, got strides"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_op_rejects_bad_input_naming_expected_and_given_and_writes_nothing(device: str,
                                                                          case: str) -> None:
    args = make_inputs([1, 3], 4, 2, 8, torch.float16, device, max_seq_len=6)
    make_bad, pattern = BAD_CASES[case]
    make_bad(args)
    before = {name: args[name].clone() for name in ("k_cache", "v_cache")}
    with pytest.raises(ValueError, match=pattern):
        rope_kv_update(**args)
    for name, t in before.items():
        assert torch.equal(args[name], t), name


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["cos", "sin", "k_cache", "v_cache", "positions"])
def test_op_on_cuda_rejects_an_argument_on_the_cpu_and_writes_nothing(name: str) -> None:
    # (the dispatcher hands a call with any CUDA tensor to the CUDA operator, which checks)
    args = make_inputs([1, 3], 4, 2, 8, torch.float16, "cuda", max_seq_len=6)
    args[name] = args[name].cpu()
    before = {cache: args[cache].clone() for cache in ("k_cache", "v_cache")}
    with pytest.raises(ValueError, match=rf"expected {name} on cuda:0 \(qkv's device\), got cpu"):
        rope_kv_update(**args)
    for cache, t in before.items():
        assert torch.equal(args[cache], t), cache


# ---------------------------------------------------------------------------------------------
# opcheck (schema with the caches mutated, fake implementation, dispatch)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_opcheck_accepts_the_operator(device: str, dtype: torch.dtype, strided: bool) -> None:
    args = make_inputs(POSITIONS["ragged"], 4, 2, 34, dtype, device, strided=strided)
    torch.library.opcheck(OPS.rope_kv_update.default, tuple(args.values()))


# ---------------------------------------------------------------------------------------------
# CUDA graphs: positions read on the device at replay


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_graph_replay_writes_at_the_moved_positions(dtype) -> None:
    positions = [3, 0, 7, 15]
    args = make_inputs(positions, 8, 2, 64, dtype, "cuda", seed=0)
    stream = torch.cuda.Stream()  # warm up off the default stream, as capture requires
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        rope_kv_update(**args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q = rope_kv_update(**args)

    # the next step: new projection and angles, positions moved on the device, a row finished
    moved = [4, 1, -1, 15]
    new = make_inputs(moved, 8, 2, 64, dtype, "cuda", seed=9)
    for name in ("qkv", "cos", "sin", "positions"):
        args[name].copy_(new[name])
    want = clone_args(args)
    expected_q = old_decode_path(**want)
    before = clone_args(args)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(q, expected_q)
    assert torch.equal(args["k_cache"], want["k_cache"])
    assert torch.equal(args["v_cache"], want["v_cache"])
    for name in ("k_cache", "v_cache"):  # the replay wrote at the moved positions only
        changed = (args[name] != before[name]).any(-1).any(-1)  # [rows, max_seq_len]
        expected = torch.zeros_like(changed)
        for r in active_rows(moved):
            expected[r, moved[r]] = True
        assert torch.equal(changed, expected), name


# ---------------------------------------------------------------------------------------------
# Programmatic dependent launch: the kernel may start before the one ahead of it has finished


def _chain(args: dict, steps: int) -> list[torch.Tensor]:
    """steps rounds of: the op, decode attention over the rows' keys, and the next projection
    made from the attention's output (torch kernels): every kernel reads the last one's output."""
    a = dict(args)
    hq, hkv = a["num_q_heads"], a["k_cache"].shape[2]
    outs = []
    for _ in range(steps):
        q = rope_kv_update(**a)
        out = decode_attention(q[:, 0], a["k_cache"], a["v_cache"],
                               (a["positions"].clamp(min=0) + 1).to(torch.int32))
        outs.append(out)
        a["qkv"] = torch.cat([out, out[:, : 2 * hkv] * 0.5], dim=1).unsqueeze(1)
        a["positions"] = torch.where(a["positions"] >= 0, a["positions"] + 1, a["positions"])
        assert a["qkv"].shape[2] == hq + 2 * hkv
    return outs


@pytest.fixture
def restore_programmatic_launch():
    yield
    set_programmatic_launch(True)


@pytest.mark.cuda
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "cuda_graph"])
def test_a_chain_through_the_op_gives_the_same_bits_with_programmatic_launch_on_and_off(
        graph, restore_programmatic_launch) -> None:
    results = []
    for enabled in (False, True):
        set_programmatic_launch(enabled)
        args = make_inputs([3, 100, -1, 300], 8, 2, 64, torch.bfloat16, "cuda", max_seq_len=512)
        if graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                _chain(clone_args(args), steps=2)  # warm-up, on copies of the caches
            torch.cuda.current_stream().wait_stream(side)
            captured = torch.cuda.CUDAGraph()
            with torch.cuda.graph(captured):
                outs = _chain(args, steps=8)
            captured.replay()
        else:
            outs = _chain(args, steps=20)
        torch.cuda.synchronize()
        results.append(([o.clone() for o in outs], args["k_cache"].clone(),
                        args["v_cache"].clone()))
    (off, k_off, v_off), (on, k_on, v_on) = results
    assert all(torch.equal(a, b) for a, b in zip(off, on, strict=True))
    assert torch.equal(k_off, k_on) and torch.equal(v_off, v_on)


# ---------------------------------------------------------------------------------------------
# The engine: decode with the op gives the logits of decode without it


CONFIGS = {
    "gqa_hd64": ModelConfig(vocab_size=256, hidden_size=256, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=64, intermediate_size=96, max_seq_len=64),
    "mqa_hd128": ModelConfig(vocab_size=256, hidden_size=128, num_layers=2, num_heads=2,
                             num_kv_heads=1, head_dim=128, intermediate_size=96, max_seq_len=64),
    "mha_hd34": ModelConfig(vocab_size=256, hidden_size=68, num_layers=2, num_heads=2,
                            num_kv_heads=2, head_dim=34, intermediate_size=96, max_seq_len=64),
}


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (n,), generator=g).tolist()
    return [torch.randint(3, 256, (m,), generator=g).tolist() for m in lengths]


def _count_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the engine's calls of the op (engine/forward.py calls rope_kv.rope_kv_update)."""
    calls = [0]
    real = rope_kv_module.rope_kv_update

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(rope_kv_module, "rope_kv_update", counted)
    return calls


def decode_run(model, prompts: list[list[int]], steps: int, fusion: Fusion,
               monkeypatch: pytest.MonkeyPatch, **engine_args) -> tuple[torch.Tensor, int]:
    """Prefill the prompts, then `steps` greedy decode steps, row 0 finishing after the second
    (its slot goes -1): (the steps' logits [steps, rows, vocab], the op's call count)."""
    calls = _count_calls(monkeypatch)
    collect_dead_graphs()  # the last run's engine, before this one captures
    engine = Engine(model, settings=Settings(fusion=fusion), **engine_args)
    n = len(prompts)
    rows = engine._rows_for(n)
    cache = engine.prepare_cache(rows, max(len(p) for p in prompts) + steps)
    for r in range(n, rows):
        cache.set_active(r, False)
    last = torch.stack([engine.prefill(cache, r, p) for r, p in enumerate(prompts)])
    tokens = torch.cat([last.argmax(-1), last.new_zeros(rows - n, dtype=torch.long)])
    out = []
    for step in range(steps):
        if step == 2:
            cache.set_active(0, False)
        logits = engine.decode_step(cache, rows, tokens)
        out.append(logits.clone())
        tokens = logits.argmax(-1)
    return torch.stack(out), calls[0]


def _compare_engine(device: str, dtype: torch.dtype, name: str, n: int, monkeypatch,
                    **engine_args) -> None:
    """Decode logits with and without the op, bit for bit. 10 rows take SDPA for attention on
    the CPU (and on CUDA where the decode kernel has no tensor-core path: fp32, head_dim 34),
    so the op's q meets both attention paths."""
    # Fusion.ROPE_KV, not FULL: at FULL one row on CUDA would take rope_kv_update's work inside
    # the q/k/v product's kernel (toyllm::gemv_add_rms_norm_rope_kv,
    # tests/test_gemv_norm_rope_kv.py): tested alone here, against the level below
    model = build_model(CONFIGS[name], device=device, dtype=dtype, seed=1)
    model.init_weights(1, std=0.2)
    prompts = _prompts(n)
    steps = 5
    fused, fused_calls = decode_run(model, prompts, steps, Fusion.ROPE_KV, monkeypatch,
                                    **engine_args)
    plain, plain_calls = decode_run(model, prompts, steps, Fusion.ELEMENTWISE, monkeypatch,
                                    **engine_args)
    assert plain_calls == 0
    assert torch.isfinite(plain).all()  # (NaN would make the equality below fail for nothing)
    if not engine_args.get("cuda_graph"):  # (graph replays call no Python)
        assert fused_calls == steps * CONFIGS[name].num_layers
    else:
        assert fused_calls > 0
    assert torch.equal(fused, plain)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("n", [1, 3, 10], ids=["batch1", "batch3", "batch10"])
def test_engine_cpu_decode_logits_with_and_without_the_op_are_equal(dtype, name, n,
                                                                   monkeypatch) -> None:
    _compare_engine("cpu", dtype, name, n, monkeypatch)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("n", [1, 3, 10], ids=["batch1", "batch3", "batch10"])
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "cuda_graph"])
def test_engine_cuda_decode_logits_with_and_without_the_op_are_equal(dtype, name, n, graph,
                                                                    monkeypatch) -> None:
    _compare_engine("cuda", dtype, name, n, monkeypatch, cuda_graph=graph)


def test_engine_cpu_decode_with_the_op_matches_the_no_cache_reference(monkeypatch) -> None:
    """Teacher-forced: every decode step's logits against the uncached forward of the whole
    sequence (not only the old path: both could share a mistake)."""
    calls = _count_calls(monkeypatch)
    model = build_model(CONFIGS["gqa_hd64"], seed=2)
    # ROPE_KV: the op takes every layer (at FULL toyllm::cpu_decode_step runs the whole CPU
    # step, with the same bits: tests/test_cpu_decode_step.py)
    engine = Engine(model, settings=Settings(fusion=Fusion.ROPE_KV))
    ids = _prompts(1, seed=4)[0] + [7, 8, 9, 10]
    n_prompt = len(ids) - 4
    cache = engine.prepare_cache(1, len(ids))
    engine.prefill(cache, 0, ids[:n_prompt])
    for i in range(n_prompt, len(ids)):
        logits = engine.decode_step(cache, 1, torch.tensor([ids[i]]))
        want = reference_logits(model, ids[: i + 1])[-1]
        assert float((logits[0] - want).abs().max()) <= 1e-4
    assert calls[0] == 4 * CONFIGS["gqa_hd64"].num_layers


def test_prefill_and_the_no_cache_forward_never_call_the_op(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("rope_kv_update called outside a decode step")

    monkeypatch.setattr(rope_kv_module, "rope_kv_update", refuse)
    model = build_model(CONFIGS["gqa_hd64"], seed=2)
    engine = Engine(model, settings=Settings(fusion=Fusion.ROPE_KV))  # the op at decode (CPU)
    ids = _prompts(1, seed=4)[0]
    cache = engine.prepare_cache(1, len(ids) + 1)
    engine.prefill(cache, 0, ids)
    reference_logits(model, ids)
    with pytest.raises(AssertionError, match="outside a decode step"):
        engine.decode_step(cache, 1, torch.tensor([5]))


def test_decode_step_compiles_with_the_op_and_gives_the_eager_logits(monkeypatch) -> None:
    """torch.compile traces the decode step through the op's fake implementation and
    functionalises its cache writes (aot_eager: the graph capture without a C++ compiler)."""
    model = build_model(CONFIGS["gqa_hd64"], seed=2)
    prompts = _prompts(3, seed=6)
    results = []
    for compiled in (False, True):
        engine = Engine(model)
        if compiled:
            torch._dynamo.reset()
            engine.decode_forward = torch.compile(engine.decode_forward, backend="aot_eager",
                                                  fullgraph=True)
        cache = engine.prepare_cache(3, 16)
        last = torch.stack([engine.prefill(cache, r, p) for r, p in enumerate(prompts)])
        cache.set_active(1, False)
        logits = engine.decode_step(cache, 3, last.argmax(-1))
        results.append((logits, cache.storage().clone()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


# ---------------------------------------------------------------------------------------------
# The setting


@pytest.mark.parametrize("fusion", list(Fusion), ids=lambda f: f.name.lower())
def test_the_op_runs_from_fusion_rope_kv_on(fusion, monkeypatch) -> None:
    """Fusion.ROPE_KV to SILU_GEMV take the op for every layer of a CPU decode step, NONE and
    ELEMENTWISE never, FULL neither (toyllm::cpu_decode_step runs the whole CPU step, with
    the op's code; FULL's gemv_add_rms_norm_rope_kv is CUDA's); the logits agree."""
    config = CONFIGS["gqa_hd64"]
    model = build_model(config, seed=2)
    calls = _count_calls(monkeypatch)
    engine = Engine(model, settings=Settings(fusion=fusion))
    cache = engine.prepare_cache(1, 8)
    engine.prefill(cache, 0, [3, 4, 5])
    assert calls[0] == 0  # prefill: never
    logits = engine.decode_step(cache, 1, torch.tensor([6]))
    takes_op = Fusion.ROPE_KV <= fusion < Fusion.FULL
    assert calls[0] == (config.num_layers if takes_op else 0)
    want = reference_logits(model, [3, 4, 5, 6])[-1]
    assert float((logits[0] - want).abs().max()) <= 1e-4


def test_applies_only_where_supported_and_not_recording_autograd() -> None:
    args = make_inputs([1, 3], 4, 2, 8, torch.float32, "cpu")
    qkv = args["qkv"].requires_grad_()
    assert not rope_kv_module.applies(qkv, args["k_cache"])
    assert rope_kv_module.applies(qkv.detach(), args["k_cache"])
    with torch.no_grad():
        assert rope_kv_module.applies(qkv, args["k_cache"])
    assert not rope_kv_module.applies(qkv.detach().double(), args["k_cache"].double())
    assert not rope_kv_module.applies(qkv.detach().half(), args["k_cache"])  # dtypes differ
    assert not rope_kv_module.applies(qkv.detach().to("meta"), args["k_cache"].to("meta"))
