"""models/gguf_file.py and gguf_tokenizer.py on tiny GGUF files written here with the `gguf`
package's GGUFWriter, from a random toyllm model with Q/K permuted as llama.cpp's converter
does: the loaded model's logits equal the safetensors load of the same weights (F32 exactly;
F16/BF16/Q8_0/Q4_0 equal gguf's own quantise-dequantise round trip of those weights); the GGUF's
tokenizer equals transformers' GGUF tokenizer; bad files fail with one line naming the problem."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from tokenizer_fixtures import CHATML_TEMPLATE, MULTIBYTE_TEXT, train_byte_level_bpe
from typer.testing import CliRunner

from toyllm.engine.cli import app
from toyllm.models.checkpoint import load_checkpoint, save_checkpoint
from toyllm.models.config import ModelConfig
from toyllm.models.gguf_file import GGUFError, load_gguf, permute_for_gguf
from toyllm.models.llama import Transformer, build_model
from toyllm.models.model_source import ModelSourceError, load_model

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
CONFIG = ModelConfig(vocab_size=400, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=96, max_seq_len=128, rope_theta=50000.0, norm_eps=1e-6,
                     bos_id=1, eos_id=2)
GGUF_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
TOKENS_TEXT = ["Hello world", MULTIBYTE_TEXT, "<|im_start|>user\nHi<|im_end|>"]


def gguf_name(name: str) -> str:
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        return f"blk.{i}.{GGUF_NAMES[rest.removesuffix('.weight')]}.weight"
    return {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[name]


def write_gguf(path: Path, model: Transformer, bpe, qtype=Q.F32, arch: str = "llama",
               ffn: int | None = None, tokenizer_model: str = "gpt2",
               rope_freqs: np.ndarray | None = None) -> Path:
    """A llama.cpp-style file: metadata, byte-level BPE vocabulary, Q/K permuted."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_layers)
    w.add_feed_forward_length(ffn or c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    if isinstance(bpe, spm.SentencePieceProcessor):  # llama.cpp's "llama" vocabulary
        sp = bpe
        w.add_tokenizer_model("llama")
        w.add_token_list([sp.id_to_piece(i) for i in range(sp.vocab_size())])
        w.add_token_scores([sp.get_score(i) for i in range(sp.vocab_size())])
        w.add_token_types([2 if sp.is_unknown(i) else 3 if sp.is_control(i) else
                           6 if sp.is_byte(i) else 1 for i in range(sp.vocab_size())])
        w.add_unk_token_id(sp.unk_id())
        w.add_add_bos_token(True)
    else:  # "gpt2": byte-level BPE
        data = json.loads(bpe.to_str())
        vocab = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
        merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
        specials = {t["content"] for t in data["added_tokens"]}
        w.add_tokenizer_model(tokenizer_model)
        w.add_tokenizer_pre("smollm")
        w.add_token_list([t for t, _ in vocab])
        w.add_token_merges(merges)
        w.add_token_types([3 if t in specials else 1 for t, _ in vocab])
        w.add_add_bos_token(False)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHATML_TEMPLATE)
    for name, p in model.named_parameters():
        a = p.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            a = permute_for_gguf(a, c.num_heads)
        elif name.endswith("k_proj.weight"):
            a = permute_for_gguf(a, c.num_kv_heads)
        if a.ndim == 1 or qtype == Q.F32:
            w.add_tensor(gguf_name(name), a.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(gguf_name(name), a.astype(np.float16))
        else:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def bpe():
    return train_byte_level_bpe()


@pytest.fixture(scope="module")
def model() -> Transformer:
    return build_model(CONFIG, seed=7)


@pytest.fixture(scope="module")
def f32_file(tmp_path_factory, model, bpe) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model, bpe)


def logits(m: Transformer, ids: list[int]) -> torch.Tensor:
    tokens = torch.tensor([ids])
    with torch.inference_mode():
        return m(tokens, torch.arange(len(ids))[None])[0]


IDS = [1, 17, 250, 3, 99, 42, 7, 300, 12, 2]


def test_f32_gguf_logits_equal_the_safetensors_load(f32_file: Path, model, tmp_path) -> None:
    ref, _ = load_checkpoint(save_checkpoint(model, tmp_path / "ckpt", dtype=torch.float32))
    loaded, config, _ = load_gguf(f32_file, dtype=torch.float32)
    assert config == CONFIG
    assert torch.equal(logits(loaded, IDS), logits(ref, IDS))


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_quantised_gguf_weights_are_gguf_dequantised_and_unpermuted(
    tmp_path: Path, model, bpe, qtype
) -> None:
    loaded, _, _ = load_gguf(write_gguf(tmp_path / "q.gguf", model, bpe, qtype))
    c = model.config
    for name, p in model.named_parameters():
        a = p.detach().float().numpy()
        if a.ndim == 2:
            heads = {"q_proj": c.num_heads, "k_proj": c.num_kv_heads}.get(name.split(".")[-2])
            stored = permute_for_gguf(a, heads) if heads else a
            back = gguf.quants.dequantize(gguf.quants.quantize(stored, qtype), qtype)
            if heads:  # undo the permutation by hand: each head's rows (pairs) -> (halves)
                back = back.reshape(heads, -1, 2, a.shape[1]).swapaxes(1, 2).reshape(a.shape)
            a = back
        got = dict(loaded.named_parameters())[name].detach().numpy()
        assert np.array_equal(got, a), name
    err = (logits(loaded, IDS) - logits(model, IDS)).norm() / logits(model, IDS).norm()
    assert err < 0.2  # the quantisation error itself, small on this model


def test_gguf_tokenizer_equals_transformers_gguf_tokenizer(f32_file: Path) -> None:
    transformers = pytest.importorskip("transformers")
    _, _, tok = load_gguf(f32_file)
    witness = transformers.AutoTokenizer.from_pretrained(str(f32_file.parent),
                                                         gguf_file=f32_file.name)
    for text in TOKENS_TEXT:
        assert tok.encode(text) == witness.encode(text), text
        ids = witness.encode(text)
        assert tok.decode(ids) == witness.decode(ids, skip_special_tokens=True)
    assert tok.eos_ids == (2,) and tok.bos_id == 1
    chat = [{"role": "user", "content": "Hi"}]
    from toyllm.models.chat_template import chat_prompt_text

    assert chat_prompt_text(tok, chat) == witness.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True)


def test_gguf_tokenizer_equals_the_tokenizer_json_it_came_from(f32_file: Path, bpe) -> None:
    _, _, tok = load_gguf(f32_file)
    for text in TOKENS_TEXT:
        assert tok.encode(text, bos=False) == bpe.encode(text).ids


def test_unpermute_inverts_llama_cpp_permute() -> None:
    from toyllm.models.gguf_file import _unpermute

    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    assert np.array_equal(_unpermute(permute_for_gguf(w, 8), 8), w)
    assert not np.array_equal(permute_for_gguf(w, 8), w)


def test_other_architecture_is_named(tmp_path: Path, model, bpe) -> None:
    path = write_gguf(tmp_path / "g.gguf", model, bpe, arch="gpt2")
    with pytest.raises(GGUFError, match="architecture 'gpt2' is not supported"):
        load_gguf(path)


def test_shape_mismatch_is_named(tmp_path: Path, model, bpe) -> None:
    path = write_gguf(tmp_path / "s.gguf", model, bpe, ffn=128)
    with pytest.raises(GGUFError, match=r"blk\.0\.ffn_\w+\.weight has shape"):
        load_gguf(path)


def test_unknown_tensor_type_is_named(tmp_path: Path, f32_file: Path) -> None:
    raw = bytearray(f32_file.read_bytes())
    name = b"output_norm.weight"
    at = raw.index(name) + len(name) + 4 + 8  # n_dims u32, one dim u64, then the type u32
    raw[at:at + 4] = (99).to_bytes(4, "little")
    (tmp_path / "t.gguf").write_bytes(raw)
    with pytest.raises(GGUFError, match="unknown GGUF tensor type.*99"):
        load_gguf(tmp_path / "t.gguf")


def test_truncated_file_is_one_line(tmp_path: Path, f32_file: Path) -> None:
    (tmp_path / "cut.gguf").write_bytes(f32_file.read_bytes()[:3000])
    with pytest.raises(GGUFError) as info:
        load_gguf(tmp_path / "cut.gguf")
    assert "\n" not in str(info.value) and "cut.gguf" in str(info.value)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ModelSourceError, match="junk.gguf"):
        load_model(tmp_path / "junk.gguf", torch.device("cpu"), torch.float32)


def test_unknown_tokenizer_model_is_named(tmp_path: Path, model, bpe) -> None:
    path = write_gguf(tmp_path / "k.gguf", model, bpe, tokenizer_model="bert")
    with pytest.raises(GGUFError, match="tokenizer.ggml.model 'bert' is not supported"):
        load_gguf(path)


def test_cli_generate_chat_on_a_gguf_and_bad_file_exit_2(f32_file: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["generate", "--chat", "Hi", "--model", str(f32_file), "--device",
                            "cpu", "--temperature", "0", "--max-new-tokens", "4", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["completions"][0]["prompt_tokens"] > 5
    (tmp_path / "bad.gguf").write_bytes(f32_file.read_bytes()[:100])
    r = runner.invoke(app, ["generate", "x", "--model", str(tmp_path / "bad.gguf")])
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> spm.SentencePieceProcessor:
    """A 400-piece Llama-2-style sentencepiece BPE (byte fallback, unk 0 / bos 1 / eos 2)."""
    import io
    import sysconfig

    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text(encoding="utf-8")
    lines = [line for line in text.split("\n") if line.strip()] + [MULTIBYTE_TEXT] * 3
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model,
                                   vocab_size=400, model_type="bpe", byte_fallback=True,
                                   character_coverage=0.99, minloglevel=2,
                                   normalization_rule_name="identity",  # as Llama's
                                   remove_extra_whitespaces=False)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def test_sentencepiece_gguf_tokenizer_equals_sentencepiece(
    tmp_path: Path, model, sp_model
) -> None:
    transformers = pytest.importorskip("transformers")
    path = write_gguf(tmp_path / "sp.gguf", model, sp_model)
    _, _, tok = load_gguf(path)
    witness = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ["Hello world", MULTIBYTE_TEXT, "def f(x):\n    return x", " two  spaces"]:
        ids = sp_model.encode(text, add_bos=True)
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == sp_model.decode(ids) == witness.decode(
            ids, skip_special_tokens=True)
        if not text.startswith(" "):  # transformers' GGUF tokenizer drops the dummy prefix of
            assert ids == witness.encode(text)  # a text that starts with a space; sp does not
    assert (tok.bos_id, tok.eos_ids, tok.unk_id) == (1, (2,), 0)
    from toyllm.models.tokenizer import StreamDecoder

    ids = tok.encode(MULTIBYTE_TEXT * 2)
    decoder = StreamDecoder(tok)
    pieces = [decoder.feed(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + decoder.flush() == sp_model.decode(ids) == MULTIBYTE_TEXT * 2


def test_info_reads_a_gguf(f32_file: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["info", str(f32_file), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["config"]["num_kv_heads"] == 2
    (tmp_path / "bad.gguf").write_bytes(b"GGUF")
    r = CliRunner().invoke(app, ["info", str(tmp_path / "bad.gguf")])
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output


@pytest.mark.cuda
def test_gguf_on_cuda_bf16_close_to_cpu_fp32(f32_file: Path) -> None:
    cpu, _, _ = load_gguf(f32_file, dtype=torch.float32)
    gpu, _, _ = load_gguf(f32_file, device="cuda", dtype=torch.bfloat16)
    tokens = torch.tensor([IDS])
    with torch.inference_mode():
        ref = cpu(tokens, torch.arange(len(IDS))[None])[0]
        got = gpu(tokens.cuda(), torch.arange(len(IDS), device="cuda")[None])[0].float().cpu()
    assert (got - ref).norm() / ref.norm() < 1e-2


def test_llama3_rope_freqs_tensor_becomes_the_config_scaling(tmp_path: Path, bpe) -> None:
    from toyllm.models.config import RopeScaling
    from toyllm.models.rope import inverse_frequencies

    scaling = RopeScaling(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192)
    config = CONFIG.with_overrides(head_dim=32, num_heads=2, num_kv_heads=1, rope_theta=500000.0,
                                   rope_scaling=scaling)
    m = build_model(config, seed=2)
    # llama.cpp's converter writes the per-frequency divisors, not the parameters
    divisors = (inverse_frequencies(config.with_overrides(rope_scaling=None))
                / inverse_frequencies(config)).numpy()
    path = write_gguf(tmp_path / "l3.gguf", m, bpe, rope_freqs=divisors)
    loaded, got, _ = load_gguf(path)
    assert got.rope_scaling == scaling
    assert torch.equal(logits(loaded, IDS), logits(m, IDS))
    with pytest.raises(GGUFError, match="matches no Llama 3 rope scaling"):
        load_gguf(write_gguf(tmp_path / "bad.gguf", m, bpe, rope_freqs=divisors ** 0.5))
