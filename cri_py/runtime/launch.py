"""Starting shims from the daemon: forked by the shim launcher, or one exec each.

Both paths start Python through a bootstrap that registers `cri_py` as a bare package
instead of running cri_py/__init__.py: that file loads importlib.metadata (and email),
which measured 4.7 MB of private memory per process and buys a shim nothing. `-I -S`
keeps the environment (PYTHONPATH, user site, site-packages) out of the shim: it
needs the standard library and cri_py/shim only.

A started shim is a ShimHandle: its pid and a pidfd. The pidfd is what the daemon
signals and waits on, so a recycled pid can never be hit.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
from typing import Any, Protocol

import cri_py.shim
from cri_py import errors
from cri_py.shim import protocol as p
from cri_py.shim.shim import bind_listener

log = logging.getLogger(__name__)

PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(cri_py.shim.__file__))))
SHIM_DIR = os.path.dirname(os.path.abspath(cri_py.shim.__file__))
SHIM_CODE_DIRS = (SHIM_DIR, os.path.join(os.path.dirname(SHIM_DIR), "logging"))
SHIM_CODE_FILES = (os.path.join(os.path.dirname(SHIM_DIR), "atomicfile.py"),)

BOOTSTRAP = (
    "import sys\n"
    "root = sys.argv.pop(1)\n"
    "pkg = type(sys)('cri_py')\n"
    "pkg.__path__ = [root + '/cri_py']\n"
    "sys.modules['cri_py'] = pkg\n"
    "from cri_py.shim.__main__ import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
LAUNCHER_START_TIMEOUT = 20.0
LAUNCHER_CALL_TIMEOUT = 30.0


def shim_argv(*args: str) -> list[str]:
    """The command line of a shim-side program (`shim ...` or `launcher ...`)."""
    return [sys.executable, "-I", "-S", "-c", BOOTSTRAP, PACKAGE_PARENT, *args]


def shim_code_version() -> str:
    """Changes whenever the shim's code or interpreter does: a running launcher with
    another version is retired, so new shims never run stale code."""
    digest = hashlib.sha256(f"{p.PROTOCOL_VERSION}:{sys.executable}".encode())
    for directory in SHIM_CODE_DIRS:  # the shim's own modules and the log writer it imports
        for name in sorted(os.listdir(directory)):
            if name.endswith(".py"):
                st = os.stat(os.path.join(directory, name))
                digest.update(f"{directory}/{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    for path in SHIM_CODE_FILES:
        st = os.stat(path)
        digest.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


async def wait_readable(fd: int) -> None:
    """Until `fd` is readable (a pidfd: the process has exited)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not future.done():
            future.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await future
    finally:
        loop.remove_reader(fd)


class ShimHandle:
    """A shim process: pid plus pidfd (and the Popen when we are its parent)."""

    def __init__(self, pid: int, pidfd: int, popen: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.popen = popen

    @classmethod
    def open(cls, pid: int) -> "ShimHandle | None":
        """A handle on a pid known to be a live shim (it just answered us); None if gone."""
        try:
            return cls(pid, os.pidfd_open(pid))
        except ProcessLookupError:
            return None

    def alive(self) -> bool:
        """Not exited yet (a pidfd turns readable at exit)."""
        if self.pidfd < 0:
            return False
        return not select.select([self.pidfd], [], [], 0)[0]

    async def wait_gone(self, timeout: float) -> bool:
        """True once the process has exited; False if it still runs after `timeout`."""
        if self.pidfd < 0:
            return True
        try:
            await asyncio.wait_for(wait_readable(self.pidfd), timeout)
        except asyncio.TimeoutError:
            return False
        if self.popen is not None:
            self.popen.wait()  # we are the parent: collect it (returns at once)
        return True

    def kill(self) -> None:
        """SIGKILL through the pidfd (a no-op once it has exited)."""
        if self.pidfd >= 0:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        """Release the pidfd."""
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


class Spawner(Protocol):
    """How the task manager starts a shim for a prepared task directory."""

    async def spawn(self, task_dir: str) -> ShimHandle:
        """Start the shim; its socket is listening when this returns."""

    async def close(self) -> None:
        """Let go of spawning resources; running shims are not touched."""


def _open_shim_log(task_dir: str) -> int:
    """shim.log, for whatever a shim prints before it redirects its own stdio."""
    return os.open(os.path.join(task_dir, p.SHIM_LOG), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)


# Shims this process exec'd (exec mode): we are their parent, so we keep their Popen
# objects until they have exited and were collected, however long that takes.
_exec_shims: list[subprocess.Popen[bytes]] = []


class ExecSpawner:
    """One `python ... shim` exec per task (no launcher): simple, ~5 MB each."""

    async def spawn(self, task_dir: str) -> ShimHandle:
        """Bind the socket here and pass it down, so it listens before we return."""
        listener = bind_listener(os.path.join(task_dir, p.SHIM_SOCKET))
        logfd = _open_shim_log(task_dir)
        try:
            popen = subprocess.Popen(
                shim_argv("shim", "--task-dir", task_dir, "--listen-fd", str(listener.fileno())),
                pass_fds=[listener.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=logfd,
                stderr=logfd,
                start_new_session=True,
            )
        finally:
            listener.close()
            os.close(logfd)
        _exec_shims[:] = [x for x in _exec_shims if x.poll() is None] + [popen]
        return ShimHandle(popen.pid, os.pidfd_open(popen.pid), popen)

    async def close(self) -> None:
        """Collect the shims that have exited; running ones stay referenced."""
        _exec_shims[:] = [x for x in _exec_shims if x.poll() is None]


# Launchers this process started (it is their parent and must collect them): a
# launcher outlives the spawner that closed while shims remained, and a retired one
# lives on next to its successor until its last shim exits.
_started_launchers: list[subprocess.Popen[bytes]] = []


def _collect_exited_launchers() -> None:
    """waitpid the launchers of ours that have exited (no zombies left behind)."""
    _started_launchers[:] = [proc for proc in _started_launchers if proc.poll() is None]


class LauncherSpawner:
    """Forks shims through the launcher at <state>/shim-launcher.sock.

    Holds one connection (the launcher's sign that a daemon is alive), requests are
    serialized on it. A missing or dead launcher is (re)started on demand.
    """

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.socket_path = os.path.join(state_dir, p.LAUNCHER_SOCKET)
        self.version = shim_code_version()
        self._sock: socket.socket | None = None
        self._lock = asyncio.Lock()
        self.launcher_pid = 0

    async def spawn(self, task_dir: str) -> ShimHandle:
        """Ask the launcher to fork a shim; retried once with a fresh launcher."""
        async with self._lock:
            for attempt in (1, 2):
                sock = await self._ensure()
                try:
                    reply, fds = await self._call(sock, {"op": "spawn", "task_dir": task_dir})
                except (OSError, EOFError, asyncio.TimeoutError, p.ProtocolError) as exc:
                    self._disconnect()
                    # a shim that got as far as its pid file was forked: never fork twice
                    forked = os.path.exists(os.path.join(task_dir, p.SHIM_PID_FILE))
                    if attempt == 2 or forked:
                        raise errors.Internal(f"shim launcher failed: {exc!r}") from None
                    continue
                if not reply.get("ok"):
                    for fd in fds:
                        os.close(fd)
                    raise errors.Internal(str(reply.get("error")))
                if not fds:
                    raise errors.Internal("shim launcher sent no pidfd")
                for fd in fds[1:]:
                    os.close(fd)
                return ShimHandle(int(reply["pid"]), fds[0])
        raise AssertionError("unreachable")

    async def close(self) -> None:
        """Drop our connection; the launcher exits by itself once it has no shims."""
        async with self._lock:
            children = -1
            if self._sock is not None:
                try:
                    reply, _ = await self._call(self._sock, {"op": "hello"})
                    children = int(reply.get("children", -1))
                except (OSError, EOFError, asyncio.TimeoutError, p.ProtocolError):
                    pass
            self._disconnect()
            proc = next((x for x in _started_launchers if x.pid == self.launcher_pid), None)
            if proc is not None and children == 0:
                try:  # it leaves as soon as it sees our hang-up
                    await asyncio.wait_for(asyncio.to_thread(proc.wait), 5)
                except asyncio.TimeoutError:
                    log.warning("shim launcher %d did not exit after the last shim", proc.pid)
            _collect_exited_launchers()

    def _disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def _ensure(self) -> socket.socket:
        """A connection to a launcher running our version, starting one if needed."""
        if self._sock is not None:
            return self._sock
        sock = await self._connect()
        if sock is not None:
            try:
                hello, _ = await self._call(sock, {"op": "hello"})
                if hello.get("version") == self.version:
                    self._sock, self.launcher_pid = sock, int(hello["pid"])
                    return sock
                log.info("retiring shim launcher %s (version %s)", hello.get("pid"), hello.get("version"))
                await self._call(sock, {"op": "retire"})
            except (OSError, EOFError, asyncio.TimeoutError, p.ProtocolError):
                pass
            sock.close()
        await self._start_launcher()
        sock = await self._connect()
        if sock is None:
            raise errors.Internal(f"shim launcher started but {self.socket_path} refuses connections")
        hello, _ = await self._call(sock, {"op": "hello"})
        self._sock, self.launcher_pid = sock, int(hello["pid"])
        return sock

    async def _connect(self) -> socket.socket | None:
        """A non-blocking connection to the launcher socket, or None if nobody listens."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            with p.UnixPath(self.socket_path) as usable:
                await asyncio.get_running_loop().sock_connect(sock, usable)
        except OSError:
            sock.close()
            return None
        return sock

    async def _start_launcher(self) -> None:
        """Start a launcher in its own session; returns once it listens."""
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        logfd = os.open(
            os.path.join(self.state_dir, p.LAUNCHER_LOG), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600
        )
        try:
            proc = subprocess.Popen(
                shim_argv("launcher", "--socket", self.socket_path, "--version", self.version),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=logfd,
                start_new_session=True,
            )
        finally:
            os.close(logfd)
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(self._read_ready(proc.stdout.fileno()), LAUNCHER_START_TIMEOUT)
        finally:
            proc.stdout.close()
        if not line.startswith(b"ready"):
            code = proc.poll()
            raise errors.Internal(
                f"shim launcher did not start (exit {code}); see {self.state_dir}/{p.LAUNCHER_LOG}"
            )
        _started_launchers.append(proc)
        _collect_exited_launchers()

    @staticmethod
    async def _read_ready(fd: int) -> bytes:
        """The launcher's readiness line (b"" if it exited first)."""
        os.set_blocking(fd, False)
        data = b""
        while not data.endswith(b"\n"):
            await wait_readable(fd)
            try:
                chunk = os.read(fd, 256)
            except BlockingIOError:
                continue
            if not chunk:
                break
            data += chunk
        return data

    @staticmethod
    async def _call(sock: socket.socket, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        """One request, one answer line plus any fds sent with it."""
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_sendall(sock, p.encode(message)), LAUNCHER_CALL_TIMEOUT)
        return await asyncio.wait_for(_recv_line_with_fds(sock), LAUNCHER_CALL_TIMEOUT)


async def _recv_line_with_fds(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """Read one line (and SCM_RIGHTS fds) from a non-blocking socket.

    asyncio's socket helpers cannot receive fds, so this waits for readability and
    calls socket.recv_fds itself.
    """
    buf = b""
    fds: list[int] = []
    while not buf.endswith(b"\n"):
        try:
            data, new_fds, _, _ = socket.recv_fds(sock, 65536, 4)
        except BlockingIOError:
            await wait_readable(sock.fileno())
            continue
        fds += new_fds
        if not data:
            for fd in fds:
                os.close(fd)
            raise EOFError("shim launcher closed the connection")
        buf += data
    return p.decode(buf.strip()), fds
