"""The serving benchmark (engine/tools/serving_bench.py, `toyllm bench --workload`) on a tiny
model on the CPU: workloads as specified, every request's tokens counted, prefix caching cutting
the later requests' prefill, and bad options refused in one line before anything is built."""

from __future__ import annotations

import os

import pytest
import torch
from typer.testing import CliRunner

from toyllm.engine.cli import app
from toyllm.engine.tools import serving_bench as sb
from toyllm.models.config import load_config
from toyllm.models.llama import build_model
from toyllm.models.shipped import resolve_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(load_config(resolve_config("tiny")), torch.device("cpu"), torch.float32)


def test_random_workload_is_256_requests_of_100_to_1024_tokens_each_way() -> None:
    w = sb.random_workload(32000)
    assert len(w.prompts) == 256 and len(w.outputs) == 256
    assert all(100 <= len(p) <= 1024 for p in w.prompts)
    assert all(100 <= o <= 1024 for o in w.outputs)
    assert w.prompts == sb.random_workload(32000).prompts  # fixed seed


def test_shared_prefix_workload_shares_exactly_the_system_prompt() -> None:
    w = sb.shared_prefix_workload(32000)
    assert len(w.prompts) == 64 and set(w.outputs) == {128}
    assert len(os.path.commonprefix(w.prompts)) == 1000
    assert all(20 <= len(p) - 1000 <= 100 for p in w.prompts)


def test_serving_and_static_runs_count_every_requests_own_tokens(model) -> None:
    w = sb.random_workload(model.config.vocab_size, requests=5, low=4, high=12)
    bw = 1e10
    paged = sb.run_serving(model, w, bw, prefix_caching=True, kv_memory=2**22, block_size=4,
                           label="paged")
    static = sb.run_static(model, w)
    assert paged.output_tokens == static.output_tokens == sum(w.outputs)
    assert paged.extra["preemptions"] == 0 and paged.ttft_s and paged.itl_ms
    assert 0 < paged.extra["decode_steps_frac_roofline"]
    assert static.extra["decode_steps"] == max(w.outputs) - 1
    assert sb.lower_bound_s(model, w, bw, 1e12) > 0


def test_a_serving_run_with_the_overlap_times_its_decode_steps(model) -> None:
    # ServingEngine(overlap=True) on the CPU: step() takes one step's tokens while the next
    # is launched; the run finishes and its pure decode calls are still timed
    w = sb.random_workload(model.config.vocab_size, requests=5, low=4, high=12)
    run = sb.run_serving(model, w, 1e10, prefix_caching=True, kv_memory=2**22, block_size=4,
                         label="paged", overlap=True)
    assert run.output_tokens == sum(w.outputs) and run.ttft_s and run.itl_ms
    assert run.extra["steps_ahead"] > 0
    assert 0 < run.extra["decode_steps_frac_roofline"]


def test_prefix_caching_cuts_the_later_requests_prefill(model) -> None:
    w = sb.shared_prefix_workload(model.config.vocab_size, requests=4, prefix=64, new_tokens=3)
    runs = {c: sb.run_serving(model, w, 1e10, prefix_caching=c, kv_memory=2**22, block_size=4,
                              label=str(c), first_alone=True) for c in (True, False)}
    own = sum(len(p) - 64 for p in w.prompts[1:])
    assert runs[True].extra["others_prefill_tokens"] <= own + 3  # at most a recomputed token each
    assert runs[False].extra["others_prefill_tokens"] == own + 3 * 64
    assert runs[True].extra["peak_kv_bytes"] < runs[False].extra["peak_kv_bytes"]


@pytest.mark.parametrize("args, message", [
    (["--workload", "nope"], "--workload: expected decode, random, shared-prefix, got 'nope'"),
    (["--workload", "random", "--models", "tiny"], "needs a context of 2048 tokens"),
    (["--workload", "random", "--models", "tiny,stories15m"], "takes one model"),
    (["--workload", "random", "--hf-requests", "0"], "--hf-requests"),
    (["--workload", "random", "--kv-memory", "lots"], "--kv-memory"),
])
def test_bad_workload_options_are_one_line_and_exit_2(args, message) -> None:
    result = CliRunner().invoke(app, ["bench", "--device", "cpu", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
