"""`toyllm serve` stops gracefully on SIGTERM: no new requests (the socket closes, /health would
say so), a short running request finishes, a long one is aborted at the deadline (its stream
ends with finish_reason "abort" and [DONE]), and the process exits 0."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import openai
import pytest
from server_helpers import start_process, stop_process

from toyllm.models.model_source import DEFAULT_MODEL_DIR

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "model.safetensors").is_file(),
                                reason="the shipped model is not built")
DEADLINE_S = 4.0


def _read(stream, into: dict, first: threading.Event) -> None:
    pieces, reasons = [], []
    try:
        for chunk in stream:
            first.set()
            pieces.append(chunk.choices[0].text)
            reasons.append(chunk.choices[0].finish_reason)
    except Exception as exc:  # noqa: BLE001 - the test reports what the stream raised
        into["error"] = repr(exc)
    first.set()
    into["text"], into["reasons"] = "".join(pieces), [r for r in reasons if r]
    into["ended_at"] = time.monotonic()


def test_sigterm_finishes_short_requests_aborts_long_ones_at_the_deadline_and_exits_0() -> None:
    server = start_process("--kv-memory", "64MiB", "--device", "cpu",
                           "--shutdown-timeout", str(DEADLINE_S))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        results: dict[str, dict] = {"short": {}, "long": {}}
        threads = []
        for name, tokens in (("long", 1000), ("short", 60)):  # SIGTERM right after short starts
            stream = client.completions.create(
                model="default", prompt="def f(x):", max_tokens=tokens, temperature=0.8,
                seed=1, stream=True, extra_body={"ignore_eos": True})
            first = threading.Event()
            t = threading.Thread(target=_read, args=(stream, results[name], first))
            t.start()
            assert first.wait(30)
            threads.append(t)
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(timeout=30)
        stopped = time.monotonic()
        for t in threads:
            t.join(10)
        out = server.proc.stdout.read()
        assert code == 0, server.stderr()
        assert "toyllm serve: stopped" in out
        short, long = results["short"], results["long"]
        assert "error" not in short and short["reasons"] == ["length"], short
        assert short["ended_at"] > sent  # it was running when the signal came, and finished
        assert "error" not in long and long["reasons"] == ["abort"], long
        assert DEADLINE_S - 0.5 <= long["ended_at"] - sent <= DEADLINE_S + 5
        assert stopped - sent <= DEADLINE_S + 10
        with pytest.raises(httpx.TransportError):  # nobody listens any more
            httpx.get(f"{server.url}/health", timeout=2)
    finally:
        stop_process(server)
