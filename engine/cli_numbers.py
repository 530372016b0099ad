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


_MEMORY_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
                 "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def memory_amount(flag: str, text: str) -> int | float:
    """'0.9' -> 0.9 (a number in (0, 1] without a unit: a fraction of free memory);
    '4GiB', '512MiB', '1e9' or '1000000' -> bytes (a size with a unit, or a whole number
    above 1 without one).

    >>> memory_amount("--kv-memory", "0.5"), memory_amount("--kv-memory", "2GiB")
    (0.5, 2147483648)
    """
    what = ("a fraction of free memory in (0, 1] or a size such as 4GiB, 512MiB or a byte "
            "count")
    raw = text.strip().lower().replace(" ", "")
    digits = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(digits):]
    try:
        value = float(digits)
    except ValueError:
        raise NumberError(f"{flag}: expected {what}, got {text!r}") from None
    if unit not in _MEMORY_UNITS or not math.isfinite(value) or value <= 0:
        raise NumberError(f"{flag}: expected {what}, got {text!r}")
    if not unit and value <= 1:
        return value
    size = value * _MEMORY_UNITS[unit]
    if size < 1 or size >= 2**63 or (not unit and not value.is_integer()):
        raise NumberError(f"{flag}: expected {what}, got {text!r}")
    return int(size)
