"""The Kubernetes WebSocket channel protocols, as a sans-I/O state machine over wsproto.

exec, attach and port-forward multiplex several byte streams ("channels") over one
WebSocket. Every message starts with its channel: one byte (0..254) under the binary
subprotocols, one ASCII character ``chr(ord("0") + channel)`` followed by standard
base64 of the payload under the ``base64.`` ones (for browsers that could not send
binary frames)::

    binary:  [1] b"hello"        base64:  "1aGVsbG8="

exec/attach channels: 0 stdin, 1 stdout, 2 stderr, 3 error (a final status), 4 resize
(a stream of ``{"Width": w, "Height": h}`` JSON objects). Port-forward over WebSocket
gives port ``i`` of the ``?port=`` list the pair 2i (data, both ways) and 2i+1 (error,
server to client); the server's first message on both is the port, uint16 LE.

Subprotocols, as the kubelet's streaming library (which containerd and CRI-O embed)
accepts them::

    v5.channel.k8s.io          binary; metav1.Status JSON on 3; client half-close [255, ch]
    v4.channel.k8s.io          binary; metav1.Status JSON on 3
    v4.base64.channel.k8s.io   base64; metav1.Status JSON on 3
    channel.k8s.io             binary; plain error text on 3, nothing on success
    base64.channel.k8s.io      base64; plain error text on 3, nothing on success
    (none offered)             as channel.k8s.io

Port-forward accepts only v4.channel.k8s.io, v4.base64.channel.k8s.io and "no
subprotocol" (the kubelet's set); ``portforward.k8s.io`` is the SPDY protocol name and
``v2.portforward.k8s.io`` is the API server's SPDY-in-WebSocket tunnel, neither of
which a CRI streaming server sees as WebSocket channel framing.

`ChannelCodec` owns a server-side `wsproto.WSConnection`: the streaming server parses
HTTP/1.1 with h11 and hands the upgrade request over (`accept_upgrade`), then feeds
socket bytes to `receive_data()` and writes whatever `send()`, `close()` & co return
and whatever `data_to_send()` holds (pongs and close replies it produces by itself).
No I/O, no clocks, no tasks: every byte in and out is visible to a test.

Incoming messages are streamed, not buffered whole: the channel byte is read from a
message's first fragment and each later piece is delivered as it arrives, so a
client's 1 MiB stdin message costs no 1 MiB buffer (kubectl cp streams a tar this
way). Stdin and port data are byte streams, so chunk boundaries carry no meaning;
resize JSON is decoded as a stream too, exactly as the kubelet does.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Literal
from urllib.parse import parse_qs, urlsplit

import h11
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

Kind = Literal["exec", "attach", "portforward"]

STDIN = 0
STDOUT = 1
STDERR = 2
ERROR = 3
RESIZE = 4
STREAM_CLOSE = 255  # v5: a client message [255, channel] half-closes that channel

V5_CHANNEL = "v5.channel.k8s.io"
V4_CHANNEL = "v4.channel.k8s.io"
V4_BASE64 = "v4.base64.channel.k8s.io"
CHANNEL = "channel.k8s.io"
BASE64 = "base64.channel.k8s.io"
NO_SUBPROTOCOL = ""  # the client offered none: binary framing, pre-v4 status

# newest first; binary before base64 of the same version (a third less on the wire)
_PREFERENCE: dict[str, tuple[str, ...]] = {
    "exec": (V5_CHANNEL, V4_CHANNEL, V4_BASE64, CHANNEL, BASE64),
    "attach": (V5_CHANNEL, V4_CHANNEL, V4_BASE64, CHANNEL, BASE64),
    "portforward": (V4_CHANNEL, V4_BASE64),
}
_BASE64_PROTOCOLS = frozenset({V4_BASE64, BASE64})
_JSON_STATUS_PROTOCOLS = frozenset({V5_CHANNEL, V4_CHANNEL, V4_BASE64})
_CLOSE_SIGNAL_PROTOCOLS = frozenset({V5_CHANNEL})

# incoming data is streamed, so the only input buffered is an unfinished resize object
# (a few dozen bytes in practice); this bounds a client that never finishes one
DEFAULT_MAX_RESIZE_BUFFER = 4096
_DIGIT_ZERO = ord("0")
_MAX_BASE64_CHANNEL = 0x7F - _DIGIT_ZERO  # keep the channel character ASCII

# in-progress message states besides a real channel number
_AWAITING_CHANNEL = -1
_CLOSE_SIGNAL = -2
_DISCARD = -3


# --- events ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChannelData:
    """Bytes the client sent on `channel` (stdin, or a port's data channel)."""

    channel: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Resize:
    """The client's terminal size changed (exec/attach channel 4); both are >= 1."""

    width: int
    height: int


@dataclass(frozen=True, slots=True)
class ChannelClosed:
    """v5 half-close: the client will send nothing more on `channel` (stdin EOF)."""

    channel: int


@dataclass(frozen=True, slots=True)
class Closed:
    """The WebSocket is over: flush `data_to_send()`, then close the transport.

    1006 means the transport ended without a close frame; a code the codec chose
    itself (1002 protocol error, 1007 bad UTF-8) means the client misbehaved.
    """

    code: int
    reason: str


ChannelEvent = ChannelData | Resize | ChannelClosed | Closed


class HandshakeRejected(Exception):
    """The upgrade request is refused; `response` is the complete HTTP answer to send
    before closing the transport (an exception so no caller can stream by mistake)."""

    def __init__(self, status_code: int, message: str, response: bytes) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.response = response


# --- negotiation ----------------------------------------------------------------------


def supported_subprotocols(kind: Kind) -> tuple[str, ...]:
    """The subprotocols `kind` can speak, newest first (for error messages and docs)."""
    return _PREFERENCE[kind]


def choose_subprotocol(offered: Sequence[str], kind: Kind) -> str | None:
    """The newest subprotocol both sides speak; "" when the client offered none (the
    kubelet then uses binary pre-v4 framing); None when nothing offered is supported.

    The server picks the newest rather than the client's first choice (the Go server
    takes client order): every real client lists newest first anyway, and a stale
    order on the client side must not cost the v5 half-close.
    """
    if not offered:
        return NO_SUBPROTOCOL
    wanted = {name.strip() for name in offered}
    for name in _PREFERENCE[kind]:
        if name in wanted:
            return name
    return None


# --- status on the error channel -------------------------------------------------------


def status_json(exit_code: int | None, message: str = "") -> bytes:
    """The metav1.Status the kubelet writes on the error channel when a session ends.

    Protocol-neutral (SPDY's error stream carries the same bytes). Exit code 0, or no
    exit code and no message, is Success; a non-zero exit code is NonZeroExitCode with
    the code as the ExitCode cause, which kubectl turns into its own exit status; no
    exit code but a message is an InternalError (the exec itself failed). Field order
    and compact separators match Go's encoding/json of the struct.
    """
    if exit_code == 0 or (exit_code is None and not message):
        return b'{"metadata":{},"status":"Success"}'
    status: dict[str, object] = {"metadata": {}, "status": "Failure"}
    if exit_code is not None:
        status["message"] = failure_message(exit_code, message)
        status["reason"] = "NonZeroExitCode"
        status["details"] = {"causes": [{"reason": "ExitCode", "message": str(exit_code)}]}
    else:
        status["message"] = failure_message(None, message)
        status["reason"] = "InternalError"
        status["details"] = {"causes": [{"message": message}]}
        status["code"] = 500
    return json.dumps(status, separators=(",", ":"), ensure_ascii=False).encode()


def failure_message(exit_code: int | None, message: str) -> str:
    """Status.Message, also the whole error text under pre-v4 protocols."""
    if exit_code is None:
        return f"Internal error occurred: {message}"
    return f"command terminated with non-zero exit code: {message or f'exit status {exit_code}'}"


# --- port-forward ---------------------------------------------------------------------


def portforward_channels(ports: Sequence[int]) -> list[tuple[int, int, int]]:
    """(data channel, error channel, port) for each requested port, in request order."""
    return [(2 * i, 2 * i + 1, port) for i, port in enumerate(ports)]


def port_prefix(port: int) -> bytes:
    """The first message on both channels of a port: the port as uint16 little-endian,
    so a client that asked for several ports can tell the pairs apart."""
    if not 1 <= port <= 0xFFFF:
        raise ValueError(f"port {port} is out of range 1..65535")
    return port.to_bytes(2, "little")


def parse_port_query(target: bytes | str) -> list[int]:
    """The ports of a WebSocket port-forward URL: repeated and/or comma-separated
    ``port=`` query values (the kubelet's parameter name), each 1..65535."""
    if isinstance(target, bytes):
        target = target.decode("ascii", "replace")
    values = parse_qs(urlsplit(target).query, keep_blank_values=True).get("port", [])
    if not values:
        raise ValueError('query parameter "port" is required')
    ports: list[int] = []
    for value in values:
        for item in value.split(","):
            ports.append(_parse_port(item))
    return ports


def _parse_port(text: str) -> int:
    """One decimal port; ValueError with the offending text otherwise."""
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 0xFFFF:
        raise ValueError(f"unable to parse {text!r} as a port (1..65535)")
    return int(text)


# --- resize ---------------------------------------------------------------------------


class ResizeDecoder:
    """Channel 4 is one JSON *stream* (the kubelet runs json.Decoder over it), not one
    object per message: an object may span messages and a message may hold several.

    Incomplete input waits for more; input that can never become valid JSON is dropped
    (the kubelet would stop honouring resizes for the rest of the session). Objects
    without a positive uint16 Width and Height are skipped as the kubelet skips them.
    """

    __slots__ = ("_text", "_utf8", "_json", "_limit")

    def __init__(self, limit: int = DEFAULT_MAX_RESIZE_BUFFER) -> None:
        self._text = ""
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._json = json.JSONDecoder()
        self._limit = limit

    def feed(self, data: bytes) -> list[Resize]:
        """Resizes completed by `data`."""
        text = self._text + self._utf8.decode(data)
        sizes: list[Resize] = []
        pos = 0
        while True:
            pos = _skip_whitespace(text, pos)
            if pos == len(text):
                break
            try:
                value, pos = self._json.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                if not _may_complete(text, exc):
                    pos = len(text)  # garbage: drop it, start afresh with the next byte
                break
            size = _resize_from(value)
            if size is not None:
                sizes.append(size)
        self._text = text[pos:]
        if len(self._text) > self._limit:
            self._text = ""
        return sizes


def _skip_whitespace(text: str, pos: int) -> int:
    """Index of the first non-JSON-whitespace character at or after `pos`."""
    return len(text) - len(text[pos:].lstrip(" \t\r\n"))


def _may_complete(text: str, exc: json.JSONDecodeError) -> bool:
    """Whether a decode error is only the end of the buffer (more bytes may fix it)."""
    return exc.pos >= len(text) or exc.msg.startswith("Unterminated string")


def _resize_from(value: object) -> Resize | None:
    """A Resize from one decoded object; keys match case-insensitively, as in Go."""
    if not isinstance(value, dict):
        return None
    fields = {str(key).lower(): item for key, item in value.items()}
    width, height = fields.get("width"), fields.get("height")
    if _is_dimension(width) and _is_dimension(height):
        return Resize(width, height)  # type: ignore[arg-type]
    return None


def _is_dimension(value: object) -> bool:
    """A terminal dimension the kubelet would apply: uint16 and not zero."""
    return type(value) is int and 1 <= value <= 0xFFFF


# --- the codec ------------------------------------------------------------------------


class ChannelCodec:
    """One WebSocket exec/attach/port-forward session, bytes in and bytes out.

    Lifecycle: `accept_upgrade(request)` (raises HandshakeRejected), optionally feed
    h11's trailing data, send `ready_frames()` / `portforward_ready_frames()`, then loop
    ``events = receive_data(chunk); write(data_to_send())`` while output flows through
    `send()`. After a `Closed` event nothing more is parsed and `send()` returns b"".
    """

    def __init__(self, kind: Kind, *, max_resize_buffer: int = DEFAULT_MAX_RESIZE_BUFFER) -> None:
        if kind not in _PREFERENCE:
            raise ValueError(f"unknown stream kind {kind!r}")
        self.kind: Kind = kind
        self.subprotocol: str | None = None  # set by accept_upgrade
        self._ws = WSConnection(ConnectionType.SERVER)
        self._outbox: list[bytes] = []
        self._finished = False
        self._resize = ResizeDecoder(max_resize_buffer)
        # the message being received: its channel (or a state), base64 carry, signal bytes
        self._in_channel = _AWAITING_CHANNEL
        self._carry = b""
        self._signal = b""

    # -- properties that depend on the negotiated subprotocol --

    @property
    def base64(self) -> bool:
        """Whether payloads travel as base64 text."""
        return self.subprotocol in _BASE64_PROTOCOLS

    @property
    def json_status(self) -> bool:
        """Whether the error channel carries metav1.Status JSON (v4+) or plain text."""
        return self.subprotocol in _JSON_STATUS_PROTOCOLS

    @property
    def supports_close_signal(self) -> bool:
        """Whether [255, channel] half-close messages exist (v5 only)."""
        return self.subprotocol in _CLOSE_SIGNAL_PROTOCOLS

    @property
    def is_open(self) -> bool:
        """Whether data can still be sent: accepted, and no close sent or received."""
        return self.subprotocol is not None and self._ws.state is ConnectionState.OPEN

    # -- handshake --

    def accept_upgrade(self, request: h11.Request) -> bytes:
        """The 101 response for an upgrade request h11 already parsed.

        Raises HandshakeRejected (with a complete HTTP response) for a malformed upgrade
        or when no offered subprotocol fits. After a 101 the streaming server must pass
        any bytes h11 read past the request (``conn.trailing_data``) to receive_data().
        """
        if self.subprotocol is not None:
            raise LocalProtocolError("upgrade already accepted")
        ws_request = self._parse_upgrade(request)
        chosen = choose_subprotocol(ws_request.subprotocols, self.kind)
        if chosen is None:
            message = (
                f"requested protocol(s) are not supported: {ws_request.subprotocols}; "
                f"supports {list(supported_subprotocols(self.kind))}"
            )
            raise HandshakeRejected(400, message, _http_error(400, message))
        response = self._ws.send(AcceptConnection(subprotocol=chosen or None))
        self.subprotocol = chosen
        return response

    def _parse_upgrade(self, request: h11.Request) -> Request:
        """wsproto's view of the request, or HandshakeRejected with wsproto's status."""
        if request.method != b"GET":
            message = "a WebSocket upgrade must be a GET"
            raise HandshakeRejected(405, message, _http_error(405, message, [(b"Allow", b"GET")]))
        try:
            self._ws.initiate_upgrade_connection(list(request.headers), request.target)
        except RemoteProtocolError as exc:
            hint = exc.event_hint
            status = hint.status_code if isinstance(hint, RejectConnection) else 400
            extra = list(hint.headers) if isinstance(hint, RejectConnection) else []
            raise HandshakeRejected(status, str(exc), _http_error(status, str(exc), extra)) from exc
        except h11.ProtocolError as exc:
            raise HandshakeRejected(400, str(exc), _http_error(400, str(exc))) from exc
        for event in self._ws.events():
            if isinstance(event, Request):
                return event
        message = "not a WebSocket upgrade"
        raise HandshakeRejected(400, message, _http_error(400, message))

    # -- input --

    def receive_data(self, data: bytes | None) -> list[ChannelEvent]:
        """Events from bytes read off the transport; b"" or None means EOF (→ 1006).

        Pings and the client's close are answered here: their replies wait in
        `data_to_send()`.
        """
        if self.subprotocol is None:
            raise LocalProtocolError("receive_data before accept_upgrade")
        if self._finished:
            return []
        self._ws.receive_data(data or None)
        events: list[ChannelEvent] = []
        for event in self._ws.events():
            if isinstance(event, Message):
                self._on_message_piece(event, events)
            elif isinstance(event, Ping):
                if self._ws.state is ConnectionState.OPEN:
                    self._outbox.append(self._ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                self._on_close(event, events)
            elif isinstance(event, Pong):
                pass  # our keepalive got an answer; the transport read already proves liveness
            if self._finished:
                break
        return events

    def data_to_send(self) -> bytes:
        """Replies the codec produced on its own (pongs, close frames); empties them."""
        data = b"".join(self._outbox)
        self._outbox.clear()
        return data

    def _on_close(self, event: CloseConnection, events: list[ChannelEvent]) -> None:
        """The client closed, the transport ended, or wsproto found a framing error."""
        state = self._ws.state
        if state is ConnectionState.REMOTE_CLOSING:
            self._outbox.append(self._ws.send(event.response()))
        elif state is ConnectionState.OPEN:
            # wsproto reports a parse failure as a close it did not send yet
            self._outbox.append(self._ws.send(CloseConnection(event.code, event.reason)))
        self._finish(int(event.code), event.reason or "", events)

    def _fail(self, code: int, reason: str, events: list[ChannelEvent]) -> None:
        """Close with `code` because the client broke the channel protocol."""
        if self._ws.state is ConnectionState.OPEN:
            self._outbox.append(self._ws.send(CloseConnection(code, reason)))
        self._finish(code, reason, events)

    def _finish(self, code: int, reason: str, events: list[ChannelEvent]) -> None:
        """Report the end once; nothing is parsed after it."""
        self._finished = True
        events.append(Closed(int(code), reason))

    def _on_message_piece(self, event: Message, events: list[ChannelEvent]) -> None:
        """One piece of a (possibly fragmented) message: route it as it arrives."""
        data = event.data.encode() if isinstance(event, TextMessage) else bytes(event.data)
        if self._in_channel == _AWAITING_CHANNEL and data:
            data = self._start_message(data)
        if self._in_channel == _CLOSE_SIGNAL:
            self._signal = (self._signal + data)[:2]  # 2 bytes already prove it malformed
        elif self._in_channel >= 0 and data:
            self._deliver(self._in_channel, self._decode_piece(data), events)
        if event.message_finished:
            self._end_message(events)

    def _start_message(self, data: bytes) -> bytes:
        """Read the channel from a message's first byte; returns the rest."""
        first = data[0]
        if first == STREAM_CLOSE and self.supports_close_signal:
            self._in_channel = _CLOSE_SIGNAL
        elif self.base64:
            channel = first - _DIGIT_ZERO
            self._in_channel = channel if 0 <= channel <= _MAX_BASE64_CHANNEL else _DISCARD
        else:
            self._in_channel = first
        return data[1:]

    def _decode_piece(self, data: bytes) -> bytes:
        """Payload bytes of one piece: as is, or base64 decoded in whole 4-char quanta
        (the remainder waits for the next piece). A corrupt message is discarded from
        there on, as the Go server drops a message it cannot decode."""
        if not self.base64:
            return data
        if b"\n" in data or b"\r" in data:
            data = data.translate(None, b"\r\n")  # Go's decoder skips line breaks too
        data = self._carry + data
        usable = len(data) - len(data) % 4
        self._carry = data[usable:]
        try:
            return base64.b64decode(data[:usable], validate=True)
        except binascii.Error:
            self._in_channel = _DISCARD
            self._carry = b""
            return b""

    def _deliver(self, channel: int, payload: bytes, events: list[ChannelEvent]) -> None:
        """Turn a decoded piece into events: resize JSON, or channel data."""
        if channel == RESIZE and self.kind != "portforward":
            events.extend(self._resize.feed(payload))
        elif payload:
            events.append(ChannelData(channel, payload))

    def _end_message(self, events: list[ChannelEvent]) -> None:
        """Message complete: act on a close signal, reset per-message state."""
        if self._in_channel == _CLOSE_SIGNAL:
            if len(self._signal) == 1:
                events.append(ChannelClosed(self._signal[0]))
            else:
                self._fail(CloseReason.PROTOCOL_ERROR, "a stream close signal is [255, channel]", events)
        self._in_channel = _AWAITING_CHANNEL
        self._carry = b""
        self._signal = b""

    # -- output --

    def send(self, channel: int, payload: bytes) -> bytes:
        """One message carrying `payload` on `channel`; b"" once the socket is closing
        (the peer has gone, so output racing the close is dropped, not an error)."""
        if not 0 <= channel < STREAM_CLOSE:
            raise ValueError(f"channel {channel} is out of range 0..254")
        if not self.is_open:
            return b""
        if self.base64:
            if channel > _MAX_BASE64_CHANNEL:
                raise ValueError(f"channel {channel} has no ASCII character under base64")
            text = chr(_DIGIT_ZERO + channel) + base64.b64encode(payload).decode("ascii")
            return self._ws.send(TextMessage(text))
        return self._ws.send(BytesMessage(bytes((channel,)) + payload))

    def ready_frames(self, channels: Iterable[int]) -> bytes:
        """Tell the client the session is live: an empty message on the lowest of the
        writable output channels (stdout if requested, else stderr, else error), as the
        kubelet does for every subprotocol version."""
        writable = list(channels)
        return self.send(min(writable), b"") if writable else b""

    def portforward_ready_frames(self, ports: Sequence[int]) -> bytes:
        """Each port's number on its data and its error channel, the port-forward
        equivalent of ready_frames (the kubelet sends these before any data)."""
        parts = []
        for data_channel, error_channel, port in portforward_channels(ports):
            prefix = port_prefix(port)
            parts.append(self.send(data_channel, prefix))
            parts.append(self.send(error_channel, prefix))
        return b"".join(parts)

    def send_status(self, exit_code: int | None, message: str = "") -> bytes:
        """The session's outcome on the error channel in this subprotocol's dialect:
        Status JSON (v4+), or the bare failure text and nothing on success (older)."""
        if self.json_status:
            return self.send(ERROR, status_json(exit_code, message))
        if exit_code == 0 or (exit_code is None and not message):
            return b""
        return self.send(ERROR, failure_message(exit_code, message).encode())

    def close_channel(self, channel: int) -> bytes:
        """A v5 [255, channel] half-close; b"" under older protocols, which cannot say it.

        The protocol defines it client to server (stdin EOF); client-go logs and
        discards one from the server, so the server's normal end is `close()`.
        """
        if not 0 <= channel < STREAM_CLOSE:
            raise ValueError(f"channel {channel} is out of range 0..254")
        if not self.supports_close_signal or not self.is_open:
            return b""
        return self._ws.send(BytesMessage(bytes((STREAM_CLOSE, channel))))

    def ping(self, payload: bytes = b"") -> bytes:
        """A keepalive ping (idle-timeout probing is the caller's policy)."""
        return self._ws.send(Ping(payload)) if self.is_open else b""

    def close(self, code: int = CloseReason.NORMAL_CLOSURE, reason: str = "") -> bytes:
        """Start the closing handshake; the client's answer arrives as `Closed`.

        b"" if a close was already sent or the connection is gone.
        """
        if self.subprotocol is None or self._ws.state not in (
            ConnectionState.OPEN,
            ConnectionState.REMOTE_CLOSING,
        ):
            return b""
        return self._ws.send(CloseConnection(code, reason or None))


def _http_error(status: int, message: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> bytes:
    """A complete plain-text HTTP/1.1 error response that ends the connection.

    Built by hand: a rejected request may never have reached wsproto's own h11 state,
    so it cannot always produce the answer itself.
    """
    body = message.encode() + b"\n"
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode(),
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Length: " + str(len(body)).encode(),
        b"Connection: close",
    ]
    lines.extend(name + b": " + value for name, value in headers)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
