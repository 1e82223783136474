"""Where a container's output goes: a pluggable sink the shim feeds per chunk.

The shim reads stdout/stderr pipes (or the pty) in chunks and hands each chunk to a
sink: NullSink without a log path, else CriLogSink, which writes the kubelet's CRI log
format (cri_py.logging.cri_format) itself, so output never passes through the daemon.
"""

from __future__ import annotations

import mmap
import os
import sys
import time

from cri_py.logging.cri_format import DEFAULT_MAX_LINE, STDERR, STDOUT, CriLogEncoder


class LogSink:
    """The shim's view of a log destination (an interface; typing.Protocol is not used
    because importing typing costs every shim memory)."""

    def write(self, stream: str, data: bytes) -> None:
        """Record one chunk of `stream` ("stdout" or "stderr"); never raises."""

    def end(self, stream: str) -> None:
        """`stream` has reached EOF: write out whatever of it is still held back."""

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


class ByteCounter:
    """Bytes this shim wrote to the log, in an 8-byte file the daemon reads at scrape time.

    The file is mmap'ed, so counting costs no syscall on the hot path and the daemon
    never has to ask 110 shims over their sockets for a Prometheus scrape.
    """

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, 8)
            self._map = mmap.mmap(fd, 8)
        finally:
            os.close(fd)
        self.total = int.from_bytes(self._map[:8], "little")

    def add(self, n: int) -> None:
        self.total += n
        self._map[:8] = self.total.to_bytes(8, "little")


def read_counter(path: str) -> int:
    """The value of a ByteCounter file (0 when it is not there)."""
    try:
        with open(path, "rb") as fh:
            return int.from_bytes(fh.read(8), "little")
    except OSError:
        return 0


class FileSink(LogSink):
    """An append-only log file: whole-buffer writes, report-once errors, reopen.

    Write errors (disk full, file removed by hand) are reported once on the shim's
    stderr and the data dropped: a log problem must never stall or kill the container.
    O_APPEND keeps every write at the current end even if someone else appends.
    """

    def __init__(self, path: str, counter_path: str = "") -> None:
        self.path = path
        self._fd = -1
        self._failed = False
        self._torn = False  # a failed write left half a record: end it before the next
        self._counter = ByteCounter(counter_path) if counter_path else None
        self._open()

    def _open(self) -> None:
        """Open (creating, 0640) the file; OSError reaches whoever asked for the sink."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self._fd = os.open(self.path, flags, 0o640)

    def _write(self, parts: list[bytes | memoryview]) -> None:
        """One os.writev of all the buffers (more writes only if the kernel takes less).

        One syscall per chunk keeps each chunk's records contiguous in the file, and
        writev spares joining the buffers into one more copy first.
        """
        total = sum(map(len, parts))
        if self._fd < 0 or not total:
            return
        if self._torn:
            parts = [b"\n", *parts]
            total += 1
        done = 0
        try:
            done = os.writev(self._fd, parts)
            if done < total:
                rest = memoryview(b"".join(parts))[done:]
                while rest:
                    written = os.write(self._fd, rest)
                    done += written
                    rest = rest[written:]
            self._torn = False
            if self._counter is not None:
                self._counter.add(done)
        except OSError as exc:
            if done:
                self._torn = True
            if self._counter is not None:
                self._counter.add(done)
            if not self._failed:
                self._failed = True
                print(f"log write to {self.path} failed: {exc}; dropping output", file=sys.stderr)
                sys.stderr.flush()

    def _close_fd(self) -> None:
        """Release the fd; later writes are dropped until a reopen."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        """Close the file."""
        self._close_fd()

    def reopen(self) -> None:
        """Close and open the path again (the kubelet renamed the old file away)."""
        self._close_fd()
        self._failed = False
        self._torn = False  # the half record stays in the old file
        self._open()


class CriLogSink(FileSink):
    """The kubelet's CRI log file, written by the shim (conmon style).

    A line still unfinished at reopen stays pending and continues in the new file, so
    rotation neither splits nor duplicates a line; it is written as a P record only
    when its stream ends (EOF) or the sink closes.
    """

    def __init__(self, path: str, max_line: int = DEFAULT_MAX_LINE, counter_path: str = "") -> None:
        self.encoder = CriLogEncoder(max_line)
        super().__init__(path, counter_path)

    def write(self, stream: str, data: bytes) -> None:
        """Encode the chunk with the read time as its lines' timestamp; one write."""
        self._write(self.encoder.encode_parts(stream, data, time.time_ns()))

    def end(self, stream: str) -> None:
        """The stream closed: its unfinished last line becomes a P record."""
        self._write([self.encoder.flush(stream, time.time_ns())])

    def close(self) -> None:
        """Flush both streams' unfinished lines as P records, then close the file."""
        now = time.time_ns()
        self._write([self.encoder.flush(STDOUT, now), self.encoder.flush(STDERR, now)])
        self._close_fd()


def make_sink(log_path: str, counter_path: str = "") -> LogSink:
    """The sink for a task: the CRI log file when a path is given, else discard.

    The file is opened here, so a path that cannot be opened fails the shim's setup
    and reaches the daemon as the create error.
    """
    if not log_path:
        return NullSink()
    return CriLogSink(log_path, counter_path=counter_path)
