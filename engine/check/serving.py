"""The serving engine (paged cache, continuous batching) against its witnesses.

`check_serving(model, workload, **engine_options)` runs a workload through a ServingEngine:
requests that join at given steps (while others decode), leave when their own token count is
reached, share prompt prefixes, fork mid-decode, and, with a small pool, get preempted. Every
request is greedy. It then judges, per request:

* teacher-forced logits: the logits each token was sampled from, against `reference_logits`
  of the no-cache reference over the request's final sequence, max |diff| <= tolerance
  (1e-4 in fp32, engine/check/tolerances.py);
* free-running greedy: the tokens against `reference_greedy` (the reference alone) and the
  static Engine (the contiguous cache) on the same prompts, identical;
* blocks: after the workload no block is held but by the prefix cache, and each of those is
  evictable (evicting them all empties the pool).

An exception raised by the engine during the run is a failure too (a planted bug may trip the
cache's own checks before the numbers show it). The problems found come back as one line each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from toyllm.engine.check.reference import reference_greedy, reference_logits
from toyllm.engine.generate import Engine
from toyllm.engine.sampling import SamplingParams
from toyllm.engine.serving import RequestOutput, ServingEngine
from toyllm.models.llama import Transformer


@dataclass
class Arrival:
    """A request added before step `step` (0: before the first), or a fork of request
    `fork_of` (an index of the workload's requests) taken before that step."""

    prompt: list[int]
    max_new_tokens: int
    step: int = 0
    fork_of: int | None = None


@dataclass
class ServingReport:
    problems: list[str] = field(default_factory=list)
    max_abs: float = 0.0  # worst |engine - reference| logit over every compared step
    preemptions: int = 0
    prefix_hit_blocks: int = 0
    prefill_tokens: int = 0
    steps: int = 0
    outputs: dict[int, list[int]] = field(default_factory=dict)  # request index -> tokens

    @property
    def ok(self) -> bool:
        return not self.problems


class _RecordingEngine(ServingEngine):
    """A ServingEngine that keeps, per request, the logits each of its tokens came from."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.logits: dict[str, list[Tensor]] = {}

    def _sample(self, chunks, logits):  # type: ignore[override]
        for i, chunk in enumerate(chunks):
            self.logits.setdefault(chunk.request.request_id, []).append(logits[i].float().cpu())
        return super()._sample(chunks, logits)


def check_serving(model: Transformer, workload: list[Arrival], tolerance: float = 1e-4,
                  max_steps: int = 100_000, **engine_options) -> ServingReport:
    """Run `workload` through a ServingEngine(model, **engine_options); see the module doc."""
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
                params = SamplingParams(max_new_tokens=a.max_new_tokens, stop_at_eos=False)
                if a.fork_of is None:
                    ids[i] = engine.add_request(a.prompt, params, request_id=f"r{i}")
                    tokens_of[ids[i]] = []
                else:
                    parent = ids[a.fork_of]
                    ids[i] = engine.fork(parent, params, new_id=f"r{i}")
                    tokens_of[ids[i]] = list(tokens_of[parent])
                    inherited[ids[i]] = inherited.get(parent, []) + engine.logits.get(parent, [])
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
        expected, _ = reference_greedy(model, prompt, a.max_new_tokens,
                                       max_seq_len=engine.max_seq_len)
        if tokens != expected:
            at = next((k for k, (x, y) in enumerate(zip(tokens, expected, strict=False))
                       if x != y), min(len(tokens), len(expected)))
            report.problems.append(f"request {i}: greedy tokens differ from the no-cache "
                                   f"reference at token {at}")
        if a.fork_of is None:
            params = SamplingParams(max_new_tokens=a.max_new_tokens, stop_at_eos=False)
            static_tokens = static.generate([prompt], params).completions[0].token_ids
            if tokens != static_tokens:
                report.problems.append(f"request {i}: greedy tokens differ from the static "
                                       f"Engine's")
        got = inherited.get(rid, []) + engine.logits.get(rid, [])
        if len(got) != len(tokens):
            report.problems.append(f"request {i}: {len(got)} logits rows for {len(tokens)} "
                                   f"tokens")
        ref = reference_logits(model, prompt + tokens).float().cpu()
        worst = 0.0
        for k, row in enumerate(got[: len(tokens)]):
            worst = max(worst, (row - ref[len(prompt) - 1 + k]).abs().max().item())
        report.max_abs = max(report.max_abs, worst)
        if worst > tolerance:
            report.problems.append(f"request {i}: teacher-forced logits differ from the "
                                   f"reference by {worst:.3g} > {tolerance:g}")
    report.problems += block_problems(engine)
    return report


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
