"""Where a container's output goes: a pluggable sink the shim feeds per chunk.

The shim reads stdout/stderr pipes (or the pty) in chunks and hands each chunk to a
sink. Today the sink either discards or appends the raw bytes to a file; the CRI log
format writer (cri_py/logging) will be another sink with the same three methods, so
the shim's I/O loop does not change when it lands.
"""

from __future__ import annotations

import os
import sys

STDOUT = "stdout"
STDERR = "stderr"


class LogSink:
    """The shim's view of a log destination (an interface; typing.Protocol is not used
    because importing typing costs every shim memory)."""

    def write(self, stream: str, data: bytes) -> None:
        """Record one chunk of `stream` ("stdout" or "stderr"); never raises."""

    def close(self) -> None:
        """Flush and release the destination (the container has exited for good)."""

    def reopen(self) -> None:
        """Start a new file after rotation (the kubelet's ReopenContainerLog)."""


class NullSink(LogSink):
    """Discards output: no log path was given."""

    def write(self, stream: str, data: bytes) -> None:
        """Drop the chunk."""

    def close(self) -> None:
        """Nothing to release."""

    def reopen(self) -> None:
        """Nothing to reopen."""


class RawFileSink(LogSink):
    """Appends raw bytes of both streams to one file (until the CRI writer lands).

    Write errors (disk full, file removed by hand) are reported once on the shim's
    stderr and the data dropped: a log problem must never stall or kill the container.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self._failed = False
        self._open()

    def _open(self) -> None:
        """Open (creating) the file in append mode, so concurrent reopen stays safe."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self._fd = os.open(self.path, flags, 0o640)

    def write(self, stream: str, data: bytes) -> None:
        """One os.write of the whole chunk (append mode: atomic position)."""
        if self._fd < 0:
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            if not self._failed:
                self._failed = True
                print(f"log write to {self.path} failed: {exc}; dropping output", file=sys.stderr)

    def close(self) -> None:
        """Close the file; later writes are dropped."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def reopen(self) -> None:
        """Close and open the path again (it may have been renamed away)."""
        self.close()
        self._failed = False
        self._open()


def make_sink(log_path: str) -> LogSink:
    """The sink for a task: a file when a path is given, else discard."""
    if not log_path:
        return NullSink()
    return RawFileSink(log_path)
