"""Seccomp profiles: the RuntimeDefault profile and the CRI's profile choices.

RuntimeDefault denies (EPERM) the syscalls that let a container reach past its
namespaces: kernel modules, kexec, mounts and new namespaces, tracing other
processes, keyrings, clock setting, BPF and perf, swap, reboot. It allows the rest,
the way Docker's and containerd's default profiles behave for ordinary programs. A
capability that legitimately needs a syscall (CAP_SYS_ADMIN for mount, CAP_SYS_PTRACE
for ptrace, CAP_SYS_TIME for clock setting...) re-allows it, as Docker's profile does.
"""

from __future__ import annotations

import json
import os
import platform
from typing import Any

from cri_py.errors import InvalidArgument

EPERM = 1

# syscall -> the capability that re-allows it (None: always denied)
DENIED: dict[str, str | None] = {
    "acct": "CAP_SYS_PACCT",
    "add_key": None,
    "bpf": "CAP_SYS_ADMIN",
    "clock_adjtime": "CAP_SYS_TIME",
    "clock_settime": "CAP_SYS_TIME",
    "create_module": "CAP_SYS_MODULE",
    "delete_module": "CAP_SYS_MODULE",
    "finit_module": "CAP_SYS_MODULE",
    "fsconfig": "CAP_SYS_ADMIN",
    "fsmount": "CAP_SYS_ADMIN",
    "fsopen": "CAP_SYS_ADMIN",
    "fspick": "CAP_SYS_ADMIN",
    "get_kernel_syms": "CAP_SYS_MODULE",
    "init_module": "CAP_SYS_MODULE",
    "ioperm": "CAP_SYS_RAWIO",
    "iopl": "CAP_SYS_RAWIO",
    "kcmp": "CAP_SYS_PTRACE",
    "kexec_file_load": "CAP_SYS_BOOT",
    "kexec_load": "CAP_SYS_BOOT",
    "keyctl": None,
    "lookup_dcookie": "CAP_SYS_ADMIN",
    "mount": "CAP_SYS_ADMIN",
    "mount_setattr": "CAP_SYS_ADMIN",
    "move_mount": "CAP_SYS_ADMIN",
    "name_to_handle_at": "CAP_DAC_READ_SEARCH",
    "nfsservctl": None,
    "open_by_handle_at": "CAP_DAC_READ_SEARCH",
    "open_tree": "CAP_SYS_ADMIN",
    "perf_event_open": "CAP_PERFMON",
    "pivot_root": "CAP_SYS_ADMIN",
    "process_vm_readv": "CAP_SYS_PTRACE",
    "process_vm_writev": "CAP_SYS_PTRACE",
    "ptrace": "CAP_SYS_PTRACE",
    "query_module": "CAP_SYS_MODULE",
    "quotactl": "CAP_SYS_ADMIN",
    "reboot": "CAP_SYS_BOOT",
    "request_key": None,
    "setns": "CAP_SYS_ADMIN",
    "settimeofday": "CAP_SYS_TIME",
    "stime": "CAP_SYS_TIME",
    "swapoff": "CAP_SYS_ADMIN",
    "swapon": "CAP_SYS_ADMIN",
    "syslog": "CAP_SYSLOG",
    "umount": "CAP_SYS_ADMIN",
    "umount2": "CAP_SYS_ADMIN",
    "unshare": "CAP_SYS_ADMIN",
    "uselib": None,
    "userfaultfd": "CAP_SYS_PTRACE",
    "ustat": None,
    "vm86": None,
    "vm86old": None,
}

_ARCHES = {
    "x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
    "ppc64le": ["SCMP_ARCH_PPC64LE"],
    "s390x": ["SCMP_ARCH_S390X", "SCMP_ARCH_S390"],
    "riscv64": ["SCMP_ARCH_RISCV64"],
}


def default_profile(capabilities: set[str]) -> dict[str, Any]:
    """The RuntimeDefault profile for a process holding `capabilities`."""
    denied = sorted(name for name, cap in DENIED.items() if cap is None or cap not in capabilities)
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": _ARCHES.get(platform.machine(), []),
        "syscalls": [{"names": denied, "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM}],
    }


def load_localhost(path: str) -> dict[str, Any]:
    """A Localhost profile: an absolute path to an OCI seccomp JSON file on the node."""
    if not os.path.isabs(path):
        raise InvalidArgument(f"seccomp localhost profile {path!r} must be an absolute path")
    try:
        with open(path, "rb") as fh:
            profile = json.load(fh)
    except FileNotFoundError:
        raise InvalidArgument(f"seccomp localhost profile {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"seccomp localhost profile {path}: {exc}") from None
    if not isinstance(profile, dict) or "defaultAction" not in profile:
        raise InvalidArgument(f"seccomp localhost profile {path} has no defaultAction")
    return profile


def profile_for(kind: str, localhost_ref: str, capabilities: set[str], privileged: bool) -> dict[str, Any] | None:
    """The spec's linux.seccomp for a CRI SecurityProfile; None means unconfined.

    `kind` is "runtime_default", "unconfined" or "localhost" (the CRI enum, lowered).
    Privileged containers run unconfined, as in every CRI runtime.
    """
    if privileged or kind == "unconfined":
        return None
    if kind == "runtime_default":
        return default_profile(capabilities)
    if kind == "localhost":
        return load_localhost(localhost_ref)
    raise InvalidArgument(f"unknown seccomp profile type {kind!r}")
