"""The engine in a process of its own (as vLLM's engine core): the HTTP server's event loop and
the engine no longer share one GIL. `EngineProcess` shows the same face as EngineLoop (the
engine thread) and shares its admission rules (engine_face.py: `submit` / `abort` / `drain` /
`stop`, `snapshot`, `in_flight`, `alive`, `failure`, the RequestStream mailboxes and Accepted /
Rejected / Failed events, the Overloaded backpressure); app.py cannot tell them apart.

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

import logging
import multiprocessing
import os
import queue
import select
import threading
from typing import Any

from toyllm.engine.server.engine_face import EngineFace, Event, RequestStream, hand_over
from toyllm.engine.server.engine_spec import EngineInfo, EngineSpec, ServeError
from toyllm.engine.server.metrics import Metrics
from toyllm.engine.server.pipe_messages import MessageReader, widen
from toyllm.engine.server.step_loop import LoopSnapshot
from toyllm.engine.serving import RequestOutput

log = logging.getLogger("toyllm.server")

# how often the server checks, while the engine builds, that its process still lives
STARTUP_POLL_S = 0.5
# how long `stop` waits for the engine process to exit once it said it stopped, or on its own
EXIT_WAIT_S = 10.0


class EngineProcess(EngineFace):
    def __init__(self, process: multiprocessing.process.BaseProcess, commands: Any,
                 results: Any, messages: MessageReader, info: EngineInfo,
                 snapshot: LoopSnapshot, metrics: Metrics, *, max_waiting: int,
                 stream_interval: int = 1) -> None:
        """Use `spawn`: this takes an engine process that said it is ready."""
        super().__init__(metrics, snapshot, max_running=info.max_running,
                         max_waiting=max_waiting, stream_interval=stream_interval)
        self.info = info
        self._process = process
        self._commands = commands  # Connection, server -> engine (the sender thread's)
        self._results = results  # Connection, engine -> server (the reader thread's)
        self._messages = messages  # of `results`: what came after the "ready" message
        self._outgoing: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._stopping = False  # (_lock)
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

    def _running(self) -> bool:
        return self._process.is_alive()

    @property
    def pid(self) -> int | None:
        """The engine process's id."""
        return self._process.pid

    def _send_add(self, stream: RequestStream) -> None:
        self._outgoing.put(("add", stream.request_id, stream.prompt_ids, stream.params))

    def abort(self, request_id: str) -> None:
        """Stop a request (any thread): its blocks are freed before the engine's next step."""
        self._outgoing.put(("abort", request_id))

    def _send_drain(self, deadline_s: float) -> None:
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
                        accepted, rejected, rows, step, snapshot = message[1:]
                        outputs = (RequestOutput(*fields) for fields in rows)
                        self._take_iteration(accepted, rejected, outputs, step, snapshot,
                                             events)
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
