"""The engine process's main (engine/server/engine_process.py starts it with multiprocessing's
"spawn" context): it builds the engine from its spec (the model is loaded here, never in the
server's process), says it is ready, then runs the engine's iteration loop (step_loop.py, the
engine thread's too): take the server's commands, step, send the iteration's events back in one
message. It is the only code that touches the engine.

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
the step's StepTimes (step_loop.py: seconds since the previous step's end or None after an
idle stretch, the step's seconds, its end on perf_counter's clock, which is the machine's
monotonic clock, shared by the processes) or None (no step), and a fresh snapshot for
/metrics or None (at most every SNAPSHOT_INTERVAL_S while busy, and whenever it goes idle).

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

from toyllm.engine.server.engine_spec import EngineSpec
from toyllm.engine.server.pipe_messages import write_message
from toyllm.engine.server.step_loop import IDLE_WAIT_S, StepLoop, StepTimes, take_snapshot

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
    except _Core.PASSED_THROUGH:
        pass  # the server is gone: so is this process


def _watch_parent(parent_pid: int) -> None:
    """End this process when the server's process is gone (it was reparented), whatever the
    engine is doing: a server killed while the model loads leaves no orphan either."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(WATCHDOG_INTERVAL_S)
        os._exit(1)

    threading.Thread(target=watch, name="toyllm-engine-watchdog", daemon=True).start()


class _Core(StepLoop):
    """The engine process's loop: commands from the server's pipe, one message per iteration
    back."""

    # the server is gone: so is this process, and nobody is left to tell
    PASSED_THROUGH = (EOFError, BrokenPipeError, ConnectionResetError)

    def __init__(self, engine: Any, commands: Connection, results: int) -> None:
        super().__init__(engine, log)
        self.commands = commands
        self.results = results  # the pipe's file descriptor

    def _take_commands(self, block: bool) -> tuple[bool, bool]:
        """EOFError: the server closed the pipe."""
        if not self.commands.poll(IDLE_WAIT_S if block else 0):
            return False, False
        stop = False
        while True:
            for command in self.commands.recv():  # the commands queued since the last send
                kind = command[0]
                if kind == "add":
                    self._add(*command[1:])
                elif kind == "abort":
                    self.engine.abort(command[1])
                elif kind == "drain":
                    if self._deadline is None:
                        self._deadline = time.monotonic() + command[1]
                else:
                    stop = True
            if not self.commands.poll(0):
                return True, stop

    def _report_iteration(self, accepted: list[tuple[str, int]], rejected: list[tuple[str, str]],
                          outputs: list[Any], step: StepTimes | None, snapshot: Any) -> None:
        rows = [_fields(out) for out in outputs]
        write_message(self.results, ("events", accepted, rejected, rows, step, snapshot))

    def _stopped(self) -> None:
        write_message(self.results, ("stopped",))

    def _loop_failed(self, message: str) -> None:
        write_message(self.results, ("failed", message))


def _fields(out: Any) -> tuple:
    """A RequestOutput as the tuple of its fields, in order (RequestOutput(*t) rebuilds it)."""
    return (out.request_id, out.new_token_ids, out.new_text, out.finished, out.finish_reason,
            out.prompt_tokens, out.completion_tokens, out.error, out.timings, out.logprobs)

