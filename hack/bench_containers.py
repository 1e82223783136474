#!/usr/bin/env python3
"""Benchmark: CreateContainer + StartContainer latency, beside the floor of the same run.

- floor: what a container start cannot avoid: `runc create` + `runc start` of the
  config.json cri-py wrote for a (warm-up) container, pointed at a plain unpacked
  busybox rootfs and a cgroup of its own, joining the namespaces of the warm-up pod's
  live pause as cri-py's containers do.
- cri-py: CreateContainer + StartContainer of busybox `sleep 1000` over 50 sequential
  containers in one pod (create and start also apart); each is removed, untimed,
  before the next.

Prints numbers only. Needs root; starts the local registry with the test images
(hack/test-images.sh) if it is not running, and stops it again at the end:
    .venv/bin/python hack/bench_containers.py [--sequential 50]

Log throughput is hack/bench_logs.py's: its end-to-end mode runs a real shim (the one
CreateContainer starts) logging busybox `yes` into a CRI log file, beside `yes` into a
plain file, and output never passes through the daemon, so that is the whole path:
    .venv/bin/python hack/bench_logs.py --seconds 10 --dir /var/tmp
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
from benchlib import REPO, pct, pod_bench  # noqa: E402

BRIDGE = "cripybench1"
SUBNET = "10.234.0.0/16"
BUSYBOX = "docker.io/library/busybox:latest"
FLOOR_CGROUP = "cri-py-bench-containers"
PAUSE_NS = re.compile(r"^/proc/\d+/ns/")


def ms(values: list[float]) -> str:
    return f"p50 {statistics.median(values) * 1000:.1f} ms, p99 {pct(values, 0.99) * 1000:.1f} ms"


# --- the floor ----------------------------------------------------------------------


def unpack_busybox(dest: Path) -> None:
    """The first manifest's layers of build/images/busybox, as plain files."""
    layout = REPO / "build/images/busybox"
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_text())
    dest.mkdir()
    for layer in manifest["layers"]:
        with tarfile.open(layout / "blobs/sha256" / layer["digest"][7:]) as tar:
            tar.extractall(dest, filter="tar")


def floor(runs: int, work: Path, ctr_spec: dict, pause_pid: int) -> tuple[list[float], list[float]]:
    """`runc create` + `runc start` of cri-py's own container spec, per container.

    The spec is the one cri-py wrote for a container, pointed at a plain unpacked
    rootfs, a cgroup of its own and the namespaces of a live pause (the warm-up pod's,
    whose files the spec's mounts name too); teardown is untimed.
    """
    rootfs = work / "floor-rootfs"
    unpack_busybox(rootfs)
    runc = ["runc", "--root", str(work / "floor-runc")]
    creates, starts = [], []
    for i in range(runs):
        cid = f"floor{i:04d}"
        bundle = work / f"floor-bundle-{i}"
        bundle.mkdir()
        spec = json.loads(json.dumps(ctr_spec))
        spec["root"]["path"] = str(rootfs)
        spec["linux"]["cgroupsPath"] = f"/{FLOOR_CGROUP}/{cid}"
        for ns in spec["linux"]["namespaces"]:
            if PAUSE_NS.match(ns.get("path", "")):
                ns["path"] = PAUSE_NS.sub(f"/proc/{pause_pid}/ns/", ns["path"])
        (bundle / "config.json").write_text(json.dumps(spec))
        try:
            start = time.perf_counter()
            subprocess.run([*runc, "create", "--bundle", str(bundle), cid], check=True,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            created = time.perf_counter()
            subprocess.run([*runc, "start", cid], check=True)
            creates.append(created - start)
            starts.append(time.perf_counter() - created)
        finally:
            subprocess.run([*runc, "delete", "-f", cid], capture_output=True)
    return creates, starts


def remove_floor_cgroups() -> None:
    """The floor's parent cgroup in every hierarchy (runc removed the leaves)."""
    for parent in [*Path("/sys/fs/cgroup").glob(f"*/{FLOOR_CGROUP}"), Path("/sys/fs/cgroup", FLOOR_CGROUP)]:
        try:
            parent.rmdir()
        except OSError:
            pass


# --- cri-py -------------------------------------------------------------------------


def pod_config(work: Path) -> cri.PodSandboxConfig:
    meta = cri.PodSandboxMetadata(name="bench-ctr", namespace="bench", uid="uid-bench-ctr")
    return cri.PodSandboxConfig(metadata=meta, hostname="bench-ctr", log_directory=str(work / "pod-logs"))


def container(sandbox_id: str, pod: cri.PodSandboxConfig, image: str, name: str) -> cri.CreateContainerRequest:
    config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name), image=cri.ImageSpec(image=image),
                                 command=["sleep", "1000"], log_path=f"{name}/0.log")
    return cri.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=config, sandbox_config=pod)


def timed_start(runtime: cri_grpc.RuntimeServiceStub, request: cri.CreateContainerRequest) -> tuple[str, float, float]:
    """CreateContainer then StartContainer; the id and the seconds each took."""
    start = time.perf_counter()
    container_id = runtime.CreateContainer(request, timeout=120).container_id
    created = time.perf_counter()
    runtime.StartContainer(cri.StartContainerRequest(container_id=container_id), timeout=120)
    return container_id, created - start, time.perf_counter() - created


def remove(runtime: cri_grpc.RuntimeServiceStub, container_id: str) -> None:
    runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=container_id), timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequential", type=int, default=50)
    parser.add_argument("--log-level", default="warning", help="the server's (debug: every RPC's time)")
    args = parser.parse_args()
    with pod_bench("bench-containers-", BRIDGE, SUBNET, args.log_level) as (server, sock, work):
        try:
            with grpc.insecure_channel(f"unix://{sock}") as channel:
                runtime = cri_grpc.RuntimeServiceStub(channel)
                images = cri_grpc.ImageServiceStub(channel)
                image = images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=BUSYBOX)), timeout=240).image_ref
                pod = pod_config(work)
                sid = runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=pod), timeout=240).pod_sandbox_id
                cid, _, _ = timed_start(runtime, container(sid, pod, image, "warm"))  # untimed
                ctr_spec = json.loads((work / "state/containers" / cid / "bundle/config.json").read_text())
                remove(runtime, cid)
                pause_pid = int((work / "state/tasks" / sid / "init.pid").read_text())
                floor_creates, floor_starts = floor(args.sequential, work, ctr_spec, pause_pid)
                floor_total = [c + s for c, s in zip(floor_creates, floor_starts)]
                creates, starts = [], []
                for i in range(args.sequential):
                    cid, create, start = timed_start(runtime, container(sid, pod, image, f"bench-{i}"))
                    creates.append(create)
                    starts.append(start)
                    remove(runtime, cid)
                total = [c + s for c, s in zip(creates, starts)]
                runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=240)
            print(f"floor (runc create + runc start of cri-py's spec), {len(floor_total)} containers: {ms(floor_total)} "
                  f"(create {ms(floor_creates)}; start {ms(floor_starts)})")
            print(f"cri-py CreateContainer + StartContainer, {len(total)} sequential: {ms(total)} "
                  f"= {statistics.median(total) / statistics.median(floor_total):.2f}x the floor "
                  f"(create {ms(creates)}; start {ms(starts)})")
        finally:
            remove_floor_cgroups()


if __name__ == "__main__":
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    main()
