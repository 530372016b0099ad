"""Checks for values that come from files (config.json, config TOML, safetensors indexes,
experiment TOML): each returns the value with its type checked, never coerced ("false" is not
a bool, "1e-5" is not a number), or raises the caller's error class with one line that names
the key, what was expected and what was given.

    >>> positive_number("rope_theta", 10000, ValueError)
    10000.0
    >>> boolean("tie_word_embeddings", "false", ValueError)
    Traceback (most recent call last):
    ...
    ValueError: tie_word_embeddings: expected true or false, got 'false' (a string)
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from typing import Any

# Every size of a model is indexed with 32-bit integers somewhere (kernels, positions): a
# larger value is a typo, not a model.
MAX_SIZE = 2**31 - 1


def describe(value: Any) -> str:
    """repr of a value with its JSON/TOML kind when the kind is the surprise."""
    kinds = {str: "a string", list: "a list", dict: "a table", bool: "a boolean",
             type(None): "null"}
    kind = kinds.get(type(value))
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({kind})" if kind and not isinstance(value, type(None)) else text


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def boolean(key: str, value: Any, error: type[Exception]) -> bool:
    if not isinstance(value, bool):
        raise error(f"{key}: expected true or false, got {describe(value)}")
    return value


def integer(key: str, value: Any, error: type[Exception], minimum: int = 0,
            maximum: int = MAX_SIZE) -> int:
    if not is_int(value) or not minimum <= value <= maximum:
        raise error(f"{key}: expected an integer in [{minimum}, {maximum}], got "
                    f"{describe(value)}")
    return value


def positive_number(key: str, value: Any, error: type[Exception]) -> float:
    """A finite number > 0 (an int is fine), as a float."""
    if is_number(value):
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float
            number = math.inf
        if math.isfinite(number) and number > 0:
            return number
    raise error(f"{key}: expected a finite number > 0, got {describe(value)}")


def string(key: str, value: Any, error: type[Exception]) -> str:
    if not isinstance(value, str):
        raise error(f"{key}: expected a string, got {describe(value)}")
    return value


def table(key: str, value: Any, error: type[Exception]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise error(f"{key}: expected a table (mapping), got {describe(value)}")
    return value


def regular_file(path: Path, what: str, error: type[Exception]) -> Path:
    """The path if it names a regular file (symlinks followed); a FIFO, a device, a directory
    or a symlink loop is refused without opening it, so nothing can block on a read."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except OSError as exc:  # ELOOP (symlink loop), EACCES, ENAMETOOLONG...
        raise error(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except ValueError:  # an embedded NUL byte
        raise error(f"{what} {str(path)!r}: not a valid path") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) \
            else "not a regular file"
        raise error(f"{path}: expected a regular file ({what}), got {kind}")
    return path


def read_text(path: Path, what: str, error: type[Exception]) -> str:
    """The UTF-8 text of a regular file, or one line saying why not."""
    regular_file(path, what, error)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: expected UTF-8 text, got byte 0x{data[exc.start]:02x} at offset "
                    f"{exc.start}") from None


def inside(directory: Path, name: Any, what: str, error: type[Exception],
           root: Path | None = None) -> Path:
    """directory / name, refused unless name is a relative path that resolves (symlinks
    included) to a regular file inside root (default: directory)."""
    if not isinstance(name, str) or not name:
        raise error(f"{what}: expected a file name, got {describe(name)}")
    root = (root or directory).resolve()
    candidate = directory / name
    try:
        resolved = candidate.resolve()  # as far as it exists: where it would lead
        if Path(name).is_absolute() or not resolved.is_relative_to(root):
            raise error(f"{what}: {name!r} resolves to {resolved}, outside {root}; refused")
        resolved = candidate.resolve(strict=True)
    except FileNotFoundError:
        raise error(f"{what}: names a file that does not exist: {name!r}") from None
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loops, NUL bytes
        raise error(f"{what}: {name!r} cannot be resolved ({exc})") from None
    return regular_file(resolved, what, error)
