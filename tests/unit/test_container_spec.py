"""Container logic without root: config translation, users, and the OCI spec builder."""

import os
import stat

import pytest
from cri_api.v1 import api_pb2 as cri

from cri_py.container import cri as container_cri
from cri_py.container import spec as spec_mod
from cri_py.container.model import (
    EXITED,
    RUNNING,
    Container,
    ContainerConfig,
    Device,
    Mount,
    Resources,
    SecurityContext,
    User,
)
from cri_py.container.spec import capabilities, container_spec, merge_env, oom_score_adj, process_args, process_env
from cri_py.container.users import (
    effective_user,
    read_in_root,
    resolve_in_root,
    resolve_user,
    supplemental_groups,
    user_string,
)
from cri_py.errors import InvalidArgument, Unimplemented
from cri_py.runtime.spec import DEFAULT_CAPABILITIES, DEFAULT_PATH_ENV, MASKED_PATHS, READONLY_PATHS, all_capabilities
from cri_py.sandbox.model import Sandbox, SandboxConfig, SecurityProfile

SANDBOX_ID = "s" * 64
CONTAINER_ID = "c" * 64
TWO_MB = 2 << 20
IMAGE = {"config": {"Entrypoint": ["/entry"], "Cmd": ["serve"], "Env": ["PATH=/img/bin", "A=1"], "WorkingDir": "/app"}}


def _sandbox(**kw) -> Sandbox:
    cfg = SandboxConfig("web", "ns", "u1", hostname="web-0", cgroup_parent="/kubepods/podu1", **kw)
    return Sandbox(id=SANDBOX_ID, config=cfg, state="READY", shm_path="/run/s/shm", files_dir="/run/s/files", pid=42)


def _container(**kw) -> Container:
    security = kw.pop("security", SecurityContext())
    resources = kw.pop("resources", Resources())
    cfg = ContainerConfig("app", image="sha256:abc", security=security, resources=resources, **kw)
    return Container(id=CONTAINER_ID, sandbox_id=SANDBOX_ID, config=cfg)


def _spec(container=None, sandbox=None, image=None, **kw):
    kw.setdefault("sandbox_pid", 42)
    kw.setdefault("cgroup_v2", True)
    kw.setdefault("hugepage_sizes", {TWO_MB})
    return container_spec(
        container or _container(), sandbox or _sandbox(), IMAGE if image is None else image,
        "/rootfs", User(1000, 1000, (1000, 2000)), kw.pop("driver", "cgroupfs"), **kw,
    )


def _mount(spec, destination):
    found = [m for m in spec["mounts"] if m["destination"] == destination]
    assert len(found) == 1, found
    return found[0]


# ---- process -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, args, entrypoint, cmd, expected",
    [
        ([], [], ["/e"], ["c"], ["/e", "c"]),  # image defaults
        ([], ["a"], ["/e"], ["c"], ["/e", "a"]),  # args replace Cmd, keep Entrypoint
        (["/x"], [], ["/e"], ["c"], ["/x"]),  # command replaces Entrypoint and drops Cmd
        (["/x"], ["a"], ["/e"], ["c"], ["/x", "a"]),
        ([], [], [], ["/c", "1"], ["/c", "1"]),  # Cmd alone
        ([], ["/a"], [], ["c"], ["/a"]),  # args alone, no Entrypoint
        (["/x"], [], [], [], ["/x"]),
    ],
)
def test_docker_command_matrix(command, args, entrypoint, cmd, expected):
    assert process_args(command, args, entrypoint, cmd) == expected


def test_no_command_at_all_is_refused():
    with pytest.raises(InvalidArgument, match="no command"):
        process_args([], [], [], [])
    with pytest.raises(InvalidArgument, match="no command"):
        _spec(image={"config": {}})


def test_env_merge_keeps_order_and_overrides_in_place():
    env = process_env(["PATH=/img", "A=1", "B=2"], [("B", "3"), ("C", "4"), ("A", "")], "web-0")
    assert env == ["PATH=/img", "HOSTNAME=web-0", "A=", "B=3", "C=4"]
    assert process_env([], [("HOSTNAME", "mine")], "web-0") == [DEFAULT_PATH_ENV, "HOSTNAME=mine"]
    assert merge_env(["X=1"], ["X=2", "X=3"]) == ["X=3"]


def test_process_fields():
    container = _container(envs=[("A", "2")], tty=True, security=SecurityContext(no_new_privs=True))
    process = _spec(container)["process"]
    assert process["args"] == ["/entry", "serve"]
    assert process["env"] == ["PATH=/img/bin", "HOSTNAME=web-0", "A=2"]
    assert process["cwd"] == "/app"
    assert process["terminal"] is True
    assert process["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [1000, 2000]}
    assert process["noNewPrivileges"] is True
    assert _spec(_container(working_dir="/w"))["process"]["cwd"] == "/w"
    assert _spec(image={"config": {"Cmd": ["x"]}})["process"]["cwd"] == "/"
    with pytest.raises(InvalidArgument, match="absolute"):
        _spec(_container(working_dir="rel"))


def test_oom_score_adj_is_clamped_to_our_own(monkeypatch):
    monkeypatch.setattr("cri_py.runtime.spec.own_oom_score_adj", lambda: -500)
    assert oom_score_adj(-999) == (-500, True)
    assert oom_score_adj(100) == (100, False)
    assert _spec(_container(resources=Resources(oom_score_adj=-999)))["process"]["oomScoreAdj"] == -500


# ---- capabilities, privilege, seccomp ------------------------------------------------


def test_capabilities_add_drop_all():
    assert capabilities([], [], False) == DEFAULT_CAPABILITIES
    caps = capabilities(["net_admin", "CAP_SYS_TIME", "Chown"], ["KILL", "cap_mknod"], False)
    assert "CAP_NET_ADMIN" in caps and "CAP_SYS_TIME" in caps
    assert "CAP_KILL" not in caps and "CAP_MKNOD" not in caps
    assert caps.count("CAP_CHOWN") == 1
    everything = capabilities(["ALL"], ["chown"], False)
    assert set(everything) == set(all_capabilities()) - {"CAP_CHOWN"}
    assert capabilities(["NET_BIND_SERVICE"], ["all"], False) == ["CAP_NET_BIND_SERVICE"]
    assert capabilities(["ALL"], ["ALL"], False) == []
    assert capabilities([], [], True) == all_capabilities()
    with pytest.raises(InvalidArgument):
        capabilities(["NET ADMIN"], [], False)


def test_spec_capability_sets_and_seccomp():
    sec = SecurityContext(capabilities_add=["SYS_PTRACE"], seccomp=SecurityProfile("runtime_default"))
    spec = _spec(_container(security=sec))
    caps = spec["process"]["capabilities"]
    assert "CAP_SYS_PTRACE" in caps["bounding"] and caps["bounding"] == caps["effective"] == caps["permitted"]
    denied = spec["linux"]["seccomp"]["syscalls"][0]["names"]
    assert "ptrace" not in denied and "mount" in denied  # the capability re-allows ptrace only
    assert "seccomp" not in _spec()["linux"]  # no profile asked: unconfined


def test_privileged(monkeypatch):
    monkeypatch.setattr(spec_mod, "host_devices", lambda: [{"path": "/dev/sda", "type": "b", "major": 8, "minor": 0,
                                                            "fileMode": 0o660, "uid": 0, "gid": 6}])
    sec = SecurityContext(privileged=True, no_new_privs=True, seccomp=SecurityProfile("runtime_default"),
                          masked_paths=["/proc/kcore"])
    with pytest.raises(InvalidArgument, match="privileged"):
        _spec(_container(security=sec))
    spec = _spec(_container(security=sec), _sandbox(privileged=True))
    linux = spec["linux"]
    assert spec["process"]["capabilities"]["bounding"] == all_capabilities()
    assert spec["process"]["noNewPrivileges"] is False
    assert "seccomp" not in linux and "maskedPaths" not in linux and "readonlyPaths" not in linux
    assert linux["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    assert linux["devices"][0]["path"] == "/dev/sda"
    assert "ro" not in _mount(spec, "/sys")["options"]


def test_masked_and_readonly_paths():
    linux = _spec()["linux"]
    assert linux["maskedPaths"] == MASKED_PATHS and linux["readonlyPaths"] == READONLY_PATHS
    sec = SecurityContext(masked_paths=["/proc/x"], readonly_paths=["/proc/y"])
    linux = _spec(_container(security=sec))["linux"]
    assert linux["maskedPaths"] == ["/proc/x"] and linux["readonlyPaths"] == ["/proc/y"]


# ---- mounts --------------------------------------------------------------------------


def test_default_mounts_and_sandbox_files():
    spec = _spec()
    assert _mount(spec, "/dev/shm")["source"] == "/run/s/shm"
    hosts = _mount(spec, "/etc/hosts")
    assert hosts == {"destination": "/etc/hosts", "type": "bind", "source": "/run/s/files/hosts",
                     "options": ["rbind", "rprivate", "rw"]}
    assert _mount(spec, "/etc/resolv.conf")["source"] == "/run/s/files/resolv.conf"
    assert _mount(spec, "/etc/hostname")["source"] == "/run/s/files/hostname"
    assert spec["root"] == {"path": "/rootfs", "readonly": False}
    ro = _spec(_container(security=SecurityContext(readonly_rootfs=True)))
    assert "ro" in _mount(ro, "/etc/hosts")["options"] and ro["root"]["readonly"] is True
    sandbox = _sandbox(ipc_mode="node")
    sandbox.shm_path = ""
    assert _mount(_spec(sandbox=sandbox), "/dev/shm")["source"] == "/dev/shm"


def test_config_mounts_options_and_propagation():
    mounts = [
        Mount("/data", "/host/data"),
        Mount("/ro", "/host/ro", readonly=True),
        Mount("/slave", "/host/slave", propagation="rslave"),
        Mount("/rro", "/host/rro", readonly=True, recursive_read_only=True),
    ]
    spec = _spec(_container(mounts=mounts))
    assert _mount(spec, "/data")["options"] == ["rbind", "rprivate", "rw"]
    assert _mount(spec, "/ro")["options"] == ["rbind", "rprivate", "ro"]
    assert _mount(spec, "/slave")["options"] == ["rbind", "rslave", "rw"]
    assert _mount(spec, "/rro")["options"] == ["rbind", "rprivate", "ro", "rro"]
    assert spec["linux"]["rootfsPropagation"] == "rslave"
    shared = _spec(_container(mounts=[Mount("/s", "/h", propagation="rshared"), Mount("/t", "/h", propagation="rslave")]))
    assert _mount(shared, "/s")["options"][1] == "rshared" and shared["linux"]["rootfsPropagation"] == "rshared"
    assert "rootfsPropagation" not in _spec()["linux"]


@pytest.mark.parametrize(
    "mount, match",
    [
        (Mount("relative/path", "/h"), "absolute"),
        (Mount("/x", "/h", readonly=False, recursive_read_only=True), "read-only"),
        (Mount("/x", "/h", readonly=True, recursive_read_only=True, propagation="rslave"), "private"),
        (Mount("/x", ""), "host_path"),
    ],
)
def test_bad_mounts_are_refused(mount, match):
    with pytest.raises(InvalidArgument, match=match):
        _spec(_container(mounts=[mount]))


def test_config_mount_replaces_default_and_sorting():
    mounts = [Mount("/a/b/c", "/h3"), Mount("/dev/shm", "/my/shm"), Mount("/a", "/h1"), Mount("/etc/hosts", "/my/hosts")]
    spec = _spec(_container(mounts=mounts))
    assert _mount(spec, "/dev/shm")["source"] == "/my/shm"
    assert _mount(spec, "/etc/hosts")["source"] == "/my/hosts"
    destinations = [m["destination"] for m in spec["mounts"]]
    assert destinations.index("/a") < destinations.index("/a/b/c")
    depths = [len(d.strip("/").split("/")) for d in destinations]
    assert depths == sorted(depths)
    assert destinations.index("/dev") < destinations.index("/dev/pts") < destinations.index("/sys/fs/cgroup")
    dev = _spec(_container(mounts=[Mount("/dev", "/host/dev")]))
    assert not [m for m in dev["mounts"] if m["destination"].startswith("/dev/")]


def test_image_volumes(tmp_path):
    image_root = tmp_path / "img"
    (image_root / "sub" / "dir").mkdir(parents=True)
    (image_root / "link").symlink_to("/sub")
    mount = Mount("/vol", image="registry/x:1")
    spec = _spec(_container(mounts=[mount]), image_mounts={"/vol": str(image_root)})
    vol = _mount(spec, "/vol")
    assert vol["source"] == str(image_root) and "ro" in vol["options"]
    sub = Mount("/vol", image="registry/x:1", image_sub_path="sub/dir")
    assert _mount(_spec(_container(mounts=[sub]), image_mounts={"/vol": str(image_root)}), "/vol")["source"] == str(
        image_root / "sub" / "dir"
    )
    linked = Mount("/vol", image="registry/x:1", image_sub_path="link/dir")
    assert _mount(_spec(_container(mounts=[linked]), image_mounts={"/vol": str(image_root)}), "/vol")["source"] == str(
        image_root / "sub" / "dir"
    )
    for bad in ("../escape", "/abs", "sub/../../x"):
        with pytest.raises(InvalidArgument, match="inside"):
            _spec(_container(mounts=[Mount("/vol", image="x", image_sub_path=bad)]), image_mounts={"/vol": str(image_root)})
    with pytest.raises(InvalidArgument, match="does not exist"):
        _spec(_container(mounts=[Mount("/vol", image="x", image_sub_path="nope")]), image_mounts={"/vol": str(image_root)})
    with pytest.raises(Unimplemented):
        _spec(_container(mounts=[mount]))


# ---- devices -------------------------------------------------------------------------


def test_devices():
    if not os.path.exists("/dev/null") or not stat.S_ISCHR(os.stat("/dev/null").st_mode):
        pytest.skip("no /dev/null character device")
    spec = _spec(_container(devices=[Device("/dev/mynull", "/dev/null", "rw")]))
    st = os.stat("/dev/null")
    assert spec["linux"]["devices"] == [{"path": "/dev/mynull", "type": "c", "major": os.major(st.st_rdev),
                                         "minor": os.minor(st.st_rdev), "fileMode": stat.S_IMODE(st.st_mode),
                                         "uid": st.st_uid, "gid": st.st_gid}]
    assert spec["linux"]["resources"]["devices"] == [
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "c", "major": os.major(st.st_rdev), "minor": os.minor(st.st_rdev), "access": "rw"},
    ]
    with pytest.raises(InvalidArgument, match="subset"):
        _spec(_container(devices=[Device("/dev/x", "/dev/null", "rwx")]))


def test_device_that_is_not_one_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(InvalidArgument, match="not a device"):
        _spec(_container(devices=[Device("/dev/x", str(tmp_path / "file"))]))
    with pytest.raises(InvalidArgument):
        _spec(_container(devices=[Device("/dev/x", str(tmp_path / "missing"))]))


# ---- namespaces ----------------------------------------------------------------------


def _ns(spec):
    return {n["type"]: n.get("path") for n in spec["linux"]["namespaces"]}


@pytest.mark.parametrize(
    "pid_mode, expected",
    [("pod", "/proc/42/ns/pid"), ("container", None), ("target", "/proc/77/ns/pid")],
)
def test_pid_namespace_modes(pid_mode, expected):
    ns = _ns(_spec(_container(security=SecurityContext(pid_mode=pid_mode, target_id="t")), target_pid=77))
    assert ns["pid"] == expected
    assert ns["network"] == "/proc/42/ns/net" and ns["ipc"] == "/proc/42/ns/ipc" and ns["uts"] == "/proc/42/ns/uts"
    assert "mount" in ns and ns["mount"] is None and "cgroup" in ns


def test_pid_namespace_node_and_target_without_pid():
    assert "pid" not in _ns(_spec(_container(security=SecurityContext(pid_mode="node"))))
    with pytest.raises(InvalidArgument, match="TARGET"):
        _spec(_container(security=SecurityContext(pid_mode="target")))


def test_host_network_and_ipc():
    ns = _ns(_spec(sandbox=_sandbox(network_mode="node", ipc_mode="node")))
    assert "network" not in ns and "uts" not in ns and "ipc" not in ns
    assert "cgroup" not in _ns(_spec(cgroup_v2=False))


# ---- cgroups and resources -----------------------------------------------------------


def test_cgroups_path_for_both_drivers():
    assert _spec()["linux"]["cgroupsPath"] == f"/kubepods/podu1/{CONTAINER_ID}"
    sandbox = _sandbox()
    sandbox.config.cgroup_parent = "kubepods-besteffort-podu1.slice"
    assert _spec(sandbox=sandbox, driver="systemd")["linux"]["cgroupsPath"] == (
        f"kubepods-besteffort-podu1.slice:cri-py:{CONTAINER_ID}"
    )


def test_resources_mapping():
    res = Resources(cpu_period=100000, cpu_quota=50000, cpu_shares=512, memory_limit_in_bytes=1 << 28,
                    memory_swap_limit_in_bytes=1 << 28, cpuset_cpus="0-1", cpuset_mems="0",
                    hugepage_limits=[("2MB", 4 << 20), ("1GB", 1 << 30)], unified={"memory.high": "100000000"})
    linux = _spec(_container(resources=res))["linux"]
    r = linux["resources"]
    assert r["cpu"] == {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0-1", "mems": "0"}
    assert r["memory"] == {"limit": 1 << 28, "swap": 1 << 28}
    assert r["hugepageLimits"] == [{"pageSize": "2MB", "limit": 4 << 20}]  # 1GB pages not supported here
    assert r["unified"] == {"memory.high": "100000000"}
    assert r["devices"] == [{"allow": False, "access": "rwm"}]
    assert "unified" not in _spec(_container(resources=res), cgroup_v2=False)["linux"]["resources"]
    empty = _spec()["linux"]["resources"]
    assert set(empty) == {"devices"}


def test_annotations():
    spec = _spec(_container(annotations={"x": "y"}, user_specified_image="busybox"))
    ann = spec["annotations"]
    assert ann["x"] == "y"
    assert ann["io.kubernetes.cri.container-type"] == "container"
    assert ann["io.kubernetes.cri.sandbox-id"] == SANDBOX_ID
    assert ann["io.kubernetes.cri.container-name"] == "app"
    assert ann["io.kubernetes.cri.image-name"] == "busybox"
    assert "hostname" not in spec


# ---- users ---------------------------------------------------------------------------

PASSWD = """root:x:0:0:root:/root:/bin/sh
# a comment
daemon:x:1:1::/usr/sbin:/usr/sbin/nologin
broken line
app:x:1000:1001:App:/home/app:/bin/sh
"""
GROUP = """root:x:0:
wheel:x:10:root,app
audio:x:29:app
app:x:1001:
staff:x:50:
"""


@pytest.fixture
def rootfs(tmp_path):
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    return str(root)


def test_user_precedence(rootfs):
    assert resolve_user(rootfs, "", None, None, "") == (0, 0, "/root", "root")
    assert resolve_user(rootfs, "app", None, None, "") == (1000, 1001, "/home/app", "app")
    assert resolve_user(rootfs, "1000", None, None, "") == (1000, 1001, "/home/app", "app")
    assert resolve_user(rootfs, "4242", None, None, "")[:2] == (4242, 0)  # unknown uid: gid 0
    assert resolve_user(rootfs, "app:staff", None, None, "")[:2] == (1000, 50)
    assert resolve_user(rootfs, "1000:7", None, None, "")[:2] == (1000, 7)
    assert resolve_user(rootfs, "app:staff", 1, None, "")[:2] == (1, 1)  # config user wins, image group dropped
    assert resolve_user(rootfs, "app", 1, 5, "")[:2] == (1, 5)
    assert resolve_user(rootfs, "", 1, None, "app")[:2] == (1000, 1001)  # username wins over uid
    with pytest.raises(InvalidArgument, match="run_as_group is set without"):
        resolve_user(rootfs, "app", None, 9, "")  # the CRI requires a user with a group
    assert user_string("", 0, 9, "") == "0:9"


def test_unknown_names_are_invalid(rootfs):
    with pytest.raises(InvalidArgument, match="nobody"):
        resolve_user(rootfs, "", None, None, "nobody")
    with pytest.raises(InvalidArgument, match="nobody"):
        resolve_user(rootfs, "nobody", None, None, "")
    with pytest.raises(InvalidArgument, match="nogroup"):
        resolve_user(rootfs, "app:nogroup", None, None, "")


def test_no_passwd_file(tmp_path):
    assert resolve_user(str(tmp_path), "", 33, None, "")[:2] == (33, 0)
    with pytest.raises(InvalidArgument):
        resolve_user(str(tmp_path), "www", None, None, "")


def test_supplemental_groups_merge_and_strict(rootfs):
    assert supplemental_groups(rootfs, "app", 1001, [3000, 10], "merge") == [10, 29, 1001, 3000]
    assert supplemental_groups(rootfs, 1000, 1001, [], "merge") == [10, 29, 1001]  # uid mapped to name
    assert supplemental_groups(rootfs, 4242, 0, [5], "merge") == [0, 5]
    assert supplemental_groups(rootfs, "app", 1001, [3000], "strict") == [1001, 3000]
    assert effective_user(rootfs, "app", None, None, "", [7], "merge") == User(1000, 1001, (7, 10, 29, 1001))


def test_symlinked_passwd_never_leaves_the_rootfs(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("evil:x:0:0::/:/bin/sh\n")
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    rootfs = str(root)
    # relative escape: clamped at the rootfs, so it names <rootfs>/outside/passwd, which is missing
    (root / "etc" / "passwd").symlink_to("../../outside/passwd")
    assert resolve_in_root(rootfs, "/etc/passwd") == os.path.join(os.path.realpath(rootfs), "outside/passwd")
    assert read_in_root(rootfs, "/etc/passwd") is None
    with pytest.raises(InvalidArgument):
        resolve_user(rootfs, "evil", None, None, "")
    # absolute target: re-rooted, never the host's file
    (root / "etc" / "passwd").unlink()
    (root / "etc" / "passwd").symlink_to(str(outside / "passwd"))
    assert read_in_root(rootfs, "/etc/passwd") is None
    (root / "etc" / "passwd").unlink()
    (root / "etc" / "passwd").symlink_to("/etc/shadow-outside")
    assert read_in_root(rootfs, "/etc/passwd") is None
    # a symlink that stays inside the rootfs is followed there
    (root / "etc" / "shadow-outside").write_text("inside:x:5:6::/:/bin/sh\n")
    assert resolve_user(rootfs, "inside", None, None, "")[:2] == (5, 6)
    # a symlink loop is an error, not a hang
    (root / "etc" / "group").symlink_to("group")
    with pytest.raises(OSError):
        read_in_root(rootfs, "/etc/group")
    with pytest.raises(InvalidArgument, match="/etc/group"):
        supplemental_groups(rootfs, "inside", 6, [], "merge")


def test_non_regular_passwd_is_ignored(tmp_path):
    root = tmp_path / "rootfs"
    (root / "etc" / "passwd").mkdir(parents=True)
    assert read_in_root(str(root), "/etc/passwd") is None
    os.mkfifo(root / "etc" / "group")
    assert read_in_root(str(root), "/etc/group") is None


# ---- CRI translation -----------------------------------------------------------------


def _cri_config() -> cri.ContainerConfig:
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="app", attempt=3),
        image=cri.ImageSpec(image="sha256:abc", user_specified_image="busybox"),
        command=["/bin/sh"],
        args=["-c", "sleep 1"],
        working_dir="/w",
        envs=[cri.KeyValue(key="A", value="1")],
        mounts=[
            cri.Mount(container_path="/data", host_path="/h", readonly=True, recursive_read_only=True,
                      propagation=cri.PROPAGATION_PRIVATE),
            cri.Mount(container_path="/s", host_path="/hs", propagation=cri.PROPAGATION_BIDIRECTIONAL),
            cri.Mount(container_path="/img", image=cri.ImageSpec(image="registry/x:1"), image_sub_path="d"),
        ],
        devices=[cri.Device(container_path="/dev/x", host_path="/dev/null", permissions="r")],
        labels={"l": "1"},
        annotations={"a": "2"},
        log_path="app/3.log",
        stdin=True,
        tty=True,
        stop_signal=cri.SIGINT,
    )
    res = config.linux.resources
    res.cpu_shares = 256
    res.memory_limit_in_bytes = 1 << 20
    res.oom_score_adj = 5
    res.hugepage_limits.append(cri.HugepageLimit(page_size="2MB", limit=TWO_MB))
    res.unified["memory.high"] = "1"
    sc = config.linux.security_context
    sc.capabilities.add_capabilities.append("NET_ADMIN")
    sc.capabilities.drop_capabilities.append("KILL")
    sc.namespace_options.pid = cri.CONTAINER
    sc.run_as_user.value = 0  # present, and zero: must not read as "unset"
    sc.supplemental_groups.extend([5, 6])
    sc.supplemental_groups_policy = cri.SupplementalGroupsPolicy.Strict
    sc.seccomp.profile_type = cri.SecurityProfile.RuntimeDefault  # the enum's zero value
    sc.masked_paths.append("/proc/x")
    return config


def test_cri_round_trip():
    cfg = container_cri.container_config(_cri_config())
    assert cfg.name == "app" and cfg.attempt == 3 and cfg.image == "sha256:abc"
    assert cfg.envs == [("A", "1")] and cfg.stop_signal == "SIGINT"
    assert cfg.mounts[0] == Mount("/data", "/h", readonly=True, recursive_read_only=True)
    assert cfg.mounts[1].propagation == "rshared"
    assert cfg.mounts[2].image == "registry/x:1" and cfg.mounts[2].image_sub_path == "d"
    assert cfg.devices == [Device("/dev/x", "/dev/null", "r")]
    sec = cfg.security
    assert sec.run_as_user == 0 and sec.run_as_group is None
    assert sec.pid_mode == "container" and sec.network_mode == "pod"
    assert sec.seccomp == SecurityProfile("runtime_default")
    assert sec.supplemental_groups_policy == "strict" and sec.supplemental_groups == [5, 6]
    assert sec.capabilities_add == ["NET_ADMIN"] and sec.capabilities_drop == ["KILL"]
    assert cfg.resources.hugepage_limits == [("2MB", TWO_MB)] and cfg.resources.oom_score_adj == 5

    bare = container_cri.container_config(cri.ContainerConfig(metadata=cri.ContainerMetadata(name="b")))
    assert bare.security.run_as_user is None and bare.security.seccomp.kind == "unconfined"

    container = Container(id=CONTAINER_ID, sandbox_id=SANDBOX_ID, config=cfg, image_id="sha256:abc",
                          image_ref="docker.io/library/busybox@sha256:def", state=EXITED, created_at_ns=1,
                          started_at_ns=2, finished_at_ns=3, exit_code=137, reason="OOMKilled",
                          log_path="/var/log/pods/x/app/3.log", user=User(0, 0, (0, 5, 6)))
    assert Container.from_dict(container.to_dict()) == container

    status = container_cri.container_status(container, image_name="docker.io/library/busybox:latest")
    assert status.id == CONTAINER_ID and status.metadata.attempt == 3
    assert status.state == cri.CONTAINER_EXITED and status.exit_code == 137 and status.reason == "OOMKilled"
    assert (status.created_at, status.started_at, status.finished_at) == (1, 2, 3)
    assert status.image.image == "docker.io/library/busybox:latest" and status.image.user_specified_image == "busybox"
    assert status.image_ref == "docker.io/library/busybox@sha256:def" and status.image_id == "sha256:abc"
    assert status.log_path == "/var/log/pods/x/app/3.log"
    assert status.mounts[1].propagation == cri.PROPAGATION_BIDIRECTIONAL
    assert status.mounts[2].image.image == "registry/x:1"
    assert status.mounts[0].recursive_read_only
    assert status.resources.linux.cpu_shares == 256 and status.resources.linux.hugepage_limits[0].page_size == "2MB"
    assert list(status.user.linux.supplemental_groups) == [0, 5, 6]
    assert status.stop_signal == cri.SIGINT
    assert dict(status.labels) == {"l": "1"} and dict(status.annotations) == {"a": "2"}
    # the resources message is the inverse of resources_from
    again = container_cri.resources_from(container_cri.resources_message(cfg.resources))
    assert again == cfg.resources


def test_user_namespaces_are_refused():
    config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="b"))
    config.linux.security_context.namespace_options.userns_options.mode = cri.POD
    with pytest.raises(Unimplemented):
        container_cri.container_config(config)


def test_list_message_and_filter():
    container = Container(id="abc123", sandbox_id="pod456", config=ContainerConfig("n", labels={"k": "v"}),
                          state=RUNNING, created_at_ns=9)
    msg = container_cri.container_message(container)
    assert msg.id == "abc123" and msg.pod_sandbox_id == "pod456" and msg.state == cri.CONTAINER_RUNNING
    assert msg.created_at == 9 and msg.metadata.name == "n"
    m = container_cri.matches
    assert m(container, cri.ContainerFilter())
    assert m(container, cri.ContainerFilter(id="abc"))
    assert not m(container, cri.ContainerFilter(id="abd"))
    assert m(container, cri.ContainerFilter(pod_sandbox_id="pod"))
    assert not m(container, cri.ContainerFilter(pod_sandbox_id="x"))
    assert m(container, cri.ContainerFilter(state=cri.ContainerStateValue(state=cri.CONTAINER_RUNNING)))
    # CONTAINER_CREATED is the enum's zero value: presence of the state message matters
    assert not m(container, cri.ContainerFilter(state=cri.ContainerStateValue(state=cri.CONTAINER_CREATED)))
    assert m(container, cri.ContainerFilter(label_selector={"k": "v"}))
    assert not m(container, cri.ContainerFilter(label_selector={"k": "w"}))


def test_absolute_log_path():
    from cri_py.container.model import absolute_log_path

    assert absolute_log_path("/var/log/pods/p", "app/0.log") == "/var/log/pods/p/app/0.log"
    assert absolute_log_path("/var/log/pods/p", "/app/0.log") == "/var/log/pods/p/app/0.log"
    assert absolute_log_path("", "app/0.log") == "" and absolute_log_path("/d", "") == ""
    with pytest.raises(InvalidArgument):
        absolute_log_path("/var/log/pods/p", "../../etc/passwd")


def test_joining_needs_a_pause_pid_only_when_something_is_joined():
    with pytest.raises(InvalidArgument, match="pause"):
        _spec(sandbox_pid=0)
    host = _sandbox(network_mode="node", ipc_mode="node")
    spec = _spec(_container(security=SecurityContext(pid_mode="node")), host, sandbox_pid=0)
    assert [n["type"] for n in spec["linux"]["namespaces"]] == ["mount", "cgroup"]
