"""The SPDY/3.1 codec (cri_py.streaming.spdy), with plain bytes between two instances.

A client and a server instance talk to each other through `pipe()`, which cuts the
bytes into random pieces from a seeded RNG, so every test also checks that parsing
does not depend on how the socket happens to chunk the stream. Interoperability with
Go's spdystream (what kubectl, crictl and the kubelet use) is pinned by the dictionary's
checksum and by frames captured from a real `kubectl exec`.
"""

from __future__ import annotations

import random
import re
import struct
import zlib
from pathlib import Path

import pytest

from cri_py.streaming.spdy import (
    SPDY3_DICTIONARY,
    DataReceived,
    GoAwayReceived,
    GoAwayStatus,
    HeadersReceived,
    PingReceived,
    ProtocolError,
    RstStatus,
    SettingId,
    SettingsReceived,
    SpdyConnection,
    StreamClosedError,
    StreamOpened,
    StreamReply,
    StreamReset,
    WindowUpdated,
    decode_header_block,
    encode_header_block,
)

KIB = 1024
WINDOW = 64 * KIB

# The first three frames `kubectl exec` (v1.32, moby/spdystream) sent to a test server:
# SYN_STREAMs 1, 3 and 5 with streamtype error, stdout and stderr. The first header block
# starts the zlib stream: 78 f9 (FDICT set) then the dictionary's Adler-32, e3c6a7c2.
KUBECTL_SYN_STREAMS = bytes.fromhex(
    "80030001000000290000000100000000000078f9e3c6a7c26260606004a7b392a2d4c45c6851c29a0a0a"
    "6800000000ffff"
    "800300010000001900000003000000000000c22ac5565c92925f5a02000000ffff"
    "800300010000001500000005000000000000c229975a5404000000ffff"
)
SPDYSTREAM_DICTIONARY_GO = Path(
    "/opt/cri-tools-src/vendor/github.com/moby/spdystream/spdy/dictionary.go"
)


def pipe(src: SpdyConnection, dst: SpdyConnection, rng: random.Random) -> list:
    """Move everything `src` has queued into `dst` in random chunks; `dst`'s events."""
    data = src.data_to_send()
    events = []
    pos = 0
    while pos < len(data):
        size = rng.choice((1, 2, 3, 7, 8, 9, 64, 1000, 20000))
        events += dst.receive_data(data[pos : pos + size])
        pos += size
    return events


def pair() -> tuple[SpdyConnection, SpdyConnection, random.Random]:
    return SpdyConnection(server=False, flow_control=True), SpdyConnection(server=True, flow_control=True), random.Random(1234)


def of(events: list, kind: type) -> list:
    return [e for e in events if isinstance(e, kind)]


def control(frame_type: int, payload: bytes, flags: int = 0, version: int = 3) -> bytes:
    """A control frame built by hand, independently of the codec's encoder."""
    return struct.pack(">HHI", 0x8000 | version, frame_type, flags << 24 | len(payload)) + payload


def _fresh_block(headers: dict[str, str]) -> bytes:
    """A header block as the first one on a new connection's compression context."""
    comp = zlib.compressobj(zdict=SPDY3_DICTIONARY)
    return comp.compress(encode_header_block(headers)) + comp.flush(zlib.Z_SYNC_FLUSH)


EMPTY_BLOCK = _fresh_block({})


def data_frame(stream_id: int, payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">II", stream_id, flags << 24 | len(payload)) + payload


# --- the dictionary ---------------------------------------------------------------------


def test_dictionary_matches_the_spdy3_checksum():
    # zlib names a preset dictionary by Adler-32: this is the id Go's streams carry
    assert len(SPDY3_DICTIONARY) == 1423
    assert zlib.adler32(SPDY3_DICTIONARY) == 0xE3C6A7C2
    assert SPDY3_DICTIONARY.startswith(b"\x00\x00\x00\x07options\x00\x00\x00\x04head")
    assert SPDY3_DICTIONARY.endswith(b"charset=iso-8859-1,utf-,*,enq=0.")
    assert b"\x00\x00\x00\x0ccontent-type" in SPDY3_DICTIONARY


@pytest.mark.skipif(not SPDYSTREAM_DICTIONARY_GO.exists(), reason="no spdystream checkout")
def test_dictionary_equals_spdystreams_table():
    table = SPDYSTREAM_DICTIONARY_GO.read_text().split("[]byte{", 1)[1].split("}", 1)[0]
    go_bytes = bytes(int(h, 16) for h in re.findall(r"0x([0-9a-fA-F]{2})", table))
    assert go_bytes == SPDY3_DICTIONARY


def test_dictionary_makes_known_names_cheap():
    def deflated_size(zdict: bytes | None) -> int:
        # raw deflate: no zlib header, dictionary id or checksum to blur the sizes
        args = (9, zlib.DEFLATED, -15)
        comp = zlib.compressobj(*args, zdict=zdict) if zdict else zlib.compressobj(*args)
        return len(comp.compress(b"content-type") + comp.flush())

    # with the dictionary the 12 bytes are one back-reference; without, literals
    assert deflated_size(SPDY3_DICTIONARY) <= 5
    assert deflated_size(None) >= 12


def test_decodes_header_blocks_compressed_by_kubectl():
    server = SpdyConnection(server=True, flow_control=True)
    events = server.receive_data(KUBECTL_SYN_STREAMS)
    assert [(e.stream_id, e.headers) for e in events] == [
        (1, {"streamtype": "error"}),
        (3, {"streamtype": "stdout"}),
        (5, {"streamtype": "stderr"}),
    ]
    # the check has teeth: the same bytes do not inflate with any other dictionary
    first_block = KUBECTL_SYN_STREAMS[18:49]
    with pytest.raises(zlib.error):
        zlib.decompressobj(zdict=SPDY3_DICTIONARY[:-1]).decompress(first_block)


def test_own_header_block_inflates_with_plain_zlib():
    client = SpdyConnection(server=False, flow_control=True)
    client.syn_stream(1, {"streamtype": "data", "port": "8080", "requestid": "0"})
    frame = client.data_to_send()
    raw = zlib.decompressobj(zdict=SPDY3_DICTIONARY).decompress(frame[18:])
    assert decode_header_block(raw) == {"streamtype": "data", "port": "8080", "requestid": "0"}
    # the same zlib header as kubectl's first block: level 9, FDICT, the dictionary id
    assert frame[18:24] == KUBECTL_SYN_STREAMS[18:24] == bytes.fromhex("78f9e3c6a7c2")


# --- header blocks -------------------------------------------------------------------------


def test_header_blocks_share_one_zlib_context_per_direction():
    client, server, rng = pair()
    headers = {"streamtype": "stdout", "requestid": "7"}
    sizes = []
    for stream_id in (1, 3, 5, 7):
        client.syn_stream(stream_id, headers)
        raw = client.data_to_send()
        sizes.append(len(raw))
        (event,) = server.receive_data(raw)
        assert event.headers == headers
    # later blocks refer back to earlier ones: much smaller than the first
    assert sizes[1] < sizes[0] - 10 and sizes[3] <= sizes[1]
    # and cannot be read without the earlier blocks: the context is really shared
    with pytest.raises(ProtocolError):
        SpdyConnection(server=True, flow_control=True).receive_data(raw)


def test_header_names_are_lowercased_and_multiple_values_kept():
    client, server, rng = pair()
    client.syn_stream(1, {"StreamType": "stdout", "Accept": "a\x00b"})
    (event,) = pipe(client, server, rng)
    assert event.headers == {"streamtype": "stdout", "accept": "a\x00b"}


@pytest.mark.parametrize("bad", [{"": "x"}, {"Connection": "close"}, {"host": "h"}])
def test_invalid_outgoing_headers_are_refused(bad):
    with pytest.raises(ValueError):
        encode_header_block(bad)


def test_header_block_parser_checks_every_length():
    good = encode_header_block({"a": "b"})
    assert decode_header_block(good) == {"a": "b"}
    for broken in (good[:-1], good + b"x", b"\x00\x00\x00\x05" + good[4:], b"\x00"):
        with pytest.raises(ProtocolError):
            decode_header_block(broken)
    twice = struct.pack(">I", 2) + good[4:] * 2
    with pytest.raises(ProtocolError, match="twice"):
        decode_header_block(twice)


# --- every frame type, both directions, any chunking ------------------------------------


def test_round_trip_of_every_frame_type():
    client, server, rng = pair()
    client.syn_stream(1, {"streamtype": "error"}, priority=3)
    client.syn_stream(3, {"streamtype": "stdin"}, fin=False)
    client.data(3, b"hello", fin=True)
    client.ping()
    client.settings({SettingId.MAX_CONCURRENT_STREAMS: 100})
    client.headers(1, {"x-extra": "1"})
    client.window_update(0, 1000)
    events = pipe(client, server, rng)
    assert events == [
        StreamOpened(1, {"streamtype": "error"}, False, 0, 3, False),
        StreamOpened(3, {"streamtype": "stdin"}, False, 0, 0, False),
        DataReceived(3, b"hello", True),
        PingReceived(1, ack=False),
        SettingsReceived({SettingId.MAX_CONCURRENT_STREAMS: 100}),
        HeadersReceived(1, {"x-extra": "1"}, False),
        WindowUpdated(0, 1000),
    ]

    server.reply(1, {"status": "ok"})
    server.reply(3, {}, fin=True)
    server.headers(1, {"trailer": "x"})
    server.data(1, b"world")
    server.rst_stream(1, RstStatus.INTERNAL_ERROR)
    server.goaway(status=GoAwayStatus.INTERNAL_ERROR)
    events = pipe(server, client, rng)
    assert events == [
        PingReceived(1, ack=True),  # the server's automatic echo comes first
        StreamReply(1, {"status": "ok"}, False),
        StreamReply(3, {}, True),
        HeadersReceived(1, {"trailer": "x"}, False),
        DataReceived(1, b"world", False),
        StreamReset(1, RstStatus.INTERNAL_ERROR),
        GoAwayReceived(3, GoAwayStatus.INTERNAL_ERROR),
    ]
    assert client.open_streams == server.open_streams == 0


@pytest.mark.parametrize("seed", range(5))
def test_parsing_does_not_depend_on_chunking(seed):
    rng = random.Random(seed)
    client, server = SpdyConnection(server=False, flow_control=True), SpdyConnection(server=True, flow_control=True)
    payloads = {}
    for stream_id in range(1, 40, 2):
        client.syn_stream(stream_id, {"streamtype": "data", "requestid": str(stream_id)})
        payloads[stream_id] = rng.randbytes(rng.randrange(0, 3000))
        client.data(stream_id, payloads[stream_id], fin=True)
    wire = client.data_to_send()
    whole = SpdyConnection(server=True, flow_control=True).receive_data(wire)
    pieces, pos = [], 0
    while pos < len(wire):
        size = rng.randrange(1, 200)
        pieces += server.receive_data(wire[pos : pos + size])
        pos += size
    assert pieces == whole
    got: dict[int, bytes] = {}
    for event in of(pieces, DataReceived):
        got[event.stream_id] = got.get(event.stream_id, b"") + event.data
    assert {k: v for k, v in payloads.items() if v} == got


def test_a_truncated_frame_waits_for_the_rest():
    client, server, rng = pair()
    client.syn_stream(1, {"streamtype": "stdout"})
    client.data(1, b"x" * 100)
    wire = client.data_to_send()
    split = len(wire) - 1
    events = server.receive_data(wire[:split])
    assert len(events) == 1 and isinstance(events[0], StreamOpened)
    assert server.receive_data(b"") == []
    assert server.receive_data(wire[split:]) == [DataReceived(1, b"x" * 100, False)]
    # even the 8-byte frame header may arrive one byte at a time
    client.data(1, b"yz", fin=True)
    wire = client.data_to_send()
    events = [e for b in wire for e in server.receive_data(bytes([b]))]
    assert events == [DataReceived(1, b"yz", True)]


# --- flow control -----------------------------------------------------------------------------


def drain(sender: SpdyConnection, receiver: SpdyConnection, rng: random.Random) -> bytes:
    """Pass data and the receiver's automatic WINDOW_UPDATEs back and forth until
    nothing moves; the stream data that arrived."""
    received = b""
    while True:
        pipe(receiver, sender, rng)
        events = of(pipe(sender, receiver, rng), DataReceived)
        if not events:
            return received
        received += b"".join(e.data for e in events)


def test_sending_waits_for_the_peers_window():
    client, server, rng = pair()
    client.syn_stream(1, {"streamtype": "stdout"})
    pipe(client, server, rng)
    server.reply(1, {})
    body = random.Random(5).randbytes(200 * KIB)
    server.data(1, body, fin=True)
    first = of(pipe(server, client, rng), DataReceived)
    received = b"".join(e.data for e in first)
    assert received == body[:WINDOW] and not any(e.fin for e in first)
    assert max(len(e.data) for e in first) == 16 * KIB
    assert server.send_window(1) == 0 and server.queued_data(1) == 200 * KIB - WINDOW

    # the client replenished the session window on arrival; the stream stays shut
    assert of(pipe(client, server, rng), WindowUpdated) == [WindowUpdated(0, WINDOW // 2)] * 2
    assert server.data_to_send() == b""

    client.window_update(1, 100 * KIB)  # the consumer caught up with some of it
    assert WindowUpdated(1, 100 * KIB) in pipe(client, server, rng)
    received += drain(server, client, rng)
    assert received == body[: WINDOW + 100 * KIB]
    client.window_update(1, 100 * KIB)  # and then with the rest
    received += drain(server, client, rng)
    assert received == body and server.queued_data(1) == 0
    assert server.open_streams == 1  # the client has not finished its side


def test_the_session_window_holds_back_every_stream():
    client, server, rng = pair()
    client.syn_stream(1, {})
    client.syn_stream(3, {})
    pipe(client, server, rng)
    server.data(1, b"a" * WINDOW)
    server.data(3, b"b" * 10)
    assert server.data_to_send().count(b"b") == 0 and server.queued_data(3) == 10
    # a peer that grants stream window only (frames by hand: no automatic updates)
    server.receive_data(control(9, struct.pack(">II", 3, 1000)))
    assert server.data_to_send() == b""
    assert server.receive_data(control(9, struct.pack(">II", 0, 4))) == [WindowUpdated(0, 4)]
    assert server.data_to_send() == data_frame(3, b"bbbb")
    with pytest.raises(ProtocolError, match="2\\^31"):
        server.receive_data(
            control(9, struct.pack(">II", 0, 2**31 - 1)) * 2
        )


def test_settings_initial_window_moves_open_streams():
    client, server, rng = pair()
    client.syn_stream(1, {})
    pipe(client, server, rng)
    client.settings({SettingId.INITIAL_WINDOW_SIZE: 1000})
    pipe(client, server, rng)
    server.data(1, b"a" * 5000)
    assert len(b"".join(e.data for e in of(pipe(server, client, rng), DataReceived))) == 1000
    client.settings({SettingId.INITIAL_WINDOW_SIZE: 4000})  # +3000 for every stream
    pipe(client, server, rng)
    assert len(b"".join(e.data for e in of(pipe(server, client, rng), DataReceived))) == 3000
    assert server.queued_data(1) == 1000


def test_flow_control_off_sends_everything_as_spdystream_peers_need():
    client = SpdyConnection(server=False, flow_control=True)
    server = SpdyConnection(server=True, flow_control=False)
    rng = random.Random(3)
    client.syn_stream(1, {})
    pipe(client, server, rng)
    server.data(1, b"z" * (300 * KIB), fin=True)
    events = of(pipe(server, client, rng), DataReceived)
    assert sum(len(e.data) for e in events) == 300 * KIB and events[-1].fin
    assert server.queued_data(1) == 0


def test_receiver_reopens_windows_as_data_is_consumed():
    client, server, rng = pair()
    client.syn_stream(1, {})
    pipe(client, server, rng)
    server.reply(1, {})
    server.data(1, b"q" * WINDOW)
    events = of(pipe(server, client, rng), DataReceived)
    # the session window was replenished on arrival, the stream's was not
    updates = of(pipe(client, server, rng), WindowUpdated)
    assert updates == [WindowUpdated(0, WINDOW // 2), WindowUpdated(0, WINDOW // 2)]
    assert server.send_window(1) == 0
    for event in events:
        client.acknowledge_received_data(1, len(event.data))
    updates = of(pipe(client, server, rng), WindowUpdated)
    assert sum(u.delta for u in updates) == WINDOW and {u.stream_id for u in updates} == {1}
    assert server.send_window(1) == WINDOW


def test_a_peer_overrunning_our_window_is_tolerated():
    # spdystream ignores flow control: `kubectl cp` pushes a whole tarball as stdin
    client, server, rng = pair()
    client.syn_stream(1, {})
    wire = client.data_to_send() + b"".join(
        data_frame(1, b"s" * 32 * KIB) for _ in range(10)
    )
    events = server.receive_data(wire)
    assert sum(len(e.data) for e in of(events, DataReceived)) == 320 * KIB


# --- resets, pings, goaway --------------------------------------------------------------------


def test_rst_stream_drops_queued_data_and_ends_the_stream():
    client, server, rng = pair()
    client.syn_stream(1, {})
    pipe(client, server, rng)
    server.data(1, b"d" * (100 * KIB))
    pipe(server, client, rng)
    client.rst_stream(1, RstStatus.CANCEL)
    assert of(pipe(client, server, rng), StreamReset) == [StreamReset(1, RstStatus.CANCEL)]
    assert server.queued_data(1) == 0 and server.open_streams == 0
    with pytest.raises(StreamClosedError):
        server.data(1, b"late")
    # data the server sent before it saw the reset crosses it on the wire: ignored
    late = data_frame(1, b"in flight")
    assert client.receive_data(late) == [] and client.data_to_send() == b""


def test_data_for_a_stream_never_opened_is_refused():
    server = SpdyConnection(server=True, flow_control=True)
    assert server.receive_data(data_frame(9, b"?")) == []
    refusal = server.data_to_send()
    assert refusal == control(3, struct.pack(">II", 9, RstStatus.INVALID_STREAM))


def test_data_after_the_peers_fin_resets_the_stream():
    client, server, rng = pair()
    client.syn_stream(1, {}, fin=True)
    pipe(client, server, rng)
    events = server.receive_data(data_frame(1, b"after fin"))
    assert events == [StreamReset(1, RstStatus.STREAM_ALREADY_CLOSED, remote=False)]
    assert server.data_to_send() == control(3, struct.pack(">II", 1, 9))


def test_pings_are_echoed_and_echoes_reported():
    client, server, rng = pair()
    assert client.ping() == 1 and client.ping() == 3
    assert pipe(client, server, rng) == [PingReceived(1), PingReceived(3)]
    assert pipe(server, client, rng) == [PingReceived(1, ack=True), PingReceived(3, ack=True)]
    assert server.ping() == 2
    assert pipe(server, client, rng) == [PingReceived(2)]
    with pytest.raises(ValueError):
        server.ping(5)  # odd ids are the client's


def test_goaway_both_ways():
    client, server, rng = pair()
    client.syn_stream(1, {})
    pipe(client, server, rng)
    server.goaway()
    assert pipe(server, client, rng) == [GoAwayReceived(1, GoAwayStatus.OK)]
    with pytest.raises(StreamClosedError):
        client.syn_stream(3, {})
    # a stream the peer opens after our GOAWAY is ignored, yet its header block is
    # still inflated: the next one decodes
    peer = SpdyConnection(server=False, flow_control=True)
    peer.syn_stream(1, {"a": "1"})
    other = SpdyConnection(server=True, flow_control=True)
    other.receive_data(peer.data_to_send())
    other.goaway()
    peer.syn_stream(3, {"b": "2"})
    peer.headers(1, {"c": "3"})
    assert other.receive_data(peer.data_to_send()) == [HeadersReceived(1, {"c": "3"}, False)]


def test_finished_streams_are_forgotten():
    client, server, rng = pair()
    for stream_id in range(1, 200, 2):
        client.syn_stream(stream_id, {"requestid": str(stream_id)})
        client.data(stream_id, b"ping", fin=True)
    for event in of(pipe(client, server, rng), StreamOpened):
        server.reply(event.stream_id, {})
        server.data(event.stream_id, b"pong", fin=True)
    assert len(of(pipe(server, client, rng), DataReceived)) == 100
    assert client.open_streams == server.open_streams == 0


# --- malformed input ----------------------------------------------------------------------------


def test_bad_version_is_a_protocol_error_and_final():
    server = SpdyConnection(server=True, flow_control=True)
    with pytest.raises(ProtocolError, match="version 2"):
        server.receive_data(control(6, struct.pack(">I", 1), version=2))
    with pytest.raises(ProtocolError, match="already failed"):
        server.receive_data(control(6, struct.pack(">I", 1)))
    server.goaway(status=GoAwayStatus.PROTOCOL_ERROR)  # still possible, to say goodbye
    assert server.data_to_send() == control(7, struct.pack(">II", 0, 1))


def test_bad_version_is_detected_from_the_frame_header_alone():
    with pytest.raises(ProtocolError, match="version"):
        SpdyConnection().receive_data(control(1, b"x" * 100, version=4)[:8])


@pytest.mark.parametrize(
    "wire, message",
    [
        (control(6, b"\x00\x00\x01"), "PING"),
        (control(3, struct.pack(">II", 1, 0)), "non-zero status"),
        (control(7, struct.pack(">I", 0)), "GOAWAY"),
        (control(9, struct.pack(">II", 0, 0)), "zero delta"),
        (control(4, struct.pack(">II", 2, 7)), "SETTINGS"),
        (data_frame(0, b"x"), "stream 0"),
        (control(1, struct.pack(">IIH", 2, 0, 0) + EMPTY_BLOCK), "invalid stream id"),
        (control(1, struct.pack(">IIH", 1, 0, 0) + b"not zlib"), "decompress"),
        (struct.pack(">HHI", 0x8003, 1, 5 << 20), "exceeds the limit"),
    ],
)
def test_malformed_frames_are_protocol_errors(wire, message):
    with pytest.raises(ProtocolError, match=message):
        SpdyConnection(server=True, flow_control=True).receive_data(wire)


class RawPeer:
    """Builds SYN_STREAMs by hand on its own zlib context, with no checks: a buggy peer."""

    def __init__(self) -> None:
        self.comp = zlib.compressobj(zdict=SPDY3_DICTIONARY)

    def syn_stream(self, stream_id: int, headers: dict[str, str], flags: int = 0) -> bytes:
        block = self.comp.compress(encode_header_block(headers))
        block += self.comp.flush(zlib.Z_SYNC_FLUSH)
        return control(1, struct.pack(">IIH", stream_id, 0, 0) + block, flags)


def test_stream_ids_must_increase():
    peer, server = RawPeer(), SpdyConnection(server=True, flow_control=True)
    (opened,) = server.receive_data(peer.syn_stream(5, {"a": "b"}))
    assert opened == StreamOpened(5, {"a": "b"})
    with pytest.raises(ProtocolError, match="does not increase"):
        server.receive_data(peer.syn_stream(3, {}))
    client = SpdyConnection(server=False, flow_control=True)
    client.syn_stream(5, {})
    with pytest.raises(ValueError):
        client.syn_stream(3, {})


def test_a_unidirectional_stream_takes_no_reply_or_data():
    peer, server = RawPeer(), SpdyConnection(server=True, flow_control=True)
    (opened,) = server.receive_data(peer.syn_stream(1, {}, flags=0x02))
    assert opened.unidirectional and server.open_streams == 1
    with pytest.raises(StreamClosedError):
        server.data(1, b"x")
    assert server.receive_data(data_frame(1, b"in", flags=1)) == [DataReceived(1, b"in", True)]
    assert server.open_streams == 0


def test_streams_opened_after_our_goaway_are_ignored_quietly():
    peer, server = RawPeer(), SpdyConnection(server=True, flow_control=True)
    server.receive_data(peer.syn_stream(1, {}))
    server.goaway()
    assert server.receive_data(peer.syn_stream(3, {}) + data_frame(3, b"x")) == []
    assert server.data_to_send() == control(7, struct.pack(">II", 1, 0))


def test_unknown_control_frames_are_skipped():
    server = SpdyConnection(server=True, flow_control=True)
    events = server.receive_data(control(10, b"credential") + control(6, struct.pack(">I", 1)))
    assert events == [PingReceived(1)]


def test_local_misuse_raises():
    client, server, rng = pair()
    client.syn_stream(1, {})
    pipe(client, server, rng)
    server.data(1, b"", fin=True)
    with pytest.raises(StreamClosedError):
        server.data(1, b"more")
    with pytest.raises(StreamClosedError):
        server.reply(7, {})
    with pytest.raises(ValueError):
        client.syn_stream(2, {})  # even ids are the server's
    with pytest.raises(ValueError):
        server.window_update(1, 0)
