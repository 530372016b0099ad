"""Prefix caching over the paged cache's allocator: full blocks found again by their tokens.

A full block of a sequence is named by a hash of its tokens chained with the hash of the block
before it, so a name stands for the whole prefix up to the block's end: two prompts share a
block only when everything before it is the same too. The cache maps names to block ids and
holds its own reference on each block it names (`PagedKVCache.incref`), so a block stays valid
after the sequences that wrote it are freed. A block whose only reference is the cache's is
evictable; when the allocator runs short, `evict` drops the least recently used of those
(decref: the block is free again).

Only full blocks whose K/V are all computed are named: a block receives no more writes once it
is full (a sequence that must write into a shared block copies it first: copy on write).

    >>> hashes = block_hashes([5, 6, 7, 8, 9], block_size=2)
    >>> len(hashes)  # two full blocks; the fifth token's block is partial
    2
    >>> hashes[:1] == block_hashes([5, 6, 0, 0], block_size=2)[:1]
    True
    >>> hashes[1] == block_hashes([0, 6, 7, 8], block_size=2)[1]  # same tokens, other prefix
    False
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol


class BlockAllocator(Protocol):
    """The part of PagedKVCache (engine/ops/paged_cache.py) the prefix cache uses."""

    def incref(self, block: int) -> None: ...
    def decref(self, block: int) -> int: ...
    def ref_count(self, block: int) -> int: ...


def chain_hash(previous: bytes, tokens: Sequence[int]) -> bytes:
    """The name of a block holding `tokens` after the prefix named `previous` (b"" for the
    first block): 16 bytes of BLAKE2b over both."""
    data = array("q", tokens).tobytes()  # int64: any token id, fixed width
    return hashlib.blake2b(previous + data, digest_size=16).digest()


def block_hashes(token_ids: Sequence[int], block_size: int, known: list[bytes] | None = None,
                 ) -> list[bytes]:
    """Chained names of the full blocks of token_ids. `known`: names already computed for the
    leading blocks (extended in place and returned), so a growing sequence hashes each block
    once."""
    out = [] if known is None else known
    previous = out[-1] if out else b""
    for b in range(len(out), len(token_ids) // block_size):
        previous = chain_hash(previous, token_ids[b * block_size:(b + 1) * block_size])
        out.append(previous)
    return out


class PrefixCache:
    """Names -> blocks, with one reference per named block and LRU eviction."""

    def __init__(self, allocator: BlockAllocator) -> None:
        self.allocator = allocator
        self._block_of: dict[bytes, int] = {}
        # block -> its name, least recently used first
        self._name_of: OrderedDict[int, bytes] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._name_of)

    def __contains__(self, block: int) -> bool:
        return block in self._name_of

    def blocks(self) -> list[int]:
        """Every block the cache holds a reference on, least recently used first."""
        return list(self._name_of)

    def match(self, names: Sequence[bytes]) -> list[int]:
        """Blocks of the longest cached run of leading names, each marked recently used. The
        caller adopts them (PagedKVCache.append_block increfs)."""
        found = []
        for name in names:
            block = self._block_of.get(name)
            if block is None:
                break
            self._name_of.move_to_end(block)
            found.append(block)
        return found

    def insert(self, name: bytes, block: int) -> bool:
        """Name `block` (full, computed) and take a reference on it. False when the name is
        already cached (another sequence computed the same prefix: its block stays the one
        named) or the block already has a name."""
        if name in self._block_of or block in self._name_of:
            if name in self._block_of:
                self._name_of.move_to_end(self._block_of[name])
            return False
        self.allocator.incref(block)
        self._block_of[name] = block
        self._name_of[block] = name
        return True

    def evictable(self, keep: Sequence[int] = ()) -> int:
        """How many cached blocks only the cache references (what evict could free), not
        counting the blocks in `keep` (about to be adopted)."""
        kept = set(keep)
        return sum(1 for b in self._name_of
                   if b not in kept and self.allocator.ref_count(b) == 1)

    def evict(self, wanted: int) -> int:
        """Free up to `wanted` blocks that only the cache references, least recently used
        first; returns how many were freed."""
        if wanted <= 0:
            return 0
        victims = []
        for block in self._name_of:
            if self.allocator.ref_count(block) == 1:
                victims.append(block)
                if len(victims) == wanted:
                    break
        for block in victims:
            self._drop(block)
        self.evictions += len(victims)
        return len(victims)

    def clear(self) -> None:
        """Drop every name and reference (blocks still used by sequences stay theirs)."""
        for block in list(self._name_of):
            self._drop(block)

    def _drop(self, block: int) -> None:
        name = self._name_of.pop(block)
        del self._block_of[name]
        self.allocator.decref(block)
