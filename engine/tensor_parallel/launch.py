"""Starting the ranks of a tensor-parallel run and ending them all when one fails.

`RankProcesses.start(world, target, *args)` spawns `world.size` processes (torch's
multiprocessing, spawn start method); each joins one process group (gloo on the CPU, NCCL on
GPU `cuda:rank`, NVLink multicast off: NCCL_NVLS_ENABLE=0) with `world.timeout_s` on every
collective, then runs `target(ranks, conn, *args)` with its `RankGroup` and a pipe to the
parent. The parent only launches, relays and watches: it never joins the group, so no
collective can block it.

Failure, never a hang: a rank whose target raises sends ("fatal", rank, time, message) and
exits; a rank that dies without a word is seen by its process sentinel; a collective that
waits longer than the timeout raises on its rank (gloo and NCCL both honour the group's
timeout). On the first of these the parent gives the others a moment to report, stops every
rank, and raises one `RankFailure` naming the rank that failed first and why.
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from toyllm.engine.tensor_parallel.collectives import RankGroup
from toyllm.engine.tensor_parallel.plan import TensorParallelError

#: how long the other ranks may take to report after the first failure, before all are stopped
REPORT_GRACE_S = 1.0
#: seconds a rank is given to exit after SIGTERM before SIGKILL
STOP_GRACE_S = 5.0


class RankFailure(RuntimeError):
    """A rank failed (raised, died or timed out); every rank has been stopped."""

    def __init__(self, message: str, rank: int | None = None,
                 rank_traceback: str | None = None, user_error: bool = False) -> None:
        super().__init__(message)
        self.rank = rank
        self.rank_traceback = rank_traceback
        self.user_error = user_error  # the rank refused bad input (a toyllm ValueError)


@dataclass(frozen=True)
class World:
    """size ranks on device_type ("cpu": gloo, "cuda": NCCL, rank r on cuda:r)."""

    size: int
    device_type: str = "cpu"
    timeout_s: float = 120.0

    def check(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise TensorParallelError(
                f"--tensor-parallel: expected a positive integer, got {self.size!r}")
        if self.device_type not in ("cpu", "cuda"):
            raise TensorParallelError(f"tensor parallel runs on cpu or cuda, got "
                                      f"{self.device_type!r}")
        if self.device_type == "cuda":
            have = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if have < self.size:
                raise TensorParallelError(
                    f"--tensor-parallel {self.size} on cuda needs {self.size} GPUs, "
                    f"{have} visible")
            if not dist.is_nccl_available():
                raise TensorParallelError("this PyTorch has no NCCL: tensor parallel on GPUs "
                                          "needs it")
        elif not dist.is_gloo_available():
            raise TensorParallelError("this PyTorch has no gloo: tensor parallel on the CPU "
                                      "needs it")
        if not self.timeout_s > 0:
            raise TensorParallelError(f"timeout: expected seconds > 0, got {self.timeout_s!r}")

    @property
    def backend(self) -> str:
        return "nccl" if self.device_type == "cuda" else "gloo"


def send(conn: Connection, *message: Any) -> None:
    """A message by value (plain pickle: tensors travel as bytes, not shared memory that
    dies with the sender)."""
    conn.send_bytes(pickle.dumps(message))


def receive(conn: Connection) -> tuple[Any, ...]:
    return pickle.loads(conn.recv_bytes())


def _rank_main(rank: int, world: World, store_path: str, conn: Connection,
               target: Callable[..., None], args: tuple[Any, ...]) -> None:
    """One rank: join the group, run the target, report a failure and exit."""
    failed = False
    try:
        if world.device_type == "cuda":
            # NVLink multicast off (the GPU machine's notes ask it): NCCL reads this variable
            # with C getenv when the group starts. Written for the library, never read here
            # (engine/settings.py stays the one reader of the environment)
            os.putenv("NCCL_NVLS_ENABLE", "0")
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        else:
            device = torch.device("cpu")
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world.size))
        store = dist.FileStore(store_path, world.size)
        dist.init_process_group(world.backend, store=store, rank=rank, world_size=world.size,
                                timeout=timedelta(seconds=world.timeout_s),
                                device_id=device if world.device_type == "cuda" else None)
        target(RankGroup(rank, world.size, device), conn, *args)
    except (EOFError, BrokenPipeError):
        return  # the parent is gone: nothing to report to
    except BaseException as exc:  # noqa: BLE001 - every failure ends the run, with its message
        failed = True
        message = f"{type(exc).__name__}: {exc}"
        user = isinstance(exc, ValueError) and type(exc).__module__.startswith("toyllm.")
        try:
            send(conn, "fatal", rank, time.time(), message, traceback.format_exc(), user)
        except (OSError, EOFError):
            pass
    finally:
        if not failed and dist.is_initialized():
            dist.destroy_process_group()
    if failed:
        # skip the group's teardown: a NCCL destroy waits for collectives the others never join
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


@contextmanager
def _without_main() -> Iterator[None]:
    """Spawn runs the parent's __main__ again in each child: a console script (or a user's
    script) without an `if __name__ == "__main__"` guard would start the whole command again
    in every rank. The ranks need only importable modules (toyllm's, a test's), so while they
    start, __main__ is a bare module and the children import nothing of it."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


class RankProcesses:
    """The running ranks of one world, their pipes and sentinels."""

    def __init__(self, world: World, procs: list[Any], conns: list[Connection],
                 tmp: tempfile.TemporaryDirectory) -> None:
        self.world, self.procs, self.conns, self._tmp = world, procs, conns, tmp
        self.closed = False

    @classmethod
    def start(cls, world: World, target: Callable[..., None], *args: Any) -> RankProcesses:
        """Spawn the ranks (target must be importable by name: a module-level function)."""
        world.check()
        ctx = mp.get_context("spawn")
        tmp = tempfile.TemporaryDirectory(prefix="toyllm-tp-")
        pairs = [ctx.Pipe(duplex=True) for _ in range(world.size)]
        ours, theirs = [p[0] for p in pairs], [p[1] for p in pairs]
        procs = []
        with _without_main():
            for rank in range(world.size):
                p = ctx.Process(target=_rank_main, name=f"toyllm-tp-rank{rank}", daemon=True,
                                args=(rank, world, os.path.join(tmp.name, "store"),
                                      theirs[rank], target, args))
                p.start()
                procs.append(p)
        for c in theirs:  # each rank holds only its own end: its death reads as EOF here
            c.close()
        return cls(world, procs, ours, tmp)

    def send(self, rank: int, *message: Any) -> None:
        try:
            send(self.conns[rank], *message)
        except (OSError, EOFError):
            self._fail_from(None)

    def receive(self, rank: int = 0, timeout_s: float | None = None) -> tuple[Any, ...]:
        """The next message from `rank`; RankFailure (every rank stopped) if any rank fails
        first, or if nothing comes within timeout_s (None: wait as long as the ranks live)."""
        if self.closed:
            raise RankFailure("the tensor-parallel ranks were stopped by an earlier failure")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        sentinels = {p.sentinel: r for r, p in enumerate(self.procs)}
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = wait([*self.conns, *sentinels], timeout=left)
            if not ready:
                self.stop()
                raise RankFailure(f"no answer from rank {rank} in {timeout_s:g} s; every rank "
                                  "was stopped", rank)
            for r, conn in enumerate(self.conns):
                if conn in ready:
                    try:
                        msg = receive(conn)
                    except (EOFError, OSError):
                        self._fail_from(r)
                    if msg[0] == "fatal":
                        self._fail_from(r, msg)
                    if r == rank:
                        return msg
                    raise AssertionError(f"unexpected message from rank {r}: {msg[0]}")
            for s, r in sentinels.items():
                if s in ready:
                    self._fail_from(r)

    def _fail_from(self, first: int | None, msg: tuple[Any, ...] | None = None) -> NoReturn:
        """Collect the failures the ranks report within REPORT_GRACE_S, stop every rank and
        raise one RankFailure for the earliest."""
        reports = [msg] if msg is not None else []
        deadline = time.monotonic() + REPORT_GRACE_S
        for conn in self.conns:
            while True:
                left = max(0.0, deadline - time.monotonic())
                try:
                    if not conn.poll(left):
                        break
                    m = receive(conn)
                except (EOFError, OSError):
                    break
                if m[0] == "fatal":
                    reports.append(m)
        # a rank that died without a word (killed, crashed) is the cause of the others' errors
        # (a peer that vanished), which they report only after it died
        reported = {m[1] for m in reports}
        silent = [r for r, p in enumerate(self.procs)
                  if p.exitcode not in (None, 0) and r not in reported]
        codes = {r: p.exitcode for r, p in enumerate(self.procs)}
        self.stop()
        if silent or not reports:
            who = silent[0] if silent else first
            raise RankFailure(f"rank {who} of {self.world.size} exited (code {codes.get(who)}) "
                              "without a message; every rank was stopped", who)
        _, rank, _, message, tb, user = min(reports, key=lambda m: m[2])
        raise RankFailure(f"rank {rank} of {self.world.size} failed: {message}; every rank "
                          "was stopped", rank, tb, user)

    def stop(self) -> None:
        """End every rank still running (SIGTERM, then SIGKILL after STOP_GRACE_S)."""
        if self.closed:
            return
        self.closed = True
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        for c in self.conns:
            c.close()
        self._tmp.cleanup()

    def join(self, timeout_s: float = 60.0) -> None:
        """Wait for ranks told to finish; stop any that do not within timeout_s."""
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        failed = [r for r, p in enumerate(self.procs) if p.exitcode not in (0,)]
        if failed and not self.closed:
            self.stop()
            raise RankFailure(f"rank {failed[0]} did not exit cleanly (code "
                              f"{self.procs[failed[0]].exitcode})", failed[0])
        self.stop()
