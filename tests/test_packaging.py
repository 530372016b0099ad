"""How toyllm installs: one import name that a user's own `models` / `engine` packages cannot
shadow, and the shipped configs and experiments found by name from any directory (the wheel
itself is built and run from a temporary directory by scripts/wheel_check.sh)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest

from toyllm.models.config import ConfigError, load_config
from toyllm.models.shipped import (
    CONFIGS_DIR,
    EXPERIMENTS_DIR,
    config_names,
    experiment_names,
    resolve_config,
    resolve_experiment,
)

ROOT = Path(__file__).resolve().parents[1]

JUNK_INIT = 'raise ImportError("the user\'s own {name} package was imported, not toyllm\'s")\n'


def test_a_users_models_and_engine_packages_do_not_shadow_toyllm(tmp_path: Path) -> None:
    for name in ("models", "engine"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(JUNK_INIT.format(name=name))
        (tmp_path / name / "config.py").write_text("junk = 1\n")
    # `python -c` puts the current directory first on sys.path, and PYTHONPATH puts the junk
    # packages before site-packages too: both doors a user's project opens
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    code = "import sys; from toyllm.engine.cli import app; sys.exit(app())"
    done = subprocess.run(
        [sys.executable, "-c", code, "generate", "def f", "--max-new-tokens", "4",
         "--temperature", "0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("def f") and len(done.stdout.strip()) > len("def f"), done.stdout
    assert "user's own" not in done.stderr


def test_every_shipped_config_and_experiment_resolves_by_name() -> None:
    assert "llama-1b" in config_names() and "attention-variants" in experiment_names()
    for name in config_names():
        assert resolve_config(name) == CONFIGS_DIR / f"{name}.toml"
        assert resolve_config(f"{name}.toml") == CONFIGS_DIR / f"{name}.toml"
        load_config(resolve_config(name))
    for name in experiment_names():
        assert resolve_experiment(name) == EXPERIMENTS_DIR / f"{name}.toml"


def test_a_path_that_exists_wins_over_a_shipped_name(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tiny.toml").write_text("")
    monkeypatch.chdir(tmp_path)
    assert resolve_config("tiny.toml") == Path("tiny.toml")
    assert resolve_config("tiny") == CONFIGS_DIR / "tiny.toml"  # no file named `tiny` here
    (tmp_path / "base.toml").write_text("")
    assert resolve_config("base.toml", relative_to=tmp_path) == tmp_path / "base.toml"


@pytest.mark.parametrize("resolve, name, names", [
    (resolve_config, "llama-9b", config_names),
    (resolve_config, "no/such/dir", config_names),
    (resolve_experiment, "attention", experiment_names),
])
def test_an_unknown_name_is_one_line_listing_the_shipped_names(resolve, name: str,
                                                               names) -> None:
    with pytest.raises(ConfigError, match="not found") as info:
        resolve(name)
    message = str(info.value)
    assert "\n" not in message and name in message
    assert all(n in message for n in names())


def test_the_cli_takes_shipped_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from toyllm.engine.cli import app

    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    runner = CliRunner()
    r = runner.invoke(app, ["info", "llama-1b"])
    assert r.exit_code == 0 and "16 layers, hidden 2048" in r.output, r.output
    r = runner.invoke(app, ["sweep", "cpu-smoke", "--dry-run"])
    assert r.exit_code == 0 and "point(s) valid" in r.output, r.output
    r = runner.invoke(app, ["info", "llama-9b"])
    assert r.exit_code == 2 and "shipped: default, llama-1b" in r.output, r.output


def test_bench_rejects_an_unknown_model_before_measuring() -> None:
    from toyllm.engine.tools.bench import main

    with pytest.raises(ConfigError, match="llama-9b"):
        main(["--device", "cpu", "--models", "stories15m,llama-9b"])


def test_every_file_in_configs_is_package_data_of_the_wheel() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir = setuptools["package-dir"]
    data = setuptools["package-data"]
    assert package_dir["toyllm.configs"] == "configs"
    for path in CONFIGS_DIR.rglob("*"):
        if path.is_dir():
            continue
        rel = path.relative_to(CONFIGS_DIR)
        package = ".".join(("toyllm.configs", *rel.parent.parts))
        assert package in setuptools["packages"], f"{package} is not a listed package"
        assert any(fnmatch(rel.name, g) for g in data.get(package, [])), f"{rel} not shipped"
