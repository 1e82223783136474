"""Minimal exec/port-forward clients for the e2e tests: raw asyncio sockets, h11 for
the SPDY upgrade, our SPDY codec as the client side, wsproto for WebSocket."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h11
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    RejectConnection,
    Request,
)

from cri_py.streaming import spdy

TIMEOUT = 30.0


@dataclass
class Result:
    status: int = 0  # HTTP status of the upgrade (101 when it worked)
    stdout: bytes = b""
    stderr: bytes = b""
    error: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    protocol: str = ""

    @property
    def status_json(self) -> dict:
        return json.loads(self.error) if self.error else {}


async def _open(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str, str]:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    return reader, writer, target, f"{parts.hostname}:{parts.port}"


async def _spdy_upgrade(url: str, protocols: list[str]):
    reader, writer, target, host = await _open(url)
    http = h11.Connection(h11.CLIENT)
    headers = [("Host", host), ("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")]
    headers += [("X-Stream-Protocol-Version", p) for p in protocols]
    writer.write(http.send(h11.Request(method="POST", target=target, headers=headers)))
    result = Result()
    while True:
        event = http.next_event()
        if event is h11.NEED_DATA:
            data = await asyncio.wait_for(reader.read(65536), TIMEOUT)
            http.receive_data(data)
            if not data:
                raise ConnectionError("server closed before answering")
            continue
        if isinstance(event, (h11.InformationalResponse, h11.Response)):
            result.status = event.status_code
            result.headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            result.protocol = result.headers.get("x-stream-protocol-version", "")
            break
    if result.status != 101:
        writer.close()
        return result, None, None, None
    return result, reader, writer, bytes(http.trailing_data[0])


async def spdy_exec(
    url: str,
    *,
    stdin: bytes | None = None,
    stdout: bool = True,
    stderr: bool = True,
    tty: bool = False,
    resize: tuple[int, int] | None = None,
    protocols: list[str] | None = None,
    close_stdin: bool = True,
) -> Result:
    """One exec over SPDY; stdin (if given) is sent after the streams and resize."""
    result, reader, writer, trailing = await _spdy_upgrade(url, ["v4.channel.k8s.io"] if protocols is None else protocols)
    if reader is None:
        return result
    conn = spdy.SpdyConnection(server=False)
    ids: dict[str, int] = {}

    def open_stream(kind: str, fin: bool) -> None:
        ids[kind] = conn.next_stream_id
        conn.syn_stream(ids[kind], {"streamtype": kind}, fin=fin)

    open_stream("error", True)
    if stdin is not None:
        open_stream("stdin", False)
    if stdout:
        open_stream("stdout", True)
    if stderr:
        open_stream("stderr", True)
    if tty:
        open_stream("resize", False)
    if resize is not None:
        conn.data(ids["resize"], json.dumps({"Width": resize[0], "Height": resize[1]}).encode())
    writer.write(conn.data_to_send())
    if stdin is not None:  # after the resize: the server keeps the order of the two
        conn.data(ids["stdin"], stdin, fin=close_stdin)
        writer.write(conn.data_to_send())
    await writer.drain()
    names = {v: k for k, v in ids.items()}
    sinks = {"stdout": bytearray(), "stderr": bytearray(), "error": bytearray()}
    waiting = {k for k in ("stdout", "stderr", "error") if k in ids}
    data = trailing
    try:
        while waiting:
            if data:
                for event in conn.receive_data(data):
                    if isinstance(event, spdy.DataReceived):
                        name = names.get(event.stream_id, "")
                        if name in sinks:
                            sinks[name] += event.data
                            if event.fin:
                                waiting.discard(name)
                    elif isinstance(event, spdy.StreamReset):
                        waiting.discard(names.get(event.stream_id, ""))
                writer.write(conn.data_to_send())
            data = await asyncio.wait_for(reader.read(65536), TIMEOUT)
            if not data:
                break
    finally:
        writer.close()
    result.stdout, result.stderr, result.error = bytes(sinks["stdout"]), bytes(sinks["stderr"]), bytes(sinks["error"])
    return result


async def spdy_portforward(url: str, port: int, payload: bytes, protocols: list[str] | None = None) -> Result:
    """Send `payload` to `port` over one data/error stream pair; return what came back."""
    result, reader, writer, trailing = await _spdy_upgrade(url, ["portforward.k8s.io"] if protocols is None else protocols)
    if reader is None:
        return result
    conn = spdy.SpdyConnection(server=False)
    error_id = conn.next_stream_id
    conn.syn_stream(error_id, {"streamtype": "error", "port": str(port), "requestid": "0"}, fin=True)
    data_id = conn.next_stream_id
    conn.syn_stream(data_id, {"streamtype": "data", "port": str(port), "requestid": "0"})
    conn.data(data_id, payload)
    writer.write(conn.data_to_send())
    out, err = bytearray(), bytearray()
    data = trailing
    done = False
    try:
        while not done:
            if data:
                for event in conn.receive_data(data):
                    if isinstance(event, spdy.DataReceived):
                        if event.stream_id == data_id:
                            out += event.data
                            done = done or event.fin
                        elif event.stream_id == error_id:
                            err += event.data
                writer.write(conn.data_to_send())
            if done:
                break
            data = await asyncio.wait_for(reader.read(65536), TIMEOUT)
            if not data:
                break
    finally:
        writer.close()
    result.stdout, result.error = bytes(out), bytes(err)
    return result


async def _ws_upgrade(url: str, subprotocols: list[str]):
    reader, writer, target, host = await _open(url)
    ws = WSConnection(ConnectionType.CLIENT)
    writer.write(ws.send(Request(host=host, target=target, subprotocols=subprotocols)))
    result = Result()
    while True:
        data = await asyncio.wait_for(reader.read(65536), TIMEOUT)
        ws.receive_data(data or None)
        for event in ws.events():
            if isinstance(event, AcceptConnection):
                result.status = 101
                result.protocol = event.subprotocol or ""
                return result, reader, writer, ws
            if isinstance(event, RejectConnection):
                result.status = event.status_code
                writer.close()
                return result, None, None, None
        if not data:
            raise ConnectionError("server closed before answering")


async def _ws_messages(reader, writer, ws, on_message) -> None:
    """Feed messages (channel, payload) to on_message until the socket closes."""
    buffer = bytearray()
    try:
        while True:
            data = await asyncio.wait_for(reader.read(65536), TIMEOUT)
            ws.receive_data(data or None)
            for event in ws.events():
                if isinstance(event, BytesMessage):
                    buffer += event.data
                    if event.message_finished:
                        if buffer:
                            on_message(buffer[0], bytes(buffer[1:]))
                        buffer.clear()
                elif isinstance(event, CloseConnection):
                    with _suppress():
                        writer.write(ws.send(event.response()))
                    return
            if not data:
                return
    finally:
        writer.close()


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


async def ws_exec(url: str, *, stdin: bytes | None = None, protocols: list[str] | None = None) -> Result:
    result, reader, writer, ws = await _ws_upgrade(url, protocols or ["v5.channel.k8s.io", "v4.channel.k8s.io"])
    if reader is None:
        return result
    if stdin is not None:
        writer.write(ws.send(BytesMessage(b"\x00" + stdin)))
        writer.write(ws.send(BytesMessage(b"\xff\x00")))  # v5 half-close of stdin
    sinks = {1: bytearray(), 2: bytearray(), 3: bytearray()}

    def on_message(channel: int, payload: bytes) -> None:
        if channel in sinks:
            sinks[channel] += payload

    await _ws_messages(reader, writer, ws, on_message)
    result.stdout, result.stderr, result.error = bytes(sinks[1]), bytes(sinks[2]), bytes(sinks[3])
    return result


async def ws_portforward(url: str, payload: bytes) -> Result:
    """Port-forward over WebSocket for the single port in the URL's ?port=."""
    result, reader, writer, ws = await _ws_upgrade(url, ["v4.channel.k8s.io"])
    if reader is None:
        return result
    seen: dict[int, int] = {}
    out, err = bytearray(), bytearray()

    def on_message(channel: int, data: bytes) -> None:
        seen[channel] = seen.get(channel, 0) + 1
        if seen[channel] == 1:
            result.headers[f"prefix{channel}"] = data.hex()  # the port, uint16 LE
        elif channel == 0:
            out.extend(data)
        elif channel == 1:
            err.extend(data)

    writer.write(ws.send(BytesMessage(b"\x00" + payload)))
    await _ws_messages(reader, writer, ws, on_message)
    result.stdout, result.error = bytes(out), bytes(err)
    return result


async def ws_portforward_ports(url: str, payloads: dict[int, bytes]) -> dict[int, bytes]:
    """Port-forward several ports (in ?port= order) at once; data per port."""
    result, reader, writer, ws = await _ws_upgrade(url, ["v4.channel.k8s.io"])
    assert reader is not None, result.status
    ports = list(payloads)
    seen: dict[int, int] = {}
    out = {port: bytearray() for port in ports}

    def on_message(channel: int, data: bytes) -> None:
        seen[channel] = seen.get(channel, 0) + 1
        if channel % 2 == 0 and seen[channel] > 1:
            out[ports[channel // 2]].extend(data)

    for i, port in enumerate(ports):
        writer.write(ws.send(BytesMessage(bytes((2 * i,)) + payloads[port])))
    await _ws_messages(reader, writer, ws, on_message)
    return {port: bytes(data) for port, data in out.items()}


class Session:
    """An interactive exec or attach: output is read as it comes, stdin and resizes are
    sent when the test says. Subclasses speak SPDY or WebSocket."""

    def __init__(self, result: Result, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.result = result
        self.reader = reader
        self.writer = writer
        self.out = {"stdout": bytearray(), "stderr": bytearray(), "error": bytearray()}
        self.done = False  # the server has finished the session (status sent, or hung up)

    def _feed(self, data: bytes) -> None:
        raise NotImplementedError

    async def read_until(self, predicate, timeout: float = TIMEOUT) -> bool:
        """Read until predicate(self) holds (True) or the session ended first (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self):
            if self.done:
                return False
            data = await asyncio.wait_for(self.reader.read(65536), max(0.01, deadline - loop.time()))
            if not data:
                self.done = True
            else:
                self._feed(data)
        return True

    async def finish(self, timeout: float = TIMEOUT) -> Result:
        """Read until the server ends the session; the whole result."""
        await self.read_until(lambda s: s.done, timeout)
        self.close()
        return self.outcome()

    def outcome(self) -> Result:
        self.result.stdout = bytes(self.out["stdout"])
        self.result.stderr = bytes(self.out["stderr"])
        self.result.error = bytes(self.out["error"])
        return self.result

    def close(self) -> None:
        self.writer.close()


class SpdySession(Session):
    @classmethod
    async def open(cls, url: str, *, stdin: bool = False, stdout: bool = True, stderr: bool = False,
                   tty: bool = False, protocol: str = "v4.channel.k8s.io") -> "SpdySession":
        result, reader, writer, trailing = await _spdy_upgrade(url, [protocol])
        assert reader is not None, f"upgrade refused: {result.status}"
        session = cls(result, reader, writer)
        session.conn = spdy.SpdyConnection(server=False)
        session.ids = {}
        for kind, wanted, fin in (("error", True, True), ("stdin", stdin, False), ("stdout", stdout, True),
                                  ("stderr", stderr, True), ("resize", tty, False)):
            if wanted:
                session.ids[kind] = session.conn.next_stream_id
                session.conn.syn_stream(session.ids[kind], {"streamtype": kind}, fin=fin)
        session.names = {v: k for k, v in session.ids.items()}
        session.flush()
        if trailing:
            session._feed(trailing)
        return session

    def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())

    def send(self, data: bytes, fin: bool = False) -> None:
        self.conn.data(self.ids["stdin"], data, fin=fin)
        self.flush()

    def resize(self, width: int, height: int) -> None:
        self.conn.data(self.ids["resize"], json.dumps({"Width": width, "Height": height}).encode())
        self.flush()

    def _feed(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            if isinstance(event, spdy.DataReceived):
                name = self.names.get(event.stream_id, "")
                if name in self.out:
                    self.out[name] += event.data
                    if name == "error" and event.fin:
                        self.done = True
            elif isinstance(event, spdy.GoAwayReceived):
                self.done = True
        self.flush()


class WsSession(Session):
    CHANNELS = {1: "stdout", 2: "stderr", 3: "error"}

    @classmethod
    async def open(cls, url: str, protocols: list[str] | None = None) -> "WsSession":
        result, reader, writer, ws = await _ws_upgrade(url, protocols or ["v5.channel.k8s.io"])
        assert reader is not None, f"upgrade refused: {result.status}"
        session = cls(result, reader, writer)
        session.ws = ws
        session.partial = bytearray()
        return session

    def send(self, data: bytes, fin: bool = False) -> None:
        if data:
            self.writer.write(self.ws.send(BytesMessage(b"\x00" + data)))
        if fin:
            self.writer.write(self.ws.send(BytesMessage(b"\xff\x00")))  # v5 close of stdin

    def resize(self, width: int, height: int) -> None:
        payload = json.dumps({"Width": width, "Height": height}).encode()
        self.writer.write(self.ws.send(BytesMessage(b"\x04" + payload)))

    def _feed(self, data: bytes) -> None:
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, BytesMessage):
                self.partial += event.data
                if event.message_finished:
                    if self.partial and self.partial[0] in self.CHANNELS:
                        self.out[self.CHANNELS[self.partial[0]]] += self.partial[1:]
                    self.partial.clear()
            elif isinstance(event, CloseConnection):
                with _suppress():
                    self.writer.write(self.ws.send(event.response()))
                self.done = True
