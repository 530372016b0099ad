"""Scheduler.schedule_ahead (the serving engine's overlap) on the Python model of the allocator
(tests/paged_cache_model.py) and the simulated model of tests/test_scheduler.py: a pipelined
driver that does what ServingEngine.step does with overlap=True (a decode step planned and
"launched" before the previous step's tokens are accepted; its input tokens those sampled
tokens) gives every request the synchronous driver's tokens, over random workloads with EOS
mid-run, budgets, small pools (preemption, eviction) and prefix sharing; each step's writes land
where the sequence reads them back, reference counts stay exact, and the pool comes back. Then
each case where schedule_ahead must refuse (None, nothing reserved)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from test_scheduler import Sim, next_token, random_prompts

from toyllm.engine.request import Request, RequestStatus
from toyllm.engine.scheduler import Chunk, StepPlan

MAX_SEQ = 1 << 20
EOS_EVERY = 23  # a token divisible by this is the simulated model's EOS


@dataclass
class InFlight:
    plan: StepPlan
    tokens: list[int]  # the "device's" sampled tokens, one per chunk


class Driver(Sim):
    """Sim's scheduler and cache, driven as ServingEngine.step drives them, with or without the
    overlap. Tokens: next_token of the sequence; EOS ends a request (not appended)."""

    def __init__(self, overlap: bool, **kw) -> None:
        super().__init__(**kw)
        self.overlap = overlap
        self.ahead: InFlight | None = None
        self.steps_ahead = 0
        self.reasons: dict[str, str] = {}

    # the synchronous step, and the pieces of the pipelined one ------------------------------
    def step(self) -> None:
        if self.ahead is not None:
            current = self.ahead
            self.ahead = self.launch_ahead(current)
            if self.take(current) or self.ahead is not None:
                return
        plan = self.sched.schedule()
        for r in plan.finished:
            self.reasons[r.request_id] = r.finish_reason
        if not plan.chunks:
            return
        if self.overlap and plan.pure_decode and all(c.samples for c in plan.chunks) \
                and len(plan.chunks) == len(self.sched.running) \
                and (not self.sched.waiting
                     or len(self.sched.running) >= self.sched.max_running):
            current = self.launch(plan, None)
            self.ahead = self.launch_ahead(current)
            self.take(current)
            return
        self.write(plan, None)
        self.sched.complete(plan)
        for c in plan.chunks:
            if c.samples:
                self.accept(c.request, next_token(c.request.token_ids))
        self.check_counts()

    def launch_ahead(self, step: InFlight) -> InFlight | None:
        ahead = self.sched.schedule_ahead(step.plan.chunks, MAX_SEQ)
        if ahead is None:
            return None
        plan, sources = ahead
        self.steps_ahead += 1
        return self.launch(plan, [step.tokens[i] for i in sources])

    def launch(self, plan: StepPlan, inputs: list[int] | None) -> InFlight:
        sequences = self.write(plan, inputs)
        self.sched.complete(plan, register=False)
        self.check_counts()
        return InFlight(plan, [next_token(s) for s in sequences])

    def write(self, plan: StepPlan, inputs: list[int] | None) -> list[list[int]]:
        """Each chunk's tokens into its slots (inputs: a step ahead's, from the step in
        flight), then every chunk's sequence read back through its blocks. Its sequences."""
        sequences = []
        for i, c in enumerate(plan.chunks):
            r = c.request
            end = c.start + c.num_tokens
            known = r.token_ids[:end] if inputs is None else r.token_ids + [inputs[i]]
            assert len(known) == end
            self.cache.write(self.cache.slot_mapping(r.seq, c.start, c.num_tokens),
                             known[c.start:end])
            sequences.append(known)
        for c, known in zip(plan.chunks, sequences, strict=True):
            assert self.cache.read(c.request.seq, len(known)) == known
        return sequences

    def take(self, step: InFlight) -> bool:
        live = [(c, t) for c, t in zip(step.plan.chunks, step.tokens, strict=True)
                if c.request.status is not RequestStatus.FINISHED]
        for c, _ in live:
            self.sched.register(c.request, c.start + 1)
        for c, tok in live:
            self.accept(c.request, tok)
        self.check_counts()
        return bool(live)

    def accept(self, r: Request, tok: int) -> None:
        if tok % EOS_EVERY == 0:
            self.sched.finish(r, "eos")
        else:
            r.token_ids.append(tok)
            if r.num_output_tokens >= r.params.max_new_tokens:
                self.sched.finish(r, "max_new_tokens")
        if r.finished:
            self.reasons[r.request_id] = r.finish_reason

    def run(self, joins: dict[int, list[tuple[list[int], int]]]) -> None:
        call = 0
        while call <= max(joins) or self.sched.has_unfinished():
            for prompt, n in joins.get(call, []):
                self.add(prompt, n)
            self.step()
            call += 1
            assert call < 10_000, "no progress"


def _joins(seed: int, n: int) -> dict[int, list[tuple[list[int], int]]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, 1000) for _ in range(9)]
    prompts = random_prompts(n, rng, 1, 20, shared if seed % 2 else None)
    joins: dict[int, list[tuple[list[int], int]]] = {}
    for p in prompts:
        joins.setdefault(rng.choice([0, 0, 0, 3, 8, 15]), []).append((p, rng.randint(1, 30)))
    return joins


@pytest.mark.parametrize("setup", [
    dict(), dict(budget=5), dict(num_blocks=15), dict(num_blocks=12, budget=3),
    dict(prefix=False, num_blocks=15), dict(max_running=2), dict(block_size=1, num_blocks=60),
    dict(block_size=16, num_blocks=6),
], ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "roomy")
@pytest.mark.parametrize("seed", range(4))
def test_the_pipelined_driver_gives_the_synchronous_tokens(setup: dict, seed: int) -> None:
    joins = _joins(seed, 10)
    runs = {}
    for overlap in (False, True):
        driver = Driver(overlap, **setup)
        driver.run(joins)
        driver.check_all_free()
        runs[overlap] = driver
    sync, ahead = runs[False], runs[True]
    assert [r.token_ids for r in ahead.requests] == [r.token_ids for r in sync.requests]
    assert ahead.reasons == sync.reasons
    assert "eos" in sync.reasons.values()
    assert sync.steps_ahead == 0
    if setup.get("block_size") == 1 and seed % 2:
        # one-token blocks and a shared prefix: the pool is cached blocks, and every step
        # evicts some (schedule() decides that): none goes ahead
        assert ahead.steps_ahead == 0
    else:
        assert ahead.steps_ahead > 0


# --- when schedule_ahead refuses ------------------------------------------------------------

def _decoding(sim: Sim, n: int, max_new: int = 20) -> StepPlan:
    """n requests past their prompts; their pure decode plan, launched (complete, no naming)."""
    for i in range(n):
        sim.add([5 + i, 6, 7], max_new)
    while any(r.num_pending != 1 for r in sim.sched.running) or sim.sched.waiting:
        sim.step()
    plan = sim.sched.schedule()
    assert plan.pure_decode and len(plan.chunks) == n
    sim.sched.complete(plan, register=False)
    return plan


def _refused(sim: Sim, plan: StepPlan) -> bool:
    free = sim.cache.num_free_blocks()
    got = sim.sched.schedule_ahead(plan.chunks, MAX_SEQ)
    assert got is None or sim.cache.num_free_blocks() <= free
    if got is None:
        assert sim.cache.num_free_blocks() == free  # nothing reserved
    return got is None


def test_a_step_ahead_continues_every_row_at_its_next_position() -> None:
    sim = Sim()
    plan = _decoding(sim, 3)
    ahead = sim.sched.schedule_ahead(plan.chunks, MAX_SEQ)
    assert ahead is not None
    nxt, sources = ahead
    assert sources == [0, 1, 2]
    for c, old in zip(nxt.chunks, plan.chunks, strict=True):
        r = c.request
        assert r is old.request and c.start == old.start + 1 == r.num_computed
        assert c.num_tokens == 1 and c.samples
        assert len(sim.cache.sequence_blocks(r.seq)) * sim.cache.block_size > c.start


def test_rows_known_to_end_are_left_out() -> None:
    sim = Sim()
    plan = _decoding(sim, 3)
    last = plan.chunks[1]
    # its token in flight is its last: max_new_tokens reached, then the context
    last.request.params = type(last.request.params)(
        max_new_tokens=last.request.num_output_tokens + 1)
    nxt, sources = sim.sched.schedule_ahead(plan.chunks, MAX_SEQ)
    assert sources == [0, 2] and [c.request for c in nxt.chunks] == \
        [plan.chunks[0].request, plan.chunks[2].request]
    sim2 = Sim()
    for prompt in ([5, 6, 7], [5, 6, 7, 8, 9]):  # two rows two positions apart
        sim2.add(prompt, 20)
    while any(r.num_pending != 1 for r in sim2.sched.running) or sim2.sched.waiting:
        sim2.step()
    plan2 = sim2.sched.schedule()
    sim2.sched.complete(plan2, register=False)
    short, long = plan2.chunks
    assert long.start == short.start + 2
    # the context ends at the long row's next position: its token in flight fills it
    assert sim2.sched.schedule_ahead(plan2.chunks, long.start + 1)[1] == [0]
    assert sim2.sched.schedule_ahead(plan2.chunks, short.start + 1) is None  # none goes on


@pytest.mark.parametrize("case", ["waiting_with_a_free_slot", "shared_tail", "short_pool",
                                  "budget", "running_without_a_row", "nothing_left"])
def test_schedule_ahead_refuses_and_reserves_nothing(case: str) -> None:
    sim = Sim(num_blocks=14 if case == "short_pool" else 64,
              budget=2 if case == "budget" else 64)
    plan = _decoding(sim, 3 if case != "budget" else 2)
    if case == "waiting_with_a_free_slot":
        sim.add([1, 2, 3], 5)
    elif case == "shared_tail":
        plan.chunks[1].request.tail_may_be_shared = True
    elif case == "short_pool":
        while sim.cache.num_free_blocks():  # the pool taken (not by the prefix cache)
            sim.cache.allocate_block()
    elif case == "budget":
        plan.chunks.append(Chunk(plan.chunks[0].request, plan.chunks[0].start, 1))
    elif case == "running_without_a_row":
        plan.chunks.pop()
    else:
        for c in plan.chunks:
            sim.sched.finish(c.request, "abort")
    if case == "short_pool":  # the rows' next position starts a block: each needs one
        assert all((c.start + 1) % sim.cache.block_size == 0 for c in plan.chunks)
    assert _refused(sim, plan)
