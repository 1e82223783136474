"""The shim launcher: a pre-started process that forks one shim per container.

Why: a fresh `python -m cri_py.shim` costs ~7 MB of private memory and ~30 ms of
imports per container. The launcher imports exactly what a shim needs once, freezes
those objects out of the garbage collector's reach (gc.freeze, so no collection in a
child writes to them) and forks; each shim then shares those pages copy-on-write and
owns only what it dirties.

Lifetime rules, so that nothing dies with the daemon and nothing leaks:
- started by the daemon in its own session, it serves <state>/shim-launcher.sock;
- every shim is its direct child (the shim calls setsid itself), and the launcher
  reaps it when it exits; if the launcher is killed, shims are reparented and live on;
- a daemon holds one connection while it runs; the launcher exits once no daemon is
  connected and no shim is left (a restarted daemon reconnects to the same launcher);
- `retire` (the daemon runs newer code) stops accepting; it still reaps until empty.

Protocol (JSON lines, cri_py.shim.protocol): hello, spawn {task_dir} (the answer
carries a pidfd of the new shim via SCM_RIGHTS), retire.
"""

from __future__ import annotations

import _signal
import gc
import os
import selectors
import signal
import socket
import sys
TYPE_CHECKING = False  # typing costs every shim memory; checkers know this name

from cri_py.shim import protocol as p
from cri_py.shim import shim as shim_mod
from cri_py.shim import linux
from cri_py.shim.linux import set_process_name

if TYPE_CHECKING:
    from typing import Any

PROCESS_NAME = "cri-py-launcher"
IDLE_EXIT_SECONDS = 60.0  # nobody connected and no shims: do not linger forever


class Launcher:
    """The launcher's state and loop."""

    def __init__(self, socket_path: str, version: str) -> None:
        self.socket_path = socket_path
        self.version = version
        self.sel = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self._inode = 0
        self.clients: dict[socket.socket, p.LineBuffer] = {}
        self.children: set[int] = set()
        self._wakeup = (-1, -1)
        self.was_used = False  # a fresh launcher waits (up to IDLE_EXIT_SECONDS) for a daemon

    def run(self) -> int:
        """Listen, announce readiness on stdout, serve until idle."""
        set_process_name(PROCESS_NAME)
        if self.other_launcher_alive():
            print(f"a launcher already serves {self.socket_path}", file=sys.stderr)
            return 3
        self.listener = shim_mod.bind_listener(self.socket_path)
        self._inode = os.stat(self.socket_path).st_ino
        self.install_signals()
        self.sel.register(self.listener, selectors.EVENT_READ, self.on_accept)
        self.sel.register(self._wakeup[0], selectors.EVENT_READ, self.on_wakeup)
        os.write(1, f"ready {os.getpid()}\n".encode())
        os.dup2(2, 1)  # the daemon's pipe is done with; never write to it again
        gc.freeze()  # everything imported so far stays untouched by collections in shims
        while True:
            idle = not self.clients and not self.children
            events = self.sel.select(IDLE_EXIT_SECONDS if idle else None)
            if not events and idle:
                break
            for key, _ in events:
                try:
                    key.data(key.fileobj)
                except Exception:  # noqa: BLE001 - keep serving the other daemons/shims
                    shim_mod.log(shim_mod.format_exc())
            if not self.clients and not self.children and self.was_used:
                break
        self.stop_listening()
        return 0

    def other_launcher_alive(self) -> bool:
        """A live process already answers on our socket path."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with p.UnixPath(self.socket_path) as usable:
                sock.connect(usable)
            return True
        except OSError:
            return False
        finally:
            sock.close()

    def install_signals(self) -> None:
        """SIGCHLD through a wakeup pipe; terminal signals ignored."""
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self._wakeup = (r, w)
        signal.set_wakeup_fd(w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def stop_listening(self) -> None:
        """Close the listener; remove the socket file unless a successor replaced it."""
        if self.listener is None:
            return
        self.sel.unregister(self.listener)
        self.listener.close()
        self.listener = None
        try:
            if os.stat(self.socket_path).st_ino == self._inode:
                os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    # --- events -------------------------------------------------------------------

    def on_accept(self, listener: socket.socket) -> None:
        """A daemon connected."""
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            return
        sock.settimeout(shim_mod.SEND_TIMEOUT)
        self.clients[sock] = p.LineBuffer()
        self.was_used = True
        self.sel.register(sock, selectors.EVENT_READ, self.on_client)

    def on_client(self, sock: socket.socket) -> None:
        """Requests from a daemon, answered one by one."""
        try:
            data = sock.recv(65536)
            requests = self.clients[sock].feed(data) if data else None
        except (OSError, p.ProtocolError):
            requests = None
        if requests is None:
            self.drop(sock)
            return
        for request in requests:
            if sock not in self.clients:
                return
            self.handle(sock, request)

    def drop(self, sock: socket.socket) -> None:
        """A daemon went away."""
        if self.clients.pop(sock, None) is not None:
            self.sel.unregister(sock)
            sock.close()

    def handle(self, sock: socket.socket, request: dict[str, Any]) -> None:
        """Run one request and answer it."""
        op = request.get("op")
        fds: list[int] = []
        if op == "hello":
            reply = p.ok(pid=os.getpid(), version=self.version, children=len(self.children))
        elif op == "spawn":
            try:
                pid, pidfd = self.spawn(str(request["task_dir"]))
                reply, fds = p.ok(pid=pid), [pidfd]
            except Exception as exc:  # noqa: BLE001 - report, do not die
                reply = p.error(p.INTERNAL, f"launcher could not start a shim: {exc!r}")
        elif op == "retire":
            self.stop_listening()
            reply = p.ok(children=len(self.children))
        else:
            reply = p.error(p.INVALID_ARGUMENT, f"unknown op {op!r}")
        try:
            socket.send_fds(sock, [p.encode(reply)], fds) if fds else sock.sendall(p.encode(reply))
        except OSError:
            self.drop(sock)
        finally:
            for fd in fds:
                os.close(fd)

    def on_wakeup(self, fd: int) -> None:
        """Reap every shim that exited."""
        linux.drain(fd)
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)

    # --- spawning -----------------------------------------------------------------

    def spawn(self, task_dir: str) -> tuple[int, int]:
        """Fork a shim for `task_dir`; its socket listens before we answer.

        The pidfd is opened before we can possibly reap the child, so the daemon gets
        a handle that can never point at a recycled pid.
        """
        listener = shim_mod.bind_listener(os.path.join(task_dir, p.SHIM_SOCKET))
        try:
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                self.become_shim(task_dir, listener)  # never returns
        finally:
            listener.close()
        self.children.add(pid)
        return pid, os.pidfd_open(pid)

    def become_shim(self, task_dir: str, listener: socket.socket) -> None:
        """In the forked child: shed the launcher's fds and signals, run the shim."""
        code = 70
        try:
            _signal.set_wakeup_fd(-1)
            _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
            for sock in list(self.clients):
                sock.close()
            if self.listener is not None:
                self.listener.close()
            self.sel.close()
            os.close(self._wakeup[0])
            os.close(self._wakeup[1])
            os.setsid()
            code = shim_mod.run(task_dir, listener)
        except BaseException:  # noqa: BLE001 - a child must never return into the launcher
            shim_mod.log(shim_mod.format_exc())
        finally:
            try:
                sys.stderr.flush()
                sys.stdout.flush()
            finally:
                os._exit(code)


def main(argv: list[str]) -> int:
    """`... launcher --socket PATH --version V`."""
    path = version = ""
    args = iter(argv)
    for arg in args:
        if arg == "--socket":
            path = next(args)
        elif arg == "--version":
            version = next(args)
        else:
            print(f"cri-py shim launcher: unknown argument {arg!r}", file=sys.stderr)
            return 2
    if not path:
        print("usage: launcher --socket PATH [--version V]", file=sys.stderr)
        return 2
    return Launcher(path, version).run()
