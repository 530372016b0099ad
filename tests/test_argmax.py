"""toyllm::argmax (csrc/argmax_ops.cpp, CUDA kernel csrc/argmax.cu) against torch.argmax on the
CPU, the definition it must match index for index: the first index of a row's maximum, NaN above
every number (the first NaN wins), -0.0 equal to +0.0, fp16/bf16 compared as their fp32 widening.

CUDA (marked `cuda`): random logits of every dtype, rows 1 to 33, vocab 1, 7, 8, 4097, 32000,
128256 and 128257 (16-byte loads with and without a tail; element loads); ties placed at and
around the kernel's block boundaries and everywhere in a sweep; -inf, +inf and NaN rows; many
rows (one block per row) and more rows than one grid holds; row-strided, transposed and
misaligned logits; empty rows; bad inputs; opcheck; CUDA-graph capture and replay with new
logits; engine/ops/argmax.py's dispatch and greedy generation with the kernel on and off
(Settings.cuda_argmax). Everywhere: the operator on the CPU and its checks, the wrapper and the
engine's greedy pick on the CPU, and the torch behaviour the kernel is built to match. The fake:
tests/test_op_fakes.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from engine_helpers import collect_dead_graphs

import toyllm.engine.ops.argmax as argmax_mod
from toyllm.engine.sampling import SamplingParams, sample
from toyllm.engine.settings import Settings

OPS = torch.ops.toyllm
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True)
def _no_dead_graphs_left(request):
    """CUDA tests leave no dropped engine for the collector to find during a later capture."""
    yield
    if request.node.get_closest_marker("cuda") is not None:
        collect_dead_graphs()


def reference(logits: torch.Tensor) -> torch.Tensor:
    """The answer the operator must give: torch.argmax on the CPU, of the fp32 widening."""
    return logits.detach().cpu().float().argmax(dim=-1)


def assert_same_as_torch(logits: torch.Tensor) -> None:
    got = OPS.argmax(logits)
    want = reference(logits)
    assert got.dtype == torch.int64 and got.shape == (logits.shape[0],)
    assert got.device == logits.device
    got = got.cpu()
    if not torch.equal(got, want):
        bad = (got != want).nonzero().flatten()
        r = int(bad[0])
        row = logits[r].detach().cpu().float()
        raise AssertionError(
            f"{len(bad)} of {logits.shape[0]} rows differ for logits {list(logits.shape)} "
            f"{logits.dtype}: row {r}: got {int(got[r])} (value {row[got[r]].item()!r}), "
            f"torch {int(want[r])} (value {row[want[r]].item()!r})"
        )


def randn(shape, dtype, device, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=device).to(dtype)


# ---------------------------------------------------------------------------------------------
# torch's behaviour, the specification (the kernel is written to these answers)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_argmax_on_the_cpu_takes_the_first_max_and_the_first_nan(dtype) -> None:
    cases = [  # (values, torch's answer); a list: -0.0 and 0.0 are one dict key
        ((1.0, 3.0, 3.0, 2.0), 1),  # a tie: the first index
        ((1.0, NAN, 5.0, NAN), 1),  # NaN is the max, the first NaN wins
        ((NAN, NAN), 0),
        ((-INF, -INF, -INF), 0),
        ((-0.0, 0.0), 0),  # equal values
        ((0.0, -0.0), 0),
        ((INF, NAN, INF), 1),
        ((1.0, INF, INF), 1),
    ]
    for values, index in cases:
        t = torch.tensor([values], dtype=dtype)
        assert t.argmax(-1).item() == index, values
        assert t.float().argmax(-1).item() == index, values


# ---------------------------------------------------------------------------------------------
# the operator on the CPU, its checks


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_argmax_cpu_equals_torch_argmax(dtype) -> None:
    logits = randn((5, 1000), dtype, "cpu", seed=0)
    logits[1, 7] = logits[1, 900] = 100.0  # a tie
    logits[2, 500] = NAN
    logits[3] = -INF
    logits[4, 3] = logits[4, 4] = NAN
    assert_same_as_torch(logits)
    assert OPS.argmax(logits).tolist()[1:] == [7, 500, 0, 3]
    assert OPS.argmax(torch.ones(0, 4, dtype=dtype)).shape == (0,)


def _bad_inputs(make) -> dict[str, tuple[torch.Tensor, str]]:
    return {
        "1 dim": (make((8,)),
                  r"argmax: expected logits of 2 dims \[rows, vocab\], got shape \[8\]"),
        "3 dims": (make((1, 2, 8)),
                   r"expected logits of 2 dims \[rows, vocab\], got shape \[1, 2, 8\]"),
        "float64": (make((2, 8), torch.float64),
                    r"argmax: expected logits of dtype torch\.float32, torch\.float16 or "
                    r"torch\.bfloat16, got torch\.float64"),
        "int64": (make((2, 8), torch.int64), r"expected logits of dtype .* got torch\.int64"),
        "empty vocab": (make((3, 0)),
                        r"argmax: expected a non-empty vocab \(logits\.size\(1\) >= 1\), got "
                        r"shape \[3, 0\]"),
        "empty rows and vocab": (make((0, 0)), r"expected a non-empty vocab .* got shape \[0, 0\]"),
    }


def _maker(device: str):
    def make(shape, dtype=torch.float32) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=device)

    return make


BAD_CASES = list(_bad_inputs(_maker("cpu")))


@pytest.mark.parametrize("case", BAD_CASES)
def test_argmax_cpu_rejects_bad_inputs(case) -> None:
    logits, message = _bad_inputs(_maker("cpu"))[case]
    with pytest.raises(ValueError, match=message):
        OPS.argmax(logits)
    with pytest.raises(ValueError, match=message):  # the wrapper's direct call: the same check
        argmax_mod._argmax_cpu(logits, False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flag", [False, True], ids=["plain", "flag_nonfinite"])
def test_the_direct_cpu_call_gives_the_operators_answer(dtype, flag) -> None:
    """The wrapper's CPU call without the dispatcher (_C.argmax_cpu) is the operator's."""
    logits = randn((5, 1000), dtype, "cpu", seed=6)
    logits[1, 7] = logits[1, 900] = 100.0  # a tie
    logits[2, 500] = NAN
    logits[3] = -INF
    logits[4, 3] = INF
    assert torch.equal(argmax_mod._argmax_cpu(logits, flag), OPS.argmax(logits, flag))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_argmax_cpu_opcheck(dtype) -> None:
    torch.library.opcheck(OPS.argmax.default, (randn((3, 37), dtype, "cpu", seed=1),))


@pytest.mark.parametrize("vocab", [1, 7, 8, 9, 17, 31, 32, 33, 47, 64, 65, 4096, 32000, 32001])
def test_argmax_cpu_fp32_loop_equals_torch_at_lane_edges_ties_and_signed_zeros(vocab) -> None:
    """The fp32 loop keeps 8 lane maxima (AVX2: four sets, 32 values a step, from 32 values on)
    and a tail: maxima and ties placed on every lane, at the tail, first and last; ties of -0.0
    and +0.0; row-strided and transposed layouts."""
    rows = []
    for spot in sorted({0, 1, 7, 8, 9, vocab // 2, vocab - 9, vocab - 2, vocab - 1}):
        if not 0 <= spot < vocab:
            continue
        row = randn((vocab,), torch.float32, "cpu", seed=spot)
        row[spot] = 50.0
        rows.append(row)
        tie = row.clone()
        tie[(spot * 5 + 3) % vocab] = 50.0  # a tie before or after it, on another lane
        rows.append(tie)
    zeros = -torch.rand(vocab)  # all <= 0: the maximum is a zero of either sign
    zeros[vocab - 1] = 0.0
    zeros[(vocab - 1) // 3] = -0.0
    rows += [zeros, torch.full((vocab,), -INF) if vocab == 1 else -torch.arange(vocab * 1.0)]
    logits = torch.stack(rows)
    assert_same_as_torch(logits)
    wide = torch.zeros(logits.shape[0], vocab + 5)
    wide[:, 2 : vocab + 2] = logits
    assert_same_as_torch(wide[:, 2 : vocab + 2])  # row-strided, read in place
    assert_same_as_torch(logits.t().contiguous().t())  # column-major: packed first


def test_argmax_wrapper_on_the_cpu_takes_the_loop_for_fp32_and_torch_otherwise(
        monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(argmax_mod, "_argmax_cpu",
                        lambda x, *a: calls.append(1) or OPS.argmax(x, *a))
    fp32 = randn((3, 50), torch.float32, "cpu", seed=5)
    assert argmax_mod.applies_cpu(fp32) and not argmax_mod.applies(fp32)
    assert torch.equal(argmax_mod.argmax(fp32), fp32.argmax(-1)) and len(calls) == 1
    assert torch.equal(argmax_mod.argmax(fp32, kernel=False), fp32.argmax(-1)) and len(calls) == 2

    def refuse(*args):
        raise AssertionError("toyllm::argmax called for CPU logits it does not take")

    monkeypatch.setattr(argmax_mod, "_argmax", refuse)
    monkeypatch.setattr(argmax_mod, "_argmax_cpu", refuse)
    logits = randn((3, 50), torch.bfloat16, "cpu", seed=2)
    assert not argmax_mod.applies(logits) and not argmax_mod.applies_cpu(logits)
    assert torch.equal(argmax_mod.argmax(logits), logits.argmax(-1))
    assert torch.equal(argmax_mod.argmax(logits, kernel=False), logits.argmax(-1))
    vector = randn((50,), torch.float32, "cpu", seed=3)  # any shape torch takes
    assert argmax_mod.argmax(vector).item() == vector.argmax().item()


def test_greedy_sample_of_bf16_logits_is_the_argmax_of_their_fp32_widening() -> None:
    logits = randn((4, 4096), torch.bfloat16, "cpu", seed=4)  # bf16: ties at the max happen
    logits[0, 10] = logits[0, 20] = logits[0].max()
    greedy = SamplingParams(temperature=0.0)
    assert torch.equal(sample(logits, greedy, None), logits.float().argmax(-1))
    assert sample(logits, greedy, None)[0].item() == 10
    assert torch.equal(sample(logits, greedy, None, cuda_argmax=False), logits.float().argmax(-1))


# ---------------------------------------------------------------------------------------------
# CUDA: values

VOCABS = [1, 7, 8, 4097, 32000, 128256, 128257]


@pytest.mark.cuda
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_argmax_cuda_equals_torch_on_random_logits_for_1_to_33_rows(dtype, vocab) -> None:
    big = randn((33, vocab), dtype, "cuda", seed=vocab)
    for rows in range(1, 34):
        assert_same_as_torch(big[:rows])
    # a narrow value range: bf16/fp16 then tie at the max in most rows
    assert_same_as_torch((big * 0.01).round())


def _chunks(rows: int, vocab: int, dtype: torch.dtype) -> int:
    """The elements per block of csrc/argmax.cu's plan_for (a mirror, to aim ties at the block
    boundaries; if it drifts from the kernel the tests below still check every answer)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    finest = math.ceil(vocab / (256 * 2 * vec))
    parts = max(1, min(math.ceil(2 * sms / rows), finest))
    return math.ceil(math.ceil(vocab / parts) / vec) * vec


def _tie_positions(vocab: int, chunk: int) -> list[int]:
    """Positions around every block boundary, plus a sweep over the whole row."""
    near = [b + d for b in range(0, vocab + 1, chunk) for d in (-1, 0)]  # last, first of a block
    sweep = list(range(0, vocab, max(1, vocab // 31)))
    return sorted({p for p in near + sweep + [vocab - 1] if 0 <= p < vocab})


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [1, 16, 33])
@pytest.mark.parametrize("vocab", [7, 4097, 32000, 128256])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_argmax_cuda_takes_the_first_of_tied_maxima_across_blocks(dtype, vocab, rows) -> None:
    chunk = _chunks(rows, vocab, dtype)
    positions = _tie_positions(vocab, chunk)
    base = randn((rows, vocab), dtype, "cuda", seed=rows).clamp(-4, 4)
    # row r has the max (8.0) at positions[i] and at every later listed position, or at
    # positions[i] and at one later position: the answer is positions[i] either way
    for start in range(0, len(positions), rows):
        logits = base.clone()
        want = []
        for r in range(rows):
            i = (start + r) % len(positions)
            later = positions[i:] if r % 2 == 0 else positions[i::7][:2] + [vocab - 1]
            logits[r, later] = 8.0
            want.append(positions[i])
        got = OPS.argmax(logits).tolist()
        wrong = [(r, got[r], want[r]) for r in range(rows) if got[r] != want[r]]
        assert not wrong, f"(row, got, first max) for chunk {chunk}: {wrong[:5]}"
        assert_same_as_torch(logits)


@pytest.mark.cuda
@pytest.mark.parametrize("vocab", [7, 32000, 128256])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_argmax_cuda_of_inf_and_nan_rows_follows_torch(dtype, vocab) -> None:
    chunk = _chunks(12, vocab, dtype)
    last = vocab - 1
    second_block = min(chunk + 3, last)
    logits = randn((12, vocab), dtype, "cuda", seed=5)
    logits[0] = -INF  # every value -inf: index 0
    logits[1] = -INF
    logits[1, last] = -1.0  # one finite value, at the end
    logits[2, [1, last]] = INF  # +inf twice: the first
    logits[3] = NAN  # all NaN: index 0
    logits[4, [last, second_block]] = NAN  # NaN beats the max; the first NaN
    logits[5, 0] = 100.0
    logits[5, last] = NAN  # a NaN after the max still wins
    logits[6, [second_block, last]] = INF
    logits[6, last] = NAN  # NaN beats +inf
    logits[7] = 0.0
    logits[7, :: max(1, vocab // 5)] = -0.0  # -0.0 == +0.0: index 0
    logits[8] = -0.0
    logits[8, last] = 0.0
    logits[9] = -INF
    logits[9, second_block] = NAN
    logits[10, 0] = NAN  # NaN at index 0
    logits[11] = torch.finfo(dtype).min  # the lowest finite value everywhere
    assert_same_as_torch(logits)
    got = OPS.argmax(logits).tolist()
    assert got[:4] == [0, last, min(1, last), 0]
    assert got[4] == min(last, second_block) and got[5] == last and got[10] == 0
    assert got[7] == 0 and got[8] == 0 and got[11] == 0


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_argmax_cuda_with_one_block_per_row_and_past_one_grid(dtype) -> None:
    # 600 rows: one block per row (no cross-block step) over a whole 32000-logit row
    logits = randn((600, 32000), dtype, "cuda", seed=6)
    logits[::3, 31999] = 50.0
    logits[1::3, [123, 31000]] = 50.0
    assert_same_as_torch(logits)
    # more rows than one grid of 2^20 blocks: the grid strides
    many = randn((2**20 + 37, 3), dtype, "cuda", seed=7)
    many[-1] = torch.tensor([0.0, 1.0, 1.0], dtype=dtype)
    assert_same_as_torch(many)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_argmax_cuda_reads_strided_and_misaligned_logits(dtype) -> None:
    # the last position of [rows, tokens, vocab]: rows 3 * vocab apart, read in place
    full = randn((5, 3, 32000), dtype, "cuda", seed=8)
    last = full[:, -1]
    assert not last.is_contiguous() and last.stride(-1) == 1
    assert_same_as_torch(last)
    # a row pitch that is not a whole number of 16-byte packs: element loads
    odd = randn((4, 32001), dtype, "cuda", seed=9)[:, :32000]
    assert_same_as_torch(odd)
    # one element past a 16-byte boundary: element loads
    shifted = randn((3 * 4096 + 1,), dtype, "cuda", seed=10)[1:].view(3, 4096)
    assert shifted.data_ptr() % 16 != 0
    assert_same_as_torch(shifted)
    # column-major: packed to rows first
    transposed = randn((4096, 6), dtype, "cuda", seed=11).t()
    assert transposed.stride(-1) != 1
    assert_same_as_torch(transposed)
    # vocab 1 with any stride, rows broadcast with stride 0
    one = full[:, -1, ::32000]
    assert one.shape == (5, 1) and one.stride() == (96000, 32000)
    assert OPS.argmax(one).tolist() == [0] * 5
    assert_same_as_torch(randn((1, 128256), dtype, "cuda", seed=12).expand(4, -1))


@pytest.mark.cuda
def test_argmax_cuda_of_no_rows_is_empty() -> None:
    out = OPS.argmax(torch.empty(0, 128256, device="cuda"))
    assert out.shape == (0,) and out.dtype == torch.int64 and out.is_cuda


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_argmax_cuda_repeats_its_answer(dtype) -> None:
    logits = (randn((16, 128256), dtype, "cuda", seed=13) * 0.05).round()  # many ties
    first = OPS.argmax(logits)
    for _ in range(20):
        assert torch.equal(OPS.argmax(logits), first)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_argmax_cuda_runs_on_the_logits_gpu() -> None:
    logits = randn((2, 128256), torch.bfloat16, "cuda:1", seed=14)
    with torch.cuda.device(0):
        out = OPS.argmax(logits)
    assert out.device == logits.device
    assert_same_as_torch(logits)


@pytest.mark.cuda
@pytest.mark.parametrize("case", BAD_CASES)
def test_argmax_cuda_rejects_bad_inputs(case) -> None:
    logits, message = _bad_inputs(_maker("cuda"))[case]
    with pytest.raises(ValueError, match=message):
        OPS.argmax(logits)


# ---------------------------------------------------------------------------------------------
# CUDA: opcheck, graphs, the engine


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(1, 128256), (3, 7), (16, 32000)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_argmax_cuda_opcheck(dtype, shape) -> None:
    torch.library.opcheck(OPS.argmax.default, (randn(shape, dtype, "cuda", seed=15),))


@pytest.mark.cuda
@pytest.mark.parametrize("rows,vocab", [(1, 128256), (16, 128256), (4, 32000), (33, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_argmax_cuda_graph_replays_with_new_logits(dtype, rows, vocab) -> None:
    logits = randn((rows, vocab), dtype, "cuda", seed=16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        OPS.argmax(logits)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = OPS.argmax(logits)
        # a second call in the graph may take the first's scratch: stream order separates them
        out_again = OPS.argmax(logits)
    for seed in range(17, 22):
        new = randn((rows, vocab), dtype, "cuda", seed=seed)
        if seed % 2:
            new[:, -1] = 9.0  # the max at the end, tied with row 0's below
        new[0, vocab // 2] = 9.0
        logits.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        want = reference(new)
        assert torch.equal(out.cpu(), want) and torch.equal(out_again.cpu(), want)


@pytest.mark.cuda
def test_argmax_dispatch_on_cuda(monkeypatch) -> None:
    logits = randn((2, 300), torch.bfloat16, "cuda", seed=22)
    assert argmax_mod.applies(logits) == argmax_mod.WITH_CUDA
    assert not argmax_mod.applies(logits.double())
    assert not argmax_mod.applies(logits[0])  # 1 dim: torch
    assert not argmax_mod.applies(logits[:, :0])  # empty vocab: torch's own error
    calls = []
    monkeypatch.setattr(argmax_mod, "_argmax", lambda x, *a: calls.append(1) or OPS.argmax(x, *a))
    assert torch.equal(argmax_mod.argmax(logits), logits.float().argmax(-1)) and calls
    # Settings(cuda_argmax=False): torch.argmax
    assert torch.equal(argmax_mod.argmax(logits, kernel=False), logits.float().argmax(-1))
    assert len(calls) == 1
    monkeypatch.setattr(argmax_mod, "WITH_CUDA", False)  # an extension built without CUDA
    assert not argmax_mod.applies(logits)
    assert torch.equal(argmax_mod.argmax(logits), logits.float().argmax(-1)) and len(calls) == 1


@pytest.mark.cuda
@pytest.mark.parametrize("cuda_graph", [True, False])
def test_model_greedy_generation_on_cuda_is_the_same_with_and_without_the_kernel(
        monkeypatch, cuda_graph) -> None:
    from toyllm.engine.generate import Engine
    from toyllm.models.config import ModelConfig
    from toyllm.models.llama import build_model

    config = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, intermediate_size=96, max_seq_len=64)
    model = build_model(config, device="cuda", dtype=torch.bfloat16, seed=3)
    model.init_weights(3, std=0.2)  # peaked logits: few near-ties
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    params = SamplingParams(max_new_tokens=24, stop_at_eos=False)
    calls = []
    monkeypatch.setattr(argmax_mod, "_argmax",
                        lambda x, *a: calls.append(x.dtype) or OPS.argmax(x, *a))
    on = Engine(model, cuda_graph=cuda_graph,
                settings=Settings(cuda_argmax=True)).generate(prompts, params)
    assert calls and set(calls) == {torch.bfloat16}  # the model's logits, not a float copy
    made = len(calls)
    collect_dead_graphs()  # the first engine, before the second captures
    off = Engine(model, cuda_graph=cuda_graph,
                 settings=Settings(cuda_argmax=False)).generate(prompts, params)
    assert len(calls) == made  # torch.argmax picked every token
    assert [c.token_ids for c in on.completions] == [c.token_ids for c in off.completions]


def test_engine_greedy_generation_on_the_cpu_takes_the_fp32_loop(monkeypatch) -> None:
    """fp32 CPU logits take the operator's CPU loop whatever Settings.cuda_argmax (a CUDA
    choice) says, and the tokens are the no-cache reference's."""
    from toyllm.engine.check.reference import reference_greedy
    from toyllm.engine.generate import Engine
    from toyllm.models.config import ModelConfig
    from toyllm.models.llama import build_model

    calls = []
    monkeypatch.setattr(argmax_mod, "_argmax_cpu",
                        lambda x, *a: calls.append(x.dtype) or OPS.argmax(x, *a))
    config = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, intermediate_size=96, max_seq_len=64)
    model = build_model(config, seed=3)
    model.init_weights(3, std=0.2)  # peaked logits: few near-ties
    params = SamplingParams(max_new_tokens=8, stop_at_eos=False)
    tokens = [Engine(model, settings=Settings(cuda_argmax=on)).generate([[5, 6, 7]], params)
              .completions[0].token_ids for on in (True, False)]
    assert calls and set(calls) == {torch.float32} and len(calls) == 2 * 8
    assert tokens[0] == tokens[1] == reference_greedy(model, [5, 6, 7], 8)[0]


# ---------------------------------------------------------------------------------------------
# flag_nonfinite: -1 for a row holding a NaN or an inf, found in the argmax pass itself


def flagged_reference(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax of the fp32 widening, -1 where the row is not all finite."""
    x = logits.detach().cpu().float()
    return x.argmax(dim=-1).masked_fill(~torch.isfinite(x).all(dim=-1), -1)


def _nonfinite_rows(dtype: torch.dtype, device: str, vocab: int, rows: int) -> torch.Tensor:
    """rows of random logits; every other row gets one NaN, +inf or -inf at a spot that moves
    over the row (so over the kernel's blocks), the rest stay finite."""
    logits = randn((rows, vocab), dtype, device, seed=11)
    kinds = [NAN, INF, -INF]
    for r in range(0, rows, 2):
        spot = (r * 7919) % vocab
        logits[r, spot] = kinds[(r // 2) % 3]
    return logits


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_argmax_cpu_flags_each_row_that_holds_a_nan_or_an_inf(dtype) -> None:
    logits = _nonfinite_rows(dtype, "cpu", 1000, 9)
    got = OPS.argmax(logits, True)
    assert torch.equal(got, flagged_reference(logits))
    assert got[::2].eq(-1).all() and got[1::2].ge(0).all()
    # without the flag: torch's answer, as before
    assert torch.equal(OPS.argmax(logits), reference(logits))
    assert torch.equal(argmax_mod.argmax(logits, flag_nonfinite=True), got)


def test_greedy_sample_flags_nonfinite_rows_and_keeps_the_others() -> None:
    logits = torch.zeros(3, 10)
    logits[:, 4] = 1.0
    logits[1, 7] = -INF  # only a -inf: still not a finite row
    got = sample(logits, SamplingParams(temperature=0.0), None).tolist()
    assert got == [4, -1, 4]


@pytest.mark.cuda
@pytest.mark.parametrize("vocab", [7, 32000, 128256, 128257])
@pytest.mark.parametrize("rows", [1, 2, 33])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_argmax_cuda_flags_each_row_that_holds_a_nan_or_an_inf(dtype, rows, vocab) -> None:
    logits = _nonfinite_rows(dtype, "cuda", vocab, rows)
    got = OPS.argmax(logits, True)
    assert torch.equal(got.cpu(), flagged_reference(logits))
    assert_same_as_torch(logits)  # the flag off: torch's answer
    if rows == 1:  # a -inf alone, in the last block of a row split over many
        one = randn((1, vocab), dtype, "cuda", seed=12)
        one[0, vocab - 1] = -INF
        assert OPS.argmax(one, True).item() == -1
        one[0, vocab - 1] = 0.0
        assert OPS.argmax(one, True).item() == reference(one).item()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_argmax_cuda_flag_in_a_graph_follows_new_logits(dtype) -> None:
    logits = randn((4, 128256), dtype, "cuda", seed=13)
    OPS.argmax(logits, True)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = OPS.argmax(logits, True)
    for seed in (14, 15):
        logits.copy_(randn((4, 128256), dtype, "cuda", seed=seed))
        logits[seed % 4, 1000 * seed] = NAN
        graph.replay()
        assert torch.equal(out.cpu(), flagged_reference(logits))
