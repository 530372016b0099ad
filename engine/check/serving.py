"""The serving engine (paged cache, continuous batching) against its witnesses.

`check_serving(model, workload, **engine_options)` runs a workload through a ServingEngine:
requests that join at given steps (while others decode), leave when their own token count is
reached, share prompt prefixes, fork mid-decode, and, with a small pool, get preempted. It
then judges, per request:

* teacher-forced logits: the logits each token was sampled from, against `reference_logits`
  of the no-cache reference over the request's final sequence, max |diff| <= tolerance
  (1e-4 in fp32, engine/check/tolerances.py);
* free-running greedy: the tokens against `reference_greedy` (the reference alone) and the
  static Engine (the contiguous cache) on the same prompts, identical (a sampled request, e.g.
  a fork with a temperature, is judged by its logits alone);
* blocks: after the workload no block is held but by the prefix cache, and each of those is
  evictable (evicting them all empties the pool).

An exception raised by the engine during the run is a failure too (a planted bug may trip the
cache's own checks before the numbers show it). The problems found come back as one line each.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from toyllm.engine.check.reference import reference_greedy, reference_logits
from toyllm.engine.check.result import ERROR, FAIL, CaseResult
from toyllm.engine.check.tolerances import Tolerance, tolerance_for
from toyllm.engine.generate import Engine
from toyllm.engine.ops.paged_cache import PagedKVCache
from toyllm.engine.sampling import SamplingParams
from toyllm.engine.serving import RequestOutput, ServingEngine
from toyllm.models.llama import Transformer

if TYPE_CHECKING:
    from toyllm.engine.check.cases import Case


@dataclass
class Arrival:
    """A request added before step `step` (0: before the first), or a fork of request
    `fork_of` (an index of the workload's requests) taken before that step."""

    prompt: list[int]
    max_new_tokens: int
    step: int = 0
    fork_of: int | None = None
    temperature: float = 0.0  # > 0: sampled (seeded); only its logits are judged then
    seed: int = 0

    def params(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              seed=self.seed, stop_at_eos=False)


@dataclass
class ServingReport:
    problems: list[str] = field(default_factory=list)
    max_abs: float = 0.0  # worst |engine - reference| logit over every compared step
    rel: float = 0.0  # worst step's ||engine - reference|| / ||reference||
    argmax_steps: int = 0  # compared steps
    argmax_agreed: int = 0  # ... where engine and reference pick the same top token
    preemptions: int = 0
    prefix_hit_blocks: int = 0
    prefill_tokens: int = 0
    steps: int = 0
    steps_ahead: int = 0  # decode steps launched before the previous step's tokens (overlap)
    outputs: dict[int, list[int]] = field(default_factory=dict)  # request index -> tokens
    near_ties: list[str] = field(default_factory=list)  # fp16/bf16 greedy flips excused

    @property
    def ok(self) -> bool:
        return not self.problems


class _RecordingEngine(ServingEngine):
    """A ServingEngine that keeps, per request, the logits each of its tokens came from."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.logits: dict[str, list[Tensor]] = {}

    def _sample_tokens(self, chunks, logits):  # type: ignore[override]
        # every step samples here, synchronous or overlapped (ServingEngine.step)
        for i, chunk in enumerate(chunks):
            self.logits.setdefault(chunk.request.request_id, []).append(logits[i].float().cpu())
        return super()._sample_tokens(chunks, logits)


def check_serving(model: Transformer, workload: list[Arrival], tolerance: float = 1e-4,
                  max_steps: int = 100_000, low_precision: Tolerance | None = None,
                  **engine_options) -> ServingReport:
    """Run `workload` through a ServingEngine(model, **engine_options); see the module doc.

    low_precision: an fp16/bf16 model is judged by its dtype's Tolerance (engine/check/
    tolerances.py) instead of `tolerance`: each teacher-forced step's ||a-b||/||b|| within its
    threshold, and a greedy token may differ from a witness only at a near-tie of the
    reference's logits (from there on the tokens are not compared)."""
    if low_precision is not None and low_precision.exact_greedy:
        raise ValueError(f"low_precision: expected an fp16/bf16 tolerance, got "
                         f"{low_precision.dtype}'s")
    report = ServingReport()
    engine = _RecordingEngine(model, **engine_options)
    ids: dict[int, str] = {}
    done: dict[str, RequestOutput] = {}
    tokens_of: dict[str, list[int]] = {}  # request id -> its output so far
    inherited: dict[str, list[Tensor]] = {}  # a fork's parent's logits up to the fork
    step = 0
    try:
        while step < max_steps:
            for i, a in enumerate(workload):
                if a.step != step or i in ids:
                    continue
                params = a.params()
                if a.fork_of is None:
                    ids[i] = engine.add_request(a.prompt, params, request_id=f"r{i}")
                    tokens_of[ids[i]] = []
                else:
                    parent = ids[a.fork_of]
                    ids[i] = engine.fork(parent, params, new_id=f"r{i}")
                    tokens_of[ids[i]] = list(tokens_of[parent])
                    # the logits of the tokens it inherits (with the overlap, the parent's next
                    # token may be sampled already, its logits recorded, and not reported yet)
                    inherited[ids[i]] = (inherited.get(parent, []) + engine.logits.get(
                        parent, []))[:len(tokens_of[parent])]
            pending = any(a.step > step for a in workload)
            if not engine.has_unfinished() and not pending:
                break
            for out in engine.step():
                tokens_of[out.request_id] += out.new_token_ids
                if out.finished:
                    done[out.request_id] = out
            step += 1
    except Exception as exc:  # noqa: BLE001 - a planted bug may trip the cache's checks
        report.problems.append(f"the engine raised {type(exc).__name__}: {exc}")
        return report
    stats = engine.stats()
    report.preemptions, report.steps = stats.preemptions, stats.steps
    report.steps_ahead = stats.steps_ahead
    report.prefix_hit_blocks, report.prefill_tokens = stats.prefix_hit_blocks, \
        stats.prefill_tokens
    static = Engine(model, max_seq_len=engine.max_seq_len)
    for i, a in enumerate(workload):
        rid = ids.get(i)
        out = done.get(rid) if rid is not None else None
        if out is None:
            report.problems.append(f"request {i} did not finish")
            continue
        tokens = tokens_of[rid]
        report.outputs[i] = tokens
        root = i
        while workload[root].fork_of is not None:  # a fork's prompt is its first parent's
            root = workload[root].fork_of
        prompt = workload[root].prompt
        greedy = a.temperature == 0
        expected, expected_logits = reference_greedy(
            model, prompt, a.max_new_tokens, max_seq_len=engine.max_seq_len) if greedy \
            else ([], [])
        ref = reference_logits(model, prompt + tokens).float().cpu()
        if greedy:
            _compare_greedy(report, f"request {i}", tokens, expected, "the no-cache reference",
                            "reference", low_precision, expected_logits)
        if a.fork_of is None and greedy:
            static_tokens = static.generate([prompt], a.params()).completions[0].token_ids
            # where the two split, the reference's logits along the served tokens
            _compare_greedy(report, f"request {i}", tokens, static_tokens, "the static Engine's",
                            "static", low_precision, ref[len(prompt) - 1:])
        got = inherited.get(rid, []) + engine.logits.get(rid, [])
        if len(got) != len(tokens):
            report.problems.append(f"request {i}: {len(got)} logits rows for {len(tokens)} "
                                   f"tokens")
        worst = worst_rel = 0.0
        for k, row in enumerate(got[: len(tokens)]):
            want = ref[len(prompt) - 1 + k]
            worst = max(worst, (row - want).abs().max().item())
            rel = ((row - want).norm() / want.norm()).item()
            worst_rel = max(worst_rel, rel)
            report.rel = max(report.rel, rel)
            report.argmax_steps += 1
            report.argmax_agreed += int(row.argmax() == want.argmax())
        if low_precision is not None:
            if not worst_rel <= low_precision.threshold:
                report.problems.append(
                    f"request {i}: teacher-forced logits differ from the reference by "
                    f"||a-b||/||b|| = {worst_rel:.3g} > {low_precision.threshold:g}")
        elif worst > tolerance:
            report.problems.append(f"request {i}: teacher-forced logits differ from the "
                                   f"reference by {worst:.3g} > {tolerance:g}")
        report.max_abs = max(report.max_abs, worst)
    report.problems += block_problems(engine)
    return report


def _compare_greedy(report: ServingReport, who: str, tokens: list[int], expected: list[int],
                    witness: str, tag: str, low_precision: Tolerance | None,
                    ref_logits: Sequence[Tensor]) -> None:
    """A problem where greedy `tokens` part from `expected` (the witness's), unless in low
    precision the two picks are a near tie of the reference's logits there (`ref_logits[k]`:
    [vocab], the logits that picked token k)."""
    if tokens == expected:
        return
    at = _first_difference(tokens, expected)
    excuse = None
    if low_precision is not None and at < min(len(tokens), len(expected)):
        excuse = _near_tie(low_precision, ref_logits[at].float().cpu(), expected[at],
                           tokens[at])
    if excuse is None:
        report.problems.append(f"{who}: greedy tokens differ from {witness} at token {at}")
    else:
        report.near_ties.append(f"{who}, token {at} ({tag}): {excuse}")


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


def _near_tie(tol: Tolerance, logits: Tensor, one: int, other: int) -> str | None:
    """Why two tokens picked from `logits` [vocab] (the reference's) may differ in low
    precision: their logits are closer than the dtype's near-tie margin; None when not."""
    gap = abs((logits[one] - logits[other]).item())
    limit = tol.near_tie_margin(logits)
    return f"gap {gap:.3g} <= near-tie {limit:.3g}" if gap <= limit else None


def block_problems(engine: ServingEngine) -> list[str]:
    """Blocks held after a workload: only the prefix cache's, each evictable."""
    cache, prefix = engine.cache, engine.prefix
    held = prefix.blocks() if prefix is not None else []
    problems = []
    if engine.has_unfinished():
        problems.append("requests are still in flight")
        return problems
    if cache.num_used_blocks() != len(held):
        problems.append(f"{cache.num_used_blocks()} blocks in use after the workload, the "
                        f"prefix cache holds {len(held)}: a block leaked")
    stuck = [b for b in held if cache.ref_count(b) != 1]
    if stuck:
        problems.append(f"prefix-cache blocks {stuck[:5]} have other references: not evictable")
    if prefix is not None and not stuck:
        prefix.evict(len(held))
        if cache.num_free_blocks() != cache.num_blocks:
            problems.append(f"after evicting the prefix cache {cache.num_free_blocks()} of "
                            f"{cache.num_blocks} blocks are free")
    return problems


# the workloads of `toyllm check`'s serving cases ---------------------------------------------
def _ids(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def join_leave(vocab: int) -> list[Arrival]:
    """Ragged prompts joining at different steps, leaving after different token counts."""
    spec = [(9, 20, 0), (1, 7, 0), (23, 12, 2), (5, 25, 5), (17, 3, 5), (30, 9, 11)]
    return [Arrival(_ids(n, i, vocab), m, s) for i, (n, m, s) in enumerate(spec)]


def shared_prefix(vocab: int) -> list[Arrival]:
    """A 32-token head shared by later prompts, the head alone (every block cached: its last
    token is recomputed into a copied block) and a repeated prompt."""
    head = _ids(32, 100, vocab)
    arrivals = [Arrival(head + _ids(3 + i, 110 + i, vocab), 8, 0 if i == 0 else 6 + i)
                for i in range(4)]
    return arrivals + [Arrival(list(head), 6, 20), Arrival(list(arrivals[1].prompt), 5, 24)]


def fork_cow(vocab: int) -> list[Arrival]:
    """Forks of a request (and of a fork) whose last block is partly filled; the sampled
    forks write other tokens than their greedy parent into the block they shared, so a missing
    copy on write shows in the parent's logits."""
    return [Arrival(_ids(13, 200, vocab), 20, 0),
            Arrival([], 16, 2, fork_of=0, temperature=1.5, seed=1),
            Arrival([], 24, 7, fork_of=0),
            Arrival([], 18, 9, fork_of=1, temperature=1.5, seed=2)]


def preempt(vocab: int) -> list[Arrival]:
    spec = [(10, 30, 0), (14, 25, 0), (6, 40, 1), (20, 12, 2), (3, 30, 4)]
    return [Arrival(_ids(n, 300 + n, vocab), m, s) for n, m, s in spec]


def _pool(blocks: int, block_size: int) -> Callable[[Transformer], int]:
    """kv_memory in bytes for a pool of `blocks` blocks of the model's shape."""
    def bytes_for(model: Transformer) -> int:
        c = model.config
        return blocks * PagedKVCache.block_bytes(c.num_layers, block_size, c.num_kv_heads,
                                                 c.head_dim, model.dtype)
    return bytes_for


# name -> (workload builder, engine options; "kv_memory" may be a function of the model)
WORKLOADS: dict[str, tuple[Callable[[int], list[Arrival]], dict[str, Any]]] = {
    "join-leave": (join_leave, dict(block_size=4, token_budget=16, kv_memory=_pool(128, 4))),
    "shared-prefix": (shared_prefix, dict(block_size=8, token_budget=64,
                                          kv_memory=_pool(64, 8))),
    "fork-cow": (fork_cow, dict(block_size=4, kv_memory=_pool(64, 4))),
    # 14 blocks of 4 hold the longest request alone (46 tokens), not all five at once
    "preempt": (preempt, dict(block_size=4, max_running=5, kv_memory=_pool(14, 4))),
}


def run_serving_case(case: Case, model: Transformer) -> CaseResult:
    """A `toyllm check` case whose request is a serving workload (case.serving)."""
    t0 = time.perf_counter()
    result = CaseResult(case.name, case.dtype, case.device)
    try:
        build, options = WORKLOADS[case.serving]
        options = {k: v(model) if callable(v) else v for k, v in options.items()}
        workload = build(model.config.vocab_size)
        low = None if case.dtype == "fp32" else tolerance_for(case.dtype)
        report = check_serving(model, workload, cuda_graph=case.cuda_graph,
                               settings=case.settings(), low_precision=low, **options)
    except Exception as exc:  # noqa: BLE001 - a case that cannot run is an ERROR, not a crash
        result.verdict, result.error = ERROR, f"{type(exc).__name__}: {exc}"
        result.traceback = traceback.format_exc()
        result.seconds = time.perf_counter() - t0
        return result
    result.max_abs, result.rel = report.max_abs, report.rel
    result.steps = report.argmax_steps
    if report.argmax_steps:
        result.argmax_agree = report.argmax_agreed / report.argmax_steps
    result.hf_note = "serving cases: the static cases carry the transformers witness"
    result.greedy_tokens = sum(len(t) for t in report.outputs.values())
    result.greedy_expected = sum(a.max_new_tokens for a in workload)
    result.greedy_match = not any("greedy tokens" in p for p in report.problems)
    result.failures = list(report.problems)
    result.notes.append(f"serving: {report.steps} steps, {report.preemptions} preemptions, "
                        f"{report.prefix_hit_blocks} prefix-cache blocks reused, "
                        f"{report.prefill_tokens} tokens prefilled")
    if report.near_ties:
        result.notes.append("greedy flips at near-ties: " + "; ".join(report.near_ties))
    if report.problems:
        result.verdict = FAIL
    result.seconds = time.perf_counter() - t0
    return result
