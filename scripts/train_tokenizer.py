"""Trains the default model's sentencepiece tokenizer on a corpus of Python (no downloads).

BPE, 4096 pieces, byte fallback (any text encodes; no <unk> in practice), Llama-style special
ids (unk 0, bos 1, eos 2, no pad), identity normalisation with no dummy prefix and no
whitespace folding, so that ``decode(encode(text)) == text`` for source code: tabs, trailing
spaces, blank lines and non-ASCII text survive. Sentencepiece trains on lines, so a newline
never appears inside a training sentence; user-defined pieces make ``"\\n"`` one token and
``"\\n"`` followed by 4, 8, ... 24 spaces (a line break plus its indentation) one token each,
which shortens Python by ~7% in tokens.

Determinism: the training sentences are the non-blank lines of the train split, in corpus
order; when there are more than ``--max-lines`` of them, every k-th one (k the smallest stride
that fits), never a random sample; the trainer's settings are fixed here, so the same corpus
and sentencepiece version give the same model bytes. A record of what was done (corpus name and
sha256, python and sentencepiece versions, options, lines, time, bytes per token on the
validation split, sha256 of the model) is written beside the model: ``tokenizer.model`` gets
``tokenizer-training.json``.

    python3 scripts/train_tokenizer.py --out .corpus/tokenizer/tokenizer.model  # code corpus
    python3 scripts/train_tokenizer.py --corpus .corpus/corpus-py311.txt.gz --out /tmp/t.model
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time
from pathlib import Path

import sentencepiece as spm
from build_corpus import (  # a sibling: `python scripts/X.py` puts scripts/ first on sys.path
    DEFAULT_OUT_DIR,
    Corpus,
    corpus_stem,
    load_corpus,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER_PATH = REPO_ROOT / "models" / "default" / "tokenizer.model"

# A line break alone, and a line break followed by 1..6 levels of 4-space indentation.
# Sentencepiece writes spaces as U+2581 ("▁") internally; user-defined pieces are matched on
# that escaped text, so the indentation must be spelled with "▁" to ever match.
NEWLINE_PIECES = ["\n"] + ["\n" + "\u2581" * (4 * level) for level in range(1, 7)]


def record_path_for(model_path: Path) -> Path:
    """`models/default/tokenizer.model` -> `models/default/tokenizer-training.json`."""
    return model_path.with_name(model_path.stem + "-training.json")


def trainer_options(vocab_size: int = 4096, num_threads: int = 2) -> dict[str, object]:
    """The sentencepiece trainer settings of the default tokenizer (all fixed: see module doc)."""
    return {
        "vocab_size": vocab_size,
        "model_type": "bpe",
        "byte_fallback": True,
        "unk_id": 0,
        "bos_id": 1,
        "eos_id": 2,
        "pad_id": -1,
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "add_dummy_prefix": False,
        "allow_whitespace_only_pieces": True,
        "split_digits": True,
        "user_defined_symbols": NEWLINE_PIECES,
        "character_coverage": 0.9995,  # rarer characters go to byte-fallback pieces
        "max_sentence_length": 16384,  # bytes; longer lines would be dropped (none are today)
        "input_sentence_size": 0,  # use every sentence given, never sample
        "shuffle_input_sentence": False,
        "num_threads": num_threads,
        "minloglevel": 2,  # warnings and errors only
    }


DEFAULT_MAX_LINES = 3_000_000  # sentencepiece's BPE trainer slows and swells beyond this


def training_lines(corpus: Corpus, max_lines: int = DEFAULT_MAX_LINES) -> list[str]:
    """The non-blank lines of the train split, in corpus order; every k-th one when there
    are more than max_lines (k = ceil(lines / max_lines))."""
    lines = [line for doc in corpus.split("train") for line in doc.text.split("\n")
             if line.strip()]
    stride = -(-len(lines) // max_lines)
    return lines[::stride]


def train_tokenizer(corpus: Corpus, vocab_size: int = 4096, num_threads: int = 2,
                    max_lines: int = DEFAULT_MAX_LINES) -> bytes:
    """Trains on the corpus's train split; returns the serialized sentencepiece model."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_lines(corpus, max_lines)),
        model_writer=model,
        **trainer_options(vocab_size, num_threads),
    )
    return model.getvalue()


def bytes_per_token(model: bytes, texts: list[str]) -> float:
    processor = spm.SentencePieceProcessor(model_proto=model)
    num_tokens = sum(len(ids) for ids in processor.encode(texts, num_threads=2))
    return sum(len(t.encode("utf-8")) for t in texts) / num_tokens


def round_trip_failures(model: bytes, texts: list[str]) -> int:
    """How many texts do not come back unchanged from decode(encode(text))."""
    processor = spm.SentencePieceProcessor(model_proto=model)
    encoded = processor.encode(texts, num_threads=2)
    return sum(processor.decode(ids) != text for ids, text in zip(encoded, texts, strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="corpus .txt.gz from build_corpus.py (default: .corpus/code-py311.txt.gz, the "
        "stdlib + PyPI corpus of this Python version)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_TOKENIZER_PATH)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--max-lines", type=int, default=DEFAULT_MAX_LINES,
                        help="most training lines (every k-th line beyond)")
    args = parser.parse_args(argv)
    if args.max_lines <= 0:
        parser.error(f"--max-lines must be positive, got {args.max_lines}")

    corpus_path = args.corpus or DEFAULT_OUT_DIR / f"{corpus_stem(kind='code')}.txt.gz"
    if not corpus_path.exists():
        parser.error(f"--corpus: {corpus_path} not found (build it: scripts/build_corpus.py)")
    corpus = load_corpus(corpus_path)

    start = time.perf_counter()
    model = train_tokenizer(corpus, args.vocab_size, args.num_threads, args.max_lines)
    seconds = time.perf_counter() - start

    val_texts = [d.text for d in corpus.split("val")]
    all_texts = [d.text for d in corpus.documents]
    failures = round_trip_failures(model, all_texts)
    record = {
        "corpus": corpus_path.name,
        "corpus_text_sha256": corpus.text_sha256,
        "python_version": corpus.python_version,
        "sentencepiece_version": spm.__version__,
        "trainer_options": trainer_options(args.vocab_size, args.num_threads),
        "max_lines": args.max_lines,
        "training_lines": len(training_lines(corpus, args.max_lines)),
        "train_seconds": round(seconds, 2),
        "val_bytes_per_token": round(bytes_per_token(model, val_texts), 4),
        "round_trip_failures": failures,
        "documents": len(all_texts),
        "model_sha256": hashlib.sha256(model).hexdigest(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(model)
    record_path_for(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(
        f"trained {args.vocab_size} pieces on {record['training_lines']} lines in {seconds:.1f} s; "
        f"val {record['val_bytes_per_token']:.3f} bytes/token; "
        f"round trip fails on {failures}/{len(all_texts)} documents"
    )
    print(f"wrote {args.out} (sha256 {record['model_sha256']})")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
