#!/usr/bin/env python3
"""Benchmark: PullImage of test/big (~100 MB, 5,000 files) from the local registry.

Prints cri-py's pull + unpack time beside the floor measured in the same run: the
same layers fetched with curl and unpacked with `tar -x` (one pipeline per layer, all
layers at once, and one after another; the faster is the floor). Numbers only: no
assertion, no pass/fail.

    hack/test-images.sh --big && .venv/bin/python hack/bench_pull.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc as cri_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import start_server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REGISTRY = "127.0.0.1:5000"
IMAGE = "test/big"


def layers() -> list[dict]:
    layout = REPO / "build" / "images" / "big"
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":")[1]
    return json.loads((layout / "blobs" / "sha256" / digest).read_text())["layers"]


def floor_once(parallel: bool) -> float:
    """curl | tar -x of every layer into fresh dirs; wall seconds."""
    work = Path(tempfile.mkdtemp(prefix="bench-floor-", dir="/var/tmp"))
    try:
        start = time.perf_counter()
        procs = []
        for i, layer in enumerate(layers()):
            dest = work / str(i)
            dest.mkdir()
            flag = "-xzf" if layer["mediaType"].endswith("gzip") else "-xf"
            cmd = f"curl -sf http://{REGISTRY}/v2/{IMAGE}/blobs/{layer['digest']} | tar {flag} - -C {dest}"
            proc = subprocess.Popen(["bash", "-o", "pipefail", "-c", cmd])
            if parallel:
                procs.append(proc)
            elif proc.wait() != 0:
                raise SystemExit(f"floor pipeline failed: {cmd}")
        for proc in procs:
            if proc.wait() != 0:
                raise SystemExit("floor pipeline failed")
        return time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cri_py_once(images: cri_grpc.ImageServiceStub) -> float:
    """One PullImage (then RemoveImage, untimed); wall seconds."""
    spec = cri.ImageSpec(image=f"{REGISTRY}/{IMAGE}:latest")
    start = time.perf_counter()
    images.PullImage(cri.PullImageRequest(image=spec), timeout=600)
    elapsed = time.perf_counter() - start
    images.RemoveImage(cri.RemoveImageRequest(image=spec), timeout=600)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    total = sum(layer["size"] for layer in layers())
    print(f"image {REGISTRY}/{IMAGE}: {len(layers())} layers, {total / 1e6:.1f} MB compressed")
    base = Path(tempfile.mkdtemp(prefix="bench-cri-py-", dir="/var/tmp"))
    server, sock = start_server(base)
    par, seq, ours = [], [], []
    try:
        with grpc.insecure_channel(f"unix://{sock}") as channel:
            images = cri_grpc.ImageServiceStub(channel)
            # interleaved, because this disk's file-creation cost drifts during a run
            for _ in range(args.runs):
                par.append(floor_once(True))
                seq.append(floor_once(False))
                ours.append(cri_py_once(images))
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(base, ignore_errors=True)
    floor = min(statistics.median(par), statistics.median(seq))
    median = statistics.median(ours)
    show = lambda xs: ", ".join(f"{x:.3f}" for x in xs)  # noqa: E731
    print(f"floor curl|tar -x, all layers at once : {show(par)} s")
    print(f"floor curl|tar -x, one after another  : {show(seq)} s")
    print(f"cri-py PullImage                      : {show(ours)} s")
    print(f"cri-py median {median:.3f} s = {median / floor:.2f}x the floor ({total / 1e6 / median:.0f} MB/s)")


if __name__ == "__main__":
    if os.geteuid() != 0:
        raise SystemExit("run as root (unpacking keeps ownership)")
    main()
