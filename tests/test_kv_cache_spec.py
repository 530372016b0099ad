"""KVCache against the FT-022 spec (position tracking, update, integration) and the FT-021
allocation scenarios it builds on; then batches, bad inputs, the operator's registration
(opcheck, torch.compile) and CUDA-graph capture.

Every test runs on the CPU; the `cuda` variants run where a GPU is present.
"""

from __future__ import annotations

import os

import pytest
import torch
from kv_reference import reference_update

from toyllm.engine.ops.kv_cache import KVCache, KVCacheOverflowError, kv_update

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ELEMENT_SIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def make_cache(
    device: str,
    num_layers: int = 2,
    max_seq_len: int = 10,
    num_kv_heads: int = 2,
    head_dim: int = 4,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 1,
) -> KVCache:
    return KVCache(
        num_layers=num_layers,
        max_seq_len=max_seq_len,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        device=device,
        batch_size=batch_size,
    )


def rows(
    cache: KVCache, num_tokens: int, seed: int, batch: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (new_k, new_v) [batch, num_tokens, heads, head_dim] matching the cache; no zeros,
    so a written row can never be mistaken for an unwritten one."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch or cache.batch_size, num_tokens, cache.num_kv_heads, cache.head_dim)
    k = torch.rand(shape, generator=g) + 1.0
    v = -(torch.rand(shape, generator=g) + 1.0)
    return k.to(cache.dtype).to(cache.device), v.to(cache.dtype).to(cache.device)


def snapshot(cache: KVCache) -> tuple[torch.Tensor, list[int], torch.Tensor, list[bool]]:
    return (
        cache.storage().clone(),
        cache.positions(),
        cache.device_positions().clone(),
        [cache.is_active(b) for b in range(cache.batch_size)],
    )


def assert_unchanged(cache: KVCache, before: tuple) -> None:
    storage, positions, device_positions, active = before
    assert torch.equal(cache.storage(), storage)
    assert cache.positions() == positions
    assert torch.equal(cache.device_positions(), device_positions)
    assert [cache.is_active(b) for b in range(cache.batch_size)] == active


def is_zero(t: torch.Tensor) -> bool:
    return bool((t == 0).all())


# =============================================================================================
# FT-022 cache management: position tracking, overflow, invalid advance, reset
# =============================================================================================


@pytest.mark.parametrize("device", DEVICES)
def test_new_cache_starts_at_position_zero_with_full_capacity(device: str) -> None:
    cache = make_cache(device, max_seq_len=10)
    assert cache.position() == 0
    assert not cache.is_full()
    assert cache.remaining_capacity() == 10


@pytest.mark.parametrize("device", DEVICES)
def test_advance_by_one_moves_position_by_one(device: str) -> None:
    cache = make_cache(device, max_seq_len=10)
    cache.advance_position()
    assert cache.position() == 1
    assert cache.remaining_capacity() == 9
    cache.advance_position(1)
    assert cache.position() == 2
    assert cache.device_positions().tolist() == [2]


@pytest.mark.parametrize("device", DEVICES)
def test_advance_by_n_moves_position_by_n_and_shrinks_capacity(device: str) -> None:
    cache = make_cache(device, max_seq_len=10)
    cache.advance_position(3)
    assert cache.position() == 3
    assert cache.remaining_capacity() == 7
    cache.advance_position(7)
    assert cache.position() == 10
    assert cache.is_full()
    assert cache.remaining_capacity() == 0
    assert cache.device_positions().tolist() == [10]


@pytest.mark.parametrize("device", DEVICES)
def test_advance_one_past_the_end_raises_overflow_and_keeps_position(device: str) -> None:
    cache = make_cache(device, max_seq_len=10)
    cache.advance_position(10)
    assert cache.is_full()
    with pytest.raises(KVCacheOverflowError) as info:
        cache.advance_position(1)
    assert isinstance(info.value, OverflowError)
    message = str(info.value)
    assert message.startswith("KV cache overflow: ")
    assert "position 10" in message and "n=1" in message and "max_seq_len is 10" in message
    assert cache.position() == 10
    assert cache.device_positions().tolist() == [10]


@pytest.mark.parametrize("device", DEVICES)
def test_advance_many_past_the_end_raises_overflow_and_keeps_position(device: str) -> None:
    cache = make_cache(device, max_seq_len=10)
    cache.advance_position(7)
    with pytest.raises(KVCacheOverflowError, match=r"^KV cache overflow: .*position 7.*n=4"):
        cache.advance_position(4)
    assert cache.position() == 7
    assert cache.remaining_capacity() == 3
    cache.advance_position(3)  # exactly the remaining capacity still fits
    assert cache.is_full()


@pytest.mark.parametrize("device", DEVICES)
def test_advance_by_zero_raises_value_error_and_keeps_position(device: str) -> None:
    cache = make_cache(device)
    cache.advance_position(2)
    with pytest.raises(ValueError, match=r"expected n >= 1, got 0"):
        cache.advance_position(0)
    assert cache.position() == 2
    assert cache.device_positions().tolist() == [2]


@pytest.mark.parametrize("device", DEVICES)
def test_advance_by_negative_raises_value_error_and_keeps_position(device: str) -> None:
    cache = make_cache(device)
    cache.advance_position(2)
    with pytest.raises(ValueError, match=r"expected n >= 1, got -3"):
        cache.advance_position(-3)
    assert cache.position() == 2
    assert cache.device_positions().tolist() == [2]


@pytest.mark.parametrize("device", DEVICES)
def test_reset_returns_position_to_zero(device: str) -> None:
    cache = make_cache(device, max_seq_len=10)
    cache.advance_position(10)
    cache.reset()
    assert cache.position() == 0
    assert cache.remaining_capacity() == 10
    assert not cache.is_full()
    assert cache.device_positions().tolist() == [0]


@pytest.mark.parametrize("device", DEVICES)
def test_reset_zeroes_every_layer_keys_and_values(device: str) -> None:
    cache = make_cache(device, num_layers=3)
    for layer in range(3):
        k, v = rows(cache, 4, seed=layer)
        cache.update(layer, k, v)
    cache.advance_position(4)
    assert not is_zero(cache.storage())
    cache.reset()
    for layer in range(3):
        assert is_zero(cache.keys(layer)) and is_zero(cache.values(layer))


# =============================================================================================
# FT-022 update kernel
# =============================================================================================


@pytest.mark.parametrize("device", DEVICES)
def test_update_single_token_single_head_writes_row_zero_without_advancing(device: str) -> None:
    cache = make_cache(device, num_kv_heads=1, head_dim=8)
    k, v = rows(cache, 1, seed=0)
    cache.update(0, k, v)
    assert torch.equal(cache.keys(0)[:, 0], k[:, 0])
    assert torch.equal(cache.values(0)[:, 0], v[:, 0])
    assert is_zero(cache.keys(0)[:, 1:]) and is_zero(cache.values(0)[:, 1:])
    assert cache.position() == 0  # update never advances


@pytest.mark.parametrize("device", DEVICES)
def test_update_prefill_writes_every_token_in_order(device: str) -> None:
    cache = make_cache(device, max_seq_len=16)
    k, v = rows(cache, 7, seed=1)
    cache.update(0, k, v)
    assert torch.equal(cache.keys(0)[:, :7], k)
    assert torch.equal(cache.values(0)[:, :7], v)
    assert is_zero(cache.keys(0)[:, 7:]) and is_zero(cache.values(0)[:, 7:])


@pytest.mark.parametrize("device", DEVICES)
def test_sequential_decode_updates_fill_consecutive_rows(device: str) -> None:
    cache = make_cache(device, max_seq_len=8)
    written = []
    for step in range(5):
        k, v = rows(cache, 1, seed=100 + step)
        cache.update(0, k, v)
        cache.advance_position(1)
        written.append((k, v))
    for step, (k, v) in enumerate(written):
        assert torch.equal(cache.keys(0)[:, step], k[:, 0])
        assert torch.equal(cache.values(0)[:, step], v[:, 0])
    assert is_zero(cache.keys(0)[:, 5:])


@pytest.mark.parametrize("device", DEVICES)
def test_update_at_nonzero_position_writes_there_and_keeps_earlier_rows(device: str) -> None:
    cache = make_cache(device, max_seq_len=12)
    first_k, first_v = rows(cache, 5, seed=2)
    cache.update(0, first_k, first_v)
    cache.advance_position(5)
    k, v = rows(cache, 3, seed=3)
    cache.update(0, k, v)
    assert torch.equal(cache.keys(0)[:, :5], first_k)
    assert torch.equal(cache.keys(0)[:, 5:8], k)
    assert torch.equal(cache.values(0)[:, 5:8], v)
    assert is_zero(cache.keys(0)[:, 8:])


@pytest.mark.parametrize("device", DEVICES)
def test_update_with_many_heads_keeps_each_head_in_its_slot(device: str) -> None:
    cache = make_cache(device, num_kv_heads=8, head_dim=16)
    k = torch.arange(8, dtype=torch.float32).view(1, 1, 8, 1).expand(1, 3, 8, 16) + 1
    k = k.contiguous().to(device)
    v = -k
    cache.update(0, k, v)
    for head in range(8):
        assert bool((cache.keys(0)[0, :3, head] == head + 1).all())
        assert bool((cache.values(0)[0, :3, head] == -(head + 1)).all())


@pytest.mark.parametrize("device", DEVICES)
def test_update_of_one_layer_leaves_other_layers_untouched(device: str) -> None:
    cache = make_cache(device, num_layers=4)
    per_layer = [rows(cache, 2, seed=10 + layer) for layer in range(4)]
    cache.update(2, *per_layer[2])
    assert is_zero(cache.keys(0)) and is_zero(cache.keys(1)) and is_zero(cache.keys(3))
    assert is_zero(cache.values(0)) and is_zero(cache.values(1)) and is_zero(cache.values(3))
    for layer in (0, 1, 3):
        cache.update(layer, *per_layer[layer])
    for layer in range(4):
        assert torch.equal(cache.keys(layer)[:, :2], per_layer[layer][0])
        assert torch.equal(cache.values(layer)[:, :2], per_layer[layer][1])


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_then_decode_rows_follow_the_prompt(device: str) -> None:
    cache = make_cache(device, max_seq_len=10)
    prompt_k, prompt_v = rows(cache, 4, seed=20)
    cache.update(0, prompt_k, prompt_v)
    cache.advance_position(4)
    decode = [rows(cache, 1, seed=21 + i) for i in range(3)]
    for k, v in decode:
        cache.update(0, k, v)
        cache.advance_position()
    expected_k = torch.cat([prompt_k] + [k for k, _ in decode], dim=1)
    expected_v = torch.cat([prompt_v] + [v for _, v in decode], dim=1)
    assert torch.equal(cache.keys(0)[:, :7], expected_k)
    assert torch.equal(cache.values(0)[:, :7], expected_v)
    assert cache.position() == 7


# =============================================================================================
# FT-022 integration
# =============================================================================================


@pytest.mark.parametrize("device", DEVICES)
def test_full_generation_cycle_fills_every_layer_until_full_then_overflows(device: str) -> None:
    cache = make_cache(device, num_layers=3, max_seq_len=9, dtype=torch.float16)
    expected = {layer: ([], []) for layer in range(3)}
    prompt = {layer: rows(cache, 4, seed=30 + layer) for layer in range(3)}
    for layer, (k, v) in prompt.items():
        cache.update(layer, k, v)
        expected[layer][0].append(k)
        expected[layer][1].append(v)
    cache.advance_position(4)
    step = 0
    while not cache.is_full():
        for layer in range(3):
            k, v = rows(cache, 1, seed=1000 + 10 * step + layer)
            cache.update(layer, k, v)
            expected[layer][0].append(k)
            expected[layer][1].append(v)
        cache.advance_position()
        step += 1
    assert step == 5 and cache.position() == 9
    for layer in range(3):
        assert torch.equal(cache.keys(layer), torch.cat(expected[layer][0], dim=1))
        assert torch.equal(cache.values(layer), torch.cat(expected[layer][1], dim=1))
    with pytest.raises(KVCacheOverflowError):
        cache.update(0, *rows(cache, 1, seed=99))
    with pytest.raises(KVCacheOverflowError):
        cache.advance_position()


@pytest.mark.parametrize("device", DEVICES)
def test_reset_and_reuse_second_sequence_sees_nothing_of_the_first(device: str) -> None:
    cache = make_cache(device, max_seq_len=8)
    cache.update(0, *rows(cache, 8, seed=40))
    cache.advance_position(8)
    cache.reset()
    k, v = rows(cache, 3, seed=41)
    cache.update(0, k, v)
    cache.advance_position(3)
    assert cache.position() == 3
    assert torch.equal(cache.keys(0)[:, :3], k)
    assert torch.equal(cache.values(0)[:, :3], v)
    assert is_zero(cache.keys(0)[:, 3:]) and is_zero(cache.values(0)[:, 3:])


# =============================================================================================
# FT-021 size calculation (4)
# =============================================================================================


def test_bytes_required_matches_the_layout_formula() -> None:
    # layers * (K, V) * batch * seq * heads * head_dim * element size
    assert KVCache.bytes_required(2, 10, 2, 4, torch.float16) == 2 * 2 * 1 * 10 * 2 * 4 * 2
    assert (
        KVCache.bytes_required(
            num_layers=3,
            max_seq_len=5,
            num_kv_heads=7,
            head_dim=11,
            dtype=torch.float32,
            batch_size=2,
        )
        == 3 * 2 * 2 * 5 * 7 * 11 * 4
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_bytes_required_scales_with_the_dtype_element_size(dtype: torch.dtype) -> None:
    base = KVCache.bytes_required(4, 32, 8, 64, torch.float32) // 4
    assert KVCache.bytes_required(4, 32, 8, 64, dtype) == base * ELEMENT_SIZE[dtype]


def test_bytes_required_is_linear_in_every_dimension() -> None:
    args = dict(num_layers=2, max_seq_len=16, num_kv_heads=4, head_dim=8, batch_size=3)
    base = KVCache.bytes_required(dtype=torch.bfloat16, **args)
    for name in args:
        doubled = dict(args, **{name: args[name] * 2})
        assert KVCache.bytes_required(dtype=torch.bfloat16, **doubled) == 2 * base, name


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"num_layers": 0}, r"expected num_layers >= 1, got 0"),
        ({"max_seq_len": -5}, r"expected max_seq_len >= 1, got -5"),
        ({"num_kv_heads": 0}, r"expected num_kv_heads >= 1, got 0"),
        ({"head_dim": 0}, r"expected head_dim >= 1, got 0"),
        ({"batch_size": 0}, r"expected batch_size >= 1, got 0"),
        ({"dtype": torch.int32}, r"expected dtype torch.float32, .* got torch.int32"),
        ({"dtype": torch.float64}, r"expected dtype .* got torch.float64"),
    ],
)
def test_bytes_required_rejects_non_positive_sizes_and_unsupported_dtypes(
    overrides: dict, pattern: str
) -> None:
    args = dict(num_layers=2, max_seq_len=8, num_kv_heads=2, head_dim=4, dtype=torch.float16)
    with pytest.raises(ValueError, match=pattern):
        KVCache.bytes_required(**{**args, **overrides})


# =============================================================================================
# FT-021 allocation (2)
# =============================================================================================


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_allocation_has_the_requested_shape_dtype_and_device(device: str, dtype) -> None:
    cache = make_cache(
        device, num_layers=3, max_seq_len=6, num_kv_heads=2, head_dim=5, dtype=dtype, batch_size=2
    )
    assert (cache.num_layers, cache.max_seq_len, cache.num_kv_heads, cache.head_dim) == (
        3,
        6,
        2,
        5,
    )
    assert cache.batch_size == 2 and cache.dtype == dtype
    assert cache.device.type == device
    assert cache.storage().shape == (3, 2, 2, 6, 2, 5)
    for layer in range(3):
        for view in (cache.keys(layer), cache.values(layer)):
            assert view.shape == (2, 6, 2, 5)
            assert view.dtype == dtype and view.device.type == device
            assert view.is_contiguous()
    assert cache.device_positions().dtype == torch.int32
    assert cache.device_positions().device == cache.device


@pytest.mark.parametrize(
    "overrides, error, pattern",
    [
        ({"num_layers": 0}, ValueError, r"expected num_layers >= 1, got 0"),
        ({"max_seq_len": 0}, ValueError, r"expected max_seq_len >= 1, got 0"),
        ({"num_kv_heads": -1}, ValueError, r"expected num_kv_heads >= 1, got -1"),
        ({"head_dim": 0}, ValueError, r"expected head_dim >= 1, got 0"),
        ({"batch_size": 0}, ValueError, r"expected batch_size >= 1, got 0"),
        ({"dtype": torch.int64}, ValueError, r"expected dtype .* got torch.int64"),
        ({"device": "meta"}, ValueError, r"expected device cpu or cuda, got meta"),
        ({"device": "not-a-device"}, ValueError, r"expected device .* got 'not-a-device'"),
        (
            {"device": "cuda:99"},
            ValueError,
            r"expected .*(CUDA device index in \[0, \d+\), "
            r"got 99|device cpu|visible CUDA device)",
        ),
        ({"device": 3.5}, TypeError, r"expected device as a torch.device or a string"),
        ({"num_layers": 2.5}, TypeError, r"num_layers|incompatible"),
    ],
)
def test_constructor_rejects_invalid_arguments_naming_expected_and_given(
    overrides: dict, error: type, pattern: str
) -> None:
    args = dict(
        num_layers=2, max_seq_len=8, num_kv_heads=2, head_dim=4, dtype=torch.float16, device="cpu"
    )
    with pytest.raises(error, match=pattern):
        KVCache(**{**args, **overrides})


# =============================================================================================
# FT-021 layer views (3)
# =============================================================================================


@pytest.mark.parametrize("device", DEVICES)
def test_layer_views_tile_one_allocation_without_overlap(device: str) -> None:
    cache = make_cache(
        device,
        num_layers=3,
        max_seq_len=5,
        num_kv_heads=2,
        head_dim=4,
        dtype=torch.float16,
        batch_size=2,
    )
    base = cache.storage().data_ptr()
    view_bytes = 2 * 5 * 2 * 4 * 2  # batch * seq * heads * head_dim * 2 bytes
    for layer in range(3):
        k, v = cache.keys(layer), cache.values(layer)
        assert k.untyped_storage().data_ptr() == cache.storage().untyped_storage().data_ptr()
        assert k.data_ptr() == base + (2 * layer) * view_bytes
        assert v.data_ptr() == base + (2 * layer + 1) * view_bytes
    assert cache.bytes_allocated() == 3 * 2 * view_bytes


@pytest.mark.parametrize("device", DEVICES)
def test_layer_views_alias_the_cache_memory(device: str) -> None:
    cache = make_cache(device, num_layers=2)
    cache.keys(1)[0, 3, 1, 2] = 5.0
    cache.values(0)[0, 9, 0, 0] = -7.0
    assert float(cache.keys(1)[0, 3, 1, 2]) == 5.0  # a fresh view sees the write
    assert float(cache.values(0)[0, 9, 0, 0]) == -7.0
    assert is_zero(cache.keys(0)) and is_zero(cache.values(1))
    assert int((cache.storage() != 0).sum()) == 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer", [-1, 3, 100])
def test_layer_index_out_of_range_raises_index_error_naming_the_range(
    device: str, layer: int
) -> None:
    cache = make_cache(device, num_layers=3)
    pattern = rf"expected a layer index in \[0, 3\), got {layer}"
    with pytest.raises(IndexError, match=pattern):
        cache.keys(layer)
    with pytest.raises(IndexError, match=pattern):
        cache.values(layer)
    before = snapshot(cache)
    with pytest.raises(IndexError, match=pattern):
        cache.update(layer, *rows(cache, 1, seed=0))
    assert_unchanged(cache, before)


# =============================================================================================
# FT-021 zero initialisation (3)
# =============================================================================================


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_new_cache_keys_are_zero_in_every_layer(device: str, dtype: torch.dtype) -> None:
    cache = make_cache(device, num_layers=3, dtype=dtype)
    assert all(is_zero(cache.keys(layer)) for layer in range(3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_new_cache_values_are_zero_in_every_layer(device: str, dtype: torch.dtype) -> None:
    cache = make_cache(device, num_layers=3, dtype=dtype)
    assert all(is_zero(cache.values(layer)) for layer in range(3))


@pytest.mark.parametrize("device", DEVICES)
def test_new_cache_is_zero_even_on_memory_reused_from_a_dirty_cache(device: str) -> None:
    shape = dict(num_layers=2, max_seq_len=64, num_kv_heads=4, head_dim=32, batch_size=2)
    dirty = make_cache(device, **shape)
    dirty.storage().fill_(3.0)
    del dirty  # the caching allocator (CUDA) may hand the same block to the next cache
    fresh = make_cache(device, **shape)
    assert is_zero(fresh.storage())


# =============================================================================================
# FT-021 memory accounting (3)
# =============================================================================================


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bytes_allocated_equals_bytes_required(device: str, dtype: torch.dtype) -> None:
    args = dict(num_layers=3, max_seq_len=7, num_kv_heads=2, head_dim=6, batch_size=2)
    cache = make_cache(device, dtype=dtype, **args)
    assert cache.bytes_allocated() == KVCache.bytes_required(dtype=dtype, **args)


@pytest.mark.parametrize("device", DEVICES)
def test_bytes_allocated_is_the_real_size_of_the_storage(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        allocated_before = torch.cuda.memory_allocated()
    cache = make_cache(
        device, num_layers=4, max_seq_len=128, num_kv_heads=4, head_dim=64, dtype=torch.float16
    )
    assert cache.bytes_allocated() == 4 * 2 * 128 * 4 * 64 * 2
    assert cache.storage().untyped_storage().nbytes() == cache.bytes_allocated()
    # (without the caching allocator, as under compute-sanitizer, torch does not count bytes)
    if device == "cuda" and os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") != "1":
        grown = torch.cuda.memory_allocated() - allocated_before
        assert grown >= cache.bytes_allocated()


@pytest.mark.parametrize("device", DEVICES)
def test_use_never_reallocates_the_storage_or_the_device_positions(device: str) -> None:
    cache = make_cache(device, batch_size=2)
    storage_ptr = cache.storage().data_ptr()
    positions_ptr = cache.device_positions().data_ptr()
    bytes_before = cache.bytes_allocated()
    cache.update(0, *rows(cache, 3, seed=1))
    cache.advance_position(3)
    cache.set_active(1, False)
    cache.advance_sequence(0, 2)
    cache.reset_sequence(1)
    cache.reset()
    assert cache.storage().data_ptr() == storage_ptr
    assert cache.device_positions().data_ptr() == positions_ptr
    assert cache.bytes_allocated() == bytes_before


# =============================================================================================
# FT-021 realistic model shapes (2)
# =============================================================================================


@pytest.mark.parametrize("device", DEVICES)
def test_llama_1b_shape_allocates_64_mib_and_round_trips_rows(device: str) -> None:
    # Llama-3.2-1B: 16 layers, 8 KV heads x 64, 2048 context, bf16.
    cache = make_cache(
        device, num_layers=16, max_seq_len=2048, num_kv_heads=8, head_dim=64, dtype=torch.bfloat16
    )
    assert cache.bytes_allocated() == 64 * 2**20
    k, v = rows(cache, 100, seed=5)
    cache.update(15, k, v)
    cache.advance_position(100)
    k2, v2 = rows(cache, 1, seed=6)
    cache.update(15, k2, v2)
    assert torch.equal(cache.keys(15)[:, :100], k)
    assert torch.equal(cache.values(15)[:, 100], v2[:, 0])
    assert is_zero(cache.keys(14))


@pytest.mark.parametrize("device", DEVICES)
def test_stories15m_shape_full_context_prefill_round_trips(device: str) -> None:
    # stories15M: 6 layers, 6 heads x 48, 256 context, fp32.
    cache = make_cache(device, num_layers=6, max_seq_len=256, num_kv_heads=6, head_dim=48)
    written = [rows(cache, 256, seed=50 + layer) for layer in range(6)]
    for layer, (k, v) in enumerate(written):
        cache.update(layer, k, v)
    cache.advance_position(256)
    assert cache.is_full()
    for layer, (k, v) in enumerate(written):
        assert torch.equal(cache.keys(layer), k) and torch.equal(cache.values(layer), v)


# =============================================================================================
# FT-021 edge cases (3)
# =============================================================================================


@pytest.mark.parametrize("device", DEVICES)
def test_cache_of_one_slot_is_full_after_one_token(device: str) -> None:
    cache = make_cache(device, max_seq_len=1)
    k, v = rows(cache, 1, seed=7)
    cache.update(0, k, v)
    cache.advance_position()
    assert cache.is_full() and cache.remaining_capacity() == 0
    assert torch.equal(cache.keys(0), k)
    before = snapshot(cache)
    with pytest.raises(KVCacheOverflowError, match=r"cannot write n=1 tokens at position 1"):
        cache.update(0, k, v)
    assert_unchanged(cache, before)


@pytest.mark.parametrize("device", DEVICES)
def test_minimal_shape_of_one_layer_one_head_one_dim_works(device: str) -> None:
    cache = make_cache(device, num_layers=1, max_seq_len=3, num_kv_heads=1, head_dim=1)
    assert cache.bytes_allocated() == 2 * 3 * 4
    for step in range(3):
        cache.update(0, *rows(cache, 1, seed=step))
        cache.advance_position()
    assert cache.is_full()
    assert bool((cache.keys(0) >= 1).all()) and bool((cache.values(0) <= -1).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", [3, 40, 72])
def test_odd_head_dim_fp16_prefill_to_exact_capacity_then_one_more_overflows(
    device: str, head_dim: int
) -> None:
    cache = make_cache(
        device, max_seq_len=5, num_kv_heads=1, head_dim=head_dim, dtype=torch.float16
    )
    k, v = rows(cache, 5, seed=8)
    cache.update(1, k, v)  # exactly max_seq_len tokens fit
    assert torch.equal(cache.keys(1), k) and torch.equal(cache.values(1), v)
    cache.advance_position(5)
    with pytest.raises(KVCacheOverflowError):
        cache.update(1, *rows(cache, 1, seed=9))


# =============================================================================================
# Batches: ragged positions, inactive sequences, per-sequence calls
# =============================================================================================


@pytest.mark.parametrize("device", DEVICES)
def test_batched_update_writes_each_sequence_at_its_own_position(device: str) -> None:
    cache = make_cache(device, max_seq_len=12, batch_size=3)
    cache.advance_sequence(1, 4)
    cache.advance_sequence(2, 9)
    assert cache.positions() == [0, 4, 9]
    assert cache.device_positions().tolist() == [0, 4, 9]
    k, v = rows(cache, 3, seed=60)
    cache.update(1, k, v)
    for b, p in enumerate([0, 4, 9]):
        assert torch.equal(cache.keys(1)[b, p : p + 3], k[b])
        assert torch.equal(cache.values(1)[b, p : p + 3], v[b])
        assert int((cache.keys(1)[b] != 0).any(dim=(1, 2)).sum()) == 3
    cache.advance_position(3)
    assert cache.positions() == [3, 7, 12]
    assert cache.sequence_is_full(2) and cache.sequence_remaining_capacity(0) == 9


@pytest.mark.parametrize("device", DEVICES)
def test_batched_update_skips_inactive_sequences(device: str) -> None:
    cache = make_cache(device, max_seq_len=6, batch_size=3)
    cache.set_active(1, False)
    assert not cache.is_active(1) and cache.is_active(0)
    assert cache.device_positions().tolist() == [0, -1, 0]
    k, v = rows(cache, 2, seed=61)
    cache.update(0, k, v)
    assert is_zero(cache.keys(0)[1]) and is_zero(cache.values(0)[1])
    assert torch.equal(cache.keys(0)[0, :2], k[0]) and torch.equal(cache.keys(0)[2, :2], k[2])
    cache.advance_position(2)
    assert cache.positions() == [2, 0, 2]  # the inactive sequence did not move
    assert cache.device_positions().tolist() == [2, -1, 2]
    cache.set_active(1, True)
    assert cache.device_positions().tolist() == [2, 0, 2]


@pytest.mark.parametrize("device", DEVICES)
def test_full_inactive_sequence_does_not_block_the_others(device: str) -> None:
    cache = make_cache(device, max_seq_len=4, batch_size=2)
    cache.advance_sequence(0, 4)
    cache.set_active(0, False)
    cache.update(0, *rows(cache, 2, seed=62))  # sequence 0 is full but inactive: skipped
    cache.advance_position(2)
    assert cache.positions() == [4, 2]


@pytest.mark.parametrize("device", DEVICES)
def test_per_sequence_update_writes_only_that_sequence(device: str) -> None:
    cache = make_cache(device, max_seq_len=8, batch_size=3)
    cache.advance_sequence(2, 3)
    k, v = rows(cache, 4, seed=63, batch=1)
    cache.update(0, k, v, seq=2)
    assert torch.equal(cache.keys(0)[2, 3:7], k[0])
    assert torch.equal(cache.values(0)[2, 3:7], v[0])
    assert is_zero(cache.keys(0)[:2]) and is_zero(cache.values(0)[:2])
    assert is_zero(cache.keys(0)[2, :3]) and is_zero(cache.keys(0)[2, 7:])
    assert cache.positions() == [0, 0, 3]


@pytest.mark.parametrize("device", DEVICES)
def test_per_sequence_update_of_an_inactive_or_missing_sequence_raises(device: str) -> None:
    cache = make_cache(device, batch_size=2)
    cache.set_active(1, False)
    k, v = rows(cache, 1, seed=64, batch=1)
    before = snapshot(cache)
    with pytest.raises(ValueError, match=r"expected an active sequence 1, got an inactive one"):
        cache.update(0, k, v, seq=1)
    with pytest.raises(IndexError, match=r"expected a sequence index in \[0, 2\), got 2"):
        cache.update(0, k, v, seq=2)
    with pytest.raises(ValueError, match=r"expected new_k of shape \[1, num_tokens >= 1, 2, 4\]"):
        cache.update(0, *rows(cache, 1, seed=65), seq=0)  # batch 2 rows for a single sequence
    assert_unchanged(cache, before)


@pytest.mark.parametrize("device", DEVICES)
def test_reset_sequence_zeroes_only_that_sequence_and_reactivates_it(device: str) -> None:
    cache = make_cache(device, num_layers=2, max_seq_len=6, batch_size=3)
    for layer in range(2):
        cache.update(layer, *rows(cache, 4, seed=70 + layer))
    cache.advance_position(4)
    cache.set_active(1, False)
    kept = cache.storage().clone()
    cache.reset_sequence(1)
    assert cache.positions() == [4, 0, 4] and cache.is_active(1)
    assert cache.device_positions().tolist() == [4, 0, 4]
    for layer in range(2):
        assert is_zero(cache.keys(layer)[1]) and is_zero(cache.values(layer)[1])
    assert torch.equal(cache.storage()[:, :, 0], kept[:, :, 0])
    assert torch.equal(cache.storage()[:, :, 2], kept[:, :, 2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("call", ["position", "is_full", "remaining_capacity"])
def test_single_sequence_calls_on_a_batch_point_to_per_sequence_calls(
    device: str, call: str
) -> None:
    cache = make_cache(device, batch_size=2)
    with pytest.raises(
        ValueError,
        match=r"expected a cache with batch_size 1, got batch_size 2; "
        r"use positions\(\), sequence_position\(b\)",
    ):
        getattr(cache, call)()


@pytest.mark.parametrize("device", DEVICES)
def test_batch_advance_that_overflows_one_sequence_moves_none(device: str) -> None:
    cache = make_cache(device, max_seq_len=5, batch_size=3)
    cache.advance_sequence(1, 4)
    before = snapshot(cache)
    with pytest.raises(
        KVCacheOverflowError,
        match=r"^KV cache overflow: cannot advance sequence 1 from position 4 by "
        r"n=2 \(to 6\): max_seq_len is 5",
    ):
        cache.advance_position(2)
    assert_unchanged(cache, before)
    with pytest.raises(KVCacheOverflowError, match=r"position 4 of sequence 1"):
        cache.update(0, *rows(cache, 2, seed=71))
    assert_unchanged(cache, before)


@pytest.mark.parametrize("device", DEVICES)
def test_per_sequence_advance_checks_its_arguments_and_keeps_state(device: str) -> None:
    cache = make_cache(device, max_seq_len=5, batch_size=2)
    cache.advance_sequence(0, 5)
    before = snapshot(cache)
    with pytest.raises(KVCacheOverflowError, match=r"sequence 0 from position 5 by n=1"):
        cache.advance_sequence(0)
    with pytest.raises(ValueError, match=r"expected n >= 1, got 0"):
        cache.advance_sequence(1, 0)
    with pytest.raises(IndexError, match=r"expected a sequence index in \[0, 2\), got -1"):
        cache.advance_sequence(-1)
    for call in (
        "sequence_position",
        "sequence_is_full",
        "sequence_remaining_capacity",
        "is_active",
        "reset_sequence",
    ):
        with pytest.raises(IndexError, match=r"got 2"):
            getattr(cache, call)(2)
    with pytest.raises(IndexError):
        cache.set_active(2, True)
    assert_unchanged(cache, before)


# =============================================================================================
# Bad inputs to KVCache.update: a clear error, and nothing written
# =============================================================================================


def _bad_update_inputs(cache: KVCache, case: str) -> tuple[int, torch.Tensor, torch.Tensor, str]:
    """(layer, new_k, new_v, message pattern) for one kind of bad input to a cache of
    2 layers, batch 1, 2 heads x 4, float32, 10 slots at position 8."""
    k, v = rows(cache, 1, seed=80)
    if case == "dtype":
        return 0, k.half(), v, r"expected new_k of dtype torch.float32 .*got torch.float16"
    if case == "device":
        return 0, k, v.to("meta"), rf"expected new_v on {cache.device} .*got meta"
    if case == "heads":
        bad = torch.ones(1, 1, 3, 4, device=cache.device)
        return (
            0,
            bad,
            bad,
            (r"expected new_k of shape \[1, num_tokens >= 1, 2, 4\], got \[1, 1, 3, 4\]"),
        )
    if case == "head_dim":
        bad = torch.ones(1, 1, 2, 5, device=cache.device)
        return (
            0,
            k,
            bad,
            (r"expected new_v of shape \[1, num_tokens >= 1, 2, 4\], got \[1, 1, 2, 5\]"),
        )
    if case == "batch":
        bad = torch.ones(2, 1, 2, 4, device=cache.device)
        return 0, bad, bad, r"expected new_k of shape \[1, .*got \[2, 1, 2, 4\]"
    if case == "rank":
        return (
            0,
            k[0],
            v[0],
            (r"expected new_k of shape \[1, num_tokens >= 1, 2, 4\], got \[1, 2, 4\]"),
        )
    if case == "zero_tokens":
        empty = torch.ones(1, 0, 2, 4, device=cache.device)
        return 0, empty, empty, r"expected new_k of shape .*got \[1, 0, 2, 4\]"
    if case == "token_mismatch":
        two = torch.ones(1, 2, 2, 4, device=cache.device)
        return 0, k, two, r"expected new_v with new_k's 1 tokens, got 2"
    if case == "non_contiguous":
        wide = torch.ones(1, 1, 4, 2, device=cache.device).transpose(2, 3)
        return 0, k, wide, r"expected a contiguous new_v, got strides"
    if case == "layer":
        return 2, k, v, r"expected a layer index in \[0, 2\), got 2"
    if case == "overflow":
        three = torch.ones(1, 3, 2, 4, device=cache.device)
        return 0, three, three, r"^KV cache overflow: cannot write n=3 tokens at position 8 "
    raise AssertionError(case)


BAD_UPDATE_CASES = [
    ("dtype", ValueError),
    ("device", ValueError),
    ("heads", ValueError),
    ("head_dim", ValueError),
    ("batch", ValueError),
    ("rank", ValueError),
    ("zero_tokens", ValueError),
    ("token_mismatch", ValueError),
    ("non_contiguous", ValueError),
    ("layer", IndexError),
    ("overflow", KVCacheOverflowError),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case, error", BAD_UPDATE_CASES)
def test_bad_update_raises_naming_expected_and_given_and_writes_nothing(
    device: str, case: str, error: type
) -> None:
    cache = make_cache(device)
    cache.update(0, *rows(cache, 8, seed=81))
    cache.advance_position(8)
    before = snapshot(cache)
    layer, new_k, new_v, pattern = _bad_update_inputs(cache, case)
    with pytest.raises(error, match=pattern):
        cache.update(layer, new_k, new_v)
    assert_unchanged(cache, before)


# =============================================================================================
# The operator: bad inputs, CPU range check, opcheck, torch.compile
# =============================================================================================


def _op_args(device: str, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(90)
    return {
        "k_cache": torch.zeros(2, 6, 2, 8, dtype=dtype, device=device),
        "v_cache": torch.zeros(2, 6, 2, 8, dtype=dtype, device=device),
        "new_k": torch.randn(2, 3, 2, 8, generator=g).to(dtype).to(device),
        "new_v": torch.randn(2, 3, 2, 8, generator=g).to(dtype).to(device),
        "positions": torch.tensor([1, 3], dtype=torch.int32, device=device),
    }


def _replace(**changes):
    """A bad-input case: replaces some op arguments by functions of the good ones."""

    def apply(args: dict[str, torch.Tensor]) -> None:
        made = {name: make(args) for name, make in changes.items()}
        args.update(made)

    return apply


def _zeros(*shape: int):
    return lambda a: torch.zeros(shape, dtype=a["k_cache"].dtype, device=a["k_cache"].device)


BAD_OP_CASES = {
    "cache_rank": (
        _replace(k_cache=lambda a: a["k_cache"][0]),
        r"expected k_cache of 4 dims .*got shape \[6, 2, 8\]",
    ),
    "v_cache_shape": (
        _replace(v_cache=_zeros(2, 5, 2, 8)),
        r"expected v_cache of k_cache's shape \[2, 6, 2, 8\], got \[2, 5, 2, 8\]",
    ),
    "new_k_heads": (
        _replace(new_k=_zeros(2, 3, 1, 8)),
        r"expected new_k of shape \[2, num_tokens, 2, 8\] .*got \[2, 3, 1, 8\]",
    ),
    "new_v_shape": (
        _replace(new_v=_zeros(2, 2, 2, 8)),
        r"expected new_v of new_k's shape \[2, 3, 2, 8\], got \[2, 2, 2, 8\]",
    ),
    "zero_tokens": (
        _replace(new_k=_zeros(2, 0, 2, 8), new_v=_zeros(2, 0, 2, 8)),
        r"expected num_tokens \(new_k.size\(1\)\) >= 1, got 0",
    ),
    "too_many_tokens": (
        _replace(new_k=_zeros(2, 7, 2, 8), new_v=_zeros(2, 7, 2, 8)),
        r"expected num_tokens <= max_seq_len 6, got 7",
    ),
    "new_k_dtype": (
        _replace(new_k=lambda a: a["new_k"].float()),
        r"expected new_k of dtype torch.float16 .*got torch.float32",
    ),
    "v_cache_dtype": (
        _replace(v_cache=lambda a: a["v_cache"].bfloat16()),
        r"expected v_cache of dtype torch.float16 .*got torch.bfloat16",
    ),
    "cache_non_contiguous": (
        _replace(k_cache=lambda a: _zeros(2, 2, 6, 8)(a).transpose(1, 2)),
        r"expected a contiguous k_cache, got strides",
    ),
    "new_non_contiguous": (
        _replace(new_k=lambda a: _zeros(2, 2, 3, 8)(a).transpose(1, 2)),
        r"expected a contiguous new_k, got strides",
    ),
    "positions_dtype": (
        _replace(positions=lambda a: a["positions"].long()),
        r"expected positions of dtype torch.int32, got torch.int64",
    ),
    "positions_shape": (
        _replace(positions=lambda a: a["positions"][:1]),
        r"expected positions of shape \[2\] \(the cache's batch\), got \[1\]",
    ),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(BAD_OP_CASES))
def test_op_rejects_bad_input_naming_expected_and_given_and_writes_nothing(
    device: str, case: str
) -> None:
    args = _op_args(device)
    make_bad, pattern = BAD_OP_CASES[case]
    make_bad(args)
    caches_before = (args["k_cache"].clone(), args["v_cache"].clone())
    with pytest.raises(ValueError, match=pattern):
        kv_update(**args)
    assert torch.equal(args["k_cache"], caches_before[0])
    assert torch.equal(args["v_cache"], caches_before[1])


@pytest.mark.cuda
@pytest.mark.parametrize(
    "name, whose",
    [("v_cache", "k_cache's"), ("new_k", "the cache's"), ("new_v", "the cache's"),
     ("positions", "the cache's")],
)
def test_op_on_cuda_rejects_an_argument_on_the_cpu_and_writes_nothing(name: str,
                                                                       whose: str) -> None:
    # (the dispatcher hands a call with any CUDA tensor to the CUDA operator, which checks)
    args = _op_args("cuda")
    args[name] = args[name].cpu()
    caches_before = (args["k_cache"].clone(), args["v_cache"].clone())
    with pytest.raises(ValueError, match=rf"expected {name} on cuda:0 \({whose} device\), "
                                         r"got cpu"):
        kv_update(**args)
    assert torch.equal(args["k_cache"], caches_before[0])
    assert torch.equal(args["v_cache"], caches_before[1])


def test_op_on_cpu_rejects_a_position_whose_rows_pass_the_end_and_writes_nothing() -> None:
    args = _op_args("cpu")
    args["positions"] = torch.tensor([0, 4], dtype=torch.int32)  # 4 + 3 > 6
    with pytest.raises(
        ValueError,
        match=r"expected positions\[1\] \+ num_tokens <= max_seq_len 6 "
        r".*got 4 \+ 3 = 7",
    ):
        kv_update(**args)
    assert is_zero(args["k_cache"]) and is_zero(args["v_cache"])


@pytest.mark.cuda
def test_op_on_cuda_skips_a_sequence_whose_rows_would_pass_the_end() -> None:
    args = _op_args("cuda")
    args["positions"] = torch.tensor([0, 4], dtype=torch.int32, device="cuda")
    kv_update(**args)
    assert torch.equal(args["k_cache"][0, :3], args["new_k"][0])
    assert torch.equal(args["v_cache"][0, :3], args["new_v"][0])
    assert is_zero(args["k_cache"][1]) and is_zero(args["v_cache"][1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_matches_the_reference_with_a_skipped_row(device: str, dtype: torch.dtype) -> None:
    args = _op_args(device, dtype)
    args["positions"] = torch.tensor([-1, 2], dtype=torch.int32, device=device)
    expected = {name: t.clone() for name, t in args.items()}
    reference_update(**expected)
    kv_update(**args)
    assert torch.equal(args["k_cache"], expected["k_cache"])
    assert torch.equal(args["v_cache"], expected["v_cache"])
    assert is_zero(args["k_cache"][0])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_accepts_the_kv_update_operator(device: str) -> None:
    args = _op_args(device)
    torch.library.opcheck(torch.ops.toyllm.kv_update.default, tuple(args.values()))


def _write_step(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    kv_update(k_cache, v_cache, new_k, new_v, positions)
    return k_cache.float().sum() + v_cache.float().sum()


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_traces_the_op_in_one_graph_and_matches_eager(device: str) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(_write_step, backend="aot_eager", fullgraph=True)
    args = _op_args(device)
    expected = {name: t.clone() for name, t in args.items()}
    total = compiled(**args)
    reference_update(**expected)
    assert torch.equal(args["k_cache"], expected["k_cache"])
    assert torch.equal(args["v_cache"], expected["v_cache"])
    expected_total = expected["k_cache"].float().sum() + expected["v_cache"].float().sum()
    assert torch.allclose(total, expected_total)


@pytest.mark.slow
def test_torch_compile_with_inductor_writes_the_cache_in_place() -> None:
    torch._dynamo.reset()
    compiled = torch.compile(_write_step, fullgraph=True)
    args = _op_args("cpu", torch.float32)
    expected = {name: t.clone() for name, t in args.items()}
    compiled(**args)
    reference_update(**expected)
    assert torch.equal(args["k_cache"], expected["k_cache"])
    assert torch.equal(args["v_cache"], expected["v_cache"])


# =============================================================================================
# CUDA graphs: the update reads positions on the device, so a replay writes at the new ones
# =============================================================================================


@pytest.mark.cuda
def test_cuda_graph_replay_writes_at_positions_advanced_between_replays() -> None:
    cache = make_cache(
        "cuda",
        num_layers=2,
        max_seq_len=16,
        num_kv_heads=2,
        head_dim=8,
        dtype=torch.float16,
        batch_size=3,
    )
    cache.advance_sequence(1, 5)
    cache.set_active(2, False)
    static_k = torch.zeros(3, 1, 2, 8, dtype=torch.float16, device="cuda")
    static_v = torch.zeros_like(static_k)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture, as the CUDA-graph docs ask
        cache.update(1, static_k, static_v)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cache.update(1, static_k, static_v)

    steps = [rows(cache, 1, seed=200 + i) for i in range(4)]
    for k, v in steps:
        static_k.copy_(k)
        static_v.copy_(v)
        graph.replay()
        cache.advance_position()
    torch.cuda.synchronize()

    assert cache.positions() == [4, 9, 0]
    for b, start in ((0, 0), (1, 5)):
        for i, (k, v) in enumerate(steps):
            assert torch.equal(cache.keys(1)[b, start + i], k[b, 0])
            assert torch.equal(cache.values(1)[b, start + i], v[b, 0])
    assert is_zero(cache.keys(1)[2]) and is_zero(cache.values(1)[2])  # inactive: never written
    assert is_zero(cache.keys(0))  # the captured update was for layer 1 only
