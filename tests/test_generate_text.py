"""Text generation: streaming equals the final text, stop strings cut it cleanly."""

from __future__ import annotations

import pytest

from toyllm.engine.generate import Engine
from toyllm.engine.sampling import SamplingParams
from toyllm.models.config import ModelConfig
from toyllm.models.llama import build_model
from toyllm.models.model_source import DEFAULT_MODEL_DIR
from toyllm.models.tokenizer import Tokenizer

TOKENIZER = DEFAULT_MODEL_DIR / "tokenizer.model"
pytestmark = pytest.mark.skipif(not TOKENIZER.is_file(), reason="default tokenizer not built")


@pytest.fixture(scope="module")
def engine() -> Engine:
    tok = Tokenizer.from_file(TOKENIZER)
    config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, intermediate_size=96, max_seq_len=256)
    model = build_model(config, seed=5)
    return Engine(model, tok)


PROMPTS = ["def main():\n    ", "import os\n", "# é → 😀 unicode\nclass A:"]


def test_streamed_pieces_concatenate_to_the_final_text(engine: Engine) -> None:
    pieces: dict[int, list[str]] = {0: [], 1: [], 2: []}
    params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=3, stop_at_eos=False)
    result = engine.generate(PROMPTS, params, on_text=lambda i, p: pieces[i].append(p))
    for c in result.completions:
        assert "".join(pieces[c.index]) == c.text
        assert c.text == engine.tokenizer.decode(c.token_ids)
        assert "\ufffd" not in "".join(pieces[c.index][:-1]) or "\ufffd" in c.text


def test_stop_string_cuts_the_text_before_it_and_streams_nothing_past_it(engine: Engine) -> None:
    free = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=40, temperature=1.0,
                                                         seed=11, stop_at_eos=False))
    text = free.completions[0].text
    stop = text[12:15]
    assert stop and stop in text
    cut = text.index(stop)
    streamed: list[str] = []
    params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=11, stop_at_eos=False,
                            stop=("\x00never", stop))
    result = engine.generate([PROMPTS[0]], params, on_text=lambda _, p: streamed.append(p))
    c = result.completions[0]
    assert c.finish_reason == "stop"
    assert c.text == text[:cut]
    assert "".join(streamed) == text[:cut]


def test_stats_count_prefill_and_decode_tokens(engine: Engine) -> None:
    params = SamplingParams(max_new_tokens=10, stop_at_eos=False)
    result = engine.generate(PROMPTS[:2], params)
    st = result.stats
    assert st.prefill_tokens == sum(c.prompt_tokens for c in result.completions)
    assert st.decode_tokens == sum(c.completion_tokens for c in result.completions) - 2
    assert st.cache_bytes == engine.cache.bytes_allocated() > 0
    assert st.prefill_ms > 0 and st.decode_tok_per_s > 0
