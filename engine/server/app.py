"""The HTTP face (FastAPI): /v1/completions, /v1/chat/completions (JSON, or server-sent events
in OpenAI's chunk format), /v1/models, /health, /metrics.

A request's body is parsed and checked here (engine/server/protocol.py), its prompt encoded
(the chat template renders messages), then it goes to the engine (engine/server/engine_face.py:
in a process of its own or in a thread), which alone runs the model. Its outputs come back step
by step: streamed as they come (engine/server/sse.py writes the events), or gathered. A client
that goes away (a closed stream, a dropped connection while a JSON answer is pending) has its
request aborted before the next step.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from toyllm.engine.sampling import SamplingError, SamplingParams, TokenLogprob
from toyllm.engine.server import protocol, sse
from toyllm.engine.server.engine_face import (
    Accepted,
    EngineFace,
    Failed,
    Overloaded,
    Rejected,
    RequestStream,
    ShuttingDown,
)
from toyllm.engine.server.errors import ApiError, bad_request, error_body, from_validation
from toyllm.engine.server.metrics import Metrics
from toyllm.engine.serving import RequestOutput
from toyllm.models.chat_template import ChatTemplateError, chat_prompt_ids

#: seconds a client is told to wait (Retry-After) when the server is at capacity
RETRY_AFTER_S = 1
#: the largest request body read (a prompt of a whole context is far smaller); beyond it 413
MAX_BODY_BYTES = 16 * 2**20


@dataclass
class ServerState:
    loop: EngineFace  # EngineProcess or EngineLoop
    metrics: Metrics
    tokenizer: Any  # Tokenizer | HFTokenizer: encode in the handlers, never the model
    model_name: str
    max_seq_len: int
    vocab_size: int
    api_key: str | None = None
    # the checkpoint's generation_config.json sampling (LoadedModel.sampling_defaults)
    sampling_defaults: dict[str, float | int] = field(default_factory=dict)
    created: int = field(default_factory=protocol.now)
    _texts: dict[int, str] = field(default_factory=dict)

    def token_text(self, token_id: int) -> str:
        """A token's text in log-probabilities: what it adds after a plain word ("a"), so that
        a leading space survives the decoders that drop it at the start of a text (Llama's
        sentencepiece); a byte of a split UTF-8 character shows as U+FFFD."""
        text = self._texts.get(token_id)
        if text is None:
            anchor = self.tokenizer.encode("a", bos=False)
            before = self.tokenizer.decode(anchor)
            text = self.tokenizer.decode([*anchor, token_id])[len(before):]
            self._texts[token_id] = text
        return text


def build_app(state: ServerState) -> FastAPI:
    async def check_api_key(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), state.api_key.encode()):
            state.metrics.rejected("unauthorized")
            raise ApiError(401, "invalid or missing API key: expected the header "
                                "'Authorization: Bearer <key>' with the server's --api-key",
                           code="invalid_api_key")

    app = FastAPI(title="toyllm", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(check_api_key)])

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = (f"no route {request.method} {request.url.path}" if exc.status_code == 404
                   else f"{exc.detail}: {request.method} {request.url.path}")
        return JSONResponse(error_body(message, "invalid_request_error"),
                            status_code=exc.status_code, headers=exc.headers)

    @app.get("/health")
    async def health() -> JSONResponse:
        loop = state.loop
        if not loop.alive:
            return JSONResponse({"status": "failed", "error": loop.failure}, status_code=503)
        if loop.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        loop = state.loop
        text = state.metrics.render(loop.snapshot, loop.in_flight, loop.capacity)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": state.model_name, "object": "model", "created": state.created,
             "owned_by": "toyllm", "max_model_len": state.max_seq_len}]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await _parse(request, protocol.CompletionRequest, state)
        protocol.check_completion(req)
        _check_model(req.model, state)
        ids = _completion_prompt(req.prompt, state)
        max_tokens = protocol.requested_max_tokens(req) or protocol.COMPLETIONS_MAX_TOKENS
        params = _params(req, max_tokens, protocol.requested_logprobs(req), state)
        return await _answer(request, state, req, ids, params, _COMPLETIONS)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await _parse(request, protocol.ChatCompletionRequest, state)
        protocol.check_chat(req)
        _check_model(req.model, state)
        try:
            ids = chat_prompt_ids(state.tokenizer, protocol.chat_messages(req))
        except ChatTemplateError as exc:
            raise bad_request("messages", f"{exc} (this server's /v1/completions takes plain "
                                          "text)") from None
        _check_prompt_length(ids, "messages", state)
        max_tokens = protocol.requested_max_tokens(req) or state.max_seq_len - len(ids)
        params = _params(req, max_tokens, protocol.requested_logprobs(req), state)
        return await _answer(request, state, req, ids, params, _CHAT)

    return app


# parsing and checking -------------------------------------------------------------------------
async def _parse(request: Request, model: type[BaseModel], state: ServerState) -> Any:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            state.metrics.rejected("invalid")
            raise ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        state.metrics.rejected("invalid")
        raise from_validation(exc) from None


def _check_model(name: str, state: ServerState) -> None:
    if name != state.model_name:
        raise bad_request("model", f"this server serves {state.model_name!r}, got {name!r}")


def _completion_prompt(prompt: str | list[int] | list[str], state: ServerState) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise bad_request("prompt", f"one prompt per request (n = 1), got a list of "
                                        f"{len(prompt)}")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("prompt", "expected some text, got an empty string")
        ids = state.tokenizer.encode(prompt, bos=True)  # as `toyllm generate` encodes it
    else:
        if not prompt:
            raise bad_request("prompt", "expected some text or token ids, got an empty list")
        bad = [t for t in prompt if not 0 <= t < state.vocab_size]
        if bad:
            raise bad_request("prompt", f"token ids must be in [0, {state.vocab_size}), got "
                                        f"{bad[:5]}")
        ids = list(prompt)
    _check_prompt_length(ids, "prompt", state)
    return ids


def _check_prompt_length(ids: list[int], param: str, state: ServerState) -> None:
    if len(ids) >= state.max_seq_len:
        raise bad_request(param, f"the prompt is {len(ids)} tokens; the model's context holds "
                                 f"{state.max_seq_len}, with room for at least one generated "
                                 f"token")


def _params(req: Any, max_tokens: int, logprobs: int | None,
            state: ServerState) -> SamplingParams:
    try:
        return protocol.sampling_params(req, max_tokens, logprobs, state.sampling_defaults)
    except SamplingError as exc:  # every range is checked above under the API's names
        raise ApiError(400, str(exc)) from None


async def _submit(state: ServerState, ids: list[int], params: SamplingParams,
                  prefix: str) -> RequestStream:
    """Hand the request to the engine loop; wait until the engine queued it (or refused)."""
    try:
        stream = state.loop.submit(ids, params, prefix)
    except Overloaded:
        state.metrics.rejected("overloaded")
        raise ApiError(503, f"the server is at capacity ({state.loop.capacity} requests in "
                            f"flight); retry after {RETRY_AFTER_S} s", kind="server_error",
                       code="overloaded", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except ShuttingDown as exc:
        state.metrics.rejected("shutting_down")
        raise ApiError(503, str(exc), kind="server_error", code="shutting_down") from None
    try:
        event = await stream.get()
    except asyncio.CancelledError:  # the client left before the engine took the request
        state.loop.abort(stream.request_id)
        raise
    if isinstance(event, Rejected):
        raise ApiError(400, event.message, param="prompt")
    if isinstance(event, Failed):
        raise ApiError(500, event.message, kind="server_error")
    assert isinstance(event, Accepted), event
    return stream


# answers --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Route:
    """What differs between /v1/completions and /v1/chat/completions once the request is
    checked: its ids' prefix, its stream's chunks, its JSON answer and log-probabilities."""

    prefix: str
    chunks: type[sse.StreamChunks]
    response: Callable[..., dict[str, Any]]
    logprobs: Callable[[list[TokenLogprob] | None, Any], dict[str, Any] | None]


_COMPLETIONS = _Route("cmpl", sse.CompletionChunks, protocol.completion_response,
                      protocol.completion_logprobs)
_CHAT = _Route("chatcmpl", sse.ChatChunks, protocol.chat_response, protocol.chat_logprobs)


async def _answer(request: Request, state: ServerState,
                  req: protocol.CompletionRequest | protocol.ChatCompletionRequest, ids: list[int],
                  params: SamplingParams, route: _Route) -> Response:
    """Submit a checked request; its stream, or its whole answer once it finished."""
    stream = await _submit(state, ids, params, route.prefix)
    if req.stream:
        with_usage = req.stream_options is not None and req.stream_options.include_usage
        chunks = route.chunks(stream.request_id, req.model, protocol.now(), with_usage,
                              state.token_text)
        return _EngineStream(chunks, state, stream)
    out = await _gather(request, state, stream)
    return JSONResponse(route.response(
        stream.request_id, req.model, protocol.now(), out.text, out.finish_reason,
        out.prompt_tokens, out.completion_tokens,
        route.logprobs(out.logprobs, state.token_text)))


@dataclass
class _Gathered:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None


async def _outputs(stream: RequestStream) -> AsyncIterator[RequestOutput]:
    """The request's outputs until it finishes; a failure of the engine loop raises."""
    while True:
        event = await stream.get()
        if isinstance(event, Failed):
            raise ApiError(500, event.message, kind="server_error")
        assert isinstance(event, RequestOutput), event
        yield event
        if event.finished:
            return


def _ended_badly(out: RequestOutput) -> ApiError | None:
    if out.finish_reason == "error":
        return ApiError(500, out.error or "the engine failed on this request",
                        kind="server_error")
    if out.finish_reason == "abort":
        return ApiError(503, "the request was aborted: the server is shutting down",
                        kind="server_error", code="shutting_down")
    return None


async def _gather(request: Request, state: ServerState, stream: RequestStream) -> _Gathered:
    """Every output of a non-streamed request; a client that disconnects meanwhile has its
    request aborted."""
    async def collect() -> _Gathered:
        pieces = []
        logprobs: list[TokenLogprob] | None = None
        async for out in _outputs(stream):
            pieces.append(out.new_text)
            if out.logprobs is not None:
                logprobs = (logprobs or []) + out.logprobs
            if out.finished:
                error = _ended_badly(out)
                if error is not None:
                    raise error
                if stream.params.logprobs is not None and logprobs is None:
                    logprobs = []  # asked for, no token sampled (EOS at once)
                return _Gathered("".join(pieces), out.finish_reason or "",
                                 out.prompt_tokens, out.completion_tokens, logprobs)
        raise AssertionError("unreachable: the outputs end with a finished one")

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work = asyncio.ensure_future(collect())
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        left = not work.done()
        if left:  # the client left (or this task was cancelled): stop its request
            work.cancel()
            state.loop.abort(stream.request_id)
    if left:
        raise ApiError(499, "the client closed the connection")  # nobody reads this answer
    return work.result()


class _EngineStream(StreamingResponse):
    """Server-sent events of one request. Each time the request's task wakes it writes every
    event pending since (one write, several `data:` events when the event loop fell behind the
    engine). However the response ends before its last event (the client went away, the task
    was cancelled, even before the first event was asked for), its request is aborted."""

    def __init__(self, chunks: sse.StreamChunks, state: ServerState,
                 stream: RequestStream) -> None:
        self._state, self._stream, self._done = state, stream, False
        super().__init__(self._body(chunks), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _body(self, chunks: sse.StreamChunks) -> AsyncIterator[str]:
        opening = chunks.opening()
        if opening:
            yield "".join(opening)
        while True:
            texts: list[str] = []
            ended = False
            for event in await self._stream.get_all():
                ended = chunks.add(event, texts)
                if ended:
                    break
            if ended:
                self._done = True
                texts.append(sse.DONE)
            if texts:
                yield "".join(texts)
            if ended:
                return

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._done:
                self._state.loop.abort(self._stream.request_id)
