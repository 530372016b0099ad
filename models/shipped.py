"""The model configs and experiment files that ship with toyllm, found by name or by path.

In a checkout they are the top-level `configs/` and `configs/experiments/` folders; in an
installed wheel they are the package data of `toyllm.configs` (pyproject.toml maps the one onto
the other). Either way the folder sits beside `models/`, so it is found from this file.

Every command that takes a config or an experiment resolves it here: a path that exists wins;
otherwise a bare name (`llama-1b`, or `llama-1b.toml`) picks the shipped file; anything else is
one ConfigError line that lists the shipped names.

    >>> resolve_config("llama-1b").name
    'llama-1b.toml'
    >>> resolve_experiment("cpu-smoke").parent.name
    'experiments'
"""

from __future__ import annotations

from pathlib import Path

from toyllm.models.config import ConfigError

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
EXPERIMENTS_DIR = CONFIGS_DIR / "experiments"


def config_names() -> list[str]:
    """The shipped model configs, by name (`toyllm info NAME`)."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.toml"))


def experiment_names() -> list[str]:
    """The shipped experiments, by name (`toyllm sweep NAME`)."""
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.toml"))


def _resolve(name_or_path: str | Path, folder: Path, what: str, names: list[str],
             relative_to: Path | None = None) -> Path:
    path = Path(name_or_path)
    if (relative_to / path if relative_to is not None else path).exists():
        return relative_to / path if relative_to is not None else path
    bare = not any(sep in str(name_or_path) for sep in "/\\") and path.suffix in ("", ".toml")
    if bare and (folder / f"{path.stem}.toml").is_file():
        return folder / f"{path.stem}.toml"
    kind = "no such name" if bare else "no such file or directory"
    raise ConfigError(f"{what} not found: {name_or_path} ({kind}; shipped: {', '.join(names)})")


def resolve_config(name_or_path: str | Path, relative_to: Path | None = None) -> Path:
    """A config .toml, a config.json or a checkpoint directory that exists, as given (relative
    to the folder relative_to, when given); else the shipped config of that name. ConfigError
    (listing the shipped names) when neither is."""
    return _resolve(name_or_path, CONFIGS_DIR, "config", config_names(), relative_to)


def resolve_experiment(name_or_path: str | Path) -> Path:
    """An experiment .toml that exists, as given; else the shipped experiment of that name.
    ConfigError (listing the shipped names) when neither is."""
    return _resolve(name_or_path, EXPERIMENTS_DIR, "experiment file", experiment_names())
