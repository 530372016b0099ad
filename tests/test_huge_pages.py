"""engine/huge_pages.py: huge pages under the CPU decode step's weights, in place."""

from __future__ import annotations

import torch

from toyllm.engine import huge_pages
from toyllm.engine.generate import Engine
from toyllm.engine.sampling import SamplingParams
from toyllm.models.config import ModelConfig
from toyllm.models.llama import build_model

HUGE = 2 << 20


def test_spans_cover_the_tensors_and_merge():
    a, b = torch.randn(3 << 20), torch.randn(5)
    got = huge_pages.spans([a, b, a[1:]])
    for t in (a, b):
        start, end = t.data_ptr(), t.data_ptr() + t.numel() * 4
        assert any(s <= start and end <= e for s, e in got)
    assert all(s % HUGE == 0 and e % HUGE == 0 and s < e for s, e in got)
    assert all(e1 < s2 for (_, e1), (s2, _) in zip(got, got[1:], strict=False))  # merged, sorted
    assert huge_pages.spans([torch.empty(0)]) == []


def test_advise_keeps_every_value_and_address():
    ts = [torch.randn(1 << 20), torch.randn(300, 7), torch.arange(10.0)]
    before = [(t.data_ptr(), t.clone()) for t in ts]
    assert huge_pages.advise(ts) >= 0
    for t, (ptr, copy) in zip(ts, before, strict=True):
        assert t.data_ptr() == ptr and torch.equal(t, copy)


def test_the_engine_advises_the_step_weights_and_still_decodes(monkeypatch):
    seen: list[int] = []
    real = huge_pages.advise
    monkeypatch.setattr(huge_pages, "advise", lambda ts: seen.append(len(list(ts))) or 0)
    config = ModelConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=8, intermediate_size=24, max_seq_len=32)
    model = build_model(config, seed=0)
    engine = Engine(model, cuda_graph=False)
    assert seen == [6 * 2 + 4]  # six weights a layer, the embedding, norm, head, inv_freq
    monkeypatch.setattr(huge_pages, "advise", real)
    assert real(engine.forward._step_weights) >= 0
    params = SamplingParams(max_new_tokens=4, temperature=0.0, stop_at_eos=False)
    assert len(engine.generate([[1, 2, 3]], params).completions[0].token_ids) == 4
