"""A stand-in for ServingEngine whose steps take a set time, to measure the HTTP server alone
(engine/tools/http_bench.py --paced): each step holds the GIL for `hold_s` (the Python of a
GPU step: scheduling, launches, sampling's bookkeeping, building outputs), then waits with the
GIL released until `step_s` has passed (the GPU running), and gives every running request one
token. Its outputs are what the server streams (token ids, their text, timings, a finish), so
the server's work per step is the real one, at the step rate of a GPU engine, on a CPU.

Run as a script, it serves itself through toyllm's server (EngineLoop, the app, uvicorn) like
`toyllm serve` and prints the same first line; it imports toyllm's server from whichever
checkout the interpreter sees, so that another checkout's server runs under the same engine:

    python engine/tools/paced_engine.py --port 0 --step-ms 4.4 --hold-ms 1.5 --max-running 256

`--engine process` (the default) runs the paced engine in the engine process, as `toyllm serve`
runs its model; `--engine thread` in a thread of the server's process.

It runs no model: no figure it gives says anything about the engine, only about the server.
"""

from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import dataclass, field

import torch

from toyllm.engine.request import RequestTimings
from toyllm.engine.sampling import SamplingParams
from toyllm.engine.serving import RequestOutput, ServingStats

# a token's text repeats through these many ids of the tokenizer (all with text of their own)
TEXT_TOKENS = 64


@dataclass
class _Paced:
    request_id: str
    prompt_tokens: int
    max_new_tokens: int
    timings: RequestTimings
    produced: int = 0
    token_ids: list[int] = field(default_factory=list)


class PacedEngine:
    """The part of ServingEngine's interface that EngineLoop and the benchmark use."""

    def __init__(self, tokenizer: object, *, step_s: float, hold_s: float,
                 max_running: int) -> None:
        if not 0 <= hold_s <= step_s:
            raise ValueError(f"paced engine: expected 0 <= hold <= step, got hold {hold_s} s, "
                             f"step {step_s} s")
        self.device = torch.device("cpu")
        self.max_running = max_running
        self.max_seq_len = 1 << 20
        self.prefix = None
        self.step_s, self.hold_s = step_s, hold_s
        texts = []
        for token_id in range(tokenizer.vocab_size):  # type: ignore[attr-defined]
            text = tokenizer.decode([token_id])  # type: ignore[attr-defined]
            if text.strip() and text.isprintable():
                texts.append((token_id, text))
            if len(texts) == TEXT_TOKENS:
                break
        self._texts = texts
        self._running: dict[str, _Paced] = {}
        self._aborted: list[RequestOutput] = []
        self._ids = itertools.count()
        self.steps = 0
        self.finished = 0

    def add_request(self, prompt: list[int], params: SamplingParams,
                    request_id: str | None = None) -> str:
        rid = request_id if request_id is not None else f"paced-{next(self._ids)}"
        self._running[rid] = _Paced(rid, len(prompt), params.max_new_tokens,
                                    RequestTimings(time.perf_counter()))
        return rid

    def abort(self, request_id: str) -> None:
        request = self._running.pop(request_id, None)
        if request is not None:
            self._aborted.append(self._output(request, [], "", "abort"))

    def has_unfinished(self) -> bool:
        return bool(self._running) or bool(self._aborted)

    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        while time.perf_counter() - start < self.hold_s:  # the step's Python, GIL held
            pass
        outputs, self._aborted = self._aborted, []
        now = time.perf_counter()
        for request in list(self._running.values()):
            token_id, text = self._texts[request.produced % len(self._texts)]
            request.produced += 1
            request.timings.token_times.append(now)
            if request.timings.first_token is None:
                request.timings.first_token = now
            done = request.produced >= request.max_new_tokens
            if done:
                del self._running[request.request_id]
                self.finished += 1
            outputs.append(self._output(request, [token_id], text,
                                        "max_new_tokens" if done else None))
        self.steps += 1
        left = self.step_s - (time.perf_counter() - start)
        if left > 0:
            time.sleep(left)  # the device's part of the step, GIL released
        return outputs

    def _output(self, request: _Paced, token_ids: list[int], text: str,
                reason: str | None) -> RequestOutput:
        finished = reason is not None
        return RequestOutput(request.request_id, token_ids, text, finished, reason,
                             request.prompt_tokens, request.produced,
                             timings=request.timings if finished else None)

    def stats(self) -> ServingStats:
        return ServingStats(running=len(self._running), waiting=0, blocks_used=0, blocks_free=0,
                            blocks_total=0, blocks_cached=0, block_size=16, bytes_per_block=0,
                            preemptions=0, prefix_hit_blocks=0, prefix_evictions=0,
                            steps=self.steps, prefill_tokens=0, decode_tokens=0,
                            finished=self.finished)


@dataclass(frozen=True)
class PacedSpec:
    """A PacedEngine as the server's engine spec (engine/server/engine_spec.py): built where
    the engine runs, in the engine process or the server's."""

    step_s: float
    hold_s: float
    max_running: int

    def build(self) -> tuple[PacedEngine, object]:
        from toyllm.engine.server.engine_spec import EngineInfo

        tokenizer = shipped_tokenizer()
        engine = PacedEngine(tokenizer, step_s=self.step_s, hold_s=self.hold_s,
                             max_running=self.max_running)
        return engine, EngineInfo(tokenizer, "paced", tokenizer.vocab_size,  # type: ignore
                                  engine.max_seq_len, self.max_running, "cpu", "paced")


def shipped_tokenizer() -> object:
    from toyllm.models.model_source import DEFAULT_MODEL_DIR
    from toyllm.models.tokenizer import Tokenizer

    return Tokenizer.from_file(DEFAULT_MODEL_DIR / "tokenizer.model")


def serve(argv: list[str] | None = None) -> int:
    """Serve a PacedEngine through toyllm's server until SIGTERM."""
    import uvicorn

    from toyllm.engine.server.app import ServerState, build_app
    from toyllm.engine.server.engine_loop import EngineLoop
    from toyllm.engine.server.launch import PreparedServer, _GracefulServer, bind
    from toyllm.engine.server.metrics import Metrics

    ap = argparse.ArgumentParser(prog="paced_engine.py", description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--step-ms", type=float, required=True)
    ap.add_argument("--hold-ms", type=float, required=True)
    ap.add_argument("--max-running", type=int, default=256)
    ap.add_argument("--max-waiting", type=int, default=256)
    ap.add_argument("--served-model-name", default="bench")
    ap.add_argument("--stream-interval", type=int, default=1)
    ap.add_argument("--engine", choices=("process", "thread"), default="process",
                    help="where the engine runs (a checkout without the engine process: thread)")
    a = ap.parse_args(argv)
    metrics = Metrics()
    # a server without --stream-interval (an older checkout's) is measured at its default
    interval = {"stream_interval": a.stream_interval} if a.stream_interval != 1 else {}
    try:  # the engine spec from toyllm's module, not this file's __main__: the engine
        # process imports it by name
        from toyllm.engine.server.launch import start_engine
        from toyllm.engine.tools.paced_engine import PacedSpec
    except ImportError:  # an older checkout: the engine thread, built here
        start_engine = None
    if start_engine is not None:
        spec = PacedSpec(a.step_ms / 1e3, a.hold_ms / 1e3, a.max_running)
        loop, info = start_engine(spec, metrics, engine=a.engine, max_waiting=a.max_waiting,
                                  stream_interval=a.stream_interval)
        tokenizer, max_seq_len = info.tokenizer, info.max_seq_len
    else:
        tokenizer = shipped_tokenizer()
        engine = PacedEngine(tokenizer, step_s=a.step_ms / 1e3, hold_s=a.hold_ms / 1e3,
                             max_running=a.max_running)
        max_seq_len = engine.max_seq_len
        loop = EngineLoop(engine, metrics, max_waiting=a.max_waiting,  # type: ignore[arg-type]
                          **interval)
    state = ServerState(loop, metrics, tokenizer, a.served_model_name, max_seq_len,
                        tokenizer.vocab_size)  # type: ignore[attr-defined]
    config = uvicorn.Config(build_app(state), lifespan="off", log_level="warning",
                            access_log=False)
    sock = bind("127.0.0.1", a.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}"
    description = f"{a.served_model_name} on {url} (paced: {a.step_ms} ms steps)"
    prepared = PreparedServer(sock, loop, state, _GracefulServer(config, loop, 5.0), url,
                              description)
    print(f"toyllm serve: {description}", flush=True)
    prepared.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(serve())
