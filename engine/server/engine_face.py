"""What the HTTP side sees of the engine, wherever it runs (its own process: engine_process.py;
a thread of the server's process: engine_loop.py): app.py cannot tell the two apart.

    stream = engine.submit(prompt_ids, params)   # on the event loop; Overloaded / ShuttingDown
    event = await stream.get()                   # Accepted, or Rejected (the engine said no)
    while not (out := await stream.get()).finished: ...   # RequestOutput per step
    events = await stream.get_all()              # or every event pending, at least one
    engine.abort(stream.request_id)              # a client that went away: freed next iteration

`EngineFace` holds what both share, written once. Admission: at most max_running +
max_waiting requests in flight (submitted, not yet finished), more are refused with Overloaded
(the app's 503 with Retry-After), so the engine's waiting queue never holds more than
max_waiting beyond what can run; while draining, or after the engine failed, ShuttingDown.
The engine's reports (`_take_iteration`, one per iteration of step_loop.py): its metrics, each
request's events, a finished request's place given back. A failure (`_fail_all`) ends every
request not yet answered. A subclass carries a request to its engine (`_send_add`) and a
drain's deadline (`_send_drain`) and says whether its engine still runs (`_running`).

Each request's events come in a mailbox of its own (`RequestStream`); whoever reads the
engine's outputs hands an iteration's events over in one `call_soon_threadsafe` (`hand_over`),
however many requests they are for.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from toyllm.engine.generate import GenerationError
from toyllm.engine.sampling import SamplingParams
from toyllm.engine.server.metrics import Metrics
from toyllm.engine.server.step_loop import LoopSnapshot, StepTimes
from toyllm.engine.serving import RequestOutput


class Overloaded(Exception):
    """Every place in flight is taken: the caller answers 503 with Retry-After."""


class ShuttingDown(Exception):
    """The server is draining (SIGTERM): no new requests."""


@dataclass
class Accepted:
    """The engine queued the request."""


@dataclass
class Rejected:
    """The engine refused the request (GenerationError: e.g. its prompt needs more KV blocks
    than the pool holds); nothing was queued."""

    message: str


@dataclass
class Failed:
    """The engine loop itself failed (a bug, or the device): every request in flight ends."""

    message: str


Event = Accepted | Rejected | Failed | RequestOutput


class RequestStream:
    """The event loop's side of one request: its events, in order. A mailbox lighter than an
    asyncio.Queue (one reader): `put` appends and wakes the reader if it waits; a reader that
    falls behind takes every pending event at once (`get_all`), so that a stream answers several
    steps' tokens in one write.

    `wake_every` (the server's --stream-interval) > 1 wakes the reader only once that many
    outputs are pending, or at once for its first output, its last, and any other event: fewer
    wakes and writes under many streams, tokens in bursts."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 loop: asyncio.AbstractEventLoop, wake_every: int = 1) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self._loop = loop
        self._wake_every = wake_every
        self._outputs = 0  # RequestOutputs put so far
        self._pending: deque[Event] = deque()
        self._waiter: asyncio.Future[None] | None = None  # the reader's, while it waits

    def put(self, event: Event) -> None:
        """Add an event (on the event loop)."""
        self._pending.append(event)
        if self._wake_every > 1 and isinstance(event, RequestOutput) and not event.finished:
            self._outputs += 1
            if self._outputs > 1 and len(self._pending) < self._wake_every:
                return  # not the first output, not yet wake_every pending: let it gather
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        while not self._pending:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def get(self) -> Event:
        """The next event."""
        await self._wait()
        return self._pending.popleft()

    async def get_all(self) -> list[Event]:
        """Every pending event, in order; waits for one if there is none."""
        await self._wait()
        events = list(self._pending)
        self._pending.clear()
        return events


_ACCEPTED = Accepted()


class EngineFace:
    """The admission bound, the request ids, draining and failure, and what an iteration of the
    engine means for the streams and /metrics: the event loop's side of an engine. `_lock`
    guards `_in_flight`, `_draining`, `failure` and `_streams` (and what a subclass adds)."""

    def __init__(self, metrics: Metrics, snapshot: LoopSnapshot, *, max_running: int,
                 max_waiting: int, stream_interval: int) -> None:
        if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0:
            raise GenerationError(f"max_waiting: expected an integer >= 0, got {max_waiting!r}")
        if isinstance(stream_interval, bool) or not isinstance(stream_interval, int) \
                or stream_interval < 1:
            raise GenerationError(f"stream_interval: expected an integer >= 1, got "
                                  f"{stream_interval!r}")
        self.metrics = metrics
        self.stream_interval = stream_interval
        self.capacity = max_running + max_waiting
        self.snapshot = snapshot  # what /metrics reads; each iteration's report refreshes it
        self.failure: str | None = None  # why the engine cannot serve any more
        self._lock = threading.Lock()
        self._in_flight = 0
        self._draining = False
        self._streams: dict[str, RequestStream] = {}  # submitted, not yet ended
        self._ids = itertools.count()
        self._prefix = f"{os.getpid():x}{int(time.time()) & 0xFFFFFF:x}"

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def alive(self) -> bool:
        return self._running() and self.failure is None

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               prefix: str = "cmpl") -> RequestStream:
        """Queue a request for the engine (called on the event loop). Overloaded when
        max_running + max_waiting requests are in flight; ShuttingDown while draining or after
        the engine failed."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.failure is not None:
                raise ShuttingDown(f"the server cannot serve: {self.failure}")
            if self._draining:
                raise ShuttingDown("the server is shutting down")
            if self._in_flight >= self.capacity:
                raise Overloaded()
            self._in_flight += 1
            stream = RequestStream(f"{prefix}-{self._prefix}-{next(self._ids)}", prompt_ids,
                                   params, loop, self.stream_interval)
            # under the lock: once a failure is set, no request joins those _fail_all ends
            self._streams[stream.request_id] = stream
            self._send_add(stream)
        return stream

    def drain(self, deadline_s: float) -> None:
        """Refuse new requests; abort those still running `deadline_s` seconds from now."""
        with self._lock:
            if self._draining:
                return
            self._draining = True
            self._send_drain(deadline_s)

    def _take_iteration(self, accepted: list[tuple[str, int]], rejected: list[tuple[str, str]],
                        outputs: Iterable[RequestOutput], step: StepTimes | None,
                        snapshot: LoopSnapshot | None,
                        events: list[tuple[RequestStream, Event]]) -> None:
        """One iteration of the engine (StepLoop._report_iteration's arguments): its metrics,
        the requests that ended given their places back, its events appended to `events` for
        the event loop."""
        metrics = self.metrics
        streams = self._streams
        for rid, prompt_tokens in accepted:
            metrics.admitted(prompt_tokens)
            stream = streams.get(rid)
            if stream is not None:  # None: ended here already (a failure, a stop)
                events.append((stream, _ACCEPTED))
        for rid, message in rejected:
            metrics.rejected("invalid")
            stream = self._end(rid)
            if stream is not None:
                events.append((stream, Rejected(message)))
        if step is not None:
            between, step_s, now = step
            if between is not None:  # since: reporting the step before, taking commands
                metrics.between_steps(between)
            metrics.stepped(step_s)
            tokens = 0
            for out in outputs:
                tokens += len(out.new_token_ids)
                stream = streams.get(out.request_id)
                if stream is None:  # ended here already (a failure, a stop)
                    continue
                events.append((stream, out))
                if out.finished:
                    self._end(out.request_id)
                    metrics.finished(out, now)
            if tokens:
                metrics.generated(now, tokens)
        if snapshot is not None:
            self.snapshot = snapshot

    def _end(self, request_id: str) -> RequestStream | None:
        """The request ended: forget its stream, free its place (None: it had ended)."""
        with self._lock:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                self._in_flight -= 1
            return stream

    def _fail_all(self, message: str) -> None:
        """End every request the engine has not answered with Failed(message)."""
        with self._lock:
            streams = list(self._streams.values())
            self._streams.clear()
            self._in_flight -= len(streams)
        if streams:
            hand_over([(s, Failed(message)) for s in streams])

    # what a subclass provides (called under `_lock`) -----------------------------------------
    def _running(self) -> bool:
        """Whether the engine's thread or process still runs."""
        raise NotImplementedError

    def _send_add(self, stream: RequestStream) -> None:
        raise NotImplementedError

    def _send_drain(self, deadline_s: float) -> None:
        raise NotImplementedError


def hand_over(events: list[tuple[RequestStream, Event]]) -> None:
    """Hand events to their streams' event loop (one, for a server) from another thread: one
    call per event loop, however many requests they are for."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Event]]] = {}
    for stream, event in events:
        by_loop.setdefault(stream._loop, []).append((stream, event))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(deliver, batch)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


def deliver(events: list[tuple[RequestStream, Event]]) -> None:
    """Put each event in its stream (on the streams' event loop)."""
    for stream, event in events:
        stream.put(event)
