"""Streaming exec: `runc exec --detach` under execwait, with live stdio.

The same approach as `runtime.runc.exec_sync` (the process spec comes from the
bundle's config.json with the args replaced; execwait reaps the process and reports
its exit code on a status fd; the host pid comes from runc's --pid-file), but the
output is forwarded chunk by chunk as it is produced, stdin is fed as it arrives and,
for a tty, runc hands the pty master over a console socket (SCM_RIGHTS) and resize
events become TIOCSWINSZ ioctls. Cancelling `run()` (the client went away) kills the
exec'd process, so nothing outlives its session.
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
from cri_py.runtime.runc import ExecCommand, kill_pid_file

CHUNK = 1 << 15
DRAIN_SECONDS = 1.0
CONSOLE_TIMEOUT = 10.0

OutputFn = Callable[[int, bytes], Awaitable[None]]  # (1 stdout | 2 stderr, data)


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


async def _kill_exec(proc: asyncio.subprocess.Process, pid_file: str) -> None:
    """The session ended early: kill the exec'd process by its host pid (waiting for
    runc to write it if it has not yet), then let execwait reap it and exit."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while proc.returncode is None and loop.time() < deadline:
        try:
            with open(pid_file) as fh:
                if fh.read().strip():
                    break
        except FileNotFoundError:
            pass
        await asyncio.sleep(0.05)
    kill_pid_file(pid_file)
    try:
        await asyncio.wait_for(proc.wait(), 5)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()


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
        self._stdin_queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._master: int | None = None
        self._size: tuple[int, int] | None = None  # (rows, cols) waiting for the pty

    # -- input from the client --

    def write_stdin(self, data: bytes) -> None:
        if self.stdin and data:
            self._stdin_queue.put_nowait(data)

    def close_stdin(self) -> None:
        self._stdin_queue.put_nowait(None)

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
        sandbox = containers.sandboxes.get(container.sandbox_id)
        pid_file = containers.exec_pid_file(container)
        extra: list[str] = []
        console_path = ""
        listener = None
        if self.tty:
            console_path = os.path.join(tempfile.gettempdir(), f"cri-py-console-{secrets.token_hex(6)}.sock")
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(console_path)
            listener.listen(1)
            listener.setblocking(False)
            extra = ["--tty", "--console-socket", console_path]
        command = ExecCommand.prepare(
            containers.runc_for(sandbox), container.id, containers.exec_process(container, self.cmd, self.tty),
            pid_file, *extra,
        )
        fds: list[int] = []  # our ends, closed in finally unless handed to a transport
        child_fds: list[int] = []
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        fds += [err_r, status_r]
        child_fds += [err_w, status_w]
        stdin_arg: Any = asyncio.subprocess.DEVNULL
        stdout_arg: Any = asyncio.subprocess.DEVNULL
        in_w = out_r = None
        if not self.tty:
            if self.stdin:
                in_r, in_w = os.pipe2(os.O_CLOEXEC)
                fds.append(in_w)
                child_fds.append(in_r)
                stdin_arg = in_r
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            fds.append(out_r)
            child_fds.append(out_w)
            stdout_arg = out_w
        argv = command.argv(status_w)
        tasks: list[asyncio.Task] = []
        transports: list[asyncio.BaseTransport] = []
        proc = None
        try:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=stdin_arg, stdout=stdout_arg, stderr=err_w, pass_fds=(status_w,)
                )
            finally:
                for child_fd in child_fds:
                    os.close(child_fd)
            status: list[bytes] = []
            err_sink: list[bytes] = []
            # stderr of execwait is runc's stderr and (without a tty) the process's
            status_task = asyncio.ensure_future(self._collect(status_r, status))
            fds.remove(status_r)
            tasks.append(status_task)
            if self.tty:
                master = await self._receive_master(listener, proc)
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
            await proc.wait()
            await status_task
            await asyncio.wait(readers, timeout=DRAIN_SECONDS)
            return command.exit_code(b"".join(status), b"".join(err_sink))
        finally:
            if proc is not None and proc.returncode is None:
                await asyncio.shield(_kill_exec(proc, pid_file))
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for tr in transports:
                tr.close()
            for fd_ in fds:
                with contextlib.suppress(OSError):
                    os.close(fd_)
            self._master = None
            if listener is not None:
                listener.close()
            command.cleanup()
            if console_path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(console_path)

    async def _receive_master(self, listener: socket.socket, proc: asyncio.subprocess.Process) -> int:
        loop = asyncio.get_running_loop()
        accept = asyncio.ensure_future(loop.sock_accept(listener))
        exited = asyncio.ensure_future(proc.wait())
        try:
            done, _ = await asyncio.wait({accept, exited}, timeout=CONSOLE_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
            if accept not in done:
                raise FailedPrecondition("runc did not send the console")
            conn, _ = accept.result()
        finally:
            for fut in (accept, exited):
                fut.cancel()
            await asyncio.gather(accept, exited, return_exceptions=True)
        with conn:
            conn.settimeout(CONSOLE_TIMEOUT)
            _, received, _, _ = await asyncio.to_thread(socket.recv_fds, conn, 4096, 1)
        if not received:
            raise FailedPrecondition("runc sent no console fd")
        os.set_blocking(received[0], False)
        return received[0]

    @staticmethod
    async def _collect(fd: int, sink: list[bytes]) -> None:
        reader, transport = await _pipe_reader(fd)
        try:
            while chunk := await reader.read(CHUNK):
                sink.append(chunk)
        finally:
            transport.close()

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
            while (data := await self._stdin_queue.get()) is not None:
                writer.write(data)
                await writer.drain()
            if close_on_eof:
                writer.close()
            elif self.tty:
                writer.write(b"\x04")  # EOF for a terminal in canonical mode
                await writer.drain()
        except (OSError, ConnectionError):
            pass
