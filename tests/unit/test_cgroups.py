"""cgroup v1/v2 stats: parsers fed kernel-format fixtures, dir resolution, rates, disk-use cache."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from cri_py.metrics import cgroups, stats
from cri_py.metrics.cgroups import CgroupDirs, CgroupMount, MemoryStats

FIXTURES = Path(__file__).parent / "fixtures" / "cgroup"
V1, V2 = FIXTURES / "v1", FIXTURES / "v2"
POD_SLICE = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="live cgroup sampling runs as root on the test host")


def text(path: Path) -> str:
    return path.read_text()


def v1_dirs(directory: Path) -> CgroupDirs:
    """A v1 process whose cpuacct, memory and pids files all live in `directory`."""
    d = str(directory)
    return CgroupDirs(v1={"cpu": d, "cpuacct": d, "memory": d, "pids": d})


def v2_dirs(directory: Path) -> CgroupDirs:
    return CgroupDirs(unified=str(directory))


class FakeClock:
    """Monotonic and wall clocks the test moves by hand."""

    def __init__(self) -> None:
        self.mono = 1_000_000_000
        self.wall = 1_700_000_000_000_000_000

    def advance(self, seconds: float) -> None:
        self.mono += int(seconds * 1e9)
        self.wall += int(seconds * 1e9)


def collector(clock: FakeClock, **kwargs: object) -> stats.StatsCollector:
    return stats.StatsCollector(clock=lambda: clock.mono, wall_clock=lambda: clock.wall, **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------- mountinfo / /proc/<pid>/cgroup


def test_mountinfo_v1_separate_cpu_and_cpuacct() -> None:
    mounts = {m.mountpoint: m for m in cgroups.parse_mountinfo(text(V1 / "mountinfo"))}
    assert "/sys/fs/cgroup" not in mounts  # the tmpfs holding them is not a cgroup mount
    assert mounts["/sys/fs/cgroup/cpu"] == CgroupMount("/sys/fs/cgroup/cpu", "/", 1, frozenset({"cpu"}))
    assert mounts["/sys/fs/cgroup/cpuacct"].controllers == {"cpuacct"}
    assert mounts["/sys/fs/cgroup/systemd"].controllers == {"name=systemd"}
    assert mounts["/sys/fs/cgroup/unified"] == CgroupMount("/sys/fs/cgroup/unified", "/", 2)


def test_mountinfo_comounted_with_optional_fields() -> None:
    mounts = {m.mountpoint: m for m in cgroups.parse_mountinfo(text(V1 / "mountinfo.comounted"))}
    assert mounts["/sys/fs/cgroup/cpu,cpuacct"].controllers == {"cpu", "cpuacct"}
    assert mounts["/sys/fs/cgroup/systemd"].controllers == {"xattr", "name=systemd"}
    assert mounts["/sys/fs/cgroup/unified"].version == 2


def test_resolve_v1_host_layout() -> None:
    dirs = cgroups.resolve_dirs(text(V1 / "proc_cgroup"), cgroups.parse_mountinfo(text(V1 / "mountinfo")))
    assert dirs.v1["cpu"] == "/sys/fs/cgroup/cpu/kubepods/pod1/abc"
    assert dirs.v1["cpuacct"] == "/sys/fs/cgroup/cpuacct/kubepods/pod1/abc"
    assert dirs.v1["memory"] == "/sys/fs/cgroup/memory/kubepods/pod1/abc"
    assert dirs.v1["pids"] == "/sys/fs/cgroup/pids/kubepods/pod1/abc"
    assert dirs.v1["name=systemd"] == "/sys/fs/cgroup/systemd/kubepods/pod1/abc"
    assert dirs.unified == "/sys/fs/cgroup/unified/kubepods/pod1/abc"
    assert not dirs.empty


def test_resolve_v1_comounted_and_unmounted_hierarchies() -> None:
    mounts = cgroups.parse_mountinfo(text(V1 / "mountinfo.comounted"))
    dirs = cgroups.resolve_dirs(text(V1 / "proc_cgroup.comounted"), mounts)
    scope = f"{POD_SLICE}/cri-py-abc.scope"
    assert dirs.v1["cpu"] == dirs.v1["cpuacct"] == f"/sys/fs/cgroup/cpu,cpuacct{scope}"
    assert dirs.v1["memory"] == f"/sys/fs/cgroup/memory{scope}"
    assert dirs.v1["net_prio"] == f"/sys/fs/cgroup/net_cls,net_prio{scope}"
    # the host-layout process lists devices, blkio...: not mounted here, so left out
    other = cgroups.resolve_dirs(text(V1 / "proc_cgroup"), mounts)
    assert "devices" not in other.v1 and "blkio" not in other.v1
    assert other.v1["memory"] == "/sys/fs/cgroup/memory/kubepods/pod1/abc"


def test_resolve_v2() -> None:
    dirs = cgroups.resolve_dirs(text(V2 / "proc_cgroup"), cgroups.parse_mountinfo(text(V2 / "mountinfo")))
    assert dirs.v1 == {}
    assert dirs.unified == f"/sys/fs/cgroup{POD_SLICE}/cri-py-abc.scope"


def test_resolve_bind_mounted_subtree_and_escaped_mountpoint() -> None:
    mountinfo = (
        "40 31 0:37 /docker/xyz /sys/fs/cgroup/my\\040mem rw - cgroup cgroup rw,memory\n"
        "41 31 0:38 /docker/xyz /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    )
    proc = "5:memory:/docker/xyz/kubepods/a\n0::/docker/xyz/kubepods/a\n"
    dirs = cgroups.resolve_dirs(proc, cgroups.parse_mountinfo(mountinfo))
    assert dirs.v1["memory"] == "/sys/fs/cgroup/my mem/kubepods/a"
    assert dirs.unified == "/sys/fs/cgroup/kubepods/a"


def test_resolve_deleted_v2_cgroup_and_no_cgroup2_mount() -> None:
    v2_mounts = cgroups.parse_mountinfo(text(V2 / "mountinfo"))
    assert cgroups.resolve_dirs("0::/gone (deleted)\n", v2_mounts).unified == "/sys/fs/cgroup/gone"
    # old kernels print a 0:: line even with no cgroup2 mounted
    only_v1 = [m for m in cgroups.parse_mountinfo(text(V1 / "mountinfo")) if m.version == 1]
    assert cgroups.resolve_dirs("0::/\n5:memory:/a\n", only_v1).unified is None


def test_parent_dirs_is_the_pod_cgroup_and_stops_at_the_root() -> None:
    v1 = cgroups.resolve_dirs(text(V1 / "proc_cgroup"), cgroups.parse_mountinfo(text(V1 / "mountinfo")))
    pod = cgroups.parent_dirs(v1)
    assert pod.v1["memory"] == "/sys/fs/cgroup/memory/kubepods/pod1"
    assert pod.unified == "/sys/fs/cgroup/unified/kubepods/pod1"
    v2 = cgroups.resolve_dirs(text(V2 / "proc_cgroup"), cgroups.parse_mountinfo(text(V2 / "mountinfo")))
    assert cgroups.parent_dirs(v2).unified == f"/sys/fs/cgroup{POD_SLICE}"
    root = cgroups.resolve_dirs("0::/\n", cgroups.parse_mountinfo(text(V2 / "mountinfo")))
    assert cgroups.parent_dirs(root).unified == "/sys/fs/cgroup"
    assert cgroups.parent_dirs(CgroupDirs()).empty


def test_gone_process_has_no_dirs() -> None:
    assert cgroups.cgroup_dirs(0).empty
    assert cgroups.cgroup_dirs(2**31 - 1).empty  # above any pid_max


# ---------------------------------------------------------------- file parsers


def test_limits() -> None:
    assert cgroups.parse_v1_limit(text(V1 / "container" / "memory.limit_in_bytes")) is None
    assert cgroups.parse_v1_limit("536870912\n") == 536870912
    assert cgroups.parse_v2_limit(text(V2 / "container" / "memory.max")) is None
    assert cgroups.parse_v2_limit("268435456\n") == 268435456
    assert cgroups.parse_int("") is None


def test_v2_cpu_stat_is_microseconds() -> None:
    assert cgroups.parse_v2_cpu_usage(text(V2 / "container" / "cpu.stat")) == 2627440601 * 1000
    assert cgroups.parse_v2_cpu_usage("user_usec 5\n") is None


def test_v1_memory_stat_uses_hierarchical_totals() -> None:
    stat = cgroups.parse_flat_keyed(text(V1 / "container" / "memory.stat"))
    assert stat["rss"] == 1736704 and stat["total_rss"] == 2146304
    mem = cgroups.memory_stats(22970368, None, stat, 1)
    assert mem == MemoryStats(
        usage_bytes=22970368,
        working_set_bytes=22970368 - 17530880,  # total_inactive_file, not inactive_file
        rss_bytes=2146304,
        page_faults=40112,
        major_page_faults=9,
        limit_bytes=None,
        available_bytes=None,
    )


def test_working_set_clamps_at_zero_and_available_follows_limit() -> None:
    mem = cgroups.memory_stats(1000, 4096, {"inactive_file": 5000}, 2)
    assert mem.working_set_bytes == 0 and mem.available_bytes == 4096
    assert cgroups.memory_stats(10, 4, {}, 2).available_bytes == 0  # over the limit: nothing left
    assert cgroups.memory_stats(1000, None, None, 1).rss_bytes is None


# ---------------------------------------------------------------- readers over fixture dirs


def test_read_v1_container() -> None:
    dirs = v1_dirs(V1 / "container")
    assert cgroups.read_cpu(dirs) == 2693961511251
    assert cgroups.read_pids(dirs) == 7
    mem = cgroups.read_memory(dirs)
    assert mem is not None
    assert (mem.usage_bytes, mem.working_set_bytes, mem.rss_bytes) == (22970368, 5439488, 2146304)
    assert mem.limit_bytes is None and mem.available_bytes is None


def test_read_v2_container() -> None:
    dirs = v2_dirs(V2 / "container")
    assert cgroups.read_cpu(dirs) == 2627440601000
    assert cgroups.read_pids(dirs) == 12
    assert cgroups.read_memory(dirs) == MemoryStats(
        usage_bytes=104857600,
        working_set_bytes=104857600 - 62914560,
        rss_bytes=31457280,
        page_faults=51234,
        major_page_faults=17,
        limit_bytes=None,
        available_bytes=None,
    )


def test_read_limited_memory(tmp_path: Path) -> None:
    v2 = shutil.copytree(V2 / "container", tmp_path / "v2")
    (v2 / "memory.max").write_text("268435456\n")
    mem = cgroups.read_memory(v2_dirs(v2))
    assert mem is not None and mem.limit_bytes == 268435456
    assert mem.available_bytes == 268435456 - 41943040
    v1 = shutil.copytree(V1 / "container", tmp_path / "v1")
    (v1 / "memory.limit_in_bytes").write_text("536870912\n")
    mem = cgroups.read_memory(v1_dirs(v1))
    assert mem is not None and mem.available_bytes == 536870912 - 5439488


def test_exited_container_reads_none(tmp_path: Path) -> None:
    for dirs in (v1_dirs(tmp_path / "gone"), v2_dirs(tmp_path / "gone"), CgroupDirs()):
        assert cgroups.read_cpu(dirs) is None
        assert cgroups.read_memory(dirs) is None
        assert cgroups.read_pids(dirs) is None


def test_memory_without_memory_stat(tmp_path: Path) -> None:
    (tmp_path / "memory.current").write_text("4096\n")
    mem = cgroups.read_memory(v2_dirs(tmp_path))
    assert mem is not None and mem.working_set_bytes == 4096 and mem.page_faults is None


# ---------------------------------------------------------------- StatsCollector


@pytest.fixture
def fake_cgroup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A v2 container cgroup at <tmp>/cg/pod/ctr (a copy of the fixture) that every pid resolves to."""
    mount = tmp_path / "cg"
    ctr = shutil.copytree(V2 / "container", mount / "pod" / "ctr")
    shutil.copy(V2 / "container" / "memory.current", mount / "pod" / "memory.current")
    (mount / "pod" / "cpu.stat").write_text("usage_usec 9000000\n")
    dirs = CgroupDirs(unified=str(ctr), mountpoints={"": str(mount)})
    monkeypatch.setattr(stats, "cgroup_dirs", lambda pid: dirs if pid > 0 else CgroupDirs())
    return ctr


def set_cpu_usec(cgroup: Path, usec: int) -> None:
    (cgroup / "cpu.stat").write_text(f"usage_usec {usec}\nuser_usec {usec}\nsystem_usec 0\n")


def test_nano_cores_over_two_samples(fake_cgroup: Path) -> None:
    clock = FakeClock()
    c = collector(clock)
    set_cpu_usec(fake_cgroup, 1_000_000)
    first = c.container("ctr", 42, "")
    assert first.cpu_usage_ns == 1_000_000_000 and first.usage_nano_cores is None
    assert first.timestamp_ns == clock.wall

    clock.advance(10)
    set_cpu_usec(fake_cgroup, 6_000_000)  # 5 s of CPU in 10 s: half a core
    assert c.container("ctr", 42, "").usage_nano_cores == 500_000_000

    clock.advance(0.01)  # a second caller right after: same rate, baseline kept
    set_cpu_usec(fake_cgroup, 6_010_000)
    assert c.container("ctr", 42, "").usage_nano_cores == 500_000_000
    clock.advance(0.99)  # 1 s after the baseline: 2 cores over that second
    set_cpu_usec(fake_cgroup, 8_000_000)
    assert c.container("ctr", 42, "").usage_nano_cores == 2_000_000_000

    clock.advance(5)
    set_cpu_usec(fake_cgroup, 10)  # counter went backwards: a new cgroup, no rate yet
    assert c.container("ctr", 42, "").usage_nano_cores is None

    c.forget("ctr")
    clock.advance(5)
    assert c.container("ctr", 42, "").usage_nano_cores is None


def test_nano_cores_pure() -> None:
    assert stats.nano_cores(0, 0, 3_000_000_000, 2_000_000_000) == 1_500_000_000
    assert stats.nano_cores(5, 10, 6, 10) is None
    assert stats.nano_cores(5, 10, 4, 20) is None


def test_container_sample_fields(fake_cgroup: Path) -> None:
    sample = collector(FakeClock()).container("ctr", 42, "")
    assert sample.memory is not None and sample.memory.working_set_bytes == 41943040
    assert sample.pids == 12
    assert sample.writable_bytes is None and sample.writable_inodes is None


def test_exited_container_sample(fake_cgroup: Path, tmp_path: Path) -> None:
    shutil.rmtree(fake_cgroup)  # the cgroup went with the container
    sample = collector(FakeClock()).container("ctr", 42, str(tmp_path / "no-upper"))
    assert (sample.cpu_usage_ns, sample.usage_nano_cores, sample.memory, sample.pids) == (None, None, None, None)
    assert sample.writable_bytes is None
    assert collector(FakeClock()).container("ctr", 0, "").memory is None


def test_writable_layer_usage_is_cached_for_the_ttl(fake_cgroup: Path, tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "a").write_bytes(b"x" * 10000)
    os.link(upper / "etc" / "a", upper / "hardlink-to-a")
    os.symlink("etc/a", upper / "sym")
    expected_bytes = sum(os.lstat(p).st_blocks * 512 for p in (upper, upper / "etc", upper / "etc" / "a", upper / "sym"))

    clock = FakeClock()
    c = collector(clock, writable_ttl_s=10)
    sample = c.container("ctr", 42, str(upper))
    assert (sample.writable_bytes, sample.writable_inodes) == (expected_bytes, 4)  # root, etc, a (once), sym

    (upper / "new").write_bytes(b"y" * 5000)
    clock.advance(9)
    assert c.container("ctr", 42, str(upper)).writable_inodes == 4  # still the cached walk
    clock.advance(2)
    assert c.container("ctr", 42, str(upper)).writable_inodes == 5

    (upper / "newer").touch()
    c.forget("ctr")  # forget drops the cache entry with the baseline
    assert c.container("ctr", 42, str(upper)).writable_inodes == 6


def test_pod_sample(fake_cgroup: Path) -> None:
    calls: list[str] = []

    def links(path: str) -> dict[str, dict[str, int]]:
        calls.append(path)
        return {
            "lo": {"rx_bytes": 1, "tx_bytes": 1, "rx_errors": 0, "tx_errors": 0},
            "eth0": {"rx_bytes": 100, "tx_bytes": 200, "rx_errors": 1, "tx_errors": 2},
        }

    c = collector(FakeClock(), interface_stats=links)
    pod = c.pod("sb", 42, True, "/run/netns/x")
    assert pod.cpu_usage_ns == 9_000_000_000  # the parent (pod) cgroup's cpu.stat, not the pause's
    assert pod.memory is not None and pod.memory.usage_bytes == 104857600 and pod.pids is None
    assert pod.network == [stats.InterfaceSample("eth0", 100, 1, 200, 2)]

    unknown_parent = c.pod("sb2", 42, False, "/run/netns/x")
    assert (unknown_parent.cpu_usage_ns, unknown_parent.memory) == (None, None)
    assert c.pod("sb3", 42, True, "").network == []  # host network
    assert calls == ["/run/netns/x", "/run/netns/x"]


def test_pod_network_gone_is_empty(fake_cgroup: Path) -> None:
    def gone(path: str) -> dict[str, dict[str, int]]:
        raise OSError(2, "netns removed")

    assert collector(FakeClock(), interface_stats=gone).pod("sb", 42, True, "/run/netns/x").network == []


def test_parse_proc_net_dev() -> None:
    links = stats.parse_net_dev(text(FIXTURES / "proc_net_dev"))
    assert links["eth0"] == {"rx_bytes": 1843212, "rx_errors": 3, "tx_bytes": 402118, "tx_errors": 5}
    assert links["vethlongname0"]["rx_bytes"] == 123456789012  # no space after the colon
    assert links["vethlongname0"]["tx_bytes"] == 9876543210
    assert [i.name for i in stats._interfaces(links)] == ["eth0", "vethlongname0"]


def test_pod_network_from_the_pause_proc_net_dev(fake_cgroup: Path) -> None:
    """A pause in the pinned netns is read through /proc/<pid>/net/dev, no netlink."""

    def netlink(path: str) -> dict[str, dict[str, int]]:
        raise AssertionError("the /proc fast path should have answered")

    me = os.getpid()
    own_netns = f"/proc/{me}/ns/net"  # stands in for the pin: the same nsfs inode
    assert stats.same_netns(me, own_netns)
    assert not stats.same_netns(me, str(FIXTURES / "proc_net_dev"))
    pod = collector(FakeClock(), interface_stats=netlink).pod("sb", me, True, own_netns)
    expected = stats._interfaces(stats.parse_net_dev(Path(f"/proc/{me}/net/dev").read_text()))
    assert [i.name for i in pod.network] == [i.name for i in expected]


# ---------------------------------------------------------------- the live host


@needs_root
def test_live_sample_of_this_process() -> None:
    dirs = cgroups.cgroup_dirs(os.getpid())
    assert not dirs.empty
    assert "memory" in dirs.v1 or dirs.unified is not None
    assert cgroups.memory_cgroup_dir(os.getpid()) in (dirs.v1.get("memory"), dirs.unified)

    c = stats.StatsCollector(min_cpu_window_s=0)
    first = c.container("self", os.getpid(), str(Path(__file__).parent / "fixtures"))
    deadline = time.monotonic() + 0.05
    while time.monotonic() < deadline:  # burn some CPU so the rate is positive
        pass
    second = c.container("self", os.getpid(), "")
    assert first.cpu_usage_ns is not None and second.cpu_usage_ns is not None
    assert second.cpu_usage_ns > first.cpu_usage_ns
    assert second.usage_nano_cores is not None and second.usage_nano_cores > 0
    assert first.memory is not None and first.memory.usage_bytes > 0
    assert first.writable_inodes is not None and first.writable_inodes >= 20
