"""scripts/eval_default_model.py: the distinct 4-gram share that judges whether sampled text
loops, and the pass-through of sampling options the engine may not have yet."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "scripts"))

from eval_default_model import distinct_4gram_share, sampling_params  # noqa: E402

from toyllm.engine.sampling import SamplingParams  # noqa: E402


def test_a_loop_scores_low_and_varied_code_scores_one() -> None:
    loop = "elif x == 1:\n    return 1\n" * 10
    assert distinct_4gram_share(loop) < 0.15
    varied = "def area(width, height):\n    return width * height\n"
    assert distinct_4gram_share(varied) == 1.0


def test_words_and_punctuation_are_the_units() -> None:
    # "a.b(c)" is 6 units: a . b ( c ) -> 3 four-grams, all distinct
    assert distinct_4gram_share("a.b(c)") == 1.0
    assert distinct_4gram_share("x = x = x = x = x = x") == pytest.approx(2 / 8)


def test_a_sample_without_any_4gram_scores_by_how_it_ended() -> None:
    run_on_identifier = "JSON_BSON" + "_BSON" * 40
    assert distinct_4gram_share(run_on_identifier, ran_to_the_limit=True) == 0.0
    assert distinct_4gram_share("pass", ran_to_the_limit=False) == 1.0


def namespace(**extra: float | None) -> argparse.Namespace:
    values = dict(new_tokens=128, temperature=0.7, top_k=0, top_p=0.95,
                  repetition_penalty=None, min_p=None)
    values.update(extra)
    return argparse.Namespace(**values)


def test_sampling_defaults_are_the_clis() -> None:
    params = sampling_params(namespace(), seed=3)
    assert (params.temperature, params.top_k, params.top_p, params.seed) == (0.7, 0, 0.95, 3)
    assert params.max_new_tokens == 128 and params.stop_at_eos


@pytest.mark.parametrize("name", ["repetition_penalty", "min_p"])
def test_an_option_the_engine_lacks_is_refused_by_name_and_one_it_has_passes(name: str) -> None:
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    value = 1.1 if name == "repetition_penalty" else 0.05
    if name in fields:
        assert getattr(sampling_params(namespace(**{name: value}), seed=0), name) == value
    else:
        with pytest.raises(ValueError, match=f"no {name} field"):
            sampling_params(namespace(**{name: value}), seed=0)
