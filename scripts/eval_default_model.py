"""Measures a default-model checkpoint on the CPU against the targets of issue 22.

What it prints (and writes as JSON with --json-out):

- validation loss in nats/token on the held-out standard-library files (the files with
  ``sha1(path) % 20 == 0``, scripts/build_corpus.py), the same windows the training script
  evaluates: each file ``[bos] + ids + [eos]``, the files concatenated in path order, every
  non-overlapping window of ``--seq-len`` + 1 tokens; its perplexity, the tokenizer's bytes per
  token on those files, and nats per byte (loss / bytes per token: comparable across
  tokenizers, which nats/token is not);
- the distinct 4-gram share of sampled text: the completion (prompt excluded) is split into
  word and punctuation tokens (``\\w+`` or one other non-space character), and the share is
  distinct 4-grams / all 4-grams of one sample (a sample with no 4-gram at all: 0 if it ran to
  the token limit, 1 if it ended early). Sampled as the CLI samples this checkpoint (its
  generation_config.json, else the CLI's defaults; stop at eos) for 5 code prompts x 3 seeds x
  128 new tokens: mean and minimum. The same share of 15 windows of real held-out code (128
  tokens each) is printed beside it as the baseline;
- load time (a fresh interpreter: ``load_model`` + tokenizer, ``import torch`` excluded) and
  CPU decode tok/s (batch 1, the engine, summed over the sampled requests).

``--temperature``, ``--top-k``, ``--top-p``, ``--min-p`` and ``--repetition-penalty`` override the
checkpoint's sampling, as the CLI's options do.

    python scripts/eval_default_model.py                       # the shipped model
    python scripts/eval_default_model.py --model out/default --json-out out/eval.json
    python scripts/eval_default_model.py --skip-loss --temperature 0.8 --min-p 0.05
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from build_corpus import collect_stdlib  # a sibling script (scripts/ is first on sys.path)

from toyllm.engine.generate import Engine
from toyllm.engine.sampling import CLI_SAMPLING_DEFAULTS, SamplingParams, sampling_fields
from toyllm.models.generation_config import read_sampling_defaults
from toyllm.models.model_source import DEFAULT_MODEL_DIR, load_model
from toyllm.models.tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]

# Code prompts of the kind a new user types first: a bare keyword, a function to fill in, a
# class header, a loop head, a comment asking for code.
PROMPTS = (
    "def ",
    "import os\n\n\ndef read_config(path):\n",
    "class Stack:\n",
    "for i in range(",
    "# Return the n-th Fibonacci number\ndef fib(n):\n",
)
SEEDS = (0, 1, 2)
NEW_TOKENS = 128
WORD_OR_PUNCT = re.compile(r"\w+|[^\w\s]")


def distinct_4gram_share(text: str, ran_to_the_limit: bool = False) -> float:
    """Distinct word/punctuation 4-grams over all of them. A text with none: 0.0 when it ran
    to the token limit (a hundred tokens without four words is one identifier repeating its
    parts, `JSON_BSON_BSON_...`), 1.0 when it ended early (nothing repeated)."""
    words = WORD_OR_PUNCT.findall(text)
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    if not grams:
        return 0.0 if ran_to_the_limit else 1.0
    return len(set(grams)) / len(grams)


def val_token_stream(tokenizer: Tokenizer) -> tuple[torch.Tensor, int, int]:
    """The held-out files as one stream [N] int64 ([bos] + ids + [eos] per file, path order),
    the number of files and their UTF-8 bytes."""
    corpus, _ = collect_stdlib()
    texts = [d.text for d in corpus.split("val")]
    ids = tokenizer.encode_batch(texts, bos=True, eos=True, num_threads=2)
    flat = [i for row in ids for i in row]
    return torch.tensor(flat, dtype=torch.int64), len(texts), sum(len(t.encode()) for t in texts)


def validation_loss(model: torch.nn.Module, stream: torch.Tensor, seq_len: int,
                    batch_size: int, limit: int) -> tuple[float, int]:
    """Mean next-token loss over the non-overlapping windows [W, seq_len + 1] of stream
    (evenly thinned to `limit` when 0 < limit < W); returns (loss, windows)."""
    count = (stream.numel() - 1) // seq_len
    if count < 1:
        raise ValueError(f"the validation stream has {stream.numel()} tokens, fewer than one "
                         f"window of {seq_len + 1}")
    starts = torch.arange(count) * seq_len
    if 0 < limit < count:
        starts = starts[torch.linspace(0, count - 1, limit).round().long()]
    windows = stream[starts[:, None] + torch.arange(seq_len + 1)]  # [W, T + 1]
    total = 0.0
    with torch.inference_mode():
        for chunk in windows.split(batch_size):
            tokens, targets = chunk[:, :-1], chunk[:, 1:]
            positions = torch.arange(seq_len).expand_as(tokens)
            logits = model(tokens, positions)  # [B, T, vocab]
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            total += loss.item() * chunk.shape[0]
    return total / windows.shape[0], windows.shape[0]


def reference_windows(stream: torch.Tensor, tokenizer: Tokenizer, count: int,
                      length: int) -> list[str]:
    """`count` evenly spaced windows of `length` tokens of real code, decoded (the baseline
    for the 4-gram share). Windows that cross a file boundary are moved past it."""
    bounds = {tokenizer.bos_id, tokenizer.eos_id}
    texts, step = [], max(1, (stream.numel() - length) // count)
    for k in range(count):
        start = k * step
        while start + length < stream.numel() and \
                any(int(t) in bounds for t in stream[start : start + length]):
            start += length // 4
        texts.append(tokenizer.decode(stream[start : start + length].tolist()))
    return texts


def load_seconds(model_dir: Path) -> float:
    """Seconds to load the model and its tokenizer in a fresh interpreter (torch imported
    before the clock starts: its import is not the model's cost)."""
    code = (
        "import time, torch\n"
        "from pathlib import Path\n"
        "from toyllm.models.model_source import load_model\n"
        "t = time.perf_counter()\n"
        f"load_model(Path({str(model_dir)!r}), torch.device('cpu'), torch.float32)\n"
        "print(time.perf_counter() - t)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO_ROOT)
    return float(out.stdout.strip().splitlines()[-1])


def sampling_params(args: argparse.Namespace, seed: int) -> SamplingParams:
    """The CLI's sampling for this checkpoint: the options given here, else the model's
    generation_config.json, else the CLI's defaults (engine/sampling.py's sampling_fields)."""
    given = {name: getattr(args, name) for name in CLI_SAMPLING_DEFAULTS}
    fields = sampling_fields(given, read_sampling_defaults(args.model))
    return SamplingParams(max_new_tokens=args.new_tokens, seed=seed, **fields)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="checkpoint directory")
    p.add_argument("--seq-len", type=int, default=1024, help="validation window length")
    p.add_argument("--batch-size", type=int, default=4, help="validation windows per forward")
    p.add_argument("--val-windows", type=int, default=0,
                   help="cap on validation windows, evenly thinned (0: all, as in training)")
    p.add_argument("--skip-loss", action="store_true", help="only sampling, load and decode")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    # sampling: default as the CLI's (the model's generation_config.json, else the CLI's own)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); 1 is steadier on a busy machine")
    p.add_argument("--show", action="store_true", help="print every sample")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    for name in ("seq_len", "batch_size", "new_tokens"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not (args.model / "config.json").is_file():
        p.error(f"--model: expected a checkpoint directory with config.json, got {args.model}")
    try:
        sampling_params(args, 0)
    except ValueError as exc:
        p.error(str(exc))

    if args.threads < 0:
        p.error(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict[str, object] = {"model": str(args.model), "threads": torch.get_num_threads()}
    report["load_s"] = round(load_seconds(args.model), 3)
    loaded = load_model(args.model, torch.device("cpu"), torch.float32)
    tokenizer = loaded.tokenizer
    if not isinstance(tokenizer, Tokenizer):
        p.error(f"--model: expected a sentencepiece tokenizer.model in {args.model}")
    report["num_params"] = loaded.config.num_params()
    print(f"{args.model}: {loaded.config.num_params():,} parameters; loads in "
          f"{report['load_s']:.2f} s; {torch.get_num_threads()} CPU threads")

    stream, files, text_bytes = val_token_stream(tokenizer)
    bytes_per_token = text_bytes / (stream.numel() - 2 * files)  # bos/eos carry no text
    report.update(val_files=files, val_bytes=text_bytes, val_tokens=stream.numel(),
                  bytes_per_token=round(bytes_per_token, 4))
    if not args.skip_loss:
        t0 = time.perf_counter()
        loss, windows = validation_loss(loaded.model, stream, args.seq_len, args.batch_size,
                                        args.val_windows)
        report.update(val_loss=round(loss, 5), perplexity=round(math.exp(loss), 4),
                      nats_per_byte=round(loss / bytes_per_token, 5), val_windows=windows)
        print(f"validation: {files} files, {text_bytes:,} bytes, {stream.numel():,} tokens "
              f"({bytes_per_token:.3f} bytes/token); loss {loss:.4f} nats/token over {windows} "
              f"windows of {args.seq_len} (perplexity {math.exp(loss):.3f}, "
              f"{loss / bytes_per_token:.4f} nats/byte) in {time.perf_counter() - t0:.0f} s")

    engine = Engine(loaded.model, tokenizer)  # rearranges CPU weights: after the loss
    shares, decode_tokens, decode_s = [], 0, 0.0
    samples = []
    for prompt in PROMPTS:
        for seed in SEEDS:
            result = engine.generate([prompt], sampling_params(args, seed))
            done = result.completions[0]
            shares.append(distinct_4gram_share(done.text,
                                               done.finish_reason == "max_new_tokens"))
            decode_tokens += result.stats.decode_tokens
            decode_s += result.stats.decode_s
            samples.append({"prompt": prompt, "seed": seed, "text": done.text,
                            "finish_reason": done.finish_reason, "share": shares[-1]})
            if args.show:
                print(f"--- {prompt!r} seed {seed}: share {shares[-1]:.2f}\n{prompt}{done.text}")
    baseline = [distinct_4gram_share(t) for t in
                reference_windows(stream, tokenizer, len(shares), args.new_tokens)]
    params = sampling_params(args, 0)
    shown = {k: v for k, v in dataclasses.asdict(params).items()
             if k not in ("seed", "stop", "max_new_tokens")}
    report.update(
        sampling=shown,
        distinct_4gram_mean=round(statistics.mean(shares), 4),
        distinct_4gram_min=round(min(shares), 4),
        reference_4gram_mean=round(statistics.mean(baseline), 4),
        reference_4gram_min=round(min(baseline), 4),
        decode_tok_per_s=round(decode_tokens / decode_s, 1) if decode_s else 0.0,
        samples=samples,
    )
    print(f"distinct 4-gram share at {shown}, {len(PROMPTS)} prompts x {len(SEEDS)} seeds x "
          f"{args.new_tokens} tokens: mean {report['distinct_4gram_mean']:.2f}, min "
          f"{report['distinct_4gram_min']:.2f} (real held-out code: mean "
          f"{report['reference_4gram_mean']:.2f}, min {report['reference_4gram_min']:.2f})")
    print(f"CPU decode, batch 1: {report['decode_tok_per_s']:.0f} tok/s "
          f"({decode_tokens} tokens)")
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
