"""Pod sandboxes: create, stop, remove, status, and recovery after a restart.

Creation is a sequence of steps (record, netns, CNI ADD, files, shm, rootfs, pause),
and the record is saved after each, saying what exists. Undo is one idempotent
teardown driven by that record, shared by a failed RunPodSandbox, RemovePodSandbox
and a daemon that starts again after being killed mid-creation: nothing leaks,
whichever way a sandbox ends.

The kubelet retries RunPodSandbox with the same pod and attempt after its deadline
passes. The first call keeps working when its client goes away, and a retry for the
same name waits for it and returns its sandbox instead of failing "name reserved";
while the first caller is still waiting, a second call is a genuine duplicate and
gets ALREADY_EXISTS.
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cri_py.config import Config
from cri_py.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from cri_py.image.images import ImageManager, ImageRecord
from cri_py.metrics.registry import cni_duration, timed
from cri_py.network.cni import Cni, CniRequest
from cri_py.network.conf import NetworkConfigSource, NetworkNotReady
from cri_py.network.netns import create_netns, remove_netns
from cri_py.runtime import mount
from cri_py.runtime.tasks import TaskManager, TaskSpec
from cri_py.sandbox.files import pod_hostname, write_sandbox_files
from cri_py.sandbox.model import CREATING, NODE, NOTREADY, READY, Sandbox, SandboxConfig
from cri_py.sandbox.spec import pause_spec
from cri_py.store import NameRegistrar, Store
from cri_py.atomicfile import atomic_write

log = logging.getLogger(__name__)

SHM_SIZE = 64 * 1024 * 1024
STOP_TIMEOUT = 10.0

ContainerHook = Callable[[str], Awaitable[None]]


@dataclass
class _Creation:
    """A RunPodSandbox in progress, and whether its caller has given up on it."""

    task: asyncio.Task[str]
    orphaned: bool = False


class _StepTimer:
    """Milliseconds per step of a pod start, for the debug log (where did 100 ms go?)."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self._steps: list[str] = []

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self._steps.append(f"{name} {(now - self._last) * 1000:.1f}ms")
        self._last = now

    def __str__(self) -> str:
        return ", ".join(self._steps)


def validate(cfg: SandboxConfig) -> None:
    """The CRI requires metadata name, namespace and uid."""
    for field_name in ("name", "namespace", "uid"):
        if not getattr(cfg, field_name):
            raise InvalidArgument(f"sandbox config metadata.{field_name} is required")
    if cfg.attempt < 0:
        raise InvalidArgument("sandbox config metadata.attempt must not be negative")
    if cfg.run_as_group is not None and cfg.run_as_user is None:
        raise InvalidArgument("sandbox run_as_group is set without run_as_user")
    for mapping in cfg.port_mappings:
        if mapping.protocol not in ("tcp", "udp", "sctp"):
            raise InvalidArgument(f"port mapping protocol {mapping.protocol!r} is not tcp, udp or sctp")
        if not 0 < mapping.container_port < 65536 or not 0 <= mapping.host_port < 65536:
            raise InvalidArgument(f"port mapping {mapping.container_port}->{mapping.host_port} is out of range")


class SandboxManager:
    """Owns sandbox records and the resources each one holds."""

    def __init__(
        self,
        config: Config,
        store: Store,
        images: ImageManager,
        tasks: TaskManager,
        cni: Cni,
        networks: NetworkConfigSource,
    ) -> None:
        self.config = config
        self.store = store
        self.images = images
        self.tasks = tasks
        self.cni = cni
        self.networks = networks
        self.sandboxes: dict[str, Sandbox] = {}
        self.names = NameRegistrar("sandbox")
        self._locks: dict[str, asyncio.Lock] = {}
        self._creating: dict[str, _Creation] = {}
        self._adoptable: set[str] = set()  # names whose creator left before it finished
        # set by the container service: stop / remove every container of a sandbox
        self.stop_containers: ContainerHook | None = None
        self.remove_containers: ContainerHook | None = None
        # set by the container service: a lifecycle event of the pod itself
        self.notify: Callable[[str, Sandbox], None] = lambda kind, sandbox: None

    # --- paths -------------------------------------------------------------------

    def _state_dir(self, sandbox_id: str) -> str:
        return os.path.join(self.config.state, "sandboxes", sandbox_id)

    def _root_dir(self, sandbox_id: str) -> str:
        return os.path.join(self.config.root, "sandboxes", sandbox_id)

    def _netns_path(self, sandbox_id: str) -> str:
        return os.path.join(self.config.state, "netns", sandbox_id)

    def lock(self, sandbox_id: str) -> asyncio.Lock:
        return self._locks.setdefault(sandbox_id, asyncio.Lock())

    # --- lookup ------------------------------------------------------------------

    def get(self, sandbox_id: str) -> Sandbox:
        """A sandbox by full id or unique id prefix (as crictl passes them)."""
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox is not None:
            return sandbox
        matches = [s for key, s in self.sandboxes.items() if sandbox_id and key.startswith(sandbox_id)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise InvalidArgument(f"sandbox id prefix {sandbox_id!r} is ambiguous")
        raise NotFound(f"sandbox {sandbox_id!r} not found")

    def find(self, sandbox_id: str) -> Sandbox | None:
        try:
            return self.get(sandbox_id)
        except NotFound:
            return None

    def list(self) -> list[Sandbox]:
        return [s for s in self.sandboxes.values() if s.state != CREATING]

    async def _save(self, sandbox: Sandbox) -> None:
        await self.store.sandboxes.put(sandbox.id, sandbox.to_dict())

    # --- run ---------------------------------------------------------------------

    async def run(self, cfg: SandboxConfig, handler: str) -> str:
        """RunPodSandbox: a READY sandbox's id, or an error with nothing left behind."""
        validate(cfg)
        if self.config.handler(handler) is None:
            raise InvalidArgument(f"no runtime handler {handler!r} is configured")
        name = cfg.full_name
        creation = self._creating.get(name)
        if creation is not None:
            if not creation.orphaned:
                raise AlreadyExists(f"sandbox name {name!r} is being created by another request")
            creation.orphaned = False  # this caller takes it over
            return await self._await_creation(name, creation)
        holder = self.names.holder(name)
        if holder is not None:
            if name in self._adoptable and holder in self.sandboxes:
                self._adoptable.discard(name)
                return holder
            raise AlreadyExists(f"sandbox name {name!r} is reserved for {holder}")
        sandbox = Sandbox(id=secrets.token_hex(32), config=cfg, runtime_handler=handler, created_at_ns=time.time_ns())
        self.names.reserve(name, sandbox.id)
        creation = _Creation(asyncio.create_task(self._create(sandbox)))
        self._creating[name] = creation
        creation.task.add_done_callback(lambda task: self._creation_done(name, creation))
        return await self._await_creation(name, creation)

    async def _await_creation(self, name: str, creation: _Creation) -> str:
        try:
            return await asyncio.shield(creation.task)
        except asyncio.CancelledError:
            if not creation.task.done():
                creation.orphaned = True  # the client went away; the work goes on
            raise

    def _creation_done(self, name: str, creation: _Creation) -> None:
        self._creating.pop(name, None)
        if creation.orphaned and not creation.task.cancelled() and creation.task.exception() is None:
            self._adoptable.add(name)

    async def _create(self, sandbox: Sandbox) -> str:
        self.sandboxes[sandbox.id] = sandbox
        try:
            async with self.lock(sandbox.id):
                await self._build(sandbox)
        except BaseException as exc:
            log.info("RunPodSandbox %s failed, rolling back: %s", sandbox.config.full_name, exc)
            await asyncio.shield(self._discard(sandbox))
            raise
        return sandbox.id

    async def _build(self, sandbox: Sandbox) -> None:
        cfg = sandbox.config
        steps = _StepTimer()
        network = None if cfg.host_network else self._network()
        self._plan(sandbox, network.name if network else "")
        # the intent, naming every path this creation may make: a crash from here on
        # is undone at start by the same teardown, so one record write suffices
        await self._save(sandbox)
        image = await self._sandbox_image()
        sandbox.image_id = image.id
        steps.mark("record+image")
        if network is not None:
            await asyncio.to_thread(create_netns, sandbox.netns_path)
            with timed(cni_duration, operation="ADD"):
                result = await self.cni.add(network, self._cni_request(sandbox))
            if result.ips:
                sandbox.ip, sandbox.additional_ips = result.ips[0], result.ips[1:]
            steps.mark("network")
        await asyncio.to_thread(
            write_sandbox_files, sandbox.files_dir, pod_hostname(cfg.hostname, cfg.host_network), cfg.dns
        )
        if sandbox.shm_path:
            os.makedirs(sandbox.shm_path, exist_ok=True)
            mount.mount_tmpfs(sandbox.shm_path, SHM_SIZE)
        await self._mount_rootfs(sandbox, image)
        steps.mark("files+mounts")
        await self._start_pause(sandbox, image)
        steps.mark("pause")
        sandbox.state = READY
        await self._save(sandbox)
        steps.mark("ready")
        self.notify("CREATED", sandbox)
        self.notify("STARTED", sandbox)
        log.debug("sandbox %s (%s) started: %s", sandbox.id[:12], cfg.full_name, steps)

    def _plan(self, sandbox: Sandbox, network_name: str) -> None:
        """Fill in every path the sandbox will use; they derive from its id alone."""
        state_dir = self._state_dir(sandbox.id)
        if network_name:
            sandbox.netns_path = self._netns_path(sandbox.id)
            sandbox.cni_network = network_name
        if sandbox.config.ipc_mode != NODE:
            sandbox.shm_path = os.path.join(state_dir, "shm")
        sandbox.rootfs_path = os.path.join(state_dir, "rootfs")
        sandbox.bundle = os.path.join(state_dir, "bundle")
        sandbox.files_dir = self._root_dir(sandbox.id)

    def _network(self) -> Any:
        """The pod network to join now; a node without one cannot start pods."""
        try:
            return self.networks.get()
        except NetworkNotReady as exc:
            raise FailedPrecondition(f"network is not ready: {exc}") from None

    async def _sandbox_image(self) -> ImageRecord:
        """The pause image, pulled when absent (and pinned: the kubelet must not GC it)."""
        name = self.config.image.sandbox_image
        image = self.images.resolve(name)
        if image is None:
            log.info("sandbox image %s is not present, pulling it", name)
            image = await self.images.pull(name)
        return image

    def _cni_request(self, sandbox: Sandbox) -> CniRequest:
        cfg = sandbox.config
        capabilities: dict[str, Any] = {
            "portMappings": [
                {"hostPort": p.host_port, "containerPort": p.container_port, "protocol": p.protocol, "hostIP": p.host_ip}
                for p in cfg.port_mappings
                if p.host_port > 0
            ],
        }
        if cfg.dns is not None:
            capabilities["dns"] = {"servers": cfg.dns.servers, "searches": cfg.dns.searches, "options": cfg.dns.options}
        if cfg.cgroup_parent:
            capabilities["cgroupPath"] = cfg.cgroup_parent
        bandwidth = _bandwidth(cfg.annotations)
        if bandwidth:
            capabilities["bandwidth"] = bandwidth
        return CniRequest(
            container_id=sandbox.id,
            netns=sandbox.netns_path,
            args={
                "K8S_POD_NAMESPACE": cfg.namespace,
                "K8S_POD_NAME": cfg.name,
                "K8S_POD_INFRA_CONTAINER_ID": sandbox.id,
                "K8S_POD_UID": cfg.uid,
            },
            capability_args=capabilities,
        )

    async def _mount_rootfs(self, sandbox: Sandbox, image: ImageRecord) -> None:
        state_dir = self._state_dir(sandbox.id)
        upper, work = os.path.join(state_dir, "upper"), os.path.join(state_dir, "work")
        for path in (sandbox.rootfs_path, upper, work):
            os.makedirs(path, exist_ok=True)
        lowers = [self.images.snapshots.path(chain_id) for chain_id in reversed(image.chain_ids)]
        mount.mount_overlay(lowers, upper, work, sandbox.rootfs_path)

    async def _start_pause(self, sandbox: Sandbox, image: ImageRecord) -> None:
        runtime_config = image.config.get("config") or {}
        args = list(runtime_config.get("Entrypoint") or []) + list(runtime_config.get("Cmd") or [])
        if not args:
            raise FailedPrecondition(f"sandbox image {self.config.image.sandbox_image} has no entrypoint")
        spec = pause_spec(
            sandbox, sandbox.rootfs_path, args, list(runtime_config.get("Env") or []),
            str(runtime_config.get("User") or ""), self.config.runtime.cgroup_driver,
        )
        os.makedirs(sandbox.bundle, exist_ok=True)
        atomic_write(os.path.join(sandbox.bundle, "config.json"), json.dumps(spec).encode(), 0o644)
        handler = self.config.handler(sandbox.runtime_handler)
        assert handler is not None  # checked in run()
        task_spec = TaskSpec(
            id=sandbox.id,
            bundle=sandbox.bundle,
            runtime_binary=handler.binary or self.config.runtime.runc,
            runtime_root=handler.root,
            runtime_args=list(handler.extra_args),
            systemd_cgroup=self.config.runtime.cgroup_driver == "systemd",
            start=True,
        )
        state = await self.tasks.create(task_spec)
        sandbox.pid = state.pid

    # --- stop and remove -----------------------------------------------------------

    async def stop(self, sandbox_id: str) -> None:
        """StopPodSandbox: containers, pause, network and shm go; the record stays.

        Stopping an absent sandbox succeeds, as the CRI requires of Stop calls."""
        sandbox = self.find(sandbox_id)
        if sandbox is None or sandbox.state == CREATING:
            return
        async with self.lock(sandbox.id):
            if self.stop_containers is not None:
                await self.stop_containers(sandbox.id)
            await self._stop_pause(sandbox)
            await self._teardown_network(sandbox)
            if sandbox.shm_path:
                await asyncio.to_thread(mount.unmount, sandbox.shm_path, True)
            if sandbox.state != NOTREADY:
                sandbox.state = NOTREADY
                await self._save(sandbox)
                self.notify("STOPPED", sandbox)

    async def _stop_pause(self, sandbox: Sandbox) -> None:
        """The pause holds no state worth a graceful stop: SIGKILL, wait, delete the task."""
        try:
            await self.tasks.kill(sandbox.id, signal.SIGKILL)
            await self.tasks.wait(sandbox.id, timeout=STOP_TIMEOUT)
        except NotFound:
            pass
        await self.tasks.delete(sandbox.id)

    async def _teardown_network(self, sandbox: Sandbox) -> None:
        """CNI DEL from the cached result (works after a restart and with the netns gone)."""
        if sandbox.cni_network or sandbox.netns_path:
            with timed(cni_duration, operation="DEL"):
                await self.cni.delete(self._current_network(sandbox), self._cni_request(sandbox))
        if sandbox.netns_path:
            await asyncio.to_thread(remove_netns, sandbox.netns_path)

    def _current_network(self, sandbox: Sandbox) -> Any:
        """The network config to DEL with when no cached one exists (the cache wins)."""
        try:
            network = self.networks.get()
        except NetworkNotReady:
            return None
        return network if network.name == sandbox.cni_network else None

    async def remove(self, sandbox_id: str) -> None:
        """RemovePodSandbox: stop if needed, remove containers, everything goes."""
        sandbox = self.find(sandbox_id)
        if sandbox is None or sandbox.state == CREATING:
            return  # absent: success, as the CRI requires (a creating one is its creator's)
        await self.stop(sandbox.id)
        async with self.lock(sandbox.id):
            if self.remove_containers is not None:
                await self.remove_containers(sandbox.id)
            await self._discard(sandbox)
            self.notify("DELETED", sandbox)

    async def _discard(self, sandbox: Sandbox) -> None:
        """Undo everything the record says exists; every step tolerates absence."""
        await self.tasks.delete(sandbox.id)
        await self._teardown_network(sandbox)
        for path in (sandbox.rootfs_path, sandbox.shm_path):
            if path:
                await asyncio.to_thread(mount.unmount, path, True)
        await asyncio.to_thread(shutil.rmtree, self._state_dir(sandbox.id), True)
        await asyncio.to_thread(shutil.rmtree, self._root_dir(sandbox.id), True)
        await self.store.sandboxes.delete(sandbox.id)
        self.sandboxes.pop(sandbox.id, None)
        self._locks.pop(sandbox.id, None)
        if self.names.holder(sandbox.config.full_name) == sandbox.id:
            self.names.release(sandbox.config.full_name)

    # --- events and recovery -------------------------------------------------------

    async def pause_exited(self, sandbox_id: str) -> None:
        """The pause process died: the pod is no longer ready."""
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox is not None and sandbox.state == READY:
            sandbox.state = NOTREADY
            await self._save(sandbox)
            self.notify("STOPPED", sandbox)

    async def load_records(self) -> list[Sandbox]:
        """Rebuild from the store; returns sandboxes whose creation a crash interrupted."""
        interrupted = []
        for data in await self.store.sandboxes.all():
            sandbox = Sandbox.from_dict(data)
            self.sandboxes[sandbox.id] = sandbox
            if sandbox.state == CREATING:
                interrupted.append(sandbox)
                continue
            self.names.reserve(sandbox.config.full_name, sandbox.id)
        return interrupted

    async def reconcile(self, interrupted: list[Sandbox], live_tasks: dict[str, str]) -> None:
        """After the task manager restored shims: finish the cleanup of interrupted
        creations (CNI DEL included) and mark pods whose pause is gone NOTREADY.

        `live_tasks` maps task id to status as the task manager restored them.
        """
        for sandbox in interrupted:
            log.info("cleaning up sandbox %s, whose creation was interrupted", sandbox.id)
            await self._discard(sandbox)
        for sandbox in list(self.sandboxes.values()):
            if sandbox.state == READY and live_tasks.get(sandbox.id) != "running":
                await self.pause_exited(sandbox.id)

    # --- status ----------------------------------------------------------------------

    def info(self, sandbox: Sandbox) -> dict[str, Any]:
        """The verbose status info, as JSON-ready data."""
        cached = self.cni.cached(sandbox.id) if sandbox.netns_path else None
        return {
            "pid": sandbox.pid,
            "netnsPath": sandbox.netns_path,
            "runtimeHandler": sandbox.runtime_handler,
            "image": sandbox.image_id,
            "bundle": sandbox.bundle,
            "cniResult": cached.raw if cached is not None else None,
            "config": sandbox.to_dict()["config"],
        }


def _bandwidth(annotations: dict[str, str]) -> dict[str, int]:
    """kubernetes.io/ingress-bandwidth and egress-bandwidth annotations, in bits per second."""
    out: dict[str, int] = {}
    for key, rate, burst in (("ingress", "ingressRate", "ingressBurst"), ("egress", "egressRate", "egressBurst")):
        value = annotations.get(f"kubernetes.io/{key}-bandwidth")
        if value:
            bits = _parse_quantity(value)
            out[rate] = bits
            out[burst] = 2**31 - 1  # the kubelet's dockershim used "no burst limit"
    return out


def _parse_quantity(value: str) -> int:
    """A Kubernetes quantity like `10M` or `1Gi` as an integer."""
    suffixes = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix in sorted(suffixes, key=len, reverse=True):
        if value.endswith(suffix):
            number = value[: -len(suffix)]
            try:
                return int(float(number) * suffixes[suffix])
            except ValueError:
                break
    try:
        return int(value)
    except ValueError:
        raise InvalidArgument(f"bandwidth annotation {value!r} is not a quantity") from None
