"""toyllm loads checkpoints written by transformers and matches LlamaForCausalLM's logits."""

from __future__ import annotations

import pytest
import torch

from toyllm.models.checkpoint import load_checkpoint, save_checkpoint

transformers = pytest.importorskip("transformers")

HF_CASES = {
    # GQA with 3 query heads per KV head, untied head
    "gqa3": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                 tie_word_embeddings=False),
    "mqa": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                tie_word_embeddings=False),
    "tied": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                 tie_word_embeddings=True),
    "llama3_rope": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                        tie_word_embeddings=True, rope_theta=500000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 32}),
}


def make_hf_model(case: str, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=300, intermediate_size=160, num_hidden_layers=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, **HF_CASES[case],
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 so a missing norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_logits_match_transformers_fp32(case: str, tmp_path) -> None:
    hf = make_hf_model(case)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model, config = load_checkpoint(tmp_path)
    assert config.tie_embeddings == hf.config.tie_word_embeddings
    tokens = torch.randint(0, 300, (2, 70), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(70).expand(2, 70)
    with torch.no_grad():
        ours = model(tokens, positions)
        theirs = hf(tokens).logits
    assert rel_err(ours, theirs) <= 1e-5


@pytest.mark.parametrize("case", ["gqa3", "tied"])
def test_saved_checkpoint_loads_in_transformers_with_same_logits(case: str, tmp_path) -> None:
    hf = make_hf_model(case)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model, _ = load_checkpoint(tmp_path / "hf")
    save_checkpoint(model, tmp_path / "ours", dtype=torch.float32, max_shard_bytes=40_000)
    assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()  # really sharded
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    tokens = torch.randint(0, 300, (1, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(back(tokens).logits, hf(tokens).logits) <= 1e-6
