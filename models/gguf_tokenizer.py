"""The tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata, rebuilt with the
`tokenizers` library the way transformers' GGUF integration rebuilds it
(transformers/integrations/gguf/gguf_tokenizer_mapping.py), so the two agree token for token.

    tokenizer.ggml.model  "gpt2":  byte-level BPE; vocabulary + merges; the split regex from
                                   tokenizer.ggml.pre (Llama 3's for "llama-bpe" and kin, GPT-2's
                                   otherwise)
                          "llama": sentencepiece-style BPE with byte fallback; merges from the
                                   file or derived from the vocabulary's scores; the dummy
                                   prefix as sentencepiece adds it (see below)
    tokenizer.ggml.token_type      3 (control) tokens become special added tokens, 4
                                   (user-defined) plain added tokens, so both stay whole
    bos/eos/eot/eom/unk/padding_token_id, add_bos_token, add_space_prefix, chat_template
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
)

from toyllm.models.hf_tokenizer import HFTokenizer
from toyllm.models.tokenizer import TokenizerError
from toyllm.models.tokenizer_files import TokenizerFiles

CONTROL, USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre values whose merges were learned on Llama 3's split (as transformers maps
# them); any other value splits as GPT-2 does, which is also what transformers does
_PRE_SPLITS = {name: _LLAMA3_SPLIT for name in (
    "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
    "dbrx", "smaug-bpe",
)}


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's bytes -> printable characters map (the alphabet byte-level vocabularies use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _derive_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges a sentencepiece BPE vocabulary implies: every split of a piece into two pieces
    of the vocabulary, best score first (transformers' generate_merges with scores)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores, strict=False):
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _merges_of(meta: dict[str, Any]) -> list[tuple[str, str]]:
    merges = []
    for m in meta.get("tokenizer.ggml.merges") or []:
        a, sep, b = m.partition(" ")
        if not sep:
            raise TokenizerError(f"GGUF tokenizer.ggml.merges: expected 'a b', got {m!r}")
        merges.append((a, b))
    return merges


def tokenizer_from_gguf(meta: dict[str, Any], source: str = "GGUF") -> HFTokenizer:
    """The HFTokenizer for a GGUF's metadata (a dict of key -> Python value)."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise TokenizerError(f"{source}: no tokenizer in the GGUF metadata (tokenizer.ggml.*)")
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if kind == "gpt2":
        alphabet = _byte_alphabet()
        spelled = set(alphabet.values())
        vocab = {t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8")): i
                 for i, t in enumerate(tokens)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges_of(meta), dropout=None,
                                   continuing_subword_prefix="", end_of_word_suffix="",
                                   fuse_unk=False))
        split = _PRE_SPLITS.get(meta.get("tokenizer.ggml.pre"))
        if split is None:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
        merges = _merges_of(meta) or _derive_merges(list(tokens), scores)
        vocab = {t: i for i, t in enumerate(tokens)}
        unk = meta.get("tokenizer.ggml.unknown_token_id")
        unk_token = tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True,
                                   dropout=None, unk_token=unk_token))
        prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
        # sentencepiece's dummy prefix: "▁" before the text even when it starts with a space
        # (" a" -> "▁▁a"), as sentencepiece, llama.cpp and Llama 2's own tokenizer.json do.
        # (transformers' GGUF path uses Metaspace(prepend_scheme="first"), which gives "▁a".)
        steps = [normalizers.Prepend("▁")] if prefix else []
        tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
        tok.decoder = decoders.Sequence(steps)
        if add_bos is None:
            add_bos = True  # llama.cpp adds BOS to a sentencepiece vocabulary that does not say
    else:
        raise TokenizerError(
            f"{source}: tokenizer.ggml.model {kind!r} is not supported; expected 'gpt2' "
            "(byte-level BPE) or 'llama' (sentencepiece)"
        )
    spelled = set(_byte_alphabet().values()) if kind == "gpt2" else None
    control = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, types, strict=False)
               if ty == CONTROL and (spelled is None or set(t) <= spelled)]
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types, strict=False) if ty == USER_DEFINED]
    tok.add_special_tokens(control)
    tok.add_tokens(user)

    def text_of(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    named = {"bos_token": text_of("bos_token_id"), "eos_token": text_of("eos_token_id"),
             "unk_token": text_of("unknown_token_id"), "pad_token": text_of("padding_token_id")}
    stop = [meta.get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id",
                                                      "eom_token_id")]
    files = TokenizerFiles(
        tokens={k: v for k, v in named.items() if v is not None},
        add_bos_token=bool(add_bos) if add_bos is not None else False,
        chat_template=meta.get("tokenizer.chat_template"),
        eos_token_ids=tuple(dict.fromkeys(i for i in stop if isinstance(i, int))),
    )
    return HFTokenizer(tok, files)
