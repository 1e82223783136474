"""Streaming attach: the container's own stdio, relayed from and to its shim.

The shim holds the container's stdout/stderr (or pty) and copies each output chunk to
every attached client while it writes the log, so an attach sees the output from the
moment it joins (as containerd and CRI-O: no history). This module relays one client
session over an `AttachStream`: output frames to the client, the client's stdin,
stdin end and resizes to the shim. It has the same face as `ExecProcess`, so both
protocols' exec sessions drive it unchanged; `run()` returns 0 (attach reports no
exit code) once the container has exited or, per stdin_once rules, the session is over.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from cri_py.errors import Internal
from cri_py.runtime.shim_client import AttachStream, ShimGone
from cri_py.shim import protocol as p
from cri_py.streaming.exec import InputQueue, OutputFn


class AttachProcess:
    """One attach session; feed it with write_stdin/close_stdin/resize."""

    def __init__(self, containers: Any, container_id: str, *, stdin: bool, stdout: bool, stderr: bool, output: OutputFn) -> None:
        self.containers = containers
        self.container = containers.running(container_id)
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.output = output
        self.input = InputQueue()  # (frame kind, payload) for the shim

    # -- input from the client --

    def write_stdin(self, data: bytes) -> None:
        if self.stdin and data:
            self.input.put((p.ATTACH_STDIN, data), len(data))

    def close_stdin(self) -> None:
        if self.stdin:
            self.input.put((p.ATTACH_CLOSE_STDIN, b""))

    def resize(self, width: int, height: int) -> None:
        if 0 < width < 65536 and 0 < height < 65536:
            self.input.put((p.ATTACH_RESIZE, width.to_bytes(2, "big") + height.to_bytes(2, "big")))

    # -- the session --

    async def run(self) -> int:
        stream = await self.containers.attach(
            self.container.id, stdin=self.stdin, stdout=self.stdout, stderr=self.stderr
        )
        sender = asyncio.ensure_future(self._send(stream))
        try:
            while (frame := await stream.read()) is not None:
                kind, payload = frame
                if kind in (p.ATTACH_STDOUT, p.ATTACH_STDERR):
                    await self.output(kind, payload)
                elif kind == p.ATTACH_END:
                    return 0
            raise Internal(f"the shim of container {self.container.id} ended the attach stream")
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ShimGone):
                await sender
            await stream.close()

    async def _send(self, stream: AttachStream) -> None:
        """Client input, in order, at the pace the shim takes it."""
        try:
            while True:
                kind, payload = await self.input.get()
                await stream.send(kind, payload)
                self.input.taken(len(payload) if kind == p.ATTACH_STDIN else 0)
        finally:
            self.input.close()
