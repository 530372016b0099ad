"""engine/forward.py's fuse_rows / layer_weights: one product for q/k/v and one for gate/up (the
model's own weights become views of them), same model otherwise."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import engine_logits

from toyllm.engine.cpu_layout import store_weights_input_major
from toyllm.engine.forward import EngineForward, fuse_rows, layer_weights
from toyllm.engine.settings import Fusion, Settings
from toyllm.models.config import ModelConfig
from toyllm.models.llama import build_model

CONFIG = ModelConfig(vocab_size=200, hidden_size=96, num_layers=2, num_heads=6, num_kv_heads=2,
                     intermediate_size=128, max_seq_len=64)


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.mark.parametrize("input_major", [False, True])
def test_fused_model_computes_the_same_logits_and_state(input_major: bool) -> None:
    model = build_model(CONFIG, seed=4)
    if input_major:
        store_weights_input_major(model)
    tokens = torch.randint(0, 200, (2, 11))
    positions = torch.arange(11).expand(2, 11)
    ref = model(tokens, positions)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    weights = layer_weights(model)
    assert len(weights) == CONFIG.num_layers
    attn = model.layers[0].self_attn
    qkv = weights[0].qkv
    assert qkv.shape == (96 + 2 * 32, 96)
    assert weights[0].gate_up.shape == (2 * 128, 96)
    assert _shares_storage(attn.k_proj.weight, qkv)  # a view, not a copy
    assert _shares_storage(model.layers[0].mlp.up_proj.weight, weights[0].gate_up)
    assert torch.equal(qkv[96:128], attn.k_proj.weight)
    if input_major:  # the storage order is kept: an input-major matrix
        assert qkv.stride() == (1, qkv.shape[0])
    else:
        assert qkv.is_contiguous()
    # the model's own forward on the views, and the engine's on the fused products
    assert rel(model(tokens, positions), ref) <= 1e-6
    assert rel(engine_logits(model, tokens, positions, Settings(fusion=Fusion.NONE)), ref) <= 1e-6
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_fusing_twice_keeps_the_values_and_moving_the_model_unfuses() -> None:
    model = build_model(CONFIG, seed=4)
    mlp = model.layers[1].mlp
    fused = layer_weights(model)[1].gate_up
    again = fuse_rows([mlp.gate_proj, mlp.up_proj])
    assert torch.equal(again, fused)  # the same matrix (a new one: the views follow it)
    assert _shares_storage(mlp.up_proj.weight, again)
    model = model.to(torch.float64)
    assert not _shares_storage(mlp.up_proj.weight, again)  # moved: no longer the fused views
    assert model.layers[1].mlp.up_proj.weight.dtype == torch.float64
    assert fused.dtype == torch.float32  # what an EngineForward built before the move holds


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_a_second_engine_on_a_fused_cpu_model_keeps_the_weights_shared() -> None:
    from toyllm.engine.generate import Engine

    model = build_model(CONFIG, seed=4)
    first = Engine(model)
    attn = model.layers[0].self_attn
    assert _shares_storage(attn.q_proj.weight, first.forward.layers[0].qkv)
    second = Engine(model)
    qkv = second.forward.layers[0].qkv
    assert attn.q_proj.weight.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    assert attn.q_proj.weight.data_ptr() == qkv.data_ptr()  # q's rows come first
    assert torch.equal(qkv, first.forward.layers[0].qkv)


def test_engine_forward_holds_views_of_the_models_weights() -> None:
    model = build_model(CONFIG, seed=4)
    forward = EngineForward(model, Settings())
    layer, w = model.layers[1], forward.layers[1]
    assert w.input_norm is layer.input_layernorm.weight
    assert w.post_norm is layer.post_attention_layernorm.weight
    assert w.o is layer.self_attn.o_proj.weight and w.down is layer.mlp.down_proj.weight
    assert _shares_storage(layer.self_attn.v_proj.weight, w.qkv)
    assert _shares_storage(layer.mlp.gate_proj.weight, w.gate_up)
