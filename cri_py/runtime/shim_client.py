"""The daemon's side of a shim's socket: requests in, domain errors out.

A connection is cheap (a unix connect), so most calls open one, ask once and close.
A shim that is not there (no socket, refused, or hung up without an answer) is a
ShimGone: the caller decides whether that is an error or a reason to look at the
files the shim left (exit.json, create-error.json).
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from cri_py import errors
from cri_py.shim import protocol as p

DEFAULT_TIMEOUT = 30.0

_KIND_ERRORS: dict[str, type[errors.CriError]] = {
    p.NOT_FOUND: errors.NotFound,
    p.FAILED_PRECONDITION: errors.FailedPrecondition,
    p.INVALID_ARGUMENT: errors.InvalidArgument,
    p.INTERNAL: errors.Internal,
}


class ShimGone(Exception):
    """The shim could not be reached, or hung up before answering."""


def error_for(reply: dict[str, Any]) -> errors.CriError:
    """The domain error a failed answer stands for."""
    message = str(reply.get("error") or "shim reported an unspecified error")
    if reply.get("kind") == p.INVALID_ARGUMENT and message.startswith("unknown op"):
        # a shim started by an older cri-py (it outlives daemon upgrades)
        return errors.FailedPrecondition(
            f"the container's shim predates this cri-py ({message}); restart the container for a current shim"
        )
    cls = _KIND_ERRORS.get(str(reply.get("kind")), errors.Internal)
    return cls(message)


class ShimConnection:
    """One open connection to a shim; requests on it are answered in order."""

    def __init__(self, task_dir: str) -> None:
        self.path = os.path.join(task_dir, p.SHIM_SOCKET)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> "ShimConnection":
        try:
            with p.UnixPath(self.path) as usable:
                self._reader, self._writer = await asyncio.open_unix_connection(
                    usable, limit=p.MAX_LINE
                )
        except (FileNotFoundError, ConnectionError, OSError) as exc:
            raise ShimGone(f"cannot connect to {self.path}: {exc}") from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def raw(
        self, message: dict[str, Any], timeout: float | None = DEFAULT_TIMEOUT
    ) -> dict[str, Any]:
        """Send one request; its answer as sent (ok or not). ShimGone on hang-up."""
        assert self._writer is not None
        try:
            self._writer.write(p.encode(message))
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ShimGone(f"{self.path}: {exc}") from None
        try:
            return await self.answer(str(message.get("op")), timeout)
        except asyncio.TimeoutError:  # a shim that does not answer is as good as gone
            raise ShimGone(f"{self.path}: no answer to {message.get('op')} in {timeout}s") from None

    async def answer(self, op: str, timeout: float | None = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """The answer to the request sent last (ok or not). ShimGone on hang-up,
        TimeoutError when none came in time (the request may still be answered)."""
        assert self._reader is not None
        try:
            async with asyncio.timeout(timeout):  # wait_for (3.11) can lose a cancellation
                line = await self._reader.readline()
        except TimeoutError:
            raise  # an OSError since 3.11, but the shim is there: it has not answered yet
        except (ConnectionError, OSError) as exc:
            raise ShimGone(f"{self.path}: {exc}") from None
        if not line.endswith(b"\n"):
            raise ShimGone(f"{self.path}: the shim hung up before answering {op}")
        return p.decode(line)

    async def send_with_fds(self, message: dict[str, Any], fds: list[int]) -> None:
        """Connect and send one request carrying `fds` (SCM_RIGHTS), which streams
        cannot; the answer is read with answer(). Used instead of `async with`."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            with p.UnixPath(self.path) as usable:
                await loop.sock_connect(sock, usable)
            # a fresh connection's buffer is empty: this small message never blocks
            socket.send_fds(sock, [p.encode(message)], fds)
            self._reader, self._writer = await asyncio.open_unix_connection(sock=sock, limit=p.MAX_LINE)
        except OSError as exc:
            sock.close()
            raise ShimGone(f"cannot send {message.get('op')} to {self.path}: {exc}") from None

    async def request(
        self, message: dict[str, Any], timeout: float | None = DEFAULT_TIMEOUT
    ) -> dict[str, Any]:
        """Send one request; its answer, or the domain error it reports."""
        reply = await self.raw(message, timeout)
        if not reply.get("ok"):
            raise error_for(reply)
        return reply


async def call(
    task_dir: str, message: dict[str, Any], timeout: float | None = DEFAULT_TIMEOUT
) -> dict[str, Any]:
    """Connect, ask once, close."""
    async with ShimConnection(task_dir) as conn:
        return await conn.request(message, timeout)


class AttachStream:
    """A connection the shim has turned into an attach stream: frames both ways."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tty: bool, stdin: bool
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.tty = tty  # the container has a terminal: one output, resizable
        self.stdin = stdin  # the container was created with stdin open

    async def read(self) -> tuple[int, bytes] | None:
        """The next frame from the shim; None when it hung up."""
        try:
            header = await self._reader.readexactly(p.FRAME_HEADER)
            size = int.from_bytes(header[1:], "big")
            if size > p.MAX_FRAME:
                raise ShimGone(f"attach frame of {size} bytes from the shim")
            return header[0], await self._reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            return None

    async def send(self, kind: int, payload: bytes = b"") -> None:
        """One frame to the shim; waits while the shim is not reading (backpressure)."""
        try:
            self._writer.write(p.frame(kind, payload))
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ShimGone(f"attach stream: {exc}") from None

    async def close(self) -> None:
        """Leave the session (the shim forgets this client)."""
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def attach(task_dir: str, *, stdin: bool, stdout: bool, stderr: bool) -> AttachStream:
    """Ask the shim for an attach stream of the container's stdio."""
    conn = ShimConnection(task_dir)
    await conn.__aenter__()
    try:
        reply = await conn.request({"op": "attach", "stdin": stdin, "stdout": stdout, "stderr": stderr})
    except BaseException:
        await conn.__aexit__()
        raise
    assert conn._reader is not None and conn._writer is not None
    return AttachStream(conn._reader, conn._writer, bool(reply.get("tty")), bool(reply.get("stdin")))
