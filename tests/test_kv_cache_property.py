"""Property: for random shapes, dtypes, batches, ragged (and inactive) positions and token
counts, the kv_update operator leaves the caches bit-for-bit equal to the pure-PyTorch
reference write, starting from caches full of random bytes (so untouched rows are checked too,
and NaN payloads must survive the copy)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kv_reference import reference_update

from toyllm.engine.ops.kv_cache import kv_update

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Odd sizes on purpose: rows of 3 x 2 bytes force the narrowest copy units on CUDA.
HEAD_DIMS = [1, 3, 8, 40, 64, 72, 128]


def random_bytes(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """A tensor of `dtype` whose bits are uniformly random (NaNs and infinities included)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (*shape, itemsize), dtype=torch.uint8, generator=g)
    return raw.view(dtype).squeeze(-1)


def as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


@st.composite
def kv_update_cases(draw: st.DrawFn) -> dict:
    batch = draw(st.integers(1, 4))
    max_seq_len = draw(st.integers(1, 24))
    num_tokens = draw(st.integers(1, max_seq_len))
    positions = draw(
        st.lists(
            st.one_of(st.just(-1), st.integers(0, max_seq_len - num_tokens)),
            min_size=batch,
            max_size=batch,
        )
    )
    return {
        "batch": batch,
        "max_seq_len": max_seq_len,
        "num_tokens": num_tokens,
        "num_kv_heads": draw(st.integers(1, 4)),
        "head_dim": draw(st.sampled_from(HEAD_DIMS)),
        "dtype": draw(st.sampled_from(DTYPES)),
        "positions": positions,
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, deadline=None)
@given(case=kv_update_cases())
def test_kv_update_is_bit_identical_to_the_reference_write(device: str, case: dict) -> None:
    g = torch.Generator().manual_seed(case["seed"])
    heads, dim, dtype = case["num_kv_heads"], case["head_dim"], case["dtype"]
    cache_shape = (case["batch"], case["max_seq_len"], heads, dim)
    new_shape = (case["batch"], case["num_tokens"], heads, dim)
    k_cache = random_bytes(cache_shape, dtype, g).to(device)
    v_cache = random_bytes(cache_shape, dtype, g).to(device)
    new_k = random_bytes(new_shape, dtype, g).to(device)
    new_v = random_bytes(new_shape, dtype, g).to(device)
    positions = torch.tensor(case["positions"], dtype=torch.int32, device=device)

    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    reference_update(expected_k, expected_v, new_k, new_v, positions)
    kv_update(k_cache, v_cache, new_k, new_v, positions)

    assert torch.equal(as_bits(k_cache), as_bits(expected_k))
    assert torch.equal(as_bits(v_cache), as_bits(expected_v))


@pytest.mark.cuda
def test_more_sequences_than_one_launch_takes_are_all_written() -> None:
    # 2 * 40000 (sequence, K/V) pairs: more than a grid's 65535 rows, so the launcher splits
    # them over two launches; every sequence (and a skipped one, position -1) must come out
    # exactly as the reference write.
    batch, max_seq_len, heads, dim = 40000, 3, 1, 8
    k = torch.zeros(batch, max_seq_len, heads, dim, dtype=torch.float16, device="cuda")
    v = torch.zeros_like(k)
    new_k = torch.randn(batch, 1, heads, dim, device="cuda").half()
    new_v = torch.randn(batch, 1, heads, dim, device="cuda").half()
    positions = (torch.arange(batch, device="cuda") % max_seq_len).int()
    positions[39999] = -1
    k_ref, v_ref = k.clone(), v.clone()
    rows = torch.arange(batch - 1, device="cuda")  # the active ones (the last is skipped)
    k_ref[rows, positions[:-1].long()] = new_k[:-1, 0]
    v_ref[rows, positions[:-1].long()] = new_v[:-1, 0]
    kv_update(k, v, new_k, new_v, positions)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
