"""models/tokenizer.py: the shipped tokenizer's round trip and special ids, and StreamDecoder's
invariant (everything emitted + flush == decode of all ids, no U+FFFD mid-stream for valid
text) on the shipped tokenizer and on a Llama-2-style one (dummy prefix) built here."""

from __future__ import annotations

import io
import random
import sysconfig
from pathlib import Path

import pytest
import sentencepiece as spm

from toyllm.models.tokenizer import StreamDecoder, Tokenizer, TokenizerError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = REPO_ROOT / "models" / "default" / "tokenizer.model"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
MULTIBYTE_TEXT = "café → 😀 naïve über straße, 日本語\n\tdef f():  \n\n    return '€'\n"


@pytest.fixture(scope="module")
def default_tok() -> Tokenizer:
    if not DEFAULT_TOKENIZER.is_file():
        pytest.skip(f"{DEFAULT_TOKENIZER} not built yet (scripts/train_tokenizer.py)")
    return Tokenizer.from_file(DEFAULT_TOKENIZER)


@pytest.fixture(scope="module")
def dummy_prefix_tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A 400-piece Llama-2-style model: add_dummy_prefix and whitespace folding on (the
    sentencepiece defaults), byte fallback, unk 0 / bos 1 / eos 2. Trains in ~0.05 s."""
    text = (STDLIB / "textwrap.py").read_text(encoding="utf-8")
    lines = [line for line in text.split("\n") if line.strip()] + [MULTIBYTE_TEXT] * 3
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.99,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("tok") / "llama_style.model"
    path.write_bytes(model.getvalue())
    return Tokenizer.from_file(path)


def stream(tok: Tokenizer, ids: list[int]) -> tuple[list[str], str]:
    decoder = StreamDecoder(tok)
    pieces = [decoder.feed(i) for i in ids]
    return pieces, decoder.flush()


class RandomIds:
    """Ids of every kind: any id at all, runs of byte-fallback pieces, whitespace-only and
    special pieces (the ones that decode differently at the start of a decode), real text."""

    def __init__(self, tok: Tokenizer, seed: int) -> None:
        self.tok = tok
        self.rng = random.Random(seed)
        pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
        self.byte_ids = [i for i, p in enumerate(pieces) if p.startswith("<0x")]
        self.blank_ids = [i for i, p in enumerate(pieces) if set(p) <= {"\u2581", "\n"}]
        self.blank_ids += [tok.bos_id, tok.eos_id, tok.unk_id]

    def draw(self, length: int) -> list[int]:
        rng, ids = self.rng, []
        while len(ids) < length:
            kind = rng.random()
            if kind < 0.3:
                ids.append(rng.randrange(self.tok.vocab_size))
            elif kind < 0.55:
                ids.extend(rng.choices(self.byte_ids, k=rng.randint(1, 4)))
            elif kind < 0.7:
                ids.extend(rng.choices(self.blank_ids, k=rng.randint(1, 3)))
            else:
                start = rng.randrange(len(MULTIBYTE_TEXT))
                text = MULTIBYTE_TEXT[start : start + rng.randint(1, 12)]
                ids.extend(self.tok.encode(text, bos=False))
        return ids[:length]


# The shipped tokenizer ----------------------------------------------------------------------


def test_default_tokenizer_has_llama_special_ids_and_4096_pieces(default_tok: Tokenizer) -> None:
    assert (default_tok.unk_id, default_tok.bos_id, default_tok.eos_id) == (0, 1, 2)
    assert default_tok.vocab_size == 4096
    ids = default_tok.encode("x = 1\n")
    assert ids[0] == 1 and 1 not in ids[1:]
    assert default_tok.encode("x = 1\n", bos=False) == ids[1:]
    assert default_tok.encode("x", bos=False, eos=True)[-1] == 2
    assert default_tok.decode([1, *ids[1:], 2]) == "x = 1\n"  # specials decode to nothing


@pytest.mark.parametrize(
    "module", ["textwrap.py", "argparse.py", "difflib.py", "encodings/cp1252.py", "this.py"]
)
def test_default_tokenizer_round_trips_stdlib_source_exactly(
    default_tok: Tokenizer, module: str
) -> None:
    text = (STDLIB / module).read_text(encoding="utf-8")
    assert default_tok.decode(default_tok.encode(text)) == text


def test_default_tokenizer_round_trips_tabs_unicode_trailing_spaces_blank_lines(
    default_tok: Tokenizer,
) -> None:
    text = " lead\n\n\n\tx = 1  \t\n" + MULTIBYTE_TEXT + "\r\n\x0c\x00end   "
    assert default_tok.decode(default_tok.encode(text)) == text


def test_default_tokenizer_makes_newline_plus_indent_one_token(default_tok: Tokenizer) -> None:
    ids = default_tok.encode("if x:\n        return 1\n", bos=False)
    pieces = [default_tok.id_to_piece(i) for i in ids]
    assert "\n" + "\u2581" * 8 in pieces and pieces[-1] == "\n"


def test_default_tokenizer_compresses_python_to_more_than_3_bytes_per_token(
    default_tok: Tokenizer,
) -> None:
    text = (STDLIB / "argparse.py").read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) / len(default_tok.encode(text, bos=False)) > 3.0


def test_decode_rejects_out_of_range_ids(default_tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match=r"4096 is out of range \[0, 4096\)"):
        default_tok.decode([5, 4096])
    with pytest.raises(TokenizerError, match="out of range"):
        StreamDecoder(default_tok).feed(-1)


# Loading errors ----------------------------------------------------------------------------


def test_from_file_missing_path_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="tokenizer not found: .*nope.model"):
        Tokenizer.from_file(tmp_path / "nope.model")
    with pytest.raises(TokenizerError, match="a directory"):
        Tokenizer.from_file(tmp_path)


def test_from_file_rejects_a_file_that_is_not_a_sentencepiece_model(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.model"
    bad.write_text("vocab_size = 4096\n")
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        Tokenizer.from_file(bad)


# StreamDecoder -----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["default", "dummy_prefix"])
def test_stream_decoder_output_plus_flush_equals_full_decode_on_random_ids(
    which: str, request: pytest.FixtureRequest
) -> None:
    tok: Tokenizer = request.getfixturevalue(f"{which}_tok")
    draws = RandomIds(tok, seed=1234)
    for length in draws.rng.choices(range(1, 41), k=1000):
        ids = draws.draw(length)
        pieces, rest = stream(tok, ids)
        assert "".join(pieces) + rest == tok.decode(ids), ids


@pytest.mark.parametrize("which", ["default", "dummy_prefix"])
def test_stream_decoder_never_emits_replacement_char_for_valid_text(
    which: str, request: pytest.FixtureRequest
) -> None:
    tok: Tokenizer = request.getfixturevalue(f"{which}_tok")
    for text in [MULTIBYTE_TEXT, "é", "→→", "😀😀 x", " a  b", "x\n\n\n  é"]:
        ids = tok.encode(text)
        assert any(tok.id_to_piece(i).startswith("<0x") for i in tok.encode("😀é→"))
        pieces, rest = stream(tok, ids)
        assert all("\ufffd" not in p for p in pieces), pieces
        assert "".join(pieces) + rest == tok.decode(ids)


def test_stream_decoder_holds_a_split_character_until_its_last_byte(
    default_tok: Tokenizer,
) -> None:
    ids = default_tok.encode("→", bos=False)  # three byte-fallback pieces
    assert [default_tok.id_to_piece(i) for i in ids] == ["<0xE2>", "<0x86>", "<0x92>"]
    assert stream(default_tok, ids) == (["", "", "→"], "")


def test_stream_decoder_keeps_spaces_of_dummy_prefix_pieces(dummy_prefix_tok: Tokenizer) -> None:
    tok = dummy_prefix_tok
    ids = tok.encode("hello world, the text wraps")
    pieces, rest = stream(tok, ids)
    assert "".join(pieces) + rest == "hello world, the text wraps"
    # A special id in the middle must not make the next piece lose its leading space.
    words = tok.encode(" world", bos=False)
    ids = tok.encode("hello", bos=False) + [tok.eos_id, tok.bos_id] + words
    pieces, rest = stream(tok, ids)
    assert "".join(pieces) + rest == tok.decode(ids) == "hello world"
    # Nor may a lone space piece, which decodes to "" when it comes first in a decode.
    space = [i for i in range(tok.vocab_size) if tok.id_to_piece(i) == "\u2581"]
    assert len(space) == 1
    ids = tok.encode("hello", bos=False) + space + words + space + space + words
    pieces, rest = stream(tok, ids)
    assert "".join(pieces) + rest == tok.decode(ids) == "hello  world   world"


def test_stream_decoder_flush_returns_an_incomplete_tail(default_tok: Tokenizer) -> None:
    ids = default_tok.encode("a😀", bos=False)[:-1]  # cut the emoji's last byte
    pieces, rest = stream(default_tok, ids)
    assert "".join(pieces) == "a" and rest == default_tok.decode(ids)[1:]
