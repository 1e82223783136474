"""The OCI runtime spec of an application container.

Built from the CRI ContainerConfig, the image config and the pod's sandbox, with the
rules containerd's CRI plugin applies (so workloads and critest see the same thing):
Docker's entrypoint/cmd matrix, image env overridden by config env, the default
capability set adjusted by add/drop, RuntimeDefault seccomp when asked, the pod's
/etc/hosts, /etc/resolv.conf, /etc/hostname and /dev/shm bind-mounted, and the pause
container's network, IPC, UTS (and PID) namespaces joined through /proc/<pid>/ns.

Pure apart from a few cheap reads: stat of device nodes, the kernel's hugepage sizes
and cgroup version (both injectable for tests), and Localhost seccomp files.
"""

from __future__ import annotations

import os
import re
import stat
from typing import Any

from cri_py.container.model import PRIVATE, RSHARED, RSLAVE, Container, Device, Mount, Resources, User
from cri_py.container.seccomp import profile_for
from cri_py.container.users import resolve_in_root
from cri_py.errors import InvalidArgument, Unimplemented
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
from cri_py.sandbox.model import CONTAINER, NODE, POD, TARGET, Sandbox

HUGEPAGES_DIR = "/sys/kernel/mm/hugepages"
CGROUP2_MARKER = "/sys/fs/cgroup/cgroup.controllers"
# /dev entries runc's HostDevices skips for privileged containers: mounted or made by runc itself
_HOST_DEV_SKIP_DIRS = {"pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev"}
_CAP_RE = re.compile(r"^CAP_[A-Z0-9_]+$")
_PAGE_SIZE_RE = re.compile(r"^(\d+)([KMGTP])i?B$", re.IGNORECASE)
_SANDBOX_FILES = ("hosts", "resolv.conf", "hostname")


# ---- process -------------------------------------------------------------------------


def process_args(command: list[str], args: list[str], image_entrypoint: list[str], image_cmd: list[str]) -> list[str]:
    """Docker's matrix: a config command replaces the entrypoint and drops the image's Cmd.

    | command | args | result                      |
    | -       | -    | image Entrypoint + image Cmd |
    | -       | set  | image Entrypoint + args      |
    | set     | -    | command                      |
    | set     | set  | command + args               |
    """
    entrypoint = list(command) if command else list(image_entrypoint)
    if args:
        cmd = list(args)
    elif command:
        cmd = []
    else:
        cmd = list(image_cmd)
    result = entrypoint + cmd
    if not result:
        raise InvalidArgument("no command specified")
    return result


def _env_key(entry: str) -> str:
    return entry.partition("=")[0]


def merge_env(base: list[str], overrides: list[str]) -> list[str]:
    """`base` with each override replacing the same key in place, new keys appended."""
    merged = list(base)
    index = {_env_key(e): i for i, e in enumerate(merged)}
    for entry in overrides:
        key = _env_key(entry)
        if key in index:
            merged[index[key]] = entry
        else:
            index[key] = len(merged)
            merged.append(entry)
    return merged


def process_env(image_env: list[str], config_envs: list[tuple[str, str]], hostname: str) -> list[str]:
    """containerd's order: default PATH and HOSTNAME first, then the image's env, then the config's.

    Each later source overrides an earlier key in place, so an image PATH replaces the
    default and a config HOSTNAME replaces ours.
    """
    env = [DEFAULT_PATH_ENV, f"HOSTNAME={hostname}"]
    env = merge_env(env, [e for e in image_env if _env_key(e)])
    return merge_env(env, [f"{k}={v}" for k, v in config_envs if k])


def normalize_capability(name: str) -> str:
    """`net_admin`, `NET_ADMIN` and `CAP_NET_ADMIN` all become `CAP_NET_ADMIN`."""
    upper = name.strip().upper()
    cap = upper if upper.startswith("CAP_") else f"CAP_{upper}"
    if not _CAP_RE.match(cap):
        raise InvalidArgument(f"invalid capability {name!r}")
    return cap


def capabilities(add: list[str], drop: list[str], privileged: bool) -> list[str]:
    """containerd's order of operations: add ALL, drop ALL, add each, drop each.

    So `add: [ALL], drop: [CHOWN]` is everything but CHOWN and `drop: [ALL], add:
    [NET_BIND_SERVICE]` is only NET_BIND_SERVICE.
    """
    if privileged:
        return all_capabilities()
    add_all = any(c.strip().upper() == "ALL" for c in add)
    drop_all = any(c.strip().upper() == "ALL" for c in drop)
    caps = all_capabilities() if add_all else list(DEFAULT_CAPABILITIES)
    if drop_all:
        caps = []
    for name in add:
        if name.strip().upper() != "ALL":
            cap = normalize_capability(name)
            if cap not in caps:
                caps.append(cap)
    dropped = {normalize_capability(n) for n in drop if n.strip().upper() != "ALL"}
    return [c for c in caps if c not in dropped]


def oom_score_adj(wanted: int) -> tuple[int, bool]:
    """The oomScoreAdj to set and whether it was raised to our own (the caller logs that once).

    Lowering below the daemon's own score needs CAP_SYS_RESOURCE, which runc may lack.
    """
    value = clamp_oom_score_adj(wanted)
    return value, value != wanted


# ---- mounts --------------------------------------------------------------------------


def _depth(path: str) -> int:
    return len([p for p in os.path.normpath(path).split("/") if p])


def _propagation_option(propagation: str) -> str:
    options = {PRIVATE: "rprivate", RSLAVE: "rslave", RSHARED: "rshared"}
    if propagation not in options:
        raise InvalidArgument(f"unknown mount propagation {propagation!r}")
    return options[propagation]


def _image_source(mount: Mount, image_mounts: dict[str, str]) -> str:
    """The host directory of an image volume, its sub path resolved without escaping it."""
    root = image_mounts.get(mount.container_path) or image_mounts.get(os.path.normpath(mount.container_path))
    if not root:
        raise Unimplemented(f"image volume {mount.image!r} at {mount.container_path} was not resolved to a rootfs")
    if not mount.image_sub_path:
        return root
    sub = os.path.normpath(mount.image_sub_path)
    if os.path.isabs(sub) or sub == ".." or sub.startswith("../"):
        raise InvalidArgument(f"image_sub_path {mount.image_sub_path!r} must stay inside the image")
    source = resolve_in_root(root, sub)
    if not os.path.exists(source):
        raise InvalidArgument(f"image_sub_path {mount.image_sub_path!r} does not exist in image {mount.image!r}")
    return source


def config_mount(mount: Mount, image_mounts: dict[str, str]) -> dict[str, Any]:
    """One CRI mount as an OCI bind mount.

    recursive_read_only ("rro", mount_setattr) is only meaningful read-only and with
    private propagation: a slave or shared submount could reappear writable, which is
    why the CRI (and containerd) refuse those combinations.
    """
    if not os.path.isabs(mount.container_path):
        raise InvalidArgument(f"mount container_path {mount.container_path!r} must be absolute")
    if mount.image:
        source = _image_source(mount, image_mounts)
        # image volumes are read-only and non-executable (KEP-4639)
        return {"destination": mount.container_path, "type": "bind", "source": source,
                "options": ["rbind", "rprivate", "ro", "nosuid", "nodev", "noexec"]}
    if not mount.host_path:
        raise InvalidArgument(f"mount at {mount.container_path} has no host_path")
    options = ["rbind", _propagation_option(mount.propagation), "ro" if mount.readonly else "rw"]
    if mount.recursive_read_only:
        if not mount.readonly:
            raise InvalidArgument(f"recursive read-only mount at {mount.container_path} must be read-only")
        if mount.propagation != PRIVATE:
            raise InvalidArgument(f"recursive read-only mount at {mount.container_path} needs private propagation")
        options.append("rro")
    return {"destination": mount.container_path, "type": "bind", "source": mount.host_path, "options": options}


def sandbox_file_mounts(files_dir: str, readonly: bool) -> list[dict[str, Any]]:
    """The pod's /etc/hosts, /etc/resolv.conf and /etc/hostname, shared by its containers."""
    mode = "ro" if readonly else "rw"
    return [
        {"destination": f"/etc/{name}", "type": "bind", "source": os.path.join(files_dir, name),
         "options": ["rbind", "rprivate", mode]}
        for name in _SANDBOX_FILES
    ]


def merge_mounts(defaults: list[dict[str, Any]], configured: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Defaults minus those the config overrides, then the config's; parents before children.

    As in containerd, a configured /dev also drops every default mount below /dev. The
    sort is stable, so mounts of equal depth keep their order (defaults first).
    """
    wanted = {os.path.normpath(m["destination"]) for m in configured}
    kept = []
    for m in defaults:
        dst = os.path.normpath(m["destination"])
        if dst in wanted or ("/dev" in wanted and dst.startswith("/dev/")):
            continue
        kept.append(m)
    return sorted(kept + configured, key=lambda m: _depth(m["destination"]))


def rootfs_propagation(mounts: list[Mount]) -> str:
    """A shared or slave mount needs the rootfs to propagate too, or events never arrive."""
    props = {m.propagation for m in mounts if not m.image}
    if RSHARED in props:
        return "rshared"
    if RSLAVE in props:
        return "rslave"
    return ""


# ---- devices -------------------------------------------------------------------------


def _device_entry(container_path: str, st: os.stat_result) -> dict[str, Any]:
    return {
        "path": container_path,
        "type": "c" if stat.S_ISCHR(st.st_mode) else "b",
        "major": os.major(st.st_rdev),
        "minor": os.minor(st.st_rdev),
        "fileMode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
    }


def device_entries(device: Device) -> list[dict[str, Any]]:
    """linux.devices entries for one CRI device; a directory exposes every device below it."""
    if not os.path.isabs(device.container_path):
        raise InvalidArgument(f"device container_path {device.container_path!r} must be absolute")
    perms = device.permissions or "rwm"
    if set(perms) - set("rwm"):
        raise InvalidArgument(f"device {device.host_path}: permissions {perms!r} not a subset of 'rwm'")
    try:
        st = os.stat(device.host_path)
    except OSError as exc:
        raise InvalidArgument(f"device {device.host_path}: {exc.strerror}") from None
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return [_device_entry(device.container_path, st)]
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"{device.host_path} is not a device")
    entries = []
    for dirpath, _dirs, files in os.walk(device.host_path):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            try:
                sub = os.stat(path)
            except OSError:
                continue
            if stat.S_ISCHR(sub.st_mode) or stat.S_ISBLK(sub.st_mode):
                rel = os.path.relpath(path, device.host_path)
                entries.append(_device_entry(os.path.join(device.container_path, rel), sub))
    return entries


def host_devices(root: str = "/dev") -> list[dict[str, Any]]:
    """Every device node of the host, for privileged containers (runc's HostDevices walk)."""
    entries = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not (dirpath == root and d in _HOST_DEV_SKIP_DIRS))
        for name in sorted(files):
            if dirpath == root and name == "console":
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                entries.append(_device_entry(path, st))
    return entries


# ---- resources -----------------------------------------------------------------------


def page_size_bytes(size: str) -> int:
    """A CRI hugepage size ("2MB", "1GB": binary units, as the kubelet writes them) in bytes."""
    m = _PAGE_SIZE_RE.match(size.strip())
    if not m:
        raise InvalidArgument(f"invalid hugepage size {size!r}")
    return int(m.group(1)) << (10 * ("KMGTP".index(m.group(2).upper()) + 1))


def kernel_hugepage_sizes(directory: str = HUGEPAGES_DIR) -> set[int]:
    """The hugepage sizes (bytes) this kernel supports: hugepages-<N>kB directories."""
    try:
        names = os.listdir(directory)
    except OSError:
        return set()
    sizes = set()
    for name in names:
        if name.startswith("hugepages-") and name.endswith("kB") and name[10:-2].isdigit():
            sizes.add(int(name[10:-2]) * 1024)
    return sizes


def is_cgroup_v2() -> bool:
    return os.path.exists(CGROUP2_MARKER)


def linux_resources(res: Resources, hugepage_sizes: set[int], cgroup_v2: bool) -> dict[str, Any]:
    """linux.resources without devices: only what was set (zero means unset on the wire)."""
    out: dict[str, Any] = {}
    cpu: dict[str, Any] = {}
    if res.cpu_shares:
        cpu["shares"] = res.cpu_shares
    if res.cpu_quota:
        cpu["quota"] = res.cpu_quota
    if res.cpu_period:
        cpu["period"] = res.cpu_period
    if res.cpuset_cpus:
        cpu["cpus"] = res.cpuset_cpus
    if res.cpuset_mems:
        cpu["mems"] = res.cpuset_mems
    if cpu:
        out["cpu"] = cpu
    memory: dict[str, Any] = {}
    if res.memory_limit_in_bytes:
        memory["limit"] = res.memory_limit_in_bytes
    if res.memory_swap_limit_in_bytes:
        memory["swap"] = res.memory_swap_limit_in_bytes
    if memory:
        out["memory"] = memory
    hugepages = []
    for size, limit in res.hugepage_limits:
        if page_size_bytes(size) in hugepage_sizes:
            hugepages.append({"pageSize": size, "limit": limit})
    if hugepages:
        out["hugepageLimits"] = hugepages
    if res.unified and cgroup_v2:  # runc refuses unified on v1; containerd drops it there too
        out["unified"] = dict(res.unified)
    return out


# ---- namespaces ----------------------------------------------------------------------


def namespaces(
    sandbox: Sandbox, pid_mode: str, sandbox_pid: int, target_pid: int = 0, cgroup_v2: bool = True
) -> list[dict[str, str]]:
    """The pause's network, IPC and UTS namespaces joined by path, plus a new mount ns.

    Network and IPC come from the sandbox's modes: a container can only share what the
    pause holds. PID is the container's own choice (shareProcessNamespace or not).
    """
    proc = f"/proc/{sandbox_pid}/ns"
    cfg = sandbox.config
    out = [{"type": "mount"}]
    if not cfg.host_network:
        out.append({"type": "network", "path": f"{proc}/net"})
        out.append({"type": "uts", "path": f"{proc}/uts"})
    if cfg.ipc_mode != NODE:
        out.append({"type": "ipc", "path": f"{proc}/ipc"})
    if pid_mode == POD:
        out.append({"type": "pid", "path": f"{proc}/pid"})
    elif pid_mode == CONTAINER:
        out.append({"type": "pid"})
    elif pid_mode == TARGET:
        if target_pid <= 0:
            raise InvalidArgument("pid namespace TARGET needs a running target container")
        out.append({"type": "pid", "path": f"/proc/{target_pid}/ns/pid"})
    elif pid_mode != NODE:
        raise InvalidArgument(f"unknown pid namespace mode {pid_mode!r}")
    if sandbox_pid <= 0 and any(n.get("path", "").startswith(proc) for n in out):
        raise InvalidArgument(f"sandbox {sandbox.id} has no running pause process to join")
    if cgroup_v2:
        out.append({"type": "cgroup"})
    return out


# ---- the spec ------------------------------------------------------------------------


def _image_runtime_config(image_config: dict[str, Any]) -> dict[str, Any]:
    """The `config` object of an OCI image config (Entrypoint, Cmd, Env, WorkingDir, User)."""
    return image_config.get("config") or {}


def _working_dir(configured: str, image_dir: str) -> str:
    cwd = configured or image_dir or "/"
    if not os.path.isabs(cwd):
        raise InvalidArgument(f"working directory {cwd!r} must be absolute")
    return cwd


def container_spec(
    container: Container,
    sandbox: Sandbox,
    image_config: dict[str, Any],
    rootfs: str,
    user: User | tuple[int, int, Any],
    cgroup_driver: str,
    *,
    sandbox_pid: int,
    target_pid: int = 0,
    image_mounts: dict[str, str] | None = None,
    cgroup_v2: bool | None = None,
    hugepage_sizes: set[int] | None = None,
) -> dict[str, Any]:
    """The whole config.json for an application container.

    `image_config` is the image's config JSON (ImageRecord.config); `user` the resolved
    (uid, gid, additional_gids) from users.effective_user; `target_pid` the pid of the
    container a TARGET pid namespace names; `image_mounts` maps an image volume's
    container_path to the host directory holding that image's rootfs.
    """
    cfg = container.config
    sec = cfg.security
    pod = sandbox.config
    if sec.privileged and not pod.privileged:
        raise InvalidArgument("no privileged container allowed in a sandbox that is not privileged")
    v2 = is_cgroup_v2() if cgroup_v2 is None else cgroup_v2
    sizes = kernel_hugepage_sizes() if hugepage_sizes is None else hugepage_sizes
    image = _image_runtime_config(image_config)
    hostname = pod_hostname(pod.hostname, pod.host_network)

    caps = capabilities(sec.capabilities_add, sec.capabilities_drop, sec.privileged)
    uid, gid, additional = user
    process_user: dict[str, Any] = {"uid": uid, "gid": gid}
    if additional:
        process_user["additionalGids"] = list(additional)
    oom, _clamped = oom_score_adj(cfg.resources.oom_score_adj)
    process = {
        "terminal": cfg.tty,
        "user": process_user,
        "args": process_args(cfg.command, cfg.args, image.get("Entrypoint") or [], image.get("Cmd") or []),
        "env": process_env(image.get("Env") or [], cfg.envs, hostname),
        "cwd": _working_dir(cfg.working_dir, image.get("WorkingDir") or ""),
        "capabilities": capability_set(caps),
        "noNewPrivileges": sec.no_new_privs and not sec.privileged,
        "oomScoreAdj": oom,
    }

    shm_source = sandbox.shm_path or ("/dev/shm" if pod.ipc_mode == NODE else None)
    defaults = base_mounts(shm_source, sec.privileged)
    if sandbox.files_dir:
        defaults += sandbox_file_mounts(sandbox.files_dir, sec.readonly_rootfs)
    configured = [config_mount(m, image_mounts or {}) for m in cfg.mounts]
    mounts = merge_mounts(defaults, configured)

    device_list: list[dict[str, Any]] = []
    cgroup_devices: list[dict[str, Any]] = [{"allow": False, "access": "rwm"}]
    if sec.privileged:
        device_list = host_devices()
        cgroup_devices = [{"allow": True, "access": "rwm"}]
    for device in cfg.devices:
        for entry in device_entries(device):
            device_list.append(entry)
            if not sec.privileged:
                cgroup_devices.append({"allow": True, "type": entry["type"], "major": entry["major"],
                                       "minor": entry["minor"], "access": device.permissions or "rwm"})
    device_list = _dedupe_devices(device_list)

    resources = linux_resources(cfg.resources, sizes, v2)
    resources["devices"] = cgroup_devices
    linux: dict[str, Any] = {
        "namespaces": namespaces(sandbox, sec.pid_mode, sandbox_pid, target_pid, v2),
        "cgroupsPath": cgroups_path(cgroup_driver, pod.cgroup_parent, container.id),
        "resources": resources,
    }
    if device_list:
        linux["devices"] = device_list
    if not sec.privileged:
        linux["maskedPaths"] = list(sec.masked_paths or MASKED_PATHS)
        linux["readonlyPaths"] = list(sec.readonly_paths or READONLY_PATHS)
    propagation = rootfs_propagation(cfg.mounts)
    if propagation:
        linux["rootfsPropagation"] = propagation
    seccomp = profile_for(sec.seccomp.kind, sec.seccomp.localhost_ref, set(caps), sec.privileged)
    if seccomp is not None:
        linux["seccomp"] = seccomp

    annotations = dict(cfg.annotations)
    annotations.update({
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.container-name": cfg.name,
        "io.kubernetes.cri.sandbox-id": sandbox.id,
        "io.kubernetes.cri.sandbox-name": pod.name,
        "io.kubernetes.cri.sandbox-namespace": pod.namespace,
        "io.kubernetes.cri.sandbox-uid": pod.uid,
        "io.kubernetes.cri.image-name": cfg.user_specified_image or cfg.image,
    })
    return {
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": rootfs, "readonly": sec.readonly_rootfs},
        "mounts": mounts,
        "linux": linux,
        "annotations": annotations,
    }


def _dedupe_devices(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per container path, the last (the config's over the host walk) winning."""
    by_path: dict[str, dict[str, Any]] = {}
    for entry in entries:
        by_path.pop(entry["path"], None)
        by_path[entry["path"]] = entry
    return list(by_path.values())
