"""What the benchmarks share: percentiles, free ports, a pod network, a cri-py server.

Each benchmark runs its own server on its own work dir, bridge and subnet; the
functions here only take those as arguments.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc as cri_grpc

REPO = Path(__file__).resolve().parents[1]

MIRRORS = (
    '[registry.mirrors."registry.k8s.io"]\nendpoints = ["http://127.0.0.1:5000"]\nupstream = false\n'
    '[registry.mirrors."docker.io"]\nendpoints = ["http://127.0.0.1:5000"]\nupstream = false\n'
)


def pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def conflist(bridge: str, subnet: str, data_dir: Path) -> dict:
    """bridge + host-local (its own data dir) + portmap, like the default network."""
    return {
        "cniVersion": "1.0.0",
        "name": "bench",
        "plugins": [
            {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]], "dataDir": str(data_dir)}},
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
        ],
    }


def start_server(work: Path, extra_config: str = "", level: str = "warning") -> tuple[subprocess.Popen, Path]:
    """A cri-py server on `work` (root, state, socket, runc root), metrics off; waits for its socket."""
    sock = work / "state" / "cri-py.sock"
    config = work / "config.toml"
    config.write_text(
        f'root = "{work}/root"\nstate = "{work}/state"\n[grpc]\naddress = "{sock}"\n[metrics]\naddress = ""\n'
        f'[streaming]\nport = {free_port()}\n[log]\nlevel = "{level}"\n'
        f'[runtime.handlers.runc]\nroot = "{work}/runc"\n' + extra_config
    )
    server = subprocess.Popen([sys.executable, "-m", "cri_py.cli", "serve", "--config", str(config)])
    deadline = time.monotonic() + 30
    while not sock.exists():
        if time.monotonic() > deadline or server.poll() is not None:
            raise SystemExit("cri-py did not start")
        time.sleep(0.05)
    return server, sock


def start_pod_server(work: Path, bridge: str, subnet: str, level: str = "warning") -> tuple[subprocess.Popen, Path]:
    """A server with a pod network of its own and the local registry as mirror."""
    conf_dir = work / "net.d"
    conf_dir.mkdir()
    (conf_dir / "10-bench.conflist").write_text(json.dumps(conflist(bridge, subnet, work / "ipam")))
    return start_server(work, f'[cni]\nconf_dir = "{conf_dir}"\n' + MIRRORS, level)


def registry_running() -> bool:
    return subprocess.run([str(REPO / "hack/registry.sh"), "status"], capture_output=True).returncode == 0


def remove_pods(sock: Path) -> None:
    """Whatever pods are left (after an error): their shims would outlive the daemon."""
    with grpc.insecure_channel(f"unix://{sock}") as channel:
        runtime = cri_grpc.RuntimeServiceStub(channel)
        for item in runtime.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=30).items:
            runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=item.id), timeout=240)


@contextlib.contextmanager
def pod_bench(prefix: str, bridge: str, subnet: str, level: str = "warning") -> Iterator[tuple[subprocess.Popen, Path, Path]]:
    """(server, socket, work dir) of a pod server on a work dir of its own, with the
    local registry (started with the test images when it is not running).

    Everything is undone on the way out, after an error or Ctrl-C too: leftover pods
    removed, the server stopped, the bridge deleted, ip_forward restored (the bridge
    plugin turns it on), the netns pin unmounted, the work dir removed, and the
    registry stopped if it was started here.
    """
    registry_was_running = registry_running()
    work = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    forward = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    server = None
    try:
        if not registry_was_running:
            subprocess.run([str(REPO / "hack/test-images.sh")], check=True, capture_output=True)
        server, sock = start_pod_server(work, bridge, subnet, level)
        yield server, sock, work
    finally:
        if server is not None:
            if server.poll() is None:
                with contextlib.suppress(grpc.RpcError):
                    remove_pods(sock)
            server.terminate()
            server.wait(60)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        Path("/proc/sys/net/ipv4/ip_forward").write_text(forward)
        subprocess.run(["umount", "-l", str(work / "state/netns")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
        if not registry_was_running:
            subprocess.run([str(REPO / "hack/registry.sh"), "stop"], capture_output=True)
