"""The engine loop: one thread owns the ServingEngine (and so the model and its device) and is
the only one that calls it. HTTP handlers, on the asyncio event loop, talk to it through a
command queue (add, abort, stop) and receive each request's outputs in a mailbox of its own
(`RequestStream`); the thread hands over an iteration's events (the admissions it took, every
output of its step) in one `call_soon_threadsafe`, however many requests run: the thread does no
per-request work for the event loop, and the event loop is called once per iteration, not once
per request (what a step costs the engine thread beyond the step itself shows in /metrics:
toyllm_engine_between_steps_seconds).

    loop = EngineLoop(engine, metrics, max_waiting=256)
    loop.start()
    stream = loop.submit(prompt_ids, params)     # on the event loop; Overloaded / ShuttingDown
    event = await stream.get()                   # Accepted, or Rejected (the engine said no)
    while not (out := await stream.get()).finished: ...   # RequestOutput per step
    events = await stream.get_all()              # or every event pending, at least one
    loop.abort(stream.request_id)                # a client that went away: freed next iteration

Cancellation: an abort is taken before the next step, so a request whose client disconnected
runs at most the step in progress, and its KV blocks are freed at once (ServingEngine.abort).
Backpressure: at most max_running + max_waiting requests are in flight (submitted, not yet
finished); `submit` refuses more with Overloaded (the app's 503 with Retry-After), so the
waiting queue never holds more than max_waiting beyond what can run. Shutdown: `drain` refuses
new requests and, after its deadline, aborts whatever still runs; `stop` aborts everything,
reports it and ends the thread.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from toyllm.engine.generate import GenerationError
from toyllm.engine.sampling import SamplingParams
from toyllm.engine.server.metrics import Metrics
from toyllm.engine.serving import RequestOutput, ServingEngine, ServingStats

log = logging.getLogger("toyllm.server")

# how often, at most, the loop refreshes the snapshot /metrics reads while it is busy
SNAPSHOT_INTERVAL_S = 0.25
# how long the idle loop sleeps on its command queue before it looks at the drain deadline
IDLE_WAIT_S = 0.1


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


@dataclass(frozen=True)
class LoopSnapshot:
    """What /metrics shows of the engine, taken by the loop thread (no other thread reads the
    engine): its stats, and the blocks a new request could have (free, plus cached blocks only
    the prefix cache holds)."""

    stats: ServingStats
    blocks_reclaimable: int
    taken_at: float


class EngineLoop:
    def __init__(self, engine: ServingEngine, metrics: Metrics, *, max_waiting: int,
                 stream_interval: int = 1) -> None:
        if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0:
            raise GenerationError(f"max_waiting: expected an integer >= 0, got {max_waiting!r}")
        if isinstance(stream_interval, bool) or not isinstance(stream_interval, int) \
                or stream_interval < 1:
            raise GenerationError(f"stream_interval: expected an integer >= 1, got "
                                  f"{stream_interval!r}")
        self.stream_interval = stream_interval
        self.engine = engine
        self.metrics = metrics
        self.capacity = engine.max_running + max_waiting
        self._commands: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # the loop thread's own
        # the loop thread's own: events for the streams, handed over at the end of an iteration
        self._outbox: list[tuple[RequestStream, Event]] = []
        self._lock = threading.Lock()  # guards _in_flight and _draining
        self._in_flight = 0
        self._draining = False
        self._deadline: float | None = None  # monotonic: abort what still runs after it
        self._ids = itertools.count()
        self._prefix = f"{os.getpid():x}{int(time.time()) & 0xFFFFFF:x}"
        self._thread = threading.Thread(target=self._run, name="toyllm-engine-loop",
                                        daemon=True)
        self.failure: str | None = None
        self.snapshot = self._take_snapshot()  # before the thread starts: no one else yet

    # the event loop's side --------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.failure is None

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               prefix: str = "cmpl") -> RequestStream:
        """Queue a request for the engine (called on the event loop). Overloaded when
        max_running + max_waiting requests are in flight; ShuttingDown while draining."""
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
            # under the lock: once a failure is set, no request joins the queue _fail_all empties
            self._commands.put(("add", stream))
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request (any thread): its blocks are freed before the next step."""
        self._commands.put(("abort", request_id))

    def drain(self, deadline_s: float) -> None:
        """Refuse new requests; abort those still running `deadline_s` seconds from now."""
        with self._lock:
            if not self._draining:
                self._draining = True
                self._deadline = time.monotonic() + deadline_s

    def stop(self, timeout_s: float = 10.0) -> None:
        """Abort everything in flight, report it, end the thread."""
        with self._lock:
            self._draining = True
        self._commands.put(("stop", None))
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    # the loop thread --------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        if engine.device.type == "cuda":
            torch.cuda.set_device(engine.device)  # the current device is per thread
        stopping = False
        last_snapshot = 0.0
        changed = False  # since the last snapshot
        last_step_end: float | None = None  # perf_counter, while steps follow one another
        try:
            while True:
                busy = engine.has_unfinished()
                took, stop = self._take_commands(block=not busy and not stopping)
                stopping |= stop
                changed |= took
                deadline = self._deadline
                if (stopping or (deadline is not None and time.monotonic() >= deadline)) \
                        and self._streams:
                    for rid in list(self._streams):
                        engine.abort(rid)
                if engine.has_unfinished():
                    started = time.perf_counter()
                    if last_step_end is not None:  # since: handing over, commands, GIL waits
                        self.metrics.between_steps(started - last_step_end)
                    outputs = engine.step()
                    now = last_step_end = time.perf_counter()
                    self.metrics.stepped(now - started)
                    self._dispatch(outputs, now)
                    self._flush()  # the commands' events and the step's: one handoff
                    changed = True
                    if now - last_snapshot >= SNAPSHOT_INTERVAL_S:
                        self.snapshot, last_snapshot = self._take_snapshot(), now
                        changed = False
                    continue
                self._flush()
                last_step_end = None  # idle: the next step starts a new busy stretch
                if changed:  # idle now: show the state the engine rests in
                    self.snapshot, last_snapshot = self._take_snapshot(), time.perf_counter()
                    changed = False
                if stopping and not self._streams:
                    return
        except Exception as exc:  # a bug or a device failure: end every request, say why
            with self._lock:
                self.failure = f"the engine loop failed: {type(exc).__name__}: {exc}"
            log.exception("engine loop failed")
            self._fail_all(self.failure)

    def _take_commands(self, block: bool) -> tuple[bool, bool]:
        """Apply queued commands (waiting up to IDLE_WAIT_S for one when `block`): whether
        there were any, and whether one was stop."""
        stop = False
        try:
            command = self._commands.get(timeout=IDLE_WAIT_S) if block \
                else self._commands.get_nowait()
        except queue.Empty:
            return False, False
        while True:
            kind, arg = command
            if kind == "add":
                self._add(arg)  # type: ignore[arg-type]
            elif kind == "abort":
                self.engine.abort(arg)  # type: ignore[arg-type]  # unknown ids are ignored
            else:
                stop = True
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True, stop

    def _add(self, stream: RequestStream) -> None:
        try:
            self.engine.add_request(stream.prompt_ids, stream.params, stream.request_id)
        except GenerationError as exc:
            self._finished_one()
            self.metrics.rejected("invalid")
            self._outbox.append((stream, Rejected(str(exc))))
            return
        self._streams[stream.request_id] = stream
        self.metrics.admitted(len(stream.prompt_ids))
        self._outbox.append((stream, Accepted()))

    def _dispatch(self, outputs: list[RequestOutput], now: float) -> None:
        events = self._outbox
        tokens = 0
        for out in outputs:
            tokens += len(out.new_token_ids)
            stream = self._streams.get(out.request_id)
            if stream is None:  # not one of ours (never happens: every request is)
                continue
            events.append((stream, out))
            if out.finished:
                del self._streams[out.request_id]
                self._finished_one()
                self.metrics.finished(out, now)
        if tokens:
            self.metrics.generated(now, tokens)

    def _finished_one(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _flush(self) -> None:
        """Hand the events gathered since the last flush to their streams' event loop (one,
        for a server): one call per event loop, however many requests they are for."""
        if not self._outbox:
            return
        events, self._outbox = self._outbox, []
        hand_over(events)

    def _fail_all(self, message: str) -> None:
        """End every request: those in the engine and those still queued as commands."""
        streams = list(self._streams.values())
        self._streams.clear()
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                streams.append(arg)  # type: ignore[arg-type]
        with self._lock:
            self._in_flight -= len(streams)
        self._outbox += [(s, Failed(message)) for s in streams]
        self._flush()

    def _take_snapshot(self) -> LoopSnapshot:
        return take_snapshot(self.engine)


def take_snapshot(engine: ServingEngine) -> LoopSnapshot:
    """The engine's state for /metrics (called by whoever runs the engine, never another)."""
    stats = engine.stats()
    evictable = engine.prefix.evictable() if engine.prefix is not None else 0
    return LoopSnapshot(stats, stats.blocks_free + evictable, time.perf_counter())


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
