"""The CRI RuntimeService edge: translates CRI messages to the services below.

RPCs that are not built yet are inherited from the generated servicer, which raises
NotImplementedError; the server's interceptor answers those UNIMPLEMENTED, never a
fake success.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import AsyncIterator

import grpc
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc as cri_grpc

from cri_py import __version__
from cri_py.config import Config
from cri_py.network.conf import NetworkConfigSource, NetworkNotReady
from cri_py.container import cri as container_cri
from cri_py.container.manager import ContainerManager
from cri_py.container.model import RUNNING, Container
from cri_py.events import CREATED, DELETED, STARTED, STOPPED, Event
from cri_py.image.images import mountpoint_of
from cri_py.metrics import cri as stats_cri
from cri_py.metrics.stats import ContainerSample, PodSample, StatsCollector
from cri_py.sandbox import cri as sandbox_cri
from cri_py.sandbox.manager import SandboxManager
from cri_py.sandbox.model import READY, Sandbox
from cri_py.network.podcidr import PodCidrs
from cri_py.streaming.server import StreamingServer
from cri_py.streaming.tokens import StreamRequest
from cri_py.errors import FailedPrecondition, InvalidArgument

EVENT_TYPES = {
    CREATED: cri.CONTAINER_CREATED_EVENT,
    STARTED: cri.CONTAINER_STARTED_EVENT,
    STOPPED: cri.CONTAINER_STOPPED_EVENT,
    DELETED: cri.CONTAINER_DELETED_EVENT,
}

CRI_VERSION = "0.1.0"  # the version string every CRI runtime reports; the kubelet checks it
RUNTIME_NAME = "cri-py"
RUNTIME_API_VERSION = "v1"


def _condition(kind: str, problem: str | None, reason: str) -> cri.RuntimeCondition:
    """A condition that is true when there is no problem to report."""
    if problem is None:
        return cri.RuntimeCondition(type=kind, status=True)
    return cri.RuntimeCondition(type=kind, status=False, reason=reason, message=problem)


class RuntimeHealth:
    """Answers the two readiness questions the kubelet asks through Status."""

    def __init__(self, config: Config, networks: NetworkConfigSource) -> None:
        self.config = config
        self.networks = networks

    def runtime_problem(self) -> str | None:
        """Why containers cannot run now, or None."""
        if shutil.which(self.config.runtime.runc) is None:
            return f"OCI runtime {self.config.runtime.runc!r} not found"
        for name, handler in self.config.runtime.handlers.items():
            binary = handler.binary or self.config.runtime.runc
            if shutil.which(binary) is None:
                return f"runtime handler {name!r}: binary {binary!r} not found"
        if not os.access(self.config.state, os.W_OK):
            return f"state directory {self.config.state} is not writable"
        return None

    def network_problem(self) -> str | None:
        """Why pods cannot get a network now, or None."""
        try:
            self.networks.get()
        except NetworkNotReady as exc:
            return str(exc)
        return None


class RuntimeService(cri_grpc.RuntimeServiceServicer):
    """RuntimeService: the runtime's identity and health; pods and containers follow."""

    def __init__(
        self,
        config: Config,
        health: RuntimeHealth,
        sandboxes: SandboxManager,
        containers: ContainerManager,
        streaming: StreamingServer | None = None,
    ) -> None:
        self.config = config
        self.streaming = streaming
        self.health = health
        self.pod_cidrs = PodCidrs(config.root, config.cni.conf_dir, config.cni.conf_template)
        self.sandboxes = sandboxes
        self.containers = containers
        self.stats = StatsCollector()
        self._mountpoint = mountpoint_of(config.root)
        containers.forget_stats = self.stats.forget

    async def Version(self, request: cri.VersionRequest, context: grpc.aio.ServicerContext) -> cri.VersionResponse:
        return cri.VersionResponse(
            version=CRI_VERSION,
            runtime_name=RUNTIME_NAME,
            runtime_version=__version__,
            runtime_api_version=RUNTIME_API_VERSION,
        )

    async def Status(self, request: cri.StatusRequest, context: grpc.aio.ServicerContext) -> cri.StatusResponse:
        status = cri.RuntimeStatus(
            conditions=[
                _condition("RuntimeReady", self.health.runtime_problem(), "RuntimeNotReady"),
                _condition("NetworkReady", self.health.network_problem(), "NetworkPluginNotReady"),
            ]
        )
        # runc >= 1.1 on a kernel with mount_setattr applies "rro"; user namespaces are not built
        features = cri.RuntimeHandlerFeatures(recursive_read_only_mounts=True, user_namespaces=False)
        handlers = [cri.RuntimeHandler(name=name, features=features) for name in sorted(self.config.runtime.handlers)]
        # the kubelet looks up the default handler under the empty name
        handlers.insert(0, cri.RuntimeHandler(name="", features=features))
        response = cri.StatusResponse(
            status=status,
            runtime_handlers=handlers,
            features=cri.RuntimeFeatures(supplemental_groups_policy=True),
        )
        if request.verbose:
            response.info["config"] = json.dumps(self.config.to_dict())
            response.info["podCIDRs"] = json.dumps(self.pod_cidrs.cidrs)
        return response

    async def UpdateRuntimeConfig(
        self, request: cri.UpdateRuntimeConfigRequest, context: grpc.aio.ServicerContext
    ) -> cri.UpdateRuntimeConfigResponse:
        self.pod_cidrs.update(request.runtime_config.network_config.pod_cidr)
        return cri.UpdateRuntimeConfigResponse()

    async def RuntimeConfig(
        self, request: cri.RuntimeConfigRequest, context: grpc.aio.ServicerContext
    ) -> cri.RuntimeConfigResponse:
        driver = cri.SYSTEMD if self.config.runtime.cgroup_driver == "systemd" else cri.CGROUPFS
        return cri.RuntimeConfigResponse(linux=cri.LinuxRuntimeConfiguration(cgroup_driver=driver))

    # --- pod sandboxes ---------------------------------------------------------------

    async def RunPodSandbox(
        self, request: cri.RunPodSandboxRequest, context: grpc.aio.ServicerContext
    ) -> cri.RunPodSandboxResponse:
        config = sandbox_cri.sandbox_config(request.config)
        sandbox_id = await self.sandboxes.run(config, request.runtime_handler)
        return cri.RunPodSandboxResponse(pod_sandbox_id=sandbox_id)

    async def StopPodSandbox(
        self, request: cri.StopPodSandboxRequest, context: grpc.aio.ServicerContext
    ) -> cri.StopPodSandboxResponse:
        await self.sandboxes.stop(request.pod_sandbox_id)
        return cri.StopPodSandboxResponse()

    async def RemovePodSandbox(
        self, request: cri.RemovePodSandboxRequest, context: grpc.aio.ServicerContext
    ) -> cri.RemovePodSandboxResponse:
        sandbox = self.sandboxes.find(request.pod_sandbox_id)
        await self.sandboxes.remove(request.pod_sandbox_id)
        if sandbox is not None:
            self.stats.forget(sandbox.id)
        return cri.RemovePodSandboxResponse()

    async def PodSandboxStatus(
        self, request: cri.PodSandboxStatusRequest, context: grpc.aio.ServicerContext
    ) -> cri.PodSandboxStatusResponse:
        sandbox = self.sandboxes.get(request.pod_sandbox_id)
        response = cri.PodSandboxStatusResponse(status=sandbox_cri.sandbox_status(sandbox), timestamp=time.time_ns())
        if request.verbose:
            response.info["info"] = json.dumps(self.sandboxes.info(sandbox))
        return response

    async def ListPodSandbox(
        self, request: cri.ListPodSandboxRequest, context: grpc.aio.ServicerContext
    ) -> cri.ListPodSandboxResponse:
        flt = request.filter
        items = [
            sandbox_cri.sandbox_message(s)
            for s in self.sandboxes.list()
            if not request.HasField("filter") or sandbox_cri.matches(s, flt)
        ]
        return cri.ListPodSandboxResponse(items=items)

    # --- containers --------------------------------------------------------------------

    async def CreateContainer(
        self, request: cri.CreateContainerRequest, context: grpc.aio.ServicerContext
    ) -> cri.CreateContainerResponse:
        config = container_cri.container_config(request.config)
        container_id = await self.containers.create(request.pod_sandbox_id, config)
        return cri.CreateContainerResponse(container_id=container_id)

    async def StartContainer(
        self, request: cri.StartContainerRequest, context: grpc.aio.ServicerContext
    ) -> cri.StartContainerResponse:
        await self.containers.start(request.container_id)
        return cri.StartContainerResponse()

    async def StopContainer(
        self, request: cri.StopContainerRequest, context: grpc.aio.ServicerContext
    ) -> cri.StopContainerResponse:
        await self.containers.stop(request.container_id, float(request.timeout))
        return cri.StopContainerResponse()

    async def RemoveContainer(
        self, request: cri.RemoveContainerRequest, context: grpc.aio.ServicerContext
    ) -> cri.RemoveContainerResponse:
        await self.containers.remove(request.container_id)
        return cri.RemoveContainerResponse()

    async def ListContainers(
        self, request: cri.ListContainersRequest, context: grpc.aio.ServicerContext
    ) -> cri.ListContainersResponse:
        has_filter = request.HasField("filter")
        items = [
            container_cri.container_message(c, self.containers.image_name(c))
            for c in self.containers.list()
            if not has_filter or container_cri.matches(c, request.filter)
        ]
        return cri.ListContainersResponse(containers=items)

    async def ContainerStatus(
        self, request: cri.ContainerStatusRequest, context: grpc.aio.ServicerContext
    ) -> cri.ContainerStatusResponse:
        container = self.containers.get(request.container_id)
        response = cri.ContainerStatusResponse(
            status=container_cri.container_status(container, self.containers.image_name(container))
        )
        if request.verbose:
            try:
                with open(os.path.join(container.bundle, "config.json"), encoding="utf-8") as fh:
                    runtime_spec = json.load(fh)
            except OSError:
                runtime_spec = None
            response.info["info"] = json.dumps(
                {"pid": container.pid, "sandboxID": container.sandbox_id, "runtimeSpec": runtime_spec}
            )
        return response

    async def UpdateContainerResources(
        self, request: cri.UpdateContainerResourcesRequest, context: grpc.aio.ServicerContext
    ) -> cri.UpdateContainerResourcesResponse:
        resources = container_cri.resources_from(request.linux)
        await self.containers.update_resources(request.container_id, resources)
        return cri.UpdateContainerResourcesResponse()

    async def ExecSync(self, request: cri.ExecSyncRequest, context: grpc.aio.ServicerContext) -> cri.ExecSyncResponse:
        result = await self.containers.exec_sync(request.container_id, list(request.cmd), float(request.timeout))
        if result.timed_out:
            raise asyncio.TimeoutError(f"command {list(request.cmd)} timed out after {request.timeout}s")
        return cri.ExecSyncResponse(stdout=result.stdout, stderr=result.stderr, exit_code=result.exit_code)

    def _streaming_server(self) -> StreamingServer:
        if self.streaming is None:
            raise FailedPrecondition("the streaming server is not running")
        return self.streaming

    @staticmethod
    def _check_streams(stdin: bool, stdout: bool, stderr: bool, tty: bool) -> None:
        """The kubelet's own rules for an exec or attach request."""
        if not (stdin or stdout or stderr):
            raise InvalidArgument("one of stdin, stdout and stderr must be set")
        if tty and stderr:
            raise InvalidArgument("tty and stderr cannot both be set")

    async def Exec(self, request: cri.ExecRequest, context: grpc.aio.ServicerContext) -> cri.ExecResponse:
        container = self.containers.running(request.container_id)
        if not request.cmd:
            raise InvalidArgument("exec needs a command")
        self._check_streams(request.stdin, request.stdout, request.stderr, request.tty)
        stream_request = StreamRequest(
            kind="exec",
            id=container.id,
            cmd=list(request.cmd),
            stdin=request.stdin,
            stdout=request.stdout,
            stderr=request.stderr,
            tty=request.tty,
        )
        return cri.ExecResponse(url=self._streaming_server().register(stream_request))

    async def Attach(self, request: cri.AttachRequest, context: grpc.aio.ServicerContext) -> cri.AttachResponse:
        container = self.containers.running(request.container_id)
        self._check_streams(request.stdin, request.stdout, request.stderr, request.tty)
        stream_request = StreamRequest(
            kind="attach",
            id=container.id,
            stdin=request.stdin,
            stdout=request.stdout,
            stderr=request.stderr,
            tty=request.tty,
        )
        return cri.AttachResponse(url=self._streaming_server().register(stream_request))

    async def PortForward(
        self, request: cri.PortForwardRequest, context: grpc.aio.ServicerContext
    ) -> cri.PortForwardResponse:
        sandbox = self.sandboxes.get(request.pod_sandbox_id)
        if sandbox.state != READY:
            raise FailedPrecondition(f"pod sandbox {sandbox.id} is not ready")
        for port in request.port:
            if not 0 < port <= 65535:
                raise InvalidArgument(f"invalid port {port}")
        stream_request = StreamRequest(kind="portforward", id=sandbox.id, ports=list(request.port))
        return cri.PortForwardResponse(url=self._streaming_server().register(stream_request))

    async def ReopenContainerLog(
        self, request: cri.ReopenContainerLogRequest, context: grpc.aio.ServicerContext
    ) -> cri.ReopenContainerLogResponse:
        await self.containers.reopen_log(request.container_id)
        return cri.ReopenContainerLogResponse()

    # --- events ---------------------------------------------------------------------

    async def GetContainerEvents(
        self, request: cri.GetEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cri.ContainerEventResponse]:
        subscription = self.containers.events.subscribe()
        try:
            while True:
                event = await subscription.next()
                yield self._event_message(event)
        finally:
            subscription.close()  # the stream's end (client gone included) ends the subscription

    def _event_message(self, event: Event) -> cri.ContainerEventResponse:
        response = cri.ContainerEventResponse(
            container_id=event.container_id,
            container_event_type=EVENT_TYPES[event.kind],
            created_at=event.created_at_ns,
            containers_statuses=[
                container_cri.container_status(c, self.containers.image_name(c)) for c in event.containers
            ],
        )
        if event.sandbox is not None:
            response.pod_sandbox_status.CopyFrom(sandbox_cri.sandbox_status(event.sandbox))
        return response

    # --- stats ------------------------------------------------------------------------

    def _raw_container_sample(self, container: Container) -> ContainerSample | None:
        """Blocking (cgroup files, a cached walk of the writable layer): run in a thread.
        Only a running container has a cgroup to read."""
        if container.state != RUNNING or not container.pid:
            return None
        return self.stats.container(container.id, container.pid, self.containers.upper_dir(container.id))

    def _raw_pod_sample(self, sandbox: Sandbox) -> PodSample | None:
        if sandbox.state != READY or not sandbox.pid:
            return None
        return self.stats.pod(sandbox.id, sandbox.pid, bool(sandbox.config.cgroup_parent), sandbox.netns_path)

    def _pod_containers(self, sandbox: Sandbox) -> list[Container]:
        return [c for c in self.containers.list() if c.sandbox_id == sandbox.id]

    def _container_sample(self, container: Container) -> cri.ContainerStats:
        return stats_cri.container_stats(container, self._raw_container_sample(container), self._mountpoint)

    def _sandbox_sample(self, sandbox: Sandbox) -> cri.PodSandboxStats:
        containers = [self._container_sample(c) for c in self._pod_containers(sandbox)]
        return stats_cri.sandbox_stats(sandbox, self._raw_pod_sample(sandbox), containers)

    def _sandbox_metrics(self, sandbox: Sandbox) -> cri.PodSandboxMetrics:
        containers = [
            (c, self._raw_container_sample(c), self.containers.image_name(c)) for c in self._pod_containers(sandbox)
        ]
        return stats_cri.pod_metrics(sandbox, self._raw_pod_sample(sandbox), containers)

    async def ListMetricDescriptors(
        self, request: cri.ListMetricDescriptorsRequest, context: grpc.aio.ServicerContext
    ) -> cri.ListMetricDescriptorsResponse:
        return cri.ListMetricDescriptorsResponse(descriptors=stats_cri.metric_descriptors())

    async def ListPodSandboxMetrics(
        self, request: cri.ListPodSandboxMetricsRequest, context: grpc.aio.ServicerContext
    ) -> cri.ListPodSandboxMetricsResponse:
        sandboxes = self.sandboxes.list()
        metrics = await asyncio.to_thread(lambda: [self._sandbox_metrics(s) for s in sandboxes])
        return cri.ListPodSandboxMetricsResponse(pod_metrics=metrics)

    async def ContainerStats(
        self, request: cri.ContainerStatsRequest, context: grpc.aio.ServicerContext
    ) -> cri.ContainerStatsResponse:
        container = self.containers.get(request.container_id)
        stats = await asyncio.to_thread(self._container_sample, container)
        return cri.ContainerStatsResponse(stats=stats)

    async def ListContainerStats(
        self, request: cri.ListContainerStatsRequest, context: grpc.aio.ServicerContext
    ) -> cri.ListContainerStatsResponse:
        chosen = [c for c in self.containers.list() if container_cri.matches(c, request.filter)]
        stats = await asyncio.to_thread(lambda: [self._container_sample(c) for c in chosen])
        return cri.ListContainerStatsResponse(stats=stats)

    async def PodSandboxStats(
        self, request: cri.PodSandboxStatsRequest, context: grpc.aio.ServicerContext
    ) -> cri.PodSandboxStatsResponse:
        sandbox = self.sandboxes.get(request.pod_sandbox_id)
        stats = await asyncio.to_thread(self._sandbox_sample, sandbox)
        return cri.PodSandboxStatsResponse(stats=stats)

    async def ListPodSandboxStats(
        self, request: cri.ListPodSandboxStatsRequest, context: grpc.aio.ServicerContext
    ) -> cri.ListPodSandboxStatsResponse:
        chosen = [s for s in self.sandboxes.list() if sandbox_cri.matches(s, request.filter)]
        stats = await asyncio.to_thread(lambda: [self._sandbox_sample(s) for s in chosen])
        return cri.ListPodSandboxStatsResponse(stats=stats)
