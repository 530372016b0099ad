"""Input-major weight storage keeps values, shapes, ties, checkpoints and logits unchanged (the
model's and the engine's); an Engine takes it where MKL does the CPU products."""

from __future__ import annotations

import torch
from engine_helpers import engine_logits

from toyllm.engine.cpu_layout import store_weights_input_major
from toyllm.engine.generate import Engine
from toyllm.engine.settings import Settings
from toyllm.models.checkpoint import load_checkpoint, save_checkpoint
from toyllm.models.config import ModelConfig
from toyllm.models.llama import build_model

CONFIG = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=96, max_seq_len=64, tie_embeddings=True)


def test_relayout_keeps_values_shapes_and_tied_head(tmp_path) -> None:
    model = build_model(CONFIG, seed=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens = torch.randint(0, 300, (2, 9))
    positions = torch.arange(9).expand(2, 9)
    ref = model(tokens, positions)
    store_weights_input_major(model)
    assert model.lm_head.weight is model.embed_tokens.weight
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.shape == before[n].shape
        if p.dim() == 2:  # a view of an [in, out] contiguous tensor
            assert p.stride() == (1, p.shape[0]), n
    assert (model(tokens, positions) - ref).abs().max().item() <= 1e-5
    with torch.no_grad():  # the engine's products on the input-major storage: MKL and the GEMV
        for cpu_gemv in (False, True):
            settings = Settings(cpu_gemv=cpu_gemv)
            got = engine_logits(model, tokens, positions, settings)
            assert (got - ref).abs().max().item() <= 1e-5
            one = engine_logits(model, tokens[:1, :1], positions[:1, :1], settings)  # one row
            assert (one - ref[:1, :1]).abs().max().item() <= 1e-5
    save_checkpoint(model, tmp_path / "c", dtype=torch.float32)
    loaded, _ = load_checkpoint(tmp_path / "c")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                   model.state_dict().values(), strict=True))


def test_relayout_twice_is_a_no_op() -> None:
    model = store_weights_input_major(build_model(CONFIG, seed=2))
    ptrs = [p.data_ptr() for p in model.parameters()]
    store_weights_input_major(model)
    assert ptrs == [p.data_ptr() for p in model.parameters()]


def test_engine_stores_input_major_only_for_mkl() -> None:
    mkl = build_model(CONFIG, seed=2)
    Engine(mkl, settings=Settings(cpu_gemv=False))
    gemv = build_model(CONFIG, seed=2)
    Engine(gemv, settings=Settings(cpu_gemv=True))  # the GEMV streams [out, in] fastest
    for a, b in zip(mkl.layers[1].modules(), gemv.layers[1].modules(), strict=True):
        if isinstance(a, torch.nn.Linear):
            assert a.weight.stride(0) == 1 and b.weight.stride(1) == 1
            assert torch.equal(a.weight, b.weight)
    assert mkl.lm_head.weight.stride() == (1, CONFIG.vocab_size)
