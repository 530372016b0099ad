"""Trains the shipped default model: a small Llama (configs/default.toml) on the stdlib corpus.

The corpus (scripts/build_corpus.py) is tokenised once: each file becomes
``[bos] + ids + [eos]``, files are concatenated per split (train / val, split by file). Training
draws random windows of ``seq_len + 1`` tokens from the train split (a seeded generator), and
runs AdamW (betas 0.9/0.95, weight decay 0.1 on matrices, fused on CUDA) with linear warmup
and cosine decay to 10% of the peak rate, gradient clipping at 1.0, bf16 autocast on CUDA and,
optionally, torch.compile. The validation loss is measured on a fixed set of windows of the val
split; the weights with the best one are kept and saved at the end with ``save_checkpoint``
(config.json + bf16 model.safetensors + tokenizer.model). The saved ``val_loss`` is measured
on the bf16-rounded weights, i.e. on exactly what was saved.

Length of a run: ``--max-steps``, or ``--time-budget-s``: after a few timed steps (past
compilation) the schedule is fitted to the steps that fit in the budget (and stays fixed from
then on); if the budget runs out anyway the run stops early, then still evaluates and saves.
For a step-exact rerun pass ``--max-steps`` with the ``planned_steps`` that training.json
records, and no budget.

Written to --out: the checkpoint, ``training.json`` (the facts of the run) and, with --log,
one JSON line per logged step: step, train_loss, val_loss (null between evaluations), lr,
tokens_seen, elapsed_s.

    python3 scripts/train_default_model.py --out /tmp/smoke --max-steps 30 --batch-size 4 \\
        --seq-len 128 --eval-every 10 --val-windows 16        # CPU smoke run
    scripts/train_default.sh                                   # the real run, on a GPU
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import platform
import sys
import time
from array import array
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import torch
import torch.nn.functional as F
from build_corpus import Corpus, load_corpus  # a sibling script (scripts/ is first on sys.path)
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from toyllm.models.checkpoint import save_checkpoint
from toyllm.models.config import ModelConfig, load_config
from toyllm.models.llama import Transformer, build_model
from toyllm.models.tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]

CALIBRATION_START = 5  # steps run before timing starts (compilation, allocator warm-up)
CALIBRATION_STEPS = 20  # steps timed to fit the schedule to a time budget
MIN_LR_RATIO = 0.1  # the cosine ends at this fraction of the peak learning rate


@dataclass(frozen=True)
class TrainArgs:
    corpus: Path
    tokenizer: Path
    config: Path
    out: Path
    seed: int = 1234
    max_steps: int = 2000
    batch_size: int = 64
    seq_len: int = 512
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.1
    eval_every: int = 200
    val_windows: int = 0  # 0: every non-overlapping window of the val split
    log_every: int = 10
    time_budget_s: float = 0.0  # 0: no budget, run max_steps
    device: str = "auto"
    compile: bool = False
    log: Path | None = None


@dataclass
class TokenizedCorpus:
    train: torch.Tensor  # [N_train] int64, documents as [bos] + ids + [eos], concatenated
    val: torch.Tensor  # [N_val] int64
    train_documents: int
    val_documents: int


def tokenize_corpus(corpus: Corpus, tokenizer: Tokenizer) -> TokenizedCorpus:
    threads = os.cpu_count() or 1

    def flat(split: str) -> tuple[torch.Tensor, int]:
        texts = [d.text for d in corpus.split(split)]
        ids = tokenizer.encode_batch(texts, bos=True, eos=True, num_threads=threads)
        packed = array("i", itertools.chain.from_iterable(ids))
        return torch.frombuffer(packed, dtype=torch.int32).to(torch.int64), len(texts)

    train, n_train = flat("train")
    val, n_val = flat("val")
    return TokenizedCorpus(train, val, n_train, n_val)


def val_windows(val: torch.Tensor, seq_len: int, limit: int) -> torch.Tensor:
    """Fixed validation windows [W, seq_len + 1]: non-overlapping, evenly thinned to `limit`."""
    count = (val.numel() - 1) // seq_len
    if count < 1:
        raise ValueError(
            f"the val split has {val.numel()} tokens, fewer than one window of {seq_len + 1}"
        )
    starts = torch.arange(count) * seq_len
    if 0 < limit < count:
        starts = starts[torch.linspace(0, count - 1, limit).round().long()]
    return val[starts[:, None] + torch.arange(seq_len + 1)]


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warmup over `warmup` steps, then cosine from `peak` to MIN_LR_RATIO * peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: Transformer, args: TrainArgs, device: torch.device) -> torch.optim.AdamW:
    """Weight decay on matrices (the tied embedding included), none on norm scales."""
    params = list(model.parameters())  # a tied head appears once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def batch_loss(model: torch.nn.Module, windows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Mean next-token cross-entropy over windows [B, T + 1] (a 0-dim fp32 tensor)."""
    tokens, targets = windows[:, :-1], windows[:, 1:]
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(tokens, positions)  # [B, T, vocab]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate(model: Transformer, windows: torch.Tensor, batch_size: int) -> float:
    """Mean loss over all fixed val windows [W, T + 1] (every window weighs the same)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=windows.device)
    for chunk in windows.split(batch_size):
        total += batch_loss(model, chunk, windows.device) * chunk.shape[0]
    model.train(was_training)
    return total.item() / windows.shape[0]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train(args: TrainArgs, console: Console | None = None) -> dict[str, object]:
    """Runs one training; writes the checkpoint and training.json to args.out; returns the
    facts written to training.json."""
    console = console or Console()
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.deterministic = True

    config: ModelConfig = load_config(args.config)
    tokenizer = Tokenizer.from_file(args.tokenizer)
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(
            f"tokenizer {args.tokenizer} has {tokenizer.vocab_size} pieces, config "
            f"{args.config} has vocab_size {config.vocab_size}: they must match"
        )
    if (tokenizer.bos_id, tokenizer.eos_id) != (config.bos_id, config.eos_id):
        raise ValueError(
            f"tokenizer bos/eos ids {(tokenizer.bos_id, tokenizer.eos_id)} differ from the "
            f"config's {(config.bos_id, config.eos_id)}"
        )
    if args.seq_len > config.max_seq_len:
        raise ValueError(f"--seq-len {args.seq_len} exceeds max_seq_len {config.max_seq_len}")

    corpus = load_corpus(args.corpus)
    data = tokenize_corpus(corpus, tokenizer)
    if data.train.numel() <= args.seq_len + 1:
        raise ValueError(f"the train split has only {data.train.numel()} tokens")
    train_tokens = data.train.to(device)
    val = val_windows(data.val, args.seq_len, args.val_windows).to(device)
    console.print(
        f"corpus {args.corpus.name} (python {corpus.python_version}): "
        f"{data.train.numel():,} train tokens in {data.train_documents} files, "
        f"{data.val.numel():,} val tokens in {data.val_documents} files; "
        f"{val.shape[0]} val windows of {args.seq_len}; "
        f"tokenised in {time.perf_counter() - started:.1f} s"
    )

    model = build_model(config, device=device, dtype=torch.float32, seed=args.seed).train()
    console.print(
        f"model {args.config.name}: {config.num_params():,} parameters on {device_name(device)}"
    )
    optimizer = make_optimizer(model, args, device)
    step_fn = torch.compile(model) if args.compile and device.type == "cuda" else model
    # Windows are drawn on the device: a host-to-device copy of the starts every step would
    # make the host wait for the GPU each step.
    sampler = torch.Generator(device=device).manual_seed(args.seed)
    tokens_per_step = args.batch_size * args.seq_len
    offsets = torch.arange(args.seq_len + 1, device=device)

    log_file: TextIO | None = None
    if args.log is not None:
        args.log.parent.mkdir(parents=True, exist_ok=True)
        log_file = args.log.open("w")

    planned_steps = args.max_steps
    step = 0
    lr = 0.0
    best_val, best_step = math.inf, 0
    best_state: dict[str, torch.Tensor] = {}
    train_loss = math.nan
    last_eval_step = -1
    eval_seconds = 0.0  # the last evaluation's duration
    eval_seconds_total = 0.0
    stop_reason = "max_steps"
    calibration_t0 = calibration_eval_s = 0.0
    loss_sum = torch.zeros((), device=device)  # summed on the device: no sync every step
    loss_count = 0
    train_t0 = time.perf_counter()

    def seconds_left() -> float:
        """Budget left for training steps, keeping back two evaluations and the save."""
        return args.time_budget_s - (time.perf_counter() - started) - 2 * eval_seconds - 5.0

    def log_step(with_eval: bool) -> None:
        """Log the mean train loss since the last log line, evaluating first if asked."""
        nonlocal train_loss, loss_count, best_val, best_step, best_state, last_eval_step
        nonlocal eval_seconds, eval_seconds_total
        if loss_count:
            train_loss = loss_sum.item() / loss_count
            loss_sum.zero_()
            loss_count = 0
        val_loss = None
        if with_eval:
            t0 = time.perf_counter()
            val_loss = evaluate(model, val, args.batch_size)
            eval_seconds = time.perf_counter() - t0
            eval_seconds_total += eval_seconds
            last_eval_step = step
            if val_loss < best_val:
                best_val, best_step = val_loss, step
                best_state = {
                    k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
                }
        elapsed = time.perf_counter() - train_t0
        record = dict(
            step=step,
            train_loss=None if math.isnan(train_loss) else train_loss,
            val_loss=val_loss,
            lr=lr,
            tokens_seen=step * tokens_per_step,
            elapsed_s=round(elapsed, 3),
        )
        if log_file is not None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        if with_eval:
            if step == 0:
                console.print(
                    f"step 0: val {val_loss:.4f} (a uniform guess: "
                    f"{math.log(config.vocab_size):.4f})"
                )
            else:
                console.print(
                    f"step {step}: train {train_loss:.4f} val {val_loss:.4f} lr {lr:.2e} "
                    f"{step * tokens_per_step / elapsed:,.0f} tok/s"
                )

    log_step(with_eval=True)
    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}"),
        TimeElapsedColumn(),
        console=console,
    )
    try:
        with progress:
            task = progress.add_task("train", total=planned_steps, loss="-", lr="-")
            while step < planned_steps:
                lr = lr_at(step, args.lr, args.warmup, planned_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                starts = torch.randint(
                    0,
                    train_tokens.numel() - args.seq_len - 1,
                    (args.batch_size,),
                    generator=sampler,
                    device=device,
                )
                windows = train_tokens[starts[:, None] + offsets]  # [B, T + 1]
                loss = batch_loss(step_fn, windows, device)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                step += 1
                loss_sum += loss.detach()
                loss_count += 1

                if args.time_budget_s > 0:
                    if step == CALIBRATION_START:
                        synchronize(device)
                        calibration_t0 = time.perf_counter()
                        calibration_eval_s = eval_seconds_total
                    elif step == CALIBRATION_START + CALIBRATION_STEPS:
                        synchronize(device)
                        timed = time.perf_counter() - calibration_t0
                        timed -= eval_seconds_total - calibration_eval_s  # evals in between
                        step_s = timed / CALIBRATION_STEPS
                        per_step = step_s + eval_seconds / args.eval_every
                        fitted = step + max(0, int(seconds_left() / per_step))
                        planned_steps = max(step, min(args.max_steps, fitted))
                        progress.update(task, total=planned_steps)
                        console.print(
                            f"{step_s * 1e3:.1f} ms/step, {eval_seconds:.1f} s/eval: "
                            f"{planned_steps} steps fit the {args.time_budget_s:.0f} s budget"
                        )
                    if seconds_left() < 0:
                        stop_reason = "time_budget"
                        break
                if step % args.eval_every == 0 or step == planned_steps:
                    log_step(with_eval=True)
                elif step % args.log_every == 0:
                    log_step(with_eval=False)
                progress.update(task, completed=step, loss=f"{train_loss:.3f}", lr=f"{lr:.1e}")
    except KeyboardInterrupt:
        stop_reason = "interrupted"
        console.print(f"interrupted at step {step}: evaluating and saving")
    if last_eval_step != step:
        log_step(with_eval=True)
    train_seconds = time.perf_counter() - train_t0

    # Save the best weights, rounded to bf16 first, and report their val loss as saved.
    model.load_state_dict(
        {
            k: v.to(torch.bfloat16).to(v.dtype) if v.is_floating_point() else v
            for k, v in best_state.items()
        }
    )
    saved_val_loss = evaluate(model, val, args.batch_size)
    facts: dict[str, object] = {
        "val_loss": round(saved_val_loss, 5),
        "val_loss_fp32": round(best_val, 5),
        "train_loss": round(train_loss, 5),
        "uniform_loss": round(math.log(config.vocab_size), 5),
        "best_step": best_step,
        "steps": step,
        "planned_steps": planned_steps,
        "stop_reason": stop_reason,
        "tokens_seen": step * tokens_per_step,
        "train_tokens": data.train.numel(),
        "val_tokens": data.val.numel(),
        "val_windows": val.shape[0],
        "epochs": round(step * tokens_per_step / data.train.numel(), 3),
        "seconds": round(train_seconds, 1),
        "device": device_name(device),
        "corpus": args.corpus.name,
        "corpus_sha256": corpus.text_sha256,
        "corpus_python_version": corpus.python_version,
        "tokenizer_sha256": sha256_of(args.tokenizer),
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "seed": args.seed,
        "config": args.config.name,
        "num_params": config.num_params(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(args).items()},
    }
    metadata = {k: json.dumps(v) if isinstance(v, dict) else str(v) for k, v in facts.items()}
    save_checkpoint(
        model, args.out, tokenizer_path=args.tokenizer, dtype=torch.bfloat16, metadata=metadata
    )
    (args.out / "training.json").write_text(json.dumps(facts, indent=1) + "\n")
    if log_file is not None:
        log_file.close()
    console.print(
        f"saved {args.out}: val loss {saved_val_loss:.4f} (bf16 weights; best step {best_step}), "
        f"train loss {train_loss:.4f}, {step} steps, {facts['tokens_seen']:,} tokens "
        f"({facts['epochs']} epochs) in {train_seconds:.0f} s; stop: {stop_reason}"
    )
    return facts


def parse_args(argv: list[str] | None = None) -> TrainArgs:
    defaults = TrainArgs(corpus=Path(), tokenizer=Path(), config=Path(), out=Path())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--corpus",
        type=Path,
        default=REPO_ROOT / ".corpus" / "corpus-py311.txt.gz",
        help="corpus .txt.gz with its .json manifest beside it (build_corpus.py)",
    )
    p.add_argument(
        "--tokenizer", type=Path, default=REPO_ROOT / "models" / "default" / "tokenizer.model"
    )
    p.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "default.toml")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--max-steps", type=int, default=defaults.max_steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--seq-len", type=int, default=defaults.seq_len)
    p.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=defaults.warmup, help="warmup steps")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--eval-every", type=int, default=defaults.eval_every)
    p.add_argument(
        "--val-windows",
        type=int,
        default=defaults.val_windows,
        help="cap on the fixed val windows (0: the whole val split)",
    )
    p.add_argument("--log-every", type=int, default=defaults.log_every)
    p.add_argument(
        "--time-budget-s",
        type=float,
        default=defaults.time_budget_s,
        help="fit the schedule to this many seconds in all, stop if exceeded",
    )
    p.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA only)")
    p.add_argument("--log", type=Path, default=None, help="JSON-lines log of the losses")
    ns = p.parse_args(argv)
    for name in ("max_steps", "batch_size", "seq_len", "warmup", "eval_every", "log_every"):
        if getattr(ns, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(ns, name)}")
    return TrainArgs(**vars(ns))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except (ValueError, OSError) as exc:  # bad inputs: a message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
