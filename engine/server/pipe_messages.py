"""Messages from the engine process to the server over a pipe: each a pickled object after an
8-byte big-endian length.

Why not multiprocessing.Connection.recv on the server's side: its reader thread competes for the
GIL with a busy event loop, and every blocking system call gives the GIL up and must win it back
(a wait of up to the interpreter's switch interval, 5 ms, while the event loop runs). `recv`
makes two or three such calls per message (the length, then the body); `MessageReader.read`
makes one per wake and takes every message the pipe holds by then, however many steps' worth.

    write_message(fd, obj)              # the engine process
    reader = MessageReader(fd)          # the server's reader thread
    for obj in reader.read(): ...       # blocks until at least one whole message came
"""

from __future__ import annotations

import fcntl
import os
import pickle
import struct
from typing import Any

_LENGTH = struct.Struct("!Q")
# the most read at once: any number of whole messages, and the start of the next
READ_BYTES = 1 << 20
# the pipes' kernel buffer (Linux; the default is 64 KiB): an engine step's message for hundreds
# of requests is ~10-20 KiB, so a server that reads late does not stall the engine's writes
PIPE_BYTES = 1 << 20


def write_message(fd: int, obj: Any) -> None:
    """Write `obj` as one message (all of it, however the pipe splits the writes)."""
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_LENGTH.pack(len(payload)) + payload)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class MessageReader:
    """The messages of a pipe, in order, read in as few system calls as they came in."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = bytearray()

    def read(self) -> list[Any]:
        """The messages that came whole by the time of one read (at least one); EOFError when
        the writer closed the pipe (it exited) before another whole message came."""
        while True:
            chunk = os.read(self.fd, READ_BYTES)  # waits without the GIL
            if not chunk:
                raise EOFError("the pipe closed")
            self._buffer += chunk
            messages = self._whole()
            if messages:
                return messages

    def _whole(self) -> list[Any]:
        buffer, start, messages = self._buffer, 0, []
        with memoryview(buffer) as view:  # released before the buffer shrinks
            while len(buffer) - start >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(buffer, start)
                end = start + _LENGTH.size + length
                if end > len(buffer):
                    break
                messages.append(pickle.loads(view[start + _LENGTH.size:end]))
                start = end
        del buffer[:start]
        return messages


def widen(fd: int) -> None:
    """Give the pipe of `fd` a PIPE_BYTES kernel buffer where the system allows (Linux's
    F_SETPIPE_SZ, up to /proc/sys/fs/pipe-max-size); elsewhere the default stays."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if set_size is None:
        return
    try:
        fcntl.fcntl(fd, set_size, PIPE_BYTES)
    except OSError:
        pass
