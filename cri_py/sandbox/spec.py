"""The OCI runtime spec of a pod's pause container.

The pause container holds the pod's namespaces: new PID, IPC and UTS namespaces
unless the pod shares the node's, and the pod's network namespace (pinned by us, not
created by runc, so it outlives the pause process for CNI DEL).
"""

from __future__ import annotations

from typing import Any

from cri_py.container.seccomp import profile_for
from cri_py.runtime.spec import (
    DEFAULT_CAPABILITIES,
    DEFAULT_PATH_ENV,
    MASKED_PATHS,
    READONLY_PATHS,
    all_capabilities,
    base_mounts,
    capability_set,
    cgroups_path,
    clamp_oom_score_adj,
)
from cri_py.sandbox.files import pod_hostname
from cri_py.sandbox.model import NODE, Sandbox

PAUSE_OOM_SCORE_ADJ = -998  # what the kubelet's QoS gives a pod's infrastructure
PAUSE_CPU_SHARES = 2


def _user(sandbox: Sandbox, image_user: str) -> dict[str, Any]:
    """run_as_user/group from the pod, else the image's numeric User, else root."""
    cfg = sandbox.config
    uid, gid = 0, 0
    name, _, group = image_user.partition(":")
    if name.isdigit():
        uid = int(name)
        gid = int(group) if group.isdigit() else uid
    if cfg.run_as_user is not None:
        uid = cfg.run_as_user
        gid = uid if cfg.run_as_group is None else gid
    if cfg.run_as_group is not None:
        gid = cfg.run_as_group
    user: dict[str, Any] = {"uid": uid, "gid": gid}
    if cfg.supplemental_groups:
        user["additionalGids"] = list(cfg.supplemental_groups)
    return user


def _namespaces(sandbox: Sandbox) -> list[dict[str, str]]:
    cfg = sandbox.config
    namespaces = [{"type": "mount"}]
    if cfg.pid_mode != NODE:
        namespaces.append({"type": "pid"})
    if cfg.ipc_mode != NODE:
        namespaces.append({"type": "ipc"})
    if not cfg.host_network:
        namespaces.append({"type": "uts"})
        namespaces.append({"type": "network", "path": sandbox.netns_path})
    return namespaces


def pause_spec(
    sandbox: Sandbox, rootfs: str, args: list[str], env: list[str], image_user: str, cgroup_driver: str
) -> dict[str, Any]:
    """The whole config.json for the pause container."""
    cfg = sandbox.config
    caps = all_capabilities() if cfg.privileged else DEFAULT_CAPABILITIES
    shm_source = sandbox.shm_path or ("/dev/shm" if cfg.ipc_mode == NODE else None)
    linux: dict[str, Any] = {
        "namespaces": _namespaces(sandbox),
        "cgroupsPath": cgroups_path(cgroup_driver, cfg.cgroup_parent, sandbox.id),
        "resources": {"cpu": {"shares": PAUSE_CPU_SHARES}, "devices": [{"allow": False, "access": "rwm"}]},
        "sysctl": dict(cfg.sysctls),
    }
    if not cfg.privileged:
        linux["maskedPaths"] = list(MASKED_PATHS)
        linux["readonlyPaths"] = list(READONLY_PATHS)
    seccomp = profile_for(cfg.seccomp.kind, cfg.seccomp.localhost_ref, set(caps), cfg.privileged)
    if seccomp is not None:
        linux["seccomp"] = seccomp
    spec: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": _user(sandbox, image_user),
            "args": args,
            "env": env or [DEFAULT_PATH_ENV],
            "cwd": "/",
            "capabilities": capability_set(caps),
            "noNewPrivileges": not cfg.privileged,
            "oomScoreAdj": clamp_oom_score_adj(PAUSE_OOM_SCORE_ADJ),
        },
        "root": {"path": rootfs, "readonly": cfg.readonly_rootfs},
        "mounts": base_mounts(shm_source, cfg.privileged),
        "linux": linux,
        "annotations": {
            "io.kubernetes.cri.container-type": "sandbox",
            "io.kubernetes.cri.sandbox-id": sandbox.id,
            "io.kubernetes.cri.sandbox-name": cfg.name,
            "io.kubernetes.cri.sandbox-namespace": cfg.namespace,
            "io.kubernetes.cri.sandbox-uid": cfg.uid,
        },
    }
    if not cfg.host_network:
        spec["hostname"] = pod_hostname(cfg.hostname, cfg.host_network)
    return spec
