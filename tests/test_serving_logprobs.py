"""Log-probabilities of the serving engine (SamplingParams.logprobs): each sampled token's is the
log_softmax of the no-cache reference's logits at its position (fp32, 1e-4), with the most likely
alternatives in order; asking for them changes no token of that request or of its neighbours."""

from __future__ import annotations

import pytest
import torch

from toyllm.engine.check.reference import reference_logits
from toyllm.engine.sampling import MAX_LOGPROBS, SamplingError, SamplingParams
from toyllm.engine.serving import ServingEngine
from toyllm.models.config import ModelConfig
from toyllm.models.llama import build_model

CONFIG = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=96, max_seq_len=64)
PROMPTS = [[1, 5, 9, 17, 33], [1, 7, 7, 2, 40, 41, 42]]


def _run(model, params: list[SamplingParams]) -> dict[str, object]:
    engine = ServingEngine(model, None, block_size=4, kv_memory=2**20, cuda_graph=False)
    ids = [engine.add_request(p, sp) for p, sp in zip(PROMPTS, params, strict=True)]
    outs: dict[str, list] = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            outs[out.request_id].append(out)
    return {i: outs[i] for i in ids}


def test_logprobs_are_the_references_and_change_no_token() -> None:
    model = build_model(CONFIG, seed=4)
    sampled = SamplingParams(max_new_tokens=10, temperature=0.9, seed=11, logprobs=5,
                             stop_at_eos=False)
    greedy = SamplingParams(max_new_tokens=10, stop_at_eos=False)
    with_lp = list(_run(model, [sampled, greedy]).values())
    plain = _run(model, [SamplingParams(max_new_tokens=10, temperature=0.9, seed=11,
                                        stop_at_eos=False), greedy])
    plain = list(plain.values())
    for a, b in zip(with_lp, plain, strict=True):  # the same tokens with or without
        assert [t for o in a for t in o.new_token_ids] == [t for o in b for t in o.new_token_ids]
    assert all(o.logprobs is None for o in with_lp[1])
    tokens = [t for o in with_lp[0] for t in o.new_token_ids]
    lps = [lp for o in with_lp[0] for lp in o.logprobs]
    assert [lp.token_id for lp in lps] == tokens and len(tokens) == 10
    ref = torch.log_softmax(reference_logits(model, PROMPTS[0] + tokens).float(), dim=-1)
    for k, (tok, lp) in enumerate(zip(tokens, lps, strict=True)):
        row = ref[len(PROMPTS[0]) - 1 + k]  # the logits the token was sampled from
        assert abs(lp.logprob - row[tok].item()) <= 1e-4
        top_values, top_ids = row.topk(5)
        assert [i for i, _ in lp.top] == top_ids.tolist()
        assert max(abs(v - r) for (_, v), r in zip(lp.top, top_values.tolist(),
                                                    strict=True)) <= 1e-4


@pytest.mark.parametrize("bad", [-1, MAX_LOGPROBS + 1, True, 2.0])
def test_logprobs_out_of_range_is_refused(bad: object) -> None:
    with pytest.raises(SamplingError, match="logprobs"):
        SamplingParams(logprobs=bad)  # type: ignore[arg-type]
