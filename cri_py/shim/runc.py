"""Running runc from the shim: argv building, error text, a blocking runner.

Standard library only, and shared with the daemon's asyncio wrapper
(cri_py.runtime.runc) so both spell commands and errors the same way.

Processes are started with posix_spawn (vfork under glibc): no copy of the Python heap,
and signal dispositions Python sets (SIGPIPE ignored) are reset to default so runc and
the container never inherit them. The blocking runner waits for its own pid only, so it
never steals the exit status of the container's init from the shim's reaper.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import time

# Dispositions that must not leak from a Python parent into runc or the container
# (plain ints: the enum members would be touched, and copied, in every shim).
_DEFAULT_SIGNALS = tuple(
    int(s)
    for s in (
    signal.SIGPIPE,
    signal.SIGXFSZ,
    signal.SIGXCPU,
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGCHLD,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGTSTP,
    )
)

_LOGRUS_MSG = re.compile(rb'msg="((?:[^"\\]|\\.)*)"')


class RuncCommand:
    """How one runtime handler invokes its binary: the global flags of every call.

    A plain class, not a dataclass: importing dataclasses (inspect, ast, ...) would add
    megabytes to the launcher every shim shares.
    """

    __slots__ = ("binary", "root", "extra_args", "systemd_cgroup")

    def __init__(
        self,
        binary: str = "runc",
        root: str = "",
        extra_args: list[str] | None = None,
        systemd_cgroup: bool = False,
    ) -> None:
        self.binary = binary
        self.root = root
        self.extra_args = list(extra_args or [])
        self.systemd_cgroup = systemd_cgroup

    def argv(self, *args: str, log: str = "") -> list[str]:
        """Global flags then the subcommand's own arguments."""
        out = [self.binary]
        if self.root:
            out += ["--root", self.root]
        if log:
            out += ["--log", log, "--log-format", "json"]
        if self.systemd_cgroup:
            out.append("--systemd-cgroup")
        out += self.extra_args
        out += args
        return out


def error_detail(stderr: bytes) -> str:
    """The human part of runc's stderr: logrus `msg="..."` values, else the raw text.

    Without --log runc prints both a logrus line and the bare message; we keep the
    distinct messages once each, in order.
    """
    messages: list[str] = []
    for line in stderr.splitlines():
        line = line.strip()
        if not line:
            continue
        match = _LOGRUS_MSG.search(line)
        text = _unquote_go(match.group(1)) if match else line.decode(errors="replace")
        if text not in messages:
            messages.append(text)
    return "; ".join(messages)


def _unquote_go(raw: bytes) -> str:
    """Undo Go's %q escaping of a logrus message (quotes and backslashes)."""
    try:
        return json.loads(b'"' + raw + b'"')
    except ValueError:
        return raw.decode(errors="replace")


def json_log_errors(data: bytes) -> str:
    """Error messages from a `runc --log-format json` file, joined; "" if none."""
    messages: list[str] = []
    for line in data.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal", "panic"):
            msg = str(entry.get("msg", ""))
            if msg and msg not in messages:
                messages.append(msg)
    return "; ".join(messages)


def format_error(argv: list[str], status: int | None, detail: str) -> str:
    """One line naming the command, how it ended and what runc said."""
    if status is None:
        how = "timed out"
    elif status < 0:
        how = f"killed by signal {-status}"
    else:
        how = f"exit status {status}"
    return f"`{' '.join(argv)}` failed ({how}): {detail or 'no error output'}"


def is_not_exist(detail: str) -> bool:
    """runc's way of saying the container id is unknown."""
    return "does not exist" in detail or "container not found" in detail


def is_not_running(detail: str) -> bool:
    """runc's way of saying a signal found no process (already exited)."""
    return any(
        text in detail
        for text in ("not running", "process already finished", "no such process")
    )


class RuncFailure(Exception):
    """A runc call ended badly; the message names the command and runc's words."""

    def __init__(self, argv: list[str], status: int | None, detail: str) -> None:
        super().__init__(format_error(argv, status, detail))
        self.argv = argv
        self.status = status
        self.detail = detail

    @property
    def not_exist(self) -> bool:
        """The container id was unknown to runc."""
        return is_not_exist(self.detail)

    @property
    def not_running(self) -> bool:
        """A signal or start found no live process."""
        return is_not_running(self.detail)


def spawn(argv: list[str], stdin: int, stdout: int, stderr: int) -> int:
    """Start argv with the given fds as 0/1/2 and default signal dispositions."""
    actions = [
        (os.POSIX_SPAWN_DUP2, stdin, 0),
        (os.POSIX_SPAWN_DUP2, stdout, 1),
        (os.POSIX_SPAWN_DUP2, stderr, 2),
    ]
    return os.posix_spawnp(
        argv[0],
        argv,
        os.environ,
        file_actions=actions,
        setsigdef=_DEFAULT_SIGNALS,
        setsigmask=(),
    )


class Result:
    """What a finished runc call produced."""

    __slots__ = ("status", "stdout", "stderr")

    def __init__(self, status: int, stdout: bytes, stderr: bytes) -> None:
        self.status = status
        self.stdout = stdout
        self.stderr = stderr


def run(argv: list[str], timeout: float = 60.0) -> Result:
    """Run argv to completion, collecting its stdout and stderr; raises on timeout.

    Reads both pipes until EOF before waiting, so a chatty command cannot block on a
    full pipe. Waits for this pid only (see the module doc).
    """
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        pid = spawn(argv, null, out_w, err_w)
    finally:
        os.close(null)
        os.close(out_w)
        os.close(err_w)
    try:
        out, err = _collect(out_r, err_r, time.monotonic() + timeout)
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise RuncFailure(argv, None, f"no answer within {timeout}s") from None
    finally:
        os.close(out_r)
        os.close(err_r)
    _, status = os.waitpid(pid, 0)
    return Result(os.waitstatus_to_exitcode(status), out, err)


def _collect(out_fd: int, err_fd: int, deadline: float) -> tuple[bytes, bytes]:
    """Read two pipes to EOF with poll; TimeoutError past the deadline."""
    chunks: dict[int, list[bytes]] = {out_fd: [], err_fd: []}
    poller = select.poll()
    open_fds = {out_fd, err_fd}
    for fd in open_fds:
        poller.register(fd, select.POLLIN)
    while open_fds:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        for fd, _ in poller.poll(remaining * 1000):
            data = os.read(fd, 65536)
            if data:
                chunks[fd].append(data)
            else:
                poller.unregister(fd)
                open_fds.discard(fd)
    return b"".join(chunks[out_fd]), b"".join(chunks[err_fd])


def check(argv: list[str], timeout: float = 60.0) -> bytes:
    """Run argv; its stdout on success, RuncFailure with runc's words otherwise."""
    result = run(argv, timeout)
    if result.status != 0:
        raise RuncFailure(argv, result.status, error_detail(result.stderr))
    return result.stdout
