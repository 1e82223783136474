"""SPDY/3.1 framing as a sans-I/O state machine.

`kubectl exec/attach/port-forward`, crictl and the kubelet's streaming proxy speak SPDY
to the runtime's streaming server after an HTTP `Upgrade: SPDY/3.1`. This module only
turns bytes into events and calls into bytes, in the style of h11/h2: the I/O layer
feeds what it reads to `SpdyConnection.receive_data()`, handles the returned events,
calls methods such as `reply()` or `data()`, and writes `data_to_send()` to the socket.
No sockets, no tasks, no clocks here, so every rule is unit-testable with plain bytes.

Wire format (draft 3 / 3.1), all integers big-endian::

    control: |1|version(15)=3|type(16)|  |flags(8)|length(24)|  payload
    data:    |0|stream-id(31)|           |flags(8)|length(24)|  payload

Header blocks (SYN_STREAM, SYN_REPLY, HEADERS) are zlib streams that use the fixed
SPDY/3 dictionary (`SPDY3_DICTIONARY`) and share one compression context per direction
for the whole connection, so every block is compressed and decompressed in wire order
and ends with a Z_SYNC_FLUSH. Frames this side ignores must still be decompressed.

Flow control (3.1): every stream and the session start with a 64 KiB send window.
`data()` sends what the windows allow and queues the rest; WINDOW_UPDATE and SETTINGS
frames from the peer release it. On the receiving side the session window is
replenished as soon as data arrives (so one slow stream cannot starve the others) and
each stream's window only when the I/O layer calls `acknowledge_received_data()`
after it has written the bytes on (so a slow consumer slows its own sender).

Interoperability, which decides two defaults:
- Every peer this runtime meets (kubectl, crictl, the kubelet and the API server) uses
  moby/spdystream, which announces SPDY/3.1 but implements no flow control: it never
  sends WINDOW_UPDATE and ignores the ones it gets. A sender that honours the 64 KiB
  window therefore stalls for ever after 64 KiB to such a peer, so flow control is
  off by default; `flow_control=True` keeps this side to the 3.1 spec.
- For the same reason a peer overrunning our receive window is tolerated, not an error:
  spdystream writes stdin (`kubectl cp` sends a whole tarball) without looking.
Go's framer rejects header names that are not lowercase and the hop-by-hop headers
(connection, host, keep-alive, proxy-connection, transfer-encoding), so names are
lowercased on the way out and the latter are refused.
"""

from __future__ import annotations

import struct
import zlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum

__all__ = [
    "DataReceived",
    "Event",
    "FrameType",
    "GoAwayReceived",
    "GoAwayStatus",
    "HeadersReceived",
    "PingReceived",
    "ProtocolError",
    "RstStatus",
    "SettingId",
    "SettingsReceived",
    "SPDY3_DICTIONARY",
    "SpdyConnection",
    "StreamClosedError",
    "StreamOpened",
    "StreamReply",
    "StreamReset",
    "WindowUpdated",
    "decode_header_block",
    "encode_header_block",
]

VERSION = 3
DEFAULT_WINDOW = 64 * 1024
MAX_WINDOW = 2**31 - 1
MAX_FRAME_LENGTH = 2**24 - 1  # the 24-bit length field
DEFAULT_MAX_DATA_FRAME = 16 * 1024
# limits against a hostile peer: no real SPDY peer sends header blocks near this size
MAX_CONTROL_FRAME = 1 << 20
MAX_HEADER_BLOCK = 1 << 20  # decompressed

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02
FLAG_SETTINGS_CLEAR = 0x01

_HEAD = struct.Struct(">II")  # the two words every frame starts with
_U32 = struct.Struct(">I")
_U32X2 = struct.Struct(">II")
_STREAM_MASK = 0x7FFFFFFF
_LENGTH_MASK = 0xFFFFFF
# refused by Go's framer (and meaningless inside SPDY): sending one kills the peer's reader
_FORBIDDEN_HEADERS = frozenset(
    {"connection", "host", "keep-alive", "proxy-connection", "transfer-encoding"}
)


class FrameType(IntEnum):
    """Control frame types of SPDY/3 (NOOP and CREDENTIAL are read and skipped)."""

    SYN_STREAM = 1
    SYN_REPLY = 2
    RST_STREAM = 3
    SETTINGS = 4
    PING = 6
    GOAWAY = 7
    HEADERS = 8
    WINDOW_UPDATE = 9


class RstStatus(IntEnum):
    """RST_STREAM status codes."""

    PROTOCOL_ERROR = 1
    INVALID_STREAM = 2
    REFUSED_STREAM = 3
    UNSUPPORTED_VERSION = 4
    CANCEL = 5
    INTERNAL_ERROR = 6
    FLOW_CONTROL_ERROR = 7
    STREAM_IN_USE = 8
    STREAM_ALREADY_CLOSED = 9
    INVALID_CREDENTIALS = 10
    FRAME_TOO_LARGE = 11


class GoAwayStatus(IntEnum):
    """GOAWAY status codes."""

    OK = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2


class SettingId(IntEnum):
    """SETTINGS ids; only INITIAL_WINDOW_SIZE changes what this codec does."""

    UPLOAD_BANDWIDTH = 1
    DOWNLOAD_BANDWIDTH = 2
    ROUND_TRIP_TIME = 3
    MAX_CONCURRENT_STREAMS = 4
    CURRENT_CWND = 5
    DOWNLOAD_RETRANS_RATE = 6
    INITIAL_WINDOW_SIZE = 7
    CLIENT_CERTIFICATE_VECTOR_SIZE = 8


# --- the SPDY/3 header compression dictionary (draft 3, section 2.6.10.1) -------------
#
# zlib identifies a preset dictionary by its Adler-32, so a single wrong byte makes every
# header block from a Go peer undecodable ("invalid dictionary"). The first part is a
# list of words, each behind a 32-bit length as in a header block; the rest is raw text.
# 1423 bytes, Adler-32 0xE3C6A7C2 (the tests check both, and check the bytes against
# spdystream's table when a checkout of it is on disk).

_DICTIONARY_WORDS = (
    "options", "head", "post", "put", "delete", "trace", "accept", "accept-charset",
    "accept-encoding", "accept-language", "accept-ranges", "age", "allow",
    "authorization", "cache-control", "connection", "content-base", "content-encoding",
    "content-language", "content-length", "content-location", "content-md5",
    "content-range", "content-type", "date", "etag", "expect", "expires", "from", "host",
    "if-match", "if-modified-since", "if-none-match", "if-range", "if-unmodified-since",
    "last-modified", "location", "max-forwards", "pragma", "proxy-authenticate",
    "proxy-authorization", "range", "referer", "retry-after", "server", "te", "trailer",
    "transfer-encoding", "upgrade", "user-agent", "vary", "via", "warning",
    "www-authenticate", "method", "get", "status", "200 OK", "version", "HTTP/1.1", "url",
    "public", "set-cookie", "keep-alive", "origin",
)  # fmt: skip

_DICTIONARY_TEXT = (
    b"100101201202205206300302303304305306307"
    b"402405406407408409410411412413414415416417"
    b"502504505"
    b"203 Non-Authoritative Information"
    b"204 No Content"
    b"301 Moved Permanently"
    b"400 Bad Request"
    b"401 Unauthorized"
    b"403 Forbidden"
    b"404 Not Found"
    b"500 Internal Server Error"
    b"501 Not Implemented"
    b"503 Service Unavailable"
    b"Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec"
    b" 00:00:00"
    b" Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
    b"chunked,text/html,image/png,image/jpg,image/gif,"
    b"application/xml,application/xhtml+xml,text/plain,text/javascript,"
    b"publicprivatemax-age=gzip,deflate,sdch"
    b"charset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)

SPDY3_DICTIONARY: bytes = (
    b"".join(_U32.pack(len(word)) + word.encode("ascii") for word in _DICTIONARY_WORDS)
    + _DICTIONARY_TEXT
)


# --- errors and events -----------------------------------------------------------------


class ProtocolError(Exception):
    """The peer broke SPDY; the connection cannot continue.

    The I/O layer should send `goaway(status=err.goaway_status)`, flush and close.
    """

    def __init__(self, message: str, goaway_status: int = GoAwayStatus.PROTOCOL_ERROR):
        super().__init__(message)
        self.goaway_status = goaway_status


class StreamClosedError(ValueError):
    """This side tried to send on a stream that is reset, finished or unknown.

    A race the I/O layer must expect (the peer may reset a stream while output is being
    produced for it), so it has its own type to catch.
    """


class Event:
    """Base of everything `receive_data()` returns."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class StreamOpened(Event):
    """The peer opened a stream (SYN_STREAM); answer with `reply()` or `rst_stream()`."""

    stream_id: int
    headers: dict[str, str]
    fin: bool = False
    associated_stream_id: int = 0
    priority: int = 0
    unidirectional: bool = False  # this side may not send on it


@dataclass(frozen=True, slots=True)
class StreamReply(Event):
    """The peer accepted a stream this side opened (SYN_REPLY)."""

    stream_id: int
    headers: dict[str, str]
    fin: bool = False


@dataclass(frozen=True, slots=True)
class HeadersReceived(Event):
    """More headers on an open stream (HEADERS)."""

    stream_id: int
    headers: dict[str, str]
    fin: bool = False


@dataclass(frozen=True, slots=True)
class DataReceived(Event):
    """Stream data; call `acknowledge_received_data()` once it has been passed on."""

    stream_id: int
    data: bytes
    fin: bool = False


@dataclass(frozen=True, slots=True)
class StreamReset(Event):
    """A stream ended abnormally: the peer's RST_STREAM (`remote`) or one this codec
    sent itself because the peer broke a stream-level rule."""

    stream_id: int
    status: int
    remote: bool = True


@dataclass(frozen=True, slots=True)
class PingReceived(Event):
    """A PING. The peer's own pings are already echoed (`ack` False); `ack` True is
    the peer's echo of one of ours."""

    ping_id: int
    ack: bool = False


@dataclass(frozen=True, slots=True)
class GoAwayReceived(Event):
    """The peer will accept no stream above `last_stream_id`; open no new streams."""

    last_stream_id: int
    status: int


@dataclass(frozen=True, slots=True)
class WindowUpdated(Event):
    """The peer granted `delta` more bytes (stream 0: the session window)."""

    stream_id: int
    delta: int


@dataclass(frozen=True, slots=True)
class SettingsReceived(Event):
    """The peer's SETTINGS, id to value."""

    settings: dict[int, int]
    clear: bool = False


# --- pure frame encoding ---------------------------------------------------------------


def _control_frame(frame_type: int, flags: int, payload: bytes) -> bytes:
    """One control frame: the version-3 header words, then the payload."""
    if len(payload) > MAX_FRAME_LENGTH:
        raise ValueError(f"control frame payload of {len(payload)} bytes is too large")
    head = _HEAD.pack(0x80000000 | VERSION << 16 | frame_type, flags << 24 | len(payload))
    return head + payload


def _data_header(stream_id: int, flags: int, length: int) -> bytes:
    """The 8-byte header of a DATA frame; the payload follows unframed."""
    return _HEAD.pack(stream_id & _STREAM_MASK, flags << 24 | length)


def encode_header_block(headers: Mapping[str, str]) -> bytes:
    """A header block before compression: count, then length-prefixed names and values.

    Names go out lowercase because Go's framer fails the whole connection on an
    uppercase name; several values of one header are joined by NUL in the value.
    """
    parts = [_U32.pack(len(headers))]
    seen: set[str] = set()
    for name, value in headers.items():
        lname = name.lower()
        if not lname or "\x00" in lname:
            raise ValueError(f"invalid SPDY header name {name!r}")
        if lname in seen:
            raise ValueError(f"header {lname!r} given twice; join values with NUL")
        if lname in _FORBIDDEN_HEADERS:
            raise ValueError(f"header {lname!r} is not allowed in SPDY")
        seen.add(lname)
        raw_name = lname.encode("utf-8", "surrogateescape")
        raw_value = value.encode("utf-8", "surrogateescape")
        parts += (_U32.pack(len(raw_name)), raw_name, _U32.pack(len(raw_value)), raw_value)
    return b"".join(parts)


def decode_header_block(block: bytes) -> dict[str, str]:
    """Parse a decompressed header block, checking every length against the block.

    Names are lowercased (lenient towards old peers); a repeated name or trailing
    bytes are errors, as the spec says.
    """
    end = len(block)
    if end < 4:
        raise ProtocolError("header block too short for its pair count")
    (count,) = _U32.unpack_from(block, 0)
    if count > (end - 4) // 8:
        raise ProtocolError(f"header block claims {count} pairs in {end} bytes")
    headers: dict[str, str] = {}
    pos = 4
    for _ in range(count):
        name, pos = _read_string(block, pos)
        value, pos = _read_string(block, pos)
        if not name:
            raise ProtocolError("empty header name")
        lname = name.lower()
        if lname in headers:
            raise ProtocolError(f"header {lname!r} appears twice")
        headers[lname] = value
    if pos != end:
        raise ProtocolError(f"{end - pos} stray bytes after the header block")
    return headers


def _read_string(block: bytes, pos: int) -> tuple[str, int]:
    """One 32-bit-length-prefixed string of a header block and the offset after it."""
    if pos + 4 > len(block):
        raise ProtocolError("header block truncated in a length")
    (length,) = _U32.unpack_from(block, pos)
    pos += 4
    if pos + length > len(block):
        raise ProtocolError("header block truncated in a name or value")
    return block[pos : pos + length].decode("utf-8", "surrogateescape"), pos + length


# --- the connection --------------------------------------------------------------------


@dataclass(slots=True)
class _Stream:
    """What the connection must remember about one open stream."""

    send_window: int
    local_closed: bool = False  # our FIN is on the wire (or the stream is one-way)
    remote_closed: bool = False  # the peer's FIN arrived
    replied: bool = False  # SYN_REPLY sent (peer's stream) or received (ours)
    fin_queued: bool = False  # data(fin=True) called; FIN goes out after `pending`
    pending: deque[memoryview] = field(default_factory=deque)
    pending_bytes: int = 0
    unacked: int = 0  # consumed by the application, not yet announced to the peer


class SpdyConnection:
    """One SPDY/3.1 session, either side.

    Every sending method appends frames to an outbox that `data_to_send()` drains, so
    frames leave in the order the header compressor produced them and WINDOW_UPDATEs
    or PING echoes produced by `receive_data()` go out with the next write.
    """

    def __init__(
        self,
        server: bool = True,
        *,
        flow_control: bool = False,
        max_data_frame: int = DEFAULT_MAX_DATA_FRAME,
    ) -> None:
        if not 0 < max_data_frame <= MAX_FRAME_LENGTH:
            raise ValueError(f"max_data_frame must be 1..{MAX_FRAME_LENGTH}")
        self.server = server
        self.flow_control = flow_control
        self.max_data_frame = max_data_frame
        self._deflater = zlib.compressobj(9, zdict=SPDY3_DICTIONARY)
        self._inflater = zlib.decompressobj(zdict=SPDY3_DICTIONARY)
        self._inbuf = bytearray()
        self._outbox: list[bytes | memoryview] = []
        self._streams: dict[int, _Stream] = {}
        self._blocked: dict[int, None] = {}  # ordered set: streams with queued data
        self._failed: str | None = None
        # ids: clients open odd streams and pings, servers even ones
        self._next_local_id = 2 if server else 1
        self._last_peer_id = 0  # highest id the peer opened, served or not
        self._last_accepted_id = 0  # highest one served: GOAWAY's last-good-stream-id
        self._next_ping_id = 2 if server else 1
        self.goaway_sent = False
        self.goaway_received = False
        # flow control, our sending side
        self._session_send_window = DEFAULT_WINDOW
        self._initial_send_window = DEFAULT_WINDOW
        # flow control, our receiving side
        self._recv_window = DEFAULT_WINDOW
        self._session_unacked = 0

    # --- output ------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Everything queued for the socket since the last call (b"" when nothing)."""
        if not self._outbox:
            return b""
        out = b"".join(self._outbox)
        self._outbox.clear()
        return out

    def _emit(self, frame: bytes | memoryview) -> None:
        self._outbox.append(frame)

    def _compress(self, headers: Mapping[str, str]) -> bytes:
        """Deflate one header block on the shared context, ending it with a sync flush
        so the peer can decode it without waiting for the next block."""
        block = encode_header_block(headers)
        return self._deflater.compress(block) + self._deflater.flush(zlib.Z_SYNC_FLUSH)

    # --- opening and answering streams -----------------------------------------------

    @property
    def next_stream_id(self) -> int:
        """The id `syn_stream()` expects next: ids this side opens must increase."""
        return self._next_local_id

    @property
    def open_streams(self) -> int:
        """Streams not yet closed in both directions (finished ones are forgotten)."""
        return len(self._streams)

    def _is_local(self, stream_id: int) -> bool:
        """True for ids of this side's parity (servers even, clients odd)."""
        return (stream_id % 2 == 0) == self.server

    def syn_stream(
        self,
        stream_id: int,
        headers: Mapping[str, str],
        fin: bool = False,
        associated: int = 0,
        priority: int = 0,
        *,
        unidirectional: bool = False,
    ) -> None:
        """Open a stream (SYN_STREAM). Clients use it; servers only for push."""
        if self.goaway_received:
            raise StreamClosedError("the peer sent GOAWAY: no new streams")
        if not self._is_local(stream_id) or stream_id < self._next_local_id:
            raise ValueError(f"stream id {stream_id} is not the next id of this side")
        if stream_id > _STREAM_MASK or not 0 <= priority <= 7:
            raise ValueError("stream id or priority out of range")
        payload = (
            _U32X2.pack(stream_id, associated & _STREAM_MASK)
            + bytes((priority << 5, 0))
            + self._compress(headers)
        )
        flags = (FLAG_FIN if fin else 0) | (FLAG_UNIDIRECTIONAL if unidirectional else 0)
        self._emit(_control_frame(FrameType.SYN_STREAM, flags, payload))
        self._next_local_id = stream_id + 2
        self._streams[stream_id] = _Stream(
            self._initial_send_window,
            local_closed=fin,
            fin_queued=fin,
            remote_closed=unidirectional,
        )
        self._forget_if_done(stream_id)

    def reply(self, stream_id: int, headers: Mapping[str, str], fin: bool = False) -> None:
        """Accept a stream the peer opened (SYN_REPLY); spdystream waits for this."""
        stream = self._sendable(stream_id)
        if self._is_local(stream_id) or stream.replied:
            raise ValueError(f"stream {stream_id} cannot be replied to (again)")
        stream.replied = True
        payload = _U32.pack(stream_id) + self._compress(headers)
        self._emit(_control_frame(FrameType.SYN_REPLY, FLAG_FIN if fin else 0, payload))
        if fin:
            self._finish_local(stream_id, stream)

    def headers(self, stream_id: int, headers: Mapping[str, str], fin: bool = False) -> None:
        """Send more headers on an open stream (HEADERS)."""
        stream = self._sendable(stream_id)
        if fin and stream.pending:
            raise ValueError("data is still queued on this stream; end it with data(fin=True)")
        payload = _U32.pack(stream_id) + self._compress(headers)
        self._emit(_control_frame(FrameType.HEADERS, FLAG_FIN if fin else 0, payload))
        if fin:
            self._finish_local(stream_id, stream)

    def _sendable(self, stream_id: int) -> _Stream:
        """The stream if this side may still send on it, else StreamClosedError."""
        stream = self._streams.get(stream_id)
        if stream is None:
            raise StreamClosedError(f"stream {stream_id} is not open")
        if stream.local_closed or stream.fin_queued:
            raise StreamClosedError(f"stream {stream_id} was already finished by this side")
        return stream

    def _finish_local(self, stream_id: int, stream: _Stream) -> None:
        stream.fin_queued = stream.local_closed = True
        self._forget_if_done(stream_id)

    def _forget_if_done(self, stream_id: int) -> None:
        """Drop a stream closed in both directions: long port-forward sessions open
        thousands of streams, and closed ones are recognised by id alone."""
        stream = self._streams.get(stream_id)
        if stream is not None and stream.local_closed and stream.remote_closed:
            del self._streams[stream_id]
            self._blocked.pop(stream_id, None)

    # --- data and flow control ---------------------------------------------------------

    def data(
        self, stream_id: int, payload: bytes | bytearray | memoryview, fin: bool = False
    ) -> None:
        """Send stream data, cut into frames of at most `max_data_frame` bytes.

        What the send windows do not allow now waits in the stream's queue and leaves
        when WINDOW_UPDATE or SETTINGS frames open the windows; check
        `queued_data(stream_id)` to stop producing while it is large.
        """
        stream = self._sendable(stream_id)
        if payload:
            view = memoryview(payload if isinstance(payload, bytes) else bytes(payload))
            stream.pending.append(view)
            stream.pending_bytes += len(view)
        if fin:
            stream.fin_queued = True
        self._flush_stream(stream_id, stream)

    def _allowance(self, stream: _Stream) -> int:
        """How many bytes of `stream` may go out now."""
        if not self.flow_control:
            return self.max_data_frame
        return min(self.max_data_frame, stream.send_window, self._session_send_window)

    def _flush_stream(self, stream_id: int, stream: _Stream) -> None:
        """Frame as much of the stream's queue as the windows allow, FIN with the last."""
        while stream.pending:
            size = self._allowance(stream)
            if size <= 0:
                break
            head = stream.pending[0]
            if len(head) <= size:
                chunk = stream.pending.popleft()
            else:
                chunk, stream.pending[0] = head[:size], head[size:]
            stream.pending_bytes -= len(chunk)
            stream.send_window -= len(chunk)
            self._session_send_window -= len(chunk)
            last = stream.fin_queued and not stream.pending
            self._emit(_data_header(stream_id, FLAG_FIN if last else 0, len(chunk)))
            self._emit(chunk)
            if last:
                stream.local_closed = True
        if stream.pending:
            self._blocked[stream_id] = None
            return
        self._blocked.pop(stream_id, None)
        if stream.fin_queued and not stream.local_closed:  # data(b"", fin=True)
            self._emit(_data_header(stream_id, FLAG_FIN, 0))
            stream.local_closed = True
        self._forget_if_done(stream_id)

    def _flush_blocked(self) -> None:
        """Give newly opened window to queued streams, lowest id first."""
        for stream_id in sorted(self._blocked):
            stream = self._streams.get(stream_id)
            if stream is None:
                self._blocked.pop(stream_id, None)
                continue
            self._flush_stream(stream_id, stream)
            if self.flow_control and self._session_send_window <= 0:
                break

    def send_window(self, stream_id: int) -> int:
        """Bytes `data()` could send on the stream right now (0 for unknown streams)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        if not self.flow_control:
            return MAX_WINDOW
        return max(0, min(stream.send_window, self._session_send_window))

    def queued_data(self, stream_id: int) -> int:
        """Bytes of the stream waiting for window: the I/O layer's backpressure signal."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None else stream.pending_bytes

    def acknowledge_received_data(self, stream_id: int, size: int) -> None:
        """The application passed on `size` bytes of the stream's data: open the
        peer's window again, in WINDOW_UPDATEs of at least half a window."""
        if size < 0:
            raise ValueError("acknowledged size must not be negative")
        stream = self._streams.get(stream_id)
        if stream is None or stream.remote_closed:
            return  # the peer sends no more on it: nothing to open
        stream.unacked += size
        if stream.unacked >= self._recv_window // 2:
            self.window_update(stream_id, stream.unacked)
            stream.unacked = 0

    def _account_session_data(self, size: int) -> None:
        """Replenish the session window on arrival: per-stream windows already bound
        what each stream buffers, and holding the session window hostage to one slow
        stream would stall every other stream of the connection."""
        self._session_unacked += size
        if self._session_unacked >= self._recv_window // 2:
            self.window_update(0, self._session_unacked)
            self._session_unacked = 0

    # --- other control frames ----------------------------------------------------------

    def rst_stream(self, stream_id: int, status: int = RstStatus.CANCEL) -> None:
        """Abort a stream (RST_STREAM); its queued data is dropped."""
        if not 0 < stream_id <= _STREAM_MASK or not status:
            raise ValueError("RST_STREAM needs a stream id and a non-zero status")
        self._emit(_control_frame(FrameType.RST_STREAM, 0, _U32X2.pack(stream_id, status)))
        self._streams.pop(stream_id, None)
        self._blocked.pop(stream_id, None)

    def ping(self, ping_id: int | None = None) -> int:
        """Send a PING (keep-alive or round-trip probe); returns its id. Ids carry this
        side's parity, as the peer tells its echoes from new pings by parity."""
        if ping_id is None:
            ping_id = self._next_ping_id
            self._next_ping_id = (ping_id + 2) & 0xFFFFFFFF or (2 if self.server else 1)
        if not 0 < ping_id <= 0xFFFFFFFF or (ping_id % 2 == 0) != self.server:
            raise ValueError(f"ping id {ping_id} has the wrong parity or range")
        self._emit(_control_frame(FrameType.PING, 0, _U32.pack(ping_id)))
        return ping_id

    def goaway(
        self, last_good_stream_id: int | None = None, status: int = GoAwayStatus.OK
    ) -> None:
        """Announce the end of the session (GOAWAY); by default every stream the peer
        opened so far is still served. Later SYN_STREAMs are ignored."""
        last = self._last_accepted_id if last_good_stream_id is None else last_good_stream_id
        self._emit(_control_frame(FrameType.GOAWAY, 0, _U32X2.pack(last & _STREAM_MASK, status)))
        self.goaway_sent = True

    def window_update(self, stream_id: int, delta: int) -> None:
        """Grant the peer `delta` more bytes on a stream (0: the session)."""
        if not 0 < delta <= MAX_WINDOW or not 0 <= stream_id <= _STREAM_MASK:
            raise ValueError(f"window delta {delta} must be in 1..{MAX_WINDOW}")
        self._emit(_control_frame(FrameType.WINDOW_UPDATE, 0, _U32X2.pack(stream_id, delta)))

    def settings(self, settings: Mapping[int, int], clear: bool = False) -> None:
        """Send SETTINGS (flags per entry are not used). Announcing INITIAL_WINDOW_SIZE
        also changes how much this side lets the peer run ahead before updating."""
        parts = [_U32.pack(len(settings))]
        for setting_id, value in settings.items():
            if not 0 < setting_id <= _LENGTH_MASK or not 0 <= value <= 0xFFFFFFFF:
                raise ValueError(f"setting {setting_id}={value} out of range")
            parts.append(_U32X2.pack(setting_id, value))
        flags = FLAG_SETTINGS_CLEAR if clear else 0
        self._emit(_control_frame(FrameType.SETTINGS, flags, b"".join(parts)))
        window = settings.get(SettingId.INITIAL_WINDOW_SIZE)
        if window is not None:
            self._recv_window = max(2, min(window, MAX_WINDOW))

    # --- input -------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Parse every complete frame of the bytes received so far, in any chunking.

        A partial frame stays buffered for the next call. Raises ProtocolError when
        the peer breaks the protocol; the connection is unusable after that except
        for `goaway()` and `data_to_send()`.
        """
        if self._failed is not None:
            raise ProtocolError(f"connection already failed: {self._failed}")
        buf = self._inbuf
        buf += data
        events: list[Event] = []
        pos = 0
        try:
            while len(buf) - pos >= 8:
                word, flags_length = _HEAD.unpack_from(buf, pos)
                length = flags_length & _LENGTH_MASK
                control = bool(word & 0x80000000)
                if control:
                    self._check_control_header(word, length)
                if len(buf) - pos - 8 < length:
                    break
                payload = bytes(buf[pos + 8 : pos + 8 + length])
                pos += 8 + length
                flags = flags_length >> 24
                if control:
                    self._on_control(word & 0xFFFF, flags, payload, events)
                else:
                    self._on_data(word & _STREAM_MASK, flags, payload, events)
        except ProtocolError as err:
            self._failed = str(err)
            raise
        finally:
            del buf[:pos]
        return events

    @staticmethod
    def _check_control_header(word: int, length: int) -> None:
        """Refuse other versions and oversized control frames before buffering them."""
        version = (word >> 16) & 0x7FFF
        if version != VERSION:
            raise ProtocolError(f"unsupported SPDY version {version} (this side speaks 3)")
        if length > MAX_CONTROL_FRAME:
            raise ProtocolError(f"control frame of {length} bytes exceeds the limit")

    def _on_control(self, frame_type: int, flags: int, payload: bytes, events: list[Event]) -> None:
        handler = _CONTROL_HANDLERS.get(frame_type)
        if handler is not None:  # the spec says unknown control frames are ignored
            handler(self, flags, payload, events)

    def _inflate(self, compressed: bytes) -> dict[str, str]:
        """Decompress one header block on the shared context and parse it."""
        try:
            block = self._inflater.decompress(compressed, MAX_HEADER_BLOCK + 1)
        except zlib.error as err:
            raise ProtocolError(f"header block does not decompress: {err}") from None
        if len(block) > MAX_HEADER_BLOCK or self._inflater.unconsumed_tail:
            raise ProtocolError("header block exceeds the size limit")
        return decode_header_block(block)

    def _on_syn_stream(self, flags: int, payload: bytes, events: list[Event]) -> None:
        _expect_length(payload, 10, "SYN_STREAM", at_least=True)
        stream_id, associated = _U32X2.unpack_from(payload, 0)
        stream_id &= _STREAM_MASK
        headers = self._inflate(payload[10:])  # always: keeps the zlib context in step
        if stream_id == 0 or self._is_local(stream_id):
            raise ProtocolError(f"SYN_STREAM with invalid stream id {stream_id}")
        if stream_id <= self._last_peer_id:
            raise ProtocolError(f"SYN_STREAM id {stream_id} does not increase")
        self._last_peer_id = stream_id  # its later frames count as for a closed stream
        if self.goaway_sent:
            return  # after our GOAWAY new streams are ignored, not served
        self._last_accepted_id = stream_id
        fin = bool(flags & FLAG_FIN)
        unidirectional = bool(flags & FLAG_UNIDIRECTIONAL)
        self._streams[stream_id] = _Stream(
            self._initial_send_window, local_closed=unidirectional, remote_closed=fin
        )
        events.append(
            StreamOpened(
                stream_id,
                headers,
                fin,
                associated & _STREAM_MASK,
                payload[8] >> 5,
                unidirectional,
            )
        )
        self._forget_if_done(stream_id)

    def _on_syn_reply(self, flags: int, payload: bytes, events: list[Event]) -> None:
        _expect_length(payload, 4, "SYN_REPLY", at_least=True)
        stream_id = _U32.unpack_from(payload, 0)[0] & _STREAM_MASK
        headers = self._inflate(payload[4:])
        stream = self._incoming_stream(stream_id, events)
        if stream is None:
            return
        if not self._is_local(stream_id) or stream.replied:
            self._reset_locally(stream_id, RstStatus.STREAM_IN_USE, events)
            return
        stream.replied = True
        events.append(StreamReply(stream_id, headers, bool(flags & FLAG_FIN)))
        self._remote_fin(stream_id, stream, flags)

    def _on_headers(self, flags: int, payload: bytes, events: list[Event]) -> None:
        _expect_length(payload, 4, "HEADERS", at_least=True)
        stream_id = _U32.unpack_from(payload, 0)[0] & _STREAM_MASK
        headers = self._inflate(payload[4:])
        stream = self._incoming_stream(stream_id, events)
        if stream is None:
            return
        events.append(HeadersReceived(stream_id, headers, bool(flags & FLAG_FIN)))
        self._remote_fin(stream_id, stream, flags)

    def _on_rst_stream(self, flags: int, payload: bytes, events: list[Event]) -> None:
        _expect_length(payload, 8, "RST_STREAM")
        stream_id, status = _U32X2.unpack(payload)
        stream_id &= _STREAM_MASK
        if stream_id == 0 or status == 0:
            raise ProtocolError("RST_STREAM needs a stream id and a non-zero status")
        self._blocked.pop(stream_id, None)
        if self._streams.pop(stream_id, None) is not None:
            events.append(StreamReset(stream_id, status))

    def _on_settings(self, flags: int, payload: bytes, events: list[Event]) -> None:
        _expect_length(payload, 4, "SETTINGS", at_least=True)
        (count,) = _U32.unpack_from(payload, 0)
        if len(payload) != 4 + 8 * count:
            raise ProtocolError(f"SETTINGS of {len(payload)} bytes for {count} entries")
        settings: dict[int, int] = {}
        for offset in range(4, len(payload), 8):
            id_word, value = _U32X2.unpack_from(payload, offset)
            settings[id_word & _LENGTH_MASK] = value  # top byte: persistence flags
        window = settings.get(SettingId.INITIAL_WINDOW_SIZE)
        if window is not None:
            self._set_initial_send_window(window)
        events.append(SettingsReceived(settings, bool(flags & FLAG_SETTINGS_CLEAR)))
        if window is not None:
            self._flush_blocked()

    def _set_initial_send_window(self, window: int) -> None:
        """A new INITIAL_WINDOW_SIZE moves every open stream's window by the change
        (windows may go negative), as the spec requires."""
        if window > MAX_WINDOW:
            raise ProtocolError(f"INITIAL_WINDOW_SIZE {window} exceeds 2^31-1")
        delta = window - self._initial_send_window
        self._initial_send_window = window
        for stream in self._streams.values():
            stream.send_window += delta

    def _on_ping(self, flags: int, payload: bytes, events: list[Event]) -> None:
        _expect_length(payload, 4, "PING")
        (ping_id,) = _U32.unpack(payload)
        ours = (ping_id % 2 == 0) == self.server
        if not ours:  # echo the peer's ping unchanged, as it expects
            self._emit(_control_frame(FrameType.PING, 0, payload))
        events.append(PingReceived(ping_id, ack=ours))

    def _on_goaway(self, flags: int, payload: bytes, events: list[Event]) -> None:
        _expect_length(payload, 8, "GOAWAY")
        last, status = _U32X2.unpack(payload)
        self.goaway_received = True
        events.append(GoAwayReceived(last & _STREAM_MASK, status))

    def _on_window_update(self, flags: int, payload: bytes, events: list[Event]) -> None:
        _expect_length(payload, 8, "WINDOW_UPDATE")
        stream_id, delta = _U32X2.unpack(payload)
        stream_id &= _STREAM_MASK
        delta &= _STREAM_MASK
        if delta == 0:
            raise ProtocolError("WINDOW_UPDATE with a zero delta")
        if stream_id == 0:
            self._session_send_window += delta
            if self._session_send_window > MAX_WINDOW:
                raise ProtocolError("session send window grew beyond 2^31-1")
        else:
            stream = self._streams.get(stream_id)
            if stream is None:
                return  # a late update for a finished stream
            stream.send_window += delta
            if stream.send_window > MAX_WINDOW:
                self._reset_locally(stream_id, RstStatus.FLOW_CONTROL_ERROR, events)
                return
        events.append(WindowUpdated(stream_id, delta))
        self._flush_blocked()

    def _on_data(self, stream_id: int, flags: int, payload: bytes, events: list[Event]) -> None:
        if stream_id == 0:
            raise ProtocolError("DATA frame on stream 0")
        self._account_session_data(len(payload))
        stream = self._incoming_stream(stream_id, events)
        if stream is None:
            return
        fin = bool(flags & FLAG_FIN)
        if payload or fin:
            events.append(DataReceived(stream_id, payload, fin))
        self._remote_fin(stream_id, stream, flags)

    def _incoming_stream(self, stream_id: int, events: list[Event]) -> _Stream | None:
        """The open stream a peer frame refers to, or None after dealing with a frame
        for a stream that never existed (RST INVALID_STREAM), that has ended (ignored:
        frames cross a RST on the wire) or whose peer side already sent FIN."""
        if stream_id == 0:
            raise ProtocolError("stream frame on stream 0")
        stream = self._streams.get(stream_id)
        if stream is None:
            highest = self._next_local_id - 2 if self._is_local(stream_id) else self._last_peer_id
            if stream_id > highest:
                self._emit(
                    _control_frame(
                        FrameType.RST_STREAM, 0, _U32X2.pack(stream_id, RstStatus.INVALID_STREAM)
                    )
                )
            return None
        if stream.remote_closed:
            self._reset_locally(stream_id, RstStatus.STREAM_ALREADY_CLOSED, events)
            return None
        return stream

    def _remote_fin(self, stream_id: int, stream: _Stream, flags: int) -> None:
        if flags & FLAG_FIN:
            stream.remote_closed = True
            self._forget_if_done(stream_id)

    def _reset_locally(self, stream_id: int, status: RstStatus, events: list[Event]) -> None:
        """Reset a stream the peer misused and tell the application it is gone."""
        self.rst_stream(stream_id, status)
        events.append(StreamReset(stream_id, status, remote=False))


def _expect_length(payload: bytes, length: int, name: str, at_least: bool = False) -> None:
    """Fixed-size control frames must be exactly their size (Go's framer agrees)."""
    if len(payload) < length or (not at_least and len(payload) != length):
        raise ProtocolError(f"{name} frame has {len(payload)} payload bytes, expected {length}")


_CONTROL_HANDLERS = {
    FrameType.SYN_STREAM: SpdyConnection._on_syn_stream,
    FrameType.SYN_REPLY: SpdyConnection._on_syn_reply,
    FrameType.RST_STREAM: SpdyConnection._on_rst_stream,
    FrameType.SETTINGS: SpdyConnection._on_settings,
    FrameType.PING: SpdyConnection._on_ping,
    FrameType.GOAWAY: SpdyConnection._on_goaway,
    FrameType.HEADERS: SpdyConnection._on_headers,
    FrameType.WINDOW_UPDATE: SpdyConnection._on_window_update,
}
