"""Small tokenizers built in memory for the tests: a byte-level BPE (GPT-2 style, as SmolLM2 and
Llama 3 ship) with ChatML special tokens, written out as a Hugging Face checkpoint's tokenizer
files. Training takes ~0.05 s; nothing is downloaded."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

MULTIBYTE_TEXT = "café → 😀 naïve über straße, 日本語\n\tdef f():  \n\n    return '€'\n"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# SmolLM2-Instruct's template, with a raise_exception branch added
CHATML_TEMPLATE = (
    "{% if messages[0]['role'] == 'tool' %}{{ raise_exception('tool messages are not supported')"
    " }}{% endif %}"
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_byte_level_bpe(vocab_size: int = 400) -> Tokenizer:
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text(encoding="utf-8")
    lines = [line for line in text.split("\n") if line.strip()] + [MULTIBYTE_TEXT] * 3
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer)
    return tok


def write_tokenizer_dir(
    directory: Path,
    tok: Tokenizer,
    template: str | None = CHATML_TEMPLATE,
    template_file: bool = False,
    eos_ids: list[int] | None = None,
    add_bos_token: bool | None = None,
) -> Path:
    """tokenizer.json + tokenizer_config.json (+ chat_template.jinja, generation_config.json)."""
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config: dict = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False,
                      "normalized": False, "rstrip": False, "single_word": False, "special": True},
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 2048,
    }
    if add_bos_token is not None:
        config["add_bos_token"] = add_bos_token
    if template is not None and not template_file:
        config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    if template is not None and template_file:
        (directory / "chat_template.jinja").write_text(template)
    if eos_ids is not None:
        (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}))
    return directory
