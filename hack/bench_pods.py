#!/usr/bin/env python3
"""Benchmark: RunPodSandbox latency and per-pod memory, beside the floor of the same run.

- floor: what a pod start cannot avoid: a fresh netns (`ip netns add`), CNI ADD with
  the same bridge + host-local plugins (run directly), and `runc run -d` of the same
  pause spec cri-py writes, on an already-unpacked rootfs.
- cri-py: RunPodSandbox over 50 sequential pods, then 110 pods 10 at a time.
- memory: the daemon's PSS and the shims' PSS with 110 pods running.

Prints numbers only. Needs root and the local registry with the pause image:
    hack/test-images.sh && .venv/bin/python hack/bench_pods.py [--sequential 50 --pods 110]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import grpc
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc as cri_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import REPO, conflist, pct, pod_bench  # noqa: E402

CNI_BIN = "/usr/lib/cni"
BRIDGE = "cripybench0"
SUBNET = "10.232.0.0/16"


def pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# --- the floor ----------------------------------------------------------------------


def _cni(command: str, netns: str, cid: str, conf: dict, prev: dict | None = None) -> dict:
    """One plugin chain run, as libcni would, straight from the binaries."""
    result = prev
    plugins = conf["plugins"] if command == "ADD" else list(reversed(conf["plugins"]))
    for plugin in plugins:
        cfg = dict(plugin, name=conf["name"], cniVersion=conf["cniVersion"])
        if result is not None:
            cfg["prevResult"] = result
        env = dict(os.environ, CNI_COMMAND=command, CNI_CONTAINERID=cid, CNI_NETNS=netns, CNI_IFNAME="eth0",
                   CNI_PATH=CNI_BIN)
        out = subprocess.run([f"{CNI_BIN}/{plugin['type']}"], input=json.dumps(cfg).encode(), env=env,
                             capture_output=True, check=True)
        if command == "ADD":
            result = json.loads(out.stdout)
    return result or {}


def floor(runs: int, work: Path, pause_spec: dict) -> list[float]:
    """ip netns add + CNI ADD + `runc run -d` of cri-py's own pause spec, per pod.

    The spec is the one cri-py wrote for a pod, pointed at a plain unpacked rootfs,
    the floor's netns and a cgroup of its own; teardown is untimed.
    """
    layout = REPO / "build/images/pause"
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_text())
    rootfs = work / "floor-rootfs"
    rootfs.mkdir()
    with tarfile.open(layout / "blobs/sha256" / manifest["layers"][0]["digest"][7:]) as tar:
        tar.extractall(rootfs)
    conf = conflist(BRIDGE, SUBNET, work / "floor-ipam")
    runc_root = work / "floor-runc"
    times = []
    for i in range(runs):
        name, cid = f"cripy-bench-{os.getpid()}-{i}", f"floor{i:04d}"
        bundle = work / f"floor-bundle-{i}"
        bundle.mkdir()
        spec = json.loads(json.dumps(pause_spec))
        spec["root"]["path"] = str(rootfs)
        spec["linux"]["cgroupsPath"] = f"/cri-py-bench/{cid}"
        for ns in spec["linux"]["namespaces"]:
            if ns["type"] == "network":
                ns["path"] = f"/run/netns/{name}"
        for m in spec["mounts"]:
            if m["destination"] == "/dev/shm":
                m.update(type="tmpfs", source="shm", options=["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"])
        (bundle / "config.json").write_text(json.dumps(spec))
        start = time.perf_counter()
        subprocess.run(["ip", "netns", "add", name], check=True)
        result = _cni("ADD", f"/run/netns/{name}", cid, conf)
        subprocess.run(["runc", "--root", str(runc_root), "run", "-d", "--bundle", str(bundle), cid], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
        subprocess.run(["runc", "--root", str(runc_root), "delete", "-f", cid], check=True)
        _cni("DEL", f"/run/netns/{name}", cid, conf, result)
        subprocess.run(["ip", "netns", "del", name], check=True)
    return times


# --- cri-py -------------------------------------------------------------------------


def pod(i: int, tag: str) -> cri.RunPodSandboxRequest:
    meta = cri.PodSandboxMetadata(name=f"bench-{tag}-{i}", namespace="bench", uid=f"uid-{tag}-{i}")
    return cri.RunPodSandboxRequest(config=cri.PodSandboxConfig(metadata=meta, hostname=f"bench-{i}"))


def timed_run(runtime: cri_grpc.RuntimeServiceStub, request: cri.RunPodSandboxRequest) -> tuple[str, float]:
    start = time.perf_counter()
    sandbox_id = runtime.RunPodSandbox(request, timeout=240).pod_sandbox_id
    return sandbox_id, time.perf_counter() - start


def remove_all(runtime: cri_grpc.RuntimeServiceStub, ids: list[str]) -> None:
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        list(pool.map(lambda i: runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=i), timeout=240), ids))


def shim_pids(work: Path) -> list[int]:
    """The shims of the running pods, from the pid files in their task dirs."""
    out = []
    for pid_file in (work / "state" / "tasks").glob("*/shim.pid"):
        try:
            out.append(int(pid_file.read_text()))
        except (OSError, ValueError):
            continue
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequential", type=int, default=50)
    parser.add_argument("--pods", type=int, default=110)
    parser.add_argument("--parallel", type=int, default=10)
    args = parser.parse_args()
    with pod_bench("bench-pods-", BRIDGE, SUBNET) as (server, sock, work):
        with grpc.insecure_channel(f"unix://{sock}") as channel:
            runtime = cri_grpc.RuntimeServiceStub(channel)
            sid, _ = timed_run(runtime, pod(0, "warm"))  # pulls the pause image once, untimed
            pause_spec = json.loads((work / "state/sandboxes" / sid / "bundle/config.json").read_text())
            remove_all(runtime, [sid])
            floor_times = floor(args.sequential, work, pause_spec)
            seq = []
            for i in range(args.sequential):
                sid, elapsed = timed_run(runtime, pod(i, "seq"))
                seq.append(elapsed)
                remove_all(runtime, [sid])
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
                results = list(pool.map(lambda i: timed_run(runtime, pod(i, "par")), range(args.pods)))
            wall = time.perf_counter() - start
            shims = shim_pids(work)
            shim_pss = [pss_kb(pid) for pid in shims]
            daemon_pss = pss_kb(server.pid)
            remove_all(runtime, [sid for sid, _ in results])
        par = [elapsed for _, elapsed in results]
        print(f"floor (ip netns add + CNI ADD + runc run -d), {len(floor_times)} pods: "
              f"p50 {statistics.median(floor_times) * 1000:.0f} ms, p99 {pct(floor_times, 0.99) * 1000:.0f} ms")
        print(f"cri-py RunPodSandbox, {len(seq)} sequential: p50 {statistics.median(seq) * 1000:.0f} ms, "
              f"p99 {pct(seq, 0.99) * 1000:.0f} ms = {statistics.median(seq) / statistics.median(floor_times):.2f}x the floor")
        print(f"cri-py RunPodSandbox, {args.pods} pods {args.parallel} at a time: p50 {statistics.median(par) * 1000:.0f} ms, "
              f"p99 {pct(par, 0.99) * 1000:.0f} ms, all in {wall:.1f} s")
        if shim_pss:
            print(f"memory at {args.pods} pods: daemon PSS {daemon_pss / 1024:.1f} MB; {len(shim_pss)} shims, "
                  f"PSS mean {statistics.mean(shim_pss) / 1024:.2f} MB, max {max(shim_pss) / 1024:.2f} MB")


if __name__ == "__main__":
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    main()
