"""Tensor parallel on 2 GPUs (NCCL): the check in fp32 and bf16, CUDA graphs that hold the
decode step's all-reduces, and a failing rank ending both. Skipped below 2 GPUs; run with
`python -m pytest -q -m cuda tests/test_tensor_parallel_cuda.py` (docs/TENSOR_PARALLEL.md)."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest
import torch
import tp_targets

from toyllm.engine.generate import Engine
from toyllm.engine.sampling import SamplingParams
from toyllm.engine.tensor_parallel.check import run_tensor_parallel_check
from toyllm.engine.tensor_parallel.launch import RankFailure, RankProcesses, World
from toyllm.engine.tensor_parallel.rank_engine import ShardSpec
from toyllm.models.config import load_config
from toyllm.models.llama import build_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_two_gpus_match_the_reference_and_one_gpu(tmp_path: Path, dtype: str) -> None:
    """Graph-captured decode (the CUDA default), an eager ragged case, chunked prefill and the
    shipped model: DESIGN.md's tolerances against the reference and the one-GPU engine."""
    report_path = tmp_path / "report.json"
    cases = ["gqa-ragged", "gqa-ragged-eager", "mha-chunked", "gqa-hd64", "shipped-default"]
    code = run_tensor_parallel_check(2, cases, [dtype], "cuda", report_path)
    report = json.loads(report_path.read_text())
    failures = {c["name"]: c["failures"] or c["error"] for c in report["cases"]
                if c["verdict"] != "PASS"}
    assert code == 0, failures
    names = {c["name"] for c in report["cases"]}  # a filter matches by substring: -sdpa too
    assert {f"{c}/tp2" for c in cases} <= names, names


def test_cuda_graphs_capture_the_decode_step_with_its_all_reduces(tmp_path: Path) -> None:
    toml = tmp_path / "small.toml"  # head_dim 32, the shipped tokenizer's vocabulary
    toml.write_text("vocab_size = 4096\nhidden_size = 128\nnum_layers = 2\nnum_heads = 4\n"
                    "num_kv_heads = 2\nintermediate_size = 256\nmax_seq_len = 256\n")
    prompts, n = [[1, 17, 300, 42, 7], [1, 99, 5]], 32
    one = Engine(build_model(load_config(toml), device="cuda", dtype=torch.float32, seed=5),
                 cuda_graph=False)
    expected = [c.token_ids for c in one.generate(
        prompts, SamplingParams(max_new_tokens=n, stop_at_eos=False)).completions]
    got = {}
    for graph in (True, False):
        spec = ShardSpec(str(toml), torch.float32, random_weights=True, seed=5,
                         engine_options={"cuda_graph": graph})
        procs = RankProcesses.start(World(2, "cuda", timeout_s=120), tp_targets.graph_probe,
                                    spec, prompts, n)
        _, tokens, graphs = procs.receive(0, timeout_s=600)
        procs.join()
        assert graphs == ([2] if graph else []), graphs  # 2 rows: the bucket-2 graph
        got[graph] = tokens
    assert got[True] == got[False] == expected


def test_a_raising_rank_ends_both_gpus_with_its_message() -> None:
    procs = RankProcesses.start(World(2, "cuda", timeout_s=60), tp_targets.raise_on_rank, 1)
    t0 = time.monotonic()
    with pytest.raises(RankFailure, match="rank 1 of 2 failed: ValueError: injected failure"):
        procs.receive(0)
    assert time.monotonic() - t0 < 55
    assert all(not p.is_alive() for p in procs.procs) and not multiprocessing.active_children()
