"""The streaming server: exec, attach and port-forward over SPDY/3.1 or WebSocket.

One asyncio TCP listener (TLS when a certificate is configured) parses the HTTP/1.1
request with h11, consumes the single-use token in the path (`/exec/TOKEN`,
`/attach/TOKEN`, `/portforward/TOKEN`; unknown, used or expired → 404) and upgrades the connection to
SPDY/3.1 (`spdy.SpdyConnection`) or WebSocket (`channels.ChannelCodec`). Every task a
connection starts lives in that connection's scope: when the client goes away the
exec'd process is killed and port-forward sockets are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import h11

from cri_py.config import StreamingConfig
from cri_py.errors import CriError
from cri_py.streaming import channels, spdy
from cri_py.streaming.attach import AttachProcess
from cri_py.streaming.exec import INPUT_HIGH_WATER, ExecProcess
from cri_py.streaming.portforward import connect as pf_connect
from cri_py.streaming.tokens import StreamRequest, TokenCache

log = logging.getLogger(__name__)

READ_SIZE = 1 << 16
REQUEST_TIMEOUT = 30.0
STREAM_WAIT_SECONDS = 30.0
PEER_CHECK_SECONDS = 1.0  # how often a client whose input is held back is checked for a hang-up
TCP_ESTABLISHED = 1  # tcpi_state in struct tcp_info
UPLOAD_HIGH_WATER = 1 << 20  # port-forward bytes a pod has not taken yet before the client waits
EXEC_PROTOCOLS = ("v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io")
PORTFORWARD_PROTOCOLS = ("portforward.k8s.io",)


def _http_response(status: int, body: str = "", headers: list[tuple[str, str]] | None = None) -> bytes:
    conn = h11.Connection(h11.SERVER)
    # h11 needs to have seen a request before it answers one
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.next_event()
    payload = (body + "\n").encode() if body else b""
    hdrs = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(payload))), ("Connection", "close")]
    hdrs += headers or []
    return conn.send(h11.Response(status_code=status, headers=hdrs)) + conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage())


class StreamingServer:
    def __init__(self, config: StreamingConfig, containers: Any, sandboxes: Any) -> None:
        self.config = config
        self.containers = containers
        self.sandboxes = sandboxes
        self.tokens = TokenCache(config.token_ttl_seconds)
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task] = set()
        self.port = config.port

    @property
    def tls(self) -> bool:
        return bool(self.config.tls_cert_file and self.config.tls_key_file)

    def url(self, kind: str, token: str) -> str:
        host = self.config.address or "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/{kind}/{token}"

    def register(self, request: StreamRequest) -> str:
        return self.url(request.kind, self.tokens.insert(request))

    async def start(self) -> None:
        context = None
        if self.tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.config.tls_cert_file, self.config.tls_key_file)
        self._server = await asyncio.start_server(
            self._on_connection, self.config.address or None, self.config.port, ssl=context, limit=READ_SIZE * 2
        )
        sockets = self._server.sockets or []
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info("streaming server listening on %s:%s", self.config.address, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await Connection(self, reader, writer).serve()
        except asyncio.CancelledError:
            pass
        except Exception:  # noqa: BLE001 - one connection's bug must not kill the server
            log.exception("streaming connection failed")
        finally:
            self._connections.discard(task)
            writer.close()
            # the task ends here either way: a cancellation (server stop) is not re-raised,
            # so asyncio's stream callback does not log a cancelled handler as an error
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(writer.wait_closed(), 5)


class Connection:
    """One client connection from request to close."""

    def __init__(self, server: StreamingServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.idle_timeout = float(server.config.idle_timeout_seconds or 0)
        self.last_activity = time.monotonic()
        self.tasks: set[asyncio.Task] = set()

    # -- I/O helpers --

    def write(self, data: bytes) -> None:
        if data and not self.writer.is_closing():
            self.last_activity = time.monotonic()
            self.writer.write(data)

    async def flush(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.writer.drain()

    async def read(self) -> bytes:
        """The next chunk; b"" at EOF or after the idle timeout."""
        while True:
            timeout = None
            if self.idle_timeout > 0:
                timeout = max(0.0, self.last_activity + self.idle_timeout - time.monotonic())
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancellation
                # that arrives as data does, and this loop would then read on forever
                async with asyncio.timeout(timeout):
                    data = await self.reader.read(READ_SIZE)
            except TimeoutError:
                if time.monotonic() - self.last_activity >= self.idle_timeout:
                    log.info("closing an idle streaming connection")
                    return b""
                continue
            except (ConnectionError, OSError):
                return b""
            self.last_activity = time.monotonic()
            return data

    def peer_gone(self) -> bool:
        """The client has reset or closed the connection although we have not read all
        it sent (TCP state past ESTABLISHED). A FIN travels behind the data, so a
        client that left with input still unsent shows here once its kernel resets
        the connection; one that left with output unread resets it at once."""
        sock = self.writer.get_extra_info("socket")
        if sock is None:
            return self.writer.is_closing()
        try:
            state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        except OSError:
            return True
        return state != TCP_ESTABLISHED

    async def wait_while_connected(self, wait: Callable[[], Awaitable[None]]) -> bool:
        """Await `wait()` (room for more input) while watching the client: we are not
        reading it meanwhile, so its hang-up cannot show as EOF. False if it left."""
        task = asyncio.ensure_future(wait())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=PEER_CHECK_SECONDS)
                if done:
                    task.result()
                    return True
                if self.peer_gone():
                    log.info("streaming client went away while its input was held back")
                    return False
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # -- request --

    async def serve(self) -> None:
        try:
            await self._serve()
        finally:
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _serve(self) -> None:
        http = h11.Connection(h11.SERVER)
        request = None
        deadline = time.monotonic() + REQUEST_TIMEOUT
        while request is None:
            try:
                event = http.next_event()
            except h11.RemoteProtocolError as exc:
                self.write(_http_response(400, str(exc)))
                return
            if event is h11.NEED_DATA:
                try:
                    async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                        data = await self.reader.read(READ_SIZE)
                except (TimeoutError, ConnectionError, OSError):
                    return
                http.receive_data(data)
                if not data:
                    return
            elif isinstance(event, h11.Request):
                request = event
            else:
                return
        trailing = http.trailing_data[0]
        await self._dispatch(request, bytes(trailing))
        await self.flush()

    async def _dispatch(self, request: h11.Request, trailing: bytes) -> None:
        target = request.target.decode("ascii", "replace")
        path = target.split("?", 1)[0]
        parts = path.strip("/").split("/")
        if request.method not in (b"GET", b"POST") or len(parts) != 2 or parts[0] not in ("exec", "attach", "portforward"):
            self.write(_http_response(404, "not found"))
            return
        kind, token = parts
        stream_request = self.server.tokens.consume(token)
        if stream_request is None or stream_request.kind != kind:
            self.write(_http_response(404, "unknown or expired token"))
            return
        headers = {name.lower(): value for name, value in request.headers}
        upgrade = headers.get(b"upgrade", b"").decode("latin-1").lower()
        if "websocket" in upgrade:
            await self._websocket(stream_request, request, target, trailing)
        elif "spdy/3.1" in upgrade:
            await self._spdy(stream_request, request, trailing)
        else:
            self.write(_http_response(400, "an Upgrade to SPDY/3.1 or websocket is required"))

    # -- SPDY --

    async def _spdy(self, req: StreamRequest, request: h11.Request, trailing: bytes) -> None:
        offered: list[str] = []
        for name, value in request.headers:
            if name.lower() == b"x-stream-protocol-version":
                offered += [v.strip() for v in value.decode("latin-1").split(",") if v.strip()]
        supported = PORTFORWARD_PROTOCOLS if req.kind == "portforward" else EXEC_PROTOCOLS
        if not offered:
            self.write(_http_response(400, "missing X-Stream-Protocol-Version"))
            return
        chosen = next((p for p in supported if p in offered), None)
        if chosen is None:
            self.write(
                _http_response(
                    403,
                    f"no common stream protocol among {offered}",
                    [("X-Accepted-Stream-Protocol-Versions", ", ".join(supported))],
                )
            )
            return
        self.write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
            + f"X-Stream-Protocol-Version: {chosen}\r\n\r\n".encode()
        )
        await self.flush()
        conn = spdy.SpdyConnection(server=True)
        if req.kind != "portforward":
            await SpdyExec(self, conn, req, chosen).run(trailing)
        else:
            await SpdyPortForward(self, conn, req).run(trailing)

    # -- WebSocket --

    async def _websocket(self, req: StreamRequest, request: h11.Request, target: str, trailing: bytes) -> None:
        codec = channels.ChannelCodec(req.kind)
        ports = req.ports
        if req.kind == "portforward":
            with contextlib.suppress(ValueError):
                ports = channels.parse_port_query(target)
            if not ports:
                self.write(_http_response(400, 'query parameter "port" is required'))
                return
        try:
            self.write(codec.accept_upgrade(request))
        except channels.HandshakeRejected as exc:
            self.write(exc.response)
            return
        await self.flush()
        if req.kind != "portforward":
            await WsExec(self, codec, req).run(trailing)
        else:
            await WsPortForward(self, codec, req.id, ports).run(trailing)


async def _spdy_read_loop(
    connection: Connection,
    conn: spdy.SpdyConnection,
    handle: Callable[[spdy.Event], bool],
    trailing: bytes,
    what: str,
    settle: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Feed the client's bytes to the SPDY codec and its events to `handle` until the
    client hangs up, `handle` says stop (False), or the client breaks the protocol
    (then a GOAWAY goes out first). `settle` runs before the next read: reading no
    more until it returns is how a slow consumer of the client's input holds back the
    client (TCP backpressure; spdystream peers ignore SPDY windows)."""
    data = trailing
    while True:
        if data:
            try:
                events = conn.receive_data(data)
            except spdy.ProtocolError as exc:
                log.info("SPDY protocol error from %s client: %s", what, exc)
                conn.goaway(spdy.GoAwayStatus.PROTOCOL_ERROR)
                connection.write(conn.data_to_send())
                return
            for event in events:
                if handle(event) is False:
                    connection.write(conn.data_to_send())
                    return
            # replies and pings go out without waiting for the client to read: a client
            # that writes all its input before reading its output must not deadlock us
            connection.write(conn.data_to_send())
            if settle is not None and not await connection.wait_while_connected(settle):
                return
        data = await connection.read()
        if not data:
            return


async def _ws_read_loop(
    connection: Connection,
    codec: channels.ChannelCodec,
    handle: Callable[[Any], Awaitable[None]],
    trailing: bytes,
    settle: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """The WebSocket twin of _spdy_read_loop: the client's messages to `handle` until
    it closes or hangs up; replies (pong, close) go out without waiting; `settle` as
    there."""
    data = trailing
    while True:
        if data:
            for event in codec.receive_data(data):
                if isinstance(event, channels.Closed):
                    connection.write(codec.data_to_send())
                    return
                await handle(event)
            connection.write(codec.data_to_send())
            if settle is not None and not await connection.wait_while_connected(settle):
                return
        data = await connection.read()
        if not data:
            codec.receive_data(None)
            return


async def _race(main: Awaitable[Any], reader: Awaitable[Any]) -> None:
    """Run the session's work and its read loop; whichever ends first ends the other."""
    work = asyncio.ensure_future(main)
    read = asyncio.ensure_future(reader)
    try:
        await asyncio.wait({work, read}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            work.result()
    finally:
        for task in (work, read):
            task.cancel()
        await asyncio.gather(work, read, return_exceptions=True)


class _ExecSession:
    """What SPDY and WebSocket exec and attach share: creating and running the process
    (an exec'd one, or the session with the container's own that attach is)."""

    def __init__(self, connection: Connection, req: StreamRequest) -> None:
        self.connection = connection
        self.req = req
        self.process: ExecProcess | AttachProcess | None = None
        self.ready = asyncio.Event()

    async def send_output(self, stream: int, data: bytes) -> None:
        raise NotImplementedError

    async def _output(self, stream: int, data: bytes) -> None:
        if (stream == 1 and self.req.stdout) or (stream == 2 and self.req.stderr):
            await self.send_output(stream, data)

    async def input_room(self) -> None:
        """Before reading more from the client: until the process has taken enough
        of its input (the read loop's `settle`)."""
        if self.process is None and self.pending_bytes() >= INPUT_HIGH_WATER:
            await self.ready.wait()
        if self.process is not None:
            await self.process.input.room()

    def pending_bytes(self) -> int:
        """Input held until the process exists."""
        return 0

    def adopt_pending(self, process: ExecProcess | AttachProcess) -> None:
        """Hand the process, in order, the input held until it existed."""

    async def execute(self) -> tuple[int | None, str]:
        """(exit code, error message)."""
        containers = self.connection.server.containers
        req = self.req
        try:
            if req.kind == "attach":
                self.process = AttachProcess(
                    containers, req.id, stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, output=self._output
                )
            else:
                self.process = ExecProcess(
                    containers, req.id, req.cmd, tty=req.tty, stdin=req.stdin, output=self._output
                )
            # in the same step as the process appears: input the read loop gets from
            # now on goes straight to it, so what came before must already be there
            self.adopt_pending(self.process)
            self.ready.set()
            return await self.process.run(), ""
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported to the client
            if isinstance(exc, CriError):
                log.info("%s %s in %s failed: %s", req.kind, req.cmd, req.id[:12], exc)
            else:  # not an expected failure: keep the traceback
                log.warning("%s %s in %s failed", req.kind, req.cmd, req.id[:12], exc_info=True)
            # never an empty message: with no exit code that would read as Success
            return None, str(exc) or repr(exc)


class SpdyExec(_ExecSession):
    def __init__(self, connection: Connection, conn: spdy.SpdyConnection, req: StreamRequest, protocol: str) -> None:
        super().__init__(connection, req)
        self.conn = conn
        self.protocol = protocol
        self.streams: dict[str, int] = {}
        self.by_id: dict[int, str] = {}
        self.all_streams = asyncio.Event()
        self.resize_decoder = channels.ResizeDecoder()
        self.pending_stdin: list[bytes | None] = []
        self.size: tuple[int, int] | None = None  # (width, height) before the process exists
        self.expected = {"error"} | {name for name, flag in (("stdin", req.stdin), ("stdout", req.stdout), ("stderr", req.stderr)) if flag}

    def flush_conn(self) -> None:
        self.connection.write(self.conn.data_to_send())

    async def send_output(self, stream: int, data: bytes) -> None:
        stream_id = self.streams.get("stdout" if stream == 1 else "stderr")
        if stream_id is None:
            return
        with contextlib.suppress(spdy.StreamClosedError):
            self.conn.data(stream_id, data)
        self.flush_conn()
        await self.connection.flush()

    async def run(self, trailing: bytes) -> None:
        await _race(self.main(), self.read_loop(trailing))

    async def main(self) -> None:
        try:
            async with asyncio.timeout(STREAM_WAIT_SECONDS):
                await self.all_streams.wait()
        except TimeoutError:
            log.info("exec client did not open its streams in time")
            return
        code, message = await self.execute()
        for name in ("stdout", "stderr"):
            if name in self.streams:
                with contextlib.suppress(spdy.StreamClosedError):
                    self.conn.data(self.streams[name], b"", fin=True)
        if self.protocol == "v4.channel.k8s.io":
            payload = channels.status_json(code, message)
        elif code == 0 or (code is None and not message):
            payload = b""
        else:
            payload = channels.failure_message(code, message).encode()
        with contextlib.suppress(spdy.StreamClosedError):
            self.conn.data(self.streams["error"], payload, fin=True)
        self.flush_conn()
        await self.connection.flush()
        with contextlib.suppress(Exception):
            self.conn.goaway()
            self.flush_conn()
        await self.connection.flush()

    def adopt_pending(self, process: ExecProcess | AttachProcess) -> None:
        if self.size is not None:
            process.resize(*self.size)
        for item in self.pending_stdin:
            if item is None:
                process.close_stdin()
            else:
                process.write_stdin(item)
        self.pending_stdin.clear()

    def _stdin(self, data: bytes | None) -> None:
        if self.process is not None:
            if data is None:
                self.process.close_stdin()
            else:
                self.process.write_stdin(data)
        else:
            self.pending_stdin.append(data)

    async def read_loop(self, trailing: bytes) -> None:
        await _spdy_read_loop(self.connection, self.conn, self.handle, trailing, self.req.kind, self.input_room)

    def pending_bytes(self) -> int:
        return sum(len(item) for item in self.pending_stdin if item)

    def handle(self, event: spdy.Event) -> bool:
        if isinstance(event, spdy.StreamOpened):
            kind = event.headers.get("streamtype", "")
            if not event.unidirectional:
                with contextlib.suppress(spdy.StreamClosedError, ValueError):
                    self.conn.reply(event.stream_id, {})
            self.streams[kind] = event.stream_id
            self.by_id[event.stream_id] = kind
            if self.expected <= set(self.streams):
                self.all_streams.set()
            if event.fin and kind == "stdin":
                self._stdin(None)
        elif isinstance(event, spdy.DataReceived):
            kind = self.by_id.get(event.stream_id)
            if kind == "stdin":
                if event.data:
                    self._stdin(event.data)
                if event.fin:
                    self._stdin(None)
            elif kind == "resize":
                for resize in self.resize_decoder.feed(event.data):
                    self.size = (resize.width, resize.height)
                    if self.process is not None:
                        self.process.resize(resize.width, resize.height)
        elif isinstance(event, spdy.StreamReset):
            if self.by_id.get(event.stream_id) == "stdin":
                self._stdin(None)
        elif isinstance(event, spdy.PingReceived):
            pass  # the codec answers pings itself
        elif isinstance(event, spdy.GoAwayReceived):
            return False
        return True


class WsExec(_ExecSession):
    def __init__(self, connection: Connection, codec: channels.ChannelCodec, req: StreamRequest) -> None:
        super().__init__(connection, req)
        self.codec = codec
        self.pending: list[Any] = []

    async def send_output(self, stream: int, data: bytes) -> None:
        self.connection.write(self.codec.send(stream, data))
        await self.connection.flush()

    async def run(self, trailing: bytes) -> None:
        writable = [ch for ch, flag in ((channels.STDOUT, self.req.stdout), (channels.STDERR, self.req.stderr)) if flag]
        self.connection.write(self.codec.ready_frames(writable or [channels.ERROR]))
        await self.connection.flush()
        await _race(self.main(), self.read_loop(trailing))

    async def main(self) -> None:
        code, message = await self.execute()
        self.connection.write(self.codec.send_status(code, message))
        self.connection.write(self.codec.close())
        await self.connection.flush()

    def adopt_pending(self, process: ExecProcess | AttachProcess) -> None:
        events, self.pending = self.pending, []
        for event in events:
            self.apply(event)

    def apply(self, event: Any) -> None:
        process = self.process
        if process is None:
            self.pending.append(event)
        elif isinstance(event, channels.ChannelData) and event.channel == channels.STDIN:
            process.write_stdin(event.payload)
        elif isinstance(event, channels.ChannelClosed) and event.channel == channels.STDIN:
            process.close_stdin()
        elif isinstance(event, channels.Resize):
            process.resize(event.width, event.height)

    def pending_bytes(self) -> int:
        return sum(len(e.payload) for e in self.pending if isinstance(e, channels.ChannelData))

    async def handle(self, event: Any) -> None:
        self.apply(event)

    async def read_loop(self, trailing: bytes) -> None:
        await _ws_read_loop(self.connection, self.codec, self.handle, trailing, self.input_room)


# --- port-forward ---------------------------------------------------------------------


def _netns_path(connection: Connection, sandbox_id: str) -> str:
    return connection.server.sandboxes.get(sandbox_id).netns_path


async def _pump_to_client(reader: asyncio.StreamReader, send: Callable[[bytes], Awaitable[None]]) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(1 << 16):
            await send(data)


class SpdyPortForward:
    def __init__(self, connection: Connection, conn: spdy.SpdyConnection, req: StreamRequest) -> None:
        self.connection = connection
        self.conn = conn
        self.req = req
        self.pairs: dict[str, dict[str, int]] = {}  # requestID -> {"data": id, "error": id, "port"}
        self.writers: dict[int, asyncio.StreamWriter | None] = {}  # data stream -> tcp writer
        self.early: dict[int, list[bytes | None]] = {}

    def flush_conn(self) -> None:
        self.connection.write(self.conn.data_to_send())

    async def run(self, trailing: bytes) -> None:
        await _spdy_read_loop(self.connection, self.conn, self.handle, trailing, "port-forward", self.settle)

    async def settle(self) -> None:
        """Wait while a pod connection holds more upload than UPLOAD_HIGH_WATER."""
        for writer in list(self.writers.values()):
            if writer is not None and writer.transport.get_write_buffer_size() > UPLOAD_HIGH_WATER:
                with contextlib.suppress(ConnectionError, OSError):
                    await writer.drain()

    def handle(self, event: spdy.Event) -> bool:
        if isinstance(event, spdy.StreamOpened):
            headers = event.headers
            kind = headers.get("streamtype", "")
            request_id = headers.get("requestid", "")
            if not event.unidirectional:
                with contextlib.suppress(spdy.StreamClosedError, ValueError):
                    self.conn.reply(event.stream_id, {})
            pair = self.pairs.setdefault(request_id, {})
            pair[kind] = event.stream_id
            try:
                pair["port"] = int(headers.get("port", ""))
            except ValueError:
                pair["port"] = 0
            if kind == "data":
                self.early[event.stream_id] = [None] if event.fin else []
            if "data" in pair and "error" in pair:
                del self.pairs[request_id]
                self.connection.spawn(self.forward(pair["data"], pair["error"], pair["port"]))
        elif isinstance(event, spdy.DataReceived):
            if event.stream_id in self.writers:
                writer = self.writers[event.stream_id]
                if writer is not None:
                    if event.data:
                        writer.write(event.data)
                    if event.fin and writer.can_write_eof():
                        with contextlib.suppress(OSError):
                            writer.write_eof()
            elif event.stream_id in self.early:
                if event.data:
                    self.early[event.stream_id].append(event.data)
                if event.fin:
                    self.early[event.stream_id].append(None)
        elif isinstance(event, spdy.StreamReset):
            writer = self.writers.get(event.stream_id)
            if writer is not None:
                writer.close()
        elif isinstance(event, spdy.GoAwayReceived):
            return False
        return True

    async def forward(self, data_id: int, error_id: int, port: int) -> None:
        try:
            if port <= 0 or port > 65535:
                raise ValueError(f"invalid port {port}")
            reader, writer = await pf_connect(_netns_path(self.connection, self.req.id), port)
        except Exception as exc:  # noqa: BLE001 - reported on the error stream
            message = f"error forwarding port {port} to pod {self.req.id}: {exc}"
            with contextlib.suppress(spdy.StreamClosedError):
                self.conn.data(error_id, message.encode(), fin=True)
            with contextlib.suppress(spdy.StreamClosedError):
                self.conn.data(data_id, b"", fin=True)
            self.early.pop(data_id, None)
            self.flush_conn()
            await self.connection.flush()
            return
        self.writers[data_id] = writer
        for item in self.early.pop(data_id, []):
            if item is None:
                if writer.can_write_eof():
                    writer.write_eof()
            else:
                writer.write(item)

        async def send(data: bytes) -> None:
            self.conn.data(data_id, data)
            self.flush_conn()
            await self.connection.flush()

        try:
            with contextlib.suppress(spdy.StreamClosedError):
                await _pump_to_client(reader, send)
                self.conn.data(data_id, b"", fin=True)
                self.conn.data(error_id, b"", fin=True)
            self.flush_conn()
            await self.connection.flush()
        finally:
            self.writers[data_id] = None
            writer.close()


class WsPortForward:
    """One TCP connection per requested port, on channels 2i (data) and 2i+1 (error)."""

    def __init__(self, connection: Connection, codec: channels.ChannelCodec, sandbox_id: str, ports: list[int]) -> None:
        self.connection = connection
        self.codec = codec
        self.sandbox_id = sandbox_id
        self.ports = ports
        self.writers: dict[int, asyncio.StreamWriter] = {}
        self.ready: dict[int, asyncio.Event] = {}
        self.done = 0

    async def run(self, trailing: bytes) -> None:
        self.connection.write(self.codec.portforward_ready_frames(self.ports))
        await self.connection.flush()
        for data_ch, error_ch, port in channels.portforward_channels(self.ports):
            self.ready[data_ch] = asyncio.Event()
            self.connection.spawn(self.forward(self.sandbox_id, data_ch, error_ch, port, self.ready[data_ch]))
        await self.read_loop(trailing)

    async def forward(self, sandbox_id: str, data_ch: int, error_ch: int, port: int, ready: asyncio.Event) -> None:
        try:
            reader, writer = await pf_connect(_netns_path(self.connection, sandbox_id), port)
        except Exception as exc:  # noqa: BLE001
            self.connection.write(self.codec.send(error_ch, f"error forwarding port {port}: {exc}".encode()))
            ready.set()
            await self.connection.flush()
            self.done += 1
            return
        self.writers[data_ch] = writer
        ready.set()

        async def send(data: bytes) -> None:
            self.connection.write(self.codec.send(data_ch, data))
            await self.connection.flush()

        try:
            await _pump_to_client(reader, send)
        finally:
            writer.close()
            self.done += 1
            if self.done == len(self.ports):  # every port's connection has ended
                self.connection.write(self.codec.close())
                await self.connection.flush()

    async def read_loop(self, trailing: bytes) -> None:
        await _ws_read_loop(self.connection, self.codec, self.handle, trailing)

    async def handle(self, event: Any) -> None:
        if isinstance(event, channels.ChannelData):
            await self.deliver(event.channel, event.payload)
        elif isinstance(event, channels.ChannelClosed):
            writer = self.writers.get(event.channel)
            if writer is not None and writer.can_write_eof():
                with contextlib.suppress(OSError):
                    writer.write_eof()

    async def deliver(self, channel: int, payload: bytes) -> None:
        writer = self.writers.get(channel)
        if writer is None:
            ready = self.ready.get(channel)
            if ready is None:
                return
            await ready.wait()
            writer = self.writers.get(channel)
            if writer is None:
                return
        with contextlib.suppress(ConnectionError, OSError):
            writer.write(payload)
            await writer.drain()
