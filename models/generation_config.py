"""A checkpoint's sampling defaults: the numbers of its `generation_config.json`.

Hugging Face checkpoints say how they like to be sampled in `generation_config.json`
(transformers' `GenerationConfig`); toyllm's CLI takes those values for every sampling option
the user does not give, and its own defaults for the rest (engine/cli.py). Only the fields
toyllm's sampling has are read:

    temperature, top_k, top_p, min_p, repetition_penalty

Other fields (do_sample, num_beams, max_length, ...) are left alone; eos_token_id is read with
the tokenizer's side files (models/tokenizer_files.py). A field of the wrong type or out of range
is refused with the file, the field and the value named: a checkpoint's file is a user's input.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

FILE = "generation_config.json"

# field -> (lowest allowed, highest allowed, integer?) as toyllm's SamplingParams takes them
_FIELDS: dict[str, tuple[float, float, bool]] = {
    "temperature": (0.0, math.inf, False),
    "top_k": (0, math.inf, True),
    "top_p": (0.0, 1.0, False),  # above 0: a nucleus of mass 0 holds no token
    "min_p": (0.0, 1.0, False),
    "repetition_penalty": (0.0, math.inf, False),
}


class GenerationConfigError(ValueError):
    """generation_config.json is unreadable or holds a sampling field toyllm cannot take."""


def read_sampling_defaults(directory: str | Path) -> dict[str, float | int]:
    """The sampling fields of `directory`/generation_config.json ({} without the file).

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / FILE).write_text('{"temperature": 0.6, "do_sample": true, "top_k": 20}')
    >>> read_sampling_defaults(d)
    {'temperature': 0.6, 'top_k': 20}
    """
    path = Path(directory) / FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GenerationConfigError(f"{path}: expected a JSON object, could not read it "
                                    f"({exc})") from None
    if not isinstance(data, dict):
        raise GenerationConfigError(f"{path}: expected a JSON object, got "
                                    f"{type(data).__name__}")
    out: dict[str, float | int] = {}
    for name, (low, high, integer) in _FIELDS.items():
        if name not in data or data[name] is None:
            continue
        value = data[name]
        kind = "an integer" if integer else "a number"
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or not math.isfinite(value):
            raise GenerationConfigError(f"{path}: {name} must be {kind}, got {value!r}")
        strict = name in ("top_p", "repetition_penalty")  # 0 excluded, as SamplingParams does
        if value < low or value > high or (strict and value <= low):
            bound = {"top_p": "in (0, 1]", "repetition_penalty": "> 0"}.get(
                name, f">= {low}" if high == math.inf else f"in [{low}, {high}]")
            raise GenerationConfigError(f"{path}: {name} must be {bound}, got {value!r}")
        out[name] = value
    return out
