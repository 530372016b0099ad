"""The scripts under scripts/ as modules, for the tests that call their main() in-process."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def script_path(name: str) -> Path:
    """scripts/NAME.py."""
    return ROOT / "scripts" / f"{name}.py"


def load_script(name: str) -> ModuleType:
    """scripts/NAME.py imported as module NAME (registered in sys.modules: a script's
    dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, script_path(name))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
