"""Translation between CRI sandbox messages and the sandbox dataclasses (the edge)."""

from __future__ import annotations

from cri_api.v1 import api_pb2 as cri

from cri_py.sandbox.model import (
    CONTAINER,
    NODE,
    POD,
    READY,
    TARGET,
    DnsConfig,
    PortMapping,
    Sandbox,
    SandboxConfig,
    SecurityProfile,
)

NAMESPACE_MODES = {cri.POD: POD, cri.CONTAINER: CONTAINER, cri.NODE: NODE, cri.TARGET: TARGET}
MODE_VALUES = {v: k for k, v in NAMESPACE_MODES.items()}
PROTOCOLS = {cri.TCP: "tcp", cri.UDP: "udp", cri.SCTP: "sctp"}
PROFILE_KINDS = {
    cri.SecurityProfile.RuntimeDefault: "runtime_default",
    cri.SecurityProfile.Unconfined: "unconfined",
    cri.SecurityProfile.Localhost: "localhost",
}


def security_profile(profile: cri.SecurityProfile | None, legacy_path: str = "") -> SecurityProfile:
    """The CRI's SecurityProfile (or the deprecated `*_profile_path` string) as plain data.

    RuntimeDefault is the enum's zero value, so only the message's presence tells
    "RuntimeDefault" from "not set": callers pass None when the field is absent.
    """
    if profile is not None:
        return SecurityProfile(PROFILE_KINDS.get(profile.profile_type, "unconfined"), profile.localhost_ref)
    if legacy_path == "runtime/default" or legacy_path == "docker/default":
        return SecurityProfile("runtime_default")
    if legacy_path.startswith("localhost/"):
        return SecurityProfile("localhost", legacy_path[len("localhost/") :])
    return SecurityProfile("unconfined")


def sandbox_config(config: cri.PodSandboxConfig) -> SandboxConfig:
    """PodSandboxConfig as a SandboxConfig."""
    linux = config.linux
    security = linux.security_context
    ns = security.namespace_options
    dns = None
    if config.HasField("dns_config"):
        dns = DnsConfig(list(config.dns_config.servers), list(config.dns_config.searches), list(config.dns_config.options))
    return SandboxConfig(
        name=config.metadata.name,
        namespace=config.metadata.namespace,
        uid=config.metadata.uid,
        attempt=config.metadata.attempt,
        hostname=config.hostname,
        log_directory=config.log_directory,
        dns=dns,
        port_mappings=[
            PortMapping(PROTOCOLS.get(p.protocol, "tcp"), p.container_port, p.host_port, p.host_ip)
            for p in config.port_mappings
        ],
        labels=dict(config.labels),
        annotations=dict(config.annotations),
        cgroup_parent=linux.cgroup_parent,
        sysctls=dict(linux.sysctls),
        network_mode=NAMESPACE_MODES.get(ns.network, POD),
        pid_mode=NAMESPACE_MODES.get(ns.pid, POD),
        ipc_mode=NAMESPACE_MODES.get(ns.ipc, POD),
        run_as_user=security.run_as_user.value if security.HasField("run_as_user") else None,
        run_as_group=security.run_as_group.value if security.HasField("run_as_group") else None,
        supplemental_groups=list(security.supplemental_groups),
        readonly_rootfs=security.readonly_rootfs,
        privileged=security.privileged,
        seccomp=security_profile(
            security.seccomp if security.HasField("seccomp") else None, security.seccomp_profile_path
        ),
    )


def _metadata(cfg: SandboxConfig) -> cri.PodSandboxMetadata:
    return cri.PodSandboxMetadata(name=cfg.name, uid=cfg.uid, namespace=cfg.namespace, attempt=cfg.attempt)


def _state(sandbox: Sandbox) -> int:
    return cri.SANDBOX_READY if sandbox.state == READY else cri.SANDBOX_NOTREADY


def sandbox_message(sandbox: Sandbox) -> cri.PodSandbox:
    """A sandbox as ListPodSandbox reports it."""
    return cri.PodSandbox(
        id=sandbox.id,
        metadata=_metadata(sandbox.config),
        state=_state(sandbox),
        created_at=sandbox.created_at_ns,
        labels=sandbox.config.labels,
        annotations=sandbox.config.annotations,
        runtime_handler=sandbox.runtime_handler,
    )


def sandbox_status(sandbox: Sandbox) -> cri.PodSandboxStatus:
    """A sandbox as PodSandboxStatus reports it."""
    cfg = sandbox.config
    network = cri.PodSandboxNetworkStatus(ip=sandbox.ip, additional_ips=[cri.PodIP(ip=ip) for ip in sandbox.additional_ips])
    options = cri.NamespaceOption(
        network=MODE_VALUES[cfg.network_mode], pid=MODE_VALUES[cfg.pid_mode], ipc=MODE_VALUES[cfg.ipc_mode]
    )
    return cri.PodSandboxStatus(
        id=sandbox.id,
        metadata=_metadata(cfg),
        state=_state(sandbox),
        created_at=sandbox.created_at_ns,
        network=network,
        linux=cri.LinuxPodSandboxStatus(namespaces=cri.Namespace(options=options)),
        labels=cfg.labels,
        annotations=cfg.annotations,
        runtime_handler=sandbox.runtime_handler,
    )


def matches(sandbox: Sandbox, flt: cri.PodSandboxFilter | cri.PodSandboxStatsFilter) -> bool:
    """ListPodSandbox's filter (id or its prefix, state, every selector label), or
    ListPodSandboxStats' (the same without state)."""
    if flt.id and not sandbox.id.startswith(flt.id):
        return False
    if isinstance(flt, cri.PodSandboxFilter) and flt.HasField("state") and _state(sandbox) != flt.state.state:
        return False
    return all(sandbox.config.labels.get(k) == v for k, v in flt.label_selector.items())
