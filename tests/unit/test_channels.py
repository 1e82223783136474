"""The Kubernetes WebSocket channel layer (cri_py.streaming.channels), all in memory.

A wsproto CLIENT connection plays kubectl: its handshake request is parsed by h11 as
the streaming server does, handed to the codec, and every byte either side produces
is fed straight to the other. No sockets, no containers.
"""

from __future__ import annotations

import base64
import json

import h11
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)

from cri_py.streaming.channels import (
    BASE64,
    CHANNEL,
    ERROR,
    RESIZE,
    STDERR,
    STDIN,
    STDOUT,
    V4_BASE64,
    V4_CHANNEL,
    V5_CHANNEL,
    ChannelClosed,
    ChannelCodec,
    ChannelData,
    Closed,
    HandshakeRejected,
    Kind,
    Resize,
    choose_subprotocol,
    parse_port_query,
    port_prefix,
    portforward_channels,
    status_json,
)

# --- harness --------------------------------------------------------------------------


def parse_request(raw: bytes) -> tuple[h11.Request, bytes]:
    """What the streaming server does before the hand-over: h11 parses the request."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    request = conn.next_event()
    assert isinstance(request, h11.Request)
    return request, conn.trailing_data[0]


def client_request(offered: list[str], target: str = "/exec/token") -> tuple[WSConnection, bytes]:
    client = WSConnection(ConnectionType.CLIENT)
    raw = client.send(Request(host="127.0.0.1:10010", target=target, subprotocols=offered))
    return client, raw


def connect(
    offered: list[str], kind: Kind = "exec", target: str = "/exec/token"
) -> tuple[ChannelCodec, WSConnection, AcceptConnection]:
    client, raw = client_request(offered, target)
    request, trailing = parse_request(raw)
    assert trailing == b""
    codec = ChannelCodec(kind)
    client.receive_data(codec.accept_upgrade(request))
    events = list(client.events())
    assert len(events) == 1 and isinstance(events[0], AcceptConnection)
    return codec, client, events[0]


def client_events(client: WSConnection, data: bytes) -> list[Event]:
    client.receive_data(data)
    return list(client.events())


def push(codec: ChannelCodec, client: WSConnection, *events: Event) -> list[object]:
    """Client events → bytes → codec events."""
    return codec.receive_data(b"".join(client.send(e) for e in events))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def joined(events: list[object], channel: int) -> bytes:
    return b"".join(e.payload for e in events if isinstance(e, ChannelData) and e.channel == channel)


# --- negotiation ----------------------------------------------------------------------


def test_choose_prefers_newest_whatever_the_client_order() -> None:
    offered = [BASE64, CHANNEL, V4_BASE64, V4_CHANNEL, V5_CHANNEL]
    assert choose_subprotocol(offered, "exec") == V5_CHANNEL
    assert choose_subprotocol(offered, "attach") == V5_CHANNEL
    assert choose_subprotocol([CHANNEL, V4_BASE64], "exec") == V4_BASE64
    assert choose_subprotocol([BASE64, CHANNEL], "exec") == CHANNEL
    assert choose_subprotocol([BASE64], "exec") == BASE64


def test_choose_portforward_speaks_v4_only() -> None:
    assert choose_subprotocol([V5_CHANNEL, V4_CHANNEL], "portforward") == V4_CHANNEL
    assert choose_subprotocol([V4_BASE64], "portforward") == V4_BASE64
    assert choose_subprotocol([V5_CHANNEL, CHANNEL], "portforward") is None


def test_choose_no_offer_is_plain_binary_and_unknown_is_refused() -> None:
    assert choose_subprotocol([], "exec") == ""
    assert choose_subprotocol(["v9.channel.k8s.io", "chat"], "exec") is None


def test_handshake_negotiates_v5() -> None:
    codec, client, accept = connect([V5_CHANNEL, V4_CHANNEL, BASE64])
    assert accept.subprotocol == V5_CHANNEL
    assert codec.subprotocol == V5_CHANNEL
    assert codec.is_open and codec.supports_close_signal and codec.json_status
    assert not codec.base64
    assert client.state is ConnectionState.OPEN


def test_handshake_without_subprotocol_uses_binary_pre_v4() -> None:
    codec, _client, accept = connect([])
    assert accept.subprotocol is None
    assert codec.subprotocol == ""
    assert not codec.base64 and not codec.json_status and not codec.supports_close_signal


def test_handshake_refuses_unsupported_subprotocols_with_a_response() -> None:
    client, raw = client_request(["v9.channel.k8s.io"])
    request, _ = parse_request(raw)
    codec = ChannelCodec("exec")
    with pytest.raises(HandshakeRejected) as info:
        codec.accept_upgrade(request)
    assert info.value.status_code == 400
    assert b"not supported" in info.value.response
    events = client_events(client, info.value.response)
    assert isinstance(events[0], RejectConnection) and events[0].status_code == 400
    assert codec.subprotocol is None and not codec.is_open


def test_handshake_refuses_a_malformed_upgrade() -> None:
    raw = (
        b"GET /exec/token HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n"  # no key
    )
    request, _ = parse_request(raw)
    with pytest.raises(HandshakeRejected) as info:
        ChannelCodec("exec").accept_upgrade(request)
    assert info.value.status_code == 400
    assert info.value.response.startswith(b"HTTP/1.1 400 Bad Request\r\n")


def test_handshake_refuses_a_wrong_version_with_426() -> None:
    raw = (
        b"GET /exec/token HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n"
    )
    request, _ = parse_request(raw)
    with pytest.raises(HandshakeRejected) as info:
        ChannelCodec("exec").accept_upgrade(request)
    assert info.value.status_code == 426
    assert b"Sec-WebSocket-Version: 13" in info.value.response


def test_trailing_data_after_the_request_is_fed_afterwards() -> None:
    client, raw = client_request([V4_CHANNEL])
    request, _ = parse_request(raw)
    codec = ChannelCodec("exec")
    client.receive_data(codec.accept_upgrade(request))
    list(client.events())
    # a client pipelining its first frame: the server's h11 holds it as trailing data
    frame = client.send(BytesMessage(b"\x00early"))
    _, trailing = parse_request(raw + frame)
    assert trailing == frame
    assert codec.receive_data(trailing) == [ChannelData(STDIN, b"early")]


def test_receive_before_accept_is_a_caller_bug() -> None:
    with pytest.raises(Exception):
        ChannelCodec("exec").receive_data(b"x")


# --- framing --------------------------------------------------------------------------


@pytest.mark.parametrize("subprotocol", [V5_CHANNEL, V4_CHANNEL, CHANNEL, ""])
def test_binary_frames_both_ways(subprotocol: str) -> None:
    codec, client, _ = connect([subprotocol] if subprotocol else [])
    assert push(codec, client, BytesMessage(b"\x00echo hi\n")) == [ChannelData(STDIN, b"echo hi\n")]
    events = client_events(client, codec.send(STDOUT, b"hi\n") + codec.send(STDERR, b"\xff\x00"))
    assert [type(e) for e in events] == [BytesMessage, BytesMessage]
    assert [bytes(e.data) for e in events] == [b"\x01hi\n", b"\x02\xff\x00"]


@pytest.mark.parametrize("subprotocol", [V4_BASE64, BASE64])
def test_base64_frames_both_ways(subprotocol: str) -> None:
    codec, client, _ = connect([subprotocol])
    assert codec.base64
    payload = bytes(range(256))
    assert push(codec, client, TextMessage("0" + b64(payload))) == [ChannelData(STDIN, payload)]
    events = client_events(client, codec.send(STDOUT, b"\n"))
    assert isinstance(events[0], TextMessage) and events[0].data == "1Cg=="  # the Go doc's example


def test_base64_tolerates_line_breaks_and_drops_corrupt_messages() -> None:
    codec, client, _ = connect([V4_BASE64])
    assert push(codec, client, TextMessage("0Zm9v\r\nYmFy")) == [ChannelData(STDIN, b"foobar")]
    assert push(codec, client, TextMessage("0!!!!")) == []
    assert push(codec, client, TextMessage("0Zm9")) == []  # unpadded tail: invalid
    assert push(codec, client, TextMessage("0YQ==")) == [ChannelData(STDIN, b"a")]


def test_empty_messages_are_ignored() -> None:
    codec, client, _ = connect([V5_CHANNEL])
    assert push(codec, client, BytesMessage(b""), BytesMessage(b"\x00")) == []


def test_fragmented_binary_message_is_delivered_in_order() -> None:
    codec, client, _ = connect([V4_CHANNEL])
    events = push(
        codec,
        client,
        BytesMessage(b"", message_finished=False),  # even the channel byte comes late
        BytesMessage(b"\x00he", message_finished=False),
        BytesMessage(b"l", message_finished=False),
        BytesMessage(b"lo"),
        BytesMessage(b"\x00!"),
    )
    assert all(isinstance(e, ChannelData) and e.channel == STDIN for e in events)
    assert joined(events, STDIN) == b"hello!"


def test_fragmented_base64_message_splits_inside_a_quantum() -> None:
    codec, client, _ = connect([V4_BASE64])
    text = "0" + b64(b"fragmented stdin")
    pieces = [text[:1], text[1:4], text[4:9], text[9:]]
    events = push(
        codec,
        client,
        *(TextMessage(p, message_finished=False) for p in pieces[:-1]),
        TextMessage(pieces[-1]),
    )
    assert joined(events, STDIN) == b"fragmented stdin"


def test_bytes_fed_one_at_a_time() -> None:
    codec, client, _ = connect([V5_CHANNEL])
    wire = client.send(BytesMessage(b"\x00abc", message_finished=False)) + client.send(BytesMessage(b"def"))
    wire += client.send(BytesMessage(b"\x04" + b'{"Width":80,"Height":24}'))
    events: list[object] = []
    for i in range(len(wire)):
        events += codec.receive_data(wire[i : i + 1])
    assert joined(events, STDIN) == b"abcdef"
    assert [e for e in events if isinstance(e, Resize)] == [Resize(80, 24)]


def test_large_stdin_is_streamed_not_buffered() -> None:
    codec, client, _ = connect([V4_CHANNEL])
    payload = bytes(range(256)) * 4096  # 1 MiB
    wire = client.send(BytesMessage(b"\x00" + payload))
    events: list[object] = []
    for start in range(0, len(wire), 65536):
        events += codec.receive_data(wire[start : start + 65536])
    assert len(events) > 1
    assert joined(events, STDIN) == payload


def test_text_frames_under_binary_protocol_carry_raw_bytes() -> None:
    # the Go server reads any message as bytes; the subprotocol alone picks the codec
    codec, client, _ = connect([V4_CHANNEL])
    assert push(codec, client, TextMessage("\x00hi")) == [ChannelData(STDIN, b"hi")]


def test_send_checks_the_channel_range() -> None:
    codec, _client, _ = connect([V4_CHANNEL])
    with pytest.raises(ValueError):
        codec.send(255, b"")
    b64codec, _client, _ = connect([V4_BASE64])
    with pytest.raises(ValueError):
        b64codec.send(80, b"")  # chr(48 + 80) would not be ASCII


def test_ready_frame_is_an_empty_message_on_the_lowest_writable_channel() -> None:
    codec, client, _ = connect([V5_CHANNEL])
    events = client_events(client, codec.ready_frames([ERROR, STDERR, STDOUT]))
    assert [bytes(e.data) for e in events] == [b"\x01"]
    events = client_events(client, codec.ready_frames([ERROR, STDERR]))
    assert [bytes(e.data) for e in events] == [b"\x02"]
    assert codec.ready_frames([]) == b""
    b64codec, b64client, _ = connect([BASE64])
    events = client_events(b64client, b64codec.ready_frames([ERROR]))
    assert [e.data for e in events] == ["3"]


# --- resize ---------------------------------------------------------------------------


def test_resize_json_is_parsed() -> None:
    codec, client, _ = connect([V5_CHANNEL])
    assert push(codec, client, BytesMessage(b'\x04{"Width":120,"Height":40}\n')) == [Resize(120, 40)]
    assert push(codec, client, BytesMessage(b'\x04{"width":1, "HEIGHT":2}')) == [Resize(1, 2)]


def test_resize_is_a_json_stream_across_and_within_messages() -> None:
    # every message names its channel; the JSON stream continues across them
    codec, client, _ = connect([V4_CHANNEL])
    assert push(codec, client, BytesMessage(b'\x04{"Width":1')) == []
    assert push(codec, client, BytesMessage(b'\x0400,"Height":50}{"Width":7,')) == [Resize(100, 50)]
    assert push(codec, client, BytesMessage(b'\x04"Height":8}')) == [Resize(7, 8)]


def test_resize_skips_invalid_sizes_and_recovers_from_garbage() -> None:
    codec, client, _ = connect([V5_CHANNEL])
    bad = [b'{"Width":0,"Height":24}', b'{"Width":80}', b'{"Width":70000,"Height":1}',
           b'{"Width":80.5,"Height":24}', b'{"Width":true,"Height":24}', b"[80,24]", b"}garbage"]
    for item in bad:
        assert push(codec, client, BytesMessage(b"\x04" + item)) == []
    assert push(codec, client, BytesMessage(b'\x04{"Width":80,"Height":24}')) == [Resize(80, 24)]


def test_resize_base64() -> None:
    codec, client, _ = connect([V4_BASE64])
    message = "4" + b64(b'{"Width":132,"Height":43}')
    assert push(codec, client, TextMessage(message)) == [Resize(132, 43)]


def test_channel_4_is_plain_data_for_portforward() -> None:
    codec, client, _ = connect([V4_CHANNEL], kind="portforward", target="/portforward/t?port=1,2,3")
    assert push(codec, client, BytesMessage(b'\x04{"Width":1,"Height":1}')) == [
        ChannelData(4, b'{"Width":1,"Height":1}')
    ]


# --- v5 half-close --------------------------------------------------------------------


def test_v5_close_signal() -> None:
    codec, client, _ = connect([V5_CHANNEL])
    events = push(codec, client, BytesMessage(b"\x00last"), BytesMessage(bytes([255, STDIN])))
    assert events == [ChannelData(STDIN, b"last"), ChannelClosed(STDIN)]
    # fragmented signal
    events = push(codec, client, BytesMessage(b"\xff", message_finished=False), BytesMessage(b"\x00"))
    assert events == [ChannelClosed(STDIN)]
    assert codec.is_open


def test_v4_has_no_close_signal_so_255_is_just_a_channel() -> None:
    codec, client, _ = connect([V4_CHANNEL])
    assert push(codec, client, BytesMessage(bytes([255, 0]))) == [ChannelData(255, b"\x00")]
    assert codec.close_channel(STDOUT) == b""


@pytest.mark.parametrize("signal", [b"\xff", b"\xff\x00\x00"])
def test_malformed_close_signal_is_a_protocol_error(signal: bytes) -> None:
    codec, client, _ = connect([V5_CHANNEL])
    events = push(codec, client, BytesMessage(signal), BytesMessage(b"\x00ignored"))
    assert events == [Closed(1002, "a stream close signal is [255, channel]")]
    replies = client_events(client, codec.data_to_send())
    assert isinstance(replies[0], CloseConnection) and replies[0].code == 1002
    assert codec.receive_data(client.send(replies[0].response())) == []  # done parsing
    assert codec.send(STDOUT, b"late") == b""


def test_server_close_channel_under_v5() -> None:
    codec, client, _ = connect([V5_CHANNEL])
    events = client_events(client, codec.close_channel(STDOUT))
    assert [bytes(e.data) for e in events] == [b"\xff\x01"]


# --- control frames -------------------------------------------------------------------


def test_ping_is_answered_through_the_outbox() -> None:
    codec, client, _ = connect([V5_CHANNEL])
    assert push(codec, client, Ping(b"k8s-heartbeat"), BytesMessage(b"\x00x")) == [ChannelData(0, b"x")]
    pong = codec.data_to_send()
    assert codec.data_to_send() == b""
    assert client_events(client, pong) == [Pong(b"k8s-heartbeat")]


def test_server_ping_and_client_pong() -> None:
    codec, client, _ = connect([V4_CHANNEL])
    events = client_events(client, codec.ping(b"are you there"))
    assert events == [Ping(b"are you there")]
    assert push(codec, client, events[0].response()) == []


def test_client_initiated_close() -> None:
    codec, client, _ = connect([V5_CHANNEL])
    events = push(codec, client, BytesMessage(b"\x00bye\n"), CloseConnection(1000, "done"))
    assert events == [ChannelData(STDIN, b"bye\n"), Closed(1000, "done")]
    assert not codec.is_open
    reply = client_events(client, codec.data_to_send())
    assert isinstance(reply[0], CloseConnection) and reply[0].code == 1000
    assert client.state is ConnectionState.CLOSED
    assert codec.send(STDOUT, b"too late") == b""
    assert codec.close() == b""


def test_server_initiated_close() -> None:
    codec, client, _ = connect([V4_CHANNEL])
    out = codec.send_status(0) + codec.close(1000, "exited")
    events = client_events(client, out)
    assert bytes(events[0].data) == b'\x03{"metadata":{},"status":"Success"}'
    assert isinstance(events[1], CloseConnection) and (events[1].code, events[1].reason) == (1000, "exited")
    assert not codec.is_open and codec.send(STDOUT, b"x") == b""
    assert codec.close() == b""  # only once
    assert codec.receive_data(client.send(events[1].response())) == [Closed(1000, "exited")]
    assert codec.data_to_send() == b""  # the handshake is complete: nothing to answer


def test_transport_eof_is_abnormal_closure() -> None:
    codec, client, _ = connect([V4_CHANNEL])
    assert codec.receive_data(b"") == [Closed(1006, "")]
    assert codec.data_to_send() == b""
    assert codec.receive_data(b"") == []


def test_framing_violation_closes_with_wsproto_code() -> None:
    codec, _client, _ = connect([V4_CHANNEL])
    unmasked = b"\x82\x02\x00x"  # a client frame must be masked
    events = codec.receive_data(unmasked)
    assert len(events) == 1 and isinstance(events[0], Closed) and events[0].code == 1002
    assert codec.data_to_send().startswith(b"\x88")  # our close frame


# --- port-forward ---------------------------------------------------------------------


def test_port_query_parsing() -> None:
    assert parse_port_query("/portforward/tok?port=8080,9090") == [8080, 9090]
    assert parse_port_query(b"/portforward/tok?port=80&port=443,5432") == [80, 443, 5432]
    for bad in ["/pf", "/pf?port=", "/pf?port=0", "/pf?port=65536", "/pf?port=http", "/pf?port=1,,2"]:
        with pytest.raises(ValueError):
            parse_port_query(bad)


def test_portforward_channels_and_prefix() -> None:
    assert portforward_channels([8080, 9090]) == [(0, 1, 8080), (2, 3, 9090)]
    assert port_prefix(8080) == b"\x90\x1f"
    assert port_prefix(1) == b"\x01\x00"
    with pytest.raises(ValueError):
        port_prefix(0)


def test_portforward_session() -> None:
    target = "/portforward/tok?port=8080,9090"
    codec, client, accept = connect([V4_CHANNEL], kind="portforward", target=target)
    assert accept.subprotocol == V4_CHANNEL
    ports = parse_port_query(target)
    events = client_events(client, codec.portforward_ready_frames(ports))
    assert [bytes(e.data) for e in events] == [b"\x00\x90\x1f", b"\x01\x90\x1f", b"\x02\x82\x23", b"\x03\x82\x23"]
    assert push(codec, client, BytesMessage(b"\x02GET / HTTP/1.0\r\n\r\n")) == [
        ChannelData(2, b"GET / HTTP/1.0\r\n\r\n")
    ]


def test_portforward_base64_prefix() -> None:
    codec, client, _ = connect([V4_BASE64], kind="portforward", target="/pf?port=8080")
    events = client_events(client, codec.portforward_ready_frames([8080]))
    assert [e.data for e in events] == ["0" + b64(b"\x90\x1f"), "1" + b64(b"\x90\x1f")]


# --- status ---------------------------------------------------------------------------


def test_status_json_success() -> None:
    assert status_json(0) == b'{"metadata":{},"status":"Success"}'
    assert status_json(None) == b'{"metadata":{},"status":"Success"}'


def test_status_json_exit_code_3() -> None:
    raw = status_json(3)
    assert raw == (
        b'{"metadata":{},"status":"Failure",'
        b'"message":"command terminated with non-zero exit code: exit status 3",'
        b'"reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}'
    )
    custom = json.loads(status_json(3, "error executing command [sh -c exit 3], exit code 3"))
    assert custom["message"].endswith("[sh -c exit 3], exit code 3")


def test_status_json_internal_error() -> None:
    status = json.loads(status_json(None, "container not running"))
    assert status["status"] == "Failure" and status["reason"] == "InternalError"
    assert status["code"] == 500
    assert status["message"] == "Internal error occurred: container not running"
    assert status["details"] == {"causes": [{"message": "container not running"}]}


def test_send_status_speaks_each_protocol_dialect() -> None:
    v5, v5_client, _ = connect([V5_CHANNEL])
    [event] = client_events(v5_client, v5.send_status(3))
    assert bytes(event.data) == b"\x03" + status_json(3)
    old, old_client, _ = connect([CHANNEL])
    assert old.send_status(0) == b""
    [event] = client_events(old_client, old.send_status(3))
    assert bytes(event.data) == b"\x03command terminated with non-zero exit code: exit status 3"
    b64old, b64_client, _ = connect([BASE64])
    [event] = client_events(b64_client, b64old.send_status(None, "boom"))
    assert event.data == "3" + b64(b"Internal error occurred: boom")


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError):
        ChannelCodec("logs")  # type: ignore[arg-type]


def test_every_event_type_is_hashable_and_comparable() -> None:
    assert {ChannelData(0, b"a"), Resize(1, 2), ChannelClosed(0), Closed(1000, "")}
    assert RESIZE == 4
