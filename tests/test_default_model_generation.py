"""The shipped model through the engine: the cache changes nothing, and it writes Python."""

from __future__ import annotations

import keyword
import re

import pytest
import torch

from toyllm.engine.check.reference import reference_greedy
from toyllm.engine.generate import Engine
from toyllm.engine.sampling import SamplingParams
from toyllm.models.model_source import DEFAULT_MODEL_DIR, load_model

pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR / "model.safetensors").is_file(),
    reason="models/default/model.safetensors not trained yet (scripts/train_default_model.sh)",
)
PROMPT = "import os\n\n\ndef read_config(path):\n"


@pytest.fixture(scope="module")
def shipped():
    return load_model(None, torch.device("cpu"), torch.float32)


def test_greedy_through_the_cache_equals_the_no_cache_reference(shipped) -> None:
    ids = shipped.tokenizer.encode(PROMPT)
    params = SamplingParams(max_new_tokens=64, stop_at_eos=False)
    got = Engine(shipped.model, shipped.tokenizer).generate([ids], params).completions[0]
    expected, _ = reference_greedy(shipped.model, ids, 64)
    assert got.token_ids == expected


def test_what_it_writes_looks_like_python(shipped) -> None:
    engine = Engine(shipped.model, shipped.tokenizer)
    params = SamplingParams(max_new_tokens=96, temperature=0.7, top_p=0.95, seed=0)
    text = engine.generate([PROMPT], params).completions[0].text
    words = re.findall(r"[A-Za-z_][A-Za-z_0-9]*", text)
    assert len(words) >= 10, text
    python_keywords = {w for w in words if keyword.iskeyword(w)}
    assert len(python_keywords) >= 2, text  # e.g. return, if, for, in, None
    assert re.search(r"\n {4,}\S", text), text  # indented lines
    assert sum(c.isascii() for c in text) >= 0.95 * len(text), text
