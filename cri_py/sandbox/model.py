"""Plain data for pod sandboxes: the config the kubelet asked for and what was made.

The CRI edge translates PodSandboxConfig into SandboxConfig; nothing below the edge
sees protobuf. A Sandbox is persisted as a dict in the store after every step of its
creation, so a daemon killed mid-way knows exactly what to undo when it starts again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# namespace modes, as the CRI's NamespaceMode enum names them
POD, CONTAINER, NODE, TARGET = "pod", "container", "node", "target"

# sandbox states; CREATING is ours: a record whose RunPodSandbox has not finished
READY, NOTREADY, CREATING = "READY", "NOTREADY", "CREATING"


@dataclass
class PortMapping:
    protocol: str  # "tcp" | "udp" | "sctp"
    container_port: int
    host_port: int
    host_ip: str = ""


@dataclass
class DnsConfig:
    servers: list[str] = field(default_factory=list)
    searches: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)


@dataclass
class SecurityProfile:
    kind: str = "unconfined"  # runtime_default | unconfined | localhost
    localhost_ref: str = ""


@dataclass
class SandboxConfig:
    """What RunPodSandbox asked for, as plain data."""

    name: str
    namespace: str
    uid: str
    attempt: int = 0
    hostname: str = ""
    log_directory: str = ""
    dns: DnsConfig | None = None
    port_mappings: list[PortMapping] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    cgroup_parent: str = ""
    sysctls: dict[str, str] = field(default_factory=dict)
    network_mode: str = POD
    pid_mode: str = POD
    ipc_mode: str = POD
    run_as_user: int | None = None
    run_as_group: int | None = None
    supplemental_groups: list[int] = field(default_factory=list)
    readonly_rootfs: bool = False
    privileged: bool = False
    seccomp: SecurityProfile = field(default_factory=SecurityProfile)

    @property
    def full_name(self) -> str:
        """The reserved name: one sandbox per pod attempt."""
        return f"{self.name}_{self.namespace}_{self.uid}_{self.attempt}"

    @property
    def host_network(self) -> bool:
        return self.network_mode == NODE


@dataclass
class Sandbox:
    """A pod sandbox and every resource made for it (empty strings: not made)."""

    id: str
    config: SandboxConfig
    runtime_handler: str = ""
    state: str = CREATING
    created_at_ns: int = 0
    netns_path: str = ""
    cni_network: str = ""
    ip: str = ""
    additional_ips: list[str] = field(default_factory=list)
    shm_path: str = ""
    rootfs_path: str = ""
    bundle: str = ""
    image_id: str = ""
    pid: int = 0
    files_dir: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Sandbox":
        data = {k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(cls)}}
        cfg = dict(data["config"])
        cfg["dns"] = DnsConfig(**cfg["dns"]) if cfg.get("dns") else None
        cfg["port_mappings"] = [PortMapping(**p) for p in cfg.get("port_mappings", [])]
        cfg["seccomp"] = SecurityProfile(**cfg.get("seccomp", {}))
        data["config"] = SandboxConfig(**cfg)
        return cls(**data)
