"""OCI runtime spec pieces every container (pause included) starts from.

The defaults match what containerd and CRI-O give a container, because workloads
and critest expect them: the same default capability set, the same masked and
read-only /proc paths, the same base mounts.
"""

from __future__ import annotations

import os
from typing import Any

DEFAULT_CAPABILITIES = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]

MASKED_PATHS = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
]

READONLY_PATHS = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
]

DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def all_capabilities() -> list[str]:
    """Every capability we can grant (privileged containers, "ALL"): those of the kernel
    that are in our own bounding set.

    A node running inside a restricted environment (no CAP_SYS_RESOURCE here, say)
    cannot hand out what it lacks; asking runc for it fails "unable to apply caps".
    """
    try:
        with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as fh:
            last = int(fh.read())
    except OSError:
        last = 40
    bounding = _own_bounding_set()
    names = _CAP_NAMES[: last + 1]
    return [f"CAP_{name}" for bit, name in enumerate(names) if bounding >> bit & 1]


def _own_bounding_set() -> int:
    """CapBnd of this process, as a bit mask (all bits when it cannot be read)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("CapBnd:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return (1 << 64) - 1


_CAP_NAMES = [
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
]


def capability_set(caps: list[str]) -> dict[str, list[str]]:
    """The same list in every set runc applies (ambient stays empty, as in containerd)."""
    return {"bounding": list(caps), "effective": list(caps), "permitted": list(caps)}


def base_mounts(shm_source: str | None, privileged: bool = False) -> list[dict[str, Any]]:
    """proc, /dev, devpts, /dev/shm, mqueue, /sys and the cgroup fs."""
    sys_options = ["nosuid", "noexec", "nodev"] + ([] if privileged else ["ro"])
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": sys_options},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime"] + ([] if privileged else ["ro"])},
    ]
    if shm_source:
        mounts.append({"destination": "/dev/shm", "type": "bind", "source": shm_source, "options": ["rbind", "rprivate", "rw"]})
    else:
        mounts.append({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                       "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]})
    return mounts


def cgroups_path(driver: str, parent: str, container_id: str) -> str:
    """The spec's cgroupsPath for the cgroupfs or systemd driver.

    systemd: `slice:prefix:name`; the kubelet passes a slice name as the parent
    (e.g. `kubepods-besteffort-pod123.slice`). cgroupfs: a path under the parent.
    """
    if driver == "systemd":
        slice_name = os.path.basename(parent) if parent else "system.slice"
        if not slice_name.endswith(".slice"):
            slice_name = "system.slice"
        return f"{slice_name}:cri-py:{container_id}"
    return f"{parent.rstrip('/') or '/cri-py'}/{container_id}"


def own_oom_score_adj() -> int:
    """The daemon's own oom_score_adj: the floor a child may ask for without CAP_SYS_RESOURCE."""
    try:
        with open("/proc/self/oom_score_adj", encoding="ascii") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return 0


def clamp_oom_score_adj(wanted: int) -> int:
    """Never below our own: lowering needs CAP_SYS_RESOURCE, which we may lack (runc then fails)."""
    return max(wanted, own_oom_score_adj())
