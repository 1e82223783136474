"""Attached clients of one container: output fan-out, stdin, terminal resize.

`kubectl attach` reaches the daemon's streaming server, which opens a connection to
the shim and sends an `attach` request; from then on that connection carries the
frames of cri_py.shim.protocol (ATTACH_*). The shim is the only holder of the
container's stdio, so it is the place where output can be copied to every attached
client while the log keeps being written, and where stdin from any client is written.

Nothing an attached client does may stall the container or its log: sockets are
non-blocking, each client's unsent output is bounded (a client that falls further
behind is disconnected) and stdin the container does not read is bounded too (reading
from clients pauses until it drains).

stdin_once follows containerd: when an attached client's stdin ends, a non-tty
container's stdin is closed for good (the process reads EOF) and output keeps flowing
until it exits; otherwise that client's session just ends.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys

from cri_py.shim import protocol as p

TYPE_CHECKING = False  # typing costs every shim memory; checkers know this name
if TYPE_CHECKING:
    from typing import Callable

    from cri_py.shim.shim import ContainerIO, EventLoop

OUTPUT_LIMIT = 4 << 20  # unsent output per client before it is cut off
STDIN_LIMIT = 1 << 20  # unwritten stdin before the shim stops reading clients
READ_CHUNK = 65536
_KIND_OF_STREAM = {"stdout": p.ATTACH_STDOUT, "stderr": p.ATTACH_STDERR}


class Attacher:
    """One attached client: which streams it wants and what it has not received yet."""

    __slots__ = ("sock", "fd", "kinds", "stdin", "frames", "out", "ending")

    def __init__(self, sock: socket.socket, kinds: set[int], stdin: bool) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.kinds = kinds  # ATTACH_STDOUT / ATTACH_STDERR it asked for
        self.stdin = stdin
        self.frames = p.FrameBuffer()
        self.out = bytearray()
        self.ending = False  # END queued: close once `out` is sent


class AttachHub:
    """Every attached client of the container, driven by the shim's event loop."""

    def __init__(
        self, loop: EventLoop, io: ContainerIO, stdin_once: bool, log: Callable[[str], None]
    ) -> None:
        self.loop = loop
        self.io = io
        self.stdin_once = stdin_once
        self.log = log
        self.clients: dict[int, Attacher] = {}
        self.stdin_pending = bytearray()
        self.stdin_closed = False  # no more stdin will be written (stdin_once, EPIPE)
        self._stdin_watched = False

    # --- joining and leaving ---------------------------------------------------------

    def add(self, sock: socket.socket, stdout: bool, stderr: bool, stdin: bool) -> None:
        """Take over a connection whose `attach` request has just been answered."""
        sock.setblocking(False)
        kinds = {k for k, wanted in ((p.ATTACH_STDOUT, stdout), (p.ATTACH_STDERR, stderr)) if wanted}
        if self.io.tty:
            kinds = {p.ATTACH_STDOUT} if kinds else set()  # a terminal has one output
        # a container created without stdin takes none, even through its pty
        client = Attacher(sock, kinds, stdin and self.io.want_stdin and self.io.stdin_fd >= 0)
        self.clients[client.fd] = client
        self.loop.add(client.fd, self.on_readable)
        if len(self.stdin_pending) >= STDIN_LIMIT:
            self.loop.pause(client.fd, True)
        self.io.tap = self.output

    def drop(self, client: Attacher) -> None:
        """Forget a client (it left, broke the protocol or fell too far behind)."""
        if self.clients.pop(client.fd, None) is None:
            return
        self.loop.remove(client.fd)
        client.sock.close()
        if not self.clients:
            self.io.tap = None

    def end(self, reason: str, exit_code: int | None) -> None:
        """The container has exited: tell every client, close each once it has it all."""
        payload = json.dumps({"reason": reason, "exit_code": exit_code}).encode()
        for client in list(self.clients.values()):
            self.finish(client, payload)

    def finish(self, client: Attacher, payload: bytes) -> None:
        """Queue END for one client; it is closed when its output is flushed."""
        client.ending = True
        self.loop.pause(client.fd, True)
        self.queue(client, p.frame(p.ATTACH_END, payload))

    def close(self) -> None:
        """The shim is leaving: drop everyone, give up on unwritten stdin."""
        for client in list(self.clients.values()):
            self.drop(client)
        self.unwatch_stdin()
        self.stdin_pending.clear()

    # --- output ------------------------------------------------------------------------

    def output(self, stream: str, data: bytes) -> None:
        """A chunk of container output (the ContainerIO tap): copy it to each client."""
        kind = _KIND_OF_STREAM[stream]
        chunk = p.frame(kind, data)
        for client in list(self.clients.values()):
            if kind in client.kinds and not client.ending:
                self.queue(client, chunk)

    def queue(self, client: Attacher, chunk: bytes) -> None:
        """Send now what the socket takes; keep the rest for when it is writable."""
        if not client.out:
            try:
                sent = client.sock.send(chunk)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.drop(client)
                return
            if sent == len(chunk):
                if client.ending:
                    self.drop(client)
                return
            chunk = chunk[sent:]
            self.loop.want_write(client.fd, self.on_writable)
        client.out += chunk
        if len(client.out) > OUTPUT_LIMIT:
            self.log(f"attached client fell {len(client.out)} bytes behind: disconnected")
            self.drop(client)

    def on_writable(self, fd: int) -> None:
        """A slow client's socket has room again."""
        client = self.clients.get(fd)
        if client is None:
            return
        try:
            sent = client.sock.send(client.out)
        except BlockingIOError:
            return
        except OSError:
            self.drop(client)
            return
        del client.out[:sent]
        if not client.out:
            if client.ending:
                self.drop(client)
            else:
                self.loop.want_write(fd, None)

    # --- input -------------------------------------------------------------------------

    def on_readable(self, fd: int) -> None:
        """Frames from a client: stdin, its end, resize."""
        client = self.clients.get(fd)
        if client is None:
            return
        try:
            data = client.sock.recv(READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.drop(client)
            return
        try:
            frames = client.frames.feed(data)
        except p.ProtocolError as exc:
            self.log(f"attached client: {exc}")
            self.drop(client)
            return
        for kind, payload in frames:
            if client.fd not in self.clients or client.ending:
                return
            if kind == p.ATTACH_STDIN:
                if client.stdin:
                    self.write_stdin(payload)
            elif kind == p.ATTACH_CLOSE_STDIN:
                self.client_stdin_ended(client)
            elif kind == p.ATTACH_RESIZE and len(payload) == 4:
                self.resize(int.from_bytes(payload[:2], "big"), int.from_bytes(payload[2:], "big"))

    def client_stdin_ended(self, client: Attacher) -> None:
        """containerd's rule: stdin_once without a tty closes the container's stdin."""
        if not client.stdin:
            return  # the container takes no stdin: nothing of the session depends on it
        client.stdin = False
        if self.stdin_once and not self.io.tty:
            self.close_stdin_when_written()
        else:
            self.finish(client, json.dumps({"reason": "stdin closed", "exit_code": None}).encode())

    def resize(self, width: int, height: int) -> None:
        """Set the container's terminal size (TIOCSWINSZ on the pty master)."""
        if not self.io.tty or self.io.stdin_fd < 0 or not width or not height:
            return
        import fcntl
        import termios

        order = sys.byteorder  # struct winsize is native unsigned shorts: rows, cols, x, y
        size = height.to_bytes(2, order) + width.to_bytes(2, order) + bytes(4)
        try:
            fcntl.ioctl(self.io.stdin_fd, termios.TIOCSWINSZ, size)
        except OSError as exc:
            self.log(f"resize to {width}x{height}: {exc}")

    # --- the container's stdin ---------------------------------------------------------

    def write_stdin(self, data: bytes) -> None:
        """Write what the container takes now; buffer the rest (bounded, see module doc)."""
        if self.stdin_closed or self.io.stdin_fd < 0 or not data:
            return
        if not self.stdin_pending:
            written = self._write(data)
            if written < 0:
                return
            data = data[written:]
            if not data:
                return
        self.stdin_pending += data
        self.watch_stdin()
        if len(self.stdin_pending) >= STDIN_LIMIT:
            for client in self.clients.values():
                self.loop.pause(client.fd, True)

    def _write(self, data: bytes) -> int:
        """One non-blocking write to the container's stdin; -1 once it is gone."""
        try:
            os.set_blocking(self.io.stdin_fd, False)
            return os.write(self.io.stdin_fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.EIO):
                self.log(f"writing container stdin: {exc}")
            self.stdin_gone()
            return -1

    def watch_stdin(self) -> None:
        """Ask the loop to say when stdin has room."""
        if not self._stdin_watched:
            self._stdin_watched = True
            self.loop.want_write(self.io.stdin_fd, self.on_stdin_writable)

    def unwatch_stdin(self) -> None:
        """No more pending stdin (or no more stdin)."""
        if self._stdin_watched:
            self._stdin_watched = False
            if self.io.stdin_fd >= 0:
                self.loop.want_write(self.io.stdin_fd, None)

    def on_stdin_writable(self, fd: int) -> None:
        """The container read some stdin: write more; resume clients once drained."""
        written = self._write(bytes(self.stdin_pending[:READ_CHUNK]))
        if written < 0:
            return
        del self.stdin_pending[:written]
        if len(self.stdin_pending) < STDIN_LIMIT:
            for client in self.clients.values():
                if not client.ending:
                    self.loop.pause(client.fd, False)
        if not self.stdin_pending:
            self.unwatch_stdin()
            if self.stdin_closed:
                self.io.close_stdin()

    def close_stdin_when_written(self) -> None:
        """stdin_once: EOF for the container once what clients sent has been written."""
        self.stdin_closed = True
        if not self.stdin_pending:
            self.unwatch_stdin()
            self.io.close_stdin()

    def stdin_gone(self) -> None:
        """The container closed its stdin (EPIPE): nothing more can be written."""
        self.unwatch_stdin()
        self.stdin_pending.clear()
        self.stdin_closed = True
        self.io.close_stdin()
        for client in self.clients.values():
            client.stdin = False
            if not client.ending:
                self.loop.pause(client.fd, False)
