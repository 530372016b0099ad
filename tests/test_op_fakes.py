"""The fakes of every toyllm:: operator (engine/ops/): under FakeTensorMode (CUDA tensors too: a
fake CUDA tensor needs no GPU) and on meta tensors, each gives its outputs' shape, dtype and
device, and nothing for the in-place kv_update. The fakes check nothing: what an operator says
on bad input is the C++ operator's alone, asserted in each operator's tests (the CPU operator
everywhere, the CUDA operator in `cuda`-marked tests); opcheck there compares each fake with
its operator on real tensors."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import toyllm.engine.ops  # noqa: F401  (loads the extension and registers the fakes)

OPS = torch.ops.toyllm
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5

Make = Callable[..., torch.Tensor]  # make(*shape, dtype=None) -> an empty tensor


def _cases(make: Make) -> dict[str, tuple[Callable[[], object], object]]:
    """op name -> (the call, what it returns: a tuple of output shapes, one shape, or None).

    A small model's shapes: 4 q heads and 2 KV heads of 64, hidden 256, caches of 16 positions;
    batches of 1 and 2 rows, prompts of 3 tokens."""
    i32 = torch.int32
    hq, hkv, d, n_in = 4, 2, 64, 256
    cache = (2, 16, hkv, d)
    rope_cache = (1, 16, hkv, d)
    qkv_out = (hq + 2 * hkv) * d
    x, r, g = make(1, 1, n_in), make(1, 1, n_in), make(n_in)
    return {
        "kv_update": (lambda: OPS.kv_update(make(*cache), make(*cache), make(2, 3, hkv, d),
                                            make(2, 3, hkv, d), make(2, dtype=i32)), None),
        "decode_attention": (lambda: OPS.decode_attention(
            make(2, hq, d), make(*cache), make(*cache), make(2, dtype=i32), 0.125), (2, hq, d)),
        "decode_attention (probe options)": (lambda: OPS.decode_attention(
            make(2, hq, d), make(*cache), make(*cache), make(2, dtype=i32), 0.125, 64, False,
            False), (2, hq, d)),
        "rms_norm": (lambda: OPS.rms_norm(make(2, 3, n_in), make(n_in), EPS), (2, 3, n_in)),
        "add_rms_norm": (lambda: OPS.add_rms_norm(make(2, 3, n_in), make(2, 3, n_in), make(n_in),
                                                  EPS), ((2, 3, n_in), (2, 3, n_in))),
        "rope": (lambda: OPS.rope(make(2, 3, hq, d), make(2, 3, 1, d), make(2, 3, 1, d)),
                 (2, 3, hq, d)),
        "silu_mul": (lambda: OPS.silu_mul(make(2, 3, 2 * n_in)), (2, 3, n_in)),
        "rope_kv_update": (lambda: OPS.rope_kv_update(
            make(2, 1, hq + 2 * hkv, d), make(2, 1, 1, d), make(2, 1, 1, d), make(*cache),
            make(*cache), make(2, dtype=i32), hq), (2, 1, hq, d)),
        "gemv": (lambda: OPS.gemv(make(2, 1, n_in), make(96, n_in)), (2, 1, 96)),
        "gemv_silu_mul": (lambda: OPS.gemv_silu_mul(make(2, 1, 2 * n_in), make(96, n_in)),
                          (2, 1, 96)),
        "gemv_add_rms_norm": (lambda: OPS.gemv_add_rms_norm(x, r, g, EPS, make(96, n_in)),
                              ((1, 1, n_in), (1, 1, 96))),
        "gemv_add_rms_norm (warps)": (lambda: OPS.gemv_add_rms_norm(x, r, g, EPS,
                                                                    make(96, n_in), 16),
                                      ((1, 1, n_in), (1, 1, 96))),
        "gemv_add_rms_norm_silu_mul": (lambda: OPS.gemv_add_rms_norm_silu_mul(
            x, r, g, EPS, make(96, n_in)), ((1, 1, n_in), (1, 1, 48))),
        "gemv_add_rms_norm_rope_kv": (lambda: OPS.gemv_add_rms_norm_rope_kv(
            x, r, g, EPS, make(qkv_out, n_in), make(1, 1, 1, d), make(1, 1, 1, d),
            make(*rope_cache), make(*rope_cache), make(1, dtype=i32), hq),
            ((1, 1, n_in), (1, 1, hq, d))),
        "paged_kv_write": (lambda: OPS.paged_kv_write(
            make(8, 16, hkv, d), make(8, 16, hkv, d), make(5, hkv, d), make(5, hkv, d),
            make(5, dtype=torch.int64)), None),
        "paged_decode_attention": (lambda: OPS.paged_decode_attention(
            make(2, hq, d), make(8, 16, hkv, d), make(8, 16, hkv, d), make(2, 4, dtype=i32),
            make(2, dtype=i32), 0.125), (2, hq, d)),
        "cpu_decode_step": (lambda: OPS.cpu_decode_step(
            make(1, 1, dtype=torch.int64), make(100, n_in),
            [g, make(qkv_out, n_in), make(n_in, hq * d), g, make(2 * 96, n_in), make(n_in, 96)],
            g, make(100, n_in), EPS, make(d // 2), [make(*rope_cache)], [make(*rope_cache)],
            make(1, dtype=i32), hq), (1, 1, 100)),
        "argmax": (lambda: OPS.argmax(make(16, 128256)), (16,)),
        "argmax (flag_nonfinite)": (lambda: OPS.argmax(make(3, 7), True), (3,)),
    }


CASES = list(_cases(lambda *shape, **kwargs: torch.empty(0)))


def _maker(device: str, dtype: torch.dtype) -> Make:
    def make(*shape: int, dtype: torch.dtype | None = dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

    return make


def _check_outputs(name: str, got: object, want: object, dtype: torch.dtype,
                   device: str) -> None:
    if want is None:
        assert got is None, name
        return
    outputs = got if isinstance(want[0], tuple) else (got,)
    shapes = want if isinstance(want[0], tuple) else (want,)
    assert len(outputs) == len(shapes), name
    out_dtype = torch.int64 if name.startswith("argmax") else dtype  # indices: int64
    for out, shape in zip(outputs, shapes, strict=True):
        assert isinstance(out, torch.Tensor), name
        assert tuple(out.shape) == shape, (name, tuple(out.shape), shape)
        assert out.dtype == out_dtype, (name, out.dtype)
        assert out.device.type == device, (name, out.device)
        assert out.is_contiguous(), name  # as the operators' outputs are


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("case", CASES)
def test_fake_gives_the_outputs_shape_dtype_and_device(case: str, device: str,
                                                       dtype: torch.dtype) -> None:
    with FakeTensorMode():
        call, want = _cases(_maker(device, dtype))[case]
        _check_outputs(case, call(), want, dtype, device)


@pytest.mark.parametrize("case", CASES)
def test_fake_gives_the_outputs_of_meta_tensors(case: str) -> None:
    call, want = _cases(_maker("meta", torch.bfloat16))[case]
    _check_outputs(case, call(), want, torch.bfloat16, "meta")


def test_fakes_leave_the_checks_to_the_operators() -> None:
    """Inputs each CUDA operator refuses (tests/test_cuda_gemv.py, test_argmax.py,
    test_kv_cache_spec.py assert its messages) trace without a word: the operator says what is
    wrong when it runs. Ranks the operators refuse do not crash the fakes either."""
    with FakeTensorMode():
        make = _maker("cuda", torch.bfloat16)
        assert OPS.gemv(make(5, 8), make(4, 8)).shape == (5, 4)  # more than 4 rows
        assert OPS.argmax(make(2, 8, dtype=torch.float64)).shape == (2,)
        assert OPS.kv_update(make(2, 6, 2, 8), make(2, 6, 2, 8), make(2, 1, 2, 8),
                             make(2, 1, 2, 8), make(2, dtype=torch.int64)) is None
        for call in (lambda: OPS.gemv(make(1, 8), make()), lambda: OPS.silu_mul(make()),
                     lambda: OPS.argmax(make()), lambda: OPS.rope_kv_update(
                         make(2), make(2), make(2), make(), make(), make(2), 4)):
            assert isinstance(call(), torch.Tensor)
