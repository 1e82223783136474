"""The kubelet's CRI container log format, as a sans-I/O encoder.

Every record is one line of the log file::

    <RFC3339Nano timestamp> SP <stream> SP <tag> SP <content> LF
    2016-10-06T00:17:09.669794202Z stdout F hello

`tag` is F for the last (or only) record of a line and P for a piece of a longer one:
a line longer than `max_line` is cut into P records of exactly `max_line` bytes and an
F record with the remainder (1..max_line bytes), as containerd does with
`max_container_log_line_size`. An empty line is `<ts> stdout F ` (the space after the
tag is part of the format; the kubelet's parser requires it). The content is the line
without its LF; a CR before it is kept, so the file holds exactly what was written.

The encoder only turns chunks into bytes; the caller (the shim's CriLogSink) owns the
file. It runs in every shim, so it imports nothing but `time` (no typing, no
dataclasses: each costs shim memory), and it works per chunk with C-implemented bytes
methods: the common case, every line of a chunk shorter than `max_line`, is a single
`bytes.replace` of LF by "LF <prefix>". Per-line Python work would cost ~20x more
(3 ms per MiB of 100-byte lines against 0.16 ms), a Python loop per byte far more.

All lines completed by one chunk share one timestamp: they arrived in one read.
"""

from __future__ import annotations

import time

STDOUT = "stdout"
STDERR = "stderr"
DEFAULT_MAX_LINE = 16 * 1024  # containerd's default max_container_log_line_size
_NS_PER_S = 1_000_000_000
_LABELS = {STDOUT: b" stdout ", STDERR: b" stderr "}


class CriLogEncoder:
    """Chunks of container output in, CRI log records out; one pending line per stream.

    `encode()` returns the records every line completed by the chunk produces (plus P
    records when the unfinished line outgrows `max_line`) and keeps the unfinished
    rest; `encode_parts()` is the same as buffers for os.writev (what the shim uses);
    `flush()` turns the rest into a P record when the stream ends.
    """

    __slots__ = ("max_line", "_block", "_pending", "_second", "_second_prefix")

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        if max_line < 2:
            raise ValueError(f"max_line must be at least 2, not {max_line}")
        self.max_line = max_line
        # any run of more than max_line bytes without LF covers one whole aligned block
        # of this size, so probing one find() per block finds every overlong line
        self._block = max_line // 2
        self._pending = {STDOUT: b"", STDERR: b""}
        self._second = -1
        self._second_prefix = b""

    def timestamp(self, now_ns: int) -> bytes:
        """`now_ns` (ns since the epoch) as RFC3339Nano in UTC with all 9 digits.

        The date and time of day change once a second, so they are formatted once a
        second; each call only formats the nanoseconds.
        """
        second, nanos = divmod(now_ns, _NS_PER_S)
        if second != self._second:
            self._second = second
            self._second_prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second)).encode()
        return b"%s%09dZ" % (self._second_prefix, nanos)

    def pending(self, stream: str) -> bytes:
        """The unfinished line of `stream` (not yet in any record)."""
        return self._pending[stream]

    def encode(self, stream: str, chunk: bytes, now_ns: int) -> bytes:
        """The bytes to append to the log for `chunk` of `stream` read at `now_ns`."""
        return b"".join(self.encode_parts(stream, chunk, now_ns))

    def encode_parts(self, stream: str, chunk: bytes, now_ns: int) -> list[bytes | memoryview]:
        """encode() as a few buffers for one os.writev: skips a copy of the output.

        The lines after the chunk's first LF are encoded by one replace over the whole
        chunk and handed out as a memoryview slice of it, so the chunk is neither
        joined to the pending line nor sliced: per chunk the only big allocation is
        the replace's result (fewer fresh heap pages, fewer page faults).
        """
        pending = self._pending[stream]
        first = chunk.find(b"\n")
        if first < 0:
            return self._unfinished(stream, pending + chunk, now_ns)
        end = chunk.rfind(b"\n")
        head = self.timestamp(now_ns) + _LABELS[stream]
        full = head + b"F "
        line = pending + chunk[:first] if pending else chunk[:first]
        if len(line) > self.max_line:
            parts: list[bytes | memoryview] = [self._long_line(head, full, line)]
        else:
            parts = [b"".join((full, line, b"\n"))]
        if end > first:
            if self._has_long_line(chunk, first + 1, end):
                parts.append(self._complete_lines(head, full, chunk[first + 1 : end]))
            else:
                out = chunk.replace(b"\n", b"\n" + full)
                # out = <first line> LF full <middle lines, LF full after each> <rest>
                parts.append(memoryview(out)[first + 1 : len(out) - (len(chunk) - end - 1) - len(full)])
        self._pending[stream] = b""
        if end + 1 < len(chunk):
            parts += self._unfinished(stream, chunk[end + 1 :], now_ns)
        return parts

    def flush(self, stream: str, now_ns: int) -> bytes:
        """The unfinished line of `stream` as a P record (the stream has ended)."""
        rest = self._pending[stream]
        if not rest:
            return b""
        self._pending[stream] = b""
        return b"".join((self.timestamp(now_ns), _LABELS[stream], b"P ", rest, b"\n"))

    def _unfinished(self, stream: str, data: bytes, now_ns: int) -> list[bytes | memoryview]:
        """Keep an unfinished line; if it outgrew max_line, write its head as P records."""
        if len(data) <= self.max_line:
            self._pending[stream] = data  # nothing to write: no timestamp either
            return []
        keep = (len(data) - 1) // self.max_line * self.max_line
        self._pending[stream] = data[keep:]
        return [self._partials(self.timestamp(now_ns) + _LABELS[stream], data[:keep])]

    def _has_long_line(self, data: bytes, start: int, stop: int) -> bool:
        """Whether a line in data[start:stop] (lines joined by LF) exceeds max_line.

        A run of more than max_line bytes without LF covers a whole block of
        max_line // 2 bytes aligned at `start`: one find() per block, each stopping at
        the block's first LF, rules out every overlong line without looking at lines.
        """
        if stop - start <= self.max_line:
            return False
        block = self._block
        for at in range(start, stop, block):
            if data.find(b"\n", at, min(at + block, stop)) < 0:
                line_start = data.rfind(b"\n", start, at) + 1 or start
                line_end = data.find(b"\n", at, stop)
                if (stop if line_end < 0 else line_end) - line_start > self.max_line:
                    return True
        return False

    def _complete_lines(self, head: bytes, full: bytes, body: bytes) -> bytes:
        """Records for `body`, complete lines joined by LF, some longer than max_line.

        Runs of short lines still go through one bytes.replace each; only the long
        lines (found like in _has_long_line) are cut up.
        """
        size = len(body)
        out = []
        start = 0  # first byte of the lines not yet encoded
        for block in range(0, size, self._block):
            if block < start or body.find(b"\n", block, block + self._block) >= 0:
                continue
            line_start = body.rfind(b"\n", 0, block) + 1
            line_end = body.find(b"\n", block)
            if line_end < 0:
                line_end = size
            if line_end - line_start <= self.max_line:
                continue
            if line_start > start:  # the short lines before the long one
                out.append(self._short_lines(full, body[start : line_start - 1]))
            out.append(self._long_line(head, full, body[line_start:line_end]))
            start = line_end + 1
        if start <= size:  # the short lines after the last long one
            out.append(self._short_lines(full, body[start:]))
        return b"".join(out)

    def _short_lines(self, full: bytes, lines: bytes) -> bytes:
        """F records for LF-joined lines that all fit in max_line."""
        return b"".join((full, lines.replace(b"\n", b"\n" + full), b"\n"))

    def _long_line(self, head: bytes, full: bytes, line: bytes) -> bytes:
        """P records of max_line bytes, then an F record with the rest (1..max_line)."""
        cut = (len(line) - 1) // self.max_line * self.max_line
        return self._partials(head, line[:cut]) + full + line[cut:] + b"\n"

    def _partials(self, head: bytes, data: bytes) -> bytes:
        """P records for `data`, a whole number of max_line pieces."""
        part = head + b"P "
        step = self.max_line
        return b"".join([part + data[i : i + step] + b"\n" for i in range(0, len(data), step)])
