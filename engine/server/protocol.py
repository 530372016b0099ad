"""The wire format of the OpenAI API that `toyllm serve` speaks: request bodies (pydantic,
strict: a field of the wrong type or an unknown field is a 400 naming it) and the JSON of
responses and stream chunks.

Sampling fields take OpenAI's names; a field a request leaves out takes the model's
generation_config.json value where it has one (as vLLM does), else OpenAI's default
(temperature 1, top_p 1; completions' max_tokens 16). vLLM's extensions too: top_k (0 or
-1: off), min_p, repetition_penalty, ignore_eos. Log-probabilities (completions'
`logprobs: k`, chat's `logprobs: true` with `top_logprobs: k`, k <= 20) are the model's, from
its raw logits (app.py's token_text gives each token's text). What the engine cannot do is
refused with a 400 rather than ignored: n > 1, echo, best_of > 1, suffix, logit_bias, non-zero
presence/frequency penalties.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict

from toyllm.engine.sampling import MAX_LOGPROBS, MAX_SEED, SamplingParams, TokenLogprob
from toyllm.engine.server.errors import bad_request

#: OpenAI's default max_tokens for /v1/completions (chat defaults to what the context has left)
COMPLETIONS_MAX_TOKENS = 16

# the engine's finish reasons as the API names them; "abort" (the request was stopped: the
# server is shutting down) and "error" are the engine's own and pass through
FINISH_REASONS = {"eos": "stop", "stop": "stop", "max_new_tokens": "length", "length": "length"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    user: str | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Strict):
    type: str
    text: str


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


CHAT_ROLES = ("system", "user", "assistant")


# checks ---------------------------------------------------------------------------------------
def _finite(name: str, value: float, low: float, high: float = math.inf,
            low_open: bool = False) -> float:
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]" if high != math.inf \
            else f"{'>' if low_open else '>='} {low:g}"
        raise bad_request(name, f"expected a number {'in ' if high != math.inf else ''}"
                                f"{interval}, got {value!r}")
    return float(value)


def _refuse_unsupported(req: _SamplingFields) -> None:
    if req.n is not None and req.n != 1:
        raise bad_request("n", f"this server returns one choice per request (n = 1), "
                               f"got {req.n}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value is not None and value != 0:
            raise bad_request(name, f"not supported (only 0); use repetition_penalty, got "
                                    f"{value!r}")
    if req.logit_bias:
        raise bad_request("logit_bias", "not supported")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options", "only allowed with stream: true")


def _logprobs_count(name: str, value: int) -> int:
    if not 0 <= value <= MAX_LOGPROBS:
        raise bad_request(name, f"expected an integer in [0, {MAX_LOGPROBS}], got {value}")
    return value


def requested_logprobs(req: _SamplingFields) -> int | None:
    """How many alternatives each output token's log-probabilities list; None: none asked."""
    if isinstance(req, CompletionRequest):
        return None if req.logprobs is None else _logprobs_count("logprobs", req.logprobs)
    assert isinstance(req, ChatCompletionRequest)
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise bad_request("top_logprobs", "needs logprobs: true")
        return _logprobs_count("top_logprobs", req.top_logprobs)
    return 0 if req.logprobs else None


def check_completion(req: CompletionRequest) -> None:
    _refuse_unsupported(req)
    if req.echo:
        raise bad_request("echo", "not supported by this server")
    if req.best_of is not None and req.best_of != 1:
        raise bad_request("best_of", f"only 1 is supported, got {req.best_of}")
    if req.suffix is not None:
        raise bad_request("suffix", "not supported by this server")


def check_chat(req: ChatCompletionRequest) -> None:
    _refuse_unsupported(req)
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise bad_request("max_completion_tokens", "give max_tokens or max_completion_tokens, "
                                                   "not both")
    if not req.messages:
        raise bad_request("messages", "expected at least one message")
    for i, m in enumerate(req.messages):
        if m.role not in CHAT_ROLES:
            raise bad_request(f"messages.{i}.role", f"expected one of {', '.join(CHAT_ROLES)}, "
                                                    f"got {m.role!r}")
        for j, part in enumerate(m.content if isinstance(m.content, list) else []):
            if part.type != "text":
                raise bad_request(f"messages.{i}.content.{j}.type",
                                  f"only 'text' parts are supported, got {part.type!r}")


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """The messages as the chat template reads them: role and content text."""
    out = []
    for m in req.messages:
        content = m.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        out.append({"role": m.role, "content": content or ""})
    return out


def requested_max_tokens(req: _SamplingFields) -> int | None:
    value = req.max_tokens
    name = "max_tokens"
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        value, name = req.max_completion_tokens, "max_completion_tokens"
    if value is not None and value <= 0:
        raise bad_request(name, f"expected a positive integer, got {value}")
    return value


def sampling_params(req: _SamplingFields, max_tokens: int, logprobs: int | None = None,
                    model_defaults: dict[str, float | int] | None = None) -> SamplingParams:
    """The request's sampling fields, range-checked with the API's names, as SamplingParams;
    a field left out: `model_defaults` (the checkpoint's generation_config.json), else
    OpenAI's default."""
    given = model_defaults or {}

    def pick(name: str, openai_default: float) -> float:
        value = getattr(req, name)
        return given.get(name, openai_default) if value is None else value

    temperature = _finite("temperature", pick("temperature", 1.0), 0.0)
    top_p = _finite("top_p", pick("top_p", 1.0), 0.0, 1.0, low_open=True)
    min_p = _finite("min_p", pick("min_p", 0.0), 0.0, 1.0)
    penalty = _finite("repetition_penalty", pick("repetition_penalty", 1.0), 0.0,
                      low_open=True)
    top_k = int(pick("top_k", 0))
    if top_k < -1:
        raise bad_request("top_k", f"expected -1 or 0 (off) or a positive integer, got {top_k}")
    if req.seed is not None and not 0 <= req.seed <= MAX_SEED:
        raise bad_request("seed", f"expected an integer in [0, 2**64 - 1], got {req.seed}")
    stops: tuple[str, ...] = ()
    if req.stop is not None:
        stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
        if any(not s for s in stops):
            raise bad_request("stop", f"expected non-empty strings, got {req.stop!r}")
    return SamplingParams(max_new_tokens=max_tokens, temperature=temperature,
                          top_k=max(top_k, 0), top_p=top_p, min_p=min_p,
                          repetition_penalty=penalty, seed=req.seed, stop=stops,
                          stop_at_eos=not req.ignore_eos, logprobs=logprobs)


# responses ------------------------------------------------------------------------------------
def finish_reason(engine_reason: str | None) -> str | None:
    if engine_reason is None:
        return None
    return FINISH_REASONS.get(engine_reason, engine_reason)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def now() -> int:
    return int(time.time())


TokenText = Callable[[int], str]  # a token id as text (ServerState.token_text)


def completion_logprobs(logprobs: list[TokenLogprob] | None, text_of: TokenText,
                        offset: int = 0) -> dict[str, Any] | None:
    """/v1/completions' logprobs object; text offsets count from `offset` (the text before)."""
    if logprobs is None:
        return None
    tokens = [text_of(lp.token_id) for lp in logprobs]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{text_of(i): v for i, v in lp.top} for lp in logprobs],
            "text_offset": offsets}


def chat_logprobs(logprobs: list[TokenLogprob] | None,
                  text_of: TokenText) -> dict[str, Any] | None:
    """/v1/chat/completions' logprobs object: {"content": [per token]}."""
    if logprobs is None:
        return None

    def entry(token_id: int, value: float) -> dict[str, Any]:
        text = text_of(token_id)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob),
                         "top_logprobs": [entry(i, v) for i, v in lp.top]} for lp in logprobs]}


def completion_response(rid: str, model: str, created: int, text: str, reason: str | None,
                        prompt_tokens: int, completion_tokens: int,
                        logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return _answer(rid, "text_completion", created, model,
                   {"index": 0, "text": text, "logprobs": logprobs,
                    "finish_reason": finish_reason(reason)},
                   usage(prompt_tokens, completion_tokens))


def completion_chunk(rid: str, model: str, created: int, text: str,
                     reason: str | None, with_usage: bool,
                     logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return _chunk(rid, "text_completion", created, model,
                  {"index": 0, "text": text, "logprobs": logprobs,
                   "finish_reason": finish_reason(reason)}, with_usage)


def chat_response(rid: str, model: str, created: int, text: str, reason: str | None,
                  prompt_tokens: int, completion_tokens: int,
                  logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return _answer(rid, "chat.completion", created, model,
                   {"index": 0, "message": {"role": "assistant", "content": text},
                    "logprobs": logprobs, "finish_reason": finish_reason(reason)},
                   usage(prompt_tokens, completion_tokens))


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, str],
               reason: str | None, with_usage: bool,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return _chunk(rid, "chat.completion.chunk", created, model,
                  {"index": 0, "delta": delta, "logprobs": logprobs,
                   "finish_reason": finish_reason(reason)}, with_usage)


def _answer(rid: str, obj: str, created: int, model: str, choice: dict[str, Any] | None,
            counts: dict[str, int]) -> dict[str, Any]:
    """A whole answer (its one choice) or a stream's usage chunk (None: no choice), with the
    usage."""
    return {"id": rid, "object": obj, "created": created, "model": model,
            "choices": [] if choice is None else [choice], "usage": counts}


def _chunk(rid: str, obj: str, created: int, model: str, choice: dict[str, Any],
           with_usage: bool) -> dict[str, Any]:
    """A stream's chunk of its one choice; with stream_options.include_usage, `usage: null`
    (only the last chunk has one)."""
    chunk: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model,
                             "choices": [choice]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(rid: str, model: str, created: int, obj: str, prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    return _answer(rid, obj, created, model, None, usage(prompt_tokens, completion_tokens))
