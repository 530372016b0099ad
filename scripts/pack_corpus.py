"""Tokenises a corpus once, on the dev machine, into the compact files the training run reads.

Each document becomes ``[bos] + ids + [eos]``; the documents of a split are concatenated in
corpus order and stored as little-endian uint16 token ids, xz-compressed (the ids of a 4,096-
piece vocabulary take about half a byte per token that way). The training machine then needs
neither the corpus nor sentencepiece, only ``lzma`` from the standard library:

    <out>/train.u16.xz           the train split's ids
    <out>/val.u16.xz             the validation split's ids (the held-out stdlib files)
    <out>/tokenizer.model        the tokenizer that made them (copied into the checkpoint)
    <out>/tokenizer-training.json  its training record, when there is one beside it
    <out>/meta.json              corpus name and sha256, tokenizer sha256, vocab size, bos/eos
                                 ids, per split: documents, tokens, sha256 of the raw ids

    python3 scripts/pack_corpus.py --corpus .corpus/code-py311.txt.gz \\
        --tokenizer .corpus/tokenizer/tokenizer.model --out .corpus/packed
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import shutil
import sys
import time
from array import array
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import sentencepiece as spm
from build_corpus import Corpus, load_corpus  # a sibling script (scripts/ is first on sys.path)

REPO_ROOT = Path(__file__).resolve().parents[1]
FORMAT = "toyllm-packed-1"
XZ_PRESET = 6  # -9 gains under 0.1% on token ids and needs 8x the memory
XZ_CHUNK_BYTES = 32 << 20  # compressed as separate xz streams, in parallel; lzma.decompress
# reads the concatenation back as one (each stream's 8 MiB dictionary restarts: ~1% larger)


def compress_chunk(chunk: bytes) -> bytes:
    return lzma.compress(chunk, preset=XZ_PRESET)


def xz_in_parallel(raw: bytes, workers: int) -> bytes:
    """raw compressed as concatenated xz streams of XZ_CHUNK_BYTES, `workers` at a time."""
    chunks = [raw[i : i + XZ_CHUNK_BYTES] for i in range(0, len(raw), XZ_CHUNK_BYTES)] or [b""]
    if workers <= 1 or len(chunks) == 1:
        return b"".join(map(compress_chunk, chunks))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return b"".join(pool.map(compress_chunk, chunks))


def pack_split(corpus: Corpus, split: str, processor: spm.SentencePieceProcessor,
               num_threads: int) -> tuple[bytes, int]:
    """The split's documents as [bos] + ids + [eos], concatenated: uint16 little-endian bytes
    and the number of documents."""
    texts = [d.text for d in corpus.split(split)]
    ids = array("H")
    bos, eos = processor.bos_id(), processor.eos_id()
    for start in range(0, len(texts), 2048):  # bounded memory for the Python id lists
        for row in processor.encode(texts[start : start + 2048], num_threads=num_threads):
            ids.append(bos)
            ids.extend(row)
            ids.append(eos)
    if sys.byteorder != "little":
        ids.byteswap()
    return ids.tobytes(), len(texts)


def pack(corpus_path: Path, tokenizer: Path, out: Path, num_threads: int = 2) -> dict[str, object]:
    """Writes the packed files into `out`; returns the meta written to meta.json."""
    started = time.perf_counter()
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer))
    if processor.get_piece_size() > 65536:
        raise ValueError(f"{tokenizer}: {processor.get_piece_size()} pieces do not fit uint16")
    corpus = load_corpus(corpus_path)
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, object] = {
        "format": FORMAT,
        "corpus": corpus_path.name,
        "corpus_sha256": corpus.text_sha256,
        "corpus_python_version": corpus.python_version,
        "tokenizer_sha256": hashlib.sha256(tokenizer.read_bytes()).hexdigest(),
        "vocab_size": processor.get_piece_size(),
        "bos_id": processor.bos_id(),
        "eos_id": processor.eos_id(),
        "dtype": "uint16-le",
    }
    for split in ("train", "val"):
        raw, documents = pack_split(corpus, split, processor, num_threads)
        (out / f"{split}.u16.xz").write_bytes(xz_in_parallel(raw, num_threads))
        meta[split] = {
            "documents": documents,
            "tokens": len(raw) // 2,
            "bytes": sum(len(d.text.encode("utf-8")) for d in corpus.split(split)),
            "ids_sha256": hashlib.sha256(raw).hexdigest(),
            "xz_bytes": (out / f"{split}.u16.xz").stat().st_size,
        }
    if tokenizer.resolve() != (out / "tokenizer.model").resolve():
        shutil.copyfile(tokenizer, out / "tokenizer.model")
    record = tokenizer.with_name(tokenizer.stem + "-training.json")
    if record.is_file() and record.resolve() != (out / record.name).resolve():
        shutil.copyfile(record, out / "tokenizer-training.json")
    meta["pack_seconds"] = round(time.perf_counter() - started, 1)
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=REPO_ROOT / ".corpus" / "code-py311.txt.gz")
    p.add_argument("--tokenizer", type=Path,
                   default=REPO_ROOT / "models" / "default" / "tokenizer.model")
    p.add_argument("--out", type=Path, default=REPO_ROOT / ".corpus" / "packed")
    p.add_argument("--num-threads", type=int, default=2)
    args = p.parse_args(argv)
    if not args.tokenizer.is_file():
        p.error(f"--tokenizer: expected a sentencepiece model file, got {args.tokenizer}")
    try:
        meta = pack(args.corpus, args.tokenizer, args.out, args.num_threads)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    for split in ("train", "val"):
        s = meta[split]
        text_tokens = s["tokens"] - 2 * s["documents"]  # bos and eos carry no text
        print(f"{split}: {s['documents']:,} files, {s['bytes'] / 1e6:.1f} MB, {s['tokens']:,} "
              f"tokens ({s['bytes'] / text_tokens:.3f} bytes/token), xz "
              f"{s['xz_bytes'] / 2**20:.1f} MiB ({s['xz_bytes'] / s['tokens']:.3f} bytes/token)")
    print(f"wrote {args.out}: {total / 2**20:.1f} MiB in all, in {meta['pack_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
