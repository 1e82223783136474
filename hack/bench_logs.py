#!/usr/bin/env python3
"""Benchmark: container log throughput in the CRI format, beside the floor.

- encoder: CriLogEncoder in-process on 100-byte lines in 64 KiB and 1 MiB chunks (MB/s
  of container output), next to a per-line list comprehension over bytes.split, and
  CriLogSink (encode + write to a file in --dir).
- end to end (root, runc, build/images/busybox): a real shim (TaskManager) logging a
  busybox `yes` of 99-char lines for --seconds; MB/s of container output landed in
  the log file and the shim's CPU seconds per MB (/proc/<shim>/stat utime+stime).
- floor: the same container with `yes` writing to a plain file (a bind mount of a
  directory in --dir), no shim in the data path.

Prints numbers only:
    .venv/bin/python hack/bench_logs.py [--seconds 10] [--dir /var/tmp] [--encoder-only]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cri_py.logging.cri_format import CriLogEncoder  # noqa: E402
from cri_py.shim import protocol as p  # noqa: E402
from cri_py.shim.linux import set_child_subreaper  # noqa: E402
from cri_py.shim.logsink import CriLogSink  # noqa: E402

LINE = b"0123456789" * 9 + b"012345678\n"  # 100 bytes with its LF
MB = 1e6
RUNC = shutil.which("runc") or "/usr/sbin/runc"


# --- in-process ----------------------------------------------------------------------


def chunks_of(total: int, size: int) -> list[bytes]:
    """`total` bytes of 100-byte lines cut every `size` bytes (cuts fall mid-line)."""
    data = LINE * (total // len(LINE) + 1)
    return [data[i : i + size] for i in range(0, total, size)]


def best_rate(run, chunks: list[bytes], repeat: int = 3) -> float:
    """MB/s of input over the best of `repeat` runs of `run(chunks)`."""
    total = sum(map(len, chunks))
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run(chunks)
        best = min(best, time.perf_counter() - start)
    return total / best / MB


def encode_parts_all(chunks: list[bytes]) -> None:
    """What the shim runs per chunk (buffers for one writev)."""
    enc = CriLogEncoder()
    now = time.time_ns()
    for chunk in chunks:
        enc.encode_parts("stdout", chunk, now)


def encode_all(chunks: list[bytes]) -> None:
    """The bytes API: the same plus joining the buffers."""
    enc = CriLogEncoder()
    now = time.time_ns()
    for chunk in chunks:
        enc.encode("stdout", chunk, now)


def listcomp_all(chunks: list[bytes]) -> None:
    """The per-line alternative, for reference: one list comprehension per chunk."""
    pending = b""
    prefix = CriLogEncoder().timestamp(time.time_ns()) + b" stdout F "
    for chunk in chunks:
        *lines, pending = (pending + chunk).split(b"\n")
        b"".join([prefix + line + b"\n" for line in lines])


def sink_all(path: str):
    def run(chunks: list[bytes]) -> None:
        sink = CriLogSink(path)
        for chunk in chunks:
            sink.write("stdout", chunk)
        sink.close()
        os.unlink(path)

    return run


def bench_encoder(work: Path) -> None:
    print(f"in-process, 100-byte lines, MB/s of container output (sink file in {work}):")
    for size, label in ((65536, "64 KiB"), (1 << 20, "1 MiB")):
        chunks = chunks_of(256 << 20, size)
        print(f"  {label} chunks: encode_parts {best_rate(encode_parts_all, chunks):6.0f}, "
              f"encode {best_rate(encode_all, chunks):6.0f}, "
              f"per-line listcomp {best_rate(listcomp_all, chunks):6.0f}, "
              f"CriLogSink {best_rate(sink_all(str(work / 'sink.log')), chunks, 2):6.0f}")


# --- end to end ----------------------------------------------------------------------


def unpack_busybox(dest: Path) -> None:
    """The first manifest's layers of build/images/busybox (no whiteouts in it)."""
    layout = REPO / "build" / "images" / "busybox"

    def blob(digest: str) -> Path:
        algo, hexdigest = digest.split(":", 1)
        return layout / "blobs" / algo / hexdigest

    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(blob(index["manifests"][0]["digest"]).read_text())
    dest.mkdir(parents=True)
    for layer in manifest["layers"]:
        with tarfile.open(blob(layer["digest"])) as tar:
            tar.extractall(dest, filter="tar")


def bundle(path: Path, rootfs: Path, args: list[str], data_dir: Path | None = None) -> str:
    """A minimal OCI bundle (the shape of tests/e2e/test_tasks.py's specs)."""
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755", "size=65536k"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    ]
    if data_dir is not None:
        mounts.append({"destination": "/data", "type": "bind", "source": str(data_dir), "options": ["rbind", "rw"]})
    spec = {
        "ociVersion": "1.0.2",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": {k: ["CAP_KILL"] for k in ("bounding", "effective", "permitted")},
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": True},
        "hostname": "bench",
        "mounts": mounts,
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
        },
    }
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(spec))
    return str(path)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def timed_run(tm, state_dir: Path, spec, seconds: float, output: Path) -> dict[str, float]:
    """Start the task, measure `output`'s growth and CPU for `seconds`, then stop it."""
    await tm.create(spec)
    state = await tm.start(spec.id)
    shim_pid = int(p.read_json(str(state_dir / "tasks" / spec.id / p.SHIM_PID_FILE)))
    await asyncio.sleep(0.5)  # past the container's start
    size0, shim0, ctr0, t0 = output.stat().st_size, cpu_seconds(shim_pid), cpu_seconds(state.pid), time.monotonic()
    await asyncio.sleep(seconds)
    size1, shim1, ctr1, t1 = output.stat().st_size, cpu_seconds(shim_pid), cpu_seconds(state.pid), time.monotonic()
    await tm.kill(spec.id, signal.SIGKILL)
    await tm.wait(spec.id, timeout=30)
    await tm.delete(spec.id)
    return {"bytes": size1 - size0, "secs": t1 - t0, "shim_cpu": shim1 - shim0, "ctr_cpu": ctr1 - ctr0}


def reap_children(timeout: float) -> None:
    """Collect the launcher (we are its subreaper) once it leaves, so no zombie is
    left under a pid 1 that does not reap."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not pid:
            time.sleep(0.05)


def check_tail(log: Path) -> int:
    """Bytes per record at the end of the log (all 100-byte lines: F records only, but
    for the P record of the line SIGKILL cut)."""
    with open(log, "rb") as fh:
        fh.seek(max(0, log.stat().st_size - (1 << 20)))
        records = fh.read().split(b"\n")[1:-2]
    sizes = {len(r) + 1 for r in records}
    assert len(sizes) == 1 and all(r.split(b" ", 3)[2:] == [b"F", LINE[:-1]] for r in records), sizes
    return sizes.pop()


async def bench_end_to_end(work: Path, seconds: float) -> None:
    from cri_py.runtime.tasks import TaskManager, TaskSpec

    set_child_subreaper()
    rootfs = work / "rootfs"
    unpack_busybox(rootfs)
    os.sync()
    floor_dir = work / "floor"
    floor_dir.mkdir()
    state = work / "state"
    tm = TaskManager(str(state))
    text = LINE[:-1].decode()
    try:
        floor_spec = TaskSpec("floor", bundle(work / "b-floor", rootfs, ["sh", "-c", f"yes {text} > /data/out"], floor_dir),
                              runtime_binary=RUNC, runtime_root=str(work / "runc"))
        floor = await timed_run(tm, state, floor_spec, seconds, floor_dir / "out")
        os.unlink(floor_dir / "out")
        os.sync()  # no writeback of the floor's GBs throttling the next run
        log = work / "ctr.log"
        cri_spec = TaskSpec("cri", bundle(work / "b-cri", rootfs, ["yes", text]), runtime_binary=RUNC,
                            runtime_root=str(work / "runc"), log_path=str(log))
        cri = await timed_run(tm, state, cri_spec, seconds, log)
        record = check_tail(log)
        os.unlink(log)
        os.sync()
    finally:
        await tm.close()
        reap_children(10.0)
    payload = cri["bytes"] * len(LINE) / record  # container bytes, without the record headers
    print(f"end to end, {seconds:.0f} s each, files in {work}:")
    print(f"floor: yes > file in the container:  {floor['bytes'] / floor['secs'] / MB:8.1f} MB/s "
          f"(yes: {floor['ctr_cpu'] / floor['secs']:.2f} CPU)")
    print(f"cri-py: yes -> shim -> CRI log:       {payload / cri['secs'] / MB:8.1f} MB/s of output "
          f"({cri['bytes'] / cri['secs'] / MB:.1f} MB/s of log file, {record} B per 100 B line)")
    print(f"shim CPU:                             {cri['shim_cpu'] / (payload / MB):8.5f} CPU-s per MB of output "
          f"({cri['shim_cpu'] / cri['secs']:.2f} CPU; yes: {cri['ctr_cpu'] / cri['secs']:.2f} CPU)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--dir", default=None, help="where log files go (default: a temp dir)")
    parser.add_argument("--encoder-only", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-logs-", dir=args.dir))
    try:
        bench_encoder(work)
        if args.encoder_only:
            return
        if os.geteuid() != 0 or not os.path.exists(RUNC):
            print("end to end: skipped (needs root and runc)")
            return
        asyncio.run(bench_end_to_end(work, args.seconds))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
