"""A chat session: the conversation so far lives in one row of the engine's KV cache, and each
turn prefills only the tokens that are new since the last one.

    session = ChatSession(engine, SamplingParams(max_new_tokens=256), system="Be brief.")
    turn = session.ask("What is the capital of France?", on_text=print)
    turn.text, turn.prefill_tokens, turn.finish_reason

Each turn renders the whole conversation with the chat template (models/chat_template.py).
When the text of the conversation so far (last turn's rendering plus the answer) is a prefix of
the new rendering, the turn's ids are the conversation's ids so far (the answer as the tokens the
model generated, not a re-tokenisation of its text) plus the encoding of the new text only; when
it is not (a template that rewrites earlier turns), the whole rendering is encoded afresh. The
ids are then compared with those whose K/V the cache holds: when those are a prefix, only the
rest is prefilled; otherwise the row is reset and everything is prefilled again (the cache
cannot roll back to a shorter position in place). `reuse_cache=False` prefills the same ids
whole every turn: the baseline the reuse is measured against.

A KeyboardInterrupt during an answer ends that answer early; what was generated so far stays in
the conversation, and the session goes on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from toyllm.engine.generate import Engine, GenerationError
from toyllm.engine.sampling import SamplingParams, make_generator, sample
from toyllm.models.chat_template import Message, chat_prompt_text, template_of
from toyllm.models.tokenizer import StreamDecoder

INITIAL_POSITIONS = 4096


@dataclass
class ChatTurn:
    text: str
    token_ids: list[int]
    finish_reason: str  # eos, max_new_tokens, length, interrupted
    prefill_tokens: int  # tokens prefilled this turn (only the new ones when the cache is reused)
    context_tokens: int  # the whole conversation's tokens, prompt of this turn included
    prefill_s: float
    decode_s: float

    @property
    def decode_tok_per_s(self) -> float:
        return len(self.token_ids) / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class ChatSession:
    engine: Engine
    params: SamplingParams = field(default_factory=SamplingParams)
    system: str | None = None
    reuse_cache: bool = True

    def __post_init__(self) -> None:
        if self.engine.tokenizer is None:
            raise GenerationError("chat needs a tokenizer; this model has none")
        template_of(self.engine.tokenizer)  # no template: say so now, not at the first turn
        self.tokenizer = self.engine.tokenizer
        self.messages: list[Message] = []
        self._cached: list[int] = []  # ids whose K/V row 0 of the cache holds
        self._history_text = ""  # the conversation so far as text: rendering + answer
        self._history_ids: list[int] = []  # and as the ids the model saw and generated
        self._rows = self.engine._rows_for(1)
        self._cache = None
        self._generator = make_generator(self.params, self.engine.device)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self._cached, self._history_text, self._history_ids = [], "", []
        if self._cache is not None:
            self._cache.reset_sequence(0)

    def _prepare(self, need: int) -> None:
        """A cache row with room for `need` positions. It starts at INITIAL_POSITIONS (a model's
        context may be 128k positions) and doubles when a turn needs more, which starts the row
        over (the new cache is empty)."""
        cache = self._cache
        if cache is None or cache.max_seq_len < need:
            size = cache.max_seq_len * 2 if cache is not None else INITIAL_POSITIONS
            size = min(max(size, need), self.engine.max_seq_len)
            self._cache = cache = self.engine.prepare_cache(self._rows, size)
            self._cached = []
            for r in range(1, cache.batch_size):
                cache.set_active(r, False)

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> ChatTurn:
        """One user turn: prefill what is new, then stream the answer until EOS or a limit."""
        if not text.strip():
            raise GenerationError("empty message: expected some text")
        messages = [*self.messages, {"role": "user", "content": text}]
        rendered = chat_prompt_text(self.tokenizer, messages)
        if self._history_text and rendered.startswith(self._history_text):
            new_text = rendered[len(self._history_text):]
            ids = self._history_ids + self.tokenizer.encode(new_text, bos=False)
        else:
            ids = self.tokenizer.encode(rendered, bos=False)
        limit = self.engine.max_seq_len
        if len(ids) >= limit:
            raise GenerationError(
                f"the conversation is {len(ids)} tokens, {len(ids) - limit + 1} over what the "
                f"context holds with room for an answer ({limit}); /reset to start over"
            )
        self.messages = messages
        self._prepare(min(len(ids) + self.params.max_new_tokens, limit))
        cache, engine = self._cache, self.engine
        keep = _common_prefix(self._cached, ids) if self.reuse_cache else 0
        if keep < len(self._cached) or keep == len(ids) or \
                cache.sequence_position(0) != len(self._cached):
            cache.reset_sequence(0)  # no roll-back in place: start the row over
            keep = 0
        cache.set_active(0, True)
        sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        logits = engine.prefill(cache, 0, ids[keep:])[None]
        self._cached = list(ids)
        sync()
        t1 = time.perf_counter()
        decoder, answer, reason, pieces = StreamDecoder(self.tokenizer), [], "", []
        tokens = torch.zeros(self._rows, dtype=torch.long, device=engine.device)
        try:
            while True:
                seen = [ids + answer] if self.params.repetition_penalty != 1 else None
                tok = int(sample(logits[:1], self.params, self._generator, seen=seen)[0])
                if self.params.stop_at_eos and tok in engine.eos_ids:
                    reason = "eos"
                    break
                answer.append(tok)
                piece = decoder.feed(tok)
                if piece:
                    pieces.append(piece)
                    if on_text is not None:
                        on_text(piece)
                if len(answer) >= self.params.max_new_tokens:
                    reason = "max_new_tokens"
                    break
                if cache.sequence_position(0) >= cache.max_seq_len:
                    reason = "length"
                    break
                tokens[0] = tok
                logits = engine.decode_step(cache, self._rows, tokens)
                self._cached.append(tok)
        except KeyboardInterrupt:
            reason = "interrupted"
        rest = decoder.flush()
        if rest:
            pieces.append(rest)
            if on_text is not None:
                on_text(rest)
        sync()
        t2 = time.perf_counter()
        reply = "".join(pieces)
        self.messages.append({"role": "assistant", "content": reply})
        self._history_text, self._history_ids = rendered + reply, ids + answer
        return ChatTurn(reply, answer, reason, len(ids) - keep, len(ids), t1 - t0, t2 - t1)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
