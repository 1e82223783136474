"""Pod sandboxes end to end: real runc, shims, netns and CNI bridge + host-local."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2 as cri

from tests.e2e.conftest import MIRRORS, free_port, wait_for
from tests.e2e.network import PodNetwork


@pytest.fixture
def net(tmp_path, request):
    """A bridge, subnet and host-local store of this test's own; torn down after it."""
    network = PodNetwork(tmp_path / "cni", index=abs(hash(request.node.name)) % 200)
    yield network
    network.cleanup()


@pytest.fixture
def pods(server_factory, local_registry, net, tmp_path):
    """A server with the test network, plus a helper that removes every pod at the end."""
    server = server_factory(MIRRORS + net.server_config(), start=False)
    net.attach(server)
    net.write_conflist(server.conf_dir)
    server.start()
    yield server
    _remove_all(server)


def _remove_all(server) -> None:
    if server.proc is None or server.proc.poll() is not None:
        return
    runtime = server.runtime()
    for item in runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items:
        runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=item.id), timeout=60)


def pod_config(name: str, uid: str | None = None, attempt: int = 0, **kwargs) -> cri.PodSandboxConfig:
    config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, namespace="e2e", uid=uid or f"uid-{name}", attempt=attempt),
        hostname=name,
        labels={"app": name, "suite": "sandboxes"},
        annotations={"note": "from e2e"},
        **kwargs,
    )
    return config


def run(server, config: cri.PodSandboxConfig, timeout: float = 120, handler: str = "") -> str:
    request = cri.RunPodSandboxRequest(config=config, runtime_handler=handler)
    return server.runtime().RunPodSandbox(request, timeout=timeout).pod_sandbox_id


def status(server, sandbox_id: str, verbose: bool = False) -> cri.PodSandboxStatusResponse:
    return server.runtime().PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=verbose))


def netns_exec(netns: str, *cmd: str, timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", f"--net={netns}", *cmd], capture_output=True, text=True, timeout=timeout)


def test_lifecycle_and_idempotence(pods, net):
    sandbox_id = run(pods, pod_config("life"))
    st = status(pods, sandbox_id, verbose=True)
    assert st.status.state == cri.SANDBOX_READY
    assert st.status.metadata.name == "life" and st.status.metadata.namespace == "e2e"
    assert st.status.labels["app"] == "life" and st.status.annotations["note"] == "from e2e"
    assert st.status.created_at > 0
    assert net.contains(st.status.network.ip)
    info = json.loads(st.info["info"])
    assert info["pid"] > 0 and os.path.exists(f"/proc/{info['pid']}")
    assert os.path.exists(info["netnsPath"])
    assert info["cniResult"]["ips"]
    assert net.allocated() == [st.status.network.ip]

    listed = pods.runtime().ListPodSandbox(cri.ListPodSandboxRequest()).items
    assert [p.id for p in listed] == [sandbox_id]
    for flt in (
        cri.PodSandboxFilter(id=sandbox_id),
        cri.PodSandboxFilter(id=sandbox_id[:12]),
        cri.PodSandboxFilter(state=cri.PodSandboxStateValue(state=cri.SANDBOX_READY)),
        cri.PodSandboxFilter(label_selector={"app": "life"}),
    ):
        assert [p.id for p in pods.runtime().ListPodSandbox(cri.ListPodSandboxRequest(filter=flt)).items] == [sandbox_id]
    for flt in (
        cri.PodSandboxFilter(id="nope"),
        cri.PodSandboxFilter(state=cri.PodSandboxStateValue(state=cri.SANDBOX_NOTREADY)),
        cri.PodSandboxFilter(label_selector={"app": "other"}),
    ):
        assert not pods.runtime().ListPodSandbox(cri.ListPodSandboxRequest(filter=flt)).items

    for _ in range(2):  # stop is idempotent
        pods.runtime().StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))
        assert status(pods, sandbox_id).status.state == cri.SANDBOX_NOTREADY
    assert not os.path.exists(f"/proc/{info['pid']}") or _is_zombie(info["pid"]) is None
    assert net.allocated() == []
    assert not os.path.exists(info["netnsPath"])
    for _ in range(2):  # remove is idempotent
        pods.runtime().RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))
    with pytest.raises(grpc.RpcError) as err:
        status(pods, sandbox_id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert not pods.runtime().ListPodSandbox(cri.ListPodSandboxRequest()).items


def _is_zombie(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return None


def test_bad_requests_change_nothing(pods, net):
    for bad in (
        cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(namespace="e2e", uid="u")),
        cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name="x", uid="u")),
        cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name="x", namespace="e2e")),
    ):
        with pytest.raises(grpc.RpcError) as err:
            run(pods, bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        run(pods, pod_config("handler"), handler="no-such-handler")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # stop and remove of an absent sandbox succeed (the CRI's idempotent Stop/Remove)
    pods.runtime().StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id="0" * 64))
    pods.runtime().RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id="0" * 64))
    assert not pods.runtime().ListPodSandbox(cri.ListPodSandboxRequest()).items
    assert net.allocated() == []


def test_two_pods_reach_each_other(pods, net):
    a, b = run(pods, pod_config("ping-a")), run(pods, pod_config("ping-b"))
    ip_b = status(pods, b).status.network.ip
    netns_a = json.loads(status(pods, a, verbose=True).info["info"])["netnsPath"]
    result = netns_exec(netns_a, "busybox", "ping", "-c1", "-W2", ip_b)
    assert result.returncode == 0, result.stdout + result.stderr


def test_host_network_pod(pods, net):
    config = pod_config("hostnet")
    config.linux.security_context.namespace_options.network = cri.NODE
    sandbox_id = run(pods, config)
    st = status(pods, sandbox_id, verbose=True)
    assert st.status.state == cri.SANDBOX_READY
    assert st.status.linux.namespaces.options.network == cri.NODE
    assert json.loads(st.info["info"])["netnsPath"] == ""
    assert net.allocated() == []
    pid = json.loads(st.info["info"])["pid"]
    assert os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net")


def test_dns_options_land_in_resolv_conf(pods):
    config = pod_config("dns", dns_config=cri.DNSConfig(
        servers=["10.96.0.10"], searches=["e2e.svc.cluster.local", "svc.cluster.local"], options=["ndots:5"]))
    sandbox_id = run(pods, config)
    pid = json.loads(status(pods, sandbox_id, verbose=True).info["info"])["pid"]
    resolv = (pods.base / "root" / "sandboxes" / sandbox_id / "resolv.conf").read_text()
    assert resolv == "nameserver 10.96.0.10\nsearch e2e.svc.cluster.local svc.cluster.local\noptions ndots:5\n"
    hostname = (pods.base / "root" / "sandboxes" / sandbox_id / "hostname").read_text()
    assert hostname == "dns\n"
    assert Path(f"/proc/{pid}/root/").exists()


def test_host_port_reaches_the_pod(pods, net, tmp_path):
    host_port = free_port()
    config = pod_config("web", port_mappings=[cri.PortMapping(protocol=cri.TCP, container_port=8080, host_port=host_port)])
    sandbox_id = run(pods, config)
    netns = json.loads(status(pods, sandbox_id, verbose=True).info["info"])["netnsPath"]
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("hello from a pod\n")
    httpd = subprocess.Popen(["nsenter", f"--net={netns}", "busybox", "httpd", "-f", "-p", "8080", "-h", str(www)])
    try:
        def fetch():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{host_port}/index.html", timeout=2) as response:
                    return response.read().decode()
            except OSError:
                return None

        assert wait_for(fetch, timeout=15, what="the pod's httpd through the host port") == "hello from a pod\n"
    finally:
        httpd.kill()
        httpd.wait()


def test_twenty_pods_in_parallel(pods, net):
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        ids = list(pool.map(lambda i: run(pods, pod_config(f"par-{i}")), range(20)))
    assert len(set(ids)) == 20
    ips = {status(pods, i).status.network.ip for i in ids}
    assert len(ips) == 20 and all(net.contains(ip) for ip in ips)
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        list(pool.map(lambda i: pods.runtime().RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=i)), ids))
    assert net.allocated() == []


def test_parallel_runs_of_one_name_have_one_winner(pods, net):
    config = pod_config("dup")

    def attempt(_):
        try:
            return run(pods, config)
        except grpc.RpcError as exc:
            return exc.code()

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(attempt, range(10)))
    winners = [r for r in results if isinstance(r, str)]
    assert len(winners) == 1, results
    assert results.count(grpc.StatusCode.ALREADY_EXISTS) == 9
    assert len(net.allocated()) == 1


def test_cni_failure_leaves_nothing(server_factory, local_registry, net):
    server = server_factory(MIRRORS + net.server_config(), start=False)
    net.attach(server)
    net.write_conflist(server.conf_dir, fail_after_bridge=True)
    server.start()
    try:
        with pytest.raises(grpc.RpcError) as err:
            run(server, pod_config("cnifail"))
        assert "injected failure" in err.value.details()
        _assert_nothing_left(server, net)
    finally:
        _remove_all(server)


def test_bad_sysctl_rolls_back(pods, net):
    config = pod_config("sysctl")
    config.linux.sysctls["net.ipv4.no_such_sysctl"] = "1"
    with pytest.raises(grpc.RpcError):
        run(pods, config)
    _assert_nothing_left(pods, net)
    # and a good one applies
    config = pod_config("sysctl-ok")
    config.linux.sysctls["net.ipv4.ip_unprivileged_port_start"] = "0"
    sandbox_id = run(pods, config)
    netns = json.loads(status(pods, sandbox_id, verbose=True).info["info"])["netnsPath"]
    value = netns_exec(netns, "cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start").stdout.strip()
    assert value == "0"


def _assert_nothing_left(server, net) -> None:
    assert not server.runtime().ListPodSandbox(cri.ListPodSandboxRequest()).items
    assert net.allocated() == []
    state = server.base / "state"
    assert not list((state / "netns").glob("*")) if (state / "netns").exists() else True
    assert not list((state / "sandboxes").glob("*")) if (state / "sandboxes").exists() else True
    netns_dir = str(server.base / "state" / "netns")
    mounts = [m for m in Path("/proc/self/mountinfo").read_text().splitlines() if str(server.base) in m]
    assert all(m.split()[4] == netns_dir for m in mounts), mounts
    assert not list((server.base / "root" / "sandboxes").glob("*")) if (server.base / "root" / "sandboxes").exists() else True


def test_sigkilled_daemon_keeps_pods_and_frees_ips_after_restart(pods, net):
    ids = [run(pods, pod_config(f"survive-{i}")) for i in range(2)]
    pids = [json.loads(status(pods, i, verbose=True).info["info"])["pid"] for i in ids]
    assert pods.terminate(signal.SIGKILL) == -signal.SIGKILL
    for pid in pids:
        assert _is_zombie(pid) not in (None, "Z")  # the pause processes live on
    pods.start()
    for i in ids:
        assert status(pods, i).status.state == cri.SANDBOX_READY
    assert len(net.allocated()) == 2
    for i in ids:
        pods.runtime().StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=i))
        pods.runtime().RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=i))
    assert net.allocated() == []
    for pid in pids:
        assert _is_zombie(pid) is None


def test_retry_after_deadline_returns_the_first_calls_sandbox(server_factory, local_registry, net):
    server = server_factory(MIRRORS + net.server_config(), start=False)
    net.attach(server)
    net.write_conflist(server.conf_dir, slow_seconds=3)
    server.start()
    try:
        config = pod_config("retry")
        with pytest.raises(grpc.RpcError) as err:
            run(server, config, timeout=1)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        sandbox_id = run(server, config, timeout=60)  # the kubelet's retry, same pod and attempt
        assert status(server, sandbox_id).status.state == cri.SANDBOX_READY
        assert len(server.runtime().ListPodSandbox(cri.ListPodSandboxRequest()).items) == 1
        assert len(net.allocated()) == 1
    finally:
        _remove_all(server)


def test_daemon_killed_mid_creation_cleans_up_on_start(server_factory, local_registry, net):
    server = server_factory(MIRRORS + net.server_config(), start=False)
    net.attach(server)
    net.write_conflist(server.conf_dir, slow_seconds=2)
    server.start()
    try:
        with pytest.raises(grpc.RpcError):
            run(server, pod_config("midway"), timeout=0.5)
        server.terminate(signal.SIGKILL)
        wait_for(lambda: len(net.allocated()) == 1, what="the slow plugin to finish its ADD")
        server.start()
        _assert_nothing_left(server, net)
    finally:
        _remove_all(server)


def _network_ready(server) -> bool:
    conditions = server.runtime().Status(cri.StatusRequest()).status.conditions
    return next(c.status for c in conditions if c.type == "NetworkReady")


def _update_pod_cidr(server, cidr: str) -> None:
    config = cri.RuntimeConfig(network_config=cri.NetworkConfig(pod_cidr=cidr))
    server.runtime().UpdateRuntimeConfig(cri.UpdateRuntimeConfigRequest(runtime_config=config))


def test_pod_cidr_from_the_kubelet_renders_the_network(server_factory, local_registry, net, tmp_path):
    """UpdateRuntimeConfig with a conf template: the pod network appears with the
    node's CIDR, pods get addresses from it, and the CIDR is remembered."""
    template = tmp_path / "cni-template.json"
    template.write_text(
        '{"cniVersion": "1.0.0", "name": "%s", "plugins": [{"type": "bridge", "bridge": "%s", '
        '"isGateway": true, "ipMasq": false, "ipam": {"type": "host-local", "ranges": ${POD_CIDR_RANGES}, '
        '"routes": ${ROUTES}, "dataDir": "%s"}}]}' % (net.name, net.bridge, net.ipam_dir)
    )
    server = server_factory(MIRRORS + net.server_config(), start=False)
    server.cni_conf_template = str(template)
    net.attach(server)
    server.start()
    try:
        assert not _network_ready(server)
        for bad in ("10.0.0.0/40", "zzz"):
            with pytest.raises(grpc.RpcError) as err:
                _update_pod_cidr(server, bad)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert not os.listdir(server.conf_dir) and not _network_ready(server)
        _update_pod_cidr(server, "")  # what the kubelet sends before the node has a CIDR
        assert not os.listdir(server.conf_dir)
        _update_pod_cidr(server, str(net.subnet))
        wait_for(lambda: _network_ready(server), what="NetworkReady from the rendered config")
        sandbox_id = run(server, pod_config("cidr"))
        assert net.contains(status(server, sandbox_id).status.network.ip)
        info = server.runtime().Status(cri.StatusRequest(verbose=True)).info
        assert json.loads(info["podCIDRs"]) == [str(net.subnet)]
        server.terminate()
        server.start()  # the kubelet only calls again on a change: the CIDR must survive a restart
        info = server.runtime().Status(cri.StatusRequest(verbose=True)).info
        assert json.loads(info["podCIDRs"]) == [str(net.subnet)]
    finally:
        _remove_all(server)
