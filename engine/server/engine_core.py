"""The engine process's main (engine/server/engine_process.py starts it with multiprocessing's
"spawn" context): it builds the engine from its spec (the model is loaded here, never in the
server's process), says it is ready, then loops: take the server's commands, step, send the
step's outputs back in one message. It is the only code that touches the engine.

Messages (tuples; the server sends lists of commands through a multiprocessing.Connection, the
engine one message at a time through engine/server/pipe_messages.py):

    server -> engine   ("add", request_id, prompt_ids, SamplingParams)
                       ("abort", request_id)            unknown ids are ignored
                       ("drain", deadline_s)            abort what still runs after deadline_s
                       ("stop",)                        abort everything, report it, exit
    engine -> server   ("ready", EngineInfo, LoopSnapshot)
                       ("refused", message)             the model cannot load (a user error)
                       ("crashed", message)             the build failed otherwise (a bug)
                       ("events", accepted, rejected, outputs, step, snapshot)   per iteration
                       ("failed", message)              the loop failed: nothing more comes
                       ("stopped",)                     after "stop": nothing more comes

An "events" message holds what one iteration did: `accepted` [(request_id, prompt tokens)],
`rejected` [(request_id, message)] (add_request said no), `outputs` the step's RequestOutputs
as field tuples (RequestOutput(*t) rebuilds one; timings only on the last), `step`
(seconds since the previous step's end or None after an idle stretch, the step's seconds, its
end on perf_counter's clock, which is the machine's monotonic clock, shared by the processes)
or None (no step), and a fresh snapshot for /metrics or None (at most every
SNAPSHOT_INTERVAL_S while busy, and whenever it goes idle).

The process ends with the server: when the command pipe closes (the server exited or died),
and, for a server killed while the engine is busy loading or stepping, when a watchdog thread
sees that its parent changed.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from toyllm.engine.generate import GenerationError
from toyllm.engine.server.engine_loop import IDLE_WAIT_S, SNAPSHOT_INTERVAL_S, take_snapshot
from toyllm.engine.server.engine_spec import EngineSpec
from toyllm.engine.server.pipe_messages import write_message

log = logging.getLogger("toyllm.server.engine")

# how often the watchdog checks that the server process is still its parent
WATCHDOG_INTERVAL_S = 0.5


def main(spec: EngineSpec, commands: Connection, results: Connection, parent_pid: int) -> None:
    """The engine process: build, report, serve commands until "stop" or the server is gone."""
    # Ctrl-C in a terminal, or a service manager's SIGTERM to the whole group, reaches this
    # process too: the server drains and stops it, so it must not die first
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _watch_parent(parent_pid)
    out = results.fileno()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        engine, info = spec.build()
    except Exception as exc:
        from toyllm.engine.cli import _out_of_memory, is_user_error

        if is_user_error(exc) or _out_of_memory(exc):
            write_message(out, ("refused", str(exc)))
        else:
            traceback.print_exc()
            write_message(out, ("crashed", f"{type(exc).__name__}: {exc}"))
        return
    write_message(out, ("ready", info, take_snapshot(engine)))
    try:
        _Core(engine, commands, out).run()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the server is gone: so is this process


def _watch_parent(parent_pid: int) -> None:
    """End this process when the server's process is gone (it was reparented), whatever the
    engine is doing: a server killed while the model loads leaves no orphan either."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(WATCHDOG_INTERVAL_S)
        os._exit(1)

    threading.Thread(target=watch, name="toyllm-engine-watchdog", daemon=True).start()


class _Core:
    def __init__(self, engine: Any, commands: Connection, results: int) -> None:
        self.engine = engine
        self.commands = commands
        self.results = results  # the pipe's file descriptor
        self.live: set[str] = set()  # requests admitted and not finished
        self.accepted: list[tuple[str, int]] = []
        self.rejected: list[tuple[str, str]] = []
        self.deadline: float | None = None  # monotonic
        self.stopping = False

    def run(self) -> None:
        engine = self.engine
        last_snapshot = 0.0
        changed = False  # since the last snapshot
        last_step_end: float | None = None  # perf_counter, while steps follow one another
        try:
            while True:
                busy = engine.has_unfinished()
                changed |= self._take_commands(block=not busy and not self.stopping)
                deadline = self.deadline
                if (self.stopping or (deadline is not None and time.monotonic() >= deadline)) \
                        and self.live:
                    for rid in list(self.live):
                        engine.abort(rid)
                if engine.has_unfinished():
                    started = time.perf_counter()
                    between = None if last_step_end is None else started - last_step_end
                    outputs = engine.step()
                    now = last_step_end = time.perf_counter()
                    snapshot = None
                    if now - last_snapshot >= SNAPSHOT_INTERVAL_S:
                        snapshot, last_snapshot, changed = take_snapshot(engine), now, False
                    else:
                        changed = True
                    self._send(outputs, (between, now - started, now), snapshot)
                    continue
                last_step_end = None  # idle: the next step starts a new busy stretch
                snapshot = None
                if changed:  # idle now: show the state the engine rests in
                    snapshot, last_snapshot = take_snapshot(engine), time.perf_counter()
                    changed = False
                if self.accepted or self.rejected or snapshot is not None:
                    self._send([], None, snapshot)
                if self.stopping and not self.live:
                    write_message(self.results, ("stopped",))
                    return
        except (EOFError, BrokenPipeError, ConnectionResetError):
            raise
        except Exception as exc:  # a bug or a device failure: the server ends every request
            log.exception("engine loop failed")
            write_message(self.results, ("failed", f"the engine loop failed: "
                                                   f"{type(exc).__name__}: {exc}"))

    def _take_commands(self, block: bool) -> bool:
        """Apply the commands that came (waiting up to IDLE_WAIT_S for one when `block`):
        whether there were any. EOFError: the server closed the pipe."""
        if not self.commands.poll(IDLE_WAIT_S if block else 0):
            return False
        while True:
            for command in self.commands.recv():  # the commands queued since the last send
                kind = command[0]
                if kind == "add":
                    self._add(*command[1:])
                elif kind == "abort":
                    self.engine.abort(command[1])
                elif kind == "drain":
                    if self.deadline is None:
                        self.deadline = time.monotonic() + command[1]
                else:
                    self.stopping = True
            if not self.commands.poll(0):
                return True

    def _add(self, rid: str, prompt_ids: list[int], params: Any) -> None:
        try:
            self.engine.add_request(prompt_ids, params, rid)
        except GenerationError as exc:
            self.rejected.append((rid, str(exc)))
            return
        self.live.add(rid)
        self.accepted.append((rid, len(prompt_ids)))

    def _send(self, outputs: list[Any], step: tuple[float | None, float, float] | None,
              snapshot: Any) -> None:
        rows = []
        for out in outputs:
            if out.finished:
                self.live.discard(out.request_id)
            rows.append(_fields(out))
        accepted, rejected = self.accepted, self.rejected
        self.accepted, self.rejected = [], []
        write_message(self.results, ("events", accepted, rejected, rows, step, snapshot))


def _fields(out: Any) -> tuple:
    """A RequestOutput as the tuple of its fields, in order (RequestOutput(*t) rebuilds it)."""
    return (out.request_id, out.new_token_ids, out.new_text, out.finished, out.finish_reason,
            out.prompt_tokens, out.completion_tokens, out.error, out.timings, out.logprobs)

