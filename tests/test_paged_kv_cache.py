"""PagedKVCache, the host class: the allocator keeps reference counts equal to the references
that sequences and outside holders (a prefix cache) have, over random sequences of allocate /
reserve / advance / truncate / fork / copy-on-write / append / free (hypothesis state machine);
a full pool refills to 100% after random frees (no fragmentation); reserve is all or nothing;
copy_on_write copies every layer's K and V; the device mirrors follow sync_device() and keep
their addresses; every bad argument raises before anything changes."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from toyllm.engine.ops.paged_cache import PagedCacheFullError, PagedKVCache

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_cache(
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    num_layers: int = 2,
    num_blocks: int = 8,
    block_size: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 8,
    max_seqs: int = 4,
    max_blocks_per_seq: int = 6,
) -> PagedKVCache:
    return PagedKVCache(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype,
                        device, max_seqs, max_blocks_per_seq)


def snapshot(cache: PagedKVCache) -> tuple:
    """Everything the host side of the cache knows, to compare before and after a failed call."""
    seqs = [s for s in range(cache.max_seqs) if cache.is_sequence(s)]
    return (
        [cache.ref_count(b) for b in range(cache.num_blocks)],
        cache.num_free_blocks(),
        [(s, cache.sequence_blocks(s), cache.sequence_length(s)) for s in seqs],
    )


# --- construction --------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_new_cache_is_zeroed_with_views_into_one_allocation(device: str, dtype: torch.dtype):
    cache = make_cache(device, dtype)
    storage = cache.storage()
    assert storage.shape == (2, 2, 8, 4, 2, 8) and storage.dtype == dtype
    assert storage.device.type == device and not storage.any()
    for layer in range(2):
        k, v = cache.key_pool(layer), cache.value_pool(layer)
        assert k.shape == v.shape == (8, 4, 2, 8) and k.is_contiguous() and v.is_contiguous()
        assert k.data_ptr() == storage[layer, 0].data_ptr()
        assert v.data_ptr() == storage[layer, 1].data_ptr()
    elem = torch.empty((), dtype=dtype).element_size()
    assert cache.bytes_per_block() == 2 * 2 * 4 * 2 * 8 * elem
    assert cache.bytes_per_block() == PagedKVCache.block_bytes(2, 4, 2, 8, dtype)
    assert cache.bytes_allocated() == 8 * cache.bytes_per_block() == storage.nbytes
    assert cache.bytes_used() == 0 and cache.bytes_free() == cache.bytes_allocated()
    assert cache.num_free_blocks() == 8 and cache.num_used_blocks() == 0
    tables, lengths = cache.block_tables(), cache.sequence_lengths()
    assert tables.shape == (4, 6) and tables.dtype == torch.int32
    assert lengths.shape == (4,) and lengths.dtype == torch.int32
    assert tables.device.type == device and lengths.device.type == device
    assert bool((tables == -1).all()) and not lengths.any()
    assert (cache.num_blocks, cache.block_size, cache.max_seqs, cache.max_blocks_per_seq) == (
        8, 4, 4, 6)
    assert "PagedKVCache(num_layers=2, num_blocks=8, block_size=4" in repr(cache)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_layers": 0}, "expected num_layers >= 1, got 0"),
        ({"num_blocks": 0}, "expected num_blocks >= 1, got 0"),
        ({"num_blocks": 2**31}, "expected num_blocks <= 2147483647 (block ids are int32)"),
        ({"block_size": 0}, "expected block_size >= 1, got 0"),
        ({"block_size": 12}, "expected block_size a power of two"),
        ({"block_size": -4}, "expected block_size >= 1, got -4"),
        ({"num_kv_heads": 0}, "expected num_kv_heads >= 1, got 0"),
        ({"head_dim": -1}, "expected head_dim >= 1, got -1"),
        ({"max_seqs": 0}, "expected max_seqs >= 1, got 0"),
        ({"max_blocks_per_seq": 0}, "expected max_blocks_per_seq >= 1, got 0"),
        ({"max_blocks_per_seq": 2**30}, "expected max_blocks_per_seq * block_size <= 2147483647"),
    ],
)
def test_bad_sizes_raise_value_error_naming_expected_and_given(change: dict, message: str):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_cache(**change)


def test_bad_dtype_and_device_raise_value_error():
    with pytest.raises(ValueError, match="expected dtype torch.float32, torch.float16 or "
                                         "torch.bfloat16, got torch.int32"):
        make_cache(dtype=torch.int32)
    with pytest.raises(ValueError, match="PagedKVCache: expected device cpu or cuda, got meta"):
        make_cache(device="meta")
    with pytest.raises(ValueError, match="PagedKVCache: expected device 'cpu', 'cuda'"):
        make_cache(device="gpu0")
    with pytest.raises(TypeError, match="PagedKVCache: expected device as a torch.device"):
        make_cache(device=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="PagedKVCache: expected dtype"):
        PagedKVCache.block_bytes(1, 4, 1, 8, torch.float64)


# --- allocator -------------------------------------------------------------------------------


def test_allocate_incref_decref_count_references_and_free_at_zero():
    cache = make_cache(num_blocks=3)
    a = cache.allocate_block()
    assert cache.ref_count(a) == 1 and cache.num_used_blocks() == 1
    cache.incref(a)
    assert cache.ref_count(a) == 2
    assert cache.decref(a) == 1 and cache.num_free_blocks() == 2
    assert cache.decref(a) == 0 and cache.num_free_blocks() == 3
    got = sorted(cache.allocate_block() for _ in range(3))
    assert got == [0, 1, 2] and cache.bytes_free() == 0
    assert cache.bytes_used() == 3 * cache.bytes_per_block()
    with pytest.raises(PagedCacheFullError, match="paged KV cache full: cannot allocate a block "
                                                  r"\(0 of 3 blocks free"):
        cache.allocate_block()
    assert isinstance(PagedCacheFullError("x"), RuntimeError)


def test_bad_block_ids_and_free_blocks_raise():
    cache = make_cache(num_blocks=4)
    for call in (cache.ref_count, cache.incref, cache.decref):
        with pytest.raises(ValueError, match=r"expected a block id in \[0, num_blocks 4\), got 4"):
            call(4)
        with pytest.raises(ValueError, match=r"expected a block id in \[0, num_blocks 4\), got -1"):
            call(-1)
    with pytest.raises(ValueError, match=r"decref: expected an allocated block \(reference count "
                                         r">= 1\), got free block 2"):
        cache.decref(2)
    with pytest.raises(ValueError, match="incref: expected an allocated block"):
        cache.incref(2)
    assert cache.num_free_blocks() == 4


@settings(max_examples=40, deadline=None)
@given(num_blocks=st.integers(1, 64), seed=st.integers(0, 2**31 - 1))
def test_a_full_pool_freed_at_random_refills_to_100_percent(num_blocks: int, seed: int):
    """No fragmentation: whatever blocks were freed, every one of them can be allocated again,
    through sequences (reserve) as well as one at a time."""
    g = torch.Generator().manual_seed(seed)
    cache = make_cache(num_blocks=num_blocks, block_size=2, max_seqs=num_blocks,
                       max_blocks_per_seq=num_blocks)
    blocks = [cache.allocate_block() for _ in range(num_blocks)]
    assert sorted(blocks) == list(range(num_blocks)) and cache.num_free_blocks() == 0
    for _ in range(3):
        order = torch.randperm(num_blocks, generator=g).tolist()
        freed = order[: int(torch.randint(1, num_blocks + 1, (1,), generator=g))]
        for i in freed:
            assert cache.decref(blocks[i]) == 0
        assert cache.num_free_blocks() == len(freed)
        # Refill: half through a sequence's reserve (all of it at once), the rest one by one.
        seq = cache.add_sequence()
        through_seq = len(freed) // 2
        cache.reserve(seq, through_seq * 2)
        refill = cache.sequence_blocks(seq)
        refill += [cache.allocate_block() for _ in range(len(freed) - through_seq)]
        assert cache.num_free_blocks() == 0 and cache.bytes_free() == 0
        assert sorted(refill) == sorted(blocks[i] for i in freed)
        # The sequence's blocks become outside references again (as before the round).
        for b in cache.sequence_blocks(seq):
            cache.incref(b)
        cache.free_sequence(seq)
        for i, b in zip(freed, refill, strict=True):
            blocks[i] = b
        assert sorted(blocks) == list(range(num_blocks))
        assert all(cache.ref_count(b) == 1 for b in blocks)


# --- sequences -------------------------------------------------------------------------------


def test_reserve_advance_slot_mapping_and_free():
    cache = make_cache(num_blocks=8, block_size=4)
    seq = cache.add_sequence()
    assert cache.sequence_length(seq) == 0 and cache.sequence_blocks(seq) == []
    cache.reserve(seq, 0)  # a no-op
    assert cache.sequence_blocks(seq) == []
    cache.reserve(seq, 6)
    blocks = cache.sequence_blocks(seq)
    assert len(blocks) == 2 and cache.sequence_capacity(seq) == 8
    cache.reserve(seq, 8)  # already there: nothing more
    assert cache.sequence_blocks(seq) == blocks
    slots = cache.slot_mapping(seq, 2, 5)
    want = [blocks[p // 4] * 4 + p % 4 for p in range(2, 7)]
    assert slots == want
    cache.advance(seq, 6)
    assert cache.sequence_length(seq) == 6
    cache.advance(seq, 0)
    cache.reserve(seq, 3)  # 9 tokens: a third block
    assert len(cache.sequence_blocks(seq)) == 3 and cache.num_used_blocks() == 3
    cache.free_sequence(seq)
    assert cache.num_free_blocks() == 8 and not cache.is_sequence(seq)
    assert all(cache.ref_count(b) == 0 for b in range(8))


def test_reserve_is_all_or_nothing():
    cache = make_cache(num_blocks=5, block_size=4, max_blocks_per_seq=4)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.reserve(a, 9)  # 3 blocks
    cache.advance(a, 9)
    cache.reserve(b, 1)  # 1 block: 1 free left
    before = snapshot(cache)
    with pytest.raises(PagedCacheFullError, match="cannot reserve n=9 tokens for sequence 1 at "
                                                  "length 0: it needs 2 more blocks"):
        cache.reserve(b, 9)
    assert snapshot(cache) == before
    with pytest.raises(PagedCacheFullError, match="max_blocks_per_seq 4 \\* block_size 4 = 16"):
        cache.reserve(a, 8)  # 17 tokens > 16
    assert snapshot(cache) == before
    cache.reserve(a, 7)  # 16 tokens: the last free block
    assert cache.num_free_blocks() == 0


def test_sequence_slots_run_out_and_come_back():
    cache = make_cache(max_seqs=2)
    seqs = [cache.add_sequence(), cache.add_sequence()]
    assert sorted(seqs) == [0, 1] and cache.num_sequences() == 2
    with pytest.raises(PagedCacheFullError, match="cannot add a sequence, all max_seqs 2 slots"):
        cache.add_sequence()
    with pytest.raises(PagedCacheFullError, match="cannot add a sequence"):
        cache.fork(seqs[0])
    cache.free_sequence(seqs[1])
    assert cache.add_sequence() == seqs[1]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c, s: c.advance(s, 9), r"advance: expected n <= 8 \(the room reserved for "
                                        r"sequence 0: capacity 8 - length 0; call reserve first\)"
                                        ", got 9"),
        (lambda c, s: c.advance(s, -1), "advance: expected n >= 0, got -1"),
        (lambda c, s: c.reserve(s, -2), "reserve: expected n >= 0, got -2"),
        (lambda c, s: c.truncate(s, 1), r"truncate: expected a length in \[0, 0\]"),
        (lambda c, s: c.truncate(s, -1), r"truncate: expected a length in \[0, 0\]"),
        (lambda c, s: c.slot_mapping(s, 0, 9), r"slot_mapping: expected positions start \.\. "
                                                r"start \+ n - 1 in the reserved room \[0, 8\)"),
        (lambda c, s: c.slot_mapping(s, -1, 1), "slot_mapping: expected positions"),
        (lambda c, s: c.slot_mapping(s, 2, -1), "slot_mapping: expected positions"),
        (lambda c, s: c.append_block(s, 7), "append_block: expected an allocated block"),
        (lambda c, s: c.append_block(s, 8), r"append_block: expected a block id in \[0, "),
        (lambda c, s: c.key_pool(2), r"key_pool: expected a layer index in \[0, 2\), got 2"),
        (lambda c, s: c.value_pool(-1), r"value_pool: expected a layer index in \[0, 2\)"),
    ],
)
def test_bad_sequence_arguments_raise_before_any_change(call, message: str):
    cache = make_cache(num_blocks=8, block_size=4)
    seq = cache.add_sequence()
    cache.reserve(seq, 8)
    before = snapshot(cache)
    with pytest.raises(ValueError, match=message):
        call(cache, seq)
    assert snapshot(cache) == before


@pytest.mark.parametrize(
    "name",
    ["free_sequence", "sequence_length", "sequence_blocks", "sequence_capacity", "fork",
     "copy_on_write", "reserve", "advance", "truncate", "slot_mapping", "append_block"],
)
def test_sequence_slots_out_of_range_or_free_raise(name: str):
    cache = make_cache(max_seqs=3)
    extra = {"reserve": (1,), "advance": (1,), "truncate": (0,), "slot_mapping": (0, 0),
             "append_block": (0,)}.get(name, ())
    cache.allocate_block()  # block 0, for append_block
    before = snapshot(cache)
    with pytest.raises(ValueError, match=rf"{name}: expected a sequence slot in \[0, max_seqs 3\)"
                                         ", got 3"):
        getattr(cache, name)(3, *extra)
    with pytest.raises(ValueError, match=rf"{name}: expected a sequence slot in \[0, max_seqs 3\)"
                                         ", got -1"):
        getattr(cache, name)(-1, *extra)
    with pytest.raises(ValueError, match=rf"{name}: expected a sequence in use \(from "
                                         r"add_sequence or fork\), got free slot 1"):
        getattr(cache, name)(1, *extra)
    assert snapshot(cache) == before


def test_truncate_drops_blocks_no_longer_needed():
    cache = make_cache(num_blocks=8, block_size=4)
    seq = cache.add_sequence()
    cache.reserve(seq, 14)  # 4 blocks
    cache.advance(seq, 10)
    blocks = cache.sequence_blocks(seq)
    cache.truncate(seq, 5)  # keeps 2 blocks; the reserved 4th and the 3rd go
    assert cache.sequence_blocks(seq) == blocks[:2] and cache.sequence_length(seq) == 5
    assert [cache.ref_count(b) for b in blocks] == [1, 1, 0, 0]
    cache.truncate(seq, 4)
    assert cache.sequence_blocks(seq) == blocks[:1]
    cache.truncate(seq, 0)
    assert cache.sequence_blocks(seq) == [] and cache.num_free_blocks() == 8


def test_fork_shares_the_blocks_with_tokens_and_copy_on_write_unshares():
    cache = make_cache(num_blocks=8, block_size=4)
    parent = cache.add_sequence()
    cache.reserve(parent, 12)  # 3 blocks, 6 tokens written: the 3rd is reserved room
    cache.advance(parent, 6)
    blocks = cache.sequence_blocks(parent)
    child = cache.fork(parent)
    assert cache.sequence_blocks(child) == blocks[:2] and cache.sequence_length(child) == 6
    assert [cache.ref_count(b) for b in blocks] == [2, 2, 1]
    assert cache.copy_on_write(child)  # position 6: block 1, shared
    fresh = cache.sequence_blocks(child)[1]
    assert fresh not in blocks and [cache.ref_count(b) for b in blocks] == [2, 1, 1]
    assert cache.ref_count(fresh) == 1
    assert not cache.copy_on_write(child)  # its own now
    assert not cache.copy_on_write(parent)  # block 1 is the parent's alone now
    cache.truncate(child, 4)
    cache.reserve(child, 1)  # position 4: a fresh block 1 (the copy was dropped)
    assert cache.sequence_blocks(child)[0] == blocks[0]
    cache.truncate(child, 3)  # position 3: in block 0, shared with the parent
    assert cache.copy_on_write(child)
    assert cache.ref_count(blocks[0]) == 1
    # A sequence at a block boundary: the next token's block is not reserved, nothing to copy.
    other = cache.fork(parent)
    cache.truncate(other, 4)
    assert not cache.copy_on_write(other)


def test_copy_on_write_with_a_full_pool_raises_and_changes_nothing():
    cache = make_cache(num_blocks=2, block_size=4)
    parent = cache.add_sequence()
    cache.reserve(parent, 2)
    cache.advance(parent, 2)
    child = cache.fork(parent)
    cache.allocate_block()  # the last free block
    before = snapshot(cache)
    with pytest.raises(PagedCacheFullError, match="cannot copy shared block 0 of sequence 1 on "
                                                  "write"):
        cache.copy_on_write(child)
    assert snapshot(cache) == before


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_on_write_copies_every_layer_k_and_v(device: str, dtype: torch.dtype):
    cache = make_cache(device, dtype, num_layers=3, num_blocks=4, block_size=4)
    g = torch.Generator().manual_seed(0)
    cache.storage().copy_(torch.randn(cache.storage().shape, generator=g).to(dtype))
    parent = cache.add_sequence()
    cache.reserve(parent, 3)
    cache.advance(parent, 3)
    child = cache.fork(parent)
    old = cache.sequence_blocks(parent)[0]
    before = cache.storage().clone()
    assert cache.copy_on_write(child)
    new = cache.sequence_blocks(child)[0]
    after = cache.storage()
    assert torch.equal(after[:, :, new], before[:, :, old])
    untouched = [b for b in range(4) if b != new]
    assert torch.equal(after[:, :, untouched], before[:, :, untouched])


def test_append_block_adopts_full_blocks_after_full_blocks_only():
    cache = make_cache(num_blocks=8, block_size=4, max_blocks_per_seq=3)
    cached = [cache.allocate_block() for _ in range(3)]  # a prefix cache's blocks
    seq = cache.add_sequence()
    cache.append_block(seq, cached[0])
    cache.append_block(seq, cached[1])
    assert cache.sequence_blocks(seq) == cached[:2] and cache.sequence_length(seq) == 8
    assert [cache.ref_count(b) for b in cached] == [2, 2, 1]
    cache.reserve(seq, 1)
    before = snapshot(cache)
    with pytest.raises(ValueError, match=r"append_block: expected sequence 0 with every block "
                                         r"full \(length == 12, its 3 blocks \* block_size 4\), "
                                         "got length 8"):
        cache.append_block(seq, cached[2])
    assert snapshot(cache) == before
    cache.advance(seq, 4)
    with pytest.raises(PagedCacheFullError, match="cannot append block 2 to sequence 0: it holds "
                                                  "3 blocks, max_blocks_per_seq is 3"):
        cache.append_block(seq, cached[2])
    cache.free_sequence(seq)
    assert [cache.ref_count(b) for b in cached] == [1, 1, 1]


@pytest.mark.parametrize("device", DEVICES)
def test_device_mirrors_follow_sync_device_and_keep_their_addresses(device: str):
    cache = make_cache(device, num_blocks=8, block_size=4, max_seqs=3, max_blocks_per_seq=4)
    tables, lengths = cache.block_tables(), cache.sequence_lengths()
    addresses = (tables.data_ptr(), lengths.data_ptr())

    def expected() -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.full((3, 4), -1, dtype=torch.int32)
        n = torch.zeros(3, dtype=torch.int32)
        for s in range(3):
            if cache.is_sequence(s):
                blocks = cache.sequence_blocks(s)
                t[s, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
                n[s] = cache.sequence_length(s)
        return t, n

    a = cache.add_sequence()
    cache.reserve(a, 5)
    cache.advance(a, 5)
    assert bool((tables == -1).all())  # nothing synced yet
    cache.sync_device()
    want_t, want_n = expected()
    assert torch.equal(tables.cpu(), want_t) and torch.equal(lengths.cpu(), want_n)
    b = cache.fork(a)
    cache.copy_on_write(b)
    c = cache.add_sequence()
    cache.reserve(c, 16)
    cache.advance(c, 16)
    cache.truncate(a, 2)
    cache.sync_device()
    want_t, want_n = expected()
    assert torch.equal(tables.cpu(), want_t) and torch.equal(lengths.cpu(), want_n)
    cache.free_sequence(b)
    cache.advance(a, 1)
    cache.sync_device()
    want_t, want_n = expected()
    assert torch.equal(tables.cpu(), want_t) and torch.equal(lengths.cpu(), want_n)
    assert (cache.block_tables().data_ptr(), cache.sequence_lengths().data_ptr()) == addresses


# --- random operation sequences --------------------------------------------------------------


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate / reserve / advance / truncate / fork / copy-on-write / append / free
    against a model of who holds which block: after every step each block's reference count
    is the number of sequence lists that hold it plus the outside references, the free count
    is the number of blocks nobody holds, and the device mirrors match after a sync."""

    NUM_BLOCKS = 12
    BLOCK_SIZE = 2
    MAX_SEQS = 4
    MAX_BLOCKS = 5

    def __init__(self) -> None:
        super().__init__()
        self.cache = make_cache(num_layers=1, num_blocks=self.NUM_BLOCKS,
                                block_size=self.BLOCK_SIZE, num_kv_heads=1, head_dim=2,
                                max_seqs=self.MAX_SEQS, max_blocks_per_seq=self.MAX_BLOCKS)
        self.model: dict[int, tuple[list[int], int]] = {}  # seq -> (blocks, length)
        self.outside: dict[int, int] = {}  # block -> references held outside sequences

    def count(self, block: int) -> int:
        held = sum(blocks.count(block) for blocks, _ in self.model.values())
        return held + self.outside.get(block, 0)

    def free_in_model(self) -> int:
        return sum(1 for b in range(self.NUM_BLOCKS) if self.count(b) == 0)

    def take_new_blocks(self, seq: int, before: list[int]) -> None:
        """The blocks the cache gave seq beyond `before` were free in the model."""
        now = self.cache.sequence_blocks(seq)
        assert now[: len(before)] == before
        for b in now[len(before):]:
            assert self.count(b) == 0, f"block {b} handed out while held"
        self.model[seq] = (now, self.model[seq][1])

    def live(self, data: st.DataObject) -> int:
        """One of the sequences in use (the rules that take one run only when there is one)."""
        return data.draw(st.sampled_from(sorted(self.model)))

    @precondition(lambda self: len(self.model) < self.MAX_SEQS)
    @rule()
    def add(self) -> None:
        seq = self.cache.add_sequence()
        assert seq not in self.model
        self.model[seq] = ([], 0)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), n=st.integers(0, 7))
    def reserve(self, data: st.DataObject, n: int) -> None:
        seq = self.live(data)
        blocks, length = self.model[seq]
        need = -(-(length + n) // self.BLOCK_SIZE)
        fits = length + n <= self.MAX_BLOCKS * self.BLOCK_SIZE and (
            need - len(blocks) <= self.free_in_model())
        if not fits:
            before = snapshot(self.cache)
            with pytest.raises(PagedCacheFullError):
                self.cache.reserve(seq, n)
            assert snapshot(self.cache) == before
            return
        self.cache.reserve(seq, n)
        self.take_new_blocks(seq, blocks)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), n=st.integers(0, 4))
    def advance(self, data: st.DataObject, n: int) -> None:
        seq = self.live(data)
        blocks, length = self.model[seq]
        if length + n > len(blocks) * self.BLOCK_SIZE:
            with pytest.raises(ValueError):
                self.cache.advance(seq, n)
            return
        self.cache.advance(seq, n)
        self.model[seq] = (blocks, length + n)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def truncate(self, data: st.DataObject) -> None:
        seq = self.live(data)
        blocks, length = self.model[seq]
        new = data.draw(st.integers(0, length))
        self.cache.truncate(seq, new)
        self.model[seq] = (blocks[: -(-new // self.BLOCK_SIZE)], new)

    @precondition(lambda self: 0 < len(self.model) < self.MAX_SEQS)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        seq = self.live(data)
        blocks, length = self.model[seq]
        child = self.cache.fork(seq)
        assert child not in self.model
        self.model[child] = (blocks[: -(-length // self.BLOCK_SIZE)], length)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def copy_on_write(self, data: st.DataObject) -> None:
        seq = self.live(data)
        blocks, length = self.model[seq]
        index = length // self.BLOCK_SIZE
        shared = index < len(blocks) and self.count(blocks[index]) > 1
        if shared and self.free_in_model() == 0:
            before = snapshot(self.cache)
            with pytest.raises(PagedCacheFullError):
                self.cache.copy_on_write(seq)
            assert snapshot(self.cache) == before
            return
        assert self.cache.copy_on_write(seq) == shared
        if shared:
            now = self.cache.sequence_blocks(seq)
            assert now[:index] == blocks[:index] and now[index + 1:] == blocks[index + 1:]
            assert self.count(now[index]) == 0
            self.model[seq] = (now, length)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        seq = self.live(data)
        self.cache.free_sequence(seq)
        del self.model[seq]

    @rule()
    def allocate_outside(self) -> None:
        if self.free_in_model() == 0:
            with pytest.raises(PagedCacheFullError):
                self.cache.allocate_block()
            return
        b = self.cache.allocate_block()
        assert self.count(b) == 0
        self.outside[b] = 1

    @rule(data=st.data())
    def incref_outside(self, data: st.DataObject) -> None:
        held = [b for b in range(self.NUM_BLOCKS) if self.count(b) > 0]
        if not held:
            return
        b = data.draw(st.sampled_from(held))
        self.cache.incref(b)
        self.outside[b] = self.outside.get(b, 0) + 1

    @rule(data=st.data())
    def decref_outside(self, data: st.DataObject) -> None:
        mine = sorted(b for b, n in self.outside.items() if n > 0)
        if not mine:
            return
        b = data.draw(st.sampled_from(mine))
        assert self.cache.decref(b) == self.count(b) - 1
        self.outside[b] -= 1

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def append_outside(self, data: st.DataObject) -> None:
        seq = self.live(data)
        mine = sorted(b for b, n in self.outside.items() if n > 0)
        if not mine:
            return
        blocks, length = self.model[seq]
        b = data.draw(st.sampled_from(mine))
        if length != len(blocks) * self.BLOCK_SIZE:
            with pytest.raises(ValueError):
                self.cache.append_block(seq, b)
            return
        if len(blocks) == self.MAX_BLOCKS:
            with pytest.raises(PagedCacheFullError):
                self.cache.append_block(seq, b)
            return
        self.cache.append_block(seq, b)
        self.model[seq] = (blocks + [b], length + self.BLOCK_SIZE)

    @invariant()
    def counts_match_the_holders(self) -> None:
        for b in range(self.NUM_BLOCKS):
            assert self.cache.ref_count(b) == self.count(b), f"block {b}"
        assert self.cache.num_free_blocks() == self.free_in_model()
        for seq, (blocks, length) in self.model.items():
            assert self.cache.sequence_blocks(seq) == blocks
            assert self.cache.sequence_length(seq) == length
        assert self.cache.num_sequences() == len(self.model)

    @invariant()
    def mirrors_match_after_sync(self) -> None:
        self.cache.sync_device()
        tables = self.cache.block_tables()
        lengths = self.cache.sequence_lengths()
        for s in range(self.MAX_SEQS):
            blocks, length = self.model.get(s, ([], 0))
            row = blocks + [-1] * (self.MAX_BLOCKS - len(blocks))
            assert tables[s].tolist() == row and int(lengths[s]) == length


AllocatorMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_allocator_keeps_reference_counts_consistent = AllocatorMachine.TestCase
