"""`toyllm info` and `toyllm sweep`: the arithmetic matches a hand count, a small CPU sweep
writes its CSV/JSON/PNG with one row per point, bad experiment files stop before any work
(exit 2, one line, no output directory), and a failing point is reported while the sweep
goes on."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import toyllm.engine.tools.sweep as sweep
from toyllm.engine.cli import app
from toyllm.engine.tools.info import describe
from toyllm.engine.tools.sweep import ExperimentError, load_experiment
from toyllm.models.config import ModelConfig

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = REPO / "configs" / "experiments"
runner = CliRunner()

# vocab 100, hidden 8, 2 layers, 2 query heads / 1 KV head (head_dim 4), MLP 12, untied.
SMALL_TOML = """
vocab_size = 100
hidden_size = 8
num_layers = 2
num_heads = 2
num_kv_heads = 1
intermediate_size = 12
max_seq_len = 128
tie_embeddings = false
"""
# Hand count for SMALL_TOML:
#   embedding  100 * 8                        =  800
#   attention  2 layers * 8*4*(2*2 + 1*2)     =  384   (q, o: 2 heads; k, v: 1 head; dim 4)
#   mlp        2 layers * 3 * 8 * 12          =  576
#   norms      2 layers * 2 * 8 + final 8     =   40
#   lm_head    100 * 8 (untied)               =  800
#   total                                     = 2600
# KV per token: 2 (K, V) * 2 layers * 1 head * 4 dims = 16 elements: 64 B fp32, 32 B bf16.
SMALL_PARAMS = {"embedding": 800, "attention": 384, "mlp": 576, "norms": 40, "lm_head": 800}
SMALL_KV_FP32 = 64


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture()
def small_config(tmp_path: Path) -> Path:
    path = tmp_path / "small.toml"
    path.write_text(SMALL_TOML)
    return path


def write_experiment(tmp_path: Path, body: str, base: str = "small.toml") -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(f'name = "t"\nbase = "{base}"\ndevice = "cpu"\n' + body)
    return path


# toyllm info ----------------------------------------------------------------------------------
def test_info_json_matches_hand_count_of_params_and_kv_bytes(small_config: Path) -> None:
    result = invoke("info", small_config, "--batch", "3", "--context", "32", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["params"] == dict(SMALL_PARAMS, total=2600)
    assert info["attention"] == "MQA" and info["group_size"] == 2
    fp32, bf16 = info["dtypes"]["fp32"], info["dtypes"]["bf16"]
    assert fp32["weight_bytes"] == 2600 * 4 and bf16["weight_bytes"] == 2600 * 2
    assert fp32["kv_bytes_per_token"] == SMALL_KV_FP32 and bf16["kv_bytes_per_token"] == 32
    assert fp32["kv_cache_bytes"] == SMALL_KV_FP32 * 32 * 3
    assert fp32["total_bytes"] == 2600 * 4 + SMALL_KV_FP32 * 32 * 3


def test_info_kv_bytes_equal_what_the_cache_allocates() -> None:
    torch = pytest.importorskip("torch")
    kv_cache = pytest.importorskip("toyllm.engine.ops.kv_cache")
    config = ModelConfig(vocab_size=100, hidden_size=8, num_layers=2, num_heads=2,
                         num_kv_heads=1, intermediate_size=12, max_seq_len=128)
    info = describe(config, batch=3, context=32)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        allocated = kv_cache.KVCache.bytes_required(num_layers=2, max_seq_len=32, num_kv_heads=1,
                                                    head_dim=4, dtype=dtype, batch_size=3)
        assert info.dtypes[name].kv_cache_bytes == allocated


def test_info_table_shows_total_and_tied_head(tmp_path: Path) -> None:
    path = tmp_path / "tied.toml"
    path.write_text(SMALL_TOML.replace("tie_embeddings = false", "tie_embeddings = true"))
    result = invoke("info", path)
    assert result.exit_code == 0, result.output
    assert "1,800" in result.output  # 2600 - the untied lm_head's 800
    assert "tied to embedding" in result.output
    assert "KV @ 128 x 1" in result.output  # context defaults to max_seq_len


@pytest.mark.parametrize("args, message", [
    (("missing.toml",), "not found"),
    (("{small}", "--context", "256"), "longer than the model's max_seq_len 128"),
    (("{small}", "--batch", "0"), "--batch: expected a positive integer"),
])
def test_info_bad_input_is_one_line_exit_2(small_config: Path, args, message) -> None:
    result = invoke("info", *(a.format(small=small_config) for a in args))
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


# toyllm sweep: a small CPU sweep ----------------------------------------------------------------
SMALL_SWEEP = """
[grid]
num_kv_heads = [2, 1]
context = [32]
batch_size = [1, 2]
[run]
prompt_tokens = 6
new_tokens = 4
check_tokens = 4
threads = 1
"""


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_small_cpu_sweep_writes_csv_json_and_png_with_one_row_per_point(
    tmp_path: Path, small_config: Path
) -> None:
    out = tmp_path / "out"
    result = invoke("sweep", write_experiment(tmp_path, SMALL_SWEEP), "--out", out)
    assert result.exit_code == 0, result.output
    rows = read_csv(out / "sweep.csv")
    assert [(r["num_kv_heads"], r["batch_size"]) for r in rows] == [
        ("2", "1"), ("2", "2"), ("1", "1"), ("1", "2")]
    for r in rows:
        assert r["status"] == "ok" and r["check"] == "PASS"
        kv_heads, batch = int(r["num_kv_heads"]), int(r["batch_size"])
        per_token = 2 * 2 * kv_heads * 4 * 4  # K+V, 2 layers, heads, head_dim 4, fp32
        assert int(r["kv_bytes_per_token"]) == per_token
        assert int(r["kv_cache_bytes"]) == per_token * 32 * batch
        assert int(r["cache_bytes_allocated"]) == int(r["kv_cache_bytes"])  # eager: no bucket
        assert float(r["decode_tok_s_eager"]) > 0 and float(r["prefill_ms"]) > 0
        assert r["decode_tok_s_graph"] == ""  # no CUDA graphs on the CPU
        assert float(r["check_max_abs"]) <= 1e-4
    # the base has 1 KV head (2600 parameters); a second adds K and V rows: 2 layers * 2 * 8 * 4
    assert int(rows[2]["params"]) == 2600 and int(rows[0]["params"]) == 2600 + 2 * 2 * 8 * 4
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["complete"] is True and doc["device"] == "cpu"
    assert [r["index"] for r in doc["rows"]] == [0, 1, 2, 3]
    assert doc["rows"][3]["num_kv_heads"] == 1 and doc["rows"][3]["status"] == "ok"
    assert doc["grid"] == {"num_kv_heads": [2, 1], "context": [32], "batch_size": [1, 2]}
    expected_plots = {"kv_memory_vs_context.png", "decode_vs_batch.png", "error_vs_dtype.png"}
    assert set(doc["plots"]) == expected_plots
    for name in expected_plots:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "PASS" in result.output and "sweep.csv" in result.output


def test_failing_point_is_reported_in_its_row_and_the_sweep_goes_on(
    tmp_path: Path, small_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = sweep.measure

    def flaky(model, point, run, modes, out=None):
        if point.config.num_kv_heads == 2 and point.batch_size == 2:
            raise RuntimeError("CUDA out of memory (simulated)\nmore detail")
        return real(model, point, run, modes, out=out)

    monkeypatch.setattr(sweep, "measure", flaky)
    out = tmp_path / "out"
    body = SMALL_SWEEP.replace("threads = 1", "threads = 1\ncheck = false")
    result = invoke("sweep", write_experiment(tmp_path, body), "--out", out)
    assert result.exit_code == 1  # the sweep finished, but not every point ran
    rows = read_csv(out / "sweep.csv")
    assert len(rows) == 4
    assert rows[1]["status"] == "error: RuntimeError: CUDA out of memory (simulated)"
    assert rows[1]["decode_tok_s_eager"] == "" and rows[1]["kv_cache_bytes"] != ""
    assert [r["status"] for r in (rows[0], rows[2], rows[3])] == ["ok"] * 3
    assert "point 1" in result.output and "CUDA out of memory" in result.output


def test_kv_dtype_is_arithmetic_only_and_never_measured(tmp_path: Path, small_config: Path
                                                        ) -> None:
    body = """
[grid]
kv_dtype = ["fp32", "bf16"]
[run]
prompt_tokens = 4
new_tokens = 2
check = false
threads = 1
"""
    out = tmp_path / "out"
    result = invoke("sweep", write_experiment(tmp_path, body), "--out", out)
    assert result.exit_code == 0, result.output
    fp32, bf16 = read_csv(out / "sweep.csv")
    assert fp32["status"] == "ok" and fp32["decode_tok_s_eager"] != ""
    assert bf16["status"].startswith("analytic only") and bf16["decode_tok_s_eager"] == ""
    assert int(bf16["kv_bytes_per_token"]) * 2 == int(fp32["kv_bytes_per_token"])


# bad experiment files --------------------------------------------------------------------------
BAD_FILES = {
    "unknown axis": ("[grid]\nnum_kv_head = [1, 2]\n", "unknown axis 'num_kv_head'"),
    "empty grid": ("[grid]\n", "empty grid"),
    "no grid": ("[run]\nnew_tokens = 4\n", "missing [grid]"),
    "empty axis": ("[grid]\nnum_kv_heads = []\n", "num_kv_heads: empty list"),
    "not a list": ("[grid]\nnum_kv_heads = 2\n", "expected a list of values"),
    "impossible shape": ("[grid]\nnum_kv_heads = [1, 3]\n",
                         "point 1 (num_kv_heads=3): impossible shape: num_heads (2) must be a "
                         "multiple of num_kv_heads (3)"),
    "odd head_dim": ("[grid]\nhead_dim = [4, 5]\n", "RoPE needs an even head_dim"),
    "context too long": ("[grid]\ncontext = [64, 256]\n",
                         "context 256 is longer than max_seq_len 128"),
    "prompt does not fit": ("[grid]\ncontext = [16]\n[run]\nprompt_tokens = 14\nnew_tokens = 4\n",
                            "must fit in the context (16)"),
    "unknown dtype": ("[grid]\ndtype = [\"fp8\"]\n", "unknown dtype 'fp8'"),
    "graph on cpu": ("[grid]\nbatch_size = [1]\n[run]\nmodes = [\"graph\"]\n",
                     "'graph' (CUDA graphs) needs a CUDA device"),
    "unknown run key": ("[grid]\nbatch_size = [1]\n[run]\nnew_token = 4\n",
                        "[run]: unknown key(s) ['new_token']"),
    "unknown top key": ("grids = 1\n[grid]\nbatch_size = [1]\n", "unknown key(s) ['grids']"),
    "bad model override": ("[model]\nnum_layers = 0\n[grid]\nbatch_size = [1]\n",
                           "num_layers: expected a positive integer, got 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_experiment_file_fails_before_any_work(
    case: str, tmp_path: Path, small_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_work(*args, **kwargs):
        raise AssertionError("a point was measured for an invalid experiment file")

    monkeypatch.setattr(sweep, "measure", no_work)
    body, message = BAD_FILES[case]
    out = tmp_path / "out"
    result = invoke("sweep", write_experiment(tmp_path, body), "--out", out)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert result.output.startswith("error:") and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("base, message", [
    (None, "missing key 'base'"),
    ("nowhere.toml", "base config not found"),
])
def test_missing_base_config_fails_before_any_work(tmp_path: Path, base: str | None,
                                                   message: str) -> None:
    path = tmp_path / "exp.toml"
    head = "" if base is None else f'base = "{base}"\n'
    path.write_text(head + "[grid]\nbatch_size = [1]\n")
    out = tmp_path / "out"
    result = invoke("sweep", path, "--out", out)
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_missing_experiment_file_is_exit_2(tmp_path: Path) -> None:
    result = invoke("sweep", tmp_path / "nope.toml", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "experiment file not found" in result.output


# the shipped experiment files ------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_experiment_files_are_valid(path: Path) -> None:
    exp = load_experiment(path, device="cpu")
    assert exp.points and exp.name == path.stem


def test_shipped_experiments_cover_attention_variants_and_context_lengths() -> None:
    variants = load_experiment(EXPERIMENTS / "attention-variants.toml", device="cpu")
    assert variants.grid["num_kv_heads"][:1] == [32] and 1 in variants.grid["num_kv_heads"]
    assert variants.points[0].config.hidden_size == 2048  # Llama-1B shape
    lengths = load_experiment(EXPERIMENTS / "context-length.toml", device="cpu")
    assert len(lengths.grid["context"]) >= 4 and max(lengths.grid["context"]) == 8192


def test_dry_run_validates_and_writes_nothing(tmp_path: Path, small_config: Path) -> None:
    out = tmp_path / "out"
    result = invoke("sweep", write_experiment(tmp_path, SMALL_SWEEP), "--out", out, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "4 point(s) valid" in result.output and not out.exists()


def test_point_order_puts_batch_size_last_so_points_share_a_model(tmp_path: Path,
                                                                  small_config: Path) -> None:
    body = "[grid]\nbatch_size = [1, 2]\ndtype = [\"fp32\"]\nnum_kv_heads = [2, 1]\n"
    exp = load_experiment(write_experiment(tmp_path, body))
    assert list(exp.grid) == ["num_kv_heads", "dtype", "batch_size"]
    assert [(p.config.num_kv_heads, p.batch_size) for p in exp.points] == [
        (2, 1), (2, 2), (1, 1), (1, 2)]


def test_experiment_error_is_a_value_error() -> None:
    assert issubclass(ExperimentError, ValueError)


# on a GPU ---------------------------------------------------------------------------------------
@pytest.mark.cuda
def test_cuda_sweep_measures_eager_and_graph_with_the_check(tmp_path: Path,
                                                            small_config: Path) -> None:
    body = """
[grid]
dtype = ["bf16", "fp16"]
batch_size = [1, 3]
[run]
prompt_tokens = 6
new_tokens = 4
check_tokens = 4
"""
    path = write_experiment(tmp_path, body)
    path.write_text(path.read_text().replace('device = "cpu"', 'device = "cuda"'))
    out = tmp_path / "out"
    result = invoke("sweep", path, "--out", out)
    rows = read_csv(out / "sweep.csv")
    assert [r["status"] for r in rows] == ["ok"] * 4, result.output
    for r in rows:
        assert float(r["decode_tok_s_eager"]) > 0 and float(r["decode_tok_s_graph"]) > 0
        assert r["check"] == "PASS", r["check_note"]
    # CUDA graphs pad the batch to a bucket (3 -> 4 rows); the arithmetic counts 3.
    three = [r for r in rows if r["batch_size"] == "3"]
    assert all(int(r["cache_bytes_allocated"]) >= int(r["kv_cache_bytes"]) for r in three)
