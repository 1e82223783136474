#!/usr/bin/env python3
"""Benchmark: streaming exec round trip and port-forward throughput, beside the floor of the same run.

- exec floor: what an exec cannot avoid: bare `runc --root <work>/runc exec <id> true`
  against the container cri-py started, on cri-py's own runc root.
- cri-py exec: the Exec RPC (cmd `true`, stdout only), then the returned URL: connect,
  upgrade to SPDY/3.1 (v4.channel.k8s.io), open the error and stdout streams, until
  the Status arrives on the error stream; the same over WebSocket (v5/v4.channel.k8s.io).
- for scale, ExecSync of `true`: the same exec recipe without the streaming server.
- port-forward floor: an HTTP GET of a file busybox httpd serves in the pod, straight
  from the pod IP over the bench's own bridge.
- cri-py port-forward: the PortForward RPC, then the same GET through the streaming
  server over SPDY/3.1 (portforward.k8s.io, data + error streams) and over WebSocket
  (v4.channel.k8s.io, ?port=).

The exec clients are the e2e tests' (tests/e2e/streamclient.py). The port-forward
clients are the bench's own, on the same codecs (the project's SPDY codec as the client
side, wsproto) but on blocking sockets and counting the body instead of keeping it: the
e2e ones, which keep it, ran at 95% CPU and set the rate themselves. The CPU columns
say which side is the limit; they are Python, so the numbers are not kubectl's.

Prints numbers only. Needs root; starts the local registry with the test images
(hack/test-images.sh) if it is not running, and stops it again at the end:
    .venv/bin/python hack/bench_streaming.py [--runs 50 --downloads 5 --size-mb 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc as cri_grpc
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, RejectConnection, Request

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests.e2e.streamclient
from benchlib import pct, pod_bench  # noqa: E402

from cri_py.streaming import spdy  # noqa: E402
from tests.e2e import streamclient as sc  # noqa: E402

BRIDGE = "cripybench2"
SUBNET = "10.236.0.0/16"
BUSYBOX = "docker.io/library/busybox:latest"
PORT = 8080
MB = 1e6
HTTP_GET = b"GET /big HTTP/1.0\r\n\r\n"  # httpd closes after the body
CHUNK = 1 << 18  # recv size: the SPDY codec parses 256 KiB at a time as fast as 64 KiB
WS_CHUNK = 1 << 16  # wsproto re-slices its buffer per frame: bigger reads are slower
FLOOR_CHUNK = 1 << 23  # the floor takes whatever the socket buffer holds in one call
LABEL = 46  # the table's first column


def row(label: str, values: list[float]) -> str:
    """One exec line of the table, in ms."""
    return (f"{label:<{LABEL}} {statistics.median(values) * 1000:8.1f} {pct(values, 0.9) * 1000:8.1f} "
            f"{pct(values, 0.99) * 1000:8.1f} {max(values) * 1000:8.1f}")


def rate_row(label: str, rates: list[float], busy: tuple[float, float]) -> str:
    """One port-forward line of the table: MB/s, and how busy the daemon and the client were."""
    return (f"{label:<{LABEL}} {statistics.median(rates):8.0f} {min(rates):8.0f} {max(rates):8.0f} "
            f"{busy[0] * 100:7.0f}% {busy[1] * 100:7.0f}%")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all threads (/proc/<pid>/stat utime, stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def downloads(fetch: Callable[[], float], count: int, daemon_pid: int) -> tuple[list[float], tuple[float, float]]:
    """`count` downloads' MB/s, and the daemon's and this process's (the client's) CPU per
    wall second over them: near 100% names the side that sets the rate."""
    wall, daemon, client = time.perf_counter(), cpu_seconds(daemon_pid), time.process_time()
    rates = [fetch() for _ in range(count)]
    wall = time.perf_counter() - wall
    return rates, ((cpu_seconds(daemon_pid) - daemon) / wall, (time.process_time() - client) / wall)


# --- the pod --------------------------------------------------------------------------


def pod_config(work: Path) -> cri.PodSandboxConfig:
    meta = cri.PodSandboxMetadata(name="bench-streaming", namespace="bench", uid="uid-bench-streaming")
    return cri.PodSandboxConfig(metadata=meta, hostname="bench-streaming", log_directory=str(work / "pod-logs"))


def httpd_container(sandbox_id: str, pod: cri.PodSandboxConfig, image: str, size_mb: int) -> cri.CreateContainerRequest:
    """busybox httpd serving /www/big (size_mb MiB of zeros), written before it listens."""
    script = (f"mkdir -p /www && dd if=/dev/zero of=/www/big bs=1M count={size_mb} 2>/dev/null "
              f"&& exec httpd -f -p {PORT} -h /www")
    config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="httpd"), image=cri.ImageSpec(image=image),
                                 command=["sh", "-c", script], log_path="httpd/0.log")
    return cri.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=config, sandbox_config=pod)


def wait_listening(ip: str, port: int, timeout: float = 60) -> None:
    """httpd listens only once dd is done, so a connect means the file is complete."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((ip, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"nothing listens on {ip}:{port}") from None
            time.sleep(0.05)


# --- exec -----------------------------------------------------------------------------


def floor_exec(runs: int, work: Path, container_id: str) -> list[float]:
    """Bare `runc exec <id> true` on the root cri-py's runc handler uses."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(["runc", "--root", str(work / "runc"), "exec", container_id, "true"], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def timed_exec(
    loop: asyncio.AbstractEventLoop,
    runtime: cri_grpc.RuntimeServiceStub,
    container_id: str,
    client: Callable[[str], Coroutine[Any, Any, sc.Result]],
) -> tuple[float, float, str]:
    """Exec RPC + one streaming session of `true`: (total seconds, RPC seconds, protocol)."""
    request = cri.ExecRequest(container_id=container_id, cmd=["true"], stdout=True)
    start = time.perf_counter()
    url = runtime.Exec(request, timeout=30).url
    rpc = time.perf_counter() - start
    result = loop.run_until_complete(client(url))
    elapsed = time.perf_counter() - start
    if result.status != 101 or result.status_json.get("status") != "Success":
        raise SystemExit(f"exec failed: HTTP {result.status}, error stream {result.error!r}")
    return elapsed, rpc, result.protocol


def timed_exec_sync(runtime: cri_grpc.RuntimeServiceStub, container_id: str) -> float:
    """ExecSync of `true`: the same exec recipe with no streaming server, to tell their costs apart."""
    start = time.perf_counter()
    response = runtime.ExecSync(cri.ExecSyncRequest(container_id=container_id, cmd=["true"], timeout=30), timeout=60)
    elapsed = time.perf_counter() - start
    if response.exit_code != 0:
        raise SystemExit(f"ExecSync failed: exit code {response.exit_code}, stderr {response.stderr!r}")
    return elapsed


def spdy_true(url: str) -> Coroutine[Any, Any, sc.Result]:
    """error + stdout streams; returns once the error stream (the Status) is finished."""
    return sc.spdy_exec(url, stdout=True, stderr=False)


# --- port-forward ---------------------------------------------------------------------


class Body:
    """An HTTP response counted as it streams by: the head is kept (to check the status),
    the rest only counted. Keeping 64 MiB would make the client's page faults, not the
    server, set the rate."""

    def __init__(self) -> None:
        self.head = bytearray()
        self.total = 0

    def feed(self, data: bytes | memoryview) -> None:
        if len(self.head) < 1024:
            self.head += data[: 1024 - len(self.head)]
        self.total += len(data)

    def check(self, size: int, error: bytes = b"") -> int:
        """`size`, or exit unless this was a 200 with `size` body bytes: a broken forward
        must never show up as a fast one."""
        end = self.head.find(b"\r\n\r\n")
        if error or end < 0 or b" 200 " not in self.head[:end] or self.total - end - 4 != size:
            raise SystemExit(f"bad download: {bytes(self.head[:120])!r}, {self.total} bytes, error {error[:200]!r}")
        return size


def floor_fetch(ip: str, size: int) -> float:
    """MB/s of a plain-socket GET from the pod IP: no streaming server in the way."""
    buf = memoryview(bytearray(FLOOR_CHUNK))
    body = Body()
    start = time.perf_counter()
    with socket.create_connection((ip, PORT), timeout=30) as sock:
        sock.sendall(HTTP_GET)
        while n := sock.recv_into(buf):
            body.feed(buf[:n])
    return body.check(size) / (time.perf_counter() - start) / MB


def upgrade(url: str, headers: list[tuple[str, str]]) -> tuple[socket.socket, bytes]:
    """The upgrade GET on a blocking socket; the socket and what followed the 101's head."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lines = [f"GET {parts.path} HTTP/1.1", f"Host: {parts.netloc}", *(f"{k}: {v}" for k, v in headers)]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(CHUNK)
        if not chunk:
            raise SystemExit(f"the streaming server closed before answering: {data!r}")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    if not head.startswith(b"HTTP/1.1 101"):
        sock.close()
        raise SystemExit(f"upgrade refused: {head!r}")
    return sock, rest


def spdy_download(url: str, size: int) -> int:
    """HTTP_GET over one data + error stream pair, as kubectl port-forward opens them."""
    sock, data = upgrade(url, [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"),
                               ("X-Stream-Protocol-Version", "portforward.k8s.io")])
    with sock:
        conn = spdy.SpdyConnection(server=False)
        error_id = conn.next_stream_id
        conn.syn_stream(error_id, {"streamtype": "error", "port": str(PORT), "requestid": "0"}, fin=True)
        data_id = conn.next_stream_id
        conn.syn_stream(data_id, {"streamtype": "data", "port": str(PORT), "requestid": "0"})
        conn.data(data_id, HTTP_GET)
        sock.sendall(conn.data_to_send())
        body, error = Body(), bytearray()
        while True:
            for event in conn.receive_data(data):
                if isinstance(event, spdy.DataReceived) and event.stream_id == data_id:
                    body.feed(event.data)
                    if event.fin:
                        return body.check(size, bytes(error))
                elif isinstance(event, spdy.DataReceived) and event.stream_id == error_id:
                    error += event.data
                elif isinstance(event, (spdy.StreamReset, spdy.GoAwayReceived)):
                    raise SystemExit(f"port-forward over SPDY ended early: {event}, error {bytes(error)!r}")
            if out := conn.data_to_send():
                sock.sendall(out)
            data = sock.recv(CHUNK)
            if not data:
                return body.check(size, bytes(error) or b"the server closed before the data stream's FIN")


def ws_download(url: str, size: int) -> int:
    """HTTP_GET on channel 0 of a v4.channel.k8s.io port-forward; the first message of each
    channel is the port, later ones on channel 1 are errors."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with sock:
        ws = WSConnection(ConnectionType.CLIENT)
        sock.sendall(ws.send(Request(host=parts.netloc, target=f"{parts.path}?{parts.query}",
                                     subprotocols=["v4.channel.k8s.io"])))
        body, error = Body(), bytearray()
        seen: set[int] = set()
        channel = -1  # the channel of the message under way (wsproto may split messages)
        while True:
            data = sock.recv(WS_CHUNK)
            ws.receive_data(data or None)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    sock.sendall(ws.send(BytesMessage(b"\x00" + HTTP_GET)))
                elif isinstance(event, RejectConnection):
                    raise SystemExit(f"WebSocket upgrade refused: HTTP {event.status_code}")
                elif isinstance(event, BytesMessage):
                    payload = event.data
                    if channel < 0 and payload:
                        channel, payload = payload[0], payload[1:]
                    if channel not in seen:
                        seen.add(channel)  # the port prefix
                    elif channel == 0:
                        body.feed(payload)
                    elif channel == 1:
                        error += payload
                    if event.message_finished:
                        channel = -1
                elif isinstance(event, CloseConnection):
                    sock.sendall(ws.send(event.response()))
                    return body.check(size, bytes(error))
            if not data:
                return body.check(size, bytes(error) or b"the server closed without a close frame")


def forward_fetch(runtime: cri_grpc.RuntimeServiceStub, sandbox_id: str, size: int, websocket: bool) -> float:
    """MB/s of the same GET through PortForward + the streaming server (RPC included)."""
    start = time.perf_counter()
    url = runtime.PortForward(cri.PortForwardRequest(pod_sandbox_id=sandbox_id, port=[PORT]), timeout=30).url
    got = ws_download(f"{url}?port={PORT}", size) if websocket else spdy_download(url, size)
    return got / (time.perf_counter() - start) / MB


# --- main -----------------------------------------------------------------------------


def close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what an interrupted client left pending, so Ctrl-C ends without asyncio's noise."""
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    if pending:  # gather() of nothing would bind to another loop
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="execs of `true` per path")
    parser.add_argument("--downloads", type=int, default=5, help="downloads per port-forward path")
    parser.add_argument("--size-mb", type=int, default=64, help="MiB the pod serves")
    parser.add_argument("--log-level", default="warning", help="the server's (debug: every RPC's time)")
    args = parser.parse_args()
    size = args.size_mb << 20
    loop = asyncio.new_event_loop()
    with pod_bench("bench-streaming-", BRIDGE, SUBNET, args.log_level) as (server, sock, work):
        try:
            with grpc.insecure_channel(f"unix://{sock}") as channel:
                runtime = cri_grpc.RuntimeServiceStub(channel)
                images = cri_grpc.ImageServiceStub(channel)
                image = images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=BUSYBOX)), timeout=240).image_ref
                pod = pod_config(work)
                sid = runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=pod), timeout=240).pod_sandbox_id
                pod_ip = runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=30).status.network.ip
                cid = runtime.CreateContainer(httpd_container(sid, pod, image, args.size_mb), timeout=120).container_id
                runtime.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=120)
                wait_listening(pod_ip, PORT)

                # exec: one untimed warm-up of each path, then the runs, floor first
                floor_exec(1, work, cid)
                timed_exec(loop, runtime, cid, spdy_true)
                timed_exec(loop, runtime, cid, sc.ws_exec)
                timed_exec_sync(runtime, cid)
                floor_times = floor_exec(args.runs, work, cid)
                spdy_runs = [timed_exec(loop, runtime, cid, spdy_true) for _ in range(args.runs)]
                ws_runs = [timed_exec(loop, runtime, cid, sc.ws_exec) for _ in range(args.runs)]
                sync_times = [timed_exec_sync(runtime, cid) for _ in range(args.runs)]

                # port-forward: one untimed download of each path warms the page cache and the server
                floor_fetch(pod_ip, size)
                forward_fetch(runtime, sid, size, websocket=False)
                forward_fetch(runtime, sid, size, websocket=True)
                floor_rates, floor_busy = downloads(lambda: floor_fetch(pod_ip, size), args.downloads, server.pid)
                spdy_rates, spdy_busy = downloads(lambda: forward_fetch(runtime, sid, size, False),
                                                  args.downloads, server.pid)
                ws_rates, ws_busy = downloads(lambda: forward_fetch(runtime, sid, size, True),
                                              args.downloads, server.pid)
                runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=240)

            spdy_times, rpc_times = [t for t, _, _ in spdy_runs], [r for _, r, _ in spdy_runs]
            ws_times = [t for t, _, _ in ws_runs]
            floor_p50 = statistics.median(floor_times)
            print(f"{f'exec `true`, {args.runs} runs each, ms':<{LABEL}} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}")
            print(row("floor: runc exec", floor_times))
            print(row(f"cri-py Exec + SPDY ({spdy_runs[0][2]})", spdy_times))
            print(row(f"cri-py Exec + WebSocket ({ws_runs[0][2]})", ws_times))
            print(row("  of which the Exec RPC (SPDY runs)", rpc_times))
            print(row("cri-py ExecSync (same recipe, no streaming)", sync_times))
            print(f"p50: SPDY {statistics.median(spdy_times) / floor_p50:.2f}x the floor, "
                  f"WebSocket {statistics.median(ws_times) / floor_p50:.2f}x the floor")
            print()
            print(f"{f'port-forward, GET of {args.size_mb} MiB, {args.downloads} each, MB/s':<{LABEL}} "
                  f"{'median':>8} {'min':>8} {'max':>8} {'daemon':>8} {'client':>8}")
            print(rate_row("floor: direct from the pod IP", floor_rates, floor_busy))
            print(rate_row("cri-py PortForward + SPDY", spdy_rates, spdy_busy))
            print(rate_row("cri-py PortForward + WebSocket (v4)", ws_rates, ws_busy))
            floor_rate = statistics.median(floor_rates)
            print(f"median: SPDY {statistics.median(spdy_rates) / floor_rate:.2f}x the floor's rate, "
                  f"WebSocket {statistics.median(ws_rates) / floor_rate:.2f}x the floor's rate")
        finally:
            try:
                close_loop(loop)
            except Exception as exc:  # noqa: BLE001 - never in the way of the cleanup pod_bench does
                print(f"warning: closing the client loop: {exc}", file=sys.stderr)


if __name__ == "__main__":
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    main()
