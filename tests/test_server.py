"""`toyllm serve` with the shipped model, in a subprocess, through the official `openai` client:
completions streamed and not (the same text for the same seed; greedy equal to `toyllm
generate`), every bad request a 400 naming its field while the server goes on, 64 concurrent
streams with some clients leaving mid-stream (every request accounted for, the KV pool back to
all reclaimable), and the server's memory flat over many requests."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import openai
import pytest
from server_helpers import metrics, rss_bytes, start_process, stop_process, wait_idle
from typer.testing import CliRunner

from toyllm.engine.cli import app
from toyllm.models.model_source import DEFAULT_MODEL_DIR

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "model.safetensors").is_file(),
                                reason="the shipped model is not built")
MODEL = "default"
PROMPT = "def fibonacci(n):"
MAX_RUNNING, MAX_WAITING = 32, 32


@pytest.fixture(scope="module")
def server():
    s = start_process("--kv-memory", "64MiB", "--max-running", str(MAX_RUNNING),
                      "--max-waiting", str(MAX_WAITING), "--device", "cpu")
    yield s
    stop_process(s)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_model_and_health_is_ok(server, client) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_greedy_completion_equals_toyllm_generate(client) -> None:
    done = CliRunner().invoke(app, ["generate", PROMPT, "--max-new-tokens", "24",
                                    "--temperature", "0", "--device", "cpu", "--json"])
    assert done.exit_code == 0, done.output
    expected = json.loads(done.stdout)["completions"][0]
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    assert got.choices[0].text == expected["text"]
    assert got.usage.completion_tokens == len(expected["token_ids"]) == 24
    assert got.usage.prompt_tokens == expected["prompt_tokens"]
    assert got.choices[0].finish_reason == "length"
    ids = client.completions.create(model=MODEL, prompt=[PROMPT], max_tokens=24, temperature=0)
    assert ids.choices[0].text == expected["text"]  # a list holding one prompt: the same


def test_streamed_text_equals_the_answer_for_the_same_seed(client) -> None:
    args = dict(model=MODEL, prompt="import os\n", max_tokens=40, temperature=0.9, top_p=0.95,
                seed=1234, extra_body={"top_k": 50, "min_p": 0.02, "repetition_penalty": 1.1})
    whole = client.completions.create(**args)
    pieces, reasons, usages = [], [], []
    for chunk in client.completions.create(**args, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            reasons.append(chunk.choices[0].finish_reason)
        if chunk.usage is not None:
            usages.append(chunk.usage)
    assert "".join(pieces) == whole.choices[0].text
    assert len(pieces) > 3  # streamed piece by piece, not in one chunk
    assert [r for r in reasons if r] == [whole.choices[0].finish_reason]
    assert len(usages) == 1 and usages[0] == whole.usage
    other = client.completions.create(**{**args, "seed": 99})
    assert other.choices[0].text != whole.choices[0].text  # the seed matters


def test_logprobs_are_the_no_cache_references_streamed_or_not(client) -> None:
    import torch

    from toyllm.engine.check.reference import reference_greedy
    from toyllm.models.model_source import load_model

    args = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3)
    whole = client.completions.create(**args)
    lp = whole.choices[0].logprobs
    assert "".join(lp.tokens) == whole.choices[0].text  # each token's own text, in order
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(12)]
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and max(top.values()) == chosen == top[token]  # greedy: the top
        assert list(top.values()) == sorted(top.values(), reverse=True)
    streamed = [c.choices[0].logprobs for c in client.completions.create(**args, stream=True)
                if c.choices[0].logprobs is not None]
    assert [t for c in streamed for t in c.token_logprobs] == lp.token_logprobs
    # the witness: log_softmax of the no-cache reference's logits along its greedy path (fp32)
    loaded = load_model(None, torch.device("cpu"), torch.float32)
    prompt_ids = loaded.tokenizer.encode(PROMPT, bos=True)
    ids, step_logits = reference_greedy(loaded.model, prompt_ids, 12)
    assert loaded.tokenizer.decode(ids) == whole.choices[0].text
    expected = [torch.log_softmax(g.float(), dim=-1)[t].item()
                for g, t in zip(step_logits, ids, strict=True)]
    assert torch.allclose(torch.tensor(lp.token_logprobs), torch.tensor(expected), atol=1e-4,
                          rtol=0)


def test_stop_strings_end_the_text_before_them(client) -> None:
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=48, temperature=0)
    # a word of the greedy text, past its start: the stop string that text does hold
    words = re.findall(r"[A-Za-z_]{4,}", full.choices[0].text)
    assert len(words) >= 2, full.choices[0].text
    stop = words[1]
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=48, temperature=0,
                                    stop=[stop])
    assert got.choices[0].finish_reason == "stop"
    assert got.choices[0].text == full.choices[0].text.split(stop)[0]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=48, temperature=0, stop=[stop], stream=True))
    assert streamed == got.choices[0].text


BAD_REQUESTS = [
    # (body, the field the error names; None: the body as a whole)
    ("{not json", None),
    ("[1, 2]", None),
    ({"prompt": PROMPT}, "model"),
    ({"model": MODEL, "prompt": PROMPT, "max_tokens": "12"}, "max_tokens"),
    ({"model": MODEL, "prompt": PROMPT, "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "prompt": PROMPT, "stream": "yes"}, "stream"),
    ({"model": MODEL, "prompt": PROMPT, "frobnicate": 1}, "frobnicate"),
    ({"model": MODEL, "prompt": 5}, "prompt"),
    ({"model": MODEL, "prompt": "x " * 2000}, "prompt"),
    ({"model": MODEL, "prompt": list(range(1, 1100))}, "prompt"),
    ({"model": MODEL, "prompt": [1, 99999]}, "prompt"),
    ({"model": MODEL, "prompt": ""}, "prompt"),
    ({"model": MODEL, "prompt": ["a", "b"]}, "prompt"),
    ({"model": MODEL, "prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "prompt": PROMPT, "max_tokens": -3}, "max_tokens"),
    ({"model": MODEL, "prompt": PROMPT, "temperature": -0.5}, "temperature"),
    ({"model": MODEL, "prompt": PROMPT, "top_p": 0}, "top_p"),
    ({"model": MODEL, "prompt": PROMPT, "top_k": -2}, "top_k"),
    ({"model": MODEL, "prompt": PROMPT, "min_p": 1.5}, "min_p"),
    ({"model": MODEL, "prompt": PROMPT, "repetition_penalty": 0}, "repetition_penalty"),
    ({"model": MODEL, "prompt": PROMPT, "seed": -1}, "seed"),
    ({"model": MODEL, "prompt": PROMPT, "stop": [""]}, "stop"),
    ({"model": MODEL, "prompt": PROMPT, "n": 2}, "n"),
    ({"model": MODEL, "prompt": PROMPT, "logprobs": 21}, "logprobs"),
    ({"model": MODEL, "prompt": PROMPT, "echo": True}, "echo"),
    ({"model": MODEL, "prompt": PROMPT, "presence_penalty": 0.5}, "presence_penalty"),
    ({"model": MODEL, "prompt": PROMPT, "stream_options": {"include_usage": True}},
     "stream_options"),
    ({"model": "gpt-4", "prompt": PROMPT}, "model"),
]


def test_each_bad_request_is_a_400_naming_its_field_and_the_server_goes_on(server,
                                                                          client) -> None:
    before = metrics(server.url)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for body, param in BAD_REQUESTS:
            content = body if isinstance(body, str) else json.dumps(body)
            r = http.post("/v1/completions", content=content,
                          headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (body, r.text)
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error"
            assert error["param"] == param, (body, error)
            if param is not None:
                assert error["message"].startswith(f"{param}:"), error
        # the shipped model has no chat template: chat is a 400 that says so
        r = http.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        assert "no chat template" in r.json()["error"]["message"]
        r = http.post("/v1/completions", content=b"x" * (16 * 2**20 + 1))
        assert r.status_code == 413 and "16777216 bytes" in r.json()["error"]["message"]
        r = http.post("/v1/nowhere", json={})
        assert r.status_code == 404 and "no route" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt=PROMPT, temperature=-1)
    good = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
    assert good.usage.completion_tokens == 4
    after = wait_idle(server.url)
    assert after["toyllm_requests_admitted_total"] == before["toyllm_requests_admitted_total"] + 1


async def _stream(client: openai.AsyncOpenAI, i: int, leave_after: int | None) -> dict:
    stream = await client.completions.create(
        model=MODEL, prompt=f"def f{i}(x):", max_tokens=16, temperature=0.7, seed=i,
        stream=True, stream_options={"include_usage": True})
    text, reason, usage, chunks = "", None, None, 0
    async for chunk in stream:
        chunks += 1
        if chunk.choices:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
        usage = chunk.usage or usage
        if leave_after is not None and chunks >= leave_after:
            await stream.close()  # the client goes away mid-stream
            return {"left": True}
    return {"left": False, "text": text, "reason": reason, "usage": usage}


def test_64_concurrent_streams_with_clients_leaving_leak_nothing(server) -> None:
    before = wait_idle(server.url)
    clients = MAX_RUNNING + MAX_WAITING

    async def run() -> list[dict]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused",
                                      max_retries=0, timeout=60) as c:
            return await asyncio.gather(*(_stream(c, i, 2 if i % 4 == 0 else None)
                                          for i in range(clients)))

    results = asyncio.run(run())
    stayed = [r for r in results if not r["left"]]
    assert len(stayed) == clients * 3 // 4
    for r in stayed:
        assert r["reason"] in ("length", "stop") and r["usage"].completion_tokens >= 1
        assert r["reason"] == "stop" or r["usage"].completion_tokens == 16
    after = wait_idle(server.url)

    def delta(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    finished = {k: delta(k) for k in after if k.startswith("toyllm_requests_finished_total")}
    assert delta("toyllm_requests_admitted_total") == clients
    assert sum(finished.values()) == clients  # every request ended, once
    aborted = finished.get("toyllm_requests_finished_total{finish_reason=abort}", 0)
    assert 1 <= aborted <= clients // 4
    assert after["toyllm_kv_blocks_reclaimable"] == after["toyllm_kv_blocks_capacity"]
    assert after["toyllm_kv_blocks_used"] == after["toyllm_kv_blocks_cached"]


async def _many(url: str, n: int, concurrency: int) -> list[int]:
    body = {"model": MODEL, "prompt": "x = ", "max_tokens": 2, "temperature": 0}
    statuses: list[int] = []
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        async def worker(count: int) -> None:
            for _ in range(count):
                statuses.append((await http.post("/v1/completions", json=body)).status_code)

        await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
    return statuses


def _memory_stays_flat(server, requests: int) -> None:
    assert set(asyncio.run(_many(server.url, 200, 16))) == {200}  # warm-up: allocator pools
    start = rss_bytes(server.proc.pid)
    statuses = asyncio.run(_many(server.url, requests, 16))
    assert statuses.count(200) == len(statuses) == requests
    growth = rss_bytes(server.proc.pid) - start
    after = wait_idle(server.url)
    assert after["toyllm_kv_blocks_reclaimable"] == after["toyllm_kv_blocks_capacity"]
    # a leak of even 4 KiB per request would show as 8 MiB over 2,000
    assert growth < 8 * 2**20 * requests / 2000 + 4 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB"


def test_memory_stays_flat_over_400_requests(server) -> None:
    _memory_stays_flat(server, 400)


@pytest.mark.slow
def test_memory_stays_flat_over_2000_requests(server) -> None:
    _memory_stays_flat(server, 2000)
