"""A plain-Python model of PagedKVCache's host side (PAGED_CONTRACT.md, part A): the block
allocator with reference counts and the per-sequence block lists and lengths, without storage.

The scheduler and prefix-cache tests drive it where no K/V are needed (thousands of random
operations per second), and it is a second witness for the extension's class: the same calls
must give the same sharing of blocks, counts and refusals (tests/test_scheduler.py runs both)."""

from __future__ import annotations


class ModelCacheFullError(RuntimeError):
    pass


class PagedCacheModel:
    def __init__(self, num_blocks: int, block_size: int, max_seqs: int,
                 max_blocks_per_seq: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.max_seqs, self.max_blocks_per_seq = max_seqs, max_blocks_per_seq
        self.counts = [0] * num_blocks
        self.free = list(range(num_blocks - 1, -1, -1))  # a stack: block 0 is taken first
        self.blocks: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}
        self.free_seqs = list(range(max_seqs - 1, -1, -1))
        self.copies: list[tuple[int, int]] = []  # (from, to) of every copy on write
        # the "K/V" of each slot: the token id written there (None: never written)
        self.data: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]

    def num_free_blocks(self) -> int:
        return len(self.free)

    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def allocate_block(self) -> int:
        if not self.free:
            raise ModelCacheFullError("paged KV cache full: no free block")
        b = self.free.pop()
        self.counts[b] = 1
        return b

    def incref(self, block: int) -> None:
        assert self.counts[block] >= 1, f"incref of free block {block}"
        self.counts[block] += 1

    def decref(self, block: int) -> int:
        assert self.counts[block] >= 1, f"decref of free block {block}"
        self.counts[block] -= 1
        if self.counts[block] == 0:
            self.free.append(block)
        return self.counts[block]

    def ref_count(self, block: int) -> int:
        return self.counts[block]

    def add_sequence(self) -> int:
        if not self.free_seqs:
            raise ModelCacheFullError("paged KV cache full: no free sequence slot")
        s = self.free_seqs.pop()
        self.blocks[s], self.lengths[s] = [], 0
        return s

    def free_sequence(self, seq: int) -> None:
        for b in self.blocks.pop(seq):
            self.decref(b)
        del self.lengths[seq]
        self.free_seqs.append(seq)

    def sequence_length(self, seq: int) -> int:
        return self.lengths[seq]

    def sequence_blocks(self, seq: int) -> list[int]:
        return list(self.blocks[seq])

    def append_block(self, seq: int, block: int) -> None:
        assert self.lengths[seq] == len(self.blocks[seq]) * self.block_size
        self.incref(block)
        self.blocks[seq].append(block)
        self.lengths[seq] += self.block_size

    def reserve(self, seq: int, n: int) -> None:
        need = -(-(self.lengths[seq] + n) // self.block_size) - len(self.blocks[seq])
        if need > len(self.free) or len(self.blocks[seq]) + need > self.max_blocks_per_seq:
            raise ModelCacheFullError(f"paged KV cache full: {need} blocks needed")
        for _ in range(max(need, 0)):
            self.blocks[seq].append(self.allocate_block())

    def advance(self, seq: int, n: int) -> None:
        assert self.lengths[seq] + n <= len(self.blocks[seq]) * self.block_size
        self.lengths[seq] += n

    def truncate(self, seq: int, length: int) -> None:
        assert length <= self.lengths[seq]
        keep = -(-length // self.block_size)
        for b in self.blocks[seq][keep:]:
            self.decref(b)
        del self.blocks[seq][keep:]
        self.lengths[seq] = length

    def fork(self, seq: int) -> int:
        child = self.add_sequence()
        keep = -(-self.lengths[seq] // self.block_size)
        for b in self.blocks[seq][:keep]:
            self.incref(b)
        self.blocks[child] = self.blocks[seq][:keep]
        self.lengths[child] = self.lengths[seq]
        return child

    def copy_on_write(self, seq: int) -> bool:
        index = self.lengths[seq] // self.block_size
        if index >= len(self.blocks[seq]):
            return False
        old = self.blocks[seq][index]
        if self.counts[old] <= 1:
            return False
        new = self.allocate_block()
        self.copies.append((old, new))
        self.data[new] = list(self.data[old])
        self.blocks[seq][index] = new
        self.decref(old)
        return True

    def slot_mapping(self, seq: int, start: int, n: int) -> list[int]:
        bs = self.block_size
        return [self.blocks[seq][p // bs] * bs + p % bs for p in range(start, start + n)]

    # storage stand-ins: what paged_kv_write and a read through the block table do
    def write(self, slots: list[int], tokens: list[int]) -> None:
        for slot, tok in zip(slots, tokens, strict=True):
            self.data[slot // self.block_size][slot % self.block_size] = tok

    def read(self, seq: int, n: int) -> list[int | None]:
        """What positions 0..n-1 of seq hold, read through its block list."""
        bs = self.block_size
        return [self.data[self.blocks[seq][p // bs]][p % bs] for p in range(n)]
