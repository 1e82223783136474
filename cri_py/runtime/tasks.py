"""The task manager: the daemon's side of the shims (containerd's runtime v2, smaller).

A task is one runc container run by one shim. Its directory <state>/tasks/<id>/ holds
everything both sides need to find each other again after a daemon restart: the spec
(task.json), the shim's socket, pid and log, and the files the shim leaves when things
end (exit.json, create-error.json). The daemon keeps no state a restart would lose:
restore() rebuilds the in-memory view from those directories and the live shims.

Exits: for every task the manager keeps one `wait` request open on the shim's
socket; the answer is the exit. on_exit is called once per exit, and an
`exit.delivered` marker records that, so a restarted daemon delivers exactly the exits
that happened while it was down (at least once: a crash between the callback and the
marker delivers again).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from cri_py import errors
from cri_py.metrics.registry import shim_starts
from cri_py.runtime import shim_client
from cri_py.runtime.launch import ExecSpawner, LauncherSpawner, ShimHandle, Spawner
from cri_py.runtime.runc import Runc, RuncError, RuncNotFound
from cri_py.runtime.shim_client import ShimConnection, ShimGone
from cri_py.shim import protocol as p

log = logging.getLogger(__name__)

CREATED, RUNNING, STOPPED, UNKNOWN = p.CREATED, p.RUNNING, p.STOPPED, p.UNKNOWN

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
DELETE_TIMEOUT = 60.0  # runc delete --force waits up to 10 s for a stubborn init itself
SHIM_EXIT_TIMEOUT = 10.0


@dataclass
class TaskSpec:
    """What to run: a prepared bundle and how to run and log it."""

    id: str
    bundle: str  # has config.json; rootfs path inside it as the spec says
    runtime_binary: str = "runc"
    runtime_root: str = ""  # runc --root (empty = runc's default /run/runc)
    runtime_args: list[str] = field(default_factory=list)
    log_path: str = ""  # container stdout/stderr destination ("" = discard)
    tty: bool = False
    stdin: bool = False
    stdin_once: bool = False
    systemd_cgroup: bool = False  # runc --systemd-cgroup (cgroup_driver = "systemd")
    start: bool = False  # create and start in one `runc run --detach` (a pause: nothing to wait for)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TaskSpec":
        """From task.json, ignoring keys a newer daemon may have added."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


@dataclass
class TaskState:
    """Where a task is in its life, as the shim (or its files) tell it."""

    id: str
    pid: int
    status: str  # "created" | "running" | "stopped" | "unknown"
    exit_code: int | None = None
    started_at_ns: int = 0
    exited_at_ns: int = 0

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> "TaskState":
        """From a shim answer or exit.json."""
        return cls(
            id=str(raw["id"]),
            pid=int(raw.get("pid") or 0),
            status=str(raw.get("status") or UNKNOWN),
            exit_code=raw.get("exit_code"),
            started_at_ns=int(raw.get("started_at_ns") or 0),
            exited_at_ns=int(raw.get("exited_at_ns") or 0),
        )


OnExit = Callable[[TaskState], "Awaitable[None] | None"]


@dataclass
class _Task:
    """The manager's record of one task."""

    id: str
    dir: str
    spec: TaskSpec
    done: asyncio.Event = field(default_factory=asyncio.Event)  # exited, or shim lost
    final: TaskState | None = None  # the stopped state, once known
    delivered: bool = False
    watcher: asyncio.Task[None] | None = None
    shim: ShimHandle | None = None  # kept while we are the shim's parent (exec mode)


class TaskManager:
    """Creates, starts, signals, watches and deletes tasks through their shims."""

    def __init__(
        self,
        state_dir: str,
        on_exit: OnExit | None = None,
        use_launcher: bool = True,
    ) -> None:
        self.state_dir = state_dir
        self.tasks_dir = os.path.join(state_dir, "tasks")
        self._on_exit = on_exit
        self._spawner: Spawner = LauncherSpawner(state_dir) if use_launcher else ExecSpawner()
        self._tasks: dict[str, _Task] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    # --- public API -----------------------------------------------------------------

    @property
    def launcher_pid(self) -> int:
        """The shim launcher this manager talks to (0: none yet, or exec mode)."""
        return getattr(self._spawner, "launcher_pid", 0)

    async def create(self, spec: TaskSpec, timeout: float = 60) -> TaskState:
        """Start a shim that runs `runc create`; returns once the task is created.

        On any failure (runc's error, timeout, cancellation) nothing is left: the shim
        is gone, `runc delete --force` has run and the task dir is removed.
        """
        _check_id(spec.id)
        async with self._lock(spec.id):
            task_dir = self._dir(spec.id)
            if spec.id in self._tasks or os.path.lexists(task_dir):
                raise errors.AlreadyExists(f"task {spec.id} already exists")
            os.makedirs(self.tasks_dir, mode=0o700, exist_ok=True)
            os.mkdir(task_dir, 0o700)
            handle: ShimHandle | None = None
            try:
                p.write_json_atomic(os.path.join(task_dir, p.TASK_FILE), dataclasses.asdict(spec))
                handle = await self._spawner.spawn(task_dir)
                state = await asyncio.wait_for(self._created_state(spec, task_dir), timeout)
            except BaseException as exc:
                shim_starts.labels("failure").inc()
                # a reported create error means the shim is exiting by itself; after a
                # timeout or cancellation it may still be inside runc create: kill it
                stuck = not isinstance(exc, errors.CriError)
                await asyncio.shield(self._undo_create(spec, task_dir, handle, stuck))
                if isinstance(exc, asyncio.TimeoutError):
                    raise asyncio.TimeoutError(f"creating task {spec.id} took over {timeout}s") from None
                raise
            shim_starts.labels("success").inc()
            task = _Task(spec.id, task_dir, spec)
            if handle.popen is not None:
                task.shim = handle  # exec mode: we must collect it when it exits
            else:
                handle.close()
            self._tasks[spec.id] = task
            task.watcher = asyncio.create_task(self._watch(task), name=f"task-exit-{spec.id}")
            return state

    async def start(self, id: str) -> TaskState:
        """`runc start` through the shim; the state right after."""
        task = self._require(id)
        async with self._lock(id):
            try:
                reply = await shim_client.call(task.dir, {"op": "start"})
            except ShimGone:
                raise errors.Internal(f"the shim of task {id} is gone; cannot start it") from None
        return TaskState.from_wire(reply["state"])

    async def kill(self, id: str, signal: int, all: bool = False) -> None:
        """Signal the task's init (or all its processes); a stopped task is fine."""
        task = self._require(id)
        try:
            await shim_client.call(task.dir, {"op": "kill", "signal": int(signal), "all": all})
            return
        except ShimGone:
            pass
        if p.read_json(os.path.join(task.dir, p.EXIT_FILE)) is not None:
            return
        try:  # no shim: signal the orphaned container directly
            await _runc_for(task.spec).kill(id, signal, all)
        except RuncNotFound:
            pass
        except RuncError as exc:
            if not exc.not_running:
                raise

    async def reopen_log(self, id: str) -> None:
        """The shim closes and reopens log_path (after the kubelet rotated the file)."""
        task = self._require(id)
        try:
            await shim_client.call(task.dir, {"op": "reopen_log"})
        except ShimGone:
            raise errors.FailedPrecondition(f"task {id} has no running shim to reopen its log") from None

    def task_dir(self, id: str) -> str:
        """Where a known task's shim listens (exec goes straight to it)."""
        return self._require(id).dir

    async def attach(
        self, id: str, *, stdin: bool, stdout: bool, stderr: bool
    ) -> shim_client.AttachStream:
        """A live copy of the task's output and a way into its stdin, from its shim."""
        task = self._require(id)
        try:
            return await shim_client.attach(task.dir, stdin=stdin, stdout=stdout, stderr=stderr)
        except ShimGone:
            raise errors.FailedPrecondition(f"task {id} has no running shim to attach to") from None

    async def wait(self, id: str, timeout: float | None = None) -> TaskState:
        """Until the task has stopped; its final state (TimeoutError after `timeout`)."""
        task = self._require(id)
        if task.final is None:
            await asyncio.wait_for(task.done.wait(), timeout)
        if task.final is None:
            raise errors.Internal(f"the shim of task {id} died; its exit is unknown")
        return task.final

    async def state(self, id: str) -> TaskState:
        """The task's current state; NotFound if there is no such task."""
        task = self._require(id)
        if task.final is not None:
            return task.final
        try:
            reply = await shim_client.call(task.dir, {"op": "state"})
        except ShimGone:
            return await self._offline_state(task)
        return TaskState.from_wire(reply["state"])

    async def delete(self, id: str) -> None:
        """Kill if needed, `runc delete`, let the shim exit, remove the dir. Idempotent."""
        async with self._lock(id):
            task = self._tasks.get(id)
            task_dir = self._dir(id)
            if not os.path.isdir(task_dir):
                self._forget(id)
                return
            spec = task.spec if task else _read_spec(task_dir)
            await self._delete_through_shim(id, task_dir, spec, task)
            if task is not None and task.watcher is not None:
                await _settle(task.watcher, 5.0)  # lets it deliver the exit delete caused
            shutil.rmtree(task_dir, ignore_errors=True)
            self._forget(id)

    async def restore(self) -> list[TaskState]:
        """After a daemon restart: adopt every task dir; never kills anything.

        Live shims get their exit watched again; exits that happened while the daemon
        was down (exit.json without exit.delivered) reach on_exit before this returns.
        A dead shim's task is stopped if exit.json says so, else "unknown".
        """
        states: list[TaskState] = []
        if not os.path.isdir(self.tasks_dir):
            return states
        for name in sorted(os.listdir(self.tasks_dir)):
            if name in self._tasks:
                states.append(await self.state(name))
                continue
            task_dir = self._dir(name)
            spec = _read_spec(task_dir)
            if spec is None:
                log.warning("task dir %s has no readable task.json; left alone", task_dir)
                continue
            task = _Task(name, task_dir, spec)
            task.delivered = os.path.exists(os.path.join(task_dir, p.EXIT_DELIVERED_FILE))
            self._tasks[name] = task
            try:
                reply = await shim_client.call(task_dir, {"op": "state"}, timeout=10)
                state = TaskState.from_wire(reply["state"])
            except (ShimGone, errors.CriError) as exc:
                log.info("task %s: shim unreachable (%s); reading its files", name, exc)
                state = await self._offline_state(task)
                if state.status != STOPPED:
                    task.done.set()  # nobody will ever report this exit: waiters learn it
            if state.status == STOPPED:
                await self._deliver(task, state)
            elif not task.done.is_set():
                task.watcher = asyncio.create_task(self._watch(task), name=f"task-exit-{name}")
            states.append(state)
        return states

    async def close(self) -> None:
        """Daemon shutdown: stop watching and drop connections; shims keep running."""
        watchers = [t.watcher for t in self._tasks.values() if t.watcher is not None]
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        for task in self._tasks.values():
            if task.shim is not None:
                task.shim.close()
        self._tasks.clear()
        await self._spawner.close()

    # --- create -------------------------------------------------------------------

    async def _created_state(self, spec: TaskSpec, task_dir: str) -> TaskState:
        """The shim serves only after `runc create` has finished: its first answer is
        the created task; hanging up instead means create failed."""
        try:
            reply = await shim_client.call(task_dir, {"op": "state"}, timeout=None)
        except ShimGone:
            raise _create_error(spec, task_dir) from None
        return TaskState.from_wire(reply["state"])

    async def _undo_create(
        self, spec: TaskSpec, task_dir: str, handle: ShimHandle | None, stuck: bool
    ) -> None:
        """Leave nothing of a failed create: shim, runc state, task dir."""
        try:
            if handle is not None:
                if stuck or not await handle.wait_gone(SHIM_EXIT_TIMEOUT):
                    handle.kill()
                    await handle.wait_gone(SHIM_EXIT_TIMEOUT)
                handle.close()
            try:
                await _runc_for(spec).delete(spec.id, force=True)
            except RuncError as exc:
                log.warning("cleanup of failed task %s: %s", spec.id, exc)
        finally:
            shutil.rmtree(task_dir, ignore_errors=True)

    # --- delete -------------------------------------------------------------------

    async def _delete_through_shim(
        self, id: str, task_dir: str, spec: TaskSpec | None, task: _Task | None
    ) -> None:
        """Ask the shim to delete and wait for it to exit; without a shim, runc directly."""
        handle: ShimHandle | None = None
        try:
            async with ShimConnection(task_dir) as conn:
                # the shim is alive while we hold this connection and have not asked it
                # to delete, so the pid it reports is safe to open a pidfd on
                reply = await conn.request({"op": "state"})
                handle = ShimHandle.open(int(reply["state"].get("shim_pid") or 0))
                if handle is not None and task is not None and task.shim is not None:
                    handle.popen = task.shim.popen
                await conn.request({"op": "delete"}, timeout=DELETE_TIMEOUT)
            if handle is not None and not await handle.wait_gone(SHIM_EXIT_TIMEOUT):
                log.warning("shim %d of task %s did not exit after delete; killing it", handle.pid, id)
                handle.kill()
                await handle.wait_gone(SHIM_EXIT_TIMEOUT)
        except ShimGone:
            if spec is not None:
                await _runc_for(spec).delete(id, force=True)
        finally:
            if handle is not None:
                handle.close()
            if task is not None and task.shim is not None:
                task.shim.close()
                if task.shim.popen is not None:
                    task.shim.popen.poll()

    # --- exits --------------------------------------------------------------------

    async def _watch(self, task: _Task) -> None:
        """Hold a `wait` open on the shim; its answer is the exit to deliver."""
        try:
            reply = await shim_client.call(task.dir, {"op": "wait"}, timeout=None)
            state = TaskState.from_wire(reply["state"])
        except (ShimGone, errors.CriError) as exc:
            if task.shim is not None and task.shim.popen is not None:
                task.shim.popen.poll()
            state = await self._offline_state(task)
            if state.status != STOPPED:
                if os.path.isdir(task.dir):
                    log.warning("task %s: shim lost (%s); container state unknown", task.id, exc)
                task.done.set()
                return
        await self._deliver(task, state)

    async def _deliver(self, task: _Task, state: TaskState) -> None:
        """Record the final state, wake waiters, call on_exit once, mark it delivered."""
        if task.final is None:
            task.final = state
        task.done.set()
        if task.delivered:
            return
        task.delivered = True
        if self._on_exit is not None:
            try:
                result = self._on_exit(state)
                if inspect.isawaitable(result):
                    await result
            except Exception:  # noqa: BLE001 - one bad callback must not stop exit tracking
                log.exception("on_exit for task %s failed", task.id)
        try:
            with open(os.path.join(task.dir, p.EXIT_DELIVERED_FILE), "w"):
                pass
        except FileNotFoundError:  # deleted meanwhile
            pass

    async def _offline_state(self, task: _Task) -> TaskState:
        """No shim to ask: exit.json if it wrote one, else "unknown" with runc's pid."""
        exited = p.read_json(os.path.join(task.dir, p.EXIT_FILE))
        if isinstance(exited, dict):
            return TaskState.from_wire({**exited, "id": task.id, "status": STOPPED})
        try:
            runc_state = await _runc_for(task.spec).state(task.id)
        except RuncError as exc:
            log.info("task %s: no shim, no exit file, runc: %s", task.id, exc.detail)
            return TaskState(task.id, 0, UNKNOWN)
        log.info("task %s: no shim, no exit file, runc says %s", task.id, runc_state.get("status"))
        return TaskState(task.id, int(runc_state.get("pid") or 0), UNKNOWN)

    # --- helpers ------------------------------------------------------------------

    def _dir(self, id: str) -> str:
        _check_id(id)
        return os.path.join(self.tasks_dir, id)

    def _require(self, id: str) -> _Task:
        task = self._tasks.get(id)
        if task is None:
            raise errors.NotFound(f"task {id} not found")
        return task

    def _lock(self, id: str) -> asyncio.Lock:
        return self._locks.setdefault(id, asyncio.Lock())

    def _forget(self, id: str) -> None:
        self._tasks.pop(id, None)
        self._locks.pop(id, None)


def _check_id(id: str) -> None:
    """Ids become directory and runc names: no separators, no dot-dot, bounded."""
    if not isinstance(id, str) or not _ID.match(id):
        raise errors.InvalidArgument(f"invalid task id {id!r}")


def _runc_for(spec: TaskSpec) -> Runc:
    """The runc a task was created with (its handler's binary, root and flags)."""
    return Runc(spec.runtime_binary, spec.runtime_root, spec.runtime_args, spec.systemd_cgroup)


def _read_spec(task_dir: str) -> TaskSpec | None:
    raw = p.read_json(os.path.join(task_dir, p.TASK_FILE))
    if not isinstance(raw, dict):
        return None
    try:
        return TaskSpec.from_dict(raw)
    except TypeError:
        return None


def _create_error(spec: TaskSpec, task_dir: str) -> errors.CriError:
    """Why the shim exited without creating: its create-error.json, else its log."""
    report = p.read_json(os.path.join(task_dir, p.CREATE_ERROR_FILE))
    if isinstance(report, dict):
        argv = report.get("argv")
        if isinstance(argv, list):
            return RuncError([str(a) for a in argv], report.get("exit_status"), str(report.get("detail", "")))
        return errors.Internal(f"task {spec.id}: {report.get('error')}")
    tail = _tail(os.path.join(task_dir, p.SHIM_LOG))
    return errors.Internal(f"the shim of task {spec.id} exited before creating it; shim.log: {tail}")


def _tail(path: str, size: int = 2000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - size))
            return fh.read().decode(errors="replace").strip() or "(empty)"
    except OSError:
        return "(none)"


async def _settle(task: asyncio.Task[None], timeout: float) -> None:
    """Give a watcher a moment to finish on its own, then cancel it."""
    if task.done():
        return
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout)
    except asyncio.TimeoutError:
        task.cancel()
    except Exception:  # noqa: BLE001 - a watcher's failure is already logged
        pass
