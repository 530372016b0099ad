"""The continuous-batching scheduler and the prefix cache over a paged cache, without a model.

A simulated step writes each chunk's token ids into the slots the cache maps them to and reads
the whole sequence back through its block list: any wrong slot, block or sharing shows as a
sequence that does not read back as the request's tokens. The next token is a fixed function of
the whole sequence, so the outputs must not depend on how the scheduler cut, preempted or
shared the work. Block reference counts are recounted from the sequences and the prefix cache
after every step."""

from __future__ import annotations

import random

import pytest
from paged_cache_model import PagedCacheModel

from toyllm.engine.prefix_cache import PrefixCache, block_hashes
from toyllm.engine.request import Request, RequestStatus, RequestTimings
from toyllm.engine.sampling import SamplingParams
from toyllm.engine.scheduler import LENGTH, Scheduler
from toyllm.engine.stopping import StopWatcher


def next_token(ids: list[int]) -> int:
    """The simulated model: a deterministic function of the whole sequence."""
    h = 0
    for t in ids:
        h = (h * 1_000_003 + t) % 2_147_483_647
    return 3 + h % 997


def expected_output(prompt: list[int], max_new: int) -> list[int]:
    ids = list(prompt)
    for _ in range(max_new):
        ids.append(next_token(ids))
    return ids[len(prompt):]


def make_request(rid: str, order: int, prompt: list[int], max_new: int) -> Request:
    return Request(rid, order, list(prompt), SamplingParams(max_new_tokens=max_new), None, None,
                   StopWatcher(()), RequestTimings(0.0))


class Sim:
    def __init__(self, num_blocks: int = 64, block_size: int = 4, max_running: int = 8,
                 budget: int = 64, prefix: bool = True, max_blocks_per_seq: int = 64) -> None:
        self.cache = PagedCacheModel(num_blocks, block_size, max_running, max_blocks_per_seq)
        self.prefix = PrefixCache(self.cache) if prefix else None
        self.sched = Scheduler(self.cache, self.prefix, max_running=max_running,
                               token_budget=budget)
        self.requests: list[Request] = []
        self.computed_tokens = 0
        self.steps = 0

    def add(self, prompt: list[int], max_new: int) -> Request:
        r = make_request(str(len(self.requests)), len(self.requests), prompt, max_new)
        self.requests.append(r)
        self.sched.add(r)
        return r

    def step(self) -> None:
        plan = self.sched.schedule()
        self.steps += 1
        seen = set()
        assert plan.num_tokens <= self.sched.token_budget
        assert len(self.sched.running) <= self.sched.max_running
        kinds = [c.num_tokens == 1 for c in plan.chunks]
        assert kinds == sorted(kinds, reverse=True), "decode chunks come first"
        for c in plan.chunks:
            r = c.request
            assert r.request_id not in seen and r.status is RequestStatus.RUNNING
            seen.add(r.request_id)
            assert c.start == r.num_computed and c.num_tokens >= 1
            slots = self.cache.slot_mapping(r.seq, c.start, c.num_tokens)
            self.cache.write(slots, r.token_ids[c.start:c.start + c.num_tokens])
        for c in plan.chunks:  # after every write of the step, as the forward's attention
            r = c.request
            assert self.cache.read(r.seq, c.start + c.num_tokens) == \
                r.token_ids[:c.start + c.num_tokens]
        self.computed_tokens += plan.num_tokens
        self.sched.complete(plan)
        for c in plan.chunks:
            r = c.request
            assert self.cache.sequence_length(r.seq) == r.num_computed
            # at most one partly filled block per sequence, none empty
            assert len(self.cache.sequence_blocks(r.seq)) == -(-r.num_computed //
                                                               self.cache.block_size)
            if c.samples:
                r.token_ids.append(next_token(r.token_ids))
                if r.num_output_tokens >= r.params.max_new_tokens:
                    self.sched.finish(r, "max_new_tokens")
        self.check_counts()

    def run(self, max_steps: int = 10_000) -> None:
        while self.sched.has_unfinished():
            self.step()
            assert self.steps < max_steps, "no progress"

    def check_counts(self) -> None:
        expected = [0] * self.cache.num_blocks
        for r in self.sched.running:
            assert r.seq is not None
            for b in self.cache.sequence_blocks(r.seq):
                expected[b] += 1
        for r in self.sched.waiting:
            assert r.seq is None, "a waiting request holds no blocks"
        if self.prefix is not None:
            for b in self.prefix.blocks():
                expected[b] += 1
        assert self.cache.counts == expected
        assert sorted(self.cache.free) == [b for b, n in enumerate(expected) if n == 0]

    def check_all_free(self) -> None:
        """Nothing runs: every block is free but those the prefix cache holds alone, and
        evicting them frees the pool."""
        held = self.prefix.blocks() if self.prefix is not None else []
        assert self.cache.num_used_blocks() == len(held)
        assert all(self.cache.ref_count(b) == 1 for b in held)
        if self.prefix is not None:
            assert self.prefix.evict(len(held)) == len(held)
        assert self.cache.num_free_blocks() == self.cache.num_blocks


def random_prompts(n: int, rng: random.Random, lo: int = 1, hi: int = 30,
                   shared: list[int] | None = None) -> list[list[int]]:
    out = []
    for _ in range(n):
        own = [rng.randrange(3, 1000) for _ in range(rng.randint(lo, hi))]
        out.append((shared or []) + own)
    return out


@pytest.mark.parametrize("setup", [
    dict(), dict(budget=5), dict(budget=1), dict(num_blocks=15), dict(num_blocks=15, budget=3),
    dict(prefix=False, num_blocks=15), dict(max_running=2), dict(block_size=1, num_blocks=60),
    dict(block_size=16, num_blocks=6),
], ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "roomy")
def test_outputs_do_not_depend_on_chunking_preemption_or_sharing(setup: dict) -> None:
    rng = random.Random(0)
    sim = Sim(**setup)
    prompts = random_prompts(10, rng, shared=[7, 8, 9, 10, 11, 12])
    news = [rng.randint(1, 20) for _ in prompts]
    # requests join while others decode
    for p, m in zip(prompts[:4], news[:4], strict=True):
        sim.add(p, m)
    for _ in range(3):
        sim.step()
    for p, m in zip(prompts[4:], news[4:], strict=True):
        sim.add(p, m)
    sim.run()
    for r, p, m in zip(sim.requests, prompts, news, strict=True):
        assert r.output_ids == expected_output(p, m), r.request_id
        assert r.finish_reason == "max_new_tokens"
    sim.check_all_free()


def test_a_small_pool_preempts_and_counts_it() -> None:
    sim = Sim(num_blocks=10, block_size=4)
    prompts = random_prompts(4, random.Random(1), lo=8, hi=8)
    for p in prompts:
        sim.add(p, 12)
    sim.run()
    assert sim.sched.preemptions > 0
    assert sum(r.preemptions for r in sim.requests) == sim.sched.preemptions
    for r, p in zip(sim.requests, prompts, strict=True):
        assert r.output_ids == expected_output(p, 12)
    sim.check_all_free()


def test_shared_prefix_is_computed_once() -> None:
    shared = list(range(100, 132))  # 8 blocks of 4
    prompts = random_prompts(6, random.Random(2), lo=3, hi=6, shared=shared)
    alone = Sim(prefix=False)
    cached = Sim(prefix=True)
    for sim in (alone, cached):
        sim.add(prompts[0], 4)
        sim.run()  # the first request fills the prefix cache
        for p in prompts[1:]:
            sim.add(p, 4)
        sim.run()
    assert cached.sched.prefix_hit_blocks == 5 * 8
    assert alone.computed_tokens - cached.computed_tokens == 5 * 32
    for a, c in zip(alone.requests, cached.requests, strict=True):
        assert a.output_ids == c.output_ids
    assert all(r.cached_tokens == 32 for r in cached.requests[1:])
    cached.check_all_free()


def test_a_fully_cached_prompt_recomputes_its_last_token_into_a_copy() -> None:
    sim = Sim()
    prompt = list(range(200, 212))  # exactly 3 blocks
    first = sim.add(prompt, 5)
    sim.run()
    assert not sim.cache.copies
    again = sim.add(prompt, 5)
    sim.step()
    assert again.cached_tokens == 11  # all cached; the last token recomputed for its logits
    assert len(sim.cache.copies) == 1  # the shared last block was copied, not written
    sim.run()
    assert again.output_ids == first.output_ids == expected_output(prompt, 5)
    sim.check_all_free()


def test_forked_requests_write_into_their_own_copies() -> None:
    sim = Sim(block_size=4)
    parent = sim.add(list(range(300, 306)), 9)  # 6 tokens: the tail block is partial
    sim.step()
    child = make_request("child", 99, list(parent.prompt_ids), 9)
    child.token_ids = list(parent.token_ids)
    sim.requests.append(child)
    sim.sched.fork(parent, child)
    sim.check_counts()
    sim.run()
    assert len(sim.cache.copies) == 1
    assert parent.output_ids == child.output_ids == expected_output(parent.prompt_ids, 9)
    sim.check_all_free()


def test_abort_frees_every_block_at_once() -> None:
    sim = Sim()
    a = sim.add(list(range(10, 30)), 50)
    b = sim.add(list(range(40, 47)), 50)
    waiting = sim.add(list(range(50, 60)), 5)
    sim.sched.max_running = 2
    for _ in range(4):
        sim.step()
    sim.sched.finish(a, "abort")
    sim.sched.finish(waiting, "abort")
    sim.check_counts()
    assert a.seq is None and a.status is RequestStatus.FINISHED
    sim.sched.finish(b, "abort")
    assert not sim.sched.has_unfinished()
    sim.check_all_free()


def test_a_request_that_fills_the_pool_alone_finishes_with_length() -> None:
    sim = Sim(num_blocks=3, block_size=4, prefix=False)
    r = sim.add(list(range(10, 20)), 50)  # 10 tokens; the pool holds 12
    sim.run()
    assert r.finish_reason == LENGTH
    assert r.output_ids == expected_output(r.prompt_ids, 3)  # positions 10, 11 and one sampled
    sim.check_all_free()


def test_eviction_frees_least_recently_used_blocks_only_the_cache_holds() -> None:
    cache = PagedCacheModel(8, 2, 4, 8)
    prefix = PrefixCache(cache)
    names = block_hashes(list(range(8)), 2)
    blocks = [cache.allocate_block() for _ in range(4)]
    for n, b in zip(names, blocks, strict=True):
        assert prefix.insert(n, b)
        cache.decref(b)  # the writer is done: the cache's reference is the only one
    cache.incref(blocks[0])  # a sequence still reads block 0
    other = block_hashes([9, 9, *range(2, 8)], 2)  # another first block: no name in common
    assert prefix.match(other) == []
    assert prefix.match(names[:2]) == blocks[:2]  # 0 and 1 become the most recently used
    assert prefix.evictable() == 3 and prefix.evictable(keep=blocks[1:2]) == 2
    assert prefix.evict(2) == 2
    assert cache.ref_count(blocks[2]) == 0 and cache.ref_count(blocks[3]) == 0
    assert cache.ref_count(blocks[1]) == 1
    assert prefix.evict(5) == 1  # block 0 is in use: not evictable
    assert prefix.blocks() == [blocks[0]]


@pytest.mark.parametrize("seed", range(40))
def test_random_workloads_keep_counts_and_outputs(seed: int) -> None:
    rng = random.Random(seed)
    sim = Sim(num_blocks=rng.randint(9, 40), block_size=rng.choice([1, 2, 4, 8]),
              max_running=rng.randint(1, 6), budget=rng.randint(1, 40),
              prefix=rng.random() < 0.7)
    shared = [rng.randrange(3, 1000) for _ in range(rng.randint(0, 12))]
    prompts = random_prompts(rng.randint(3, 12), rng, hi=12, shared=shared)
    news = [rng.randint(1, 10) for _ in prompts]
    limit = sim.cache.num_blocks * sim.cache.block_size
    pending = list(zip(prompts, news, strict=True))
    while pending or sim.sched.has_unfinished():
        if pending and rng.random() < 0.4:
            p, m = pending.pop()
            sim.add(p, m)
        if sim.sched.running and rng.random() < 0.05:
            sim.sched.finish(rng.choice(sim.sched.running), "abort")
        if sim.sched.has_unfinished():
            sim.step()
            assert sim.steps < 5_000, "no progress"
    for r in sim.requests:
        if r.finish_reason == "abort":
            continue
        full = expected_output(r.prompt_ids, r.params.max_new_tokens)
        if r.finish_reason == LENGTH:
            assert len(r.token_ids) > limit - sim.cache.block_size
            full = full[: r.num_output_tokens]
        assert r.output_ids == full
    sim.check_all_free()


@pytest.mark.parametrize("seed", range(6))
def test_the_python_model_allocates_like_the_extension(seed: int) -> None:
    """The same random calls on PagedCacheModel and PagedKVCache give the same sharing of
    blocks, counts, lengths and refusals, so the scheduler tests above speak for the
    extension's class."""
    import torch

    from toyllm.engine.ops.paged_cache import PagedCacheFullError, PagedKVCache

    rng = random.Random(seed)
    bs, blocks, seqs, per_seq = rng.choice([1, 2, 4]), rng.randint(4, 24), 4, 8
    model = PagedCacheModel(blocks, bs, seqs, per_seq)
    real = PagedKVCache(1, blocks, bs, 1, 2, torch.float32, "cpu", seqs, per_seq)
    live: list[int] = []
    for _ in range(300):
        op = rng.choice(["add", "free", "reserve", "fork", "cow", "truncate"])
        s = rng.choice(live) if live else None
        try:
            if op == "add":
                result = model.add_sequence()
            elif s is None:
                continue
            elif op == "free":
                model.free_sequence(s)
            elif op == "reserve":
                n = rng.randint(1, 3 * bs)
                model.reserve(s, n)
                model.advance(s, n)
            elif op == "fork":
                result = model.fork(s)
            elif op == "cow":
                result = model.copy_on_write(s)
            else:
                result = model.truncate(s, rng.randint(0, model.sequence_length(s)))
        except AssertionError:
            continue
        except RuntimeError:  # the model refuses: so must the extension, changing nothing
            with pytest.raises(PagedCacheFullError):
                if op == "add":
                    real.add_sequence()
                elif op == "reserve":
                    real.reserve(s, n)
                else:
                    real.fork(s)
            continue
        if op == "add":
            assert real.add_sequence() == result
            live.append(result)
        elif op == "free":
            real.free_sequence(s)
            live.remove(s)
        elif op == "reserve":
            real.reserve(s, n)
            real.advance(s, n)
        elif op == "fork":
            assert real.fork(s) == result
            live.append(result)
        elif op == "cow":
            assert real.copy_on_write(s) == result
        else:
            real.truncate(s, model.sequence_length(s))
        # block ids may differ (free-list order is the allocator's own): the sharing may not
        assert real.num_free_blocks() == model.num_free_blocks()
        same: dict[int, int] = {}
        for q in live:
            assert real.sequence_length(q) == model.sequence_length(q)
            mine, theirs = model.sequence_blocks(q), real.sequence_blocks(q)
            assert len(mine) == len(theirs)
            for r, m in zip(theirs, mine, strict=True):
                assert same.setdefault(r, m) == m
                assert real.ref_count(r) == model.ref_count(m)
        assert len(set(same.values())) == len(same)


def test_a_burst_sharing_a_prefix_computes_it_once_in_little_memory() -> None:
    """64 requests with one 64-token head arrive together: the head is computed once (the
    others wait for its blocks), and the pool never holds more than 1.2x the head's blocks
    plus each request's own."""
    shared = list(range(500, 564))  # 16 blocks of 4
    rng = random.Random(5)
    sim = Sim(num_blocks=400, block_size=4, max_running=64, budget=256)
    own = []
    for _ in range(64):
        p = shared + [rng.randrange(3, 1000) for _ in range(rng.randint(1, 6))]
        sim.add(p, 5)
        own.append(len(p) - len(shared) + 5)
    peak = 0
    while sim.sched.has_unfinished():
        sim.step()
        peak = max(peak, sim.cache.num_used_blocks())
    assert sim.computed_tokens == len(shared) + sum(own) - 64  # the last token is sampled
    assert sim.sched.prefix_hit_blocks == 63 * 16
    own_blocks = sum(-(-n // 4) for n in own)
    assert peak <= 1.2 * (16 + own_blocks)
    for r in sim.requests:
        assert r.output_ids == expected_output(r.prompt_ids, 5)
    sim.check_all_free()
