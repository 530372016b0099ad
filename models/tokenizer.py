"""Text <-> token ids through a sentencepiece model, and incremental decoding for streaming.

`Tokenizer` wraps a sentencepiece `tokenizer.model` (the shipped default one, or a Llama-2 /
TinyLlama-style one). `StreamDecoder` turns token ids, fed one at a time, into text that is
final: it never emits half of a character whose UTF-8 bytes are spread over byte-fallback
pieces, and everything it emits plus `flush()` equals `Tokenizer.decode` of all the ids.

    tok = Tokenizer.from_file("models/default/tokenizer.model")
    ids = tok.encode("def f(x):\\n    return x\\n")   # [tok.bos_id, ...]
    assert tok.decode(ids) == "def f(x):\\n    return x\\n"
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

REPLACEMENT_CHAR = "\ufffd"  # what sentencepiece decodes an incomplete UTF-8 byte run to


class TokenizerError(ValueError):
    """A tokenizer file that is missing or unreadable, or ids the tokenizer does not have."""


class Tokenizer:
    """A sentencepiece model. Special ids come from the model (Llama: unk 0, bos 1, eos 2)."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: Path | None = None) -> None:
        self._sp = processor
        self.path = path
        self.chat_template: str | None = None  # from the side files (tokenizer_files.py)
        self._extra_eos: tuple[int, ...] = ()

    def attach(self, files) -> None:
        """Take the chat template and the extra EOS ids of a checkpoint's side files
        (`tokenizer_files.TokenizerFiles`)."""
        self.chat_template = files.chat_template
        self._extra_eos = tuple(i for i in files.eos_token_ids if 0 <= i < self.vocab_size)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: the model's eos, then generation_config's."""
        own = (self.eos_id,) if self.eos_id >= 0 else ()
        return own + tuple(i for i in self._extra_eos if i not in own)

    def special_tokens(self) -> dict[str, str]:
        """bos_token / eos_token / unk_token texts, as chat templates read them."""
        ids = {"bos_token": self.bos_id, "eos_token": self.eos_id, "unk_token": self.unk_id}
        return {k: self._sp.id_to_piece(i) for k, i in ids.items() if i >= 0}

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            what = "a directory" if path.is_dir() else "no such file"
            raise TokenizerError(
                f"tokenizer not found: {path} ({what}; expected a sentencepiece tokenizer.model)"
            )
        processor = spm.SentencePieceProcessor()
        try:
            processor.load(str(path))
        except (RuntimeError, OSError) as exc:
            raise TokenizerError(
                f"{path}: not a sentencepiece model ({str(exc).splitlines()[0]})"
            ) from None
        return cls(processor, path)

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        return self._sp.encode(
            text, add_bos=bos and self.bos_id >= 0, add_eos=eos and self.eos_id >= 0
        )

    def encode_batch(
        self, texts: Sequence[str], bos: bool = True, eos: bool = False, num_threads: int = -1
    ) -> list[list[int]]:
        """encode() of many texts at once, on `num_threads` threads (-1: all cores)."""
        return self._sp.encode(
            list(texts),
            add_bos=bos and self.bos_id >= 0,
            add_eos=eos and self.eos_id >= 0,
            num_threads=num_threads,
        )

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; special ids (bos, eos) decode to nothing."""
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"token id {i} is out of range [0, {self.vocab_size})")
        return self._sp.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        """The piece's surface in the model (spaces shown as U+2581, bytes as <0xNN>)."""
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} is out of range [0, {self.vocab_size})")
        return self._sp.id_to_piece(token_id)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


class StreamDecoder:
    """Incremental detokenisation: `feed(id)` returns only the new text that is final.

    Decoding one piece alone is wrong in two ways: a character split over byte-fallback pieces
    (<0xE2><0x86><0x92> is "→") is garbage until its last byte arrives, and tokenizers with a
    dummy prefix (Llama 2) drop the leading space of whatever piece comes first in a decode.
    So each step decodes a short window of ids twice, with and without the new ids, and emits
    the difference:

        ids:    ... | prefix (already emitted, kept as context) | new (not yet emitted) |
        emit    decode(prefix + new)[len(decode(prefix)):]

    The leading-space rule then applies inside the prefix, identically in both decodes. Text
    that ends in U+FFFD is held back (an incomplete byte sequence; more bytes may come). The
    prefix moves on only to a chunk that decodes to non-empty text on its own, so the rule can
    never reach into the new part (decoders keep dropping leading spaces while the output so
    far is empty, e.g. after <s>).

    Invariant: "".join(feed(i) for i in ids) + flush() == tokenizer.decode(ids).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []  # the window: prefix ids, then ids not yet emitted
        self._read = 0  # index in _ids where the not-yet-emitted ids start

    def feed(self, token_id: int) -> str:
        """Add one id; return the text that became final with it (often "", never garbage)."""
        token_id = int(token_id)
        if not 0 <= token_id < self._tokenizer.vocab_size:
            raise TokenizerError(
                f"token id {token_id} is out of range [0, {self._tokenizer.vocab_size})"
            )
        self._ids.append(token_id)
        prefix_text = self._tokenizer.decode(self._ids[: self._read])
        text = self._tokenizer.decode(self._ids)
        if len(text) <= len(prefix_text) or text.endswith(REPLACEMENT_CHAR):
            return ""
        self._advance()
        return text[len(prefix_text) :]

    def flush(self) -> str:
        """The rest of the text, final or not (call at the end of the stream)."""
        prefix_text = self._tokenizer.decode(self._ids[: self._read])
        text = self._tokenizer.decode(self._ids)
        self._advance()
        return text[len(prefix_text) :]

    def _advance(self) -> None:
        """Everything in the window is emitted: the new ids become the next prefix if they
        decode to text on their own; otherwise the old prefix stays in front of them."""
        if self._tokenizer.decode(self._ids[self._read :]):
            del self._ids[: self._read]
        self._read = len(self._ids)
