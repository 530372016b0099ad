"""ModelConfig: TOML and HF config.json loading, and clear errors for bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toyllm.models.config import ConfigError, ModelConfig, config_from_hf, config_to_hf, load_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_loads(path: Path) -> None:
    config = load_config(path)
    assert config.num_heads % config.num_kv_heads == 0
    assert config.num_params() > 0


def test_llama_1b_config_has_the_issue_shape() -> None:
    c = load_config(Path(__file__).resolve().parents[1] / "configs/llama-1b.toml")
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads) == (2048, 16, 32, 8)
    assert (c.intermediate_size, c.vocab_size, c.tie_embeddings) == (8192, 128256, True)
    # 2.47 GB of bf16 weights: the roofline in DESIGN.md
    assert abs(c.num_params() * 2 / 1e9 - 2.47) < 0.01


def write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = "vocab_size = 64\nhidden_size = 32\nnum_layers = 1\nnum_heads = 4\n" \
       "num_kv_heads = 2\nintermediate_size = 48\n"


@pytest.mark.parametrize("text, message", [
    (BASE.replace("num_heads = 4", "num_heads = 5"), "divisible by num_heads"),
    (BASE.replace("num_kv_heads = 2", "num_kv_heads = 3"), "multiple of num_kv_heads"),
    (BASE.replace("vocab_size = 64", "vocab_size = -3"), "vocab_size: expected a positive"),
    (BASE.replace("vocab_size = 64", 'vocab_size = "big"'), "vocab_size: expected a positive"),
    (BASE + "colour = 3\n", "unknown key"),
    (BASE.replace("intermediate_size = 48\n", ""), "missing required key"),
    (BASE + "[rope_scaling]\nrope_type = \"yarn\"\n", "rope_type"),
    (BASE + "head_dim = 7\n", "even head_dim"),
    ("vocab_size = = 3", "not valid TOML"),
])
def test_bad_toml_config_names_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_malformed_json_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(write(tmp_path, "{nope", "config.json"))


def test_hf_config_old_and_new_rope_keys_agree() -> None:
    common = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=96)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    old = config_from_hf(dict(common, rope_theta=5e5, rope_scaling=scaling))
    new = config_from_hf(dict(common, rope_parameters=dict(scaling, rope_theta=5e5)))
    assert old == new
    assert old.rope_theta == 5e5 and old.rope_scaling is not None
    assert config_from_hf(config_to_hf(old)) == old


def test_hf_config_with_unsupported_features_is_rejected() -> None:
    base = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=96)
    with pytest.raises(ConfigError, match="attention_bias"):
        config_from_hf(dict(base, attention_bias=True))
    with pytest.raises(ConfigError, match="hidden_act"):
        config_from_hf(dict(base, hidden_act="gelu"))
    with pytest.raises(ConfigError, match="missing required key"):
        config_from_hf({"vocab_size": 3})


def test_group_size_covers_mha_gqa_mqa() -> None:
    kw = dict(vocab_size=10, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=8)
    assert [ModelConfig(num_kv_heads=h, **kw).group_size for h in (4, 2, 1)] == [1, 2, 4]


def test_kv_bytes_per_token_counts_k_and_v_in_every_layer() -> None:
    c = ModelConfig(vocab_size=10, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                    intermediate_size=8)
    assert c.kv_bytes_per_token(2) == 2 * 3 * 2 * 8 * 2
    assert json.dumps(c.to_dict())  # serialisable
