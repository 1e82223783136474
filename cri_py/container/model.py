"""Plain data for containers: the config CreateContainer asked for, and the record kept.

The CRI edge (container/cri.py) translates ContainerConfig into these dataclasses;
nothing below it sees protobuf. A Container is persisted as a dict (to_dict/from_dict)
so the daemon rebuilds its view from the store after a restart.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from cri_py.errors import InvalidArgument
from cri_py.sandbox.model import POD, SecurityProfile

# container states: the CRI's ContainerState names, so translation is a lookup
CREATED, RUNNING, EXITED, UNKNOWN = "CONTAINER_CREATED", "CONTAINER_RUNNING", "CONTAINER_EXITED", "CONTAINER_UNKNOWN"
STATES = (CREATED, RUNNING, EXITED, UNKNOWN)

# mount propagation, named by the OCI option each becomes
PRIVATE, RSLAVE, RSHARED = "private", "rslave", "rshared"

# supplemental groups policy
MERGE, STRICT = "merge", "strict"


@dataclass
class Mount:
    """A CRI mount: a host path (or, for an image volume, an image) at container_path."""

    container_path: str
    host_path: str = ""
    readonly: bool = False
    propagation: str = PRIVATE
    selinux_relabel: bool = False
    recursive_read_only: bool = False
    image: str = ""  # set only for an image volume: the image reference to mount
    image_sub_path: str = ""


@dataclass
class Device:
    """A host device node exposed in the container (permissions: a subset of "rwm")."""

    container_path: str
    host_path: str
    permissions: str = "rwm"


@dataclass
class Resources:
    """LinuxContainerResources; zero / empty means "not set" exactly as on the wire."""

    cpu_period: int = 0
    cpu_quota: int = 0
    cpu_shares: int = 0
    memory_limit_in_bytes: int = 0
    oom_score_adj: int = 0
    cpuset_cpus: str = ""
    cpuset_mems: str = ""
    hugepage_limits: list[tuple[str, int]] = field(default_factory=list)  # (page_size e.g. "2MB", limit bytes)
    unified: dict[str, str] = field(default_factory=dict)
    memory_swap_limit_in_bytes: int = 0


@dataclass
class SecurityContext:
    """LinuxContainerSecurityContext, minus what we ignore (ambient caps, AppArmor, SELinux)."""

    capabilities_add: list[str] = field(default_factory=list)
    capabilities_drop: list[str] = field(default_factory=list)
    privileged: bool = False
    network_mode: str = POD
    pid_mode: str = POD
    ipc_mode: str = POD
    target_id: str = ""
    run_as_user: int | None = None
    run_as_group: int | None = None
    run_as_username: str = ""
    readonly_rootfs: bool = False
    supplemental_groups: list[int] = field(default_factory=list)
    supplemental_groups_policy: str = MERGE
    no_new_privs: bool = False
    masked_paths: list[str] = field(default_factory=list)
    readonly_paths: list[str] = field(default_factory=list)
    seccomp: SecurityProfile = field(default_factory=SecurityProfile)


@dataclass
class ContainerConfig:
    """What CreateContainer asked for, as plain data."""

    name: str
    attempt: int = 0
    image: str = ""  # ImageSpec.image as sent (the kubelet sends the image id it pulled)
    user_specified_image: str = ""  # ImageSpec.user_specified_image: the pod spec's string
    command: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    working_dir: str = ""
    envs: list[tuple[str, str]] = field(default_factory=list)
    mounts: list[Mount] = field(default_factory=list)
    devices: list[Device] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    log_path: str = ""  # relative to the sandbox's log_directory, as the CRI sends it
    stdin: bool = False
    stdin_once: bool = False
    tty: bool = False
    stop_signal: str = ""  # a CRI Signal name ("SIGTERM"...); "" = runtime default
    resources: Resources = field(default_factory=Resources)
    security: SecurityContext = field(default_factory=SecurityContext)


class User(NamedTuple):
    """The user a container's process runs as, as the spec and ContainerStatus.user carry it."""

    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()


@dataclass
class Container:
    """A container and everything made for it (empty strings: not made)."""

    id: str
    sandbox_id: str
    config: ContainerConfig
    image_id: str = ""  # the image's config digest
    image_ref: str = ""  # a repo digest of the image, what the kubelet reports as imageID
    state: str = CREATED
    created_at_ns: int = 0
    started_at_ns: int = 0
    finished_at_ns: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    pid: int = 0
    rootfs_path: str = ""
    bundle: str = ""
    log_path: str = ""  # absolute: the sandbox's log_directory joined with config.log_path
    user: User = User(0, 0, ())

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["user"] = {"uid": self.user.uid, "gid": self.user.gid, "additional_gids": list(self.user.additional_gids)}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Container":
        data = {k: v for k, v in data.items() if k in _field_names(cls)}
        data["config"] = _config_from_dict(data["config"])
        user = data.get("user") or {}
        data["user"] = User(int(user.get("uid", 0)), int(user.get("gid", 0)), tuple(user.get("additional_gids", ())))
        return cls(**data)


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """Drop keys a newer (or older) record has that this dataclass does not."""
    return {k: v for k, v in data.items() if k in _field_names(cls)}


def _config_from_dict(data: dict[str, Any]) -> ContainerConfig:
    cfg = _known(ContainerConfig, data)
    cfg["envs"] = [(str(k), str(v)) for k, v in cfg.get("envs", [])]
    cfg["mounts"] = [Mount(**_known(Mount, m)) for m in cfg.get("mounts", [])]
    cfg["devices"] = [Device(**_known(Device, d)) for d in cfg.get("devices", [])]
    res = _known(Resources, cfg.get("resources") or {})
    res["hugepage_limits"] = [(str(size), int(limit)) for size, limit in res.get("hugepage_limits", [])]
    cfg["resources"] = Resources(**res)
    sec = _known(SecurityContext, cfg.get("security") or {})
    sec["seccomp"] = SecurityProfile(**(sec.get("seccomp") or {}))
    cfg["security"] = SecurityContext(**sec)
    return ContainerConfig(**cfg)


def absolute_log_path(log_directory: str, log_path: str) -> str:
    """The container's log file: the pod's log_directory joined with the config's log_path.

    Empty when either is empty (no log is written, as in containerd). The CRI path is
    relative; one that climbs out of the pod's log directory is refused.
    """
    if not log_directory or not log_path:
        return ""
    relative = os.path.normpath(log_path.lstrip("/"))
    if relative == ".." or relative.startswith("../") or relative == ".":
        raise InvalidArgument(f"log_path {log_path!r} must name a file inside the pod's log directory")
    return os.path.join(log_directory, relative)
