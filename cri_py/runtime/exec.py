"""Running a command in a live container: ExecSync, and the recipe streaming exec shares.

The container's shim runs `runc exec --detach` and reaps the process as its subreaper
(cri_py/shim/execs.py); the daemon hands it the process spec (a file), where runc
should write the host pid, and the process's stdio fds. The answer on that shim
connection is the exit code. Closing the connection before the answer kills the
process, so an exec never outlives the client that asked for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import tempfile
from dataclasses import dataclass, field
from typing import Any

from cri_py import errors
from cri_py.runtime import shim_client
from cri_py.runtime.runc import error_for
from cri_py.runtime.shim_client import ShimConnection, ShimGone
from cri_py.shim import runc as shim_runc

EXEC_DRAIN_SECONDS = 1.0  # output a background child keeps writing after the command exits
KILL_ANSWER_SECONDS = 5.0  # after a timeout's SIGKILL, how long the shim's answer may take


@dataclass
class ExecResult:
    """What an ExecSync returns: the exit code and everything the command printed."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False


@dataclass
class ExecCommand:
    """One exec through the shim: its files, its request, its outcome.

    Shared by ExecSync and the streaming server's exec, which differ only in how
    they connect the process's stdio.
    """

    process_file: str
    pid_file: str
    conn: ShimConnection | None = field(default=None, repr=False)

    @classmethod
    def prepare(cls, process: dict[str, Any], pid_file: str) -> "ExecCommand":
        """Write the process spec next to the pid file (runc exec --process reads it)."""
        fd, process_file = tempfile.mkstemp(prefix=".exec-", suffix=".json", dir=os.path.dirname(pid_file))
        with os.fdopen(fd, "w") as fh:
            json.dump(process, fh)
        return cls(process_file, pid_file)

    async def start(self, task_dir: str, stdio: tuple[int, int, int], console_socket: str = "") -> None:
        """Ask the shim to run it with `stdio` (ours to close after) as 0/1/2; a
        console socket instead gives it a pty (runc sends the master there)."""
        conn = ShimConnection(task_dir)
        message = {"op": "exec", "process_file": self.process_file, "pid_file": self.pid_file,
                   "console_socket": console_socket}
        try:
            await conn.send_with_fds(message, list(stdio))
        except ShimGone as exc:
            raise _shim_gone(exc) from None
        self.conn = conn

    async def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """The shim's answer: exit_code, or runc_failed (with runc's argv), or an error."""
        assert self.conn is not None
        try:
            return await self.conn.answer("exec", timeout)
        except ShimGone as exc:
            raise _shim_gone(exc) from None

    @staticmethod
    def exit_code(reply: dict[str, Any], stderr: bytes) -> int:
        """The exec'd process's exit code, or the error runc's failure earned (its
        message is on the process's stderr, which runc shares)."""
        if not reply.get("ok"):
            raise shim_client.error_for(reply)
        if "exit_code" in reply:
            return int(reply["exit_code"])
        argv = [str(a) for a in reply.get("argv") or ["runc", "exec"]]
        raise error_for(argv, reply.get("runc_failed"), shim_runc.error_detail(stderr))

    def kill(self) -> None:
        """SIGKILL the exec'd process (by its host pid, from runc's pid file)."""
        kill_pid_file(self.pid_file)

    async def close(self) -> None:
        """Hang up (the shim kills the process if it still runs) and remove the files."""
        if self.conn is not None:
            await self.conn.__aexit__()
            self.conn = None
        for path in (self.process_file, self.pid_file):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _shim_gone(exc: ShimGone) -> errors.FailedPrecondition:
    """No shim, no exec: the container is not running as far as we can reach it."""
    return errors.FailedPrecondition(f"the container's shim is gone: {exc}")


def kill_pid_file(pid_file: str) -> None:
    """SIGKILL the exec'd process named by runc's pid file, if it got that far."""
    try:
        with open(pid_file) as fh:
            pid = int(fh.read().strip())
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass


async def _read_pipe(fd: int, sink: list[bytes]) -> None:
    """Read a pipe to EOF into `sink` (owns and closes `fd`)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0))
    try:
        while chunk := await reader.read(1 << 16):
            sink.append(chunk)
    finally:
        transport.close()


async def exec_sync(task_dir: str, process: dict[str, Any], timeout: float | None, pid_file: str) -> ExecResult:
    """The command with pipes, for probes and `crictl exec -s`.

    The timeout is honoured by killing the exec'd process itself (its host pid comes
    from --pid-file). The answer comes when the process exits; output a background
    child keeps writing is drained for a short while only, so a probe never hangs on a
    daemonized child.
    """
    command = ExecCommand.prepare(process, pid_file)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        await command.start(task_dir, (null, out_w, err_w))
    except BaseException:
        os.close(out_r)
        os.close(err_r)
        await command.close()
        raise
    finally:
        for fd in (null, out_w, err_w):
            os.close(fd)
    out: list[bytes] = []
    err: list[bytes] = []
    readers = [asyncio.ensure_future(_read_pipe(fd_, sink)) for fd_, sink in ((out_r, out), (err_r, err))]
    timed_out = False
    try:
        try:
            reply = await command.wait(timeout if timeout and timeout > 0 else None)
        except asyncio.TimeoutError:
            timed_out = True
            command.kill()
            reply = {}
            with contextlib.suppress(asyncio.TimeoutError):  # not started yet: closing kills it
                reply = await command.wait(KILL_ANSWER_SECONDS)
        await asyncio.wait(readers, timeout=EXEC_DRAIN_SECONDS)
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await command.close()
    code = -1 if timed_out else command.exit_code(reply, b"".join(err))
    return ExecResult(code, b"".join(out), b"".join(err), timed_out)
