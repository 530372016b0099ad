"""Trains the shipped default model: a small Llama (configs/default.toml) on the packed corpus.

The corpus arrives tokenised (scripts/pack_corpus.py): ``train.u16.xz`` and ``val.u16.xz`` hold
each file as ``[bos] + ids + [eos]``, files concatenated per split (train / val, split by file),
and ``meta.json`` says which corpus and tokenizer made them. So this script needs only torch,
safetensors and the standard library: no sentencepiece, no corpus text.

Training draws random windows of ``seq_len + 1`` tokens from the train split (a seeded
generator on the device) and runs AdamW (betas 0.9/0.95, weight decay on matrices only, fused
on CUDA) with linear warmup and cosine decay to ``--min-lr-ratio`` of the peak, gradient
clipping at 1.0, bf16 autocast on CUDA and, optionally, torch.compile. Weights start as
Hugging Face initialises Llama (N(0, 0.02)), except the projections that write into the
residual stream (o_proj, down_proj), drawn with std 0.02 / sqrt(2 * layers) as GPT-2 does, so
the stream's variance does not grow with depth. The validation loss is measured on every
non-overlapping window of the val split (or an evenly thinned ``--val-windows`` of them); the
weights with the best one are kept and saved at the end with ``save_checkpoint`` (config.json +
bf16 model.safetensors + tokenizer.model). The saved ``val_loss`` is measured on the
bf16-rounded weights, i.e. on exactly what was saved.

Length of a run: ``--max-steps``, or ``--time-budget-s`` (the whole script, loading and
compiling included): after a few timed steps (past compilation) the schedule is fitted to the
steps that fit in the budget (and stays fixed from then on); if the budget runs out anyway the
run stops early, then still evaluates and saves. For a step-exact rerun pass ``--max-steps``
with the ``planned_steps`` that training.json records, and no budget.

Written to --out: the checkpoint, ``training.json`` (the facts of the run) and, with --log,
one JSON line per logged step: step, train_loss, val_loss (null between evaluations), lr,
tokens_seen, elapsed_s.

    python3 scripts/train_default_model.py --data .corpus/packed --out /tmp/smoke \\
        --config configs/tiny.toml --max-steps 30 --batch-size 4 --seq-len 128 \\
        --eval-every 10 --val-windows 16                       # CPU smoke run
    bash scripts/train_default_model.sh 540                    # the real run, on a GPU
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import torch
import torch.nn.functional as F

from toyllm.models.checkpoint import save_checkpoint
from toyllm.models.config import ModelConfig, load_config
from toyllm.models.llama import Transformer, build_model

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKED_FORMAT = "toyllm-packed-1"

CALIBRATION_START = 5  # steps run before timing starts (compilation, allocator warm-up)
CALIBRATION_STEPS = 20  # steps timed to fit the schedule to a time budget
SAVE_RESERVE_S = 5.0  # budget kept back for saving the checkpoint


@dataclass(frozen=True)
class TrainArgs:
    data: Path
    config: Path
    out: Path
    seed: int = 1234
    max_steps: int = 2000
    batch_size: int = 64
    seq_len: int = 1024
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.1
    eval_every: int = 200
    val_windows: int = 0  # 0: every non-overlapping window of the val split
    log_every: int = 10
    time_budget_s: float = 0.0  # 0: no budget, run max_steps
    device: str = "auto"
    compile: bool = False
    log: Path | None = None


@dataclass
class PackedCorpus:
    train: torch.Tensor  # [N_train] int32, files as [bos] + ids + [eos], concatenated
    val: torch.Tensor  # [N_val] int32
    meta: dict


def read_ids(path: Path, expected_sha256: str, expected_tokens: int) -> torch.Tensor:
    """One split's token ids [N] int32 from its .u16.xz file, checked against meta.json."""
    raw = lzma.decompress(path.read_bytes())
    sha = hashlib.sha256(raw).hexdigest()
    if sha != expected_sha256 or len(raw) != 2 * expected_tokens:
        raise ValueError(f"{path}: {len(raw) // 2} ids with sha256 {sha}; meta.json expects "
                         f"{expected_tokens} with sha256 {expected_sha256}")
    ids = torch.frombuffer(bytearray(raw), dtype=torch.uint16)  # little-endian, as packed
    if sys.byteorder != "little":
        ids = ids.view(torch.uint8).view(-1, 2).flip(-1).reshape(-1).view(torch.uint16)
    return ids.to(torch.int32)


def load_packed(directory: Path) -> PackedCorpus:
    """The packed corpus of scripts/pack_corpus.py, every file checked."""
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"--data: expected {meta_path} (scripts/pack_corpus.py writes "
                                "it on the dev machine)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != PACKED_FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {PACKED_FORMAT!r}")
    splits = {}
    for split in ("train", "val"):
        path = directory / f"{split}.u16.xz"
        if not path.is_file():
            raise FileNotFoundError(f"--data: {path} is missing")
        splits[split] = read_ids(path, meta[split]["ids_sha256"], meta[split]["tokens"])
    if not (directory / "tokenizer.model").is_file():
        raise FileNotFoundError(f"--data: {directory / 'tokenizer.model'} is missing")
    return PackedCorpus(splits["train"], splits["val"], meta)


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


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from `peak` to min_ratio * peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def scale_residual_projections(model: Transformer, seed: int, std: float = 0.02) -> None:
    """Redraw o_proj and down_proj with std / sqrt(2 * layers) (GPT-2's residual scaling)."""
    scaled = std / math.sqrt(2 * model.config.num_layers)
    gen = torch.Generator(device=model.device).manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, scaled, generator=gen)


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
    windows = windows.long()
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


def check_fits(config: ModelConfig, meta: dict, args: TrainArgs) -> None:
    """The config must match the packed corpus's tokenizer and hold a window."""
    if meta["vocab_size"] != config.vocab_size:
        raise ValueError(f"the packed corpus's tokenizer has {meta['vocab_size']} pieces, config "
                         f"{args.config} has vocab_size {config.vocab_size}: they must match")
    if (meta["bos_id"], meta["eos_id"]) != (config.bos_id, config.eos_id):
        raise ValueError(f"tokenizer bos/eos ids {(meta['bos_id'], meta['eos_id'])} differ from "
                         f"the config's {(config.bos_id, config.eos_id)}")
    if args.seq_len > config.max_seq_len:
        raise ValueError(f"--seq-len {args.seq_len} exceeds max_seq_len {config.max_seq_len}")


def train(args: TrainArgs, say: Callable[[str], None] = print) -> dict[str, object]:
    """Runs one training; writes the checkpoint and training.json to args.out; returns the
    facts written to training.json. `say` receives the progress lines."""
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    config: ModelConfig = load_config(args.config)
    data = load_packed(args.data)
    meta = data.meta
    check_fits(config, meta, args)
    if data.train.numel() <= args.seq_len + 1:
        raise ValueError(f"the train split has only {data.train.numel()} tokens")
    train_tokens = data.train.to(device)
    val = val_windows(data.val, args.seq_len, args.val_windows).to(device)
    say(
        f"corpus {meta['corpus']} (python {meta['corpus_python_version']}): "
        f"{data.train.numel():,} train tokens in {meta['train']['documents']:,} files, "
        f"{data.val.numel():,} val tokens in {meta['val']['documents']} files; "
        f"{val.shape[0]} val windows of {args.seq_len}; loaded in "
        f"{time.perf_counter() - started:.1f} s"
    )

    model = build_model(config, device=device, dtype=torch.float32, seed=args.seed).train()
    scale_residual_projections(model, args.seed)
    say(f"model {args.config.name}: {config.num_params():,} parameters on {device_name(device)}")
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
        spent = time.perf_counter() - started
        return args.time_budget_s - spent - 2 * eval_seconds - SAVE_RESERVE_S

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
            if val_loss < best_val:
                best_val, best_step = val_loss, step
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            eval_seconds = time.perf_counter() - t0
            eval_seconds_total += eval_seconds
            last_eval_step = step
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
        if with_eval and step == 0:
            say(f"step 0: val {val_loss:.4f} (a uniform guess: {math.log(config.vocab_size):.4f})")
        elif with_eval:
            say(f"step {step}/{planned_steps}: train {train_loss:.4f} val {val_loss:.4f} "
                f"lr {lr:.2e} {step * tokens_per_step / elapsed:,.0f} tok/s, {elapsed:.0f} s")

    log_step(with_eval=True)
    try:
        while step < planned_steps:
            lr = lr_at(step, args.lr, args.warmup, planned_steps, args.min_lr_ratio)
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
                    say(f"{step_s * 1e3:.1f} ms/step, {eval_seconds:.1f} s/eval: "
                        f"{planned_steps} steps fit the {args.time_budget_s:.0f} s budget")
                if seconds_left() < 0:
                    stop_reason = "time_budget"
                    break
            if step % args.eval_every == 0 or step == planned_steps:
                log_step(with_eval=True)
            elif step % args.log_every == 0:
                log_step(with_eval=False)
    except KeyboardInterrupt:
        stop_reason = "interrupted"
        say(f"interrupted at step {step}: evaluating and saving")
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
    val_text_tokens = meta["val"]["tokens"] - 2 * meta["val"]["documents"]
    bytes_per_token = meta["val"]["bytes"] / val_text_tokens
    facts: dict[str, object] = {
        "val_loss": round(saved_val_loss, 5),
        "val_loss_fp32": round(best_val, 5),
        "val_perplexity": round(math.exp(saved_val_loss), 4),
        "val_bytes_per_token": round(bytes_per_token, 4),
        "val_nats_per_byte": round(saved_val_loss / bytes_per_token, 5),
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
        "seconds_in_all": round(time.perf_counter() - started, 1),
        "device": device_name(device),
        "corpus": meta["corpus"],
        "corpus_sha256": meta["corpus_sha256"],
        "corpus_python_version": meta["corpus_python_version"],
        "tokenizer_sha256": meta["tokenizer_sha256"],
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "seed": args.seed,
        "config": args.config.name,
        "num_params": config.num_params(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(args).items()},
    }
    metadata = {k: json.dumps(v) if isinstance(v, dict) else str(v) for k, v in facts.items()}
    save_checkpoint(model, args.out, tokenizer_path=args.data / "tokenizer.model",
                    dtype=torch.bfloat16, metadata=metadata)
    (args.out / "training.json").write_text(json.dumps(facts, indent=1) + "\n")
    if log_file is not None:
        log_file.close()
    say(
        f"saved {args.out}: val loss {saved_val_loss:.4f} nats/token (bf16 weights; best step "
        f"{best_step}; perplexity {math.exp(saved_val_loss):.3f}; "
        f"{saved_val_loss / bytes_per_token:.4f} nats/byte), train loss {train_loss:.4f}, "
        f"{step} steps, {facts['tokens_seen']:,} tokens ({facts['epochs']} epochs) in "
        f"{train_seconds:.0f} s; stop: {stop_reason}"
    )
    return facts


def parse_args(argv: list[str] | None = None) -> TrainArgs:
    defaults = TrainArgs(data=Path(), config=Path(), out=Path())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO_ROOT / ".corpus" / "packed",
                   help="packed corpus directory (scripts/pack_corpus.py)")
    p.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "default.toml")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--max-steps", type=int, default=defaults.max_steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--seq-len", type=int, default=defaults.seq_len)
    p.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=defaults.min_lr_ratio,
                   help="the cosine ends at this fraction of the peak")
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
        help="fit the schedule so the whole script takes this many seconds; stop if exceeded",
    )
    p.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA only)")
    p.add_argument("--log", type=Path, default=None, help="JSON-lines log of the losses")
    ns = p.parse_args(argv)
    for name in ("max_steps", "batch_size", "seq_len", "warmup", "eval_every", "log_every"):
        if getattr(ns, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(ns, name)}")
    for name in ("lr", "weight_decay", "time_budget_s", "val_windows"):
        if not getattr(ns, name) >= 0 or not math.isfinite(getattr(ns, name)):
            p.error(f"--{name.replace('_', '-')} must be a finite number >= 0, got "
                    f"{getattr(ns, name)}")
    if not 0 <= ns.min_lr_ratio <= 1:
        p.error(f"--min-lr-ratio must be in [0, 1], got {ns.min_lr_ratio}")
    return TrainArgs(**vars(ns))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train(args, say=lambda line: print(line, flush=True))
    except (ValueError, OSError, lzma.LZMAError) as exc:  # bad inputs: a message, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
