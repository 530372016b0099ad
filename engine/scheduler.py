"""Continuous batching: which tokens of which requests the next forward pass computes.

Requests wait in a queue (first come, first served) and run in a set. Every step plans one
chunk of tokens per scheduled request, within a token budget:

1. the running requests, oldest first: a decoding request's chunk is its one new token; a
   request still in its prompt gets the next chunk of it (chunked prefill);
2. then waiting requests, while the budget, the running limit and the pool allow: each takes a
   cache slot, adopts the blocks of its longest cached prefix (engine/prefix_cache.py) and is
   planned a first chunk of the rest. A request is admitted only when the pool can hold all
   its known tokens now, so it is not preempted again at once, and not while a running request
   is still computing the next block of its prompt (a burst of requests with one system prompt
   computes it once: the others wait for its blocks and adopt them).

Blocks come from the paged cache's allocator. When a running request needs blocks and none are
free, the prefix cache first evicts blocks only it holds; then the newest running request is
preempted: its blocks are freed and it goes back to the front of the queue, to recompute its
prompt and output later (its tokens do not change). A request that cannot get room even alone
(its own tokens fill the pool) finishes with "length", as when the context is full.

Nothing here runs the model: `schedule` reserves room for the plan (all or nothing per
request), the engine runs the forward, then `complete` advances the sequences and names their
newly full blocks in the prefix cache. `finish` frees a request's blocks at once.
`schedule_ahead` plans the decode step after one whose tokens are not known yet (the engine's
overlap of host and device work), only where `schedule` would plan the same rows without
admitting, evicting, preempting or copying; `register` then names the blocks once the tokens
are known.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from toyllm.engine.prefix_cache import PrefixCache, block_hashes
from toyllm.engine.request import Request, RequestStatus

#: finish_reason of a request whose tokens fill the pool by themselves (see the module doc)
LENGTH = "length"


class PagedCacheHost(Protocol):
    """The host-side part of PagedKVCache (engine/ops/paged_cache.py) the scheduler drives."""

    @property
    def block_size(self) -> int: ...
    @property
    def num_blocks(self) -> int: ...
    def num_free_blocks(self) -> int: ...
    def add_sequence(self) -> int: ...
    def free_sequence(self, seq: int) -> None: ...
    def sequence_blocks(self, seq: int) -> list[int]: ...
    def append_block(self, seq: int, block: int) -> None: ...
    def reserve(self, seq: int, n: int) -> None: ...
    def advance(self, seq: int, n: int) -> None: ...
    def truncate(self, seq: int, length: int) -> None: ...
    def fork(self, seq: int) -> int: ...
    def copy_on_write(self, seq: int) -> bool: ...
    def incref(self, block: int) -> None: ...
    def decref(self, block: int) -> int: ...
    def ref_count(self, block: int) -> int: ...


@dataclass(slots=True)
class Chunk:
    """Tokens start..start+num_tokens-1 of a request, computed in this step."""

    request: Request
    start: int
    num_tokens: int
    # the chunk ends at the request's last known token: its logits pick the next one (fixed
    # when planned: a request's tokens grow only once its step has sampled)
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        self.samples = self.start + self.num_tokens == len(self.request.token_ids)


@dataclass
class StepPlan:
    """One step: one-token chunks first (they attend through the decode kernel), then longer
    (prefill) chunks. `preempted` and `finished` list what the scheduling itself changed."""

    chunks: list[Chunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)

    @property
    def num_decode(self) -> int:
        return sum(1 for c in self.chunks if c.num_tokens == 1)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def pure_decode(self) -> bool:
        return bool(self.chunks) and all(c.num_tokens == 1 for c in self.chunks)

    def ordered(self) -> None:
        """Decode chunks first (stable), the order the paged step expects."""
        self.chunks.sort(key=lambda c: c.num_tokens != 1)


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class Scheduler:
    def __init__(self, cache: PagedCacheHost, prefix_cache: PrefixCache | None, *,
                 max_running: int, token_budget: int) -> None:
        self.cache = cache
        self.prefix = prefix_cache
        self.block_size = cache.block_size
        self.max_running = max_running
        self.token_budget = token_budget
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: the last is the newest
        self.preemptions = 0
        self.prefix_hit_blocks = 0  # blocks adopted from the prefix cache, all admissions
        # during one schedule(): the names _being_computed looks up, kept up to date as
        # requests are admitted (None: not built yet this step)
        self._computing: set[bytes] | None = None

    # queue ------------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request, reason: str) -> None:
        """Finish a waiting or running request; its blocks are freed now."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        self._release(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason

    def fork(self, parent: Request, child: Request, computed: int | None = None) -> None:
        """Run `child` (a new request with the parent's tokens) on the parent's blocks: the
        cache's fork shares them all; the block both will write next is copied on write.
        computed: the parent's tokens whose K/V the child takes (default num_computed; one
        less while a step in flight computes the parent's last known token: the child
        computes that one itself)."""
        computed = parent.num_computed if computed is None else computed
        if parent.status is not RequestStatus.RUNNING or len(parent.token_ids) - computed != 1 \
                or not 0 <= parent.num_computed - computed <= 1:
            raise ValueError("fork: expected a running request that has finished its prompt")
        if len(self.running) >= self.max_running:
            raise ValueError(f"fork: all {self.max_running} running slots are taken")
        child.seq = self.cache.fork(parent.seq)
        if computed < parent.num_computed:
            self.cache.truncate(child.seq, computed)
        child.num_computed = computed
        child.block_hashes = list(parent.block_hashes)
        child.num_registered_blocks = parent.num_registered_blocks
        shared_tail = computed % self.block_size != 0
        parent.tail_may_be_shared |= shared_tail
        child.tail_may_be_shared = shared_tail
        child.status = RequestStatus.RUNNING
        self.running.append(child)

    # planning ---------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.token_budget
        i = 0
        size = self.block_size
        prefill_seen = unordered = False  # a decode chunk after a prefill chunk: sort below
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            computed = request.num_computed
            n = min(len(request.token_ids) - computed, budget)  # num_pending, inlined
            if n == 1 and computed % size and not request.tail_may_be_shared:
                # the common decode row: its token fits the room of its own last block, so
                # nothing to reserve, copy or free (what _make_room and _reserve would find)
                plan.chunks.append(Chunk(request, computed, 1))
                unordered |= prefill_seen
                budget -= 1
                i += 1
                continue
            if not self._make_room(request, n, plan):
                # newest and still short: preempt it, or, alone, it fills the pool itself
                if len(self.running) == 1:
                    self.finish(request, LENGTH)
                    plan.finished.append(request)
                else:
                    self._preempt(request, plan)
                break
            self._reserve(request, n)
            plan.chunks.append(Chunk(request, request.num_computed, n))
            unordered |= prefill_seen and n == 1
            prefill_seen |= n > 1
            budget -= n
            i += 1
        self._computing = None  # names of blocks running prompts will compute (on first use)
        if not plan.preempted:
            while (self.waiting and budget > 0 and len(self.running) < self.max_running):
                request = self.waiting[0]
                if blocks_for(len(request.token_ids), self.block_size) > self.cache.num_blocks:
                    # its tokens outgrew the whole pool while it waited (preempted)
                    self.finish(request, LENGTH)
                    plan.finished.append(request)
                    continue
                chunk = self._admit(request, budget)
                if chunk is None:
                    break
                self.waiting.popleft()
                self.running.append(chunk.request)
                plan.chunks.append(chunk)
                unordered |= prefill_seen and chunk.num_tokens == 1
                prefill_seen |= chunk.num_tokens > 1
                budget -= chunk.num_tokens
        if unordered:
            plan.ordered()
        return plan

    def schedule_ahead(self, in_flight: list[Chunk], max_seq_len: int,
                       ) -> tuple[StepPlan, list[int]] | None:
        """The decode step after the pure decode step `in_flight` (its chunks, launched, its
        tokens not known yet), and each new chunk's index in it: one chunk per request that
        goes on as far as the host knows now (not finished, and the token in flight is not
        its last by max_new_tokens or the context max_seq_len: the chunk at position s samples
        token s + 1, after which the output has s + 2 - prompt tokens and s + 1 tokens are
        computed), at its next position; that token reaches the step on the device
        (ServingEngine's overlap).

        Nothing is admitted, evicted or preempted: None (nothing reserved) where schedule()
        might do any of that or copy a shared block, i.e. when a running request has no row
        in flight (a fork), requests wait and a running slot frees up (a row ends), the rows
        pass the token budget, a row's last block may be shared, or the pool lacks a free
        block for each row that enters a new one. Then the caller takes the tokens in flight
        and plans with schedule(). (Requests waiting for a slot while all are taken wait one
        step more when the tokens in flight end a row by EOS or a stop string: schedule()
        would have admitted one in the next step.)"""
        size = self.block_size
        rows: list[Request] = []
        sources: list[int] = []
        live = need = 0
        for i, chunk in enumerate(in_flight):
            request = chunk.request
            if request.status is RequestStatus.FINISHED:
                continue
            live += 1
            nxt = chunk.start + 1  # its next position (num_computed)
            if nxt >= max_seq_len \
                    or nxt + 1 - len(request.prompt_ids) >= request.params.max_new_tokens:
                continue
            if request.tail_may_be_shared:
                return None
            need += nxt % size == 0  # its next position starts a block
            rows.append(request)
            sources.append(i)
        if live != len(self.running) or (self.waiting and len(rows) < self.max_running) \
                or not rows or len(rows) > self.token_budget \
                or need > self.cache.num_free_blocks():
            return None
        plan = StepPlan()
        for request in rows:
            if request.num_computed % size == 0:
                self.cache.reserve(request.seq, 1)
            chunk = Chunk(request, request.num_computed, 1)
            chunk.samples = True  # its input is the token in flight: it samples the next one
            plan.chunks.append(chunk)
        return plan, sources

    def complete(self, plan: StepPlan, register: bool = True) -> None:
        """After the forward pass of `plan` was launched: advance each sequence over its chunk
        and (`register`) name its newly full blocks in the prefix cache. register=False leaves
        the naming to `register` once the chunks' tokens are known (a step planned ahead)."""
        size, named = self.block_size, register and self.prefix is not None
        for chunk in plan.chunks:
            request = chunk.request
            self.cache.advance(request.seq, chunk.num_tokens)
            request.num_computed += chunk.num_tokens
            if named and request.num_computed // size > request.num_registered_blocks:
                self._register(request)  # a block filled up

    def register(self, request: Request, computed: int) -> None:
        """Name the request's blocks that its first `computed` tokens fill (computed <= its
        known tokens): complete(register=False)'s naming, once the tokens are known."""
        if self.prefix is not None and computed // self.block_size \
                > request.num_registered_blocks:
            self._register(request, computed)

    # blocks -------------------------------------------------------------------------------------
    def _blocks_needed(self, request: Request, n: int) -> int:
        """Blocks to allocate for tokens num_computed..num_computed+n-1 (its sequence holds
        blocks for exactly its computed tokens), plus one for a copy on write."""
        start = request.num_computed
        new = blocks_for(start + n, self.block_size) - blocks_for(start, self.block_size)
        return new + int(request.tail_may_be_shared)

    def _make_room(self, request: Request, n: int, plan: StepPlan) -> bool:
        """Free blocks for request's next n tokens: evict cached blocks, then preempt newer
        running requests. False when only preempting `request` itself would be left."""
        needed = self._blocks_needed(request, n)
        if needed == 0:  # a decode token in its last block's room: the common case
            return True
        while True:
            short = needed - self.cache.num_free_blocks()
            if short <= 0:
                return True
            if self.prefix is not None and self.prefix.evict(short) == short:
                return True
            newest = self.running[-1]
            if newest is request:
                return False
            self._preempt(newest, plan)

    def _reserve(self, request: Request, n: int) -> None:
        """Room for n more tokens (free blocks made sure of), copying a shared tail first.
        Tokens that fit the room of the sequence's last block need no call."""
        if request.tail_may_be_shared:
            self.cache.copy_on_write(request.seq)
            request.tail_may_be_shared = False
        if self._blocks_needed(request, n):
            self.cache.reserve(request.seq, n)

    def _admit(self, request: Request, budget: int) -> Chunk | None:
        """Give a waiting request a slot, its cached prefix and room for a first chunk; None
        (and nothing changed) when the pool cannot hold all its tokens now."""
        cache, size = self.cache, self.block_size
        tokens = len(request.token_ids)
        matched: list[int] = []
        if self.prefix is not None:
            names = block_hashes(request.token_ids, size, request.block_hashes)
            matched = self.prefix.match(names)
        if self.prefix is not None and self._being_computed(names[len(matched):len(matched) + 1]):
            # a running request is computing this prompt's next block right now: wait a step
            # or two and adopt it, instead of computing the same prefix twice
            return None
        computed = len(matched) * size
        shared_tail = computed == tokens  # all cached: the last token is recomputed for logits
        if shared_tail:
            computed -= 1
        # every known token, less the adopted blocks, plus a copy on write
        needed = blocks_for(tokens, size) - len(matched) + int(shared_tail)
        free = cache.num_free_blocks()
        if free < needed and (self.prefix is None
                              or free + self.prefix.evictable(keep=matched) < needed):
            return None
        seq = cache.add_sequence()
        for block in matched:
            cache.append_block(seq, block)
        if shared_tail:
            cache.truncate(seq, computed)
        request.seq = seq
        request.num_computed = computed
        request.num_registered_blocks = len(matched)
        request.tail_may_be_shared = shared_tail
        request.status = RequestStatus.RUNNING
        if request.preemptions == 0:
            request.cached_tokens = computed
        self.prefix_hit_blocks += len(matched)
        n = min(tokens - computed, budget)
        short = self._blocks_needed(request, n) - cache.num_free_blocks()
        if short > 0:
            self.prefix.evict(short)  # enough are evictable: checked above
        self._reserve(request, n)
        self._note_computing(request)  # running from now on: later admissions see its blocks
        return Chunk(request, computed, n)

    def _being_computed(self, names: list[bytes]) -> bool:
        """Whether one of `names` is a full block that a running request has yet to compute
        (and will name in the prefix cache when it has). The running requests' names are
        gathered once per schedule() (admitting n requests stays linear in n)."""
        if not names:
            return False
        if self._computing is None:
            self._computing = set()
            for r in self.running:
                self._note_computing(r)
        return any(n in self._computing for n in names)

    def _note_computing(self, request: Request) -> None:
        """Add the names of the blocks a running request has yet to compute to the set."""
        if self._computing is not None and request.num_pending > 1:
            self._computing.update(request.block_hashes[request.num_registered_blocks:])

    def _preempt(self, request: Request, plan: StepPlan) -> None:
        self.running.remove(request)
        self._release(request)
        request.status = RequestStatus.WAITING
        request.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(request)
        plan.preempted.append(request)

    def _release(self, request: Request) -> None:
        if request.seq is not None:
            self.cache.free_sequence(request.seq)
        request.seq = None
        request.num_computed = 0
        request.num_registered_blocks = 0
        request.tail_may_be_shared = False

    def _register(self, request: Request, computed: int | None = None) -> None:
        """Name the request's full, computed blocks (of its first `computed` tokens; default
        num_computed) not yet in the prefix cache."""
        if self.prefix is None:
            return
        full = (request.num_computed if computed is None else computed) // self.block_size
        if full <= request.num_registered_blocks:
            return
        names = block_hashes(request.token_ids, self.block_size, request.block_hashes)
        blocks = self.cache.sequence_blocks(request.seq)
        for b in range(request.num_registered_blocks, full):
            self.prefix.insert(names[b], blocks[b])
        request.num_registered_blocks = full
