"""The engine in a process of its own (`toyllm serve --engine process`, the default) and what can
go wrong with it: a model that fails to load in the engine process is one line and exit 2, as
in the server's own process; an engine process that dies while it builds is a clear refusal,
not a hang; one killed mid-run ends every stream with OpenAI's error object and /health says
why; the engine process never outlives the server (SIGTERM: drained, exit 0, gone; SIGKILL:
gone within seconds); and the engine thread (`--engine thread`) serves the same text."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from engine_specs import ExitingSpec, RaisingSpec
from server_helpers import child_pids, server_in_thread, start_process, stop_process
from typer.testing import CliRunner

from toyllm.engine.cli import app
from toyllm.engine.server.engine_process import EngineProcess
from toyllm.engine.server.launch import ServeError, ServeOptions
from toyllm.engine.server.metrics import Metrics
from toyllm.models.model_source import DEFAULT_MODEL_DIR

shipped = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "model.safetensors").is_file(),
                             reason="the shipped model is not built")
GONE_WITHIN_S = 10.0


def _engine_children() -> list[multiprocessing.process.BaseProcess]:
    return [p for p in multiprocessing.active_children() if p.name == "toyllm-engine"]


def _wait_gone(pids: list[int], timeout: float = GONE_WITHIN_S) -> list[int]:
    """The processes of `pids` still running after `timeout` seconds (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                        left.append(pid)
            except OSError:
                pass
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def test_a_model_that_fails_to_load_in_the_engine_process_is_one_line_and_exit_2(
        tmp_path: Path) -> None:
    config = tmp_path / "tiny.toml"  # a config needs --random-weights: load_model refuses it
    config.write_text((Path(__file__).parents[1] / "configs" / "default.toml").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    for model, says in [(config, "--random-weights"), (broken, "config.json")]:
        done = CliRunner().invoke(app, ["serve", "--port", "0", "--device", "cpu",
                                        "--model", str(model)])
        assert done.exit_code == 2, done.output
        lines = done.output.strip().splitlines()
        assert len(lines) == 1 and says in lines[0], done.output
    assert _engine_children() == []  # the engine process ended with its refusal


@pytest.mark.parametrize(("spec", "says"), [
    (ExitingSpec(3), "exited (exit code 3) before the engine was ready"),
    (RaisingSpec("loader bug"), "could not build the engine: RuntimeError: loader bug"),
])
def test_an_engine_process_that_dies_or_fails_while_it_builds_is_refused(spec, says) -> None:
    with pytest.raises(ServeError, match=re.escape(says)):
        EngineProcess.spawn(spec, Metrics(), max_waiting=4)
    assert _engine_children() == []


@shipped
def test_an_engine_process_killed_mid_run_ends_every_stream_and_health_says_so() -> None:
    options = ServeOptions(device="cpu", kv_memory="16MiB", max_running=4)
    with server_in_thread(options) as server:
        assert isinstance(server.loop, EngineProcess)
        body = {"model": "default", "prompt": "def f(x):", "max_tokens": 900, "stream": True,
                "ignore_eos": True}
        events: list[str] = []
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                          timeout=60) as response:
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(line)
                    break  # running: its first token came
            os.kill(server.loop.pid, signal.SIGKILL)
            events += [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2][len("data: "):])["error"]
        assert error["type"] == "server_error" and "exit code -9" in error["message"], error
        health = httpx.get(f"{server.url}/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert "engine process exited" in health.json()["error"]
        refused = httpx.post(f"{server.url}/v1/completions", timeout=10,
                             json={"model": "default", "prompt": "x", "max_tokens": 2})
        assert refused.status_code == 503, refused.text
        assert server.loop.in_flight == 0 and not server.loop.alive


@shipped
def test_sigterm_drains_and_the_engine_process_ends_with_the_server() -> None:
    server = start_process("--kv-memory", "16MiB", "--device", "cpu", "--shutdown-timeout",
                           "5")
    try:
        children = child_pids(server.proc.pid)
        assert children, "the engine process runs beside the server"
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        stream = client.completions.create(model="default", prompt="x", max_tokens=6,
                                           stream=True, extra_body={"ignore_eos": True})
        first = next(iter(stream))
        server.proc.send_signal(signal.SIGTERM)  # while it runs: it finishes, then the exit
        rest = list(stream)
        assert [c.choices[0].finish_reason for c in [first, *rest] if c.choices][-1] == "length"
        assert server.proc.wait(timeout=30) == 0, server.stderr()
        assert _wait_gone(children) == []
    finally:
        stop_process(server)


@shipped
def test_a_killed_server_leaves_no_engine_process_behind() -> None:
    server = start_process("--kv-memory", "16MiB", "--device", "cpu")
    try:
        children = child_pids(server.proc.pid)
        assert children
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        assert client.completions.create(model="default", prompt="x",
                                          max_tokens=2).usage.completion_tokens == 2
        server.proc.kill()
        server.proc.wait()
        assert _wait_gone(children) == []  # the engine process saw its pipe close and left
    finally:
        stop_process(server)


@shipped
def test_the_engine_thread_serves_the_same_text_as_the_engine_process() -> None:
    texts = {}
    for engine in ("process", "thread"):
        options = ServeOptions(device="cpu", kv_memory="16MiB", max_running=4, engine=engine)
        with server_in_thread(options) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused",
                                   max_retries=0)
            args = dict(model="default", prompt="import os\n", max_tokens=16, seed=7,
                        temperature=0.9)
            whole = client.completions.create(**args).choices[0].text
            streamed = "".join(c.choices[0].text for c in client.completions.create(
                **args, stream=True) if c.choices)
            assert streamed == whole
            texts[engine] = whole
            assert ("engine " + engine) in server.description
    assert texts["process"] == texts["thread"]
    done = CliRunner().invoke(app, ["serve", "--port", "0", "--engine", "fiber"])
    assert done.exit_code == 2 and "--engine" in done.output.strip().splitlines()[0]


def test_the_message_reader_takes_every_whole_message_a_read_finds_and_keeps_the_rest() -> None:
    from toyllm.engine.server.pipe_messages import MessageReader, write_message

    read_end, write_end = os.pipe()
    try:
        reader = MessageReader(read_end)
        big = ("events", list(range(50_000)))  # more than a pipe's default buffer holds
        messages = [("a", 1), big, ("c", "é\u2028")]
        writer = threading.Thread(target=lambda: [write_message(write_end, m) for m in messages])
        writer.start()  # it waits while the pipe is full
        got = []
        while len(got) < 3:
            got += reader.read()
        writer.join()
        assert got == [("a", 1), big, ("c", "é\u2028")]
        whole = b"".join([_frame(("d",)), _frame(("e",))])
        os.write(write_end, whole[:5])  # half a length: nothing yet
        os.write(write_end, whole[5:-3])  # the first message and most of the second
        assert reader.read() == [("d",)]
        os.write(write_end, whole[-3:])
        assert reader.read() == [("e",)]
        os.close(write_end)
        write_end = -1
        with pytest.raises(EOFError):
            reader.read()
    finally:
        os.close(read_end)
        if write_end != -1:
            os.close(write_end)


def _frame(obj: object) -> bytes:
    import pickle
    import struct

    payload = pickle.dumps(obj)
    return struct.pack("!Q", len(payload)) + payload
