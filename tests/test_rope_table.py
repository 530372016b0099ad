"""models/rope.py's rope_table and gather_cos_sin, and the decode step that takes its RoPE
cos/sin from the table (engine/cached_attention.py's DecodeStep.rope_cos_sin, built by
engine/generate.py on CUDA, read by engine/forward.py's EngineForward): the same values as
rope_cos_sin of the step's positions, so the same logits."""

from __future__ import annotations

import pytest
import torch

from toyllm.engine.cached_attention import DecodeStep, PrefillStep
from toyllm.engine.generate import Engine
from toyllm.engine.settings import Settings
from toyllm.models.config import ModelConfig, RopeScaling
from toyllm.models.llama import build_model
from toyllm.models.rope import gather_cos_sin, inverse_frequencies, rope_cos_sin, rope_table

CONFIGS = [
    ModelConfig(vocab_size=64, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                intermediate_size=96, max_seq_len=512),
    ModelConfig(vocab_size=64, hidden_size=256, num_layers=1, num_heads=2, num_kv_heads=1,
                intermediate_size=96, max_seq_len=512, rope_theta=500000.0,
                rope_scaling=RopeScaling(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                         high_freq_factor=4.0,
                                         original_max_position_embeddings=64)),
]


def _check_table(config: ModelConfig, dtype: torch.dtype, device: str, exact: bool) -> None:
    inv_freq = inverse_frequencies(config).to(device)
    table = rope_table(inv_freq, 512, dtype)
    assert table.shape == (512, 2, config.head_dim) and table.dtype == dtype
    index = torch.tensor([0, 1, 7, 300, 511, 7], device=device, dtype=torch.int32)
    cos, sin = gather_cos_sin(table, index)
    assert cos.shape == sin.shape == (6, 1, 1, config.head_dim)
    assert cos.stride(-1) == 1 and sin.stride(-1) == 1  # what the RoPE kernels need
    want_cos, want_sin = rope_cos_sin(inv_freq, index.long().unsqueeze(1), dtype)
    if exact:
        assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    else:  # the CPU's vectorised and scalar cos may round an element differently
        torch.testing.assert_close(cos, want_cos)
        torch.testing.assert_close(sin, want_sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=["plain", "llama3"])
def test_rope_table_on_the_cpu_gives_rope_cos_sin(config, dtype) -> None:
    _check_table(config, dtype, "cpu", exact=False)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=["plain", "llama3"])
def test_rope_table_on_cuda_has_the_bits_of_rope_cos_sin(config, dtype) -> None:
    _check_table(config, dtype, "cuda", exact=True)


def test_decode_step_without_a_table_leaves_cos_sin_to_the_forward() -> None:
    step = DecodeStep([], [], torch.tensor([3, -1], dtype=torch.int32))
    assert step.rope_cos_sin() is None
    table = rope_table(inverse_frequencies(CONFIGS[0]), 8, torch.float32)
    step = DecodeStep([], [], torch.tensor([3, -1, 9], dtype=torch.int32), rope_table=table)
    cos, sin = step.rope_cos_sin()  # finished rows (-1) at 0; past the table clamped to its end
    assert torch.equal(cos[:, 0, 0], table[[3, 0, 7], 0])
    assert torch.equal(sin[:, 0, 0], table[[3, 0, 7], 1])


def test_engine_makes_no_table_on_the_cpu() -> None:
    model = build_model(CONFIGS[0], seed=1)
    engine = Engine(model, tokenizer=None, cuda_graph=False)
    assert engine._rope_table_for(64) is None


def test_engine_forward_takes_cos_sin_from_the_steps_table_on_the_cpu() -> None:
    model = build_model(CONFIGS[1], seed=2)
    engine = Engine(model, tokenizer=None, cuda_graph=False, settings=Settings())
    cache = engine.prepare_cache(2, 64)
    with torch.inference_mode():
        engine.prefill(cache, 0, [1, 2, 3, 4, 5])
        engine.prefill(cache, 1, [6, 7])
        ks, vs, positions = engine.cache_views(2)
        tokens = torch.tensor([[9], [10]])
        computed = engine.decode_forward(tokens, positions, ks, vs)  # no table on the CPU
        engine._rope_table_for = lambda n: rope_table(model.inv_freq, n, model.dtype)
        with_table = engine.decode_forward(tokens, positions, ks, vs)
        # the CPU's vectorised and scalar cos may round an element differently
        torch.testing.assert_close(with_table, computed)
        # no table either: a decode step's own positions give cos/sin, the same values
        own = engine.forward(tokens, None, DecodeStep(ks, vs, positions))[:, -1]
        assert torch.equal(own, computed)
        with pytest.raises(ValueError, match=r"expected positions \[B, T\]"):
            engine.forward(tokens, None, PrefillStep(engine.cache, 5, seq=0))  # none at all


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_engine_decode_with_the_table_has_the_logits_of_computed_cos_sin(dtype) -> None:
    model = build_model(CONFIGS[1], seed=2, device="cuda", dtype=dtype)
    engine = Engine(model, tokenizer=None, cuda_graph=False)
    cache = engine.prepare_cache(2, 64)
    with torch.inference_mode():
        engine.prefill(cache, 0, [1, 2, 3, 4, 5])
        engine.prefill(cache, 1, [6, 7])
        ks, vs, positions = engine.cache_views(2)
        tokens = torch.tensor([[9], [10]], device="cuda")
        with_table = engine.decode_forward(tokens, positions, ks, vs)
        assert engine._rope_table is not None and engine._rope_table.shape[0] >= 64
        engine._rope_table_for = lambda n: None  # the step computes cos/sin from positions
        computed = engine.decode_forward(tokens, positions, ks, vs)
    assert torch.equal(with_table, computed)
