"""The gRPC server on the CRI unix socket, its interceptor, and the serve loop.

The interceptor is the one place where domain errors become gRPC codes, where every
call is logged with its duration and code, and where the request histogram is fed.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import signal
import socket
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from cri_api.v1 import api_pb2_grpc as cri_grpc

from cri_py import admin
from cri_py.config import Config
from cri_py.errors import grpc_code_for
from cri_py.image.images import ImageManager
from cri_py.image.service import ImageService
from cri_py.metrics.http import MetricsServer
from cri_py.events import EventBus
from cri_py.metrics.registry import grpc_request_duration, log_bytes, state_gauges
from cri_py.network.cni import Cni
from cri_py.network.conf import NetworkConfigSource
from cri_py.runtime.tasks import TaskManager, TaskState
from cri_py.container.manager import ContainerManager
from cri_py.sandbox.manager import SandboxManager
from cri_py.runtime_service import RuntimeHealth, RuntimeService
from cri_py.streaming.server import StreamingServer
from cri_py.store import Store

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 30.0


class ServerError(Exception):
    """The server cannot start; the message says why."""


def _short_method(full: str) -> str:
    """`/runtime.v1.RuntimeService/Version` -> `RuntimeService/Version`."""
    service, _, method = full.rpartition("/")
    return f"{service.rsplit('.', 1)[-1]}/{method}"


def _error_message(method: str, exc: BaseException) -> str:
    """What the client reads: ours for domain errors, a hint for unimplemented RPCs."""
    if isinstance(exc, NotImplementedError):
        return f"{method} is not implemented by cri-py yet"
    return str(exc) or type(exc).__name__


class CallObserver:
    """Times one call and records its outcome in the log and the histogram."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.start = time.perf_counter()

    def finish(self, code: grpc.StatusCode, exc: BaseException | None = None) -> None:
        elapsed = time.perf_counter() - self.start
        grpc_request_duration.labels(self.method, code.name).observe(elapsed)
        if code == grpc.StatusCode.INTERNAL:
            log.error("%s failed after %.3fs: %s", self.method, elapsed, exc, exc_info=exc)
        elif code != grpc.StatusCode.OK:
            log.info("%s -> %s after %.3fs: %s", self.method, code.name, elapsed, exc)
        else:
            log.debug("%s -> OK in %.3fs", self.method, elapsed)

    async def fail(self, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        """Record the failure and end the call with the mapped status (raises)."""
        code = grpc_code_for(exc)
        self.finish(code, exc)
        await context.abort(code, _error_message(self.method, exc))


def _wrap_unary(method: str, behavior: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        observer = CallObserver(method)
        try:
            response = behavior(request, context)
            if asyncio.iscoroutine(response):
                response = await response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # every failure becomes a status, mapped in one place
            await observer.fail(context, exc)
        observer.finish(grpc.StatusCode.OK)
        return response

    return handler


def _wrap_stream(method: str, behavior: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        observer = CallObserver(method)
        try:
            async for item in behavior(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            observer.finish(grpc.StatusCode.CANCELLED)
            raise
        except Exception as exc:
            await observer.fail(context, exc)
        observer.finish(grpc.StatusCode.OK)

    return handler


class ErrorMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Maps errors to codes, logs each call and observes its duration."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = _short_method(handler_call_details.method)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(method, _as_async_iter(handler.unary_stream)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # the CRI has no client-streaming RPCs


def _as_async_iter(behavior: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
    """Let one wrapper serve async generators and plain functions that raise."""

    async def iterate(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        result = behavior(request, context)
        if hasattr(result, "__aiter__"):
            async for item in result:
                yield item
        else:
            for item in result:
                yield item

    return iterate


# --- the unix socket --------------------------------------------------------------


def prepare_socket_path(path: str) -> None:
    """Create parent dirs; replace a stale socket, refuse a live one or a non-socket."""
    os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServerError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ServerError(f"cannot probe existing socket {path}: {exc}") from None
        log.info("replacing stale socket %s", path)
        os.unlink(path)
        return
    finally:
        probe.close()
    raise ServerError(f"another server is listening on {path}")


def secure_socket(path: str) -> None:
    """Only root (and root's group) may drive the runtime: 0660 root:root."""
    os.chown(path, 0, 0)
    os.chmod(path, 0o660)


# --- serving ----------------------------------------------------------------------


def lock_root(root: str) -> int:
    """Hold `<root>/cri-py.lock` for the daemon's life: one daemon per root.

    Two daemons on one root would each trust their own view of the store and
    delete each other's snapshots. The lock dies with the process, even on SIGKILL.
    """
    fd = os.open(os.path.join(root, "cri-py.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ServerError(f"another cri-py process is using root {root}") from None
    return fd


class CriServer:
    """The daemon: gRPC on the socket, metrics, and an orderly shutdown."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.networks = NetworkConfigSource(config.cni.conf_dir, config.cni.bin_dirs)
        self.metrics = MetricsServer(config.metrics.address)
        self.grpc: grpc.aio.Server | None = None
        self.store: Store | None = None
        self.tasks: TaskManager | None = None
        self.sandboxes: SandboxManager | None = None
        self.containers: ContainerManager | None = None
        self._lock_fd: int | None = None
        self.streaming: StreamingServer | None = None

    def _state_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Pods and containers by state, for the scrape (runs in the metrics thread: reads only)."""
        pods: dict[str, int] = {}
        containers: dict[str, int] = {}
        for sandbox in list(self.sandboxes.sandboxes.values()) if self.sandboxes else []:
            pods[sandbox.state] = pods.get(sandbox.state, 0) + 1
        for container in list(self.containers.containers.values()) if self.containers else []:
            containers[container.state] = containers.get(container.state, 0) + 1
        return pods, containers

    async def _on_exit(self, state: TaskState) -> None:
        """A task's init process exited: tell whoever owns that id."""
        if self.sandboxes is not None and state.id in self.sandboxes.sandboxes:
            await self.sandboxes.pause_exited(state.id)
        elif self.containers is not None and state.id in self.containers.containers:
            await self.containers.task_exited(state)

    def _make_dirs(self) -> None:
        os.makedirs(self.config.root, mode=0o711, exist_ok=True)
        os.makedirs(self.config.state, mode=0o711, exist_ok=True)

    async def start(self) -> None:
        """Bind everything; raise ServerError with a clear message when that fails."""
        self._make_dirs()
        self._lock_fd = lock_root(self.config.root)
        path = self.config.socket_path
        prepare_socket_path(path)
        self.store = Store(self.config.root)
        images = ImageManager(self.config, self.store)
        await images.load()
        self.tasks = TaskManager(self.config.state, on_exit=self._on_exit)
        log_bytes.tasks_dir = self.tasks.tasks_dir
        # under root, not state: after a reboot DEL still frees IPAM allocations on disk
        cni = Cni(self.config.cni.bin_dirs, os.path.join(self.config.root, "cni", "results"))
        self.sandboxes = SandboxManager(self.config, self.store, images, self.tasks, cni, self.networks)
        self.containers = ContainerManager(self.config, self.store, images, self.sandboxes, self.tasks, EventBus())
        state_gauges.counts = self._state_counts
        # records first, so exits the shims saw while we were down find their owners
        interrupted_sandboxes = await self.sandboxes.load_records()
        interrupted_containers = await self.containers.load()
        restored = {t.id: t for t in await self.tasks.restore()}
        await self.containers.reconcile(interrupted_containers, restored)
        await self.sandboxes.reconcile(interrupted_sandboxes, {k: t.status for k, t in restored.items()})
        try:
            self.metrics.start()
        except OSError as exc:
            raise ServerError(f"metrics.address {self.config.metrics.address}: {exc.strerror}") from None
        server = grpc.aio.server(
            interceptors=[ErrorMetricsInterceptor()],
            options=[
                ("grpc.max_receive_message_length", self.config.grpc.max_recv_message_size),
                ("grpc.max_send_message_length", self.config.grpc.max_send_message_size),
            ],
        )
        health = RuntimeHealth(self.config, self.networks)
        streaming = StreamingServer(self.config.streaming, self.containers, self.sandboxes)
        try:
            await streaming.start()
        except OSError as exc:
            raise ServerError(f"streaming {self.config.streaming.address}:{self.config.streaming.port}: {exc.strerror}") from None
        self.streaming = streaming
        cri_grpc.add_RuntimeServiceServicer_to_server(
            RuntimeService(self.config, health, self.sandboxes, self.containers, streaming), server
        )
        cri_grpc.add_ImageServiceServicer_to_server(ImageService(images), server)
        server.add_generic_rpc_handlers([admin.handler(images)])
        old_umask = os.umask(0o177)  # no window where the socket is world-connectable
        try:
            if server.add_insecure_port(f"unix://{path}") == 0:
                raise ServerError(f"cannot listen on {path}")
            await server.start()
        finally:
            os.umask(old_umask)
        secure_socket(path)
        self.grpc = server
        log.info("cri-py listening on unix://%s", path)

    async def stop(self) -> None:
        """Stop accepting, let in-flight calls finish, and leave containers alone."""
        if self.grpc is not None:
            await self.grpc.stop(SHUTDOWN_GRACE_SECONDS)
            self.grpc = None
        self.metrics.stop()
        if self.streaming is not None:
            await self.streaming.stop()  # ends exec sessions: their processes are killed
            self.streaming = None
        if self.tasks is not None:
            await self.tasks.close()  # connections only: shims and containers keep running
        try:
            os.unlink(self.config.socket_path)
        except FileNotFoundError:
            pass
        if self.store is not None:
            self.store.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        log.info("cri-py stopped")


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    server = CriServer(config)
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await stopping.wait()
        log.info("signal received, shutting down")
    finally:
        await server.stop()
