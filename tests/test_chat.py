"""engine/chat.py, engine/chat_cli.py and `toyllm generate --chat` / `toyllm chat` on a tiny
random model with a tokenizer.json checkpoint built here: a conversation kept in the KV cache
gives the same greedy answers as re-prefilling it every turn while prefilling only the new
tokens; any EOS id of generation_config's list stops; Ctrl-C stops one answer, not the session;
bad input is one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_checkpoints import save_tiny_checkpoint
from tokenizer_fixtures import train_byte_level_bpe, write_tokenizer_dir
from typer.testing import CliRunner

from toyllm.engine.chat import ChatSession
from toyllm.engine.chat_cli import run_chat
from toyllm.engine.cli import app
from toyllm.engine.generate import Engine, GenerationError
from toyllm.engine.sampling import SamplingParams
from toyllm.models.chat_template import ChatTemplateError, chat_prompt_ids
from toyllm.models.model_source import load_model

runner = CliRunner()
CPU = torch.device("cpu")
GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("chat_ckpt"), vocab_size=400,
                                max_seq_len=256, seed=3)
    write_tokenizer_dir(path, train_byte_level_bpe())
    return path


@pytest.fixture()
def engine(checkpoint: Path) -> Engine:
    loaded = load_model(checkpoint, CPU, torch.float32)
    return Engine(loaded.model, loaded.tokenizer, cuda_graph=False)


QUESTIONS = ["What is the capital of France?", "And of Japan?", "Thanks → 😀"]


def test_kv_reuse_gives_the_same_answers_and_prefills_only_new_tokens(engine: Engine) -> None:
    reused = ChatSession(engine, GREEDY, system="Be brief.")
    turns = [reused.ask(q) for q in QUESTIONS]
    fresh_engine = Engine(engine.model, engine.tokenizer, cuda_graph=False)
    fresh = ChatSession(fresh_engine, GREEDY, system="Be brief.", reuse_cache=False)
    baseline = [fresh.ask(q) for q in QUESTIONS]
    assert [t.token_ids for t in turns] == [t.token_ids for t in baseline]
    assert all(b.prefill_tokens == b.context_tokens for b in baseline)
    assert turns[0].prefill_tokens == turns[0].context_tokens
    for t in turns[1:]:
        assert t.prefill_tokens < t.context_tokens / 2, (t.prefill_tokens, t.context_tokens)


def test_first_turn_equals_generate_of_the_rendered_prompt(engine: Engine) -> None:
    turn = ChatSession(engine, GREEDY).ask(QUESTIONS[0])
    ids = chat_prompt_ids(engine.tokenizer, [{"role": "user", "content": QUESTIONS[0]}])
    result = Engine(engine.model, engine.tokenizer, cuda_graph=False).generate([ids], GREEDY)
    assert turn.token_ids == result.completions[0].token_ids


def test_a_turn_with_a_repetition_penalty_sees_the_conversation_and_the_answer(
        engine: Engine) -> None:
    """Chat passes the whole conversation and the answer so far as the seen tokens: a turn is
    generate's answer to the rendered conversation with the same penalty (which
    tests/test_sampling.py checks against the rule on the no-cache reference)."""
    params = SamplingParams(max_new_tokens=12, temperature=0.0, repetition_penalty=0.5,
                            min_p=0.1, stop_at_eos=False)
    session = ChatSession(engine, params)
    first = session.ask(QUESTIONS[0])
    second = session.ask(QUESTIONS[1])
    fresh = Engine(engine.model, engine.tokenizer, cuda_graph=False)
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    ids = chat_prompt_ids(engine.tokenizer, messages)
    assert first.token_ids == fresh.generate([ids], params).completions[0].token_ids
    ids = session._history_ids[: len(session._history_ids) - len(second.token_ids)]
    assert second.token_ids == fresh.generate([ids], params).completions[0].token_ids
    plain = ChatSession(engine, SamplingParams(max_new_tokens=12, temperature=0.0,
                                               stop_at_eos=False)).ask(QUESTIONS[0])
    assert plain.token_ids != first.token_ids  # the penalty (< 1: repeat more) acted here


def test_any_eos_of_generation_config_stops(checkpoint: Path, tmp_path: Path) -> None:
    loaded = load_model(checkpoint, CPU, torch.float32)
    first = Engine(loaded.model, loaded.tokenizer, cuda_graph=False).generate(
        ["Hello"], GREEDY).completions[0].token_ids[0]
    for f in checkpoint.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, first]}))
    loaded = load_model(tmp_path, CPU, torch.float32)
    assert loaded.tokenizer.eos_ids == (2, first)
    c = Engine(loaded.model, loaded.tokenizer, cuda_graph=False).generate(
        ["Hello"], GREEDY).completions[0]
    assert c.finish_reason == "eos" and c.token_ids == []


def test_ctrl_c_stops_the_answer_and_the_session_goes_on(engine: Engine) -> None:
    session = ChatSession(engine, SamplingParams(max_new_tokens=20, temperature=0.0))
    seen = []

    def on_text(piece: str) -> None:
        seen.append(piece)
        if len(seen) == 2:
            raise KeyboardInterrupt

    turn = session.ask(QUESTIONS[0], on_text=on_text)
    assert turn.finish_reason == "interrupted" and len(turn.token_ids) < 20
    assert session.messages[-1] == {"role": "assistant", "content": turn.text}
    assert session.ask(QUESTIONS[1]).finish_reason == "max_new_tokens"


def test_reset_forgets_the_conversation(engine: Engine) -> None:
    session = ChatSession(engine, GREEDY, system="S")
    first = session.ask(QUESTIONS[0])
    session.ask(QUESTIONS[1])
    session.reset()
    assert session.messages == [{"role": "system", "content": "S"}]
    again = session.ask(QUESTIONS[0])
    assert again.token_ids == first.token_ids
    assert again.prefill_tokens == again.context_tokens


def test_turn_longer_than_the_context_says_how_much(engine: Engine) -> None:
    session = ChatSession(engine, GREEDY)
    with pytest.raises(GenerationError, match=r"tokens, \d+ over"):
        session.ask("word " * 400)
    assert session.messages == []  # the failed turn is not kept


def test_interactive_loop_commands(engine: Engine, monkeypatch, capsys) -> None:
    from rich.console import Console

    lines = iter(["hello", "/reset", "hello", "/quit"])
    monkeypatch.setattr("builtins.input", lambda _prompt: next(lines))

    class Tty:
        def isatty(self) -> bool:
            return True

    session = ChatSession(engine, GREEDY)
    out, err = Console(force_terminal=False), Console(stderr=True)
    assert run_chat(session, None, out, err, stats=True, stdin=Tty()) == 0
    captured = capsys.readouterr()
    assert "conversation reset" in captured.err and captured.err.count("prefill") == 2
    assert len(session.messages) == 2


def test_model_without_template_is_a_clear_error(checkpoint: Path, tmp_path: Path) -> None:
    for f in checkpoint.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    write_tokenizer_dir(tmp_path, train_byte_level_bpe(), template=None)
    loaded = load_model(tmp_path, CPU, torch.float32)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ChatSession(Engine(loaded.model, loaded.tokenizer, cuda_graph=False))
    r = runner.invoke(app, ["chat", "--model", str(tmp_path), "--prompt", "hi", "--device",
                            "cpu"])
    assert r.exit_code == 2 and "no chat template" in r.output
    assert r.output.count("\n") == 1


def test_cli_generate_chat_and_chat_one_shot(checkpoint: Path) -> None:
    common = ["--model", str(checkpoint), "--max-new-tokens", "5", "--temperature", "0",
              "--device", "cpu"]
    r = runner.invoke(app, ["generate", "--chat", "--system", "Be brief.", "Hi", "--json",
                            *common])
    assert r.exit_code == 0, r.output
    completion = json.loads(r.stdout)["completions"][0]
    r2 = runner.invoke(app, ["chat", "--system", "Be brief.", "--prompt", "Hi", *common])
    assert r2.exit_code == 0, r2.output
    assert r2.stdout.strip() == completion["text"].strip()
    r3 = runner.invoke(app, ["chat", "--system", "Be brief.", *common], input="Hi")
    assert r3.exit_code == 0 and r3.stdout == r2.stdout


def test_cache_grows_when_the_conversation_outgrows_it(engine: Engine, monkeypatch) -> None:
    import toyllm.engine.chat as chat

    baseline = ChatSession(Engine(engine.model, engine.tokenizer, cuda_graph=False), GREEDY,
                           reuse_cache=False)
    expected = [baseline.ask(q).token_ids for q in QUESTIONS]
    monkeypatch.setattr(chat, "INITIAL_POSITIONS", 64)
    session = ChatSession(engine, GREEDY)
    turns = [session.ask(q) for q in QUESTIONS]
    assert [t.token_ids for t in turns] == expected
    assert session._cache.max_seq_len > 64 and turns[-1].context_tokens > 64


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chat_on_cuda_with_graphs_keeps_answers_of_reprefill(checkpoint: Path, dtype) -> None:
    loaded = load_model(checkpoint, torch.device("cuda"), dtype)
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    reused = ChatSession(Engine(loaded.model, loaded.tokenizer, cuda_graph=True), params)
    turns = [reused.ask(q) for q in QUESTIONS]
    fresh = ChatSession(Engine(loaded.model, loaded.tokenizer, cuda_graph=True), params,
                        reuse_cache=False)
    baseline = [fresh.ask(q) for q in QUESTIONS]
    assert all(t.prefill_tokens < t.context_tokens for t in turns[1:])
    if dtype == torch.float32:
        assert [t.token_ids for t in turns] == [t.token_ids for t in baseline]
    else:  # bf16: chunked and whole prefill may round differently; the first turn is the same
        assert turns[0].token_ids == baseline[0].token_ids
