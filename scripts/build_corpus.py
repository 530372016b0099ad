"""Builds the training corpus of the default model: the Python standard library's own source.

Every machine that runs Python already has this text, so nothing is downloaded. The corpus is
the ``.py`` files of the running interpreter's standard library (``sysconfig`` "stdlib" path,
``site-packages``/``dist-packages`` excluded), sorted by relative path, read as UTF-8 with
universal newlines (``\\r\\n`` and ``\\r`` become ``\\n``, as ``open()`` does). Files that are not
valid UTF-8 (a few encoding tests) are skipped and counted; files with nothing but whitespace
(empty ``__init__.py``) are left out.

Two files come out, named after the Python version (the stdlib differs between versions):

    .corpus/corpus-py311.txt.gz   the documents concatenated, nothing between them
    .corpus/corpus-py311.json     the manifest: python version, the sha256 of the text, and
                                  per document its path, length in characters, UTF-8 bytes,
                                  and split ("train" or "val")

The manifest's character lengths cut the text back into documents, so no separator has to be
reserved. The validation split is by file and depends only on the relative path:
``sha1(path) % 20 == 0`` (about 5% of the files).

    python3 scripts/build_corpus.py            # writes .corpus/corpus-py<major><minor>.*
    python3 scripts/build_corpus.py --out-dir /tmp/c
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import platform
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO_ROOT / ".corpus"
VAL_MODULUS = 20  # one file in VAL_MODULUS (by hash of its path) is held out for validation
EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__")


@dataclass(frozen=True)
class Document:
    path: str  # relative to the stdlib root, with "/" separators
    text: str
    split: str  # "train" or "val"


@dataclass(frozen=True)
class Corpus:
    documents: list[Document]
    python_version: str  # "3.11.7"
    text_sha256: str  # sha256 of the UTF-8 text of all documents concatenated

    def split(self, name: str) -> list[Document]:
        if name not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {name!r}")
        return [d for d in self.documents if d.split == name]


def split_of(relative_path: str) -> str:
    """'val' for about one file in 20, chosen by the sha1 of its relative path; else 'train'."""
    digest = hashlib.sha1(relative_path.encode("utf-8")).digest()
    return "val" if int.from_bytes(digest, "big") % VAL_MODULUS == 0 else "train"


def corpus_stem(python_version: tuple[int, int] | None = None) -> str:
    major, minor = python_version or sys.version_info[:2]
    return f"corpus-py{major}{minor}"


def manifest_path_for(corpus_path: Path) -> Path:
    """`.corpus/corpus-py311.txt.gz` -> `.corpus/corpus-py311.json`."""
    name = corpus_path.name
    stem = name[: -len(".txt.gz")] if name.endswith(".txt.gz") else corpus_path.stem
    return corpus_path.with_name(stem + ".json")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def collect_stdlib(root: Path | None = None) -> tuple[Corpus, list[str]]:
    """Reads the stdlib's .py files. Returns the corpus and the paths skipped as non-UTF-8."""
    root = root or stdlib_root()
    paths = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if p.is_file() and not any(part in EXCLUDED_DIRS for part in p.relative_to(root).parts)
    )
    documents: list[Document] = []
    skipped: list[str] = []
    for rel in paths:
        try:
            text = (root / rel).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(rel)
            continue
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if text.strip():
            documents.append(Document(path=rel, text=text, split=split_of(rel)))
    if not documents:
        raise FileNotFoundError(f"no UTF-8 .py files found under {root}")
    return make_corpus(documents), skipped


def make_corpus(documents: list[Document], python_version: str | None = None) -> Corpus:
    """A corpus of these documents (python_version: the running one unless given)."""
    full_text = "".join(d.text for d in documents)
    return Corpus(
        documents=list(documents),
        python_version=python_version or platform.python_version(),
        text_sha256=hashlib.sha256(full_text.encode("utf-8")).hexdigest(),
    )


def write_corpus(corpus: Corpus, out_dir: Path, skipped: list[str] | None = None) -> Path:
    """Writes `<out_dir>/corpus-pyXY.txt.gz` and its manifest; returns the .txt.gz path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    major, minor = (int(x) for x in corpus.python_version.split(".")[:2])
    stem = corpus_stem((major, minor))
    corpus_path = out_dir / f"{stem}.txt.gz"
    data = "".join(d.text for d in corpus.documents).encode("utf-8")
    # mtime=0 and no file name in the header: the same text gives the same .gz bytes.
    corpus_path.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
    manifest = {
        "format": "toyllm-corpus-1",
        "source": "python stdlib .py files (sysconfig 'stdlib'), sorted, UTF-8, \\n newlines",
        "python_version": corpus.python_version,
        "text_sha256": corpus.text_sha256,
        "text_bytes": len(data),
        "gz_sha256": hashlib.sha256(corpus_path.read_bytes()).hexdigest(),
        "num_documents": len(corpus.documents),
        "val_rule": f"sha1(relative path) % {VAL_MODULUS} == 0",
        "skipped_not_utf8": sorted(skipped or []),
        "documents": [
            {
                "path": d.path,
                "chars": len(d.text),
                "bytes": len(d.text.encode("utf-8")),
                "split": d.split,
            }
            for d in corpus.documents
        ],
    }
    manifest_path_for(corpus_path).write_text(json.dumps(manifest, indent=1) + "\n")
    return corpus_path


def load_corpus(corpus_path: Path) -> Corpus:
    """Reads a corpus written by `write_corpus`, checking the text against the manifest's sha256.

    The check is on the uncompressed text, so a gzip of another zlib version still passes.
    """
    corpus_path = Path(corpus_path)
    manifest_path = manifest_path_for(corpus_path)
    if not corpus_path.is_file():
        raise FileNotFoundError(
            f"corpus not found: {corpus_path} (build it: scripts/build_corpus.py)"
        )
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"manifest not found: expected {manifest_path} beside {corpus_path.name}"
        )
    manifest = json.loads(manifest_path.read_text())
    data = gzip.decompress(corpus_path.read_bytes())
    sha = hashlib.sha256(data).hexdigest()
    if sha != manifest["text_sha256"]:
        raise ValueError(
            f"corpus {corpus_path} does not match its manifest: text sha256 {sha}, "
            f"expected {manifest['text_sha256']}"
        )
    text = data.decode("utf-8")
    documents: list[Document] = []
    start = 0
    for entry in manifest["documents"]:
        end = start + entry["chars"]
        documents.append(Document(path=entry["path"], text=text[start:end], split=entry["split"]))
        start = end
    if start != len(text):
        raise ValueError(f"manifest lengths cover {start} characters, the corpus has {len(text)}")
    return Corpus(
        documents=documents,
        python_version=manifest["python_version"],
        text_sha256=manifest["text_sha256"],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    corpus, skipped = collect_stdlib()
    path = write_corpus(corpus, args.out_dir, skipped)
    val = corpus.split("val")
    text_bytes = sum(len(d.text.encode("utf-8")) for d in corpus.documents)
    val_bytes = sum(len(d.text.encode("utf-8")) for d in val)
    print(f"python {corpus.python_version}, stdlib {stdlib_root()}")
    print(
        f"{len(corpus.documents)} documents ({len(val)} val), {text_bytes / 1e6:.1f} MB text "
        f"({val_bytes / 1e6:.2f} MB val); skipped {len(skipped)} non-UTF-8 files"
    )
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB), sha256(text) {corpus.text_sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
