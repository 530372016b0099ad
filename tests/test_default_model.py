"""The shipped default model (models/default/) and the scripts that rebuild it: its recorded
validation loss beats a uniform guess by far, it loads fast and fits the size limits, the
tokenizer rebuilds byte for byte, a tiny training run on a packed corpus lowers the loss and
saves a checkpoint that loads, and the one-call GPU script runs end to end on the CPU."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from toyllm.models.checkpoint import load_checkpoint, read_metadata
from toyllm.models.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
# scripts/ is not an installed package: its files import each other as siblings, the way
# `python scripts/X.py` runs them (scripts/ first on sys.path)
if str(REPO_ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "scripts"))

from build_corpus import (  # noqa: E402
    Document,
    collect_stdlib,
    load_corpus,
    make_corpus,
    write_corpus,
)
from pack_corpus import pack  # noqa: E402
from train_default_model import TrainArgs, load_packed, train  # noqa: E402
from train_tokenizer import record_path_for, train_tokenizer  # noqa: E402

DEFAULT_DIR = REPO_ROOT / "models" / "default"
DEFAULT_TOKENIZER = DEFAULT_DIR / "tokenizer.model"
STDLIB = Path(sysconfig.get_paths()["stdlib"])

needs_shipped_model = pytest.mark.skipif(
    not (DEFAULT_DIR / "model.safetensors").is_file(),
    reason="models/default/model.safetensors not trained yet (scripts/train_default_model.sh)",
)
needs_tokenizer = pytest.mark.skipif(
    not DEFAULT_TOKENIZER.is_file(), reason="models/default/tokenizer.model not built yet"
)


# The shipped model ---------------------------------------------------------------------------


@needs_shipped_model
def test_shipped_model_val_loss_is_below_60_percent_of_a_uniform_guess() -> None:
    vocab = load_config(DEFAULT_DIR).vocab_size
    val_loss = float(read_metadata(DEFAULT_DIR)["val_loss"])
    assert val_loss < 0.6 * math.log(vocab), (val_loss, math.log(vocab))


@needs_shipped_model
def test_shipped_model_was_trained_with_the_shipped_tokenizer() -> None:
    meta = read_metadata(DEFAULT_DIR)
    assert meta["tokenizer_sha256"] == hashlib.sha256(DEFAULT_TOKENIZER.read_bytes()).hexdigest()
    record = json.loads(record_path_for(DEFAULT_TOKENIZER).read_text())
    assert record["model_sha256"] == meta["tokenizer_sha256"]
    # the tokenizer may come from an earlier corpus than the model's (the stdlib-only one
    # tokenises the held-out stdlib files best); on the same corpus the texts must agree
    if meta["corpus"] == record["corpus"]:
        assert meta["corpus_sha256"] == record["corpus_text_sha256"]


@needs_shipped_model
def test_shipped_model_directory_fits_the_size_limits() -> None:
    assert (DEFAULT_DIR / "model.safetensors").stat().st_size < 60e6
    assert sum(f.stat().st_size for f in DEFAULT_DIR.iterdir() if f.is_file()) < 62e6


@needs_shipped_model
def test_shipped_model_loads_in_under_a_second_in_a_fresh_process() -> None:
    # A fresh interpreter: one-time costs (lazy imports inside torch) count, `import torch`
    # itself does not.
    code = (
        "import time, torch\n"
        "from toyllm.models.checkpoint import load_checkpoint\n"
        "from toyllm.models.tokenizer import Tokenizer\n"
        "t = time.perf_counter()\n"
        f"model, config = load_checkpoint({str(DEFAULT_DIR)!r})\n"
        f"tok = Tokenizer.from_file({str(DEFAULT_TOKENIZER)!r})\n"
        "print(time.perf_counter() - t)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    seconds = float(out.stdout.strip().splitlines()[-1])
    assert seconds < 1.0, f"loading the default model took {seconds:.2f} s"


# Rebuilding --------------------------------------------------------------------------------


@pytest.mark.slow
@needs_tokenizer
def test_tokenizer_rebuilt_from_its_corpus_is_byte_identical() -> None:
    record = json.loads(record_path_for(DEFAULT_TOKENIZER).read_text())
    trained_on = tuple(int(x) for x in record["python_version"].split(".")[:2])
    if sys.version_info[:2] != trained_on:
        pytest.skip(
            f"the tokenizer was trained on Python {record['python_version']}'s corpus; this is "
            f"{platform.python_version()}, whose stdlib is a different corpus"
        )
    if record["corpus"].startswith("corpus-"):  # the stdlib alone: rebuilt here, no download
        corpus, _ = collect_stdlib()
    else:  # stdlib + PyPI: scripts/build_corpus.py must have built it (downloads once)
        path = REPO_ROOT / ".corpus" / record["corpus"]
        if not path.is_file():
            pytest.skip(f"{path} not built (scripts/build_corpus.py)")
        corpus = load_corpus(path)
    if corpus.text_sha256 != record["corpus_text_sha256"]:
        pytest.skip(
            f"this Python {platform.python_version()}'s corpus differs from the "
            f"{record['python_version']} one the tokenizer was trained on"
        )
    options = record["trainer_options"]
    model = train_tokenizer(corpus, options["vocab_size"], options["num_threads"],
                            **({"max_lines": record["max_lines"]} if "max_lines" in record else {}))
    assert model == DEFAULT_TOKENIZER.read_bytes(), (
        f"rebuilt tokenizer differs (sentencepiece here {__import__('sentencepiece').__version__}"
        f", at training {record['sentencepiece_version']})"
    )


@pytest.fixture
def one_cpu_thread() -> Iterator[None]:
    """Tiny ops run ~10x faster on one thread than on two busy cores (no thread hand-offs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MICRO_CONFIG = (
    "vocab_size = 4096\nhidden_size = 32\nnum_layers = 1\nnum_heads = 2\n"
    "num_kv_heads = 1\nintermediate_size = 64\nmax_seq_len = 64\ntie_embeddings = true\n"
)


@pytest.fixture
def packed(tmp_path: Path) -> Path:
    """A few stdlib modules, tokenised with the shipped tokenizer and packed."""
    if not DEFAULT_TOKENIZER.is_file():
        pytest.skip("models/default/tokenizer.model not built yet")
    names = ["textwrap.py", "difflib.py", "argparse.py", "shlex.py", "fnmatch.py"]
    documents = [
        Document(name, (STDLIB / name).read_text(encoding="utf-8"), "train") for name in names
    ]
    documents += [
        Document(name, (STDLIB / name).read_text(encoding="utf-8"), "val")
        for name in ["glob.py", "bisect.py"]
    ]
    corpus_path = write_corpus(make_corpus(documents), tmp_path / "corpus")
    pack(corpus_path, DEFAULT_TOKENIZER, tmp_path / "packed")
    return tmp_path / "packed"


@pytest.fixture
def micro_run(tmp_path: Path, packed: Path, one_cpu_thread: None) -> TrainArgs:
    """TrainArgs for a seconds-long CPU run: a micro Llama on a few stdlib modules."""
    config = tmp_path / "micro.toml"
    config.write_text(MICRO_CONFIG)
    return TrainArgs(
        data=packed,
        config=config,
        out=tmp_path / "ckpt",
        seed=0,
        max_steps=40,
        batch_size=8,
        seq_len=32,
        lr=1e-2,
        warmup=4,
        eval_every=20,
        val_windows=16,
        log_every=5,
        device="cpu",
        log=tmp_path / "log.jsonl",
    )


def quiet(line: str) -> None:
    """Progress lines go nowhere in tests."""


def test_packed_corpus_holds_each_file_between_bos_and_eos(packed: Path) -> None:
    data = load_packed(packed)
    meta = data.meta
    assert data.val.dtype == torch.int32 and data.val.numel() == meta["val"]["tokens"]
    assert int(data.val[0]) == meta["bos_id"] and int(data.val[-1]) == meta["eos_id"]
    assert int((data.train == meta["bos_id"]).sum()) == meta["train"]["documents"] == 5
    assert int((data.val == meta["eos_id"]).sum()) == 2


def test_packed_corpus_that_does_not_match_its_meta_is_refused(packed: Path) -> None:
    meta = json.loads((packed / "meta.json").read_text())
    meta["val"]["ids_sha256"] = "0" * 64
    (packed / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="val.u16.xz: .* meta.json expects"):
        load_packed(packed)


def test_training_smoke_run_lowers_the_loss_and_saves_a_loadable_checkpoint(
    micro_run: TrainArgs,
) -> None:
    args = micro_run
    facts = train(args, say=quiet)

    records = [json.loads(line) for line in args.log.read_text().splitlines()]
    assert [r["step"] for r in records if r["val_loss"] is not None] == [0, 20, 40]
    first_val = records[0]["val_loss"]
    assert abs(first_val - math.log(4096)) < 0.5  # random init: about a uniform guess
    assert facts["val_loss"] < first_val - 1.0
    train_losses = [r["train_loss"] for r in records if r["train_loss"] is not None]
    assert train_losses[-1] < train_losses[0] - 1.0

    model, loaded_config = load_checkpoint(args.out)
    assert loaded_config.hidden_size == 32 and model.dtype == torch.bfloat16
    assert (args.out / "tokenizer.model").read_bytes() == DEFAULT_TOKENIZER.read_bytes()
    assert facts["val_nats_per_byte"] == pytest.approx(
        facts["val_loss"] / facts["val_bytes_per_token"], rel=1e-3)
    meta = read_metadata(args.out)
    assert float(meta["val_loss"]) == facts["val_loss"]
    assert meta["seed"] == "0" and meta["corpus_sha256"] == facts["corpus_sha256"]
    assert json.loads((args.out / "training.json").read_text())["steps"] == 40


def test_training_twice_with_one_seed_gives_identical_weights_on_cpu(
    micro_run: TrainArgs,
) -> None:
    runs = [replace(micro_run, max_steps=10, eval_every=10, out=micro_run.out / s) for s in "ab"]
    facts = [train(args, say=quiet) for args in runs]
    assert facts[0]["val_loss"] == facts[1]["val_loss"]
    a, b = (load_file(args.out / "model.safetensors") for args in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = train(replace(runs[0], seed=1, out=micro_run.out / "c"), say=quiet)
    assert other["val_loss"] != facts[0]["val_loss"]  # the seed does matter


@pytest.mark.slow
def test_gpu_training_script_runs_end_to_end_on_the_cpu(tmp_path: Path, packed: Path) -> None:
    """scripts/train_default_model.sh with DEVICE=cpu: toyllm imported from the checkout, not
    installed (PYTHONPATH cleared), a 20 s budget, every file the lead copies is written."""
    config = tmp_path / "micro.toml"
    config.write_text(MICRO_CONFIG)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OUT=str(tmp_path / "out"), DEVICE="cpu", DATA=str(packed), CONFIG=str(config),
               PYTHON=sys.executable, OMP_NUM_THREADS="1")
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "train_default_model.sh"), "20", "--seq-len", "32",
         "--batch-size", "8", "--eval-every", "20", "--warmup", "5", "--log-every", "5",
         "--val-windows", "16"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = tmp_path / "out" / "default"
    names = {f.name for f in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer-training.json",
            "training.json", "train-log.jsonl"} <= names
    facts = json.loads((out / "training.json").read_text())
    assert facts["stop_reason"] in ("time_budget", "max_steps") and facts["steps"] >= 1
    assert facts["seconds_in_all"] < 20 + 10
    model, _ = load_checkpoint(out)
    assert model.dtype == torch.bfloat16
    assert "saved" in (tmp_path / "out" / "train-stdout.txt").read_text()
