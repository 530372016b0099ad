"""scripts/eval_default_model.py: the distinct 4-gram share that judges whether sampled text
loops, and the pass-through of sampling options the engine may not have yet."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "scripts"))

from eval_default_model import distinct_4gram_share, sampling_params  # noqa: E402

from toyllm.models.model_source import DEFAULT_MODEL_DIR  # noqa: E402


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


def namespace(model: Path = DEFAULT_MODEL_DIR, **given: float | None) -> argparse.Namespace:
    values = dict(model=model, new_tokens=128, temperature=None, top_k=None, top_p=None,
                  repetition_penalty=None, min_p=None)
    values.update(given)
    return argparse.Namespace(**values)


def test_sampling_is_the_clis_for_the_checkpoint(tmp_path: Path) -> None:
    """As the CLI samples: the checkpoint's generation_config.json, else the CLI's defaults."""
    shipped = sampling_params(namespace(), seed=3)
    assert (shipped.temperature, shipped.top_p, shipped.min_p, shipped.repetition_penalty,
            shipped.seed) == (0.7, 0.95, 0.05, 1.1, 3)
    assert shipped.max_new_tokens == 128 and shipped.stop_at_eos
    bare = sampling_params(namespace(model=tmp_path), seed=0)  # no generation_config.json
    assert (bare.temperature, bare.top_k, bare.top_p, bare.min_p, bare.repetition_penalty) == \
        (0.7, 0, 0.95, 0.0, 1.0)


@pytest.mark.parametrize("name, value", [("repetition_penalty", 1.3), ("min_p", 0.2),
                                         ("temperature", 0.0), ("top_k", 7), ("top_p", 0.5)])
def test_an_option_given_overrides_the_checkpoint(name: str, value: float) -> None:
    assert getattr(sampling_params(namespace(**{name: value}), seed=0), name) == value
