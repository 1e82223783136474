"""Translation between CRI container messages and the container dataclasses (the edge).

Optional CRI fields are messages (run_as_user is an Int64Value, seccomp a
SecurityProfile whose zero value means RuntimeDefault), so presence is read with
HasField, never from the default value.
"""

from __future__ import annotations

from cri_api.v1 import api_pb2 as cri

from cri_py.container.model import (
    MERGE,
    PRIVATE,
    RSHARED,
    RSLAVE,
    STRICT,
    Container,
    ContainerConfig,
    Device,
    Mount,
    Resources,
    SecurityContext,
)
from cri_py.errors import Unimplemented
from cri_py.sandbox.cri import NAMESPACE_MODES, security_profile
from cri_py.sandbox.model import POD

PROPAGATIONS = {
    cri.PROPAGATION_PRIVATE: PRIVATE,
    cri.PROPAGATION_HOST_TO_CONTAINER: RSLAVE,
    cri.PROPAGATION_BIDIRECTIONAL: RSHARED,
}
PROPAGATION_VALUES = {v: k for k, v in PROPAGATIONS.items()}
GROUP_POLICIES = {cri.SupplementalGroupsPolicy.Merge: MERGE, cri.SupplementalGroupsPolicy.Strict: STRICT}


def resources_from(res: cri.LinuxContainerResources) -> Resources:
    """LinuxContainerResources as Resources (also used by UpdateContainerResources)."""
    return Resources(
        cpu_period=res.cpu_period,
        cpu_quota=res.cpu_quota,
        cpu_shares=res.cpu_shares,
        memory_limit_in_bytes=res.memory_limit_in_bytes,
        oom_score_adj=res.oom_score_adj,
        cpuset_cpus=res.cpuset_cpus,
        cpuset_mems=res.cpuset_mems,
        hugepage_limits=[(h.page_size, h.limit) for h in res.hugepage_limits],
        unified=dict(res.unified),
        memory_swap_limit_in_bytes=res.memory_swap_limit_in_bytes,
    )


def resources_message(res: Resources) -> cri.LinuxContainerResources:
    """Resources back as LinuxContainerResources (ContainerStatus.resources)."""
    return cri.LinuxContainerResources(
        cpu_period=res.cpu_period,
        cpu_quota=res.cpu_quota,
        cpu_shares=res.cpu_shares,
        memory_limit_in_bytes=res.memory_limit_in_bytes,
        oom_score_adj=res.oom_score_adj,
        cpuset_cpus=res.cpuset_cpus,
        cpuset_mems=res.cpuset_mems,
        hugepage_limits=[cri.HugepageLimit(page_size=size, limit=limit) for size, limit in res.hugepage_limits],
        unified=res.unified,
        memory_swap_limit_in_bytes=res.memory_swap_limit_in_bytes,
    )


def _mount(m: cri.Mount) -> Mount:
    if m.uidMappings or m.gidMappings:
        raise Unimplemented(f"mount at {m.container_path}: id-mapped mounts need user namespaces, not supported")
    return Mount(
        container_path=m.container_path,
        host_path=m.host_path,
        readonly=m.readonly,
        propagation=PROPAGATIONS.get(m.propagation, PRIVATE),
        selinux_relabel=m.selinux_relabel,
        recursive_read_only=m.recursive_read_only,
        image=m.image.image if m.HasField("image") else "",
        image_sub_path=m.image_sub_path,
    )


def _security(sc: cri.LinuxContainerSecurityContext) -> SecurityContext:
    ns = sc.namespace_options
    if ns.HasField("userns_options") and ns.userns_options.mode != cri.NODE:
        # running it in the host's user namespace would silently drop the isolation asked for
        raise Unimplemented("user namespaces are not supported")
    return SecurityContext(
        capabilities_add=list(sc.capabilities.add_capabilities),
        capabilities_drop=list(sc.capabilities.drop_capabilities),
        privileged=sc.privileged,
        network_mode=NAMESPACE_MODES.get(ns.network, POD),
        pid_mode=NAMESPACE_MODES.get(ns.pid, POD),
        ipc_mode=NAMESPACE_MODES.get(ns.ipc, POD),
        target_id=ns.target_id,
        run_as_user=sc.run_as_user.value if sc.HasField("run_as_user") else None,
        run_as_group=sc.run_as_group.value if sc.HasField("run_as_group") else None,
        run_as_username=sc.run_as_username,
        readonly_rootfs=sc.readonly_rootfs,
        supplemental_groups=list(sc.supplemental_groups),
        supplemental_groups_policy=GROUP_POLICIES.get(sc.supplemental_groups_policy, MERGE),
        no_new_privs=sc.no_new_privs,
        masked_paths=list(sc.masked_paths),
        readonly_paths=list(sc.readonly_paths),
        seccomp=security_profile(sc.seccomp if sc.HasField("seccomp") else None, sc.seccomp_profile_path),
    )


def container_config(config: cri.ContainerConfig) -> ContainerConfig:
    """ContainerConfig (the message) as ContainerConfig (the dataclass)."""
    linux = config.linux
    return ContainerConfig(
        name=config.metadata.name,
        attempt=config.metadata.attempt,
        image=config.image.image,
        user_specified_image=config.image.user_specified_image,
        command=list(config.command),
        args=list(config.args),
        working_dir=config.working_dir,
        envs=[(kv.key, kv.value) for kv in config.envs],
        mounts=[_mount(m) for m in config.mounts],
        devices=[Device(d.container_path, d.host_path, d.permissions) for d in config.devices],
        labels=dict(config.labels),
        annotations=dict(config.annotations),
        log_path=config.log_path,
        stdin=config.stdin,
        stdin_once=config.stdin_once,
        tty=config.tty,
        stop_signal=cri.Signal.Name(config.stop_signal) if config.stop_signal else "",
        resources=resources_from(linux.resources),
        security=_security(linux.security_context),
    )


def _metadata(cfg: ContainerConfig) -> cri.ContainerMetadata:
    return cri.ContainerMetadata(name=cfg.name, attempt=cfg.attempt)


def _state(container: Container) -> int:
    return cri.ContainerState.Value(container.state)


def _image_spec(cfg: ContainerConfig, image_name: str = "") -> cri.ImageSpec:
    return cri.ImageSpec(image=image_name or cfg.image, user_specified_image=cfg.user_specified_image)


def mount_message(m: Mount) -> cri.Mount:
    """A mount as ContainerStatus reports it; an image volume names its image."""
    msg = cri.Mount(
        container_path=m.container_path,
        host_path=m.host_path,
        readonly=m.readonly,
        selinux_relabel=m.selinux_relabel,
        propagation=PROPAGATION_VALUES.get(m.propagation, cri.PROPAGATION_PRIVATE),
        recursive_read_only=m.recursive_read_only,
        image_sub_path=m.image_sub_path,
    )
    if m.image:
        msg.image.CopyFrom(cri.ImageSpec(image=m.image))
    return msg


def container_message(container: Container, image_name: str = "") -> cri.Container:
    """A container as ListContainers reports it.

    `image_name` (e.g. the image's first repo tag) replaces the config's image, which
    the kubelet sends as an image id; containerd reports the tag the same way.
    """
    cfg = container.config
    return cri.Container(
        id=container.id,
        pod_sandbox_id=container.sandbox_id,
        metadata=_metadata(cfg),
        image=_image_spec(cfg, image_name),
        image_ref=container.image_ref,
        image_id=container.image_id,
        state=_state(container),
        created_at=container.created_at_ns,
        labels=cfg.labels,
        annotations=cfg.annotations,
    )


def container_status(container: Container, image_name: str = "") -> cri.ContainerStatus:
    """A container as ContainerStatus reports it (image_name as in container_message)."""
    cfg = container.config
    user = container.user
    status = cri.ContainerStatus(
        id=container.id,
        metadata=_metadata(cfg),
        state=_state(container),
        created_at=container.created_at_ns,
        started_at=container.started_at_ns,
        finished_at=container.finished_at_ns,
        exit_code=container.exit_code,
        image=_image_spec(cfg, image_name),
        image_ref=container.image_ref,
        image_id=container.image_id,
        reason=container.reason,
        message=container.message,
        labels=cfg.labels,
        annotations=cfg.annotations,
        mounts=[mount_message(m) for m in cfg.mounts],
        log_path=container.log_path,
        resources=cri.ContainerResources(linux=resources_message(cfg.resources)),
        user=cri.ContainerUser(
            linux=cri.LinuxContainerUser(uid=user.uid, gid=user.gid, supplemental_groups=list(user.additional_gids))
        ),
    )
    if cfg.stop_signal:
        status.stop_signal = cri.Signal.Value(cfg.stop_signal)
    return status


def matches(container: Container, flt: cri.ContainerFilter | cri.ContainerStatsFilter) -> bool:
    """ListContainers' filter (id prefix, state, sandbox id prefix, every selector label),
    or ListContainerStats' (the same without state)."""
    if flt.id and not container.id.startswith(flt.id):
        return False
    if isinstance(flt, cri.ContainerFilter) and flt.HasField("state") and _state(container) != flt.state.state:
        return False
    if flt.pod_sandbox_id and not container.sandbox_id.startswith(flt.pod_sandbox_id):
        return False
    return all(container.config.labels.get(k) == v for k, v in flt.label_selector.items())


__all__ = [
    "container_config",
    "container_message",
    "container_status",
    "matches",
    "mount_message",
    "resources_from",
    "resources_message",
]
