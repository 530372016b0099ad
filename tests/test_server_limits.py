"""`toyllm serve` on a tiny random model with a ChatML template (tokenizer.json fixture), run
in a thread of the test process: chat completions streamed and not (greedy equal to `toyllm
generate --chat`), the API key (401 without it), the bounded queue (503 with Retry-After, then
served again once clients leave), cancellation (streams closed and a JSON request whose client
timed out are aborted, their KV blocks freed), and bad `toyllm serve` options (exit 2, one
line)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from server_helpers import metrics, server_in_thread, wait_idle
from tiny_checkpoints import save_tiny_checkpoint
from tokenizer_fixtures import train_byte_level_bpe, write_tokenizer_dir
from typer.testing import CliRunner

from toyllm.engine.cli import app
from toyllm.engine.server.launch import ServeOptions

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_RUNNING, MAX_WAITING = 2, 1
LONG = 3000  # tokens: a request that runs for a second or more unless it is aborted
# one request alone decodes the tiny model at a few thousand tokens a second (the one-call CPU
# step): what runs for seconds unless it is aborted, within the checkpoint's context
LONGEST = 12000
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("served_ckpt"), vocab_size=400,
                                max_seq_len=16384, seed=3)
    write_tokenizer_dir(path, train_byte_level_bpe())
    return path


@pytest.fixture(scope="module")
def server(checkpoint: Path):
    options = ServeOptions(model=str(checkpoint), api_key=KEY, device="cpu",
                           kv_memory="16MiB", max_running=MAX_RUNNING, max_waiting=MAX_WAITING,
                           served_model_name="tiny-chat")
    with server_in_thread(options) as prepared:
        yield prepared


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def test_every_route_needs_the_api_key(server) -> None:
    for method, path in [("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"),
                         ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.request(method, f"{server.url}{path}", headers=headers, json={})
            assert r.status_code == 401, (path, headers, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health", headers=AUTH).status_code == 200
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_chat_streamed_and_not_equal_toyllm_generate_chat(checkpoint: Path, client) -> None:
    done = CliRunner().invoke(app, ["generate", MESSAGES[1]["content"], "--chat", "--system",
                                    MESSAGES[0]["content"], "--model", str(checkpoint),
                                    "--max-new-tokens", "12", "--temperature", "0",
                                    "--device", "cpu", "--json"])
    assert done.exit_code == 0, done.output
    expected = json.loads(done.stdout)["completions"][0]
    whole = client.chat.completions.create(model="tiny-chat", messages=MESSAGES,
                                           max_tokens=12, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected["text"]
    assert whole.usage.prompt_tokens == expected["prompt_tokens"]
    roles, pieces, reasons, usage = [], [], [], None
    for chunk in client.chat.completions.create(
            model="tiny-chat", messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True}):
        assert chunk.object == "chat.completion.chunk"
        for choice in chunk.choices:
            roles.append(choice.delta.role)
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
        usage = chunk.usage or usage
    assert roles[0] == "assistant" and "".join(pieces) == expected["text"]
    assert [r for r in reasons if r] == [whole.choices[0].finish_reason]
    assert usage == whole.usage


def test_chat_logprobs_streamed_and_not(client) -> None:
    args = dict(model="tiny-chat", messages=MESSAGES, max_tokens=10, temperature=0,
                logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**args)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens == 10
    for entry in content:
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == entry.logprob
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    streamed = [e for chunk in client.chat.completions.create(**args, stream=True)
                for choice in chunk.choices if choice.logprobs is not None
                for e in choice.logprobs.content]
    assert [e.logprob for e in streamed] == [e.logprob for e in content]
    plain = client.chat.completions.create(**{**args, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == whole.choices[0].message.content


def test_chat_bad_messages_are_400s_naming_the_field(server) -> None:
    cases = [({"model": "tiny-chat", "messages": []}, "messages"),
             ({"model": "tiny-chat", "messages": [{"role": "robot", "content": "x"}]},
              "messages.0.role"),
             ({"model": "tiny-chat", "messages": [{"content": "x"}]}, "messages.0.role"),
             ({"model": "tiny-chat", "messages": MESSAGES, "max_completion_tokens": 0},
              "max_completion_tokens"),
             ({"model": "tiny-chat", "messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
             ({"model": "tiny-chat", "messages": MESSAGES, "logprobs": True,
               "top_logprobs": 21}, "top_logprobs"),
             ({"model": "tiny-chat", "messages": MESSAGES, "logprobs": 1}, "logprobs"),
             ({"model": "tiny-chat", "messages": [{"role": "user", "content": [
                 {"type": "image_url", "text": ""}]}]}, "messages.0.content.0.type")]
    for body, param in cases:
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=AUTH)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param, r.json()


def _open_stream(client: openai.OpenAI, seed: int):
    """A long stream, returned once its headers came: the engine has queued it."""
    return client.completions.create(model="tiny-chat", prompt="def f(x):", max_tokens=LONG,
                                     temperature=1.0, seed=seed, stream=True,
                                     extra_body={"ignore_eos": True})


def test_beyond_the_queue_a_503_with_retry_after_and_closed_streams_free_their_blocks(
        server, client) -> None:
    before = wait_idle(server.url, AUTH)
    streams = [_open_stream(client, seed) for seed in range(MAX_RUNNING + MAX_WAITING)]
    with pytest.raises(openai.APIStatusError) as refused:
        client.completions.create(model="tiny-chat", prompt="x", max_tokens=2)
    assert refused.value.status_code == 503
    assert refused.value.response.headers["Retry-After"] == "1"
    assert refused.value.body["code"] == "overloaded"
    next(iter(streams[0]))  # running: its first chunk came
    deadline = time.monotonic() + 10
    while True:  # the engine's snapshot shows the running requests' blocks taken
        busy = metrics(server.url, AUTH)
        if busy["toyllm_requests_running"] == MAX_RUNNING or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert busy["toyllm_requests_in_flight"] == MAX_RUNNING + MAX_WAITING
    assert busy["toyllm_requests_waiting"] == MAX_WAITING
    assert busy["toyllm_kv_blocks_reclaimable"] < busy["toyllm_kv_blocks_capacity"]
    for stream in streams:
        stream.close()  # the clients go away
    after = wait_idle(server.url, AUTH)
    aborted = "toyllm_requests_finished_total{finish_reason=abort}"
    assert after[aborted] - before.get(aborted, 0) == MAX_RUNNING + MAX_WAITING
    assert after["toyllm_kv_blocks_reclaimable"] == after["toyllm_kv_blocks_capacity"]
    generated = after["toyllm_generation_tokens_total"] - before["toyllm_generation_tokens_total"]
    assert generated < (MAX_RUNNING + MAX_WAITING) * LONG / 2  # stopped long before the end
    rejected = "toyllm_requests_rejected_total{reason=overloaded}"
    assert after[rejected] - before.get(rejected, 0) == 1
    assert client.completions.create(model="tiny-chat", prompt="x", max_tokens=2) \
        .usage.completion_tokens == 2  # served again


def test_a_json_request_whose_client_times_out_is_aborted(server) -> None:
    before = wait_idle(server.url, AUTH)
    body = {"model": "tiny-chat", "prompt": "def f(x):", "max_tokens": LONGEST,
            "ignore_eos": True}
    t0 = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=0.5)
    after = wait_idle(server.url, AUTH)
    assert time.monotonic() - t0 < 10
    aborted = "toyllm_requests_finished_total{finish_reason=abort}"
    assert after[aborted] - before.get(aborted, 0) == 1
    assert after["toyllm_generation_tokens_total"] - before["toyllm_generation_tokens_total"] \
        < LONGEST / 2
    assert after["toyllm_kv_blocks_reclaimable"] == after["toyllm_kv_blocks_capacity"]


def test_bad_serve_options_exit_2_with_one_line(tmp_path: Path, checkpoint: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    empty_key = tmp_path / "key.txt"
    empty_key.write_text("\n")
    cases = [
        (["--port", "70000"], "--port"),
        (["--port", "abc"], "--port"),
        (["--port", str(taken.getsockname()[1])], "cannot listen"),
        (["--host", "no-such-host.invalid"], "--host"),
        (["--model", str(tmp_path / "nowhere")], "model not found"),
        (["--api-key-file", str(tmp_path / "missing")], "--api-key-file"),
        (["--api-key-file", str(empty_key)], "--api-key-file"),
        (["--api-key", " "], "--api-key"),
        (["--api-key", "a", "--api-key-file", str(empty_key)], "not both"),
        (["--max-waiting", "-1"], "--max-waiting"),
        (["--max-running", "0"], "--max-running"),
        (["--stream-interval", "0"], "--stream-interval"),
        (["--kv-memory", "lots"], "--kv-memory"),
        (["--shutdown-timeout", "-1"], "--shutdown-timeout"),
        (["--device", "tpu"], "tpu"),
        (["--model", str(checkpoint), "--block-size", "3"], "block_size"),
    ]
    try:
        for args, says in cases:
            done = CliRunner().invoke(app, ["serve", "--port", "0", *args]
                                      if "--port" not in args else ["serve", *args])
            assert done.exit_code == 2, (args, done.output)
            lines = done.output.strip().splitlines()
            assert len(lines) == 1 and says in lines[0], (args, done.output)
    finally:
        taken.close()


def test_the_engine_spec_takes_only_the_engine_options_checked_and_pickles() -> None:
    import dataclasses
    import pickle

    from toyllm.engine.cli_numbers import NumberError
    from toyllm.engine.server.engine_spec import EngineOptions, ServingSpec

    options = ServeOptions(device="cpu", kv_memory="16MiB", max_running=4, api_key=KEY,
                           max_waiting=7)
    spec = ServingSpec.from_options(options)
    engine_fields = [f.name for f in dataclasses.fields(EngineOptions)]
    assert [f.name for f in dataclasses.fields(ServingSpec)] == engine_fields  # no api key
    assert (spec.device, spec.kv_memory, spec.max_running) == ("cpu", 16 * 2**20, 4)
    assert ServingSpec.from_options(spec) == spec  # checked once more: the same
    assert pickle.loads(pickle.dumps(spec)) == spec  # sent to the engine process
    with pytest.raises(NumberError, match="--token-budget"):
        ServingSpec.from_options(EngineOptions(device="cpu", token_budget=0))


def test_the_http_benchmark_replays_every_request_over_http_and_the_api(server,
                                                                       checkpoint: Path) -> None:
    import asyncio

    from toyllm.engine.serving import ServingEngine
    from toyllm.engine.tools.http_bench import arrivals, replay_api, replay_http
    from toyllm.engine.tools.serving_bench import random_workload
    from toyllm.models.model_source import load_model

    assert arrivals(3, float("inf")) == [0.0, 0.0, 0.0]
    times = arrivals(200, 50.0)
    assert times == sorted(times) and 2.0 < times[-1] < 6.0  # about 200 / 50 s
    work = random_workload(400, requests=3, low=4, high=12)
    http = asyncio.run(replay_http(server.url, "tiny-chat", work, float("inf"), headers=AUTH))
    assert http.failures == 0 and http.output_tokens == work.output_tokens
    assert len(http.ttft) == 3 and http.duration_s > 0
    loaded = load_model(checkpoint, torch.device("cpu"), torch.float32)
    engine = ServingEngine(loaded.model, loaded.tokenizer, kv_memory=2**22, cuda_graph=False)
    api = replay_api(engine, work, 100.0)
    assert api.output_tokens == work.output_tokens and len(api.ttft) == 3
    assert len(api.itl) == work.output_tokens - 3
    wait_idle(server.url, AUTH)


def test_the_engine_loop_aborts_within_one_step_and_refuses_what_the_pool_cannot_hold(
        checkpoint: Path) -> None:
    import asyncio

    from toyllm.engine.sampling import SamplingParams
    from toyllm.engine.server.engine_face import Accepted, Rejected
    from toyllm.engine.server.engine_loop import EngineLoop
    from toyllm.engine.server.metrics import Metrics
    from toyllm.engine.serving import ServingEngine
    from toyllm.models.model_source import load_model

    loaded = load_model(checkpoint, torch.device("cpu"), torch.float32)
    blocks = 64  # of 16 tokens: the pool holds 1,024 tokens
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # k and v, 2 layers, 16 tokens, 2 heads, 16 dims
    engine = ServingEngine(loaded.model, loaded.tokenizer, kv_memory=blocks * block_bytes,
                           cuda_graph=False)
    assert engine.cache.num_blocks == blocks
    # the engine's step count when the loop applies the abort (outputs already on their way to
    # the stream when abort() is called are not steps after it: the count is the engine's)
    applied: list[int] = []
    engine_abort = engine.abort

    def abort(request_id: str) -> None:
        applied.append(engine.stats().steps)
        engine_abort(request_id)

    engine.abort = abort
    loop = EngineLoop(engine, Metrics(), max_waiting=4)
    loop.start()

    async def run() -> tuple[int, str | None, object]:
        stream = loop.submit([5] * 10, SamplingParams(max_new_tokens=LONG, stop_at_eos=False))
        assert isinstance(await stream.get(), Accepted)
        for _ in range(5):  # decoding
            assert not (await stream.get()).finished
        called = engine.stats().steps
        loop.abort(stream.request_id)
        while not (out := await stream.get()).finished:
            pass
        too_long = loop.submit([5] * 1100, SamplingParams(max_new_tokens=4))
        return applied[0] - called, out.finish_reason, await too_long.get()

    try:
        after, reason, refused = asyncio.run(run())
    finally:
        loop.stop()
    assert reason == "abort" and after <= 1  # at most the step in progress when it was called
    assert isinstance(refused, Rejected) and "KV blocks" in refused.message
    assert loop.in_flight == 0 and not loop.alive
    snapshot = loop.snapshot
    assert snapshot.blocks_reclaimable == snapshot.stats.blocks_total == blocks


def test_a_failing_engine_loop_ends_every_request_and_refuses_new_ones(checkpoint: Path) -> None:
    import asyncio

    from toyllm.engine.sampling import SamplingParams
    from toyllm.engine.server.engine_face import Accepted, Failed, ShuttingDown
    from toyllm.engine.server.engine_loop import EngineLoop
    from toyllm.engine.server.metrics import Metrics
    from toyllm.engine.serving import ServingEngine
    from toyllm.models.model_source import load_model

    loaded = load_model(checkpoint, torch.device("cpu"), torch.float32)
    engine = ServingEngine(loaded.model, loaded.tokenizer, kv_memory=2**22, cuda_graph=False)
    step = engine.step
    calls = 0

    def failing_step():
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("device lost")
        return step()

    engine.step = failing_step  # the third step fails
    loop = EngineLoop(engine, Metrics(), max_waiting=4)
    loop.start()

    async def run() -> list[object]:
        stream = loop.submit([5] * 4, SamplingParams(max_new_tokens=50, stop_at_eos=False))
        events = [await stream.get()]
        while not isinstance(events[-1], Failed):
            events.append(await stream.get())
        with pytest.raises(ShuttingDown, match="device lost"):
            loop.submit([5], SamplingParams())
        return events

    try:
        events = asyncio.run(run())
    finally:
        loop.stop()
    assert isinstance(events[0], Accepted) and len(events) == 4  # two steps' outputs, then
    assert "RuntimeError: device lost" in events[-1].message
    assert not loop.alive and loop.in_flight == 0
