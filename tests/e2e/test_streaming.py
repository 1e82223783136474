"""Exec and port-forward through the streaming server, over SPDY/3.1 and WebSocket."""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest
from cri_api.v1 import api_pb2 as cri

from tests.e2e import streamclient as sc
from tests.e2e.conftest import Pod, wait_for

SUCCESS = {"metadata": {}, "status": "Success"}


def exec_url(pod: Pod, container_id: str, cmd: list[str], **flags) -> str:
    flags.setdefault("stdout", True)
    request = cri.ExecRequest(container_id=container_id, cmd=cmd, **flags)
    return pod.runtime.Exec(request).url


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def ctr(pod):
    return pod.run("sleeper", ["sleep", "99999"])


def test_exec_echo_both_protocols(pod, ctr):
    url = exec_url(pod, ctr, ["echo", "hi"], stderr=True)
    assert url.startswith("http://127.0.0.1:") and "/exec/" in url
    result = run(sc.spdy_exec(url))
    assert result.status == 101 and result.protocol == "v4.channel.k8s.io"
    assert result.stdout == b"hi\n" and result.stderr == b""
    assert result.status_json == SUCCESS
    result = run(sc.ws_exec(exec_url(pod, ctr, ["echo", "hi"], stderr=True)))
    assert result.status == 101
    assert result.stdout == b"hi\n"
    assert result.status_json == SUCCESS


def test_exec_exit_code_and_stderr(pod, ctr):
    result = run(sc.spdy_exec(exec_url(pod, ctr, ["sh", "-c", "echo oops >&2; exit 3"], stderr=True)))
    status = result.status_json
    assert result.stderr == b"oops\n"
    assert status["status"] == "Failure" and status["reason"] == "NonZeroExitCode"
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
    result = run(sc.ws_exec(exec_url(pod, ctr, ["sh", "-c", "exit 3"])))
    assert result.status_json.get("details", {}).get("causes") == [{"reason": "ExitCode", "message": "3"}], result
    result = run(sc.spdy_exec(exec_url(pod, ctr, ["/no/such/binary"])))
    assert result.status_json["status"] == "Failure", result.error


def test_exec_stdin(pod, ctr):
    data = b"line one\n" + b"x" * 200000 + b"\nend\n"
    result = run(sc.spdy_exec(exec_url(pod, ctr, ["cat"], stdin=True), stdin=data))
    assert result.stdout == data and result.status_json == SUCCESS
    result = run(sc.ws_exec(exec_url(pod, ctr, ["cat"], stdin=True), stdin=b"via websocket\n"))
    assert result.stdout == b"via websocket\n" and result.status_json == SUCCESS


def test_exec_tty_resize(pod, ctr):
    url = exec_url(pod, ctr, ["sh", "-c", "read x; stty size"], stdin=True, tty=True)
    result = run(sc.spdy_exec(url, stdin=b"go\n", stderr=False, tty=True, resize=(100, 42), close_stdin=False))
    assert b"42 100" in result.stdout, result.stdout
    assert result.status_json == SUCCESS


def test_exec_validation_and_token_reuse(pod, ctr):
    def code(**kwargs) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as err:
            pod.runtime.Exec(cri.ExecRequest(**kwargs))
        return err.value.code()

    assert code(container_id="nope", cmd=["true"], stdout=True) == grpc.StatusCode.NOT_FOUND
    assert code(container_id=ctr, cmd=[], stdout=True) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(container_id=ctr, cmd=["true"]) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(container_id=ctr, cmd=["true"], tty=True, stdout=True, stderr=True) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        pod.runtime.PortForward(cri.PortForwardRequest(pod_sandbox_id="nope", port=[80]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    url = exec_url(pod, ctr, ["true"])
    assert run(sc.spdy_exec(url)).status == 101
    assert run(sc.spdy_exec(url)).status == 404
    assert run(sc.ws_exec(url)).status == 404
    # protocol negotiation
    url = exec_url(pod, ctr, ["true"])
    result = run(sc.spdy_exec(url, protocols=["v9.channel.k8s.io"]))
    assert result.status == 403
    assert "v4.channel.k8s.io" in result.headers["x-accepted-stream-protocol-versions"]
    result = run(sc.spdy_exec(exec_url(pod, ctr, ["true"]), protocols=[]))
    assert result.status == 400
    exited = pod.run("done", ["true"])
    pod.wait_exit(exited)
    assert code(container_id=exited, cmd=["true"], stdout=True) == grpc.StatusCode.FAILED_PRECONDITION


def _sleepers(pod: Pod, ctr: str) -> list[str]:
    out = pod.exec(ctr, ["ps", "-o", "pid,args"]).stdout.decode()
    return [line for line in out.splitlines() if line.split(None, 1)[-1] == "sleep 1000"]


def daemon_fds(pod: Pod) -> int:
    return len(os.listdir(f"/proc/{pod.server.proc.pid}/fd"))


def test_client_disconnect_kills_the_process(pod, ctr):
    baseline = daemon_fds(pod)
    for session_class in (sc.SpdySession, sc.WsSession):
        async def open_and_drop() -> None:
            session = await session_class.open(exec_url(pod, ctr, ["sleep", "1000"]))
            await asyncio.to_thread(wait_for, lambda: _sleepers(pod, ctr), 10, 0.05, "the exec'd sleep")
            session.close()

        run(open_and_drop())
        wait_for(lambda: not _sleepers(pod, ctr), timeout=15, what="the exec'd sleep to be killed")
    # the connections, pipes and shim connections of both sessions are closed too
    wait_for(lambda: daemon_fds(pod) <= baseline, what=f"the daemon back to {baseline} fds")


def test_portforward_httpd_both_protocols(pod):
    pod.run("web", ["httpd", "-f", "-p", "8080", "-h", "/var/www"])
    request = b"GET /index.html HTTP/1.0\r\nHost: localhost\r\n\r\n"

    def url(**kw) -> str:
        return pod.runtime.PortForward(cri.PortForwardRequest(pod_sandbox_id=pod.id, **kw)).url

    def fetch_spdy() -> bytes:
        return run(sc.spdy_portforward(url(port=[8080]), 8080, request)).stdout

    wait_for(lambda: b"hello from cri-py" in fetch_spdy(), timeout=20, what="httpd over SPDY")
    pf_url = url(port=[8080])
    assert "/portforward/" in pf_url
    result = run(sc.spdy_portforward(pf_url, 8080, request))
    assert result.protocol == "portforward.k8s.io"
    assert result.stdout.startswith(b"HTTP/1.") and b"hello from cri-py" in result.stdout
    assert run(sc.spdy_portforward(pf_url, 8080, request)).status == 404  # single use

    # several concurrent connections on one SPDY session
    async def many() -> list[sc.Result]:
        return await asyncio.gather(*(sc.spdy_portforward(url(port=[8080]), 8080, request) for _ in range(5)))

    assert all(b"hello from cri-py" in r.stdout for r in run(many()))

    result = run(sc.ws_portforward(url() + "?port=8080", request))
    assert result.status == 101
    assert result.headers["prefix0"] == (8080).to_bytes(2, "little").hex()
    assert b"hello from cri-py" in result.stdout

    # a port nobody listens on: the error stream says so
    result = run(sc.spdy_portforward(url(port=[9]), 9, b"x"))
    assert b"9" in result.error and result.stdout == b""


def test_portforward_two_ports_over_websocket(pod):
    pod.run("web", ["httpd", "-f", "-p", "8080", "-h", "/var/www"])
    pod.run("web2", ["sh", "-c", "mkdir -p /tmp/w && echo second > /tmp/w/index.html && exec httpd -f -p 8081 -h /tmp/w"])
    request = b"GET /index.html HTTP/1.0\r\nHost: localhost\r\n\r\n"

    def url() -> str:
        return pod.runtime.PortForward(cri.PortForwardRequest(pod_sandbox_id=pod.id)).url

    def both() -> tuple[bytes, bytes] | None:
        result = run(sc.ws_portforward_ports(url() + "?port=8080,8081", {8080: request, 8081: request}))
        if b"hello from cri-py" in result[8080] and b"second" in result[8081]:
            return result[8080], result[8081]
        return None

    wait_for(both, timeout=20, what="two ports over one WebSocket")


# --- attach -----------------------------------------------------------------------------

COUNTER = ["sh", "-c", "i=0; while true; do echo line $i; i=$((i+1)); sleep 0.1; done"]


def attach_url(pod: Pod, container_id: str, **flags) -> str:
    flags.setdefault("stdout", True)
    return pod.runtime.Attach(cri.AttachRequest(container_id=container_id, **flags)).url


def shim_fds(pod: Pod, container_id: str) -> int:
    """How many fds the container's shim holds (an attach that ended must leave none)."""
    pid = (pod.server.base / "state" / "tasks" / container_id / "shim.pid").read_text().strip()
    return len(os.listdir(f"/proc/{pid}/fd"))


def lines_in(session: sc.Session) -> list[str]:
    return [line for line in session.out["stdout"].decode().splitlines() if line.startswith("line ")]


def test_attach_sees_live_output_on_both_protocols_at_once(pod):
    ctr = pod.run("counter", COUNTER)
    # output in the log means the shim's loop has run since start, so it has accepted
    # the daemon's exit watcher: the fds counted now are the ones it keeps
    wait_for(lambda: pod.log_lines("counter"), what="the first line in the log")
    fds = shim_fds(pod, ctr)
    baseline = daemon_fds(pod)

    async def both() -> tuple[list[str], list[str]]:
        spdy_s = await sc.SpdySession.open(attach_url(pod, ctr))
        ws_s = await sc.WsSession.open(attach_url(pod, ctr))
        assert spdy_s.result.protocol == "v4.channel.k8s.io" and ws_s.result.protocol == "v5.channel.k8s.io"
        await asyncio.gather(
            spdy_s.read_until(lambda s: len(lines_in(s)) >= 5),
            ws_s.read_until(lambda s: len(lines_in(s)) >= 5),
        )
        spdy_s.close()
        ws_s.close()
        return lines_in(spdy_s), lines_in(ws_s)

    seen_spdy, seen_ws = run(both())
    for seen in (seen_spdy, seen_ws):  # consecutive lines: nothing lost or reordered
        numbers = [int(line.split()[1]) for line in seen]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), seen
    # the log is still written while clients are attached
    wait_for(lambda: set(seen_spdy) <= set(pod.log_lines("counter")), what="attached lines in the log")
    wait_for(lambda: shim_fds(pod, ctr) == fds, what="the shim to release the attach connections")
    wait_for(lambda: daemon_fds(pod) <= baseline, what="the daemon to release the attach connections")
    assert pod.status(ctr).status.state == cri.CONTAINER_RUNNING


def test_attach_stdin_once_closes_the_container_stdin(pod):
    ctr = pod.run("cat", ["cat"], stdin=True, stdin_once=True)

    async def session() -> sc.Result:
        s = await sc.SpdySession.open(attach_url(pod, ctr, stdin=True, stderr=True), stdin=True, stderr=True)
        s.send(b"hello\n")
        assert await s.read_until(lambda s: b"hello\n" in s.out["stdout"])
        s.send(b"bye\n", fin=True)  # stdin_once: the end of our stdin is cat's EOF
        return await s.finish()

    result = run(session())
    assert result.stdout == b"hello\nbye\n"
    assert result.status_json == SUCCESS
    status = pod.wait_exit(ctr)
    assert status.exit_code == 0
    assert pod.log_lines("cat") == ["hello", "bye"]


def test_attach_stdin_without_stdin_once_keeps_the_container(pod):
    ctr = pod.run("cat", ["cat"], stdin=True)

    async def session(text: bytes) -> sc.Result:
        s = await sc.WsSession.open(attach_url(pod, ctr, stdin=True))
        s.send(text)
        assert await s.read_until(lambda s: text in s.out["stdout"])
        s.send(b"", fin=True)  # ends this session only: cat keeps its stdin
        return await s.finish()

    for text in (b"first\n", b"second\n"):
        assert run(session(text)).status_json == SUCCESS
    assert pod.status(ctr).status.state == cri.CONTAINER_RUNNING
    assert pod.log_lines("cat") == ["first", "second"]


def test_attach_tty_resize_and_exit(pod):
    ctr = pod.run("shell", ["sh"], stdin=True, tty=True)

    async def session() -> sc.Result:
        s = await sc.SpdySession.open(attach_url(pod, ctr, stdin=True, tty=True), stdin=True, tty=True)
        s.resize(100, 42)
        s.send(b"stty size; echo marker-$((6*7))\n")
        assert await s.read_until(lambda s: b"marker-42" in s.out["stdout"]), s.out
        assert b"42 100" in s.out["stdout"]
        s.send(b"exit 4\n")
        return await s.finish()

    result = run(session())
    assert result.status_json == SUCCESS  # attach reports no exit code; the container does
    assert pod.wait_exit(ctr).exit_code == 4


def test_attach_ends_when_the_container_exits_and_validates(pod):
    ctr = pod.run("short", ["sh", "-c", "read x; echo got $x; exit 0"], stdin=True)

    async def session() -> sc.Result:
        s = await sc.WsSession.open(attach_url(pod, ctr, stdin=True))
        s.send(b"it\n")
        return await s.finish()

    result = run(session())
    assert result.stdout == b"got it\n" and result.status_json == SUCCESS

    def code(**kwargs) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as err:
            pod.runtime.Attach(cri.AttachRequest(**kwargs))
        return err.value.code()

    pod.wait_exit(ctr)
    assert code(container_id="nope", stdout=True) == grpc.StatusCode.NOT_FOUND
    assert code(container_id=ctr, stdout=True) == grpc.StatusCode.FAILED_PRECONDITION
    live = pod.run("live", ["sleep", "1000"])
    assert code(container_id=live) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(container_id=live, tty=True, stdout=True, stderr=True) == grpc.StatusCode.INVALID_ARGUMENT
    url = attach_url(pod, live)

    async def use_once() -> None:
        (await sc.SpdySession.open(url)).close()

    run(use_once())
    assert run(sc.spdy_exec(url)).status == 404  # single use


def daemon_rss(pod: Pod) -> int:
    status = open(f"/proc/{pod.server.proc.pid}/status").read()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024


def test_stdin_the_process_does_not_read_holds_back_the_client(pod, ctr):
    """64 MiB for a process that never reads stdin: the daemon stops reading the client
    (its write stalls) instead of buffering it all, and the session still ends with
    the process."""
    rss, fds = daemon_rss(pod), daemon_fds(pod)

    async def push() -> tuple[bool, int, sc.Result]:
        session = await sc.SpdySession.open(exec_url(pod, ctr, ["sleep", "6"], stdin=True), stdin=True)
        try:
            session.send(b"z" * (64 << 20))
            try:
                await asyncio.wait_for(session.writer.drain(), 2)
                blocked = False
            except asyncio.TimeoutError:
                blocked = True  # the server stopped taking our input
            grown = daemon_rss(pod) - rss
            await session.read_until(lambda s: s.done)
            return blocked, grown, session.outcome()
        finally:
            session.writer.transport.abort()  # close() would first try to send it all

    blocked, grown, result = run(push())
    assert blocked, "the daemon took 64 MiB of stdin the process never read"
    assert grown < 32 << 20, f"the daemon grew by {grown >> 20} MiB"
    assert result.status_json == SUCCESS, result
    wait_for(lambda: daemon_fds(pod) <= fds, what=f"the daemon back to {fds} fds")
