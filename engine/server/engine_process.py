"""The engine in a process of its own (as vLLM's engine core): the HTTP server's event loop and
the engine no longer share one GIL. `EngineProcess` has EngineLoop's face (engine_loop.py):
`submit` / `abort` / `drain` / `stop`, `snapshot`, `in_flight`, `alive`, `failure`, the same
RequestStream mailboxes and Accepted / Rejected / Failed events, the same Overloaded
backpressure; app.py cannot tell them apart.

    engine = EngineProcess.spawn(spec, metrics, max_waiting=256)   # waits until it is ready
    engine.info.tokenizer                                          # for the handlers
    engine.start()                                                  # the reader thread
    stream = engine.submit(prompt_ids, params)                     # as EngineLoop's

    server process                                   engine process (engine_core.py)
      event loop: submit / abort / drain / stop        builds the model from the spec
        -> command queue -> sender thread --pipe-->     each iteration: take commands, step,
      reader thread <--pipe-- one message per step --   send every output of the step and the
        metrics, in-flight count, then one              /metrics snapshot in one message
        call_soon_threadsafe with the step's events

The event loop never writes to the pipe itself (a sender thread does, every command queued
meanwhile in one write), so a busy or hung engine never blocks it. The reader thread reads
every message the pipe holds in one system call (pipe_messages.py) and hands the events of all
of them over in one call: a reader that fell behind catches up in one wake. Detokenization and
stop strings stay in the engine process: the server's work per token is building its SSE
chunk.

Failures: an engine that fails to build reports it before the server listens (a user error:
ServeError, one line, exit 2); an engine process that dies or whose loop fails while serving
ends every stream with Failed, and `alive` is False (/health says 503 with the reason). The
engine process ends with the server: it is a daemon, it exits when the command pipe closes,
and a watchdog in it exits when its parent is gone.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import queue
import select
import threading
import time
from typing import Any

from toyllm.engine.generate import GenerationError
from toyllm.engine.sampling import SamplingParams
from toyllm.engine.server.engine_loop import (
    Accepted,
    Event,
    Failed,
    LoopSnapshot,
    Overloaded,
    Rejected,
    RequestStream,
    ShuttingDown,
    hand_over,
)
from toyllm.engine.server.engine_spec import EngineInfo, EngineSpec, ServeError
from toyllm.engine.server.metrics import Metrics
from toyllm.engine.server.pipe_messages import MessageReader, widen
from toyllm.engine.serving import RequestOutput

log = logging.getLogger("toyllm.server")

# how often the server checks, while the engine builds, that its process still lives
STARTUP_POLL_S = 0.5
# how long `stop` waits for the engine process to exit once it said it stopped, or on its own
EXIT_WAIT_S = 10.0

_ACCEPTED = Accepted()


class EngineProcess:
    def __init__(self, process: multiprocessing.process.BaseProcess, commands: Any,
                 results: Any, messages: MessageReader, info: EngineInfo,
                 snapshot: LoopSnapshot, metrics: Metrics, *, max_waiting: int,
                 stream_interval: int = 1) -> None:
        """Use `spawn`: this takes an engine process that said it is ready."""
        if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0:
            raise GenerationError(f"max_waiting: expected an integer >= 0, got {max_waiting!r}")
        if isinstance(stream_interval, bool) or not isinstance(stream_interval, int) \
                or stream_interval < 1:
            raise GenerationError(f"stream_interval: expected an integer >= 1, got "
                                  f"{stream_interval!r}")
        self.info = info
        self.metrics = metrics
        self.stream_interval = stream_interval
        self.capacity = info.max_running + max_waiting
        self.snapshot = snapshot
        self.failure: str | None = None
        self._process = process
        self._commands = commands  # Connection, server -> engine (the sender thread's)
        self._results = results  # Connection, engine -> server (the reader thread's)
        self._messages = messages  # of `results`: what came after the "ready" message
        self._outgoing: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # admitted here, not finished
        self._lock = threading.Lock()  # guards _in_flight, _draining, failure, _streams
        self._in_flight = 0
        self._draining = False
        self._stopping = False
        self._ids = itertools.count()
        self._prefix = f"{os.getpid():x}{int(time.time()) & 0xFFFFFF:x}"
        self._reader = threading.Thread(target=self._read, name="toyllm-engine-reader",
                                        daemon=True)
        self._sender = threading.Thread(target=self._send, name="toyllm-engine-sender",
                                        daemon=True)

    @classmethod
    def spawn(cls, spec: EngineSpec, metrics: Metrics, *, max_waiting: int,
              stream_interval: int = 1) -> EngineProcess:
        """Start the engine process and wait until it built the engine. ServeError (one line)
        when it could not: the model did not load (its message), or the process died."""
        from toyllm.engine.server import engine_core

        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        commands_out, commands_in = context.Pipe(duplex=False)  # (recv end, send end)
        results_out, results_in = context.Pipe(duplex=False)
        widen(commands_in.fileno())
        widen(results_out.fileno())
        process = context.Process(target=engine_core.main, name="toyllm-engine",
                                  args=(spec, commands_out, results_in, os.getpid()),
                                  daemon=True)
        process.start()
        # the engine's ends live in the engine process now: closing ours here means its exit
        # closes the results pipe (EOF for the reader) and ours closes the commands pipe
        commands_out.close()
        results_in.close()
        reader = MessageReader(results_out.fileno())
        try:
            message = _first_message(process, reader)
            if message[0] == "refused":
                raise ServeError(message[1])
            if message[0] == "crashed":
                raise ServeError(f"the engine process could not build the engine: "
                                 f"{message[1]}")
            _, info, snapshot = message
            return cls(process, commands_in, results_out, reader, info, snapshot, metrics,
                       max_waiting=max_waiting, stream_interval=stream_interval)
        except BaseException:
            commands_in.close()
            results_out.close()
            process.join(EXIT_WAIT_S)
            if process.is_alive():
                process.kill()
                process.join()
            raise

    # the event loop's side --------------------------------------------------------------------
    def start(self) -> None:
        self._sender.start()
        self._reader.start()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def alive(self) -> bool:
        return self._process.is_alive() and self.failure is None

    @property
    def pid(self) -> int | None:
        """The engine process's id."""
        return self._process.pid

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
        self._outgoing.put(("add", stream.request_id, prompt_ids, params))
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request (any thread): its blocks are freed before the engine's next step."""
        self._outgoing.put(("abort", request_id))

    def drain(self, deadline_s: float) -> None:
        """Refuse new requests; abort those still running `deadline_s` seconds from now."""
        with self._lock:
            if self._draining:
                return
            self._draining = True
        self._outgoing.put(("drain", deadline_s))

    def stop(self, timeout_s: float = EXIT_WAIT_S) -> None:
        """Abort everything in flight, report it, end the engine process and the threads."""
        with self._lock:
            self._draining = self._stopping = True
        self._outgoing.put(("stop",))
        self._outgoing.put(None)  # the sender's end
        if not self._sender.is_alive():  # never started: the closed pipe ends the engine
            self._commands.close()
        if self._reader.is_alive():  # until the engine said "stopped" (its aborts came back)
            self._reader.join(timeout_s)
        if self._sender.is_alive():
            self._sender.join(timeout_s)
        self._commands.close()
        self._process.join(timeout_s)
        if self._process.is_alive():  # it did not stop: no request of it is answered anyway
            self._process.kill()
            self._process.join()
        self._fail_all("the engine process ended")  # any request it did not answer

    # the sender thread --------------------------------------------------------------------------
    def _send(self) -> None:
        """Send the commands queued since the last send in one message (one system call: a
        write gives up the GIL, which a busy event loop then holds for a while)."""
        while True:
            batch = [self._outgoing.get()]
            while batch[-1] is not None:
                try:
                    batch.append(self._outgoing.get_nowait())
                except queue.Empty:
                    break
            commands = [c for c in batch if c is not None]
            try:
                if commands:
                    self._commands.send(commands)
            except (OSError, ValueError):  # the engine process is gone: the reader says so
                return
            if batch[-1] is None:
                return

    # the reader thread --------------------------------------------------------------------------
    def _read(self) -> None:
        try:
            while True:
                try:
                    messages = self._messages.read()  # every whole message the pipe holds
                except (EOFError, OSError):
                    self._process.join(EXIT_WAIT_S)
                    self._failed(f"the engine process exited (exit code "
                                 f"{self._process.exitcode})")
                    return
                events: list[tuple[RequestStream, Event]] = []
                for message in messages:
                    kind = message[0]
                    if kind == "events":
                        self._events(*message[1:], events)
                        continue
                    hand_over(events)
                    if kind == "failed":
                        self._failed(message[1])
                    return  # "failed" or "stopped": nothing more comes
                if events:  # the iterations read at once: one handoff
                    hand_over(events)
        except Exception as exc:  # a bug of this side: end every request, say why
            log.exception("engine reader failed")
            self._failed(f"the engine reader failed: {type(exc).__name__}: {exc}")
        finally:
            self._results.close()

    def _events(self, accepted: list[tuple[str, int]], rejected: list[tuple[str, str]],
                outputs: list[tuple], step: tuple[float | None, float, float] | None,
                snapshot: LoopSnapshot | None, events: list[tuple[RequestStream, Event]]
                ) -> None:
        """One iteration of the engine: metrics and bookkeeping; its events appended to
        `events` for the event loop."""
        metrics = self.metrics
        streams = self._streams
        for rid, prompt_tokens in accepted:
            metrics.admitted(prompt_tokens)
            stream = streams.get(rid)
            if stream is not None:  # None: ended here already (a failure, a stop)
                events.append((stream, _ACCEPTED))
        for rid, message in rejected:
            metrics.rejected("invalid")
            stream = self._finished_one(rid)
            if stream is not None:
                events.append((stream, Rejected(message)))
        if step is not None:
            between, step_s, now = step
            if between is not None:  # since: sending the outputs, taking commands
                metrics.between_steps(between)
            metrics.stepped(step_s)
            tokens = 0
            for fields in outputs:
                out = RequestOutput(*fields)
                tokens += len(out.new_token_ids)
                stream = streams.get(out.request_id)
                if stream is None:  # ended here already (a failure, a stop)
                    continue
                events.append((stream, out))
                if out.finished:
                    self._finished_one(out.request_id)
                    metrics.finished(out, now)
            if tokens:
                metrics.generated(now, tokens)
        if snapshot is not None:
            self.snapshot = snapshot

    def _finished_one(self, request_id: str) -> RequestStream | None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                self._in_flight -= 1
            return stream

    def _failed(self, message: str) -> None:
        """The engine is gone or failed: say so (/health, submit) unless it was asked to stop,
        and end every request it has not answered."""
        with self._lock:
            report = not self._stopping and self.failure is None
            if report:
                self.failure = message
        if report:
            log.error("%s", message)
        self._fail_all(message)

    def _fail_all(self, message: str) -> None:
        """End every request the engine has not answered."""
        with self._lock:
            streams = list(self._streams.values())
            self._streams.clear()
            self._in_flight -= len(streams)
        if streams:
            hand_over([(s, Failed(message)) for s in streams])


def _first_message(process: multiprocessing.process.BaseProcess,
                   reader: MessageReader) -> tuple:
    """The engine process's first message (ready, refused, crashed); ServeError when it dies
    before it sends one. It sends nothing more until it has commands."""
    fd = reader.fd
    while not select.select([fd], [], [], STARTUP_POLL_S)[0]:
        if not process.is_alive() and not select.select([fd], [], [], 0)[0]:
            process.join()
            raise ServeError(f"the engine process exited (exit code {process.exitcode}) "
                             f"before the engine was ready")
    try:
        return reader.read()[0]
    except EOFError:
        process.join()
        raise ServeError(f"the engine process exited (exit code {process.exitcode}) before "
                         f"the engine was ready") from None
