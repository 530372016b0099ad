"""The serving engine's faces on the command line: `toyllm generate --prompts-file` runs through
it (same tokens as the static engine), its options are checked like every other number, and
`toyllm info` shows how many paged KV blocks a GiB holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_checkpoints import save_tiny_checkpoint
from typer.testing import CliRunner

from toyllm.engine.cli import app
from toyllm.engine.cli_numbers import NumberError, memory_amount
from toyllm.engine.ops.paged_cache import PagedKVCache
from toyllm.engine.tools.info import describe
from toyllm.models.config import ModelConfig
from toyllm.models.model_source import DEFAULT_MODEL_DIR

TOKENIZER = DEFAULT_MODEL_DIR / "tokenizer.model"
pytestmark = pytest.mark.skipif(not TOKENIZER.is_file(), reason="default tokenizer not built")
runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), vocab_size=4096, max_seq_len=64,
                                seed=1, tokenizer_path=TOKENIZER)


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def test_a_prompts_file_runs_through_the_serving_engine_with_the_static_tokens(
        checkpoint: Path, tmp_path: Path) -> None:
    prompts = ["def f(x):", "import os", "def f(x): return", "class A:"]
    f = tmp_path / "p.txt"
    f.write_text("\n".join(prompts) + "\n")
    common = ["--model", checkpoint, "--max-new-tokens", "6", "--temperature", "0", "--json",
              "--device", "cpu"]
    served = run("generate", "--prompts-file", f, "--block-size", "4", "--kv-memory", "1MiB",
                 *common)
    assert served.exit_code == 0, served.output
    data = json.loads(served.stdout)
    assert data["serving"]["block_size"] == 4 and data["serving"]["steps"] > 0
    static = json.loads(run("generate", *prompts, *common).stdout)
    assert [c["token_ids"] for c in data["completions"]] == \
        [c["token_ids"] for c in static["completions"]]
    assert "serving" not in static


@pytest.mark.parametrize("args, message", [
    (["--block-size", "3"], "block_size: expected a positive power of two"),
    (["--block-size", "128"], "divisor of the context length 64"),
    (["--block-size", "0"], "--block-size: expected an integer"),
    (["--kv-memory", "lots"], "--kv-memory: expected a fraction"),
    (["--kv-memory", "1.5"], "--kv-memory: expected a fraction"),
    (["--kv-memory", "-2GiB"], "--kv-memory: expected a fraction"),
    (["--kv-memory", "100"], "hold no KV block"),
    (["--token-budget", "0"], "--token-budget: expected an integer"),
    (["--prefill-chunk", "8"], "--prefill-chunk applies to prompts given as arguments"),
])
def test_bad_serving_options_are_one_line_exit_2(checkpoint: Path, tmp_path: Path, args,
                                                 message: str) -> None:
    f = tmp_path / "p.txt"
    f.write_text("a = 1\n")
    r = run("generate", "--prompts-file", f, "--model", checkpoint, "--device", "cpu", *args)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


def test_a_prompt_longer_than_the_pool_is_one_line_exit_2(checkpoint: Path,
                                                          tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("short\n" + "word " * 10 + "\n")  # about 20 tokens: 5 blocks of 4
    one_block = 2 * 2 * 2 * 16 * 4 * 4  # layers * K,V * kv heads * head_dim * fp32 * 4 tokens
    r = run("generate", "--prompts-file", f, "--model", checkpoint, "--device", "cpu",
            "--block-size", "4", "--kv-memory", str(3 * one_block))
    assert r.exit_code == 2, r.output
    assert "KV blocks of 4 tokens, the pool has 3" in r.output


def test_memory_amounts_parse_as_fractions_or_bytes() -> None:
    assert memory_amount("--kv-memory", "0.25") == 0.25
    assert memory_amount("--kv-memory", "1.0") == memory_amount("--kv-memory", "1") == 1.0
    assert memory_amount("--kv-memory", "512MiB") == 2**29
    assert memory_amount("--kv-memory", "1e9") == 10**9
    assert memory_amount("--kv-memory", "3 GB") == 3 * 10**9
    assert memory_amount("--kv-memory", "4096") == 4096
    for bad in ("", "0", "-1", "0.0", "nan", "inf", "2XB", "0.5b", "1e30TiB", "1.5"):
        with pytest.raises(NumberError, match="--kv-memory"):
            memory_amount("--kv-memory", bad)


def test_info_blocks_per_gib_equal_what_the_paged_cache_allocates() -> None:
    config = ModelConfig(vocab_size=100, hidden_size=8, num_layers=2, num_heads=2,
                         num_kv_heads=1, intermediate_size=12, max_seq_len=128)
    for block_size in (1, 16, 128):
        info = describe(config, block_size=block_size)
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            block = PagedKVCache.block_bytes(2, block_size, 1, 4, dtype)
            assert info.dtypes[name].kv_block_bytes == block
            assert info.dtypes[name].kv_blocks_per_gib == 2**30 // block


def test_info_shows_blocks_per_gib_and_checks_the_block_size(checkpoint: Path) -> None:
    r = run("info", checkpoint / "config.json", "--block-size", "32")
    assert r.exit_code == 0, r.output
    # fp32: 2 layers x K,V x 2 KV heads x 16 dims x 4 bytes = 512 bytes a token, 16 KiB a block
    assert "65,536" in r.output and "blocks of 32 tokens" in " ".join(r.output.split())
    data = json.loads(run("info", checkpoint / "config.json", "--json").stdout)
    assert data["block_size"] == 16 and data["dtypes"]["fp32"]["kv_blocks_per_gib"] > 0
    for bad, message in (("12", "power of two"), ("128", "dividing max_seq_len 64"),
                         ("0", "positive integer")):
        r = run("info", checkpoint / "config.json", "--block-size", bad)
        assert r.exit_code == 2 and message in r.output
