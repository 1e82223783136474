"""End-to-end fixtures: a real cri-py server as a subprocess on its own paths.

Each test gets its own root, state dir, socket and metrics port, so tests never share
state and a failing test cannot poison the next one; the fixture always stops the
server it started, by PID.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc as cri_grpc

from cri_py.network.netns import release_netns_dir
from tests.e2e.network import PodNetwork

pytestmark = pytest.mark.e2e


def pytest_collection_modifyitems(items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="e2e tests need root")
        for item in items:
            if "tests/e2e" in str(item.fspath):
                item.add_marker(skip)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    """Poll until `predicate()` is truthy; never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class ServerProcess:
    """A cri-py server subprocess and the paths it owns."""

    base: Path
    extra_config: str = ""
    metrics: bool = True
    cni_bin_dirs: list[str] | None = None
    cni_conf_template: str = ""
    proc: subprocess.Popen | None = None
    metrics_port: int = field(default_factory=free_port)

    @property
    def socket_path(self) -> str:
        return str(self.base / "state" / "cri-py.sock")

    @property
    def config_path(self) -> Path:
        return self.base / "config.toml"

    @property
    def log_path(self) -> Path:
        return self.base / "server.log"

    @property
    def conf_dir(self) -> Path:
        return self.base / "net.d"

    def write_config(self) -> None:
        self.conf_dir.mkdir(exist_ok=True)
        self.config_path.write_text(
            f'root = "{self.base}/root"\n'
            f'state = "{self.base}/state"\n'
            f"[grpc]\naddress = \"unix://{self.socket_path}\"\n"
            f'[metrics]\naddress = "{f"127.0.0.1:{self.metrics_port}" if self.metrics else ""}"\n'
            f'[streaming]\nport = {free_port()}\n'
            f'[cni]\nconf_dir = "{self.conf_dir}"\n'
            + (f"bin_dirs = {json.dumps(self.cni_bin_dirs)}\n" if self.cni_bin_dirs else "")
            + (f'conf_template = "{self.cni_conf_template}"\n' if self.cni_conf_template else "")
            + '[log]\nlevel = "debug"\n'
            + self.extra_config
        )

    def start(self, wait: bool = True) -> "ServerProcess":
        self.write_config()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cri_py.cli", "serve", "--config", str(self.config_path)],
            stdout=open(self.log_path, "ab"),
            stderr=subprocess.STDOUT,
        )
        if wait:
            wait_for(self._ready, what=f"cri-py socket {self.socket_path}")
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"cri-py exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
        if not os.path.exists(self.socket_path):
            return False
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(self.socket_path)
            except OSError:
                return False
        return True

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"unix://{self.socket_path}")

    def runtime(self) -> cri_grpc.RuntimeServiceStub:
        return cri_grpc.RuntimeServiceStub(self.channel())

    def images(self) -> cri_grpc.ImageServiceStub:
        return cri_grpc.ImageServiceStub(self.channel())

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal the server by PID and wait for it; returns its exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"cri-py did not exit within {timeout}s of signal {sig}")


@pytest.fixture
def server_factory(tmp_path) -> Iterator:
    """Start servers on demand; every one is stopped at teardown even if the test failed."""
    started: list[ServerProcess] = []

    def make(extra_config: str = "", start: bool = True, metrics: bool = True) -> ServerProcess:
        base = tmp_path / f"srv{len(started)}"
        base.mkdir()
        server = ServerProcess(base, extra_config, metrics)
        started.append(server)
        return server.start() if start else server

    yield make
    for server in started:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
        # the daemon keeps its netns dir a private mount point for its whole life
        release_netns_dir(str(server.base / "state" / "netns"))


@pytest.fixture
def server(server_factory) -> ServerProcess:
    return server_factory()


REPO_ROOT = Path(__file__).resolve().parents[2]
REGISTRY = "127.0.0.1:5000"
# the kubelet asks for registry.k8s.io and docker.io names; the local registry answers,
# and the real hosts are never tried (tests send traffic only to 127.0.0.1)
MIRRORS = f"""
[registry.mirrors."registry.k8s.io"]
endpoints = ["http://{REGISTRY}"]
upstream = false
[registry.mirrors."docker.io"]
endpoints = ["http://{REGISTRY}"]
upstream = false
"""


@pytest.fixture(scope="session")
def local_registry() -> Iterator[str]:
    """The local registry with the project's test images; started here if not running."""
    status = subprocess.run([str(REPO_ROOT / "hack/registry.sh"), "status"], capture_output=True)
    started = status.returncode != 0
    subprocess.run([str(REPO_ROOT / "hack/test-images.sh")], check=True, capture_output=True)
    yield REGISTRY
    if started:
        subprocess.run([str(REPO_ROOT / "hack/registry.sh"), "stop"], check=False, capture_output=True)


@pytest.fixture
def image_server(server_factory, local_registry) -> ServerProcess:
    """A server whose docker.io and registry.k8s.io pulls go to the local registry."""
    return server_factory(MIRRORS)


def _our_processes() -> dict[int, str]:
    """cri-py daemons, shims and launchers, and runc, started for tests (their paths
    are under pytest's temp dir), by pid; others' processes on the machine don't count."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ours = "cri_py" in cmdline or cmdline.startswith(("runc ", "/usr/sbin/runc "))
        if ours and "/pytest-of-" in cmdline:
            found[int(entry)] = cmdline
    return found


def _test_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        return [line.split()[4] for line in fh if "/pytest-of-" in line.split()[4]]


@pytest.fixture(scope="session", autouse=True)
def nothing_leaks():
    """After the whole session: no process, mount or bridge any test made is left."""
    before = set(_our_processes())
    yield
    leftovers: list[str] = []

    def settled():
        leftovers[:] = [f"pid {pid}: {cmd[:120]}" for pid, cmd in _our_processes().items() if pid not in before]
        leftovers.extend(f"mount {m}" for m in _test_mounts())
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        names = [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()]
        # the bridges tests make: cripy<N> (tests/e2e/network.py), cripytest<N> (test_network.py)
        leftovers.extend(f"link {name}" for name in names if re.fullmatch(r"cripy(test)?\d+", name))
        return not leftovers

    try:
        wait_for(settled, timeout=15, what="test leftovers to go")
    except AssertionError:
        raise AssertionError("the e2e tests left things behind:\n" + "\n".join(leftovers)) from None


# --- a pod to run containers in --------------------------------------------------------

BUSYBOX = "docker.io/library/busybox:latest"


class Pod:
    """A READY pod of a running server, with its log directory, for container tests."""

    def __init__(self, server, sandbox_id: str, config: cri.PodSandboxConfig, log_dir: Path) -> None:
        self.server = server
        self.runtime = server.runtime()
        self.id = sandbox_id
        self.config = config
        self.log_dir = log_dir
        self.image_id = server.images().PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=BUSYBOX))).image_ref

    def create(self, name: str, command: list[str], **kwargs) -> str:
        config = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name),
            image=cri.ImageSpec(image=kwargs.pop("image", self.image_id)),
            command=command,
            log_path=kwargs.pop("log_path", f"{name}/0.log"),
            labels={"name": name},
            **kwargs,
        )
        request = cri.CreateContainerRequest(pod_sandbox_id=self.id, config=config, sandbox_config=self.config)
        return self.runtime.CreateContainer(request, timeout=60).container_id

    def run(self, name: str, command: list[str], **kwargs) -> str:
        container_id = self.create(name, command, **kwargs)
        self.runtime.StartContainer(cri.StartContainerRequest(container_id=container_id), timeout=60)
        return container_id

    def status(self, container_id: str, verbose: bool = False) -> cri.ContainerStatusResponse:
        return self.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=container_id, verbose=verbose))

    def wait_exit(self, container_id: str, timeout: float = 30) -> cri.ContainerStatus:
        def exited():
            st = self.status(container_id).status
            return st if st.state == cri.CONTAINER_EXITED else None

        return wait_for(exited, timeout=timeout, what=f"container {container_id[:12]} to exit")

    def log(self, name: str, index: int = 0) -> str:
        return (self.log_dir / name / f"{index}.log").read_text()

    def log_lines(self, name: str, stream: str = "stdout") -> list[str]:
        """One stream's output lines, from the CRI-format records (the two streams are
        separate pipes: their relative order in the file is not the program's)."""
        records = [line.split(" ", 3) for line in self.log(name).splitlines()]
        return [r[3] if len(r) == 4 else "" for r in records if r[1] == stream]

    def exec(self, container_id: str, cmd: list[str], timeout: int = 10) -> cri.ExecSyncResponse:
        return self.runtime.ExecSync(cri.ExecSyncRequest(container_id=container_id, cmd=cmd, timeout=timeout), timeout=60)


def server_with_network(server_factory, tmp_path: Path, request) -> tuple[ServerProcess, PodNetwork]:
    """A started server whose pods go on a network of the test's own (the local
    registry as mirror); the caller cleans the network up."""
    net = PodNetwork(tmp_path / "cni", index=abs(hash(request.node.name)) % 200)
    server = server_factory(MIRRORS + net.server_config(), start=False)
    net.attach(server)
    net.write_conflist(server.conf_dir)
    server.start()
    return server, net


@pytest.fixture
def pod(server_factory, local_registry, tmp_path, request):
    server, net = server_with_network(server_factory, tmp_path, request)
    log_dir = tmp_path / "pod-logs"
    config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="cpod", namespace="e2e", uid=f"uid-{request.node.name[:40]}"),
        hostname="cpod",
        log_directory=str(log_dir),
    )
    runtime = server.runtime()
    sandbox_id = runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=120).pod_sandbox_id
    try:
        yield Pod(server, sandbox_id, config, log_dir)
    finally:
        if server.proc.poll() is None:
            for item in runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items:
                runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=item.id), timeout=120)
        net.cleanup()
