"""Stats samples as the CRI's ContainerStats and PodSandboxStats messages (the edge).

A value cri-py cannot know right now (a container that just exited, a pod without a
cgroup of its own) is left unset, never reported as zero: the kubelet treats a
missing value as "unknown" and a zero as a fact.
"""

from __future__ import annotations

from cri_api.v1 import api_pb2 as cri

from cri_py.container.model import Container
from cri_py.metrics.cgroups import MemoryStats
from cri_py.metrics.stats import ContainerSample, PodSample
from cri_py.sandbox.model import Sandbox


def _set(message, field: str, value: int | None) -> None:  # noqa: ANN001 - a protobuf message
    if value is not None:
        getattr(message, field).value = max(0, int(value))


def cpu_usage(timestamp: int, usage_ns: int | None, nano_cores: int | float | None) -> cri.CpuUsage:
    cpu = cri.CpuUsage(timestamp=timestamp)
    _set(cpu, "usage_core_nano_seconds", usage_ns)
    _set(cpu, "usage_nano_cores", None if nano_cores is None else int(nano_cores))
    return cpu


def memory_usage(timestamp: int, memory: MemoryStats | None) -> cri.MemoryUsage:
    usage = cri.MemoryUsage(timestamp=timestamp)
    if memory is not None:
        _set(usage, "working_set_bytes", memory.working_set_bytes)
        _set(usage, "available_bytes", memory.available_bytes)
        _set(usage, "usage_bytes", memory.usage_bytes)
        _set(usage, "rss_bytes", memory.rss_bytes)
        _set(usage, "page_faults", memory.page_faults)
        _set(usage, "major_page_faults", memory.major_page_faults)
    return usage


def container_stats(container: Container, sample: ContainerSample | None, mountpoint: str) -> cri.ContainerStats:
    """One container's stats; without a sample (not running) only its attributes."""
    cfg = container.config
    stats = cri.ContainerStats(
        attributes=cri.ContainerAttributes(
            id=container.id,
            metadata=cri.ContainerMetadata(name=cfg.name, attempt=cfg.attempt),
            labels=cfg.labels,
            annotations=cfg.annotations,
        )
    )
    if sample is None:
        return stats
    stats.cpu.CopyFrom(cpu_usage(sample.timestamp_ns, sample.cpu_usage_ns, sample.usage_nano_cores))
    stats.memory.CopyFrom(memory_usage(sample.timestamp_ns, sample.memory))
    layer = cri.FilesystemUsage(timestamp=sample.timestamp_ns, fs_id=cri.FilesystemIdentifier(mountpoint=mountpoint))
    _set(layer, "used_bytes", sample.writable_bytes)
    _set(layer, "inodes_used", sample.writable_inodes)
    stats.writable_layer.CopyFrom(layer)
    return stats


def sandbox_stats(sandbox: Sandbox, sample: PodSample | None, containers: list[cri.ContainerStats]) -> cri.PodSandboxStats:
    """One pod's stats: its cgroup, its network interfaces, process count and containers."""
    cfg = sandbox.config
    stats = cri.PodSandboxStats(
        attributes=cri.PodSandboxAttributes(
            id=sandbox.id,
            metadata=cri.PodSandboxMetadata(name=cfg.name, uid=cfg.uid, namespace=cfg.namespace, attempt=cfg.attempt),
            labels=cfg.labels,
            annotations=cfg.annotations,
        )
    )
    linux = stats.linux
    linux.containers.extend(containers)
    if sample is None:
        return stats
    linux.cpu.CopyFrom(cpu_usage(sample.timestamp_ns, sample.cpu_usage_ns, sample.usage_nano_cores))
    linux.memory.CopyFrom(memory_usage(sample.timestamp_ns, sample.memory))
    process = cri.ProcessUsage(timestamp=sample.timestamp_ns)
    _set(process, "process_count", sample.pids)
    linux.process.CopyFrom(process)
    interfaces = []
    for link in sample.network:
        usage = cri.NetworkInterfaceUsage(name=link.name)
        for field in ("rx_bytes", "rx_errors", "tx_bytes", "tx_errors"):
            _set(usage, field, getattr(link, field))
        interfaces.append(usage)
    network = cri.NetworkUsage(timestamp=sample.timestamp_ns, interfaces=interfaces)
    default = next((i for i in interfaces if i.name == "eth0"), interfaces[0] if interfaces else None)
    if default is not None:
        network.default_interface.CopyFrom(default)
    linux.network.CopyFrom(network)
    return stats


# --- cadvisor-compatible metrics (ListMetricDescriptors / ListPodSandboxMetrics) ----------

CONTAINER_LABELS = ["id", "name", "image", "container", "pod", "namespace"]
NETWORK_LABELS = CONTAINER_LABELS + ["interface"]

# name -> (help, labels, type); the kubelet serves these on /metrics/cadvisor
DESCRIPTORS: dict[str, tuple[str, list[str], int]] = {
    "container_cpu_usage_seconds_total": ("Cumulative cpu time consumed in seconds.", CONTAINER_LABELS, cri.COUNTER),
    "container_memory_usage_bytes": (
        "Current memory usage in bytes, including all memory regardless of when it was accessed.",
        CONTAINER_LABELS, cri.GAUGE),
    "container_memory_working_set_bytes": ("Current working set in bytes.", CONTAINER_LABELS, cri.GAUGE),
    "container_memory_rss": ("Size of RSS in bytes.", CONTAINER_LABELS, cri.GAUGE),
    "container_memory_failures_total": ("Cumulative count of memory allocation failures.",
                                        CONTAINER_LABELS + ["failure_type", "scope"], cri.COUNTER),
    "container_spec_memory_limit_bytes": ("Memory limit for the container.", CONTAINER_LABELS, cri.GAUGE),
    "container_processes": ("Number of processes running inside the container.", CONTAINER_LABELS, cri.GAUGE),
    "container_network_receive_bytes_total": ("Cumulative count of bytes received", NETWORK_LABELS, cri.COUNTER),
    "container_network_receive_errors_total": ("Cumulative count of errors encountered while receiving",
                                               NETWORK_LABELS, cri.COUNTER),
    "container_network_transmit_bytes_total": ("Cumulative count of bytes transmitted", NETWORK_LABELS, cri.COUNTER),
    "container_network_transmit_errors_total": ("Cumulative count of errors encountered while transmitting",
                                                NETWORK_LABELS, cri.COUNTER),
}


def metric_descriptors() -> list[cri.MetricDescriptor]:
    return [cri.MetricDescriptor(name=name, help=text, label_keys=labels) for name, (text, labels, _) in DESCRIPTORS.items()]


def _metric(name: str, timestamp: int, labels: list[str], value: int | float | None) -> cri.Metric | None:
    if value is None:
        return None
    metric = cri.Metric(name=name, timestamp=timestamp, metric_type=DESCRIPTORS[name][2], label_values=labels)
    metric.value.value = max(0, int(value))
    return metric


def _usage_metrics(timestamp: int, labels: list[str], cpu_ns: int | None, memory: MemoryStats | None,
                   pids: int | None) -> list[cri.Metric]:
    values: list[tuple[str, list[str], int | float | None]] = [
        ("container_cpu_usage_seconds_total", labels, None if cpu_ns is None else cpu_ns // 1_000_000_000),
        ("container_processes", labels, pids),
    ]
    if memory is not None:
        values += [
            ("container_memory_usage_bytes", labels, memory.usage_bytes),
            ("container_memory_working_set_bytes", labels, memory.working_set_bytes),
            ("container_memory_rss", labels, memory.rss_bytes),
            ("container_spec_memory_limit_bytes", labels, memory.limit_bytes),
            ("container_memory_failures_total", labels + ["pgfault", "container"], memory.page_faults),
            ("container_memory_failures_total", labels + ["pgmajfault", "container"], memory.major_page_faults),
        ]
    return [m for m in (_metric(name, timestamp, lv, v) for name, lv, v in values) if m is not None]


def pod_metrics(
    sandbox: Sandbox,
    sample: PodSample | None,
    containers: list[tuple[Container, ContainerSample | None, str]],
) -> cri.PodSandboxMetrics:
    """One pod's metric samples: the pod's own (as cadvisor's "POD" container) and its containers'.

    `containers` holds (container, sample, image name) for each container of the pod.
    """
    pod, namespace = sandbox.config.name, sandbox.config.namespace
    out = cri.PodSandboxMetrics(pod_sandbox_id=sandbox.id)
    if sample is not None:
        labels = [sandbox.id, sandbox.id, sandbox.image_id, "POD", pod, namespace]
        out.metrics.extend(_usage_metrics(sample.timestamp_ns, labels, sample.cpu_usage_ns, sample.memory, sample.pids))
        for link in sample.network:
            link_labels = labels + [link.name]
            for name, value in (
                ("container_network_receive_bytes_total", link.rx_bytes),
                ("container_network_receive_errors_total", link.rx_errors),
                ("container_network_transmit_bytes_total", link.tx_bytes),
                ("container_network_transmit_errors_total", link.tx_errors),
            ):
                metric = _metric(name, sample.timestamp_ns, link_labels, value)
                if metric is not None:
                    out.metrics.append(metric)
    for container, container_sample, image in containers:
        entry = cri.ContainerMetrics(container_id=container.id)
        if container_sample is not None:
            labels = [container.id, container.id, image, container.config.name, pod, namespace]
            entry.metrics.extend(_usage_metrics(
                container_sample.timestamp_ns, labels, container_sample.cpu_usage_ns, container_sample.memory,
                container_sample.pids))
        out.container_metrics.append(entry)
    return out
