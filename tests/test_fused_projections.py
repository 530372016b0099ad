"""fuse_projections: one product for q/k/v and one for gate/up, same model otherwise."""

from __future__ import annotations

import pytest
import torch

from toyllm.engine.cpu_layout import store_weights_input_major
from toyllm.models.config import ModelConfig
from toyllm.models.llama import build_model

CONFIG = ModelConfig(vocab_size=200, hidden_size=96, num_layers=2, num_heads=6, num_kv_heads=2,
                     intermediate_size=128, max_seq_len=64)


@pytest.mark.parametrize("input_major", [False, True])
def test_fused_model_computes_the_same_logits_and_state(input_major: bool) -> None:
    model = build_model(CONFIG, seed=4)
    if input_major:
        store_weights_input_major(model)
    tokens = torch.randint(0, 200, (2, 11))
    positions = torch.arange(11).expand(2, 11)
    ref = model(tokens, positions)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.fuse_projections()
    attn = model.layers[0].self_attn
    assert attn.qkv_weight is not None and attn.qkv_weight.shape == (96 + 2 * 32, 96)
    assert attn.k_proj.weight.untyped_storage().data_ptr() == \
        attn.qkv_weight.untyped_storage().data_ptr()  # a view, not a copy
    assert rel(model(tokens, positions), ref) <= 1e-6
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_fusing_twice_is_a_no_op_and_moving_the_model_unfuses() -> None:
    model = build_model(CONFIG, seed=4).fuse_projections()
    fused = model.layers[1].mlp.gate_up_weight
    assert model.fuse_projections().layers[1].mlp.gate_up_weight is fused
    model = model.to(torch.float64)
    assert model.layers[1].mlp.gate_up_weight is None
    assert model.layers[1].mlp.up_proj.weight.dtype == torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_a_second_engine_on_a_fused_cpu_model_keeps_the_weights_shared() -> None:
    from toyllm.engine.generate import Engine

    model = build_model(CONFIG, seed=4)
    Engine(model)
    attn = model.layers[0].self_attn
    ptrs = (attn.qkv_weight.data_ptr(), attn.q_proj.weight.data_ptr())
    Engine(model)  # relayout and fusion are both no-ops now
    assert (attn.qkv_weight.data_ptr(), attn.q_proj.weight.data_ptr()) == ptrs
    assert attn.q_proj.weight.untyped_storage().data_ptr() == \
        attn.qkv_weight.untyped_storage().data_ptr()
