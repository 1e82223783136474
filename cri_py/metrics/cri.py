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
