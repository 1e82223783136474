"""The CRI log format encoder (cri_py.logging.cri_format) and the shim's CriLogSink.

Expectations are written out by hand in the kubelet's format; a small independent
parser below turns a log back into the streams' bytes, so random chunkings can be
checked for exact round trips and for records that do not depend on the chunking.
"""

from __future__ import annotations

import calendar
import fcntl
import os
import random
import re
import subprocess
import sys
import textwrap

import pytest

from cri_py.logging.cri_format import DEFAULT_MAX_LINE, CriLogEncoder
from cri_py.shim.logsink import CriLogSink, NullSink, make_sink
from cri_py.shim.shim import ContainerIO

T0 = 1475712429669794202  # 2016-10-06T00:07:09.669794202Z
TS0 = b"2016-10-06T00:07:09.669794202Z"
TS_RE = re.compile(rb"\A(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)\.(\d{9})Z\Z")


# --- an independent reader of the format ------------------------------------------


def parse(log: bytes) -> list[tuple[int, str, str, bytes]]:
    """(timestamp ns, stream, tag, content) per record; asserts the format is exact."""
    assert log == b"" or log.endswith(b"\n"), "a log ends with a complete record"
    records = []
    for line in log.split(b"\n")[:-1]:
        stamp, stream, tag, content = line.split(b" ", 3)  # content may hold spaces
        match = TS_RE.match(stamp)
        assert match, stamp
        year, month, day, hour, minute, second, nanos = (int(g) for g in match.groups())
        seconds = calendar.timegm((year, month, day, hour, minute, second))
        assert stream in (b"stdout", b"stderr") and tag in (b"P", b"F"), line
        records.append((seconds * 10**9 + nanos, stream.decode(), tag.decode(), content))
    return records


def rebuild(records: list[tuple[int, str, str, bytes]]) -> dict[str, bytes]:
    """Each stream's original bytes: F ends a line, P continues it."""
    out: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
    for _, stream, tag, content in records:
        out[stream] += [content, b"\n"] if tag == "F" else [content]
    return {stream: b"".join(parts) for stream, parts in out.items()}


def reference_records(data: bytes, max_line: int) -> list[tuple[str, bytes]]:
    """(tag, content) a stream's bytes must become, written the obvious slow way."""
    *lines, unfinished = data.split(b"\n")
    records = []
    for line in lines:
        pieces = [line[i : i + max_line] for i in range(0, len(line), max_line)] or [b""]
        records += [("P", piece) for piece in pieces[:-1]] + [("F", pieces[-1])]
    records += [("P", unfinished[i : i + max_line]) for i in range(0, len(unfinished), max_line)]
    return records


def f(stream: str, content: bytes, ts: bytes = TS0) -> bytes:
    return ts + b" " + stream.encode() + b" F " + content + b"\n"


def p(stream: str, content: bytes, ts: bytes = TS0) -> bytes:
    return ts + b" " + stream.encode() + b" P " + content + b"\n"


# --- timestamps -----------------------------------------------------------------------


def test_timestamp_is_rfc3339nano_utc_with_nine_digits():
    enc = CriLogEncoder()
    assert enc.timestamp(T0) == TS0
    assert enc.timestamp(T0 - 669794202 + 5) == b"2016-10-06T00:07:09.000000005Z"
    assert enc.timestamp(0) == b"1970-01-01T00:00:00.000000000Z"
    # the cached per-second prefix follows the clock, also backwards
    assert enc.timestamp(T0 + 10**9) == b"2016-10-06T00:07:10.669794202Z"
    assert enc.timestamp(T0 + 3600 * 10**9 + 1) == b"2016-10-06T01:07:09.669794203Z"
    assert enc.timestamp(T0) == TS0


# --- records ----------------------------------------------------------------------------


def test_complete_lines_become_f_records():
    enc = CriLogEncoder()
    assert enc.encode("stdout", b"hello world\nsecond  line \n", T0) == (
        f("stdout", b"hello world") + f("stdout", b"second  line ")
    )
    assert enc.pending("stdout") == b""


def test_empty_line_keeps_the_space_after_the_tag():
    enc = CriLogEncoder()
    assert enc.encode("stdout", b"\n\na\n\n", T0) == (
        TS0 + b" stdout F \n" + TS0 + b" stdout F \n" + f("stdout", b"a") + TS0 + b" stdout F \n"
    )


def test_crlf_keeps_the_cr():
    enc = CriLogEncoder()
    assert enc.encode("stdout", b"tty line\r\n\r\n", T0) == f("stdout", b"tty line\r") + f("stdout", b"\r")


def test_line_completed_by_a_later_chunk_gets_the_later_time():
    enc = CriLogEncoder()
    assert enc.encode("stdout", b"first\nsec", T0) == f("stdout", b"first")
    assert enc.pending("stdout") == b"sec"
    assert enc.encode("stdout", b"ond half", T0 + 1) == b""
    later = b"2016-10-06T00:07:09.669794205Z"
    assert enc.encode("stdout", b" done\nthird", T0 + 3) == f("stdout", b"second half done", later)
    assert enc.pending("stdout") == b"third"


def test_stdout_and_stderr_keep_separate_partial_lines():
    enc = CriLogEncoder()
    assert enc.encode("stdout", b"out-a", T0) == b""
    assert enc.encode("stderr", b"err-a", T0) == b""
    assert enc.encode("stderr", b"-b\nerr-c", T0) == f("stderr", b"err-a-b")
    assert enc.encode("stdout", b"-b\n", T0) == f("stdout", b"out-a-b")
    assert enc.pending("stdout") == b"" and enc.pending("stderr") == b"err-c"
    assert enc.flush("stdout", T0) == b""
    assert enc.flush("stderr", T0) == p("stderr", b"err-c")
    assert enc.pending("stderr") == b""


def test_flush_writes_an_unfinished_line_as_p():
    enc = CriLogEncoder()
    enc.encode("stdout", b"no newline at the end", T0)
    assert enc.flush("stdout", T0) == p("stdout", b"no newline at the end")
    assert enc.flush("stdout", T0) == b""


def test_long_lines_are_cut_into_p_records_of_max_size():
    enc = CriLogEncoder(max_line=4)
    assert enc.encode("stdout", b"abcd\n", T0) == f("stdout", b"abcd")  # exactly max: F
    assert enc.encode("stdout", b"abcde\n", T0) == p("stdout", b"abcd") + f("stdout", b"e")
    assert enc.encode("stdout", b"abcdefgh\n", T0) == p("stdout", b"abcd") + f("stdout", b"efgh")
    assert enc.encode("stdout", b"x\nabcdefghij\ny\n", T0) == (
        f("stdout", b"x") + p("stdout", b"abcd") + p("stdout", b"efgh") + f("stdout", b"ij") + f("stdout", b"y")
    )


def test_long_lines_among_short_ones_in_one_big_chunk():
    enc = CriLogEncoder(max_line=8)
    long1, long2 = b"L" * 20, b"M" * 17
    chunk = b"\n".join([long1, b"a", b"", long2, long1, b"b" * 8, b"c", long2, b""]) + b"\n"
    expected = b"".join(
        p("stdout", c) if tag == "P" else f("stdout", c) for tag, c in reference_records(chunk, 8)
    )
    assert enc.encode("stdout", chunk, T0) == expected
    assert expected.count(b" P ") == 2 + 2 + 2 + 2 and expected.count(b" F ") == 9


def test_unfinished_line_longer_than_max_is_written_as_it_grows():
    enc = CriLogEncoder(max_line=4)
    assert enc.encode("stderr", b"abc", T0) == b""
    assert enc.encode("stderr", b"d", T0) == b""  # exactly max: could still end here
    assert enc.encode("stderr", b"efghij", T0) == p("stderr", b"abcd") + p("stderr", b"efgh")
    assert enc.pending("stderr") == b"ij"
    assert enc.encode("stderr", b"\n", T0) == f("stderr", b"ij")


def test_one_mebibyte_line():
    enc = CriLogEncoder()
    assert DEFAULT_MAX_LINE == 16384
    mib = (bytes(range(97, 123)) * 40330)[: 1 << 20]  # 1 MiB of a..z, no LF
    assert len(mib) == 1 << 20
    records = parse(enc.encode("stdout", mib + b"\n", T0))
    # as containerd: a line of exactly n*max is n-1 P records and a full-size F
    assert [tag for _, _, tag, _ in records] == ["P"] * 63 + ["F"]
    assert all(len(c) == 16384 for *_, c in records) and rebuild(records)["stdout"] == mib + b"\n"
    records = parse(enc.encode("stdout", mib + b"!\n", T0))
    assert [tag for _, _, tag, _ in records] == ["P"] * 64 + ["F"] and records[-1][3] == b"!"


def test_one_mebibyte_line_in_pipe_sized_chunks():
    enc = CriLogEncoder()
    data = b"x" * (1 << 20) + b"y\nshort\n"
    out = b"".join(enc.encode("stdout", data[i : i + 65536], T0 + i) for i in range(0, len(data), 65536))
    records = parse(out)
    assert [tag for _, _, tag, _ in records] == ["P"] * 64 + ["F", "F"]
    assert rebuild(records)["stdout"] == data
    assert enc.pending("stdout") == b""


def test_unknown_stream_and_tiny_max_are_refused():
    with pytest.raises(KeyError):
        CriLogEncoder().encode("stdin", b"x\n", T0)
    with pytest.raises(ValueError):
        CriLogEncoder(max_line=1)


@pytest.mark.parametrize("seed", range(12))
def test_random_chunkings_round_trip_exactly(seed):
    rng = random.Random(seed)
    max_line = rng.choice([2, 3, 7, 16, 100, DEFAULT_MAX_LINE])
    streams = {}
    for stream in ("stdout", "stderr"):
        lines = []
        for _ in range(rng.randrange(0, 300)):
            size = rng.choice([0, 1, max_line - 1, max_line, max_line + 1, 2 * max_line, rng.randrange(3 * max_line)])
            body = bytes(rng.choice(b"ab \r\t\x00\xff") for _ in range(min(size, 50)))
            lines.append((body * (size // max(len(body), 1) + 1))[:size])
        streams[stream] = b"\n".join(lines) + rng.choice([b"", b"\n", b"tail", b"\r"])
    enc = CriLogEncoder(max_line)
    out, now = [], T0
    pos = {"stdout": 0, "stderr": 0}
    while any(pos[s] < len(streams[s]) for s in streams):
        stream = rng.choice([s for s in streams if pos[s] < len(streams[s])])
        step = rng.choice([1, 2, max_line, rng.randrange(1, 70000)])
        out.append(enc.encode(stream, streams[stream][pos[stream] : pos[stream] + step], now))
        pos[stream] += step
        now += rng.randrange(10**9)
    out += [enc.flush("stdout", now), enc.flush("stderr", now)]
    records = parse(b"".join(out))
    assert rebuild(records) == streams
    for stream, data in streams.items():
        mine = [(tag, content) for _, s, tag, content in records if s == stream]
        assert mine == reference_records(data, max_line)  # independent of the chunking
    stamps = [ts for ts, *_ in records]
    assert stamps == sorted(stamps) and all(ts >= T0 for ts in stamps)


# --- the shim's sink ---------------------------------------------------------------------


def test_make_sink_writes_cri_records(tmp_path):
    path = tmp_path / "0.log"
    sink = make_sink(str(path))
    assert isinstance(sink, CriLogSink)
    sink.write("stdout", b"out line\n")
    sink.write("stderr", b"err line\npart")
    sink.close()
    records = parse(path.read_bytes())
    assert [(s, t, c) for _, s, t, c in records] == [
        ("stdout", "F", b"out line"),
        ("stderr", "F", b"err line"),
        ("stderr", "P", b"part"),  # flushed at close
    ]
    sink.write("stdout", b"dropped after close\n")
    assert len(parse(path.read_bytes())) == 3
    assert isinstance(make_sink(""), NullSink)


def test_log_file_is_created_0640(tmp_path):
    old = os.umask(0o022)
    try:
        CriLogSink(str(tmp_path / "a.log")).close()
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a.log").st_mode & 0o777 == 0o640


def test_unopenable_path_raises_for_the_shims_create_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        make_sink(str(tmp_path / "no" / "dir" / "0.log"))


def test_reopen_between_two_halves_of_a_line(tmp_path):
    path, rotated = tmp_path / "0.log", tmp_path / "0.log.20240101"
    sink = CriLogSink(str(path))
    sink.write("stdout", b"before\nfirst ha")
    sink.write("stderr", b"err before\n")
    os.rename(path, rotated)  # the kubelet rotates, then asks for a reopen
    sink.write("stdout", b"lf, still old fd\nsec")
    sink.reopen()
    sink.write("stdout", b"ond half\nafter\n")
    sink.close()
    old, new = parse(rotated.read_bytes()), parse(path.read_bytes())
    assert [(s, t, c) for _, s, t, c in old] == [
        ("stdout", "F", b"before"),
        ("stderr", "F", b"err before"),
        ("stdout", "F", b"first half, still old fd"),
    ]
    assert [(s, t, c) for _, s, t, c in new] == [("stdout", "F", b"second half"), ("stdout", "F", b"after")]


def test_write_errors_are_reported_once_and_never_raise(tmp_path, capsys):
    sink = CriLogSink("/dev/full")  # every write: ENOSPC
    for _ in range(3):
        sink.write("stdout", b"lost\n")
    sink.close()
    err = capsys.readouterr().err
    assert err.count("log write to /dev/full failed") == 1 and "No space left" in err


def test_a_torn_record_is_ended_before_the_next(tmp_path):
    """A write cut short (here: a full non-blocking pipe) must not glue two records."""
    sink = CriLogSink(str(tmp_path / "unused.log"))
    r, w = os.pipe()
    os.set_blocking(w, False)
    size = fcntl.fcntl(w, 1032)  # F_GETPIPE_SZ
    os.write(w, b"\0" * (size - 4096))  # one free page left
    os.close(sink._fd)
    sink._fd = w
    # longer than PIPE_BUF, so not all-or-nothing: one page lands, then EAGAIN
    sink.write("stdout", b"x" * 5000 + b"\n")
    landed = os.read(r, size)
    assert landed[: size - 4096] == b"\0" * (size - 4096) and landed[size - 4096 :].startswith(b"20")
    assert len(landed) == size
    sink.write("stdout", b"next\n")
    sink.close()
    data = os.read(r, 1 << 16)
    os.close(r)
    assert data.startswith(b"\n") and data.endswith(b" stdout F next\n")
    assert len(parse(data[1:])) == 1


def test_container_io_flushes_a_stream_at_its_eof(tmp_path):
    """The shim's hook: when a pipe ends, its unfinished last line is written at once
    (before the exit is reported), not only when the shim leaves."""
    path = tmp_path / "0.log"
    io = ContainerIO(CriLogSink(str(path)), want_stdin=False, tty=False)
    _, out_w, err_w = io.child_stdio()
    os.write(out_w, b"line\nno newline")
    os.write(err_w, b"err\n")
    io.spawned()  # drops the write ends: both pipes are at EOF once drained
    for fd in io.drain():
        io.close_reader(fd)
    records = [(s, t, c) for _, s, t, c in parse(path.read_bytes())]
    assert sorted(records) == [("stderr", "F", b"err"), ("stdout", "F", b"line"), ("stdout", "P", b"no newline")]
    io.close()
    assert len(parse(path.read_bytes())) == 3


def test_encoder_module_imports_nothing_but_time():
    """It is loaded into every shim: no typing, dataclasses or anything new."""
    code = textwrap.dedent(
        f"""
        import sys
        pkg = type(sys)("cri_py")
        pkg.__path__ = [{os.path.join(os.getcwd(), "cri_py")!r}]
        sys.modules["cri_py"] = pkg
        before = set(sys.modules)
        import cri_py.logging.cri_format
        print(",".join(sorted(set(sys.modules) - before)))
        """
    )
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True)
    assert set(out.stdout.strip().split(",")) <= {"cri_py.logging", "cri_py.logging.cri_format", "__future__", "time"}
