"""`toyllm check --tensor-parallel N`: the sharded engine against the one-process engine and the
no-cache reference, on the cases of `toyllm check` whose shapes split into N ranks.

Per case, in this process: the case's random model (engine/check/cases.py), written as a
checkpoint the ranks load their shards from (the real shard-by-shard loader); the no-cache
reference's teacher-forced logits and greedy tokens; the one-process engine's logits and greedy
tokens. On the N ranks (one world for every case): each loads its shard, rank 0 drives the same
teacher-forced request (prefill, then a FIXED continuation one decode step at a time, ragged
rows going inactive) and the same free-running greedy request, and sends back its logits and
tokens. Judged with engine/check/tolerances.py: fp32 max |diff| <= 1e-4 against the reference
and identical greedy tokens (>= 64 per row); fp16/bf16 the relative error and near-tie rule;
and the same limits against the one-process engine. Cases whose heads, K/V heads, MLP or
vocabulary do not divide by N are listed as skipped, never silently dropped.
"""

from __future__ import annotations

import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from toyllm.engine.check.cases import Case
from toyllm.engine.check.harness import (
    CPU_THREADS,
    CheckError,
    _compare_greedy,
    _LogitStats,
    _make_engine,
    _random_ids,
    _teacher_forced,
    _within,
    build_case_model,
    decode_steps,
    device_names,
    select_cases,
)
from toyllm.engine.check.reference import reference_greedy, reference_logits
from toyllm.engine.check.report import build_report, render_report, write_report
from toyllm.engine.check.result import ERROR, FAIL, PASS, CaseResult
from toyllm.engine.check.tolerances import tolerance_for
from toyllm.engine.device import dtype_name
from toyllm.engine.sampling import SamplingParams
from toyllm.engine.tensor_parallel.launch import RankFailure, RankProcesses, World, send
from toyllm.engine.tensor_parallel.plan import TensorParallelError, allowed_ranks, check_ranks
from toyllm.engine.tensor_parallel.rank_engine import LeaderEngine, ShardSpec, build_engine, follow
from toyllm.models.checkpoint import save_checkpoint


@dataclass(frozen=True)
class RankCase:
    """What the ranks run for one case (picklable)."""

    spec: ShardSpec  # the checkpoint each rank loads its shard from, dtype, engine options
    prompts: list[list[int]]
    conts: list[list[int]]  # teacher-forced continuations
    greedy_tokens: int


def check_target(ranks: Any, conn: Any, cases: list[RankCase]) -> None:
    """Every rank: per case, load the shard and run rank 0's two requests (teacher-forced,
    greedy); rank 0 sends (logits per row, greedy tokens, finish reasons, KV bytes)."""
    torch.set_num_threads(CPU_THREADS)
    for case in cases:
        engine, _ = build_engine(case.spec, ranks)
        if not isinstance(engine, LeaderEngine):
            follow(engine)
            continue
        logits = [t.float().cpu() for t in _teacher_forced(engine, case.prompts, case.conts)]
        params = SamplingParams(max_new_tokens=case.greedy_tokens, stop_at_eos=False)
        done = engine.generate(case.prompts, params).completions
        engine.end()
        send(conn, "case", logits, [c.token_ids for c in done], [c.finish_reason for c in done],
             engine.cache.bytes_allocated())


def tensor_parallel_cases(ranks: int, configs: Any, dtypes: Any,
                          device: str) -> tuple[list[Case], list[tuple[Case, str]]]:
    """(the cases to run, the cases skipped with why): `toyllm check`'s selection, on one
    device type, less those whose shape does not split into `ranks`."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = select_cases(configs, dtypes, device)
    kept, skipped = [], []
    for case in cases:
        try:
            check_ranks(case.model_config(), ranks, where=case.name)
            kept.append(case)
        except TensorParallelError:
            allowed = ", ".join(map(str, allowed_ranks(case.model_config())))
            skipped.append((case, f"splits into {allowed} rank(s) only"))
    if not kept:
        raise CheckError(f"--tensor-parallel {ranks}: no selected case splits into {ranks} ranks")
    return kept, skipped


def _expected(case: Case, model: Any) -> dict[str, Any]:
    """The case's requests and what the reference and the one-process engine make of them."""
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(case.seed)
    prompts = [_random_ids(n, vocab, gen) for n in case.prompt_lens]
    conts = [_random_ids(n, vocab, gen) for n in decode_steps(case.prompt_lens, case.new_tokens)]
    limit = max(len(p) + len(c) for p, c in zip(prompts, conts, strict=True)) \
        if case.fill_to_end else None
    options = dict(prefill_chunk=case.prefill_chunk, cuda_graph=case.cuda_graph,
                   settings=case.settings())
    one = _make_engine(model, options, limit)
    one_logits = [t.float().cpu() for t in _teacher_forced(one, prompts, conts)]
    params = SamplingParams(max_new_tokens=case.greedy_tokens, stop_at_eos=False)
    one_greedy = [c.token_ids for c in one.generate(prompts, params).completions]
    ref_logits = [reference_logits(model, p + c)[len(p) - 1:].float().cpu()
                  for p, c in zip(prompts, conts, strict=True)]
    ref_greedy = [reference_greedy(model, p, case.greedy_tokens, max_seq_len=one.max_seq_len)
                  for p in prompts]
    return dict(prompts=prompts, conts=conts, options=dict(options, max_seq_len=limit),
                one_logits=one_logits, one_greedy=one_greedy, ref_logits=ref_logits,
                ref_greedy=ref_greedy, one_cache_bytes=one.cache.bytes_allocated())


def _judge(result: CaseResult, ranks: int, greedy_tokens: int, expected: dict[str, Any],
           got: tuple[Any, ...]) -> None:
    """Fill result: the sharded engine vs the reference (the table's columns) and vs the
    one-process engine (failures and a note)."""
    _, logits, greedy, finish, cache_bytes = got
    tol = tolerance_for(result.dtype)
    for witness, ref_logits in (("reference", expected["ref_logits"]),
                                ("one-process engine", expected["one_logits"])):
        stats = _LogitStats()
        for mine, theirs in zip(logits, ref_logits, strict=True):
            stats.add(mine, theirs, tol)
        value = stats.max_abs if tol.metric == "max_abs" else stats.rel
        if witness == "reference":
            result.max_abs, result.rel, result.steps = stats.max_abs, stats.rel, stats.steps
            result.argmax_agree, result.argmax_flips = stats.agree / stats.steps, stats.flips
        else:
            result.notes.append(f"vs one-process engine: max |diff| {stats.max_abs:.3g}, "
                                f"rel {stats.rel:.3g}")
        if not _within(value, tol.threshold):
            what = "max |diff|" if tol.metric == "max_abs" else "||a-b||/||b||"
            result.failures.append(f"sharded vs {witness}: teacher-forced {what} {value:.3g} > "
                                   f"{tol.threshold:g}")
        if stats.flips:
            result.failures.append(f"sharded vs {witness}: argmax differs at {stats.flips} of "
                                   f"{stats.steps} steps beyond the near-tie margin")
    result.greedy_match = True
    for row, (toks, why) in enumerate(zip(greedy, finish, strict=True)):
        want, step_logits = expected["ref_greedy"][row]
        _compare_greedy(result, tol, row, toks, why, want, step_logits, greedy_tokens)
        if tol.exact_greedy and toks != expected["one_greedy"][row]:
            result.greedy_match = False
            result.failures.append(f"greedy row {row}: sharded tokens differ from the "
                                   "one-process engine's")
    per_rank = cache_bytes / expected["one_cache_bytes"]
    result.notes.append(f"KV cache per rank {cache_bytes} B = {per_rank:.3g} of one process's")
    if abs(per_rank - 1 / ranks) > 1e-9:
        result.failures.append(f"KV cache per rank is {per_rank:.3g} of one process's, "
                               f"expected 1/{ranks}")


def run_tensor_parallel_check(ranks: int, configs: Any = None, dtypes: Any = None,
                              device: str = "auto", json_path: str | Path | None = None,
                              console: Console | None = None,
                              timeout_s: float = 300.0) -> int:
    """`toyllm check --tensor-parallel N`: 0 when every case passed, 1 otherwise; CheckError
    or TensorParallelError for a request that cannot run (exit 2)."""
    console = console or Console(highlight=False)
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise TensorParallelError(f"--tensor-parallel: expected a positive integer, got {ranks!r}")
    if json_path is not None and not Path(json_path).parent.is_dir():
        raise CheckError(f"--json: directory {Path(json_path).parent} does not exist")
    cases, skipped = tensor_parallel_cases(ranks, configs, dtypes, device)
    device_type = "cuda" if cases[0].device.startswith("cuda") else "cpu"
    world = World(ranks, device_type, timeout_s)
    world.check()
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    results: list[tuple[Case, CaseResult]] = []
    with tempfile.TemporaryDirectory(prefix="toyllm-tp-check-") as tmp, \
            console.status("checking...", spinner="dots") as status:
        expected, rank_cases = [], []
        for i, case in enumerate(cases):
            status.update(f"case {i + 1}/{len(cases)}: {case.label} (reference, one process)")
            model = build_case_model(case)
            directory = save_checkpoint(model, Path(tmp) / f"case{i}", dtype=None)
            exp = _expected(case, model)
            expected.append(exp)
            spec = ShardSpec(str(directory), model.dtype, engine_options=exp["options"])
            rank_cases.append(RankCase(spec, exp["prompts"], exp["conts"], case.greedy_tokens))
        torch.set_num_threads(threads)
        status.update(f"starting {ranks} ranks...")
        procs = RankProcesses.start(world, check_target, rank_cases)
        failure = None
        for i, (case, exp) in enumerate(zip(cases, expected, strict=True)):
            status.update(f"case {i + 1}/{len(cases)}: {case.label} on {ranks} ranks")
            result = CaseResult(f"{case.name}/tp{ranks}", dtype_name(rank_cases[i].spec.dtype),
                                case.device)
            started = time.perf_counter()
            try:
                if failure is not None:
                    raise failure
                _judge(result, ranks, case.greedy_tokens, exp, procs.receive(0))
            except RankFailure as exc:
                failure = exc
                result.error = str(exc)
                result.traceback = exc.rank_traceback
            except Exception as exc:  # a bug in judging is a result, not the end of the run
                result.error = f"{type(exc).__name__}: {exc}"
                result.traceback = traceback.format_exc()
            result.seconds = time.perf_counter() - started
            result.verdict = ERROR if result.error else FAIL if result.failures else PASS
            results.append((replace(case, name=result.name), result))
        if failure is None:
            procs.join()
    report = build_report(results, "off", device_names(cases), t0)
    report["tensor_parallel"] = {"ranks": ranks, "backend": world.backend,
                                 "skipped": [{"case": c.label, "why": why} for c, why in skipped],
                                 "notes": {r.name: r.notes for _, r in results}}
    console.print(f"tensor parallel: {ranks} ranks ({world.backend}); the sharded engine vs the "
                  "no-cache reference (table) and vs the one-process engine (below)",
                  markup=False)
    render_report(report, console)
    for _, r in results:
        for note in r.notes:
            console.print(f"  {r.name}: {note}", markup=False)
    for case, why in skipped:
        console.print(f"  skipped {case.label}: {why}", markup=False)
    if json_path is not None:
        write_report(report, Path(json_path), console)
    return 0 if report["summary"]["verdict"] == PASS else 1
