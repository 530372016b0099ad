"""Numbers typed on the command line: parsed and range-checked in one place, so every command
refuses a bad one with the same kind of line (`--batches: expected ..., got 'abc'`).

    >>> int_list("--batches", "1,16")
    [1, 16]
    >>> int_list("--batches", "abc")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    NumberError: --batches: expected a comma-separated list of integers in [1, 2147483647], ...
"""

from __future__ import annotations

import math
import os
from pathlib import Path

MAX_INT = 2**31 - 1  # sizes, counts and positions are 32-bit somewhere below


class NumberError(ValueError):
    """A command-line number (or list of numbers) that is malformed or out of range."""


def integer(flag: str, value: object, minimum: int = 1, maximum: int = MAX_INT) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise NumberError(f"{flag}: expected an integer in [{minimum}, {maximum}], got "
                          f"{value!r}")
    return value


def number(flag: str, value: object, minimum: float, maximum: float = math.inf) -> float:
    """A finite float in [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value) or not minimum <= value <= maximum:
        raise NumberError(f"{flag}: expected a finite number in [{minimum}, {maximum}], got "
                          f"{value!r}")
    return float(value)


def positive(flag: str, value: object) -> float:
    """A finite float > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value) or not value > 0:
        raise NumberError(f"{flag}: expected a finite number > 0, got {value!r}")
    return float(value)


def int_list(flag: str, text: str, minimum: int = 1, maximum: int = MAX_INT,
             allow_empty: bool = False) -> list[int]:
    """'1,16' -> [1, 16]; every item an integer in [minimum, maximum], none repeated."""
    parts = [p.strip() for p in text.split(",")] if text.strip() else []
    what = (f"a comma-separated list of integers in [{minimum}, {maximum}]"
            + (" (or nothing)" if allow_empty else ""))
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise NumberError(f"{flag}: expected {what}, got {text!r}") from None
    if (not values and not allow_empty) or any(not minimum <= v <= maximum for v in values):
        raise NumberError(f"{flag}: expected {what}, got {text!r}")
    if len(set(values)) != len(values):
        raise NumberError(f"{flag}: repeated value in {text!r}")
    return values


def output_file(flag: str, path: Path) -> Path:
    """A file the command will write at the end: checked before any work starts, so a typo
    in the path never costs the measurements."""
    if path.is_dir():
        raise NumberError(f"{flag}: {path} is a directory; expected a file path")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:  # created on write
        parent = parent.parent
    if not parent.is_dir():
        raise NumberError(f"{flag}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists()
                                                    and not os.access(path, os.W_OK)):
        raise NumberError(f"{flag}: {path} is not writable")
    return path
