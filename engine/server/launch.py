"""`toyllm serve`: check the options, bind the socket (before the model loads, so a port in use
fails in a moment), build the engine (by default in a process of its own, which loads the model:
engine/server/engine_process.py; `--engine thread`: a thread of this process,
engine/server/engine_loop.py), and once it is ready run uvicorn until SIGTERM or Ctrl-C.

Shutdown: the first SIGTERM (or SIGINT) stops admitting (new requests get 503, the listening
socket closes); running requests go on for up to `shutdown_timeout` seconds, then the engine
loop aborts what is left (streams end with finish_reason "abort", pending JSON answers with a
503); uvicorn closes the connections, the loop thread ends and the process exits 0.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import uvicorn

from toyllm.engine.server.app import ServerState, build_app
from toyllm.engine.server.engine_loop import EngineLoop
from toyllm.engine.server.engine_process import EngineProcess
from toyllm.engine.server.engine_spec import (
    EngineInfo,
    EngineOptions,
    EngineSpec,
    ServeError,
    ServingSpec,
)
from toyllm.engine.server.metrics import Metrics

# uvicorn's own deadline for open connections, beyond the engine loop's: by then every request
# has ended, so it only matters for a client that does not read its stream's end
UVICORN_GRACE_S = 5.0


#: where the engine runs: its own process (the default), or a thread of the server's process
ENGINES = ("process", "thread")


@dataclass
class ServeOptions(EngineOptions):
    """`toyllm serve`'s options: the engine's (EngineOptions) and the server's."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    api_key_file: Path | None = None
    served_model_name: str | None = None
    max_waiting: int = 256
    shutdown_timeout: float = 30.0
    access_log: bool = False
    stream_interval: int = 1  # a stream's task wakes every this many tokens (RequestStream)
    engine: str = "process"  # ENGINES


def read_api_key(key: str | None, key_file: Path | None) -> str | None:
    """The key from --api-key or the first line of --api-key-file (not both); None: none."""
    if key is not None and key_file is not None:
        raise ServeError("--api-key and --api-key-file: give one, not both")
    if key_file is not None:
        from toyllm.models.validate import read_text

        if not key_file.exists() and not key_file.is_symlink():
            raise ServeError(f"--api-key-file: {key_file} not found")
        lines = read_text(key_file, "--api-key-file", ServeError).splitlines()
        key = lines[0] if lines else ""
        where = f"--api-key-file {key_file}"
    else:
        where = "--api-key"
    if key is None:
        return None
    key = key.strip()
    if not key or any(c.isspace() for c in key) or not key.isprintable():
        raise ServeError(f"{where}: expected a non-empty key of printable characters without "
                         f"spaces")
    return key


def bind(host: str, port: object) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ServeError(f"--port: expected an integer in [0, 65535], got {port!r}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ServeError(f"--host: cannot resolve {host!r} ({exc})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ServeError(f"--host/--port: cannot listen on {host}:{port} "
                         f"({exc.strerror or exc})") from None
    sock.set_inheritable(True)
    return sock


def _check_server_options(o: ServeOptions) -> None:
    """The server's own options (ServingSpec.from_options checks the engine's)."""
    from toyllm.engine import cli_numbers

    cli_numbers.integer("--max-waiting", o.max_waiting, minimum=0)
    cli_numbers.integer("--stream-interval", o.stream_interval)
    cli_numbers.number("--shutdown-timeout", o.shutdown_timeout, 0.0, 24 * 3600.0)
    if o.served_model_name is not None and not o.served_model_name.strip():
        raise ServeError("--served-model-name: expected a non-empty name")
    if o.engine not in ENGINES:
        raise ServeError(f"--engine: expected one of {', '.join(ENGINES)}, got {o.engine!r}")


class _GracefulServer(uvicorn.Server):
    """uvicorn, whose first exit signal also tells the engine loop to drain."""

    def __init__(self, config: uvicorn.Config, loop: EngineLoop | EngineProcess,
                 deadline_s: float) -> None:
        super().__init__(config)
        self._engine_loop = loop
        self._deadline_s = deadline_s

    def handle_exit(self, sig: int, frame: object) -> None:
        self._engine_loop.drain(self._deadline_s)
        super().handle_exit(sig, frame)


@dataclass
class PreparedServer:
    """Everything `serve` builds before it runs: tests run `server.run` in a thread of their
    own and end it with `stop`."""

    sock: socket.socket
    loop: EngineLoop | EngineProcess
    state: ServerState
    server: _GracefulServer
    url: str
    description: str  # one line: the model, the address, the device and the limits

    def run(self) -> None:
        """Serve until an exit signal (main thread) or `stop`; the engine loop ends with it."""
        self.loop.start()
        main = threading.current_thread() is threading.main_thread()
        # uvicorn re-raises the signal that stopped it once it has shut down; handlers that do
        # nothing make that SIGTERM or SIGINT a no-op, so a graceful stop exits 0
        stops = (signal.SIGTERM, signal.SIGINT)
        previous = {sig: signal.signal(sig, _ignore) for sig in stops} if main else {}
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.loop.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop(self) -> None:
        self.loop.drain(0.0)
        self.server.should_exit = True


def _ignore(signum: int, frame: object) -> None:
    pass


def start_engine(spec: EngineSpec, metrics: Metrics, *, engine: str, max_waiting: int,
                 stream_interval: int) -> tuple[EngineLoop | EngineProcess, EngineInfo]:
    """The engine behind the server, built from `spec`: in a process of its own ("process"; it
    is ready when this returns) or in this process, run by a thread ("thread")."""
    if engine == "process":
        process = EngineProcess.spawn(spec, metrics, max_waiting=max_waiting,
                                      stream_interval=stream_interval)
        return process, process.info
    built, info = spec.build()
    return EngineLoop(built, metrics, max_waiting=max_waiting,
                      stream_interval=stream_interval), info


def prepare(o: ServeOptions) -> PreparedServer:
    api_key = read_api_key(o.api_key, o.api_key_file)
    _check_server_options(o)
    spec = ServingSpec.from_options(o)
    sock = bind(o.host, o.port)
    loop: EngineLoop | EngineProcess | None = None
    try:
        metrics = Metrics()
        loop, info = start_engine(spec, metrics, engine=o.engine, max_waiting=o.max_waiting,
                                  stream_interval=o.stream_interval)
        name = o.served_model_name or Path(info.source).name.removesuffix(".gguf")
        state = ServerState(loop, metrics, info.tokenizer, name.strip(), info.max_seq_len,
                            info.vocab_size, api_key, info.sampling_defaults)
        config = uvicorn.Config(
            build_app(state), lifespan="off", log_level="warning", access_log=o.access_log,
            timeout_graceful_shutdown=int(o.shutdown_timeout + UVICORN_GRACE_S))
    except BaseException:
        sock.close()
        if loop is not None:
            loop.stop()
        raise
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}"
    server = _GracefulServer(config, loop, o.shutdown_timeout)
    stats = loop.snapshot.stats
    description = (
        f"{name} on {url} ({info.device}, {info.dtype}): context {info.max_seq_len}, "
        f"{stats.blocks_total} KV blocks of {stats.block_size} tokens, max running "
        f"{o.max_running}, max waiting {o.max_waiting}, engine {o.engine}")
    return PreparedServer(sock, loop, state, server, url, description)


def serve(o: ServeOptions, out: TextIO = sys.stdout) -> int:
    """Run the server until SIGTERM / Ctrl-C; 0 after a graceful stop."""
    prepared = prepare(o)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out.write(f"toyllm serve: {prepared.description}\n")
    out.flush()
    prepared.run()
    out.write("toyllm serve: stopped\n")
    out.flush()
    return 0
