"""Text <-> token ids through a Hugging Face `tokenizer.json`, run by the `tokenizers` library.

`HFTokenizer` has the face of the sentencepiece `Tokenizer` (encode / decode / vocab_size /
bos_id / eos_id / id_to_piece), so the engine and `StreamDecoder` take either. Byte-level BPE
(GPT-2 style: SmolLM2, Llama 3) spreads a character's UTF-8 bytes over several tokens; the
`tokenizers` decoder turns an incomplete byte run into U+FFFD, which `StreamDecoder` holds back
until the rest arrives, so streaming never prints half a character.

    tok = load_tokenizer("SmolLM2-135M-Instruct/")        # tokenizer_files.load_tokenizer
    tok.encode("Hello")    # ids as transformers' AutoTokenizer gives them
    tok.eos_ids            # every id that ends generation (Llama 3: a list)

Which special tokens exist and whether BOS is added come from the side files
(`tokenizer_files.TokenizerFiles`); with none, the tokenizer.json's own post-processor decides.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as _Tokenizers

from toyllm.models.tokenizer import TokenizerError
from toyllm.models.tokenizer_files import TokenizerFiles


class HFTokenizer:
    """A `tokenizers.Tokenizer` plus what the checkpoint's side files say about it."""

    def __init__(
        self, tokenizer: _Tokenizers, files: TokenizerFiles | None = None, path: Path | None = None
    ) -> None:
        self._tok = tokenizer
        self.path = path
        files = files or TokenizerFiles(tokens={})
        self._tokens = dict(files.tokens)
        self.chat_template = files.chat_template
        size = self.vocab_size
        self._bos = self._id_of(files.bos_token)
        eos = [i for i in (self._id_of(files.eos_token),) if i is not None]
        eos += [i for i in files.eos_token_ids if 0 <= i < size and i not in eos]
        self._eos = tuple(eos)
        # whether encode() puts BOS first: tokenizer_config's add_bos_token when it says, else
        # what the tokenizer.json's post-processor does (transformers' behaviour for both)
        self._add_bos = files.add_bos_token
        self._post_processor_adds = False
        if self._add_bos is None:
            with_special = tokenizer.encode("a", add_special_tokens=True).ids
            plain = tokenizer.encode("a", add_special_tokens=False).ids
            self._post_processor_adds = with_special != plain
        self._tokens = {k: v for k, v in self._tokens.items() if self._id_of(v) is not None}

    @classmethod
    def from_file(cls, path: str | Path, files: TokenizerFiles | None = None) -> HFTokenizer:
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer not found: {path} (expected a tokenizer.json)")
        try:
            tokenizer = _Tokenizers.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for every parse error
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise TokenizerError(
                f"{path}: not a tokenizer.json the tokenizers library can read ({first})"
            ) from None
        return cls(tokenizer, files, path)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    # the sentencepiece Tokenizer's face --------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return -1 if self._bos is None else self._bos

    @property
    def eos_id(self) -> int:
        return self._eos[0] if self._eos else -1

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: eos_token, then generation_config / config.json's."""
        return self._eos

    @property
    def unk_id(self) -> int:
        unk = self._id_of(self._tokens.get("unk_token"))
        return -1 if unk is None else unk

    def special_tokens(self) -> dict[str, str]:
        """bos_token / eos_token / unk_token / pad_token texts, as chat templates read them."""
        return dict(self._tokens)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Ids of the text; bos=False gives the bare ids (as for a rendered chat template,
        whose text carries its own special tokens)."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        if bos and self._add_bos is None and self._post_processor_adds:
            ids = self._tok.encode(text, add_special_tokens=True).ids
        else:
            ids = self._tok.encode(text, add_special_tokens=False).ids
            if bos and self._add_bos and self._bos is not None:
                ids.insert(0, self._bos)
        if eos and self._eos and ids[-1:] != [self._eos[0]]:
            ids.append(self._eos[0])
        return ids

    def encode_batch(
        self, texts: Sequence[str], bos: bool = True, eos: bool = False, num_threads: int = -1
    ) -> list[list[int]]:
        del num_threads  # tokenizers picks its own parallelism
        return [self.encode(t, bos=bos, eos=eos) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; special tokens (bos, eos, chat markers) decode to nothing."""
        ids = [int(i) for i in ids]
        size = self.vocab_size
        for i in ids:
            if not 0 <= i < size:
                raise TokenizerError(f"token id {i} is out of range [0, {size})")
        return self._tok.decode(ids, skip_special_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        piece = self._tok.id_to_token(int(token_id))
        if piece is None:
            raise TokenizerError(f"token id {token_id} is out of range [0, {self.vocab_size})")
        return piece

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
