"""Every docstring example of the package runs: doctest over each module of toyllm.engine and
toyllm.models (the CLI, the plots and the transformers bridge aside: they have no examples)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import toyllm.engine
import toyllm.models


def _modules() -> list[str]:
    names = []
    for package in (toyllm.engine, toyllm.models):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if not info.name.endswith("._C"):
                names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    failed, _ = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                                verbose=False)
    assert failed == 0, f"{failed} docstring example(s) of {name} failed (run doctest on it)"


def test_the_public_faces_have_examples() -> None:
    finder = doctest.DocTestFinder()
    with_examples = {
        name for name in _modules()
        if any(t.examples for t in finder.find(importlib.import_module(name)))
    }
    for face in ("toyllm.engine.settings", "toyllm.engine.ops.kv_cache",
                 "toyllm.engine.ops.gemv", "toyllm.engine.ops.elementwise",
                 "toyllm.engine.ops.rope_kv", "toyllm.engine.ops.argmax",
                 "toyllm.engine.ops.paged_cache", "toyllm.engine.generate",
                 "toyllm.engine.serving", "toyllm.engine.prefix_cache"):
        assert face in with_examples, face
