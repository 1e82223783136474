"""Pod networking for real: pinned netns + the bridge, host-local and portmap plugins.

Runs as root against the plugins in /usr/lib/cni. Every test uses a bridge and a
/24 of its own (cripytest<N>, 10.231.<N>.0/24) and a host-local dataDir under its
tmp_path, and traffic only goes to 127.0.0.1 and to addresses inside namespaces the
test created. The `lab` fixture undoes everything even when a test fails: DELs what
is cached, unpins the namespaces, deletes the bridge, removes the portmap chains it
caused, restores net.ipv4.ip_forward (the bridge plugin turns it on for isGateway),
and then asserts that links, mounts and iptables rules are as before.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cri_py import errors
from cri_py.network import netns
from cri_py.network.cni import Cni, CniError, CniRequest, CniResult
from cri_py.network.conf import NetworkConfig
from tests.e2e.conftest import free_port, wait_for
from tests.e2e.network import HostNetState, iptables_lines, link_names, nat_rules, run

pytestmark = pytest.mark.e2e

CNI_BIN = "/usr/lib/cni"

SERVER = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen(8)
print("ready", flush=True)
while True:
    c, peer = s.accept()
    c.sendall(("hello from pod, you are %s\\n" % peer[0]).encode())
    c.close()
"""


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        return [line for line in fh if f" {path}" in line]


def allocations(data_dir: Path) -> list[str]:
    """IPs host-local still holds: its dataDir has one file per allocated address."""
    found = []
    for _, _, files in os.walk(data_dir):
        for name in files:
            try:
                ipaddress.ip_address(name)
            except ValueError:
                continue
            found.append(name)
    return found


def host_veths(result: CniResult, bridge: str) -> list[str]:
    """Host-side interfaces a result names: not in the sandbox and not the bridge."""
    return [i["name"] for i in result.raw.get("interfaces", []) if not i.get("sandbox") and i["name"] != bridge]


def nsenter(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run("nsenter", f"--net={ns}", *cmd, check=check)


def pick_lab_number() -> int:
    """A bridge name and /24 nobody on this host uses (200+: the sandbox e2e tests use 0-199)."""
    links, routes = link_names(), run("ip", "-4", "route", "show", "table", "all").stdout
    for n in range(200, 255):
        if f"cripytest{n}" not in links and f"10.231.{n}." not in routes:
            return n
    raise AssertionError("no free cripytest bridge / 10.231.n.0/24 subnet")


@dataclass
class Lab:
    """One test's private network world and the undo list for it."""

    base: Path
    n: int
    cni: Cni = field(init=False)
    pods: list[tuple[CniRequest, NetworkConfig]] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cni = Cni([str(self.base / "bin"), CNI_BIN], str(self.base / "cache"), timeout=60)
        (self.base / "bin").mkdir()

    @property
    def bridge(self) -> str:
        return f"cripytest{self.n}"

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"10.231.{self.n}.0/24")

    @property
    def gateway(self) -> str:
        return f"10.231.{self.n}.1"

    @property
    def data_dir(self) -> Path:
        return self.base / "ipam"

    @property
    def netns_dir(self) -> Path:
        return self.base / "netns"

    def network(self, *extra: dict[str, Any], portmap: bool = True) -> NetworkConfig:
        """bridge + host-local (+ portmap) on this lab's bridge and subnet."""
        plugins: list[dict[str, Any]] = [
            {
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": True,
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": str(self.subnet), "gateway": self.gateway}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(self.data_dir),
                },
            }
        ]
        if portmap:
            plugins.append({"type": "portmap", "capabilities": {"portMappings": True}, "snat": True})
        plugins.extend(extra)
        raw = {"cniVersion": "1.0.0", "name": f"cripytest{self.n}", "plugins": plugins}
        return NetworkConfig(name=raw["name"], cni_version="1.0.0", plugins=plugins, source="test", raw=raw)

    def new_netns(self, name: str) -> str:
        path = str(self.netns_dir / name)
        self.namespaces.append(path)
        netns.create_netns(path)
        return path

    def request(self, ns: str, cid: str, **capability_args: Any) -> CniRequest:
        return CniRequest(
            container_id=cid,
            netns=ns,
            args={"K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": cid[:8], "K8S_POD_INFRA_CONTAINER_ID": cid},
            capability_args=capability_args,
        )

    async def add(self, network: NetworkConfig, req: CniRequest) -> CniResult:
        self.pods.append((req, network))
        return await self.cni.add(network, req)

    def fake_plugin(self, name: str, script: str) -> None:
        path = self.base / "bin" / name
        path.write_text("#!/bin/sh\n" + script)
        path.chmod(0o755)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """A private lab, torn down completely however the test ends, then checked for leaks."""
    host = HostNetState()
    lab = Lab(tmp_path, pick_lab_number())
    try:
        yield lab
    finally:
        problems = _teardown(lab)
        host.restore()
        assert not problems, problems
        wait_for(lambda: link_names() <= host.links, timeout=10, what="test links to disappear")
        assert iptables_lines() == host.rules
        assert mounts_under(tmp_path) == []


def _teardown(lab: Lab) -> list[str]:
    """Best-effort undo of everything the lab made; returns what could not be undone."""
    problems: list[str] = []

    async def delete_all() -> None:
        for req, network in lab.pods:
            try:
                await lab.cni.delete(network, req)
            except CniError as exc:
                problems.append(f"DEL {req.container_id}: {exc}")

    asyncio.run(delete_all())
    for path in lab.namespaces:
        netns.remove_netns(path)
    netns.release_netns_dir(str(lab.netns_dir))
    if lab.bridge in link_names():
        run("ip", "link", "del", lab.bridge)
    return problems


# ---- netns -------------------------------------------------------------------------


def test_netns_create_exists_stats_remove(lab: Lab, monkeypatch):
    own_ns = os.readlink("/proc/thread-self/ns/net")
    path = lab.new_netns("a")
    assert netns.netns_exists(path)
    assert os.readlink("/proc/thread-self/ns/net") == own_ns  # the caller's thread never moved
    assert os.stat(path).st_ino != os.stat("/proc/thread-self/ns/net").st_ino
    assert ",UP" in nsenter(path, "ip", "-br", "link", "show", "lo").stdout
    nsenter(path, "busybox", "ping", "-c1", "-W2", "127.0.0.1")
    stats = netns.interface_stats(path)
    assert set(stats) == {"lo"} and stats["lo"]["rx_bytes"] > 0 and stats["lo"]["tx_errors"] == 0

    with pytest.raises(errors.AlreadyExists):
        netns.create_netns(path)
    assert netns.netns_exists(path)  # a refused create leaves the existing pin alone

    netns.remove_netns(path)
    netns.remove_netns(path)
    assert not netns.netns_exists(path) and not os.path.exists(path)
    with pytest.raises(errors.NotFound):
        netns.interface_stats(path)

    def broken() -> None:
        raise RuntimeError("lo refused")

    monkeypatch.setattr(netns, "_bring_lo_up", broken)
    with pytest.raises(netns.NetnsError, match="lo refused"):
        lab.new_netns("b")
    assert not os.path.exists(lab.netns_dir / "b")
    assert [m for m in mounts_under(lab.netns_dir) if "nsfs" in m] == []


# ---- CNI with real plugins -------------------------------------------------------------


async def test_two_pods_ping_portmap_and_clean_delete(lab: Lab):
    network = lab.network()
    ns_a, ns_b = lab.new_netns("a"), lab.new_netns("b")
    host_port = free_port()
    mapping = {"hostPort": host_port, "containerPort": 8080, "protocol": "tcp", "hostIP": "127.0.0.1"}
    req_a = lab.request(ns_a, "a" * 64, portMappings=[mapping])
    req_b = lab.request(ns_b, "b" * 64)
    res_a = await lab.add(network, req_a)
    res_b = await lab.add(network, req_b)

    ip_a, ip_b = res_a.ips[0], res_b.ips[0]
    assert len(res_a.ips) == 1 and ipaddress.ip_address(ip_a) in lab.subnet and ip_a != lab.gateway
    assert ipaddress.ip_address(ip_b) in lab.subnet and ip_b != ip_a
    assert sorted(allocations(lab.data_dir)) == sorted([ip_a, ip_b])
    assert lab.cni.cached(req_a.container_id).ips == [ip_a]

    nsenter(ns_a, "busybox", "ping", "-c1", "-W2", ip_b)
    nsenter(ns_b, "busybox", "ping", "-c1", "-W2", ip_a)
    assert netns.interface_stats(ns_a)["eth0"]["rx_bytes"] > 0
    # CHECK of bridge + host-local; portmap 1.1.1's CHECK wrongly demands an IPv6 chain on a v4-only pod
    await lab.cni.check(lab.network(portmap=False), req_a)

    rules = "\n".join(nat_rules())
    assert "CNI-DN-" in rules and str(host_port) in rules

    server = subprocess.Popen(
        ["nsenter", f"--net={ns_a}", sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout.readline().strip() == "ready"
        reply = _fetch("127.0.0.1", host_port)
        # portmap masquerades 127.0.0.1 (route_localnet on the bridge): the pod sees the gateway
        assert reply == f"hello from pod, you are {lab.gateway}"
    finally:
        server.kill()
        server.wait()

    veths = host_veths(res_a, lab.bridge) + host_veths(res_b, lab.bridge)
    assert len(veths) == 2 and set(veths) <= link_names()
    await lab.cni.delete(network, req_a)
    await lab.cni.delete(None, req_b)  # from the cache alone, as after a restart
    await lab.cni.delete(network, req_a)  # idempotent
    assert allocations(lab.data_dir) == []
    assert not set(veths) & link_names()
    assert lab.cni.cached(req_a.container_id) is None and lab.cni.cached(req_b.container_id) is None
    assert not any("CNI-DN-" in r or req_a.container_id in r for r in nat_rules())
    for path in (ns_a, ns_b):
        netns.remove_netns(path)
        assert not netns.netns_exists(path)


def _fetch(host: str, port: int) -> str:
    """One line from a TCP server, retried briefly: DNAT rules can lag the plugin's exit."""
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection((host, port), timeout=3) as conn:
                return conn.makefile().readline().strip()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


async def test_delete_after_netns_removed(lab: Lab):
    network = lab.network()
    ns = lab.new_netns("gone")
    req = lab.request(
        ns,
        "c" * 64,
        portMappings=[{"hostPort": free_port(), "containerPort": 80, "protocol": "tcp", "hostIP": "127.0.0.1"}],
    )
    result = await lab.add(network, req)
    assert allocations(lab.data_dir) == result.ips
    netns.remove_netns(ns)

    # a restarted daemon: a new Cni, no network config, a request without port mappings;
    # the cache supplies both (portmap's DEL does nothing without runtimeConfig.portMappings)
    restarted = Cni(lab.cni.bin_dirs, lab.cni.cache_dir)
    await restarted.delete(None, CniRequest(container_id=req.container_id, netns=ns))  # CNI_NETNS="": it is gone
    assert allocations(lab.data_dir) == []
    assert not any("CNI-DN-" in r for r in nat_rules())
    wait_for(
        lambda: not set(host_veths(result, lab.bridge)) & link_names(), timeout=10, what="veth to go with its netns"
    )


async def test_add_failure_halfway_leaves_no_allocation(lab: Lab):
    lab.fake_plugin(
        "cripy-fail",
        'cat >/dev/null\n[ "$CNI_COMMAND" = DEL ] && exit 0\n'
        'echo \'{"cniVersion":"1.0.0","code":100,"msg":"injected failure","details":"after bridge"}\'\nexit 1\n',
    )
    network = lab.network({"type": "cripy-fail"}, portmap=True)
    ns = lab.new_netns("half")
    req = lab.request(
        ns,
        "d" * 64,
        portMappings=[{"hostPort": free_port(), "containerPort": 80, "protocol": "tcp", "hostIP": "127.0.0.1"}],
    )
    links_before = link_names()
    with pytest.raises(CniError) as info:
        await lab.add(network, req)
    assert info.value.plugin == "cripy-fail" and info.value.cni_code == 100 and "injected failure" in str(info.value)
    assert allocations(lab.data_dir) == []
    assert lab.cni.cached(req.container_id) is None
    assert set(netns.interface_stats(ns)) == {"lo"}  # eth0 removed by the bridge plugin's DEL
    assert link_names() - links_before <= {lab.bridge}  # no host veth left
    assert not any("CNI-DN-" in r for r in nat_rules())


def test_netns_and_add_timing(lab: Lab):
    """create_netns + CNI ADD (bridge + host-local), 20 pods in a row; printed, never asserted."""
    network = lab.network(portmap=False)
    created: list[float] = []
    added: list[float] = []

    async def one(i: int) -> None:
        path = str(lab.netns_dir / f"t{i}")
        lab.namespaces.append(path)
        t0 = time.perf_counter()
        await asyncio.to_thread(netns.create_netns, path)
        t1 = time.perf_counter()
        await lab.add(network, lab.request(path, f"{i:064x}"))
        t2 = time.perf_counter()
        created.append(t1 - t0)
        added.append(t2 - t1)

    async def main() -> None:
        for i in range(20):
            await one(i)

    asyncio.run(main())
    assert len(allocations(lab.data_dir)) == 20
    total = [c + a for c, a in zip(created, added, strict=True)]
    print(
        f"\nnetns+ADD x20: p50 {statistics.median(total) * 1000:.1f} ms "
        f"(create_netns p50 {statistics.median(created) * 1000:.2f} ms, "
        f"ADD p50 {statistics.median(added) * 1000:.1f} ms, max total {max(total) * 1000:.1f} ms)"
    )
