"""Engine specs that fail on purpose, for the engine process's failure tests
(tests/test_server_process.py). A module of its own so that the engine process, started with
multiprocessing's "spawn", imports them by name."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ExitingSpec:
    """An engine process that dies while it builds (as a crash of the loader would)."""

    code: int

    def build(self) -> tuple[object, object]:
        os._exit(self.code)


@dataclass(frozen=True)
class RaisingSpec:
    """A build that raises an error that is not the user's (a bug)."""

    message: str

    def build(self) -> tuple[object, object]:
        raise RuntimeError(self.message)
