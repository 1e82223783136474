"""What the benchmarks share: percentiles, free ports, a pod network, a cri-py server.

Each benchmark runs its own server on its own work dir, bridge and subnet; the
functions here only take those as arguments.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

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
