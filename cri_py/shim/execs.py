"""Exec'd processes the shim starts and reaps: ExecSync and streaming exec.

The daemon sends an `exec` request with the process's stdio attached (SCM_RIGHTS);
the shim runs `runc exec --detach` with those fds, without waiting for it. runc writes
the process's host pid to --pid-file and exits; the process, orphaned, is reparented
to the shim (the container's child subreaper), which reaps it and answers the request
with its exit code. Why here rather than a helper process per exec: the shim is
already running with everything loaded and is already the subreaper, so an exec costs
one runc and no Python start-up (a fresh helper cost about 25 ms per probe).

A background child the command leaves holding its stdout does not delay the answer:
the answer comes from the exec'd process's own exit. When the client that asked goes
away before the answer, the process is killed: nothing outlives its session.

Exits can be reaped in either order: the exec'd process may exit (as a zombie child of
runc) before runc does. Exits of unknown pids are kept while some runc is still
running and matched once its pid file is read.
"""

from __future__ import annotations

import os
import signal

from cri_py.shim import protocol as p
from cri_py.shim import runc

TYPE_CHECKING = False  # typing costs every shim memory; checkers know this name
if TYPE_CHECKING:
    from typing import Any, Callable


class Exec:
    """One exec: who asked, runc's pid, then the process's."""

    __slots__ = ("conn", "argv", "pid_file", "pid")

    def __init__(self, conn: Any, argv: list[str], pid_file: str) -> None:
        self.conn = conn  # None once the client has gone away
        self.argv = argv
        self.pid_file = pid_file
        self.pid = 0


class ExecTable:
    """Every exec in flight in this shim."""

    def __init__(self, answer: Callable[[Any, dict[str, Any]], None], log: Callable[[str], None]) -> None:
        self.answer = answer
        self.log = log
        self.starting: dict[int, Exec] = {}  # runc's pid -> exec
        self.running: dict[int, Exec] = {}  # the exec'd process's pid -> exec
        self.unclaimed: dict[int, int] = {}  # pid -> wait status, reaped before its runc

    def start(self, conn: Any, argv: list[str], stdio: list[int], pid_file: str) -> None:
        """Spawn runc (not waited for: its exit comes through reaped())."""
        pid = runc.spawn(argv, stdio[0], stdio[1], stdio[2])
        self.starting[pid] = Exec(conn, argv, pid_file)

    def reaped(self, pid: int, wait_status: int) -> None:
        """A child of the shim other than the init exited."""
        if pid in self.starting:
            self.runc_exited(self.starting.pop(pid), wait_status)
        elif pid in self.running:
            self.finished(self.running.pop(pid), wait_status)
        elif self.starting:
            self.unclaimed[pid] = wait_status

    def settle(self) -> None:
        """After a round of reaping: unknown exits matter only while a runc runs."""
        if not self.starting:
            self.unclaimed.clear()

    def runc_exited(self, ex: Exec, wait_status: int) -> None:
        """runc is done: on success the process's pid is in its pid file."""
        code = os.waitstatus_to_exitcode(wait_status)
        if code != 0:
            self.reply(ex, p.ok(runc_failed=code, argv=ex.argv))
            return
        try:
            with open(ex.pid_file) as fh:
                ex.pid = int(fh.read().strip())
        except (OSError, ValueError) as exc:
            self.reply(ex, p.error(p.INTERNAL, f"runc exec left no pid in {ex.pid_file}: {exc}"))
            return
        if ex.pid in self.unclaimed:
            self.finished(ex, self.unclaimed.pop(ex.pid))
            return
        self.running[ex.pid] = ex
        if ex.conn is None:  # the client left while runc was starting it
            self.kill(ex)

    def finished(self, ex: Exec, wait_status: int) -> None:
        """The exec'd process exited: its code is the answer."""
        self.reply(ex, p.ok(exit_code=p.exit_code_of(wait_status)))

    def reply(self, ex: Exec, message: dict[str, Any]) -> None:
        if ex.conn is not None:
            self.answer(ex.conn, message)

    def abandon(self, conn: Any) -> None:
        """The client went away: kill what it started (once its pid is known)."""
        for ex in (*self.starting.values(), *self.running.values()):
            if ex.conn is conn:
                ex.conn = None
                if ex.pid:
                    self.kill(ex)

    def kill(self, ex: Exec) -> None:
        """SIGKILL the exec'd process; not yet reaped, so the pid is still its."""
        try:
            os.kill(ex.pid, signal.SIGKILL)
        except OSError as exc:
            self.log(f"killing exec'd process {ex.pid}: {exc}")
