"""Tensor-parallel decode on the CPU: 2 ranks over gloo, tiny models (engine/tensor_parallel/).

What each test proves is in its name: the shard plan and its refusals, shards that are exact
slices of the whole model (safetensors slices, seeded random weights), the sharded engine's
logits and greedy tokens against the no-cache reference and the one-process engine, KV bytes
per rank halved, a served engine that survives a refused request, and failures (a raising
rank, a hanging rank, a rank dying mid-generation) that end every rank with one message.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest
import torch
import tp_targets
from typer.testing import CliRunner

from toyllm.engine.cli import app
from toyllm.engine.generate import Engine, GenerationError
from toyllm.engine.sampling import SamplingParams
from toyllm.engine.tensor_parallel.check import run_tensor_parallel_check
from toyllm.engine.tensor_parallel.collectives import RankGroup
from toyllm.engine.tensor_parallel.launch import RankFailure, RankProcesses, World
from toyllm.engine.tensor_parallel.load import _random_reader, _safetensors_reader, build_shard
from toyllm.engine.tensor_parallel.parallel_engine import TensorParallelEngine
from toyllm.engine.tensor_parallel.plan import (
    ShardPlan,
    TensorParallelError,
    allowed_ranks,
    check_ranks,
    shard_config,
)
from toyllm.engine.tensor_parallel.rank_engine import ShardSpec
from toyllm.models.checkpoint import save_checkpoint
from toyllm.models.config import ModelConfig, load_config
from toyllm.models.llama import build_model
from toyllm.models.shipped import resolve_config

TINY = resolve_config("tiny")  # 4 heads, 2 K/V heads, MLP 176, vocab 512, tied
runner = CliRunner()


def _config(**changes: int) -> ModelConfig:
    return load_config(TINY).with_overrides(**changes)


# the plan ------------------------------------------------------------------------------------
def test_rank_counts_that_do_not_divide_are_refused_naming_every_size() -> None:
    config = _config(num_heads=6, num_kv_heads=3, hidden_size=96, intermediate_size=102)
    with pytest.raises(TensorParallelError) as err:
        check_ranks(config, 4)
    text = str(err.value)
    assert "num_heads 6" in text and "num_kv_heads 3" in text and "intermediate_size 102" in text
    assert "vocab_size" not in text and "allows: 1" in text
    for bad in (0, -1, 2.0, True):
        with pytest.raises(TensorParallelError, match="positive integer"):
            check_ranks(config, bad)  # type: ignore[arg-type]
    assert allowed_ranks(_config()) == [1, 2]


def test_shard_config_keeps_head_dim_and_vocabulary_and_halves_the_rest() -> None:
    whole = _config()
    half = shard_config(whole, 2)
    assert (half.num_heads, half.num_kv_heads, half.intermediate_size) == (2, 1, 88)
    assert half.head_dim == whole.head_dim and half.vocab_size == whole.vocab_size
    assert half.kv_bytes_per_token(4) * 2 == whole.kv_bytes_per_token(4)


@pytest.mark.parametrize("reader", ["safetensors", "random"])
def test_each_rank_holds_exactly_its_slice_of_every_weight(tmp_path: Path, reader: str) -> None:
    config = _config(tie_embeddings=False)
    whole = build_model(config, seed=3)
    if reader == "safetensors":
        save_checkpoint(whole, tmp_path, dtype=torch.float32)
        read = _safetensors_reader(tmp_path, config)
    full = dict(whole.named_parameters())
    got = {}
    for rank in range(2):
        if reader == "random":
            read = _random_reader(config, torch.device("cpu"), torch.float32, seed=3)
        plan = ShardPlan(config, rank, 2)
        shard = build_shard(config, plan, RankGroup(rank, 2, torch.device("cpu")), read,
                            torch.float32, "test")
        for name, p in shard.named_parameters():
            got.setdefault(name, []).append(p.detach())
    for name, parts in got.items():
        cut = ShardPlan(config, 0, 2).split(name)
        joined = parts[0] if cut is None else torch.cat(parts, dim=cut[0])
        if cut is None:
            assert torch.equal(parts[0], parts[1]), name
        assert torch.equal(joined, full[name].detach()), name
    q = got["layers.0.self_attn.q_proj.weight"][0]
    assert q.shape == (2 * config.head_dim, config.hidden_size)  # rank 0: query heads 0 and 1


def test_a_gguf_shard_is_the_slice_of_the_dequantised_unpermuted_whole(tmp_path: Path) -> None:
    """Q8_0 blocks and llama.cpp's Q/K row permutation: each rank's slices, joined, are the
    weights the one-process GGUF loader gives."""
    gguf = pytest.importorskip("gguf")
    from test_gguf import CONFIG, write_gguf
    from tokenizer_fixtures import train_byte_level_bpe

    from toyllm.engine.tensor_parallel.load import _gguf_reader
    from toyllm.models.gguf_file import load_gguf

    path = write_gguf(tmp_path / "m.gguf", build_model(CONFIG, seed=7), train_byte_level_bpe(),
                      qtype=gguf.GGMLQuantizationType.Q8_0)
    whole, config, _ = load_gguf(path, dtype=torch.float32)
    parts: dict[str, list[torch.Tensor]] = {}
    for rank in range(2):
        plan = ShardPlan(config, rank, 2)
        got_config, read, tokenizer = _gguf_reader(path, plan)
        assert got_config == config and tokenizer is not None
        shard = build_shard(config, plan, RankGroup(rank, 2, torch.device("cpu")), read,
                            torch.float32, str(path))
        for name, p in shard.named_parameters():
            parts.setdefault(name, []).append(p.detach())
    for name, p in whole.named_parameters():
        cut = ShardPlan(config, 0, 2).split(name)
        joined = parts[name][0] if cut is None else torch.cat(parts[name], dim=cut[0])
        assert torch.equal(joined, p.detach()), name


# the sharded engine against its witnesses ------------------------------------------------------
def test_two_ranks_match_the_reference_and_one_process(tmp_path: Path) -> None:
    """`toyllm check --tensor-parallel 2` on a GQA ragged batch and a chunked-prefill MHA
    case: fp32 max |diff| <= 1e-4 against the no-cache reference and the one-process engine,
    identical greedy tokens (64 per row), KV bytes per rank half of one process's."""
    report_path = tmp_path / "report.json"
    code = run_tensor_parallel_check(2, ["gqa-ragged", "mha-chunked"], ["fp32"], "cpu",
                                     report_path)
    report = json.loads(report_path.read_text())
    assert code == 0, report["summary"]
    assert {c["name"] for c in report["cases"]} == {"gqa-ragged/tp2", "mha-chunked/tp2"}
    for case in report["cases"]:
        assert case["verdict"] == "PASS" and case["max_abs"] <= 1e-4, case["failures"]
        rows = len(case["case"]["prompt_lens"])
        assert case["greedy_tokens"] == case["greedy_expected"] == 64 * rows
        notes = report["tensor_parallel"]["notes"][case["name"]]
        assert any("= 0.5 of one process's" in n for n in notes), notes
        one = next(n for n in notes if n.startswith("vs one-process"))
        assert float(one.split("max |diff| ")[1].split(",")[0]) <= 1e-4


@pytest.fixture(scope="module")
def tiny4096(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/tiny.toml with the shipped tokenizer's vocabulary (random weights take the
    shipped tokenizer, so the text streams too)."""
    toml = tmp_path_factory.mktemp("tp") / "tiny4096.toml"
    toml.write_text(TINY.read_text().replace("vocab_size = 512", "vocab_size = 4096"))
    return toml


def test_a_served_engine_matches_one_process_and_survives_a_refused_request(
        tiny4096: Path) -> None:
    toml = tiny4096
    params = SamplingParams(max_new_tokens=24)
    one = Engine(build_model(load_config(toml), seed=5), None)
    prompts = [[1, 17, 300, 42, 7], [1, 99]]
    expected = one.generate(prompts, params)
    pieces: list[tuple[int, str]] = []
    with TensorParallelEngine(str(toml), tensor_parallel=2, device="cpu", dtype="fp32",
                              random_weights=True, seed=5, timeout_s=60) as engine:
        got = engine.generate(prompts, params, on_text=lambda i, s: pieces.append((i, s)))
        with pytest.raises(GenerationError, match="context holds 256"):
            engine.generate([[5] * 300], params)  # refused on rank 0 before any step
        again = engine.generate(prompts[:1], params)
    assert [c.token_ids for c in got.completions] == [c.token_ids for c in expected.completions]
    assert again.completions[0].token_ids == expected.completions[0].token_ids
    assert got.stats.cache_bytes * 2 == expected.stats.cache_bytes
    for i, c in enumerate(got.completions):
        assert c.text and "".join(s for j, s in pieces if j == i) == c.text


def test_the_shards_plain_forward_gives_the_whole_models_logits() -> None:
    ids = [1, 17, 300, 42, 7, 250, 3]
    whole = build_model(load_config(TINY), seed=5)
    with torch.inference_mode():
        expected = whole(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0))[0]
    spec = ShardSpec(str(TINY), torch.float32, random_weights=True, seed=5)
    procs = RankProcesses.start(World(2, "cpu", timeout_s=60), tp_targets.plain_forward_probe,
                                spec, ids)
    _, logits = procs.receive(0)
    procs.join()
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() <= 1e-4


# failures end every rank, with one message --------------------------------------------------------
def _all_ended(procs: RankProcesses) -> bool:
    return all(not p.is_alive() for p in procs.procs)


def test_a_raising_rank_ends_every_rank_with_its_message() -> None:
    procs = RankProcesses.start(World(2, "cpu", timeout_s=60), tp_targets.raise_on_rank, 1)
    t0 = time.monotonic()
    with pytest.raises(RankFailure) as err:
        procs.receive(0)
    assert time.monotonic() - t0 < 50  # well inside the group's timeout: no waiting on it
    assert str(err.value).startswith("rank 1 of 2 failed: ValueError: injected failure on rank 1")
    assert err.value.rank == 1 and "raise_on_rank" in err.value.rank_traceback
    assert _all_ended(procs) and not multiprocessing.active_children()


def test_a_rank_dying_without_a_word_is_named_as_the_cause() -> None:
    procs = RankProcesses.start(World(2, "cpu", timeout_s=60), tp_targets.die_on_rank, 1)
    with pytest.raises(RankFailure, match=r"rank 1 of 2 exited \(code 3\) without a message; "
                                          "every rank was stopped"):
        procs.receive(0)
    assert _all_ended(procs)


def test_a_hanging_rank_ends_every_rank_at_the_timeout() -> None:
    procs = RankProcesses.start(World(2, "cpu", timeout_s=3), tp_targets.hang_on_rank, 1, 120.0)
    t0 = time.monotonic()
    with pytest.raises(RankFailure) as err:
        procs.receive(0)
    assert time.monotonic() - t0 < 60  # the 3 s timeout (plus start-up), not the 120 s sleep
    assert str(err.value).startswith("rank 0 of 2 failed:"), str(err.value)
    assert _all_ended(procs)


def test_a_rank_failing_mid_generation_ends_every_rank_with_one_message(tiny4096: Path) -> None:
    spec = ShardSpec(str(tiny4096), torch.float32, random_weights=True, seed=5)
    procs = RankProcesses.start(World(2, "cpu", timeout_s=60), tp_targets.serve_failing_decode,
                                spec, 1, 3)
    assert procs.receive(0)[0] == "ready"
    procs.send(1, "follow")
    procs.send(0, "generate", [[1, 2, 3]], SamplingParams(max_new_tokens=10), False, False, None)
    with pytest.raises(RankFailure, match="rank 1 of 2 failed: RuntimeError: injected decode "
                                          "failure at step 3; every rank was stopped"):
        procs.receive(0)
    assert _all_ended(procs)


def test_a_forward_rank_0_did_not_announce_fails_at_once() -> None:
    spec = ShardSpec(str(TINY), torch.float32, random_weights=True, seed=5,
                     with_tokenizer=False)
    procs = RankProcesses.start(World(2, "cpu", timeout_s=60), tp_targets.unannounced_forward,
                                spec)
    with pytest.raises(RankFailure, match="rank 0 of 2 failed: RuntimeError: rank 0 ran a "
                                          "forward pass the other ranks were not told of"):
        procs.receive(0)
    assert _all_ended(procs)


# the command line --------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "fragment"), [
    ("0", "expected a positive integer, got 0"),
    ("-2", "expected a positive integer, got -2"),
    ("3", "num_heads 4, num_kv_heads 2, intermediate_size 176, vocab_size 512"),
    ("8", "num_kv_heads 2"),
    ("abc", "Input should be a valid integer"),
])
def test_a_bad_tensor_parallel_value_is_one_line_exit_2(value: str, fragment: str) -> None:
    for command in (["generate", "x", "--model", str(TINY), "--random-weights"], ["check"]):
        if command == ["check"] and value in ("3", "8"):
            fragment = "no selected case splits into"
        result = runner.invoke(app, [*command, "--device", "cpu", "--tensor-parallel", value])
        assert result.exit_code == 2, (command, result.output)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], \
            result.stderr
    assert not multiprocessing.active_children()  # refused before any rank started
