"""`toyllm check`: the cached engine against the no-cache reference (and Hugging Face
transformers when installed), case by case, with a verdict a script can rely on.

Per case, on one random model:

1. teacher-forced: each prompt is prefilled into the cache, then a FIXED token sequence is
   fed one decode step at a time (ragged rows stop at different steps and go inactive); the
   logits of every step are compared with `reference_logits` over the same whole sequence:
   max |diff|, worst step's ||a-b||/||b||, argmax agreement (fp16/bf16 also measure both
   paths' distance from the same weights in fp32, a diagnostic: engine/tolerances.py);
2. free-running greedy: `Engine.generate` against `reference_greedy`, row by row, with the
   finish reason; at the first divergence the reference's top-2 logit margin is reported,
   so a near-tie in low precision is told apart from a bug (engine/tolerances.py);
3. HF witness (fp32, when transformers is installed): the same weights through
   `LlamaForCausalLM` on the same device: its logits on the teacher-forced sequences, and its
   argmax at every step of the engine's greedy sequences (equal at every step is, by
   induction, the same greedy run);
4. reset cases: a bigger request dirties the engine's cache first; the request that follows
   must match the reference and a fresh engine's output token for token.

This module runs the cases; the table and the JSON report are engine/check_report.py, the
result dataclasses (`CaseResult`, `Divergence`) engine/check_result.py, the matrix of cases
engine/check_cases.py.

    from toyllm.engine.check.harness import check_model
    result = check_model(model, prompt_lens=(13, 5))
    print(result.verdict, result.max_abs, result.rel)
"""

from __future__ import annotations

import copy
import math
import os
import platform
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor

from toyllm.engine.check.cases import Case, default_matrix, weight_std
from toyllm.engine.check.reference import reference_greedy, reference_logits
from toyllm.engine.check.report import build_report, render_report, write_report
from toyllm.engine.check.result import ERROR, FAIL, PASS, CaseResult, Divergence
from toyllm.engine.check.tolerances import HF_FP32_REL, Tolerance, tolerance_for
from toyllm.engine.device import DTYPES, dtype_name, resolve_device
from toyllm.engine.generate import Engine
from toyllm.engine.sampling import SamplingParams
from toyllm.engine.settings import Settings
from toyllm.models.llama import Transformer, build_model
from toyllm.models.model_source import load_model

# The matrix's models are tiny: on the CPU one thread beats OpenMP's fork/join on every op,
# and on a busy machine (CI runners, other jobs) it is 10-50x faster than spinning workers.
CPU_THREADS = 1


class CheckError(ValueError):
    """A `toyllm check` request that cannot run (unknown dtype, fp16 on the CPU, a filter
    that matches no case...)."""


# metrics ------------------------------------------------------------------------------------
@dataclass
class _LogitStats:
    max_abs: float = 0.0
    rel: float = 0.0
    steps: int = 0
    agree: int = 0
    flips: int = 0  # disagreements beyond the near-tie margin

    def add(self, got: Tensor, ref: Tensor, tol: Tolerance | None) -> None:
        """got, ref: [steps, vocab] logits of the same positions."""
        a, b = got.detach().double().cpu(), ref.detach().double().cpu()
        diff = a - b
        self.max_abs = _worst(self.max_abs, diff.abs().max().item())
        rel = (diff.norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-30)).max().item()
        self.rel = _worst(self.rel, rel)
        self.steps += b.shape[0]
        ours, theirs = a.argmax(-1), b.argmax(-1)
        self.agree += int((ours == theirs).sum())
        if tol is not None:
            for i in (ours != theirs).nonzero().flatten().tolist():
                gap = (b[i, theirs[i]] - b[i, ours[i]]).item()
                if not gap <= tol.near_tie_margin(b[i]):
                    self.flips += 1


def _worst(current: float, new: float) -> float:
    """max() that keeps NaN (a NaN logit is the worst error there is)."""
    if math.isnan(current) or math.isnan(new):
        return math.nan
    return max(current, new)


def _within(value: float | None, limit: float) -> bool:
    return value is not None and value <= limit  # False for NaN


def _top2_margin(logits: Tensor) -> float:
    top = logits.detach().double().topk(2).values
    return (top[0] - top[1]).item()


# the request of a case ------------------------------------------------------------------------
def decode_steps(prompt_lens: Sequence[int], new_tokens: int | Sequence[int]) -> list[int]:
    """Teacher-forced decode steps per row: row 0 takes new_tokens, row b 3*b fewer (>= 1),
    so in a ragged batch rows finish, and sit inactive, while others still decode. A
    sequence gives each row's count."""
    if not isinstance(new_tokens, int):
        if len(new_tokens) != len(prompt_lens):
            raise ValueError(f"new_tokens: expected one count per prompt ({len(prompt_lens)}), "
                             f"got {list(new_tokens)}")
        return list(new_tokens)
    if new_tokens <= 0:
        return [0] * len(prompt_lens)
    return [max(1, new_tokens - 3 * b) for b in range(len(prompt_lens))]


def _random_ids(n: int, vocab: int, gen: torch.Generator) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=gen).tolist()


def _make_engine(model: Transformer, options: dict[str, Any], max_seq_len: int | None) -> Engine:
    return Engine(model, max_seq_len=max_seq_len, **options)


# 1. teacher-forced --------------------------------------------------------------------------
def _teacher_forced(
    engine: Engine, prompts: list[list[int]], conts: list[list[int]]
) -> list[Tensor]:
    """Per row: the engine's logits [1 + len(cont), vocab] for the prompt's last token and
    each fed continuation token, through prefill + one decode step at a time."""
    rows = len(prompts)
    cache = engine.prepare_cache(rows, engine.max_seq_len)
    for r in range(rows, cache.batch_size):
        cache.set_active(r, False)
    got = [[engine.prefill(cache, b, p)] for b, p in enumerate(prompts)]
    for s in range(max(len(c) for c in conts)):
        for b, c in enumerate(conts):
            if s == len(c) and cache.is_active(b):
                cache.set_active(b, False)  # this row is done; the others go on
        feed = [c[s] if s < len(c) else 0 for c in conts]
        tokens = torch.tensor(feed, device=engine.device)
        logits = engine.decode_step(cache, rows, tokens)  # [rows, vocab]
        for b, c in enumerate(conts):
            if s < len(c):
                got[b].append(logits[b].clone())
    return [torch.stack(g) for g in got]


def _fp32_twin(model: Transformer) -> Transformer:
    """The same (already rounded) weights in fp32: the no-cache result without rounding noise
    that low-precision paths are measured against."""
    return copy.deepcopy(model).float().eval()


# 2. free-running greedy -----------------------------------------------------------------------
def _compare_greedy(
    result: CaseResult, tol: Tolerance, row: int, got: list[int], finish: str,
    expected: list[int], ref_logits: list[Tensor], max_new_tokens: int,
) -> None:
    result.greedy_expected += len(expected)
    same = 0
    while same < min(len(got), len(expected)) and got[same] == expected[same]:
        same += 1
    result.greedy_tokens += same
    for logits in ref_logits[: same + 1]:
        m = _top2_margin(logits)
        result.min_margin = m if result.min_margin is None else min(result.min_margin, m)
    if same < min(len(got), len(expected)):
        ref = ref_logits[same]
        gap = (ref[expected[same]] - ref[got[same]]).item()
        limit = tol.near_tie_margin(ref)
        d = Divergence(row, same, expected[same], got[same], _top2_margin(ref), gap, limit,
                       near_tie=gap <= limit)
        result.divergences.append(d)
        if tol.exact_greedy or not d.near_tie:
            result.greedy_match = False
            result.failures.append(
                f"greedy row {row}: token {same} is {d.got}, reference {d.expected} "
                f"(reference margin {d.margin:.3g}, gap {d.gap:.3g}, near-tie <= {limit:.3g})"
            )
        return
    want = "max_new_tokens" if len(expected) == max_new_tokens else "length"
    if len(got) != len(expected) or finish != want:
        result.greedy_match = False
        result.failures.append(
            f"greedy row {row}: {len(got)} tokens, finish {finish!r}; reference "
            f"{len(expected)} tokens, finish {want!r}"
        )


# 3. Hugging Face witness ----------------------------------------------------------------------
def hf_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def load_hf_twin(model: Transformer) -> Any:
    """`LlamaForCausalLM` with this model's weights (through an fp32 checkpoint on disk, the
    way any user would load ours), on the model's device, in eval mode."""
    import transformers
    from transformers.utils import logging as hf_logging

    from toyllm.models.checkpoint import save_checkpoint

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory(prefix="toyllm-check-") as tmp:
            save_checkpoint(model, tmp, dtype=torch.float32)
            hf = transformers.LlamaForCausalLM.from_pretrained(tmp)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return hf.to(device=model.device, dtype=torch.float32).eval()


@torch.inference_mode()
def _hf_logits(hf: Any, ids: list[int], device: torch.device) -> Tensor:
    return hf(torch.tensor([ids], device=device)).logits[0]  # [T, vocab]


def _hf_witness(
    result: CaseResult, hf: Any, device: torch.device, prompts: list[list[int]],
    conts: list[list[int]], engine_logits: list[Tensor], greedy: list[list[int]],
) -> None:
    stats = _LogitStats()
    for p, c, got in zip(prompts, conts, engine_logits, strict=True):
        theirs = _hf_logits(hf, p + c, device)[len(p) - 1 :]
        stats.add(got, theirs, None)
    result.hf_rel = stats.rel
    if not _within(stats.rel, HF_FP32_REL):
        result.failures.append(
            f"HF witness: teacher-forced ||a-b||/||b|| {stats.rel:.3g} > {HF_FP32_REL:g}"
        )
    result.hf_greedy_match = True
    for row, (p, toks) in enumerate(zip(prompts, greedy, strict=True)):
        if not toks:
            continue
        logits = _hf_logits(hf, p + toks[:-1], device)[len(p) - 1 :]
        picks = logits.argmax(-1).tolist()
        for i, (want, got) in enumerate(zip(picks, toks, strict=True)):
            if want != got:
                result.hf_greedy_match = False
                result.failures.append(
                    f"HF witness: greedy row {row} token {i}: engine {got}, transformers "
                    f"{want} (transformers margin {_top2_margin(logits[i]):.3g})"
                )
                break


# one model ------------------------------------------------------------------------------------
def check_model(
    model: Transformer,
    *,
    name: str = "model",
    prompt_lens: Sequence[int] = (13, 5),
    new_tokens: int | Sequence[int] = 16,
    greedy_tokens: int = 32,
    prefill_chunk: int | None = None,
    reset_between_requests: bool = False,
    fill_to_end: bool = False,
    cuda_graph: bool | None = None,
    settings: Settings | None = None,
    hf_witness: bool = False,
    hf_model: Any = None,
    seed: int = 0,
) -> CaseResult:
    """Check the cached engine on `model` (any dtype, any device) against the no-cache
    reference: teacher-forced logits, free-running greedy tokens, optionally the HF witness
    (fp32 only; `hf_model` reuses an already loaded twin) and a reset between requests.
    Never raises for a failing engine: exceptions become verdict ERROR with the message."""
    dtype = dtype_name(model.dtype)
    result = CaseResult(name, dtype, str(model.device))
    t0 = time.perf_counter()
    try:
        _check(result, model, list(prompt_lens), new_tokens, greedy_tokens, prefill_chunk,
               reset_between_requests, fill_to_end,
               dict(prefill_chunk=prefill_chunk, cuda_graph=cuda_graph, settings=settings),
               hf_witness, hf_model, seed)
    except Exception as exc:  # a crash in the engine is a result, not the end of the run
        result.error = f"{type(exc).__name__}: {exc}"
        result.traceback = traceback.format_exc()
    result.seconds = time.perf_counter() - t0
    if result.error is not None:
        result.verdict = ERROR
    elif result.failures:
        result.verdict = FAIL
    return result


def _check(
    result: CaseResult, model: Transformer, prompt_lens: list[int],
    new_tokens: int | Sequence[int],
    greedy_tokens: int, prefill_chunk: int | None, reset: bool, fill_to_end: bool,
    options: dict[str, Any], hf_witness: bool, hf_model: Any, seed: int,
) -> None:
    tol = tolerance_for(result.dtype)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    prompts = [_random_ids(n, vocab, gen) for n in prompt_lens]
    conts = [_random_ids(n, vocab, gen) for n in decode_steps(prompt_lens, new_tokens)]
    limit = max(len(p) + len(c) for p, c in zip(prompts, conts, strict=True)) \
        if fill_to_end else None
    engine = _make_engine(model, options, limit)
    if limit is not None and engine.max_seq_len != limit:
        raise CheckError(
            f"fill_to_end needs a cache of {limit} positions but the model's context is "
            f"{model.config.max_seq_len}"
        )
    dirty = _dirty_request(engine, len(prompts), vocab, seed) if reset else None

    # 1. teacher-forced
    if dirty is not None:
        dirty()
    cache_before = engine.cache
    engine_logits = _teacher_forced(engine, prompts, conts)
    if dirty is not None and engine.cache is not cache_before:
        result.failures.append("reset: the cache was reallocated, so no reset was exercised")
    stats = _LogitStats()
    fp32 = _fp32_twin(model) if tol.metric == "rel" else None  # diagnostic only
    engine_fp32, reference_fp32 = _LogitStats(), _LogitStats()
    for p, c, got in zip(prompts, conts, engine_logits, strict=True):
        ref = reference_logits(model, p + c)[len(p) - 1 :]
        stats.add(got, ref, tol)
        if fp32 is not None:
            truth = reference_logits(fp32, p + c)[len(p) - 1 :]
            engine_fp32.add(got, truth, None)
            reference_fp32.add(ref, truth, None)
    del fp32
    result.max_abs, result.rel, result.steps = stats.max_abs, stats.rel, stats.steps
    result.argmax_agree = stats.agree / stats.steps
    result.argmax_flips = stats.flips
    if tol.metric == "rel":
        result.engine_fp32_rel, result.reference_fp32_rel = engine_fp32.rel, reference_fp32.rel
    value = stats.max_abs if tol.metric == "max_abs" else stats.rel
    if not _within(value, tol.threshold):
        what = "max |diff|" if tol.metric == "max_abs" else "||a-b||/||b||"
        why = f"teacher-forced {what} {value:.3g} > {tol.threshold:g}"
        if tol.metric == "rel":  # tells rounding noise from a bug; never a pass by itself
            why += (f" (distance from fp32: engine {engine_fp32.rel:.3g}, same-dtype "
                    f"reference {reference_fp32.rel:.3g})")
        result.failures.append(why)
    if stats.flips:
        result.failures.append(
            f"teacher-forced argmax differs from the reference at {stats.flips} of "
            f"{stats.steps} steps beyond the near-tie margin"
        )

    # 2. free-running greedy
    params = SamplingParams(max_new_tokens=greedy_tokens, stop_at_eos=False)
    if dirty is not None:
        dirty()
    cache_before = engine.cache
    completions = engine.generate(prompts, params).completions
    greedy = [c.token_ids for c in completions]
    result.greedy_match = True
    for row, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        expected, ref_logits = reference_greedy(model, p, greedy_tokens,
                                                max_seq_len=engine.max_seq_len)
        _compare_greedy(result, tol, row, c.token_ids, c.finish_reason, expected, ref_logits,
                        greedy_tokens)

    # 4. reset: the second request must not see the first
    if dirty is not None:
        if engine.cache is not cache_before:
            result.failures.append("reset: the cache was reallocated, so no reset was exercised")
        fresh = _make_engine(model, options, limit).generate(prompts, params).completions
        result.reset_match = [c.token_ids for c in fresh] == greedy
        if not result.reset_match:
            result.failures.append(
                "reset: after another request the engine's tokens differ from a fresh engine's"
            )

    # 3. the Hugging Face witness
    if hf_witness:
        if result.dtype != "fp32":
            result.hf_note = "HF witness runs in fp32 only"
        elif hf_model is None and not hf_available():
            result.hf_note = "transformers not installed: HF witness skipped"
        else:
            hf = hf_model if hf_model is not None else load_hf_twin(model)
            _hf_witness(result, hf, model.device, prompts, conts, engine_logits, greedy)


def _dirty_request(engine: Engine, rows: int, vocab: int, seed: int) -> Callable[[], None]:
    """A request with more rows and longer prompts than the case's own, filling the cache to
    its last position: whatever it leaves behind, the next request must not see."""
    gen = torch.Generator().manual_seed(seed + 1000)
    length = max(1, engine.max_seq_len - 4)
    prompts = [_random_ids(length, vocab, gen) for _ in range(rows + 1)]
    params = SamplingParams(max_new_tokens=4, stop_at_eos=False)

    def run() -> None:
        engine.generate(prompts, params)

    return run


# one case of the matrix ---------------------------------------------------------------------
def build_case_model(case: Case) -> Transformer:
    """The case's model on its device, in its dtype: random (weights N(0, weight_std)) or
    the shipped default model."""
    if case.shipped_weights:
        return load_model(None, torch.device(case.device), DTYPES[case.dtype]).model
    config = case.model_config()
    model = build_model(config, device=case.device, dtype=DTYPES[case.dtype], seed=case.seed)
    model.init_weights(case.seed, std=weight_std(config))
    return model


def run_case(case: Case, hf: bool = True, hf_cache: dict[Any, Any] | None = None) -> CaseResult:
    """Build the case's model and check it. hf_cache (config, seed, device) -> HF twin lets
    cases with the same weights share one loaded transformers model."""
    try:
        model = build_case_model(case)
    except Exception as exc:
        result = CaseResult(case.name, case.dtype, case.device, verdict=ERROR,
                            error=f"{type(exc).__name__}: {exc}",
                            traceback=traceback.format_exc())
        return result
    if case.serving is not None:
        from toyllm.engine.check.serving import run_serving_case

        return run_serving_case(case, model)
    use_hf = hf and case.dtype == "fp32" and hf_available()
    hf_model = None
    if use_hf and hf_cache is not None:
        key = (case.model_config(), case.seed, case.device)
        if key not in hf_cache:
            hf_cache[key] = load_hf_twin(model)
        hf_model = hf_cache[key]
    result = check_model(
        model, name=case.name, prompt_lens=case.prompt_lens, new_tokens=case.new_tokens,
        greedy_tokens=case.greedy_tokens, prefill_chunk=case.prefill_chunk,
        reset_between_requests=case.reset_between_requests, fill_to_end=case.fill_to_end,
        cuda_graph=case.cuda_graph, settings=case.settings(), hf_witness=hf,
        hf_model=hf_model, seed=case.seed,
    )
    result.device = case.device
    return result


# the matrix -----------------------------------------------------------------------------------
def device_names(cases: Sequence[Case]) -> dict[str, str]:
    names = {}
    for dev in sorted({c.device for c in cases}):
        if dev == "cpu":
            names["cpu"] = f"{platform.processor() or platform.machine()} ({CPU_THREADS} thread)"
        else:
            names[dev] = torch.cuda.get_device_name(torch.device(dev))
    return names


def run_matrix(
    cases: Sequence[Case],
    progress: Callable[[int, int, Case], None] | None = None,
    hf: bool = True,
) -> dict[str, Any]:
    """Run every case; the JSON-ready report: cases (metrics, failures, margins), tolerances,
    versions, devices, date and the overall verdict."""
    hf_cache: dict[Any, Any] = {}
    results: list[tuple[Case, CaseResult]] = []
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    try:
        for i, case in enumerate(cases):
            if progress is not None:
                progress(i, len(cases), case)
            results.append((case, run_case(case, hf=hf, hf_cache=hf_cache)))
    finally:
        torch.set_num_threads(threads)
    hf_witness = "on" if hf and hf_available() else \
        ("off" if not hf else "transformers not installed")
    return build_report(results, hf_witness, device_names(cases), t0)


# the command ----------------------------------------------------------------------------------
def select_cases(
    configs: Sequence[str] | None, dtypes: Sequence[str] | None, device: str
) -> list[Case]:
    """The matrix for --configs / --dtypes / --device, or CheckError saying what is wrong."""
    wanted = None
    if dtypes:
        wanted = []
        for d in dtypes:
            for part in d.split(","):
                key = part.strip().lower()
                if key not in DTYPES:
                    raise CheckError(f"unknown dtype {part!r}; expected fp32, fp16 or bf16")
                name = dtype_name(DTYPES[key])
                if name not in wanted:
                    wanted.append(name)
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise CheckError(f"unknown device {device!r}; expected auto, cpu or cuda")
    cuda = None
    if device != "cpu" and torch.cuda.is_available():
        cuda = str(resolve_device(device if device != "auto" else "cuda"))
    elif device.startswith("cuda"):
        raise CheckError(f"device {device!r} asked for, but no CUDA GPU is available here")
    low = [d for d in (wanted or []) if d != "fp32"]
    if low and cuda is None:
        raise CheckError(
            f"{', '.join(low)} need(s) a CUDA GPU; on the CPU toyllm checks fp32 only"
        )
    cases: list[Case] = []
    if device in ("auto", "cpu"):
        cpu_dtypes = None if wanted is None else [d for d in wanted if d == "fp32"]
        if cpu_dtypes is None or cpu_dtypes:
            cases += default_matrix("cpu", cpu_dtypes)
    if cuda is not None:
        cases += [_on(c, cuda) for c in default_matrix("cuda", wanted)]
    if configs is not None:
        filters = [f.strip() for c in configs for f in c.split(",") if f.strip()]
        if not filters:
            raise CheckError(f"--configs: expected case names or parts of them, got "
                             f"{', '.join(repr(c) for c in configs) or 'nothing'}")
        unmatched = [f for f in filters if not any(f in c.name for c in cases)]
        if unmatched:
            names = sorted({c.name for c in cases})
            raise CheckError(
                f"--configs {', '.join(repr(f) for f in unmatched)} match(es) no case; "
                f"cases are: {', '.join(names)}"
            )
        cases = [c for c in cases if any(f in c.name for f in filters)]
    if not cases:  # a check of nothing must not say PASS
        raise CheckError(f"no case to run for --device {device} and --dtypes "
                         f"{', '.join(wanted or [])}")
    return cases


def _on(case: Case, device: str) -> Case:
    return replace(case, device=device)


def run_check(
    configs: Sequence[str] | None = None,
    dtypes: Sequence[str] | None = None,
    device: str = "auto",
    json_path: str | Path | None = None,
    console: Console | None = None,
    hf: bool = True,
) -> int:
    """`toyllm check`: select, run, print, write the JSON report; 0 when every case passed,
    1 otherwise. Raises CheckError for a request that cannot run (the CLI's exit 2)."""
    console = console or Console(highlight=False)
    cases = select_cases(configs, dtypes, device)
    if json_path is not None:  # checked before any case runs, so no result is lost
        json_path = Path(json_path)
        parent = json_path.parent
        if not parent.is_dir():
            raise CheckError(f"--json: directory {parent} does not exist")
        if json_path.is_dir():
            raise CheckError(f"--json: {json_path} is a directory; expected a file path")
        if not os.access(parent, os.W_OK) or (json_path.exists()
                                              and not os.access(json_path, os.W_OK)):
            raise CheckError(f"--json: {json_path} is not writable")
    with console.status("checking...", spinner="dots") as status:
        def progress(i: int, n: int, case: Case) -> None:
            status.update(f"case {i + 1}/{n}: {case.label}")

        report = run_matrix(cases, progress=progress, hf=hf)
    render_report(report, console)
    if json_path is not None:
        write_report(report, json_path, console)
    return 0 if report["summary"]["verdict"] == PASS else 1
