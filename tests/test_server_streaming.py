"""What keeps streaming cheap for the server under many streams (issue 20), as mechanisms, not
timings: the engine loop hands a whole iteration's events (every request's output of a step,
every admission) to the event loop in one call; a stream writes every event pending when its
task wakes in one body message; a text chunk made from its template is byte for byte the JSON
of protocol's chunk object. And the HTTP benchmark's paced engine (a GPU's step rate on a CPU)
runs both paths end to end."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from types import SimpleNamespace

import pytest

from toyllm.engine.sampling import SamplingParams
from toyllm.engine.server import protocol, sse
from toyllm.engine.server.engine_face import Accepted, Failed, RequestStream
from toyllm.engine.server.engine_loop import EngineLoop
from toyllm.engine.server.metrics import Metrics
from toyllm.engine.serving import RequestOutput, ServingEngine
from toyllm.models.config import ModelConfig
from toyllm.models.llama import build_model

TEXTS = ["a", " hello", 'a "quote" and a \\ backslash', "new\nline\ttab", "é中😀", "\x00\x1f",
         "</script>", "\u2028\u2029", "\ufffd"]


def _output(text: str, finished: bool = False, reason: str | None = None) -> RequestOutput:
    return RequestOutput("cmpl-x", [7], text, finished, reason, prompt_tokens=3,
                         completion_tokens=2)


@pytest.mark.parametrize("with_usage", [False, True])
def test_a_text_chunk_from_its_template_is_byte_for_byte_json_dumps_of_protocols_chunk(
        with_usage: bool) -> None:
    rid, model, created = 'cmpl-"odd"\\id', "mödel \"x\"", 1234567890
    completion = sse.CompletionChunks(rid, model, created, with_usage, str)
    chat = sse.ChatChunks(rid, model, created, with_usage, str)
    for text in TEXTS:
        texts: list[str] = []
        assert not completion.add(_output(text), texts)
        assert texts == [sse.event(protocol.completion_chunk(rid, model, created, text, None,
                                                             with_usage))]
        assert json.loads(texts[0][len("data: "):])["choices"][0]["text"] == text
        texts = []
        assert not chat.add(_output(text), texts)
        assert texts == [sse.event(protocol.chat_chunk(rid, model, created,
                                                       {"content": text}, None, with_usage))]
    # the end: the finish chunk, the usage chunk when asked
    texts = []
    assert completion.add(_output("", True, "max_new_tokens"), texts)
    expected = [sse.event(protocol.completion_chunk(rid, model, created, "", "max_new_tokens",
                                                    with_usage))]
    if with_usage:
        expected.append(sse.event(protocol.usage_chunk(rid, model, created, "text_completion",
                                                       3, 2)))
    assert texts == expected
    assert json.loads(expected[0][len("data: "):])["choices"][0]["finish_reason"] == "length"


def test_an_engine_failure_ends_a_stream_with_the_openai_error_object() -> None:
    chunks = sse.CompletionChunks("cmpl-x", "m", 1, False, str)
    texts: list[str] = []
    assert chunks.add(Failed("device lost"), texts)
    assert json.loads(texts[0][len("data: "):])["error"]["message"] == "device lost"
    texts = []
    failed = RequestOutput("cmpl-x", [], "", True, "error", 3, 0, error="bad logits")
    assert chunks.add(failed, texts)
    assert json.loads(texts[0][len("data: "):])["error"]["message"] == "bad logits"


def test_the_events_pending_when_a_stream_wakes_go_out_in_one_body_message() -> None:
    from toyllm.engine.server.app import _EngineStream

    aborted: list[str] = []

    async def run() -> list[dict]:
        stream = RequestStream("cmpl-x", [1, 2, 3], SamplingParams(),
                               asyncio.get_running_loop())
        for text in ("one", " two", " three"):  # three steps' outputs before the task runs
            stream.put(_output(text))
        stream.put(_output("", True, "max_new_tokens"))
        state = SimpleNamespace(loop=SimpleNamespace(abort=aborted.append))
        response = _EngineStream(sse.CompletionChunks("cmpl-x", "m", 1, True, str), state,
                                 stream)
        sent: list[dict] = []

        async def receive() -> dict:
            await asyncio.Event().wait()  # the client stays
            raise AssertionError("unreachable")

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}}
        await response(scope, receive, send)
        return sent

    sent = asyncio.run(run())
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body" and m["body"]]
    assert len(bodies) == 1  # one write: 3 text chunks, the finish, the usage, [DONE]
    events = bodies[0].decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert [c["choices"][0]["text"] for c in chunks[:4]] == ["one", " two", " three", ""]
    assert chunks[3]["choices"][0]["finish_reason"] == "length"
    assert chunks[4]["usage"]["completion_tokens"] == 2
    assert aborted == []  # it ended: nothing to abort


def test_the_engine_loop_hands_each_iterations_events_over_in_one_call() -> None:
    streams = 32
    config = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                         num_kv_heads=1, intermediate_size=64, max_seq_len=128)
    engine = ServingEngine(build_model(config, seed=0), None, kv_memory=2**20,
                           max_running=streams, cuda_graph=False)
    loop = EngineLoop(engine, Metrics(), max_waiting=0)
    iteration = 0
    take_commands = loop._take_commands

    def counted_take_commands(block: bool) -> tuple[bool, bool]:  # once per iteration
        nonlocal iteration
        iteration += 1
        return take_commands(block)

    loop._take_commands = counted_take_commands
    handoffs: list[tuple[int, int]] = []  # (iteration, events) per call from the loop thread

    async def run() -> list[list[object]]:
        event_loop = asyncio.get_running_loop()
        call_soon_threadsafe = event_loop.call_soon_threadsafe

        def counted(callback, *args):  # noqa: ANN001, ANN202
            if threading.current_thread().name == "toyllm-engine-loop":
                handoffs.append((iteration, len(args[0])))
            return call_soon_threadsafe(callback, *args)

        event_loop.call_soon_threadsafe = counted
        subs = [loop.submit([1 + i % 50, 2, 3], SamplingParams(max_new_tokens=6,
                                                                stop_at_eos=False))
                for i in range(streams)]  # all queued before the loop's first iteration
        loop.start()
        events = []
        for stream in subs:
            got = [await stream.get()]
            while not (isinstance(got[-1], RequestOutput) and got[-1].finished):
                got.append(await stream.get())
            events.append(got)
        return events

    try:
        events = asyncio.run(run())
    finally:
        loop.stop()
    for got in events:
        assert isinstance(got[0], Accepted)
        assert sum(len(e.new_token_ids) for e in got[1:]) == 6
    per_iteration = Counter(i for i, _ in handoffs)
    assert max(per_iteration.values()) == 1, per_iteration  # never one call per request
    assert max(n for _, n in handoffs) >= streams  # a step's outputs for all streams at once
    assert sum(n for _, n in handoffs) == sum(len(got) for got in events)
    # what /metrics shows of the loop: every step timed, the time between them too
    text = loop.metrics.render(loop.snapshot, loop.in_flight, loop.capacity)
    steps = engine.stats().steps
    assert f"toyllm_engine_step_seconds_count {steps}" in text
    assert f"toyllm_engine_between_steps_seconds_count {steps - 1}" in text


def test_the_paced_engine_bench_replays_every_request_over_http_and_the_api(tmp_path) -> None:
    from toyllm.engine.tools import http_bench

    out = tmp_path / "paced.json"
    assert http_bench.main(["--paced", "2,0.5", "--requests", "6", "--low", "2", "--high", "5",
                            "--rates", "inf", "--no-warmup", "--clients", "2",
                            "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["path"] for r in rows] == ["http", "api"]
    assert rows[0]["output_tokens"] == rows[1]["output_tokens"] > 6
    for row in rows:
        assert row["failures"] == 0 and row["steps"] >= 5 and row["mean_step_s"] >= 0.002
    assert rows[0]["server_loop_cpu_s"] is not None and rows[0]["client_cpu_s"] > 0


def test_the_paced_engine_refuses_a_hold_beyond_its_step() -> None:
    from toyllm.engine.tools import http_bench
    from toyllm.engine.tools.paced_engine import PacedEngine, shipped_tokenizer

    with pytest.raises(ValueError, match="hold"):
        PacedEngine(shipped_tokenizer(), step_s=0.001, hold_s=0.002, max_running=4)
    assert http_bench.main(["--paced", "1,2"]) == 2
    assert http_bench.main(["--paced", "fast"]) == 2


def test_stream_interval_wakes_a_reader_at_the_first_output_every_n_and_at_the_end() -> None:
    async def run() -> list[int]:
        stream = RequestStream("cmpl-x", [1], SamplingParams(), asyncio.get_running_loop(),
                               wake_every=3)
        sizes: list[int] = []

        async def reader() -> None:
            while True:
                events = await stream.get_all()
                sizes.append(len(events))
                if events[-1].finished:
                    return

        task = asyncio.ensure_future(reader())
        await asyncio.sleep(0)  # the reader waits
        for i in range(7):  # one output per "step"; the reader runs between them
            stream.put(_output(f"t{i}"))
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        stream.put(_output("", True, "max_new_tokens"))
        await task
        return sizes

    # the first output at once, then every third, then the end with what had gathered
    assert asyncio.run(run()) == [1, 3, 3, 1]


def test_a_stream_interval_server_streams_the_same_text_one_chunk_per_token() -> None:
    import openai
    from server_helpers import server_in_thread

    from toyllm.engine.server.launch import ServeOptions

    options = ServeOptions(device="cpu", kv_memory="16MiB", max_running=4, stream_interval=4)
    with server_in_thread(options) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        kwargs = dict(model="default", prompt="Once upon a time", max_tokens=24, seed=5,
                      temperature=0.8)
        answer = client.completions.create(**kwargs)
        chunks = list(client.completions.create(**kwargs, stream=True,
                                                stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert "".join(texts) == answer.choices[0].text
    assert len(texts) > answer.usage.completion_tokens // 2  # token chunks, not one per burst
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
