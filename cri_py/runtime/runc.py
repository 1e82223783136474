"""The daemon's asyncio wrapper around the runc binary.

Argument spelling and error text come from cri_py.shim.runc (stdlib only), which the
shim uses for the same commands, so a failure reads the same whichever side ran it:
the command line, how it ended, and runc's own message. Every failure is a RuncError
(an errors.Internal); "container does not exist" is a RuncNotFound (errors.NotFound).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import tempfile
from dataclasses import dataclass
from typing import Any

from cri_py import errors
from cri_py.runtime.launch import shim_argv
from cri_py.shim import runc as shim_runc
from cri_py.shim.runc import RuncCommand

DEFAULT_TIMEOUT = 60.0


class RuncError(errors.Internal):
    """A runc call failed; the message names the command and quotes runc."""

    def __init__(self, argv: list[str], status: int | None, detail: str) -> None:
        super().__init__(shim_runc.format_error(argv, status, detail))
        self.argv = argv
        self.status = status
        self.detail = detail

    @property
    def not_running(self) -> bool:
        """The signal or start found no live process."""
        return shim_runc.is_not_running(self.detail)


class RuncNotFound(RuncError, errors.NotFound):
    """runc does not know the container id."""

    code = errors.NotFound.code


def error_for(argv: list[str], status: int | None, detail: str) -> RuncError:
    """The right RuncError subclass for runc's words."""
    cls = RuncNotFound if shim_runc.is_not_exist(detail) else RuncError
    return cls(argv, status, detail)


class Runc:
    """One runtime handler's runc: binary, --root, extra global flags, cgroup driver."""

    def __init__(
        self,
        binary: str = "runc",
        root: str | None = None,
        extra_args: list[str] | None = None,
        systemd_cgroup: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.command = RuncCommand(binary, root or "", list(extra_args or []), systemd_cgroup)
        self.timeout = timeout

    async def _run(
        self,
        *args: str,
        log: str = "",
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        timeout: float | None = None,
    ) -> bytes:
        """Run one subcommand; its stdout, or the RuncError it earned.

        When the caller hands its own stdout/stderr (create/exec for a container), runc's
        words are read from the --log file instead.
        """
        argv = self.command.argv(*args, log=log)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL if stdin is None else stdin,
            stdout=asyncio.subprocess.PIPE if stdout is None else stdout,
            stderr=asyncio.subprocess.PIPE if stderr is None else stderr,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout or self.timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuncError(argv, None, f"no answer within {timeout or self.timeout}s") from None
        except asyncio.CancelledError:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        if proc.returncode != 0:
            detail = shim_runc.error_detail(err or b"")
            if log:
                detail = _read_log_errors(log) or detail
            raise error_for(argv, proc.returncode, detail)
        return out or b""

    async def create(
        self,
        id: str,
        bundle: str,
        pid_file: str,
        console_socket: str | None = None,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        no_pivot: bool = False,
    ) -> None:
        """`runc create`; the given fds become the container's stdio."""
        args = ["create", "--bundle", bundle, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        if no_pivot:
            args.append("--no-pivot")
        fd, log = tempfile.mkstemp(
            prefix=".runc-create.", suffix=".log", dir=os.path.dirname(pid_file) or "."
        )
        os.close(fd)
        try:
            await self._run(*args, id, log=log, stdin=stdin, stdout=stdout, stderr=stderr)
        finally:
            os.unlink(log)

    async def start(self, id: str) -> None:
        """`runc start`: the created container execs its process."""
        await self._run("start", id)

    async def state(self, id: str) -> dict[str, Any]:
        """`runc state` as a dict (id, pid, status, bundle, created, ...)."""
        out = await self._run("state", id)
        try:
            return json.loads(out)
        except ValueError:
            raise RuncError(self.command.argv("state", id), 0, f"not JSON: {out[:200]!r}") from None

    async def list_containers(self) -> list[dict[str, Any]]:
        """`runc list --format json` (runc prints null for none)."""
        out = await self._run("list", "--format", "json")
        return json.loads(out or b"null") or []

    async def kill(self, id: str, signal: int, all: bool = False) -> None:
        """`runc kill [--all] id signal`."""
        args = ["kill", "--all"] if all else ["kill"]
        await self._run(*args, id, str(int(signal)))

    async def delete(self, id: str, force: bool = False) -> None:
        """`runc delete [--force]`; an id runc does not know counts as deleted."""
        try:
            await self._run("delete", *(["--force"] if force else []), id)
        except RuncNotFound:
            pass

    async def update(self, id: str, resources: dict[str, Any] | str) -> None:
        """`runc update --resources -` with an OCI LinuxResources object on stdin."""
        data = resources if isinstance(resources, str) else json.dumps(resources)
        argv = self.command.argv("update", "--resources", "-", id)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, err = await asyncio.wait_for(proc.communicate(data.encode()), self.timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuncError(argv, None, f"no answer within {self.timeout}s") from None
        if proc.returncode != 0:
            raise error_for(argv, proc.returncode, shim_runc.error_detail(err))


def _read_log_errors(path: str) -> str:
    """Error lines of a --log-format json file ("" when absent or empty)."""
    try:
        with open(path, "rb") as fh:
            return shim_runc.json_log_errors(fh.read())
    except OSError:
        return ""


EXEC_DRAIN_SECONDS = 1.0  # output a background child keeps writing after the command exits


@dataclass
class ExecResult:
    """What an ExecSync returns: the exit code and everything the command printed."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False


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


async def exec_sync(
    runc: Runc, id: str, process: dict[str, Any], timeout: float | None, pid_file: str
) -> ExecResult:
    """`runc exec --process` with pipes, for probes and `crictl exec -s`.

    The timeout is honoured by killing the exec'd process itself (its host pid comes
    from --pid-file); killing runc alone would leave the process running. When the
    command exits while a background child still holds its stdout, the output is
    drained for a short while only, so a probe never hangs on a daemonized child.
    The process runs detached under `execwait` (cri_py/shim/execwait.py), which
    reaps it as a subreaper and reports its exit code: a plain `runc exec` would not
    exit while a background child holds the output. The pipes are our own, not
    asyncio's: on Python 3.11 `Process.wait()` waits for every pipe it made to close.
    """
    command = ExecCommand.prepare(runc, id, process, pid_file)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    argv = command.argv(status_w)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out_w, stderr=err_w, pass_fds=(status_w,)
        )
    except BaseException:
        for pipe_fd in (out_r, err_r, status_r):
            os.close(pipe_fd)
        raise
    finally:
        for pipe_fd in (out_w, err_w, status_w):
            os.close(pipe_fd)
    out: list[bytes] = []
    err: list[bytes] = []
    status: list[bytes] = []
    readers = [asyncio.ensure_future(_read_pipe(fd_, sink)) for fd_, sink in ((out_r, out), (err_r, err))]
    status_reader = asyncio.ensure_future(_read_pipe(status_r, status))
    timed_out = False
    try:
        try:
            await asyncio.wait_for(proc.wait(), timeout if timeout and timeout > 0 else None)
        except asyncio.TimeoutError:
            timed_out = True
            command.kill()
            await proc.wait()
        await status_reader
        await asyncio.wait(readers, timeout=EXEC_DRAIN_SECONDS)
    finally:
        for reader in [*readers, status_reader]:
            reader.cancel()
        await asyncio.gather(*readers, status_reader, return_exceptions=True)
        if proc.returncode is None:
            command.kill()
            proc.kill()
            await proc.wait()
        command.cleanup()
    code = -1 if timed_out else command.exit_code(b"".join(status), b"".join(err))
    return ExecResult(code, b"".join(out), b"".join(err), timed_out)


@dataclass
class ExecCommand:
    """One `runc exec --detach` under execwait: its files, its command line, its outcome.

    Shared by ExecSync and the streaming server's exec, which differ only in how
    they connect the process's stdio.
    """

    runc_argv: list[str]
    process_file: str
    pid_file: str

    @classmethod
    def prepare(cls, runc: Runc, id: str, process: dict[str, Any], pid_file: str, *extra: str) -> "ExecCommand":
        """Write the process spec next to the pid file; `extra` goes to runc exec (--tty ...)."""
        fd, process_file = tempfile.mkstemp(prefix=".exec-", suffix=".json", dir=os.path.dirname(pid_file))
        with os.fdopen(fd, "w") as fh:
            json.dump(process, fh)
        argv = runc.command.argv("exec", "--detach", *extra, "--process", process_file, "--pid-file", pid_file, id)
        return cls(argv, process_file, pid_file)

    def argv(self, status_fd: int) -> list[str]:
        """execwait's command line; it reports the exit code as JSON on `status_fd`."""
        return shim_argv("execwait", str(status_fd), self.pid_file, *self.runc_argv)

    def exit_code(self, status: bytes, stderr: bytes) -> int:
        """The exec'd process's exit code, or the RuncError runc's own failure earned."""
        try:
            outcome = json.loads(status or b"{}")
        except ValueError:
            outcome = {}
        if "exit_code" not in outcome:
            detail = stderr.decode(errors="replace").strip() or str(outcome or "execwait reported nothing")
            raise error_for(self.runc_argv, outcome.get("runc_failed"), shim_runc.error_detail(detail.encode()))
        return int(outcome["exit_code"])

    def kill(self) -> None:
        """SIGKILL the exec'd process (by its host pid, from runc's pid file)."""
        kill_pid_file(self.pid_file)

    def cleanup(self) -> None:
        for path in (self.process_file, self.pid_file):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def kill_pid_file(pid_file: str) -> None:
    """SIGKILL the exec'd process named by runc's pid file, if it got that far."""
    try:
        with open(pid_file) as fh:
            pid = int(fh.read().strip())
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass
