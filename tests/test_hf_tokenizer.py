"""models/hf_tokenizer.py, tokenizer_files.py, chat_template.py: a tokenizer.json checkpoint
encodes, decodes and renders its chat template exactly as transformers does (the witness:
transformers' AutoTokenizer over the same files); EOS lists from generation_config; streaming
never prints half a UTF-8 character; bad files fail with one clear ValueError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizer_fixtures import (
    CHATML_TEMPLATE,
    MULTIBYTE_TEXT,
    train_byte_level_bpe,
    write_tokenizer_dir,
)

from toyllm.models.chat_template import (
    ChatTemplateError,
    chat_prompt_ids,
    chat_prompt_text,
    render_chat,
)
from toyllm.models.hf_tokenizer import HFTokenizer
from toyllm.models.tokenizer import StreamDecoder, TokenizerError
from toyllm.models.tokenizer_files import find_tokenizer, load_tokenizer, read_tokenizer_files

transformers = pytest.importorskip("transformers")

TEXTS = ["Hello world", MULTIBYTE_TEXT, "  leading spaces\nand <|im_start|> inside", "x"]
CHAT = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris → café 😀"},
    {"role": "user", "content": "And of Japan?"},
]


@pytest.fixture(scope="module")
def bpe():
    return train_byte_level_bpe()


@pytest.fixture(scope="module")
def tok_dir(bpe, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer_dir(tmp_path_factory.mktemp("ckpt"), bpe, eos_ids=[2, 0])


@pytest.fixture(scope="module")
def witness(tok_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def test_directory_loads_tokenizer_json_first(tok_dir: Path, tmp_path: Path) -> None:
    (tok_dir / "tokenizer.model").write_bytes(b"not read")  # tokenizer.json wins
    try:
        assert isinstance(find_tokenizer(tok_dir), HFTokenizer)
    finally:
        (tok_dir / "tokenizer.model").unlink()
    assert find_tokenizer(tmp_path) is None


def test_encode_decode_equal_transformers(tok_dir: Path, witness) -> None:
    tok = load_tokenizer(tok_dir)
    for text in TEXTS:
        assert tok.encode(text) == witness.encode(text), text
        assert tok.encode(text, bos=False) == witness.encode(text, add_special_tokens=False)
        ids = witness.encode(text)
        assert tok.decode(ids) == witness.decode(ids, skip_special_tokens=True)
    assert tok.vocab_size == len(witness)


def test_add_bos_token_from_tokenizer_config_puts_bos_first(bpe, tmp_path: Path) -> None:
    tok = load_tokenizer(write_tokenizer_dir(tmp_path, bpe, add_bos_token=True))
    assert tok.bos_id == 1
    assert tok.encode("Hello")[0] == 1 and tok.encode("Hello", bos=False)[0] != 1


def test_eos_ids_are_eos_token_then_generation_config_list(tok_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    assert tok.eos_id == 2 and tok.eos_ids == (2, 0)
    assert tok.special_tokens()["bos_token"] == "<|im_start|>"


def test_stream_never_emits_half_a_utf8_character(tok_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    ids = tok.encode(MULTIBYTE_TEXT * 2, bos=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the text does split characters
    decoder = StreamDecoder(tok)
    pieces = [decoder.feed(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + decoder.flush() == tok.decode(ids) == MULTIBYTE_TEXT * 2


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_renders_as_transformers(tok_dir: Path, witness, generation_prompt) -> None:
    tok = load_tokenizer(tok_dir)
    text = chat_prompt_text(tok, CHAT, generation_prompt)
    assert text == witness.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=generation_prompt
    )
    expected = witness.apply_chat_template(
        CHAT, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False
    )
    assert chat_prompt_ids(tok, CHAT, generation_prompt) == list(expected)


def test_template_sees_special_tokens_and_tojson(tok_dir: Path, witness) -> None:
    template = ("{{ bos_token }}{% for m in messages %}{{ m | tojson }}{{ eos_token }}{% endfor %}"
                "{% if add_generation_prompt %}>{% endif %}")
    tok = load_tokenizer(tok_dir)
    ours = render_chat(template, CHAT, True, tok.special_tokens())
    assert ours == witness.apply_chat_template(
        CHAT, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    assert ours.startswith("<|im_start|>{") and "😀" in ours


def test_chat_template_jinja_file_wins_over_tokenizer_config(bpe, tmp_path: Path) -> None:
    d = write_tokenizer_dir(tmp_path, bpe, template="{{ 'from config' }}")
    (d / "chat_template.jinja").write_text("{{ 'from file' }}")
    assert read_tokenizer_files(d).chat_template == "{{ 'from file' }}"


def test_template_that_raises_is_one_clear_error(tok_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    with pytest.raises(ChatTemplateError, match="tool messages are not supported"):
        chat_prompt_ids(tok, [{"role": "tool", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="does not parse"):
        render_chat("{% for %}", CHAT)


def test_template_sandbox_blocks_attribute_escape() -> None:
    with pytest.raises(ChatTemplateError):
        render_chat("{{ messages.__class__.__mro__[1].__subclasses__() }}", CHAT)


def test_model_without_template_gets_a_clear_error(bpe, tmp_path: Path) -> None:
    tok = load_tokenizer(write_tokenizer_dir(tmp_path, bpe, template=None))
    with pytest.raises(ChatTemplateError, match="no chat template"):
        chat_prompt_ids(tok, CHAT)


def test_bad_tokenizer_files_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "nope"}}')
    with pytest.raises(TokenizerError, match="not a tokenizer.json") as info:
        load_tokenizer(tmp_path)
    assert "\n" not in str(info.value)
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(TokenizerError, match="not a tokenizer.json"):
        load_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(TokenizerError, match="expected a JSON object"):
        read_tokenizer_files(tmp_path)
    with pytest.raises(TokenizerError, match="no tokenizer found"):
        load_tokenizer(tmp_path / "..")
    with pytest.raises(TokenizerError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "missing.json")


def test_chat_template_list_form_uses_default(bpe, tmp_path: Path) -> None:
    d = write_tokenizer_dir(tmp_path, bpe, template=None)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "t"},
                               {"name": "default", "template": CHATML_TEMPLATE}]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    assert read_tokenizer_files(d).chat_template == CHATML_TEMPLATE


def test_post_processor_bos_as_transformers(bpe, tmp_path: Path) -> None:
    """Llama 3's tokenizer.json adds <|begin_of_text|> through a TemplateProcessing
    post-processor and tokenizer_config says nothing: encode follows the post-processor."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_str(bpe.to_str())
    tok.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    d = write_tokenizer_dir(tmp_path, tok)
    witness = transformers.AutoTokenizer.from_pretrained(str(d))
    ours = load_tokenizer(d)
    for text in TEXTS:
        assert ours.encode(text) == witness.encode(text) and ours.encode(text)[0] == 1
        assert ours.encode(text, bos=False) == witness.encode(text, add_special_tokens=False)


def test_tokenizer_larger_than_the_embedding_is_one_line(bpe, tmp_path: Path) -> None:
    import torch
    from typer.testing import CliRunner

    from toyllm.engine.cli import app
    from toyllm.models.checkpoint import save_checkpoint
    from toyllm.models.config import ModelConfig
    from toyllm.models.llama import build_model

    config = ModelConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2,
                         num_kv_heads=1, intermediate_size=48, max_seq_len=32)
    save_checkpoint(build_model(config), tmp_path, dtype=torch.float32)
    write_tokenizer_dir(tmp_path, bpe)
    r = CliRunner().invoke(app, ["generate", "hi", "--model", str(tmp_path), "--device", "cpu"])
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert "400" in r.output and "300" in r.output
