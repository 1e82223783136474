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
    rest; `flush()` turns that rest into a P record when the stream ends.
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
        label = _LABELS[stream]
        pending = self._pending[stream]
        data = pending + chunk if pending else chunk
        end = data.rfind(b"\n")
        if end < 0 and len(data) <= self.max_line:
            self._pending[stream] = data  # nothing to write yet: skip the timestamp
            return b""
        head = self.timestamp(now_ns) + label
        out = b"" if end < 0 else self._complete_lines(head, data[:end])
        rest = data[end + 1 :]
        if len(rest) > self.max_line:
            keep = (len(rest) - 1) // self.max_line * self.max_line
            out += self._partials(head, rest[:keep])
            rest = rest[keep:]
        self._pending[stream] = rest
        return out

    def flush(self, stream: str, now_ns: int) -> bytes:
        """The unfinished line of `stream` as a P record (the stream has ended)."""
        rest = self._pending[stream]
        if not rest:
            return b""
        self._pending[stream] = b""
        return b"".join((self.timestamp(now_ns), _LABELS[stream], b"P ", rest, b"\n"))

    def _complete_lines(self, head: bytes, body: bytes) -> bytes:
        """Records for `body`: complete lines joined by LF (the last LF cut off).

        Runs of short lines go through one bytes.replace each; only a line longer than
        max_line (found by probing one find() per half-max_line block) is cut up.
        """
        full = head + b"F "
        size = len(body)
        if size <= self.max_line:
            return self._short_lines(full, body)
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
