"""Stats as the kubelet's summary API reads them: CPU, memory, processes, network move the right way."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from cri_api.v1 import api_pb2 as cri

from tests.e2e.conftest import Pod, server_with_network, wait_for


@pytest.fixture
def pods(server_factory, local_registry, tmp_path, request):
    """Two pods in one network (with cgroup parents of their own), removed at the end."""
    server, net = server_with_network(server_factory, tmp_path, request)
    runtime = server.runtime()
    made = []
    try:
        for name in ("stats-a", "stats-b"):
            config = cri.PodSandboxConfig(
                metadata=cri.PodSandboxMetadata(name=name, namespace="e2e", uid=f"uid-{name}"),
                log_directory=str(tmp_path / name),
            )
            config.linux.cgroup_parent = f"/cri-py-e2e-{name}-{abs(hash(request.node.name))}"
            sandbox_id = runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=120).pod_sandbox_id
            made.append(Pod(server, sandbox_id, config, tmp_path / name))
        yield made
    finally:
        for item in runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items:
            runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=item.id), timeout=120)
        for pod in made:  # the pods' parent cgroups are the test's own
            for controller in ("cpu", "cpuacct", "memory", "pids", "cpuset", "devices", "freezer", "blkio", "systemd"):
                subprocess.run(["rmdir", f"/sys/fs/cgroup/{controller}{pod.config.linux.cgroup_parent}"],
                               capture_output=True)
        net.cleanup()


def _container_stats(pod: Pod, container_id: str) -> cri.ContainerStats:
    return pod.runtime.ContainerStats(cri.ContainerStatsRequest(container_id=container_id)).stats


def test_cpu_and_memory_move_the_right_way(pods):
    pod = pods[0]
    burner = pod.run("burner", ["sh", "-c", "while true; do :; done"])
    holder = pod.run("holder", ["sh", "-c", "x=$(head -c 30000000 /dev/zero | tr '\\0' a); echo held; sleep 1000; echo bye"])
    wait_for(lambda: "held" in pod.log("holder"), timeout=30, what="the memory to be held")
    first = _container_stats(pod, burner)
    time.sleep(1.5)  # a CPU rate needs two samples at least a second apart
    second = _container_stats(pod, burner)
    assert second.cpu.usage_core_nano_seconds.value > first.cpu.usage_core_nano_seconds.value
    assert second.cpu.usage_nano_cores.value > 300_000_000  # a busy loop: well over 0.3 of a core
    held = _container_stats(pod, holder)
    assert held.memory.working_set_bytes.value > 25_000_000
    assert held.memory.usage_bytes.value >= held.memory.working_set_bytes.value
    assert held.writable_layer.inodes_used.value >= 1 and held.writable_layer.fs_id.mountpoint
    assert held.attributes.metadata.name == "holder"
    listed = pod.runtime.ListContainerStats(cri.ListContainerStatsRequest(
        filter=cri.ContainerStatsFilter(pod_sandbox_id=pod.id))).stats
    assert {s.attributes.id for s in listed} == {burner, holder}
    by_label = pod.runtime.ListContainerStats(cri.ListContainerStatsRequest(
        filter=cri.ContainerStatsFilter(label_selector={"name": "burner"}))).stats
    assert [s.attributes.id for s in by_label] == [burner]
    sandbox = pod.runtime.PodSandboxStats(cri.PodSandboxStatsRequest(pod_sandbox_id=pod.id)).stats
    assert sandbox.linux.memory.working_set_bytes.value > 25_000_000
    assert sandbox.linux.process.process_count.value >= 3  # pause, the loop, the holder
    assert {c.attributes.id for c in sandbox.linux.containers} == {burner, holder}


def test_pod_network_bytes_grow_after_traffic(pods):
    a, b = pods
    runtime = a.runtime
    ip_b = runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=b.id)).status.network.ip
    netns_a = json.loads(runtime.PodSandboxStatus(
        cri.PodSandboxStatusRequest(pod_sandbox_id=a.id, verbose=True)).info["info"])["netnsPath"]

    def rx_tx(pod):
        stats = runtime.PodSandboxStats(cri.PodSandboxStatsRequest(pod_sandbox_id=pod.id)).stats.linux.network
        assert stats.default_interface.name == "eth0"
        return stats.default_interface.rx_bytes.value, stats.default_interface.tx_bytes.value

    before_a, before_b = rx_tx(a), rx_tx(b)
    result = subprocess.run(["nsenter", f"--net={netns_a}", "busybox", "ping", "-c", "5", "-s", "1000", "-i", "0.2",
                             ip_b], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    after_a, after_b = rx_tx(a), rx_tx(b)
    assert after_a[1] - before_a[1] >= 5000 and after_b[0] - before_b[0] >= 5000
    listed = runtime.ListPodSandboxStats(cri.ListPodSandboxStatsRequest()).stats
    assert {s.attributes.id for s in listed} == {a.id, b.id}


def test_cadvisor_metrics_through_the_cri(pods):
    pod = pods[0]
    runtime = pod.runtime
    burner = pod.run("metrics-burner", ["sh", "-c", "i=0; while [ $i -lt 3000000 ]; do i=$((i+1)); done; sleep 1000"])
    descriptors = {d.name: list(d.label_keys) for d in runtime.ListMetricDescriptors(
        cri.ListMetricDescriptorsRequest()).descriptors}
    for family in ("container_cpu_usage_seconds_total", "container_memory_working_set_bytes", "container_memory_rss",
                   "container_network_receive_bytes_total", "container_network_transmit_bytes_total"):
        assert family in descriptors

    def burner_cpu():
        response = runtime.ListPodSandboxMetrics(cri.ListPodSandboxMetricsRequest())
        ours = [p for p in response.pod_metrics if p.pod_sandbox_id == pod.id][0]
        for m in [*ours.metrics, *(m for c in ours.container_metrics for m in c.metrics)]:
            assert len(m.label_values) == len(descriptors[m.name]), m.name
        cpu = [m for c in ours.container_metrics if c.container_id == burner for m in c.metrics
               if m.name == "container_cpu_usage_seconds_total"]
        return (ours, cpu[0]) if cpu and cpu[0].value.value >= 1 else None

    ours, cpu = wait_for(burner_cpu, timeout=60, interval=0.5, what="a second of CPU in the burner")
    assert cpu.metric_type == cri.COUNTER
    labels = dict(zip(descriptors[cpu.name], cpu.label_values))
    assert labels["container"] == "metrics-burner" and labels["pod"] == "stats-a" and labels["namespace"] == "e2e"
    rx = [m for m in ours.metrics if m.name == "container_network_receive_bytes_total"]
    assert [dict(zip(descriptors[m.name], m.label_values))["interface"] for m in rx] == ["eth0"]
    working_set = [m for m in ours.metrics if m.name == "container_memory_working_set_bytes"]
    assert working_set and working_set[0].value.value > 0
