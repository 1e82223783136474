"""The shim wire format, exit codes, crash-safe exit files, long socket paths, sinks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from cri_py.shim import protocol as p
from cri_py.shim.logsink import CriLogSink, NullSink, make_sink


def test_encode_decode_round_trip():
    message = {"op": "kill", "signal": 15, "all": True, "note": "ünïcode\nnewline"}
    line = p.encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1  # embedded newline is escaped
    assert p.decode(line[:-1]) == message


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'"str"', b"\xff\xfe"])
def test_decode_rejects_non_objects(raw):
    with pytest.raises(p.ProtocolError):
        p.decode(raw)


def test_ok_and_error_shapes():
    assert p.ok(state={"id": "a"}) == {"ok": True, "state": {"id": "a"}}
    assert p.error(p.NOT_FOUND, "gone") == {"ok": False, "kind": "not_found", "error": "gone"}


def test_line_buffer_splits_across_chunks():
    buf = p.LineBuffer()
    data = p.encode({"op": "state"}) + p.encode({"op": "wait"}) + b'{"op": "st'
    assert buf.feed(data[:5]) == []
    assert buf.feed(data[5:]) == [{"op": "state"}, {"op": "wait"}]
    assert buf.pending == b'{"op": "st'
    assert buf.feed(b'art"}\n\n  \n') == [{"op": "start"}]
    assert buf.pending == b""


def test_line_buffer_limit():
    buf = p.LineBuffer(limit=16)
    with pytest.raises(p.ProtocolError):
        buf.feed(b"x" * 17)
    buf = p.LineBuffer(limit=16)
    with pytest.raises(p.ProtocolError):
        buf.feed(b"{}\n" + b"y" * 17)


def test_exit_code_of_real_wait_statuses():
    """Exit codes as the kubelet expects: N for exit(N), 128+S for death by signal S."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    _, status = os.waitpid(proc.pid, 0)
    proc.returncode = 3  # collected by hand above
    assert p.exit_code_of(status) == 3
    proc = subprocess.Popen(["sleep", "100"])
    os.kill(proc.pid, signal.SIGTERM)
    _, status = os.waitpid(proc.pid, 0)
    proc.returncode = -15
    assert p.exit_code_of(status) == 143
    assert p.exit_code_of(9) == 137  # raw status of a SIGKILLed process


def test_write_json_atomic_replaces_and_leaves_no_temp(tmp_path):
    path = str(tmp_path / "exit.json")
    p.write_json_atomic(path, {"exit_code": 1})
    p.write_json_atomic(path, {"exit_code": 2})
    assert p.read_json(path) == {"exit_code": 2}
    assert os.listdir(tmp_path) == ["exit.json"]
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_read_json_absent_or_torn(tmp_path):
    assert p.read_json(str(tmp_path / "nope.json")) is None
    (tmp_path / "torn.json").write_bytes(b'{"exit_code": ')
    assert p.read_json(str(tmp_path / "torn.json")) is None


def test_exit_file_is_never_torn_when_writer_is_killed(tmp_path):
    """A writer SIGKILLed at a random instant leaves the old or the new file, never half."""
    path = tmp_path / "exit.json"
    p.write_json_atomic(str(path), {"n": -1, "pad": ""})
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys
                sys.path.insert(0, {os.getcwd()!r})
                from cri_py.shim.protocol import write_json_atomic
                n = 0
                while True:
                    write_json_atomic({str(path)!r}, {{"n": n, "pad": "x" * 200000}})
                    n += 1
                """
            ),
        ]
    )
    try:
        seen = set()
        while len(seen) < 20:
            data = json.loads(path.read_bytes())  # must always parse
            seen.add(data["n"])
            assert data["n"] == -1 or len(data["pad"]) == 200000
    finally:
        writer.kill()
        writer.wait()
    data = json.loads(path.read_bytes())
    assert data["n"] >= 0
    # at most the writer's own temp file may remain after a kill; never a torn target
    assert all(name == "exit.json" or name.startswith(".exit.json.tmp.") for name in os.listdir(tmp_path))


def test_unix_path_reaches_sockets_in_deep_directories(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = str(deep / "shim.sock")
    assert len(path) > p.UNIX_PATH_MAX
    server = socket.socket(socket.AF_UNIX)
    with p.UnixPath(path) as usable:
        assert usable.startswith("/proc/self/fd/")
        server.bind(usable)
    server.listen(1)
    assert os.path.exists(path)
    client = socket.socket(socket.AF_UNIX)
    with p.UnixPath(path) as usable:
        client.connect(usable)
    conn, _ = server.accept()
    client.sendall(b"hi")
    assert conn.recv(2) == b"hi"
    for s in (conn, client, server):
        s.close()
    with p.UnixPath("/short/path.sock") as usable:
        assert usable == "/short/path.sock"


def test_file_sink_appends_and_reopens(tmp_path):
    path = tmp_path / "ctr.log"
    sink = make_sink(str(path))  # the record format itself: tests/unit/test_cri_log.py
    assert isinstance(sink, CriLogSink)

    def lines(p):
        return [r.split(" ", 3)[3] for r in p.read_text().splitlines()]

    sink.write("stdout", b"one\n")
    sink.write("stderr", b"two\n")
    os.rename(path, tmp_path / "ctr.log.1")  # the kubelet rotates
    sink.write("stdout", b"three\n")  # still goes to the renamed file
    sink.reopen()
    sink.write("stdout", b"four\n")
    sink.close()
    sink.write("stdout", b"dropped after close\n")
    assert lines(tmp_path / "ctr.log.1") == ["one", "two", "three"]
    assert lines(path) == ["four"]


def test_null_sink_when_no_path():
    sink = make_sink("")
    assert isinstance(sink, NullSink)
    sink.write("stdout", b"x")
    sink.reopen()
    sink.close()


def test_shim_modules_import_only_the_standard_library():
    """The shim must never load grpc, tinydb, httpx or cri_py's daemon side."""
    code = textwrap.dedent(
        f"""
        import sys
        pkg = type(sys)("cri_py")
        pkg.__path__ = [{os.path.join(os.getcwd(), "cri_py")!r}]
        sys.modules["cri_py"] = pkg
        import cri_py.shim.launcher, cri_py.shim.shim
        bad = [m for m in sys.modules if m.split(".")[0] in
               ("grpc", "tinydb", "httpx", "asyncio", "typing", "dataclasses")
               or (m.startswith("cri_py.") and not m.startswith(("cri_py.shim", "cri_py.logging", "cri_py.atomicfile")))]
        print(",".join(bad))
        """
    )
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_error_kinds_map_to_domain_errors_and_an_old_shim_says_so():
    from cri_py import errors
    from cri_py.runtime.shim_client import error_for

    assert isinstance(error_for(p.error(p.NOT_FOUND, "gone")), errors.NotFound)
    assert isinstance(error_for(p.error(p.INVALID_ARGUMENT, "bad signal")), errors.InvalidArgument)
    old = error_for(p.error(p.INVALID_ARGUMENT, "unknown op 'exec'"))
    assert isinstance(old, errors.FailedPrecondition) and "restart the container" in str(old)
