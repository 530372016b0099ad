"""The files around a tokenizer, read as transformers reads them, and the one function that finds
a checkpoint's tokenizer.

A Hugging Face checkpoint directory may hold, besides the vocabulary itself:

    tokenizer.json          the `tokenizers` pipeline (looked for first, as transformers does)
    tokenizer.model         a sentencepiece model (second)
    tokenizer_config.json   bos/eos/unk/pad token strings, add_bos_token, chat_template
    special_tokens_map.json older home of the same token strings (tokenizer_config wins)
    chat_template.jinja     the chat template as its own file (wins over tokenizer_config's)
    generation_config.json  eos_token_id: an id or a list of ids that end generation
    config.json             eos_token_id again (a list in Llama 3)

`read_tokenizer_files` gathers what these say into `TokenizerFiles`; `load_tokenizer` builds the
tokenizer (sentencepiece `Tokenizer` or `HFTokenizer`) with that information attached.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toyllm.models.tokenizer import Tokenizer, TokenizerError

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass(frozen=True)
class TokenizerFiles:
    """What a checkpoint's side files say about its tokenizer (None: the files do not say)."""

    tokens: dict[str, str]  # bos_token / eos_token / unk_token / pad_token -> its text
    add_bos_token: bool | None = None
    chat_template: str | None = None
    eos_token_ids: tuple[int, ...] = ()  # generation_config.json, then config.json

    @property
    def bos_token(self) -> str | None:
        return self.tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.tokens.get("eos_token")


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: Any) -> str | None:
    """A token as tokenizer_config writes it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _ids(value: Any) -> tuple[int, ...]:
    if isinstance(value, bool):
        return ()
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, int) and not isinstance(v, bool))
    return ()


def _template_from_config(value: Any, source: Path) -> str | None:
    """tokenizer_config's chat_template: a string, or a list of {"name", "template"} of which
    "default" is the one transformers uses."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise TokenizerError(
            f"{source}: chat_template is a list of named templates without a 'default' one "
            f"(names: {sorted(str(n) for n in named)})"
        )
    raise TokenizerError(
        f"{source}: chat_template: expected a string or a list of named templates, got "
        f"{type(value).__name__}"
    )


def read_tokenizer_files(directory: str | Path) -> TokenizerFiles:
    """Read the side files of a checkpoint directory; missing files say nothing."""
    directory = Path(directory)
    special = _read_json(directory / "special_tokens_map.json") or {}
    tok_config = _read_json(directory / "tokenizer_config.json") or {}
    tokens: dict[str, str] = {}
    for key in SPECIAL_TOKEN_KEYS:
        text = _token_text(tok_config.get(key, special.get(key)))
        if text is not None:
            tokens[key] = text
    add_bos = tok_config.get("add_bos_token")
    template = _template_from_config(
        tok_config.get("chat_template"), directory / "tokenizer_config.json"
    )
    if (directory / TEMPLATE_FILE).is_file():
        template = (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
    elif (directory / "chat_template.json").is_file():  # an older transformers layout
        legacy = directory / "chat_template.json"
        template = _template_from_config((_read_json(legacy) or {}).get("chat_template"), legacy)
    eos: list[int] = []
    for name in ("generation_config.json", "config.json"):
        data = _read_json(directory / name) or {}
        eos += [i for i in _ids(data.get("eos_token_id")) if i not in eos]
    return TokenizerFiles(
        tokens=tokens,
        add_bos_token=add_bos if isinstance(add_bos, bool) else None,
        chat_template=template,
        eos_token_ids=tuple(eos),
    )


def load_tokenizer(path: str | Path, side_files: str | Path | None = None):
    """The tokenizer at `path`: a tokenizer.json, a sentencepiece tokenizer.model, or a directory
    holding one of them (tokenizer.json first). Side files are read from `side_files` (default:
    the directory). Returns a `Tokenizer` or an `HFTokenizer`; raises TokenizerError."""
    from toyllm.models.hf_tokenizer import HFTokenizer

    path = Path(path)
    if path.is_dir():
        directory = path
        if (path / TOKENIZER_JSON).is_file():
            path = path / TOKENIZER_JSON
        elif (path / SENTENCEPIECE_MODEL).is_file():
            path = path / SENTENCEPIECE_MODEL
        else:
            raise TokenizerError(
                f"{directory}: no tokenizer found (expected {TOKENIZER_JSON} or "
                f"{SENTENCEPIECE_MODEL})"
            )
    elif not path.is_file():
        raise TokenizerError(
            f"tokenizer not found: {path} (expected {TOKENIZER_JSON}, {SENTENCEPIECE_MODEL} or a "
            "directory holding one)"
        )
    files = read_tokenizer_files(side_files if side_files is not None else path.parent)
    if path.suffix == ".json":
        return HFTokenizer.from_file(path, files)
    tokenizer = Tokenizer.from_file(path)
    tokenizer.attach(files)
    return tokenizer


def find_tokenizer(directory: str | Path):
    """load_tokenizer of a checkpoint directory, or None when it holds no tokenizer file."""
    directory = Path(directory)
    if not any((directory / f).is_file() for f in (TOKENIZER_JSON, SENTENCEPIECE_MODEL)):
        return None
    return load_tokenizer(directory)
