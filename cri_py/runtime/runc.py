"""The daemon's asyncio wrapper around the runc binary.

Argument spelling and error text come from cri_py.shim.runc (stdlib only), which the
shim uses for the same commands, so a failure reads the same whichever side ran it:
the command line, how it ended, and runc's own message. Every failure is a RuncError
(an errors.Internal); "container does not exist" is a RuncNotFound (errors.NotFound).
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from typing import Any

from cri_py import errors
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

