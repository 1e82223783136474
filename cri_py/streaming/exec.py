"""Streaming exec: the container's shim runs `runc exec --detach`, with live stdio.

The same recipe as `runtime.exec.exec_sync` (the process spec comes from the bundle's
config.json with the args replaced; the shim reaps the process and answers with its
exit code), but the output is forwarded chunk by chunk as it is produced, stdin is fed
as it arrives and, for a tty, runc hands the pty master over a console socket
(SCM_RIGHTS) and resize events become TIOCSWINSZ ioctls. Cancelling `run()` (the
client went away) hangs up on the shim, which kills the exec'd process, so nothing
outlives its session.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import socket
import struct
import tempfile
import termios
from collections.abc import Awaitable, Callable
from typing import Any

from cri_py.errors import FailedPrecondition, InvalidArgument
from cri_py.runtime.exec import ExecCommand

CHUNK = 1 << 15
DRAIN_SECONDS = 1.0
CONSOLE_TIMEOUT = 10.0

OutputFn = Callable[[int, bytes], Awaitable[None]]  # (1 stdout | 2 stderr, data)
INPUT_HIGH_WATER = 1 << 20  # client input not yet taken by the process before the client waits


class InputQueue:
    """Client input on its way to a process (stdin, resizes), bounded in bytes.

    The connection's read loop puts without waiting (it must keep handling the
    client's other frames) and then waits for `room()` before reading more, so a
    process that does not read its stdin holds back the client through TCP instead of
    growing the daemon. Once the consumer is gone, `close()` drops further input and
    never blocks the reader again (it must still see the client hang up).
    """

    def __init__(self, high_water: int = INPUT_HIGH_WATER) -> None:
        self._queue: asyncio.Queue[tuple[Any, int]] = asyncio.Queue()
        self._bytes = 0
        self._high_water = high_water
        self._room = asyncio.Event()
        self._room.set()
        self._closed = False

    def put(self, item: Any, size: int = 0) -> None:
        if self._closed:
            return
        self._queue.put_nowait((item, size))
        self._bytes += size
        if self._bytes >= self._high_water:
            self._room.clear()

    async def get(self) -> Any:
        """The next item; call taken() with its size once it has been delivered."""
        item, _ = await self._queue.get()
        return item

    def taken(self, size: int) -> None:
        self._bytes -= size
        if self._bytes < self._high_water:
            self._room.set()

    async def room(self) -> None:
        await self._room.wait()

    def close(self) -> None:
        self._closed = True
        self._room.set()


async def _pipe_reader(fd_or_file: Any) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=CHUNK * 4)
    file = fd_or_file if not isinstance(fd_or_file, int) else os.fdopen(fd_or_file, "rb", 0)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), file)
    return reader, transport


async def _pipe_writer(fd: int) -> asyncio.StreamWriter:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, os.fdopen(fd, "wb", 0))
    return asyncio.StreamWriter(transport, protocol, None, loop)


class ExecProcess:
    """One streaming exec. Feed it with write_stdin/close_stdin/resize; `run()` returns
    the exit code once the process has exited and its output has been forwarded."""

    def __init__(self, containers: Any, container_id: str, cmd: list[str], *, tty: bool, stdin: bool, output: OutputFn) -> None:
        if not cmd:
            raise InvalidArgument("exec needs a command")
        container = containers.running(container_id)
        self.containers = containers
        self.container = container
        self.cmd = list(cmd)
        self.tty = tty
        self.stdin = stdin
        self.output = output
        self.input = InputQueue()  # stdin chunks; None for its end
        self._master: int | None = None
        self._size: tuple[int, int] | None = None  # (rows, cols) waiting for the pty

    # -- input from the client --

    def write_stdin(self, data: bytes) -> None:
        if self.stdin and data:
            self.input.put(data, len(data))

    def close_stdin(self) -> None:
        self.input.put(None)

    def resize(self, width: int, height: int) -> None:
        self._size = (height, width)
        if self._master is not None:
            self._apply_size()

    def _apply_size(self) -> None:
        if self._master is None or self._size is None:
            return
        rows, cols = self._size
        with contextlib.suppress(OSError):
            fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    # -- the process --

    async def run(self) -> int:
        containers, container = self.containers, self.container
        command = ExecCommand.prepare(containers.exec_process(container, self.cmd, self.tty),
                                      containers.exec_pid_file(container))
        console_path = ""
        listener = None
        fds: list[int] = []  # our ends, closed in finally unless handed to a transport
        child_fds: list[int] = []  # the process's ends, closed once the shim has them
        tasks: list[asyncio.Task] = []
        transports: list[asyncio.BaseTransport] = []
        try:
            if self.tty:
                console_path = os.path.join(tempfile.gettempdir(), f"cri-py-console-{secrets.token_hex(6)}.sock")
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listener.bind(console_path)
                listener.listen(1)
                listener.setblocking(False)
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            child_fds.append(null)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)  # runc's own errors and, without a tty, the process's
            fds.append(err_r)
            child_fds.append(err_w)
            stdio = (null, null, err_w)
            in_w = out_r = None
            if not self.tty:
                in_r = null
                if self.stdin:
                    in_r, in_w = os.pipe2(os.O_CLOEXEC)
                    fds.append(in_w)
                    child_fds.append(in_r)
                out_r, out_w = os.pipe2(os.O_CLOEXEC)
                fds.append(out_r)
                child_fds.append(out_w)
                stdio = (in_r, out_w, err_w)
            try:
                await command.start(containers.tasks.task_dir(container.id), stdio, console_path)
            finally:
                for child_fd in child_fds:
                    os.close(child_fd)
            err_sink: list[bytes] = []
            answer = asyncio.ensure_future(command.wait())
            tasks.append(answer)
            if self.tty:
                master = await self._receive_master(listener, answer)
                fds.append(master)
                self._master = master
                self._apply_size()
                out_reader, tr = await _pipe_reader(os.fdopen(os.dup(master), "rb", 0))
                transports.append(tr)
                readers = [asyncio.ensure_future(self._forward(out_reader, 1, None))]
                err_reader, tr = await _pipe_reader(err_r)
                fds.remove(err_r)
                transports.append(tr)
                readers.append(asyncio.ensure_future(self._forward(err_reader, 0, err_sink)))
                if self.stdin:
                    writer = await _pipe_writer(os.dup(master))
                    transports.append(writer.transport)
                    tasks.append(asyncio.ensure_future(self._feed(writer, close_on_eof=False)))
            else:
                out_reader, tr = await _pipe_reader(out_r)
                fds.remove(out_r)
                transports.append(tr)
                err_reader, tr = await _pipe_reader(err_r)
                fds.remove(err_r)
                transports.append(tr)
                readers = [
                    asyncio.ensure_future(self._forward(out_reader, 1, None)),
                    asyncio.ensure_future(self._forward(err_reader, 2, err_sink)),
                ]
                if in_w is not None:
                    writer = await _pipe_writer(in_w)
                    fds.remove(in_w)
                    transports.append(writer.transport)
                    tasks.append(asyncio.ensure_future(self._feed(writer, close_on_eof=True)))
            tasks += readers
            reply = await answer
            await asyncio.wait(readers, timeout=DRAIN_SECONDS)
            return command.exit_code(reply, b"".join(err_sink))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await command.close()  # before the answer: the shim kills the process
            for tr in transports:
                tr.close()
            for fd_ in fds:
                with contextlib.suppress(OSError):
                    os.close(fd_)
            self._master = None
            if listener is not None:
                listener.close()
            if console_path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(console_path)

    async def _receive_master(self, listener: socket.socket, answer: asyncio.Future[Any]) -> int:
        """The pty master runc sends to the console socket (unless the exec fails first)."""
        loop = asyncio.get_running_loop()
        accept = asyncio.ensure_future(loop.sock_accept(listener))
        try:
            done, _ = await asyncio.wait({accept, answer}, timeout=CONSOLE_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
            if accept not in done:
                raise FailedPrecondition("runc did not send the console")
            conn, _ = accept.result()
        finally:
            accept.cancel()
            await asyncio.gather(accept, return_exceptions=True)
        with conn:
            conn.settimeout(CONSOLE_TIMEOUT)
            _, received, _, _ = await asyncio.to_thread(socket.recv_fds, conn, 4096, 1)
        if not received:
            raise FailedPrecondition("runc sent no console fd")
        os.set_blocking(received[0], False)
        return received[0]

    async def _forward(self, reader: asyncio.StreamReader, stream: int, sink: list[bytes] | None) -> None:
        """Copy one output to the client (stream 0: keep only, for runc's own errors)."""
        try:
            while chunk := await reader.read(CHUNK):
                if sink is not None and len(sink) < 64:
                    sink.append(chunk)
                if stream:
                    await self.output(stream, chunk)
        except OSError:
            pass  # a pty master reads EIO once the last slave fd is closed

    async def _feed(self, writer: asyncio.StreamWriter, close_on_eof: bool) -> None:
        try:
            while (data := await self.input.get()) is not None:
                writer.write(data)
                await writer.drain()
                self.input.taken(len(data))
            if close_on_eof:
                writer.close()
            elif self.tty:
                writer.write(b"\x04")  # EOF for a terminal in canonical mode
                await writer.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            self.input.close()
