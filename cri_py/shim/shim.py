"""The shim: one small process per container that outlives the daemon.

It runs `runc create` as a child subreaper, so the container's init becomes its child
and its exit status can be collected with waitpid; it holds the container's stdio and
feeds the output to a log sink; it answers the daemon on <taskdir>/shim.sock with the
JSON-lines protocol of cri_py.shim.protocol.

Everything happens in one thread around one epoll loop: the listening socket,
client connections, the container's output pipes and a signal wakeup pipe (SIGCHLD).
No asyncio (about 2 MB more per process), no threads (the launcher forks us).

Memory: a forked shim shares the launcher's pages until it writes them, and CPython
3.11 writes to every object it touches (reference counts). So the shim calls C-level
primitives directly where the stdlib wrapper would run a lot of Python (select.epoll
instead of selectors, _signal instead of signal's enum-converting wrappers, the
socket's C _accept): fewer objects touched, fewer private pages per shim.

Lifecycle: bind (already done by whoever started us) -> runc create -> serve. The
first request is only read once create has finished, so the daemon's first `state`
answer is the create result; on a create failure the shim writes create-error.json and
exits without serving. After the init exits it writes exit.json and keeps serving until
`delete` or `shutdown`.
"""

from __future__ import annotations

import _signal
import errno
import os
import select
import socket
import sys
import time
TYPE_CHECKING = False  # typing costs every shim memory; checkers know this name

from cri_py.shim import protocol as p
from cri_py.shim import linux, runc
from cri_py.shim.attach import AttachHub
from cri_py.shim.execs import ExecTable
from cri_py.shim.linux import set_child_subreaper, set_process_name
from cri_py.shim.logsink import STDERR, STDOUT, LogSink, make_sink

if TYPE_CHECKING:
    from typing import Any, Callable

READ_CHUNK = 65536
FDS_SPACE = socket.CMSG_SPACE(4 * 4)  # room for the 3 stdio fds an exec request carries
SEND_TIMEOUT = 5.0  # a client that does not read its tiny answer for this long is dropped
REAP_GRACE = 5.0  # after `runc delete --force` the init must be a zombie within this
PROCESS_NAME = "cri-py-shim"  # comm of every shim (forked shims would look like the launcher)


def format_exc() -> str:
    """The current exception's traceback; traceback is imported only when one happens."""
    import traceback

    return traceback.format_exc()


def log(message: str) -> None:
    """One line in shim.log (our stderr) with a wall-clock stamp."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    sys.stderr.write(f"{stamp} shim[{os.getpid()}] {message}\n")
    sys.stderr.flush()


class TaskConfig:
    """The part of the daemon's TaskSpec (task.json) the shim acts on."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.id: str = raw["id"]
        self.bundle: str = raw["bundle"]
        self.runc = runc.RuncCommand(
            binary=raw.get("runtime_binary") or "runc",
            root=raw.get("runtime_root") or "",
            extra_args=list(raw.get("runtime_args") or []),
            systemd_cgroup=bool(raw.get("systemd_cgroup", False)),
        )
        self.log_path: str = raw.get("log_path") or ""
        self.tty = bool(raw.get("tty", False))
        self.stdin = bool(raw.get("stdin", False))
        self.stdin_once = bool(raw.get("stdin_once", False))
        self.start = bool(raw.get("start", False))


class ContainerIO:
    """The container's stdio as the shim holds it, and the output pumping.

    Without a tty: stdin is /dev/null (or a pipe whose write end we keep open for a
    later attach), stdout and stderr are two pipes we read. With a tty: runc hands us
    the pty master over the console socket and it is both input and output.
    """

    def __init__(self, sink: LogSink, want_stdin: bool, tty: bool) -> None:
        self.sink = sink
        self.tty = tty
        self.want_stdin = want_stdin
        self.readers: dict[int, str] = {}  # our read ends: fd -> stream name
        self.stdin_fd = -1  # our write end of the container's stdin (or the pty master)
        self.tap: Callable[[str, bytes], None] | None = None  # attached clients' copy
        self._child_fds: list[int] = []

    def child_stdio(self) -> tuple[int, int, int]:
        """Fds to give runc create as 0/1/2; runc passes them on to the container."""
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self._child_fds.append(null)
        if self.tty:
            # the container gets the pty; runc's own chatter goes to shim.log
            return null, 1, 2
        stdin = null
        if self.want_stdin:
            stdin, self.stdin_fd = os.pipe()
            self._child_fds.append(stdin)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        self._child_fds += [out_w, err_w]
        for fd, stream in ((out_r, STDOUT), (err_r, STDERR)):
            os.set_blocking(fd, False)
            self.readers[fd] = stream
        return stdin, out_w, err_w

    def spawned(self) -> None:
        """Drop our copies of the child's ends, so EOF comes when the container closes."""
        for fd in self._child_fds:
            os.close(fd)
        self._child_fds = []

    def attach_console(self, master: int) -> None:
        """Use the pty master runc sent us for both directions."""
        os.set_blocking(master, False)
        self.readers[master] = STDOUT
        self.stdin_fd = master

    def pump(self, fd: int) -> bool:
        """Move one chunk from `fd` to the sink; False once the stream has ended."""
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return True
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: the pty's last slave fd was closed
                log(f"reading container {self.readers.get(fd)}: {exc}")
            data = b""
        if not data:
            return False
        self.sink.write(self.readers[fd], data)
        if self.tap is not None:
            self.tap(self.readers[fd], data)
        return True

    def drain(self) -> list[int]:
        """Read everything already buffered; returns the fds that reached EOF."""
        ended = []
        for fd in list(self.readers):
            while True:
                try:
                    data = os.read(fd, READ_CHUNK)
                except BlockingIOError:
                    break
                except OSError:
                    data = b""
                if not data:
                    ended.append(fd)
                    break
                self.sink.write(self.readers[fd], data)
                if self.tap is not None:
                    self.tap(self.readers[fd], data)
        return ended

    def close_reader(self, fd: int) -> None:
        """Forget an ended stream; the sink writes out its unfinished last line."""
        stream = self.readers.pop(fd, None)
        if stream is not None:
            self.sink.end(stream)
            if fd != self.stdin_fd:
                os.close(fd)

    def close_stdin(self) -> None:
        """EOF for the container's stdin pipe (a pty master stays: it is the output too)."""
        if self.stdin_fd >= 0 and not self.tty:
            os.close(self.stdin_fd)
            self.stdin_fd = -1

    def close(self) -> None:
        """Release every fd and the sink (the shim is leaving)."""
        self.spawned()
        for fd in list(self.readers):
            self.close_reader(fd)
        if self.stdin_fd >= 0:
            os.close(self.stdin_fd)
            self.stdin_fd = -1
        self.sink.close()


class EventLoop:
    """fd -> callbacks over epoll: the smallest loop the shim needs.

    An fd may have a reader (readable or hung up), a writer (writable; only while
    there is something to write) or both (a pty master is output and stdin). A paused
    reader stays registered, so a hang-up still reaches it.
    """

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.handlers: dict[int, Callable[[int], None]] = {}
        self.writers: dict[int, Callable[[int], None]] = {}
        self.paused: set[int] = set()
        self.masks: dict[int, int] = {}  # what each registered fd is registered for

    def add(self, fd: int, callback: Callable[[int], None]) -> None:
        """Call `callback(fd)` whenever fd is readable (or hung up)."""
        self.handlers[fd] = callback
        self._update(fd)

    def remove(self, fd: int) -> None:
        """Stop watching fd (before closing it)."""
        self.handlers.pop(fd, None)
        self.writers.pop(fd, None)
        self.paused.discard(fd)
        self._update(fd)

    def want_write(self, fd: int, callback: Callable[[int], None] | None) -> None:
        """Call `callback(fd)` while fd is writable; None stops that."""
        if callback is None:
            self.writers.pop(fd, None)
        else:
            self.writers[fd] = callback
        self._update(fd)

    def pause(self, fd: int, paused: bool) -> None:
        """Stop (or resume) reading fd without forgetting it."""
        if paused:
            self.paused.add(fd)
        else:
            self.paused.discard(fd)
        self._update(fd)

    def _update(self, fd: int) -> None:
        """Make epoll's registration of fd match what is wanted of it."""
        if fd not in self.handlers and fd not in self.writers:
            if self.masks.pop(fd, None) is not None:
                self.epoll.unregister(fd)
            return
        mask = 0
        if fd in self.handlers and fd not in self.paused:
            mask |= select.EPOLLIN
        if fd in self.writers:
            mask |= select.EPOLLOUT
        old = self.masks.get(fd)
        if old is None:
            self.epoll.register(fd, mask)
        elif old != mask:
            self.epoll.modify(fd, mask)
        self.masks[fd] = mask

    def poll(self, timeout: float = -1) -> list[Callable[[int], None] | int]:
        """Wait for events; returns [callback, fd, callback, fd, ...] flattened."""
        ready: list[Callable[[int], None] | int] = []
        for fd, events in self.epoll.poll(timeout):
            if events & (select.EPOLLOUT | select.EPOLLERR):
                writer = self.writers.get(fd)
                if writer is not None:
                    ready += (writer, fd)
            if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                callback = self.handlers.get(fd)
                if callback is not None:
                    ready += (callback, fd)
        return ready

    def close(self) -> None:
        """Release the epoll fd."""
        self.epoll.close()
        self.handlers.clear()
        self.writers.clear()
        self.masks.clear()


class Conn:
    """One client connection: its line buffer and the requests waiting their turn."""

    __slots__ = ("sock", "fd", "lines", "queue", "blocked", "fds")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.lines = p.LineBuffer()
        self.queue: list[dict[str, Any]] = []
        self.blocked = False  # a deferred request (wait/exec) is still unanswered
        self.fds: list[int] = []  # received with SCM_RIGHTS, for the next exec request

    def take_fds(self, ancdata: list[tuple[int, int, bytes]]) -> None:
        """Keep the fds a message carried (never inherited by what the shim spawns)."""
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for i in range(0, len(payload) - len(payload) % 4, 4):
                    fd = int.from_bytes(payload[i : i + 4], sys.byteorder)
                    os.set_inheritable(fd, False)
                    self.fds.append(fd)

    def close_fds(self) -> None:
        """Close received fds no request used."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class Shim:
    """The shim's state and its event loop."""

    def __init__(self, task_dir: str, listener: socket.socket) -> None:
        self.dir = task_dir
        self.listener = listener
        self.task = TaskConfig(p.read_json(self.path(p.TASK_FILE)) or {})
        self.io = ContainerIO(
            make_sink(self.task.log_path, self.path(p.LOG_BYTES_FILE)), self.task.stdin, self.task.tty
        )
        self.loop = EventLoop()
        self.attached = AttachHub(self.loop, self.io, self.task.stdin_once, log)
        self.execs = ExecTable(self.answer, log)
        self.conns: dict[int, Conn] = {}
        self.waiters: list[Conn] = []
        self.status = "creating"
        self.init_pid = 0
        self.exit_code: int | None = None
        self.started_at_ns = 0
        self.exited_at_ns = 0
        self.deleted = False
        self.running = True
        self._wakeup_r = -1
        self._ops: dict[str, Callable[[Conn, dict[str, Any]], dict[str, Any] | None]] = {
            "state": self.op_state,
            "start": self.op_start,
            "kill": self.op_kill,
            "wait": self.op_wait,
            "delete": self.op_delete,
            "shutdown": self.op_shutdown,
            "reopen_log": self.op_reopen_log,
            "attach": self.op_attach,
            "exec": self.op_exec,
        }

    def path(self, name: str) -> str:
        """A file in the task directory."""
        return os.path.join(self.dir, name)

    # --- setup ---------------------------------------------------------------------

    def install_signals(self) -> None:
        """SIGCHLD wakes the loop through a pipe; terminal signals are ignored.

        A Python-level handler must exist for the wakeup fd to be written; the
        handler itself does nothing, reaping happens in the loop. SIGTERM keeps its
        default: an operator can still stop a shim (the container lives on).
        """
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self._wakeup_r = r
        _signal.set_wakeup_fd(w)
        _signal.signal(_signal.SIGCHLD, _ignore_signal)
        for signum in (_signal.SIGINT, _signal.SIGHUP, _signal.SIGPIPE):
            _signal.signal(signum, _signal.SIG_IGN)

    def create(self) -> bool:
        """`runc create`; False (after writing create-error.json) if it failed."""
        console = None
        try:
            if self.task.tty:
                console = ConsoleSocket(self.dir)
            # `run --detach` saves a second runc process when nothing happens between
            # create and start (the pause container)
            argv = self.task.runc.argv(
                *(["run", "--detach"] if self.task.start else ["create"]),
                "--bundle", self.task.bundle,
                "--pid-file", self.path(p.INIT_PID_FILE),
                *(["--console-socket", console.runc_path] if console else []),
                self.task.id,
                log=self.path(p.RUNC_LOG),
            )  # fmt: skip
            stdio = self.io.child_stdio()
            try:
                pid = runc.spawn(argv, *stdio)
            finally:
                self.io.spawned()
            _, wait_status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(wait_status)
            if code != 0:
                self.create_failed(argv, code)
                return False
            with open(self.path(p.INIT_PID_FILE)) as fh:
                self.init_pid = int(fh.read().strip())
            if console is not None:
                self.io.attach_console(console.receive())
        except Exception as exc:  # noqa: BLE001 - every failure must reach the daemon
            log("create failed:\n" + format_exc())
            self.write_create_error(f"shim could not create the task: {exc}", "", -1)
            self.forget_container()
            return False
        finally:
            if console is not None:
                console.close()
        if self.task.start:
            self.started_at_ns = time.time_ns()
            self.status = p.RUNNING
        else:
            self.status = p.CREATED
        return True

    def create_failed(self, argv: list[str], code: int) -> None:
        """Record runc's own words about the failure, then leave nothing behind."""
        try:
            with open(self.path(p.RUNC_LOG), "rb") as fh:
                detail = runc.json_log_errors(fh.read())
        except OSError:
            detail = ""
        if not detail:  # no --log output: whatever reached the container's stderr
            detail = self.buffered_stderr()
        self.write_create_error(runc.format_error(argv, code, detail), detail, code, argv)
        self.forget_container()

    def buffered_stderr(self) -> str:
        """What runc wrote to the stderr pipe before it exited (non-blocking)."""
        chunks = []
        for fd, stream in self.io.readers.items():
            if stream != STDERR:
                continue
            try:
                chunks.append(os.read(fd, READ_CHUNK))
            except OSError:
                pass
        return runc.error_detail(b"".join(chunks))

    def write_create_error(
        self, message: str, detail: str, code: int, argv: list[str] | None = None
    ) -> None:
        """The file the daemon reads when the shim exits without serving."""
        p.write_json_atomic(
            self.path(p.CREATE_ERROR_FILE),
            {"error": message, "detail": detail, "exit_status": code, "argv": argv},
        )

    def forget_container(self) -> None:
        """`runc delete --force`, best effort: a failed create may leave a half state."""
        try:
            runc.check(self.task.runc.argv("delete", "--force", self.task.id))
        except runc.RuncFailure as exc:
            if not exc.not_exist:
                log(f"cleanup after failed create: {exc}")

    # --- loop ------------------------------------------------------------------------

    def serve(self) -> None:
        """The event loop; returns after delete/shutdown."""
        self.listener.setblocking(False)
        self.loop.add(self.listener.fileno(), self.on_accept)
        self.loop.add(self._wakeup_r, self.on_wakeup)
        for fd in self.io.readers:
            self.loop.add(fd, self.on_output)
        self.reap()  # the init may have died before we were listening for SIGCHLD
        while self.running:
            ready = self.loop.poll()
            for i in range(0, len(ready), 2):
                try:
                    ready[i](ready[i + 1])  # type: ignore[operator]
                except Exception:  # noqa: BLE001 - one bad event must not kill the shim
                    log("event handler failed:\n" + format_exc())
                if not self.running:
                    break

    def on_accept(self, fd: int) -> None:
        """A new client (the C-level _accept skips socket.accept's enum conversions)."""
        try:
            client_fd, _ = self.listener._accept()  # type: ignore[attr-defined]
        except BlockingIOError:
            return
        sock = socket.socket(fileno=client_fd)
        sock.settimeout(SEND_TIMEOUT)
        self.conns[client_fd] = Conn(sock)
        self.loop.add(client_fd, self.on_client)

    def on_client(self, fd: int) -> None:
        """Bytes from a client: parse lines, run requests in order."""
        conn = self.conns.get(fd)
        if conn is None:
            return  # became an attach stream earlier in this round of events
        try:
            data, ancdata, _, _ = conn.sock.recvmsg(65536, FDS_SPACE)
        except OSError:
            data, ancdata = b"", []
        if ancdata:
            conn.take_fds(ancdata)
        if not data:
            self.drop(conn)
            return
        try:
            conn.queue += conn.lines.feed(data)
        except p.ProtocolError as exc:
            self.send(conn, p.error(p.INVALID_ARGUMENT, str(exc)))
            self.drop(conn)
            return
        self.pump_requests(conn)

    def pump_requests(self, conn: Conn) -> None:
        """Answer queued requests until one is deferred."""
        while conn.queue and not conn.blocked and self.running and conn.fd in self.conns:
            request = conn.queue.pop(0)
            reply = self.dispatch(conn, request)
            if reply is None:
                conn.blocked = True
            else:
                self.send(conn, reply)

    def dispatch(self, conn: Conn, request: dict[str, Any]) -> dict[str, Any] | None:
        """Run one request; None means the answer comes later."""
        op = self._ops.get(str(request.get("op")))
        if op is None:
            return p.error(p.INVALID_ARGUMENT, f"unknown op {request.get('op')!r}")
        try:
            return op(conn, request)
        except runc.RuncFailure as exc:
            return p.error(p.INTERNAL, str(exc))
        except (KeyError, TypeError, ValueError) as exc:
            return p.error(p.INVALID_ARGUMENT, f"bad {request.get('op')} request: {exc!r}")

    def answer(self, conn: Conn, reply: dict[str, Any]) -> None:
        """Answer a deferred request, then carry on with that client's queue."""
        conn.blocked = False
        if self.conns.get(conn.fd) is conn:  # not a later client that got the same fd
            self.send(conn, reply)
            self.pump_requests(conn)

    def send(self, conn: Conn, reply: dict[str, Any]) -> None:
        """Write one answer; a client that cannot take it is dropped."""
        try:
            conn.sock.sendall(p.encode(reply))
        except OSError:
            self.drop(conn)

    def drop(self, conn: Conn) -> None:
        """Forget a client (it hung up or misbehaved)."""
        if self.conns.pop(conn.fd, None) is None:
            return
        self.loop.remove(conn.fd)
        conn.sock.close()
        conn.close_fds()
        if conn in self.waiters:
            self.waiters.remove(conn)
        self.execs.abandon(conn)

    def on_output(self, fd: int) -> None:
        """Container output is readable."""
        if not self.io.pump(fd):
            self.loop.remove(fd)
            self.io.close_reader(fd)

    def on_wakeup(self, fd: int) -> None:
        """A signal arrived (SIGCHLD is the only one we act on)."""
        linux.drain(fd)
        self.reap()

    def reap(self) -> None:
        """Collect every exited child; the init's exit is the task's exit."""
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == self.init_pid and self.status != p.STOPPED:
                self.init_exited(wait_status)
            else:
                self.execs.reaped(pid, wait_status)
        self.execs.settle()

    def init_exited(self, wait_status: int | None) -> None:
        """Record the exit durably, flush output, then answer every waiter."""
        self.exit_code = 255 if wait_status is None else p.exit_code_of(wait_status)
        self.exited_at_ns = time.time_ns()
        self.status = p.STOPPED
        for fd in self.io.drain():
            if fd in self.io.readers:
                self.loop.remove(fd)
                self.io.close_reader(fd)
        p.write_json_atomic(self.path(p.EXIT_FILE), self.state())
        self.attached.end("exited", self.exit_code)
        waiters, self.waiters = self.waiters, []
        for conn in waiters:
            self.answer(conn, p.ok(state=self.state()))

    def state(self) -> dict[str, Any]:
        """The task as the protocol reports it."""
        return {
            "id": self.task.id,
            "pid": self.init_pid,
            "status": self.status,
            "exit_code": self.exit_code,
            "started_at_ns": self.started_at_ns,
            "exited_at_ns": self.exited_at_ns,
            "shim_pid": os.getpid(),
        }

    # --- requests -----------------------------------------------------------------

    def op_state(self, conn: Conn, request: dict[str, Any]) -> dict[str, Any]:
        """Where the task is in its life."""
        return p.ok(state=self.state())

    def op_start(self, conn: Conn, request: dict[str, Any]) -> dict[str, Any]:
        """`runc start`: the init execs the container's process."""
        if self.status != p.CREATED:
            return p.error(p.FAILED_PRECONDITION, f"task {self.task.id} is {self.status}, not created")
        runc.check(self.task.runc.argv("start", self.task.id))
        self.started_at_ns = time.time_ns()
        self.status = p.RUNNING
        return p.ok(state=self.state())

    def op_kill(self, conn: Conn, request: dict[str, Any]) -> dict[str, Any]:
        """`runc kill`; a task that has already exited is not an error."""
        signum = int(request["signal"])
        if self.status == p.STOPPED:
            return p.ok()
        args = ["kill", "--all"] if request.get("all") else ["kill"]
        try:
            runc.check(self.task.runc.argv(*args, self.task.id, str(signum)))
        except runc.RuncFailure as exc:
            if not (exc.not_running or exc.not_exist):
                raise
        return p.ok()

    def op_wait(self, conn: Conn, request: dict[str, Any]) -> dict[str, Any] | None:
        """Answered once the init has exited (now, if it already has)."""
        if self.status == p.STOPPED:
            return p.ok(state=self.state())
        self.waiters.append(conn)
        return None

    def op_delete(self, conn: Conn, request: dict[str, Any]) -> dict[str, Any]:
        """`runc delete --force` (kills a live init), record its exit, then leave."""
        if not self.deleted:
            try:
                runc.check(self.task.runc.argv("delete", "--force", self.task.id))
            except runc.RuncFailure as exc:
                if not exc.not_exist:
                    raise
            self.deleted = True
        if self.status != p.STOPPED:
            self.reap_init_after_delete()
        self.running = False
        return p.ok(state=self.state())

    def reap_init_after_delete(self) -> None:
        """After a forced delete the init is dead or dying: collect it (bounded wait)."""
        deadline = time.monotonic() + REAP_GRACE
        while True:
            try:
                pid, wait_status = os.waitpid(self.init_pid, os.WNOHANG)
            except ChildProcessError:  # not ours (should not happen): exit unknown
                self.init_exited(None)
                return
            if pid:
                self.init_exited(wait_status)
                return
            if time.monotonic() > deadline:
                log(f"init {self.init_pid} still alive {REAP_GRACE}s after runc delete --force")
                self.init_exited(None)
                return
            time.sleep(0.01)

    def op_shutdown(self, conn: Conn, request: dict[str, Any]) -> dict[str, Any]:
        """Leave without deleting; refused while the container runs unless forced."""
        if self.status in (p.CREATED, p.RUNNING) and not request.get("force"):
            return p.error(
                p.FAILED_PRECONDITION, f"task {self.task.id} is {self.status}: delete it first"
            )
        self.running = False
        return p.ok()

    def op_exec(self, conn: Conn, request: dict[str, Any]) -> dict[str, Any] | None:
        """`runc exec --detach` with the stdio fds that came with the request; the
        answer (exit_code, or runc_failed with runc's argv) comes when it is over."""
        fds, conn.fds = conn.fds, []
        try:
            if self.status != p.RUNNING:
                return p.error(p.FAILED_PRECONDITION, f"task {self.task.id} is {self.status}, not running")
            if len(fds) != 3:
                return p.error(p.INVALID_ARGUMENT, f"exec needs 3 stdio fds, got {len(fds)}")
            console = str(request.get("console_socket") or "")
            argv = self.task.runc.argv(
                "exec", "--detach",
                *(["--tty", "--console-socket", console] if console else []),
                "--process", str(request["process_file"]),
                "--pid-file", str(request["pid_file"]),
                self.task.id,
            )  # fmt: skip
            try:
                self.execs.start(conn, argv, fds, str(request["pid_file"]))
            except OSError as exc:
                return p.error(p.INTERNAL, f"cannot run {argv[0]}: {exc}")
            return None
        finally:
            for fd in fds:
                os.close(fd)

    def op_attach(self, conn: Conn, request: dict[str, Any]) -> dict[str, Any] | None:
        """Turn this connection into an attach stream (frames from now on)."""
        if self.status != p.RUNNING:
            return p.error(p.FAILED_PRECONDITION, f"task {self.task.id} is {self.status}, not running")
        if conn.queue or conn.lines.pending:
            return p.error(p.INVALID_ARGUMENT, "attach must be the last request on its connection")
        self.send(conn, p.ok(tty=self.task.tty, stdin=self.task.stdin and self.io.stdin_fd >= 0))
        if self.conns.pop(conn.fd, None) is None:
            return None  # the client went away while we answered
        self.loop.remove(conn.fd)
        self.attached.add(
            conn.sock, bool(request.get("stdout")), bool(request.get("stderr")), bool(request.get("stdin"))
        )
        return None

    def op_reopen_log(self, conn: Conn, request: dict[str, Any]) -> dict[str, Any]:
        """Start a new log file (after the kubelet rotated the old one)."""
        try:
            self.io.sink.reopen()
        except OSError as exc:
            return p.error(p.INTERNAL, f"reopen {self.task.log_path}: {exc}")
        return p.ok()

    # --- teardown -----------------------------------------------------------------

    def close(self) -> None:
        """Close clients, output and the socket file; the task dir is the daemon's."""
        for conn in list(self.conns.values()):
            self.drop(conn)
        self.attached.close()
        self.io.close()
        try:
            os.unlink(self.path(p.SHIM_SOCKET))
        except FileNotFoundError:
            pass
        self.listener.close()
        self.loop.close()


class ConsoleSocket:
    """The socket runc connects to during create to hand over the pty master.

    runc connects and sends the fd without waiting for an accept, so we can collect it
    after `runc create` has returned. A long task dir is reached through
    /proc/<our pid>/fd/<dirfd>/ so runc (root) can still connect.
    """

    NAME = "console.sock"

    def __init__(self, task_dir: str) -> None:
        self._path = os.path.join(task_dir, self.NAME)
        self._dir_fd = -1
        if len(os.fsencode(self._path)) <= p.UNIX_PATH_MAX:
            self.runc_path = self._path
        else:
            self._dir_fd = os.open(task_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self.runc_path = f"/proc/{os.getpid()}/fd/{self._dir_fd}/{self.NAME}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.runc_path)
        self.sock.listen(1)

    def receive(self, timeout: float = 10.0) -> int:
        """The pty master fd runc sent."""
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(timeout)
            _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
        if not fds:
            raise RuntimeError("runc sent no pty master on the console socket")
        return fds[0]

    def close(self) -> None:
        """Remove the socket."""
        self.sock.close()
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass
        if self._dir_fd >= 0:
            os.close(self._dir_fd)


def _ignore_signal(signum: int, frame: object) -> None:
    """SIGCHLD handler: its only job is to make Python write the wakeup fd."""


def bind_listener(path: str) -> socket.socket:
    """Listen on `path` (any length), replacing a stale socket file."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with p.UnixPath(path) as usable:
            sock.bind(usable)
        os.chmod(path, 0o600)
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    return sock


def redirect_stdio(task_dir: str) -> None:
    """stdin from /dev/null, stdout/stderr appended to shim.log: no tie to the daemon."""
    null = os.open(os.devnull, os.O_RDONLY)
    logfd = os.open(
        os.path.join(task_dir, p.SHIM_LOG), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600
    )
    os.dup2(null, 0)
    os.dup2(logfd, 1)
    os.dup2(logfd, 2)
    os.close(null)
    os.close(logfd)


def run(task_dir: str, listener: socket.socket) -> int:
    """The whole life of a shim whose socket is already listening; the exit code.

    Called in a fresh process (forked by the launcher, or `python -m cri_py.shim`).
    """
    redirect_stdio(task_dir)
    try:
        os.chdir(task_dir)  # /proc/<pid>/cwd names the task; no mount point pinned
        set_process_name(PROCESS_NAME)
        set_child_subreaper()
        p.write_json_atomic(os.path.join(task_dir, p.SHIM_PID_FILE), os.getpid())
        shim = Shim(task_dir, listener)
        shim.install_signals()
    except Exception as exc:  # noqa: BLE001 - the daemon must learn why, not just "EOF"
        log("setup failed:\n" + format_exc())
        p.write_json_atomic(
            os.path.join(task_dir, p.CREATE_ERROR_FILE),
            {"error": f"shim setup failed: {exc!r}", "detail": "", "exit_status": -1},
        )
        return 1
    if not shim.create():
        shim.close()
        return 1
    try:
        shim.serve()
    finally:
        shim.close()
    return 0


def main(argv: list[str]) -> int:
    """`python -m cri_py.shim --task-dir DIR [--listen-fd N]` (the no-launcher path)."""
    task_dir = ""
    listen_fd = -1
    args = iter(argv)
    for arg in args:
        if arg == "--task-dir":
            task_dir = next(args)
        elif arg == "--listen-fd":
            listen_fd = int(next(args))
        else:
            print(f"cri-py shim: unknown argument {arg!r}", file=sys.stderr)
            return 2
    if not task_dir:
        print("usage: python -m cri_py.shim --task-dir DIR [--listen-fd N]", file=sys.stderr)
        return 2
    if listen_fd >= 0:
        listener = socket.socket(fileno=listen_fd)
        # pass_fds made it inheritable: runc and the container must never get it
        listener.set_inheritable(False)
    else:
        listener = bind_listener(os.path.join(task_dir, p.SHIM_SOCKET))
    return run(task_dir, listener)
