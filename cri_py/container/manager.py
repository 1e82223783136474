"""Containers: create, start, stop, remove, status, exec, resources, logs, recovery.

A container's record is saved first with a `creating` mark that names the paths it
will use; a failed CreateContainer and a daemon killed mid-way are undone by the same
idempotent teardown. Output never passes through here: the container's shim writes
the kubelet-format log file itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import signal
import time
from collections.abc import Callable
from typing import Any

from cri_py import events as events_mod
from cri_py.config import Config
from cri_py.container import spec as spec_builder
from cri_py.container.model import CREATED, EXITED, RUNNING, UNKNOWN, Container, ContainerConfig, absolute_log_path
from cri_py.container.status import exit_reason, oom_kills, parse_signal, termination_message
from cri_py.container.users import effective_user
from cri_py.errors import FailedPrecondition, InvalidArgument, NotFound
from cri_py.events import EventBus
from cri_py.image.images import ImageManager, ImageRecord
from cri_py.metrics.cgroups import memory_cgroup_dir
from cri_py.metrics.registry import log_bytes
from cri_py.metrics.registry import oom_kills as oom_kills_total
from cri_py.runtime import mount
from cri_py.runtime.exec import ExecResult, exec_sync
from cri_py.runtime.runc import Runc
from cri_py.runtime.shim_client import AttachStream
from cri_py.runtime.tasks import TaskManager, TaskSpec, TaskState
from cri_py.sandbox.manager import SandboxManager
from cri_py.sandbox.model import READY, Sandbox
from cri_py.store import NameRegistrar, Store
from cri_py.atomicfile import atomic_write

log = logging.getLogger(__name__)

DEFAULT_STOP_TIMEOUT = 30.0
KILL_WAIT = 10.0


class ContainerManager:
    """Owns container records and the rootfs, bundle and task of each."""

    def __init__(
        self,
        config: Config,
        store: Store,
        images: ImageManager,
        sandboxes: SandboxManager,
        tasks: TaskManager,
        events: EventBus | None = None,
    ) -> None:
        self.config = config
        self.events = events or EventBus()
        self.store = store
        self.images = images
        self.sandboxes = sandboxes
        self.tasks = tasks
        self.containers: dict[str, Container] = {}
        self.names = NameRegistrar("container")
        self._locks: dict[str, asyncio.Lock] = {}
        self._memory_cgroups: dict[str, str] = {}
        self._creating: set[str] = set()
        self._exiting: set[str] = set()  # exits being recorded right now
        self.forget_stats: Callable[[str], None] = lambda key: None  # set by the stats edge
        self._names: dict[str, str] = {}  # id -> reserved name
        self._warned_oom_clamp = False
        sandboxes.stop_containers = self.stop_all
        sandboxes.remove_containers = self.remove_all
        images.user_of = self.user_of_image
        sandboxes.notify = self.publish_sandbox

    def publish(self, kind: str, container: Container) -> None:
        """An event with the pod's sandbox and containers as they are now."""
        sandbox = self.sandboxes.find(container.sandbox_id)
        pod_containers = [c for c in self.list() if c.sandbox_id == container.sandbox_id]
        if kind == events_mod.DELETED and container not in pod_containers:
            pod_containers.append(container)
        self.events.publish(kind, container.id, time.time_ns(), sandbox, pod_containers)

    def publish_sandbox(self, kind: str, sandbox: Sandbox) -> None:
        """A pod's own event: container_id is the sandbox's, as containerd sends it."""
        pod_containers = [c for c in self.list() if c.sandbox_id == sandbox.id]
        self.events.publish(kind, sandbox.id, time.time_ns(), sandbox, pod_containers)

    def user_of_image(self, image_id: str) -> str | None:
        """A container whose rootfs or image volume uses the image (removing it would break it)."""
        for container in self.containers.values():
            if container.image_id == image_id or any(m.image == image_id for m in container.config.mounts):
                return container.id
        return None

    # --- paths and lookup ------------------------------------------------------------

    def state_dir(self, container_id: str) -> str:
        return os.path.join(self.config.state, "containers", container_id)

    def _root_dir(self, container_id: str) -> str:
        return os.path.join(self.config.root, "containers", container_id)

    @staticmethod
    def _full_name(cfg: ContainerConfig, sandbox: Sandbox) -> str:
        """The reserved name: one container of a name per pod and attempt."""
        pod = sandbox.config
        return f"{cfg.name}_{pod.name}_{pod.namespace}_{pod.uid}_{cfg.attempt}"

    def upper_dir(self, container_id: str) -> str:
        """The container's writable layer (overlay upper dir)."""
        return os.path.join(self._root_dir(container_id), "upper")

    def lock(self, container_id: str) -> asyncio.Lock:
        return self._locks.setdefault(container_id, asyncio.Lock())

    def get(self, container_id: str) -> Container:
        """A container by id or unique id prefix; ones still being created are not visible."""
        container = self.containers.get(container_id)
        if container is None and container_id:
            matches = [c for key, c in self.containers.items() if key.startswith(container_id)]
            if len(matches) > 1:
                raise InvalidArgument(f"container id prefix {container_id!r} is ambiguous")
            container = matches[0] if matches else None
        if container is None or container.id in self._creating:
            raise NotFound(f"container {container_id!r} not found")
        return container

    def list(self) -> list[Container]:
        return [c for c in self.containers.values() if c.id not in self._creating]

    def image_name(self, container: Container) -> str:
        """What status shows as the image: its first tag, as containerd does."""
        image = self.images.resolve(container.image_id) if container.image_id else None
        if image is not None and image.repo_tags:
            return image.repo_tags[0]
        return container.config.image

    async def _save(self, container: Container) -> None:
        data = container.to_dict()
        if container.id in self._creating:
            data["creating"] = True
        await self.store.containers.put(container.id, data)

    def runc_for(self, sandbox: Sandbox) -> Runc:
        handler = self.config.handler(sandbox.runtime_handler)
        if handler is None:
            raise FailedPrecondition(f"runtime handler {sandbox.runtime_handler!r} is no longer configured")
        return Runc(
            handler.binary or self.config.runtime.runc,
            handler.root or None,
            list(handler.extra_args),
            self.config.runtime.cgroup_driver == "systemd",
        )

    # --- create ------------------------------------------------------------------------

    async def create(self, sandbox_id: str, cfg: ContainerConfig) -> str:
        """CreateContainer: a CREATED container's id, or an error with nothing left behind."""
        if not cfg.name:
            raise InvalidArgument("container config metadata.name is required")
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox.state != READY:
            raise FailedPrecondition(f"sandbox {sandbox.id} is not ready")
        if not cfg.image:
            raise InvalidArgument("container config has no image")
        image = self.images.resolve(cfg.image)
        if image is None:
            raise NotFound(f"image {cfg.image!r} not found")
        log_path = absolute_log_path(sandbox.config.log_directory, cfg.log_path)
        for m in cfg.mounts:
            if not os.path.isabs(m.container_path):
                raise InvalidArgument(f"mount container path {m.container_path!r} must be absolute")
        name = self._full_name(cfg, sandbox)
        container = Container(
            id=secrets.token_hex(32),
            sandbox_id=sandbox.id,
            config=cfg,
            image_id=image.id,
            image_ref=image.repo_digests[0] if image.repo_digests else image.id,
            state=CREATED,
            created_at_ns=time.time_ns(),
            log_path=log_path,
        )
        container.rootfs_path = os.path.join(self.state_dir(container.id), "rootfs")
        container.bundle = os.path.join(self.state_dir(container.id), "bundle")
        self.names.reserve(name, container.id)
        self._names[container.id] = name
        self._creating.add(container.id)
        self.containers[container.id] = container
        try:
            async with self.lock(container.id):
                await self._save(container)
                await self._build(container, sandbox, image)
                self._creating.discard(container.id)
                await self._save(container)
            self.publish(events_mod.CREATED, container)
        except BaseException as exc:
            log.info("CreateContainer %s failed, rolling back: %s", name, exc)
            await asyncio.shield(self._discard(container))
            raise
        return container.id

    async def _build(self, container: Container, sandbox: Sandbox, image: ImageRecord) -> None:
        cfg = container.config
        upper, work = self.upper_dir(container.id), os.path.join(self._root_dir(container.id), "work")
        for path in (container.rootfs_path, upper, work, container.bundle):
            os.makedirs(path, exist_ok=True)
        lowers = [self.images.snapshots.path(chain_id) for chain_id in reversed(image.chain_ids)]
        await asyncio.to_thread(mount.mount_overlay, lowers, upper, work, container.rootfs_path)
        runtime_config = image.config.get("config") or {}
        sc = cfg.security
        container.user = await asyncio.to_thread(
            effective_user,
            container.rootfs_path,
            str(runtime_config.get("User") or ""),
            sc.run_as_user,
            sc.run_as_group,
            sc.run_as_username,
            list(sc.supplemental_groups),
            sc.supplemental_groups_policy,
        )
        target_pid = self._target_pid(container) if sc.pid_mode == "target" else 0
        image_mounts = await self._mount_image_volumes(container)
        spec = spec_builder.container_spec(
            container, sandbox, image.config, container.rootfs_path, container.user,
            self.config.runtime.cgroup_driver, sandbox_pid=sandbox.pid, target_pid=target_pid,
            image_mounts=image_mounts,
        )
        self._note_oom_clamp(cfg.resources.oom_score_adj)
        for m in cfg.mounts:
            if m.host_path and not m.image and not os.path.exists(m.host_path):
                os.makedirs(m.host_path, exist_ok=True)  # as containerd and CRI-O do; the kubelet relies on it
        if container.log_path:
            os.makedirs(os.path.dirname(container.log_path), exist_ok=True)
        atomic_write(os.path.join(container.bundle, "config.json"), json.dumps(spec).encode(), 0o644)
        handler = self.config.handler(sandbox.runtime_handler)
        if handler is None:
            raise FailedPrecondition(f"runtime handler {sandbox.runtime_handler!r} is no longer configured")
        await self.tasks.create(
            TaskSpec(
                id=container.id,
                bundle=container.bundle,
                runtime_binary=handler.binary or self.config.runtime.runc,
                runtime_root=handler.root,
                runtime_args=list(handler.extra_args),
                log_path=container.log_path,
                tty=cfg.tty,
                stdin=cfg.stdin,
                stdin_once=cfg.stdin_once,
                systemd_cgroup=self.config.runtime.cgroup_driver == "systemd",
            )
        )

    def _image_volume_dir(self, container_id: str) -> str:
        return os.path.join(self.state_dir(container_id), "image-volumes")

    async def _mount_image_volumes(self, container: Container) -> dict[str, str]:
        """Mount each image volume's layers read-only; container path -> host dir.

        The mount then names the image by its ID (digest), which ContainerStatus shows.
        """
        out: dict[str, str] = {}
        for index, volume in enumerate(container.config.mounts):
            if not volume.image:
                continue
            record = self.images.resolve(volume.image)
            if record is None:
                raise NotFound(f"image {volume.image!r} of the volume at {volume.container_path} not found")
            target = os.path.join(self._image_volume_dir(container.id), str(index))
            os.makedirs(target, exist_ok=True)
            lowers = [self.images.snapshots.path(c) for c in reversed(record.chain_ids)]
            await asyncio.to_thread(mount.mount_readonly_layers, lowers, target)
            volume.image = record.id
            out[volume.container_path] = target
        return out

    def _target_pid(self, container: Container) -> int:
        target = self.get(container.config.security.target_id)
        if target.state != RUNNING or not target.pid:
            raise FailedPrecondition(f"target container {target.id} is not running")
        return target.pid

    def _note_oom_clamp(self, wanted: int) -> None:
        """Say once that oom_score_adj requests below our own are raised to it."""
        value, clamped = spec_builder.oom_score_adj(wanted)
        if clamped and not self._warned_oom_clamp:
            self._warned_oom_clamp = True
            log.warning(
                "oom_score_adj %d is below cri-py's own; using %d (lowering it needs CAP_SYS_RESOURCE)", wanted, value
            )

    # --- start, stop, exits ---------------------------------------------------------------

    async def start(self, container_id: str) -> None:
        container = self.get(container_id)
        async with self.lock(container.id):
            if container.state != CREATED:
                raise FailedPrecondition(f"container {container.id} is {container.state}, not created")
            state = await self.tasks.start(container.id)
            container.pid = state.pid
            container.started_at_ns = state.started_at_ns or time.time_ns()
            self._memory_cgroups[container.id] = memory_cgroup_dir(state.pid)
            if container.state == CREATED:  # an instant exit may already have been recorded
                container.state = RUNNING
            # no store write: the shim knows it started (and when); a restarted daemon
            # reads RUNNING and started_at back from it in reconcile()
            self.publish(events_mod.STARTED, container)

    async def task_exited(self, state: TaskState) -> None:
        """A container's process ended: record code, time, reason and message.

        Everything is worked out first and assigned at once (no await in between), so
        a status read never sees EXITED without its reason and message, and two reports
        of one exit (the shim's, a stop's own wait) record it once.
        """
        container = self.containers.get(state.id)
        if container is None or container.state == EXITED or container.id in self._exiting:
            return
        self._exiting.add(container.id)
        try:
            cgroup = self._memory_cgroups.pop(container.id, "")
            oom = bool(cgroup) and oom_kills(cgroup) > 0
            exit_code = state.exit_code if state.exit_code is not None else 255
            host_paths = {m.container_path: m.host_path for m in container.config.mounts if m.host_path}
            message = await asyncio.to_thread(
                termination_message, container.config.annotations, host_paths, exit_code, container.log_path
            )
            container.exit_code = exit_code
            container.finished_at_ns = state.exited_at_ns or time.time_ns()
            container.started_at_ns = container.started_at_ns or state.started_at_ns
            container.reason = exit_reason(exit_code, oom)
            container.message = message
            container.state = EXITED
        finally:
            self._exiting.discard(container.id)
        if oom:
            oom_kills_total.inc()
        await self._save(container)
        self.publish(events_mod.STOPPED, container)

    def stop_signal(self, container: Container) -> int:
        """The config's stop signal, else the image's StopSignal, else SIGTERM."""
        if container.config.stop_signal:
            return parse_signal(container.config.stop_signal)
        image = self.images.resolve(container.image_id) if container.image_id else None
        runtime_config = (image.config.get("config") or {}) if image else {}
        return parse_signal(runtime_config.get("StopSignal"))

    async def stop(self, container_id: str, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """StopContainer: the stop signal, SIGKILL after `timeout`; stopping a stopped or an
        absent one is fine (the CRI requires Stop calls to be idempotent)."""
        try:
            container = self.get(container_id)
        except NotFound:
            return
        async with self.lock(container.id):
            await self._stop(container, timeout)

    async def _stop(self, container: Container, timeout: float) -> None:
        if container.state not in (RUNNING, UNKNOWN):
            return
        if timeout > 0:
            try:
                await self.tasks.kill(container.id, self.stop_signal(container))
                await self.tasks.wait(container.id, timeout=timeout)
            except (asyncio.TimeoutError, TimeoutError):
                log.info("container %s did not stop within %ss; killing it", container.id[:12], timeout)
            except NotFound:
                pass
        try:
            await self.tasks.kill(container.id, signal.SIGKILL, all=True)
            final = await self.tasks.wait(container.id, timeout=KILL_WAIT)
        except NotFound:
            return
        await self.task_exited(final)

    async def stop_all(self, sandbox_id: str) -> None:
        """Every container of a sandbox (StopPodSandbox): no grace, as the kubelet already gave it."""
        await asyncio.gather(*(self.stop(c.id, 0) for c in self.list() if c.sandbox_id == sandbox_id))

    # --- remove ------------------------------------------------------------------------

    async def remove(self, container_id: str) -> None:
        """RemoveContainer: kills it if running; everything but the log file goes; absent is fine."""
        try:
            container = self.get(container_id)
        except NotFound:
            return
        async with self.lock(container.id):
            await self._stop(container, 0)
            await self._discard(container)

    async def remove_all(self, sandbox_id: str) -> None:
        await asyncio.gather(*(self.remove(c.id) for c in self.list() if c.sandbox_id == sandbox_id))

    async def _discard(self, container: Container) -> None:
        """Undo everything a container may have; each step tolerates absence."""
        created = container.id not in self._creating
        log_bytes.retire(container.id)
        await self.tasks.delete(container.id)
        if container.rootfs_path:
            await asyncio.to_thread(mount.unmount, container.rootfs_path, True)
        volumes = self._image_volume_dir(container.id)
        for name in os.listdir(volumes) if os.path.isdir(volumes) else []:
            await asyncio.to_thread(mount.unmount, os.path.join(volumes, name), True)
        await asyncio.to_thread(shutil.rmtree, self.state_dir(container.id), True)
        await asyncio.to_thread(shutil.rmtree, self._root_dir(container.id), True)
        await self.store.containers.delete(container.id)
        self.containers.pop(container.id, None)
        self._creating.discard(container.id)
        self._locks.pop(container.id, None)
        self._memory_cgroups.pop(container.id, None)
        self.forget_stats(container.id)
        name = self._names.pop(container.id, "")
        if name and self.names.holder(name) == container.id:
            self.names.release(name)
        if created:
            self.publish(events_mod.DELETED, container)

    # --- exec, resources, logs ------------------------------------------------------------

    async def exec_sync(self, container_id: str, cmd: list[str], timeout: float) -> ExecResult:
        """ExecSync: the command in the container's namespaces with its user and env."""
        if not cmd:
            raise InvalidArgument("exec needs a command")
        container = self.running(container_id)
        process = self.exec_process(container, cmd, tty=False)
        return await exec_sync(self.tasks.task_dir(container.id), process, timeout, self.exec_pid_file(container))

    def exec_process(self, container: Container, cmd: list[str], tty: bool) -> dict[str, Any]:
        """An exec'd process runs as the container's own (user, env, caps, seccomp), with `cmd`."""
        with open(os.path.join(container.bundle, "config.json"), "rb") as fh:
            process = json.load(fh)["process"]
        process = dict(process, args=list(cmd), terminal=tty)
        process.pop("consoleSize", None)
        return process

    def exec_pid_file(self, container: Container) -> str:
        """A fresh path for runc's --pid-file of one exec."""
        return os.path.join(self.state_dir(container.id), f"exec-{secrets.token_hex(6)}.pid")

    def running(self, container_id: str) -> Container:
        """The container, which must be running (exec and attach need a live process)."""
        container = self.get(container_id)
        if container.state != RUNNING:
            raise FailedPrecondition(f"container {container.id} is not running")
        return container

    async def attach(self, container_id: str, *, stdin: bool, stdout: bool, stderr: bool) -> AttachStream:
        """A stream of the running container's own stdio, through its shim."""
        container = self.running(container_id)
        return await self.tasks.attach(container.id, stdin=stdin, stdout=stdout, stderr=stderr)

    async def update_resources(self, container_id: str, resources: Any) -> None:
        """UpdateContainerResources: runc update, then the status reports the new values."""
        container = self.get(container_id)
        async with self.lock(container.id):
            if container.state not in (CREATED, RUNNING):
                raise FailedPrecondition(f"container {container.id} is {container.state}")
            sandbox = self.sandboxes.get(container.sandbox_id)
            linux = spec_builder.linux_resources(
                resources, spec_builder.kernel_hugepage_sizes(), spec_builder.is_cgroup_v2()
            )
            linux.pop("devices", None)
            await self.runc_for(sandbox).update(container.id, linux)
            container.config.resources = resources
            await self._save(container)

    async def reopen_log(self, container_id: str) -> None:
        container = self.running(container_id)
        await self.tasks.reopen_log(container.id)

    # --- recovery ---------------------------------------------------------------------------

    async def load(self) -> list[Container]:
        """Read records; returns those whose creation a crash interrupted (to discard)."""
        interrupted = []
        for data in await self.store.containers.all():
            container = Container.from_dict(data)
            self.containers[container.id] = container
            if data.get("creating"):
                self._creating.add(container.id)
                interrupted.append(container)
                continue
            pod = self.sandboxes.find(container.sandbox_id)
            if pod is not None:
                name = self._full_name(container.config, pod)
                self.names.reserve(name, container.id)
                self._names[container.id] = name
            if container.state == RUNNING and container.pid:
                self._memory_cgroups[container.id] = memory_cgroup_dir(container.pid)
        return interrupted

    async def reconcile(self, interrupted: list[Container], restored: dict[str, TaskState]) -> None:
        """After the task manager restored shims: finish interrupted creations, fix states."""
        for container in interrupted:
            log.info("cleaning up container %s, whose creation was interrupted", container.id)
            await self._discard(container)
        for container in list(self.containers.values()):
            task = restored.get(container.id)
            if container.state == CREATED and task is not None and task.status == "running":
                container.state, container.pid = RUNNING, task.pid
                container.started_at_ns = task.started_at_ns or container.started_at_ns
                self._memory_cgroups[container.id] = memory_cgroup_dir(task.pid)
                await self._save(container)
            elif container.state in (RUNNING, CREATED) and task is not None and task.status == "stopped":
                await self.task_exited(task)
            elif container.state in (RUNNING, CREATED) and (task is None or task.status == "unknown"):
                container.state = UNKNOWN if task is not None else EXITED
                if task is None:
                    container.reason, container.exit_code = "Error", 255
                    container.finished_at_ns = container.finished_at_ns or time.time_ns()
                await self._save(container)
