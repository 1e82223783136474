"""Container and pod usage samples for ListContainerStats / ListPodSandboxStats.

The kubelet's summary API builds on these: CPU (cumulative and as a rate), memory
with the working set it evicts on, pid counts, the writable layer's disk use and
the pod's network counters. The CRI edge turns the plain dataclasses here into
protobuf; nothing here knows gRPC.

Two numbers need state kept between calls, which is what `StatsCollector` is for:
- `usage_nano_cores` is a rate: the CPU time used since the previous sample of the
  same key over the wall time between them, as cadvisor and containerd report it.
  The first sample of a key has none (None).
- The writable layer's size is a directory walk of the overlay upper dir, too slow to
  repeat for 110 containers on every call, so it is cached per upper dir for a
  short TTL (10 s by default): the number reported may be up to that old.

Pod network counters come from /proc/<pause pid>/net/dev (the pause lives in the
pod's netns), falling back to a netlink dump inside the pinned netns.

All methods block on file reads (the netlink fallback runs in a throw-away thread);
the daemon calls them via asyncio.to_thread, possibly from
several threads at once, so the shared state sits behind one lock.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cri_py.diskusage import disk_usage
from cri_py.metrics.cgroups import (
    CgroupDirs,
    MemoryStats,
    cgroup_dirs,
    parent_dirs,
    read_cpu,
    read_memory,
    read_pids,
    read_text,
)
from cri_py.network import netns

log = logging.getLogger(__name__)

WRITABLE_TTL_S = 10.0
# Two callers (say the eviction manager and a metrics-server scrape) can ask
# milliseconds apart; a rate over such a window is noise, so a sample closer than this
# to the previous one repeats the previous rate and keeps the older baseline.
MIN_CPU_WINDOW_S = 1.0

InterfaceStatsFn = Callable[[str], dict[str, dict[str, int]]]


@dataclass(frozen=True)
class InterfaceSample:
    """Counters of one network interface in the pod's namespace."""

    name: str
    rx_bytes: int
    rx_errors: int
    tx_bytes: int
    tx_errors: int


@dataclass(frozen=True)
class ContainerSample:
    """One container's usage at timestamp_ns (wall clock). None: not known right now."""

    timestamp_ns: int
    cpu_usage_ns: int | None
    usage_nano_cores: int | None
    memory: MemoryStats | None
    pids: int | None
    writable_bytes: int | None
    writable_inodes: int | None


@dataclass(frozen=True)
class PodSample:
    """One pod's usage: its cgroup (all its containers) and its network namespace."""

    timestamp_ns: int
    cpu_usage_ns: int | None
    usage_nano_cores: int | None
    memory: MemoryStats | None
    pids: int | None
    network: list[InterfaceSample]


@dataclass(frozen=True)
class _CpuMark:
    """The baseline for the next rate: when (monotonic ns), how much CPU, and the last rate."""

    mono_ns: int
    usage_ns: int
    nano_cores: int | None


@dataclass(frozen=True)
class _Usage:
    expires_ns: int
    bytes: int
    inodes: int


def nano_cores(prev_usage_ns: int, prev_mono_ns: int, usage_ns: int, mono_ns: int) -> int | None:
    """CPU use between two samples in billionths of a core; None if the pair makes no rate.

    No rate when time did not advance or the counter went backwards (a new cgroup
    reused the key): reporting 0 or a huge number there would mislead autoscalers.
    """
    elapsed = mono_ns - prev_mono_ns
    used = usage_ns - prev_usage_ns
    if elapsed <= 0 or used < 0:
        return None
    return round(used * 1_000_000_000 / elapsed)


def parse_net_dev(text: str) -> dict[str, dict[str, int]]:
    """/proc/<pid>/net/dev → {interface: rx/tx bytes and errors}, the shape interface_stats returns.

    After two header lines each line is `name: 8 receive counters 8 transmit counters`
    (bytes, packets, errs, ...); the kernel prints the 64-bit counters, the same
    numbers netlink's IFLA_STATS64 carries. Very long names or values may leave no
    space after the colon, so the line is split at the colon.
    """
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        fields = rest.split()
        if not sep or len(fields) < 16:
            continue
        try:
            out[name.strip()] = {
                "rx_bytes": int(fields[0]),
                "rx_errors": int(fields[2]),
                "tx_bytes": int(fields[8]),
                "tx_errors": int(fields[10]),
            }
        except ValueError:
            continue
    return out


def same_netns(pid: int, netns_path: str) -> bool:
    """True if process `pid` lives in the network namespace pinned at `netns_path`.

    Both name an nsfs inode; equal (dev, inode) is the same namespace. This guards
    the /proc/<pid>/net fast path against a dead pause or a reused pid.
    """
    try:
        pinned = os.stat(netns_path)
        current = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return False
    return (pinned.st_dev, pinned.st_ino) == (current.st_dev, current.st_ino)


def _interfaces(raw: dict[str, dict[str, int]]) -> list[InterfaceSample]:
    """Non-loopback interfaces, sorted by name: cadvisor leaves `lo` out of pod network stats."""
    return [
        InterfaceSample(name, c.get("rx_bytes", 0), c.get("rx_errors", 0), c.get("tx_bytes", 0), c.get("tx_errors", 0))
        for name, c in sorted(raw.items())
        if name != "lo"
    ]


class StatsCollector:
    """Samples containers and pods, keeping what rates and the disk-use cache need.

    Keys are container or sandbox ids (they never collide). Call `forget(key)` when a
    container or sandbox is removed, or its baseline and cache entry stay behind.
    """

    def __init__(
        self,
        *,
        writable_ttl_s: float = WRITABLE_TTL_S,
        min_cpu_window_s: float = MIN_CPU_WINDOW_S,
        clock: Callable[[], int] = time.monotonic_ns,
        wall_clock: Callable[[], int] = time.time_ns,
        interface_stats: InterfaceStatsFn | None = None,
    ) -> None:
        self._ttl_ns = int(writable_ttl_s * 1e9)
        self._min_window_ns = int(min_cpu_window_s * 1e9)
        self._clock = clock
        self._wall = wall_clock
        self._interface_stats = interface_stats or netns.interface_stats
        self._lock = threading.Lock()
        self._cpu: dict[str, _CpuMark] = {}
        self._usage: dict[str, _Usage] = {}  # upper dir -> cached walk
        self._upper_of: dict[str, str] = {}  # key -> upper dir, so forget() can drop the cache entry

    # ------------------------------------------------------------ public

    def container(self, key: str, pid: int, upper_dir: str) -> ContainerSample:
        """Usage of a running container (its init `pid`), plus its writable layer at `upper_dir`."""
        dirs = cgroup_dirs(pid)
        timestamp, cpu, rate, memory, pids = self._cgroup_sample(key, dirs)
        writable = self._writable(key, upper_dir)
        return ContainerSample(
            timestamp_ns=timestamp,
            cpu_usage_ns=cpu,
            usage_nano_cores=rate,
            memory=memory,
            pids=pids,
            writable_bytes=writable[0] if writable else None,
            writable_inodes=writable[1] if writable else None,
        )

    def pod(self, key: str, pause_pid: int, cgroup_parent_known: bool, netns_path: str) -> PodSample:
        """Usage of a pod: the parent of its pause container's cgroup, and its netns's links.

        Without a cgroup_parent from the kubelet the pause's parent cgroup is shared by
        every such pod, so CPU, memory and pids are left unknown rather than wrong.
        Host-network pods (no netns_path) have no network stats of their own.
        """
        dirs = parent_dirs(cgroup_dirs(pause_pid)) if cgroup_parent_known else CgroupDirs()
        timestamp, cpu, rate, memory, pids = self._cgroup_sample(key, dirs)
        return PodSample(
            timestamp_ns=timestamp,
            cpu_usage_ns=cpu,
            usage_nano_cores=rate,
            memory=memory,
            pids=pids,
            network=self._network(pause_pid, netns_path),
        )

    def forget(self, key: str) -> None:
        """Drop a removed container's or sandbox's CPU baseline and cached disk use."""
        with self._lock:
            self._cpu.pop(key, None)
            upper = self._upper_of.pop(key, None)
            if upper is not None:
                self._usage.pop(upper, None)

    # ------------------------------------------------------------ internals

    def _cgroup_sample(
        self, key: str, dirs: CgroupDirs
    ) -> tuple[int, int | None, int | None, MemoryStats | None, int | None]:
        """(timestamp, cpu ns, nano cores, memory, pids); the clocks are read next to the CPU counter."""
        timestamp, mono = self._wall(), self._clock()
        cpu = read_cpu(dirs)
        rate = None if cpu is None else self._rate(key, mono, cpu)
        return timestamp, cpu, rate, read_memory(dirs), read_pids(dirs)

    def _rate(self, key: str, mono_ns: int, usage_ns: int) -> int | None:
        """The CPU rate since this key's baseline, moving the baseline unless it is too recent."""
        with self._lock:
            prev = self._cpu.get(key)
            if prev is not None and 0 <= mono_ns - prev.mono_ns < self._min_window_ns and usage_ns >= prev.usage_ns:
                return prev.nano_cores
            rate = None if prev is None else nano_cores(prev.usage_ns, prev.mono_ns, usage_ns, mono_ns)
            self._cpu[key] = _CpuMark(mono_ns, usage_ns, rate)
            return rate

    def _writable(self, key: str, upper_dir: str) -> tuple[int, int] | None:
        """The upper dir's (bytes, inodes), walked at most once per TTL per dir.

        The walk runs outside the lock, so two threads missing the cache at the same
        moment may both walk; that costs time once, never a wrong answer.
        """
        if not upper_dir:
            return None
        now = self._clock()
        with self._lock:
            hit = self._usage.get(upper_dir)
            if hit is not None and now < hit.expires_ns:
                return hit.bytes, hit.inodes
        usage = disk_usage(upper_dir)
        with self._lock:
            if usage is None:
                self._usage.pop(upper_dir, None)
            else:
                self._usage[upper_dir] = _Usage(now + self._ttl_ns, usage[0], usage[1])
                self._upper_of[key] = upper_dir
        return usage

    def _network(self, pause_pid: int, netns_path: str) -> list[InterfaceSample]:
        """Interface counters in the pod's netns; empty when there is none or it just went away.

        /proc/<pause>/net/dev shows the pause's namespace, which is the pod's: a file
        read of ~20 us, where entering the netns in a fresh thread for a netlink dump
        costs ~3 ms per pod (a third of a second per ListPodSandboxStats at 110 pods).
        The netlink path stays for a pause that is gone or not in the pinned netns.
        """
        if not netns_path:
            return []
        if pause_pid > 0 and same_netns(pause_pid, netns_path):
            text = read_text(f"/proc/{pause_pid}/net/dev")
            if text is not None and same_netns(pause_pid, netns_path):  # still the pause after the read
                return _interfaces(parse_net_dev(text))
        try:
            return _interfaces(self._interface_stats(netns_path))
        except Exception as exc:  # a pod being torn down: the stats call must still answer
            log.debug("network stats of %s unavailable: %s", netns_path, exc)
            return []
