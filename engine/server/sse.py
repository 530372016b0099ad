"""The server-sent events of one streamed request, as text: OpenAI's chunk format, one `data:`
event per chunk (engine/server/protocol.py builds the chunks' objects).

A stream sends a chunk per token, so this is the server's hottest text: a chunk with only text
(no log-probabilities, no finish reason) is a template filled with the JSON of its text, made
once per request from protocol's own chunk object, so that it is byte for byte what
`json.dumps` of that object gives (tests/test_server_streaming.py checks it). Rarer chunks (the
first, the last, log-probabilities, errors) are protocol's objects through json.dumps.

    chunks = CompletionChunks(request_id, model, created, with_usage, text_of)
    texts = chunks.opening()            # chat: the role chunk; completions: none
    ended = chunks.add(event, texts)    # each event of the stream, in order; True at its end
    texts.append(DONE)                  # after the end
"""

from __future__ import annotations

import json
from typing import Any

from toyllm.engine.server import protocol
from toyllm.engine.server.engine_face import Event, Failed
from toyllm.engine.server.errors import ApiError
from toyllm.engine.serving import RequestOutput

DONE = "data: [DONE]\n\n"
# stands for a chunk's text while its template is cut: no text the engine makes holds a NUL
# pair around this name, and its JSON appears once in the chunk's
_MARK = "\x00toyllm-text\x00"


def event(obj: dict[str, Any]) -> str:
    """One server-sent event holding `obj` as compact JSON."""
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def text_template(chunk: dict[str, Any]) -> tuple[str, str]:
    """The event of `chunk` (built with the text _MARK) cut around its text's JSON: the event
    of the same chunk with text t is head + json.dumps(t) + tail."""
    whole = event(chunk)
    head, found, tail = whole.partition(json.dumps(_MARK))
    if not found or json.dumps(_MARK) in tail:
        raise AssertionError(f"the chunk holds its text once: {whole!r}")
    return head, tail


class StreamChunks:
    """The events of one request's stream, built as its engine events come (one reader)."""

    def __init__(self, rid: str, model: str, created: int, with_usage: bool,
                 text_of: protocol.TokenText) -> None:
        self.rid, self.model, self.created = rid, model, created
        self.with_usage, self.text_of = with_usage, text_of
        self._head, self._tail = text_template(self._text_chunk(_MARK, None))

    def opening(self) -> list[str]:
        """The events before any output."""
        return []

    def add(self, ev: Event, texts: list[str]) -> bool:
        """Append the events of one engine event to `texts`; whether the stream ended (an
        error ends it with OpenAI's error object)."""
        if isinstance(ev, Failed):
            texts.append(event(ApiError(500, ev.message, kind="server_error").body()))
            return True
        if not isinstance(ev, RequestOutput):
            raise AssertionError(f"a stream's events are outputs after it was accepted: {ev}")
        if ev.finished and ev.finish_reason == "error":
            texts.append(event(ApiError(500, ev.error or "the engine failed",
                                        kind="server_error").body()))
            return True
        if ev.new_text or ev.logprobs:
            if ev.logprobs is None:
                texts.append(f"{self._head}{json.dumps(ev.new_text)}{self._tail}")
            else:
                texts.append(event(self._text_chunk(ev.new_text, self._logprobs(ev))))
        if ev.finished:
            texts.append(event(self._finish_chunk(ev.finish_reason)))
            if self.with_usage:
                texts.append(event(protocol.usage_chunk(
                    self.rid, self.model, self.created, self.object_name, ev.prompt_tokens,
                    ev.completion_tokens)))
        return ev.finished

    # what differs between the two routes
    object_name = ""

    def _text_chunk(self, text: str, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        raise NotImplementedError

    def _finish_chunk(self, reason: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def _logprobs(self, out: RequestOutput) -> dict[str, Any] | None:
        raise NotImplementedError


class CompletionChunks(StreamChunks):
    """/v1/completions: `text_completion` chunks; log-probabilities' text offsets count in the
    whole completion."""

    object_name = "text_completion"

    def __init__(self, rid: str, model: str, created: int, with_usage: bool,
                 text_of: protocol.TokenText) -> None:
        super().__init__(rid, model, created, with_usage, text_of)
        self._offset = 0  # of the next token's text, in the completion

    def _text_chunk(self, text: str, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        return protocol.completion_chunk(self.rid, self.model, self.created, text, None,
                                         self.with_usage, logprobs)

    def _finish_chunk(self, reason: str | None) -> dict[str, Any]:
        return protocol.completion_chunk(self.rid, self.model, self.created, "", reason,
                                         self.with_usage)

    def _logprobs(self, out: RequestOutput) -> dict[str, Any] | None:
        logprobs = protocol.completion_logprobs(out.logprobs, self.text_of, self._offset)
        if logprobs is not None:
            self._offset += sum(len(t) for t in logprobs["tokens"])
        return logprobs


class ChatChunks(StreamChunks):
    """/v1/chat/completions: `chat.completion.chunk`s, the first with the assistant's role."""

    object_name = "chat.completion.chunk"

    def opening(self) -> list[str]:
        return [event(protocol.chat_chunk(self.rid, self.model, self.created,
                                          {"role": "assistant", "content": ""}, None,
                                          self.with_usage))]

    def _text_chunk(self, text: str, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        return protocol.chat_chunk(self.rid, self.model, self.created, {"content": text}, None,
                                   self.with_usage, logprobs)

    def _finish_chunk(self, reason: str | None) -> dict[str, Any]:
        return protocol.chat_chunk(self.rid, self.model, self.created, {}, reason,
                                   self.with_usage)

    def _logprobs(self, out: RequestOutput) -> dict[str, Any] | None:
        return protocol.chat_logprobs(out.logprobs, self.text_of)
