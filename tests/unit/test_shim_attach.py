"""The shim's attach hub on real sockets and pipes: fan-out, slow clients, stdin rules."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from cri_py.shim import attach
from cri_py.shim import protocol as p
from cri_py.shim.attach import AttachHub
from cri_py.shim.logsink import NullSink
from cri_py.shim.shim import ContainerIO, EventLoop


def test_frames_round_trip_in_any_chunking():
    data = p.frame(p.ATTACH_STDOUT, b"hello") + p.frame(p.ATTACH_END, b"{}") + p.frame(p.ATTACH_STDIN)
    for step in (1, 3, 7, len(data)):
        buf = p.FrameBuffer()
        frames = []
        for i in range(0, len(data), step):
            frames += buf.feed(data[i : i + step])
        assert frames == [(p.ATTACH_STDOUT, b"hello"), (p.ATTACH_END, b"{}"), (p.ATTACH_STDIN, b"")]


def test_oversized_frame_is_a_protocol_error():
    with pytest.raises(p.ProtocolError):
        p.FrameBuffer().feed(bytes((p.ATTACH_STDIN,)) + (p.MAX_FRAME + 1).to_bytes(4, "big"))


class Rig:
    """A hub over a container 'stdin' pipe whose read end the test holds."""

    def __init__(self, stdin: bool = True, stdin_once: bool = False, tty: bool = False) -> None:
        self.loop = EventLoop()
        self.io = ContainerIO(NullSink(), want_stdin=stdin, tty=tty)
        self.container_stdin = -1
        if stdin:
            self.container_stdin, self.io.stdin_fd = os.pipe()
        self.logged: list[str] = []
        self.hub = AttachHub(self.loop, self.io, stdin_once, self.logged.append)
        self.clients: list[socket.socket] = []

    def client(self, stdout: bool = True, stderr: bool = False, stdin: bool = False) -> socket.socket:
        ours, theirs = socket.socketpair()
        self.hub.add(ours, stdout, stderr, stdin)
        theirs.settimeout(5)
        self.clients.append(theirs)
        return theirs

    def run(self, rounds: int = 20) -> None:
        """Let the loop handle whatever is ready (no waiting)."""
        for _ in range(rounds):
            ready = self.loop.poll(0)
            if not ready:
                return
            for i in range(0, len(ready), 2):
                ready[i](ready[i + 1])

    def close(self) -> None:
        self.hub.close()
        for sock in self.clients:
            sock.close()
        if self.container_stdin >= 0:
            os.close(self.container_stdin)
        if self.io.stdin_fd >= 0:
            os.close(self.io.stdin_fd)
        self.loop.close()


@pytest.fixture
def rig():
    made: list[Rig] = []

    def make(**kwargs) -> Rig:
        made.append(Rig(**kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


def read_frames(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    buf = p.FrameBuffer()
    frames: list[tuple[int, bytes]] = []
    while len(frames) < count:
        data = sock.recv(65536)
        assert data, f"closed after {frames}"
        frames += buf.feed(data)
    return frames


def test_output_goes_to_each_client_that_asked_for_it(rig):
    r = rig()
    both = r.client(stdout=True, stderr=True)
    only_err = r.client(stdout=False, stderr=True)
    assert r.io.tap is not None  # the ContainerIO copies output while someone listens
    r.io.tap("stdout", b"out")
    r.io.tap("stderr", b"err")
    assert read_frames(both, 2) == [(p.ATTACH_STDOUT, b"out"), (p.ATTACH_STDERR, b"err")]
    assert read_frames(only_err, 1) == [(p.ATTACH_STDERR, b"err")]
    r.hub.end("exited", 3)
    for sock in (both, only_err):
        kind, payload = read_frames(sock, 1)[0]
        assert kind == p.ATTACH_END and json.loads(payload) == {"reason": "exited", "exit_code": 3}
        assert sock.recv(10) == b""  # closed once END is out
    assert r.hub.clients == {} and r.io.tap is None


def test_a_client_that_does_not_read_is_cut_off_not_waited_for(rig, monkeypatch):
    monkeypatch.setattr(attach, "OUTPUT_LIMIT", 256 * 1024)
    r = rig()
    slow = r.client()
    fast = r.client()
    chunk = b"x" * 65536
    got = 0
    for _ in range(40):  # 2.5 MiB: far beyond the socket buffer and the limit
        r.io.tap("stdout", chunk)
        got += sum(len(payload) for _, payload in read_frames(fast, 1))
    assert got == 40 * len(chunk)
    assert len(r.hub.clients) == 1 and any("behind" in line for line in r.logged)
    slow_got = 0
    while data := slow.recv(1 << 20):  # what was in flight, then EOF: it was disconnected
        slow_got += len(data)
    assert slow_got < 40 * len(chunk)


def test_stdin_is_written_and_stdin_once_closes_it(rig):
    r = rig(stdin_once=True)
    client = r.client(stdin=True)
    client.sendall(p.frame(p.ATTACH_STDIN, b"abc") + p.frame(p.ATTACH_CLOSE_STDIN))
    r.run()
    assert os.read(r.container_stdin, 100) == b"abc"
    assert os.read(r.container_stdin, 100) == b""  # EOF: the container's stdin is closed
    assert r.hub.clients  # the session goes on until the container exits


def test_without_stdin_once_the_session_ends_and_stdin_stays(rig):
    r = rig()
    client = r.client(stdin=True)
    client.sendall(p.frame(p.ATTACH_STDIN, b"abc") + p.frame(p.ATTACH_CLOSE_STDIN))
    r.run()
    kind, payload = read_frames(client, 1)[0]
    assert kind == p.ATTACH_END and json.loads(payload)["reason"] == "stdin closed"
    assert os.read(r.container_stdin, 100) == b"abc"
    assert r.io.stdin_fd >= 0  # the next client can still write


def run_until(r: Rig, predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        r.loop.poll(0.01)  # only to wait: the handlers run in r.run()
        r.run()


def test_stdin_the_container_does_not_read_pauses_clients(rig, monkeypatch):
    monkeypatch.setattr(attach, "STDIN_LIMIT", 128 * 1024)
    r = rig()
    client = r.client(stdin=True)
    data = b"".join(p.frame(p.ATTACH_STDIN, bytes([i]) * 32768) for i in range(64))  # 2 MiB
    sender = threading.Thread(target=client.sendall, args=(data,))
    sender.start()
    try:
        run_until(r, lambda: bool(r.loop.paused))  # the pipe (64 KiB) and the buffer are full
        assert len(r.hub.stdin_pending) <= 128 * 1024 + 65536
        os.set_blocking(r.container_stdin, False)
        received = bytearray()

        def drained() -> bool:
            try:
                received.extend(os.read(r.container_stdin, 1 << 20))
            except BlockingIOError:
                pass
            return len(received) == 64 * 32768

        run_until(r, drained)  # the container reads: everything arrives, in order
    finally:
        sender.join(10)
    assert bytes(received) == b"".join(bytes([i]) * 32768 for i in range(64))
    assert not r.loop.paused and not r.hub.stdin_pending


def test_stdin_of_a_container_that_closed_it_is_dropped(rig):
    r = rig()
    client = r.client(stdin=True)
    os.close(r.container_stdin)
    r.container_stdin = -1
    client.sendall(p.frame(p.ATTACH_STDIN, b"abc"))
    r.run()
    assert r.hub.stdin_closed and r.io.stdin_fd == -1
    assert r.hub.clients  # output may still flow


def test_client_hangup_is_forgotten(rig):
    r = rig()
    client = r.client()
    client.close()
    r.run()
    assert r.hub.clients == {} and r.io.tap is None and r.loop.masks == {}


def test_a_tty_container_created_without_stdin_takes_none(rig):
    r = rig(stdin=False, tty=True)
    master_r, master_w = os.pipe()  # stands in for the pty master the shim would hold
    r.io.stdin_fd = master_w
    try:
        client = r.client(stdin=True)
        client.sendall(p.frame(p.ATTACH_STDIN, b"rm -rf /\n"))
        r.run()
        os.set_blocking(master_r, False)
        with pytest.raises(BlockingIOError):
            os.read(master_r, 100)
    finally:
        os.close(master_r)
