#!/usr/bin/env python3
"""Benchmark: StatsCollector over N containers, as ListContainerStats would sample them.

Each fake "container" is a live `sleep` moved into a cgroup of its own,
<controller mount>/cri-py-bench-stats/<n> (every v1 controller the collector reads,
or one cgroup2 dir), with an "upper dir" of ~100 small files in a temp dir. One pass
samples all N; the first pass walks every upper dir, later passes hit the 10 s
disk-use cache (the steady state for a kubelet polling every 10-15 s is one cold
pass per TTL). Also times the cgroup part alone (no upper dir) and, for pods, a
ListPodSandboxStats-like pass: parent cgroup plus the pod's interface counters, against
one real network namespace (with a veth pair, and a "pause" sleep inside it) sampled
N times, both through /proc/<pause>/net/dev and through the netlink fallback.

Prints numbers only. Needs root. Removes every cgroup, process, netns and temp file
it made, also on failure or Ctrl-C:
    .venv/bin/python hack/bench_stats.py [-n 110] [--files 100] [--warm-passes 5]
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cri_py.metrics import cgroups  # noqa: E402
from cri_py.metrics.stats import StatsCollector  # noqa: E402
from cri_py.network import netns  # noqa: E402

GROUP = "cri-py-bench-stats"
V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids")


def parent_cgroup_dirs() -> list[Path]:
    """Where this bench's cgroups go: one dir per v1 hierarchy it reads, or the cgroup2 one."""
    mounts = cgroups.host_mounts()
    v1 = {m.mountpoint for m in mounts if m.version == 1 and m.controllers & set(V1_CONTROLLERS)}
    if v1:
        return [Path(mp) / GROUP for mp in sorted(v1)]
    v2 = [m.mountpoint for m in mounts if m.version == 2]
    if not v2:
        sys.exit("no cgroup mounts found")
    return [Path(v2[0]) / GROUP]


def make_cgroups(parents: list[Path], n: int) -> list[list[Path]]:
    """Create the parent and N child cgroups in every hierarchy; on v2 delegate the controllers first."""
    for parent in parents:
        parent.mkdir()
        subtree = parent / "cgroup.subtree_control"
        if subtree.exists():  # cgroup2: children only get memory/pids files if the parent enables them
            for ctrl in ("cpu", "memory", "pids"):
                try:
                    subtree.write_text(f"+{ctrl}")
                except OSError:
                    pass
    return [[parent / str(i) for parent in parents] for i in range(n)]


def start_sleeps(children: list[list[Path]], procs: list[subprocess.Popen[bytes]]) -> None:
    """One `sleep` per child cgroup set, moved in right after it starts; appended to procs as made."""
    for dirs in children:
        for d in dirs:
            d.mkdir()
        proc = subprocess.Popen(["sleep", "100000"], stdin=subprocess.DEVNULL)
        procs.append(proc)
        for d in dirs:
            (d / "cgroup.procs").write_text(str(proc.pid))


def make_upper_dirs(root: Path, n: int, files: int) -> list[str]:
    """N trees of `files` small files, a tenth of them per subdirectory, like a busy writable layer."""
    uppers = []
    per_dir = max(1, files // 10)
    for i in range(n):
        upper = root / f"upper-{i}"
        for f in range(files):
            sub = upper / f"d{f // per_dir}"
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"f{f}").write_bytes(b"x" * (100 + 37 * f))
        uppers.append(str(upper))
    return uppers


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def rmdir_retry(path: Path) -> None:
    """rmdir a cgroup; EBUSY for a moment while killed tasks leave it."""
    for _ in range(50):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            time.sleep(0.02)
    print(f"warning: could not remove {path}", file=sys.stderr)


def cleanup(procs: list[subprocess.Popen[bytes]], children: list[list[Path]], parents: list[Path]) -> None:
    for proc in procs:  # by pid, only the sleeps this run started
        proc.kill()
    for proc in procs:
        proc.wait()
    for dirs in children:
        for d in dirs:
            rmdir_retry(d)
    for parent in parents:
        rmdir_retry(parent / "pause")
        rmdir_retry(parent)


def bench_pods(
    n: int, tmp: Path, collector: StatsCollector, parents: list[Path], procs: list[subprocess.Popen[bytes]]
) -> tuple[float, float, int]:
    """Pod passes over one real netns (with a veth pair) sampled n times: (ms via /proc, ms via netlink, links).

    The "pause" is a sleep started inside the netns and moved into its own cgroup; the
    netlink pass gives a pid outside the netns, so the collector falls back.
    """
    ns_dir = tmp / "netns"
    path = str(ns_dir / "bench")
    try:
        netns.create_netns(path)
        # a veth pair with both ends inside: links to count besides lo (dies with the netns)
        subprocess.run(["nsenter", f"--net={path}", "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
                       check=False)
        pause = subprocess.Popen(["nsenter", f"--net={path}", "sleep", "100000"], stdin=subprocess.DEVNULL)
        procs.append(pause)  # nsenter execs sleep in place: this pid is the sleep, killed in cleanup
        for parent in parents:
            (parent / "pause").mkdir()
            (parent / "pause" / "cgroup.procs").write_text(str(pause.pid))
        outsider = procs[0].pid
        sample = collector.pod("pod-0", pause.pid, True, path)
        fast = timed(lambda: [collector.pod(f"pod-{i}", pause.pid, True, path) for i in range(n)])
        slow = timed(lambda: [collector.pod(f"pod-{i}", outsider, True, path) for i in range(n)])
        return fast, slow, len(sample.network)
    finally:
        netns.remove_netns(path)
        netns.release_netns_dir(str(ns_dir))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=110, help="containers (default 110: a full node)")
    ap.add_argument("--files", type=int, default=100, help="files per upper dir")
    ap.add_argument("--warm-passes", type=int, default=5)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root: creates cgroups")

    parents = parent_cgroup_dirs()
    for parent in parents:
        if parent.exists():
            sys.exit(f"{parent} exists: a previous run was interrupted; remove it first")
    procs: list[subprocess.Popen[bytes]] = []
    children: list[list[Path]] = []
    tmp = Path(tempfile.mkdtemp(prefix="cri-py-bench-stats-"))
    try:
        children = make_cgroups(parents, args.n)
        start_sleeps(children, procs)
        uppers = make_upper_dirs(tmp, args.n, args.files)
        keys = [f"ctr-{i}" for i in range(args.n)]

        collector = StatsCollector()

        def full_pass() -> None:
            for key, proc, upper in zip(keys, procs, uppers):
                collector.container(key, proc.pid, upper)

        def cgroup_pass() -> None:
            for key, proc in zip(keys, procs):
                collector.container(key, proc.pid, "")

        cold = timed(full_pass)
        warm = [timed(full_pass) for _ in range(args.warm_passes)]
        cg_only = [timed(cgroup_pass) for _ in range(args.warm_passes)]
        sample = collector.container(keys[0], procs[0].pid, uppers[0])
        pod_fast, pod_slow, ifaces = bench_pods(args.n, tmp, collector, parents, procs)

        version = "v2" if (parents[0] / "cgroup.subtree_control").exists() else "v1"
        print(f"cgroups: {version}: " + ", ".join(str(p) for p in parents))
        print(f"containers: {args.n}, upper dirs of {args.files} files in {args.files // max(1, args.files // 10)} dirs")
        print(f"first pass (cold, walks every upper dir): {cold:7.1f} ms  ({cold * 1000 / args.n:.0f} us/container)")
        print(f"warm pass (disk use cached), median of {len(warm)}: {statistics.median(warm):7.1f} ms"
              f"  (min {min(warm):.1f}, max {max(warm):.1f}; {statistics.median(warm) * 1000 / args.n:.0f} us/container)")
        print(f"cgroup reads only, median of {len(cg_only)}:          {statistics.median(cg_only):7.1f} ms")
        print(f"pod pass, {args.n} pods (parent cgroup + network, {ifaces} non-lo links):")
        print(f"  network from /proc/<pause>/net/dev:       {pod_fast:7.1f} ms  ({pod_fast * 1000 / args.n:.0f} us/pod)")
        print(f"  network via netlink in the netns (fallback): {pod_slow:7.1f} ms  ({pod_slow * 1000 / args.n:.0f} us/pod)")
        print(f"sample: cpu {sample.cpu_usage_ns} ns, nano_cores {sample.usage_nano_cores}, "
              f"working set {sample.memory.working_set_bytes if sample.memory else None} B, pids {sample.pids}, "
              f"writable {sample.writable_bytes} B / {sample.writable_inodes} inodes")
    finally:
        cleanup(procs, children, parents)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
