"""The engine in a thread of the server's process (`toyllm serve --engine thread`): one thread
owns the ServingEngine (and so the model and its device) and is the only one that calls it,
running the engine's iteration loop (step_loop.py). HTTP handlers, on the asyncio event loop,
talk to it through the face both engines share (engine_face.py: submit, abort, drain, stop)
and a command queue; the thread hands over an iteration's events (the admissions it took,
every output of its step) in one `call_soon_threadsafe`, however many requests run: the event
loop is called once per iteration, not once per request (what a step costs the engine thread
beyond the step itself shows in /metrics: toyllm_engine_between_steps_seconds).

    loop = EngineLoop(engine, metrics, max_waiting=256)
    loop.start()
    stream = loop.submit(prompt_ids, params)     # as engine_face.py shows

Cancellation: an abort is taken before the next step, so a request whose client disconnected
runs at most the step in progress, and its KV blocks are freed at once (ServingEngine.abort).
Shutdown: `drain` refuses new requests and, after its deadline, aborts whatever still runs;
`stop` aborts everything, reports it and ends the thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import torch

from toyllm.engine.server.engine_face import EngineFace, Event, RequestStream, hand_over
from toyllm.engine.server.metrics import Metrics
from toyllm.engine.server.step_loop import (
    IDLE_WAIT_S,
    LoopSnapshot,
    StepLoop,
    StepTimes,
    take_snapshot,
)
from toyllm.engine.serving import RequestOutput, ServingEngine

log = logging.getLogger("toyllm.server")


class EngineLoop(EngineFace, StepLoop):
    def __init__(self, engine: ServingEngine, metrics: Metrics, *, max_waiting: int,
                 stream_interval: int = 1) -> None:
        EngineFace.__init__(self, metrics, take_snapshot(engine), max_running=engine.max_running,
                            max_waiting=max_waiting, stream_interval=stream_interval)
        StepLoop.__init__(self, engine, log)
        # ("add", RequestStream), ("abort", request id), ("stop", None)
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="toyllm-engine-loop",
                                        daemon=True)

    # the event loop's side --------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def abort(self, request_id: str) -> None:
        """Stop a request (any thread): its blocks are freed before the next step."""
        self._commands.put(("abort", request_id))

    def stop(self, timeout_s: float = 10.0) -> None:
        """Abort everything in flight, report it, end the thread."""
        with self._lock:
            self._draining = True
        self._commands.put(("stop", None))
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _running(self) -> bool:
        return self._thread.is_alive()

    def _send_add(self, stream: RequestStream) -> None:
        self._commands.put(("add", stream))

    def _send_drain(self, deadline_s: float) -> None:
        self._deadline = time.monotonic() + deadline_s

    # the loop thread --------------------------------------------------------------------------
    def _run(self) -> None:
        if self.engine.device.type == "cuda":
            torch.cuda.set_device(self.engine.device)  # the current device is per thread
        self.run()

    def _take_commands(self, block: bool) -> tuple[bool, bool]:
        stop = False
        try:
            command = self._commands.get(timeout=IDLE_WAIT_S) if block \
                else self._commands.get_nowait()
        except queue.Empty:
            return False, False
        while True:
            kind, arg = command
            if kind == "add":
                self._add(arg.request_id, arg.prompt_ids, arg.params)
            elif kind == "abort":
                self.engine.abort(arg)  # unknown ids are ignored
            else:
                stop = True
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True, stop

    def _report_iteration(self, accepted: list[tuple[str, int]], rejected: list[tuple[str, str]],
                          outputs: list[RequestOutput], step: StepTimes | None,
                          snapshot: LoopSnapshot | None) -> None:
        """The iteration's events to their streams: one handoff, the commands' and the step's."""
        events: list[tuple[RequestStream, Event]] = []
        self._take_iteration(accepted, rejected, outputs, step, snapshot, events)
        if events:
            hand_over(events)

    def _loop_failed(self, message: str) -> None:
        with self._lock:
            self.failure = message
        self._fail_all(message)
