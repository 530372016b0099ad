"""Starting `toyllm serve` for the tests: as a subprocess (the real command, its own process to
watch: memory, SIGTERM) or in a thread of the test process (a tiny model, started in a moment),
and reading its /metrics."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from toyllm.engine.server.launch import PreparedServer, ServeOptions, prepare

CLI = "from toyllm.engine.cli import app; app()"
STARTUP_TIMEOUT_S = 120.0


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    stderr_path: str

    def stderr(self) -> str:
        with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
            return f.read()


def start_process(*args: str) -> ServerProcess:
    """`toyllm serve --port 0 ARGS` in a subprocess; returns once it printed its address."""
    err = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)  # noqa: SIM115
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", CLI, "serve", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    err.close()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    line = ""
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            break
    match = re.search(r"on (http://\S+) ", line)
    if match is None:
        proc.kill()
        proc.wait()
        with open(err.name, encoding="utf-8", errors="replace") as f:
            raise RuntimeError(f"toyllm serve did not start: {line!r} {f.read()[-2000:]}")
    return ServerProcess(proc, match.group(1), err.name)


def stop_process(server: ServerProcess) -> None:
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait()
    os.unlink(server.stderr_path)


@contextmanager
def server_in_thread(options: ServeOptions) -> Iterator[PreparedServer]:
    """The server of `options` (port 0) running in a thread of this process."""
    options.port = 0
    prepared = prepare(options)
    thread = threading.Thread(target=prepared.run, name="test-server", daemon=True)
    thread.start()
    try:
        wait_healthy(prepared.url, headers=_auth(options.api_key))
        yield prepared
    finally:
        prepared.stop()
        thread.join(30)


def _auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def wait_healthy(url: str, headers: dict[str, str] | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", headers=headers, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} never became healthy")
        time.sleep(0.05)


_SAMPLE = re.compile(r'^([a-z_]+)(?:\{([a-z_]+)="([^"]*)"\})? (\S+)$')


def metrics(url: str, headers: dict[str, str] | None = None) -> dict[str, float]:
    """/metrics as {name: value}, labelled samples as name{label=value} keys; no histograms."""
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
    out = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not m.group(1).endswith(("_bucket", "_sum", "_count")):
            name, label, value, number = m.groups()
            key = f"{name}{{{label}={value}}}" if label else name
            out[key] = float(number)
    return out


def wait_idle(url: str, headers: dict[str, str] | None = None,
              timeout: float = 30) -> dict[str, float]:
    """Metrics once nothing is in flight and the engine's snapshot shows no request."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url, headers)
        if m["toyllm_requests_in_flight"] == 0 and m["toyllm_requests_running"] == 0 \
                and m["toyllm_requests_waiting"] == 0:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"the server never went idle: {m}")
        time.sleep(0.05)


def child_pids(pid: int) -> list[int]:
    """The processes `pid` started that still run (Linux): the engine process of `toyllm
    serve`, multiprocessing's resource tracker."""
    children = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                children += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return children


def rss_bytes(pid: int) -> int:
    """The resident memory of process `pid` and of its child processes (the engine's)."""
    total = 0
    for one in [pid, *child_pids(pid)]:
        with open(f"/proc/{one}/status", encoding="ascii") as f:
            found = [line for line in f if line.startswith("VmRSS:")]
        if not found:
            raise RuntimeError(f"no VmRSS for process {one}")
        total += int(found[0].split()[1]) * 1024
    return total
