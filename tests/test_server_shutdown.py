"""`toyllm serve` stops gracefully on SIGTERM: a short request running when the signal comes
finishes, long ones are aborted at the deadline (their streams end with finish_reason "abort"
and [DONE]), nobody listens afterwards, and the process exits 0.

Sixteen long streams share each step with the short one, so a step costs several milliseconds
even on a fast CPU: the long ones (1,000 tokens) cannot finish before the deadline, and the
short one (8 tokens) finishes long before it on a slow, busy one."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import openai
import pytest
from server_helpers import start_process, stop_process

from toyllm.models.model_source import DEFAULT_MODEL_DIR

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "model.safetensors").is_file(),
                                reason="the shipped model is not built")
DEADLINE_S = 3.0
LONG_STREAMS, LONG, SHORT = 16, 1000, 8


async def _read(stream, first: asyncio.Event) -> dict:
    reasons, tokens = [], 0
    async for chunk in stream:
        first.set()
        if chunk.choices and chunk.choices[0].finish_reason:
            reasons.append(chunk.choices[0].finish_reason)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"reasons": reasons, "tokens": tokens, "ended_at": time.monotonic()}


async def _drive(server) -> tuple[float, list[dict], dict]:
    async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused",
                                  max_retries=0, timeout=60) as client:
        async def start(tokens: int, seed: int) -> tuple[asyncio.Task, asyncio.Event]:
            stream = await client.completions.create(
                model="default", prompt="def f(x):", max_tokens=tokens, temperature=0.8,
                seed=seed, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True})
            first = asyncio.Event()
            return asyncio.create_task(_read(stream, first)), first

        longs = [await start(LONG, seed) for seed in range(LONG_STREAMS)]
        await asyncio.wait_for(asyncio.gather(*(f.wait() for _, f in longs)), 60)
        short, first = await start(SHORT, 99)
        await asyncio.wait_for(first.wait(), 60)
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)  # while all of them run
        results = await asyncio.wait_for(asyncio.gather(*(t for t, _ in longs)), 60)
        return sent, results, await asyncio.wait_for(short, 60)


def test_sigterm_finishes_a_short_request_aborts_long_ones_at_the_deadline_and_exits_0() -> None:
    server = start_process("--kv-memory", "64MiB", "--device", "cpu",
                           "--shutdown-timeout", str(DEADLINE_S))
    try:
        sent, longs, short = asyncio.run(_drive(server))
        code = server.proc.wait(timeout=30)
        stopped = time.monotonic()
        assert code == 0, server.stderr()
        assert "toyllm serve: stopped" in server.proc.stdout.read()
        assert short["reasons"] == ["length"] and short["tokens"] == SHORT, short
        assert short["ended_at"] > sent  # it was running when the signal came, and finished
        for r in longs:
            assert r["reasons"] == ["abort"] and r["tokens"] < LONG, r
            assert DEADLINE_S - 0.5 <= r["ended_at"] - sent <= DEADLINE_S + 5, r
        assert stopped - sent <= DEADLINE_S + 10
        with pytest.raises(httpx.TransportError):  # nobody listens any more
            httpx.get(f"{server.url}/health", timeout=2)
    finally:
        stop_process(server)
