"""The simulator's MQTT 3.1.1 packets (the codec shared with the daemon, ingest/mqtt/wire.py),
its connection protocol and its TLS context (no sockets)."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque

import pytest

from ingest.mqtt import wire
from simulators._mqtt import (
    Connection,
    PacketReader,
    ProtocolError,
    connect_packet,
    publish_packet,
    topic_field,
)

# MQTT 3.1.1, table 2.4: remaining length boundaries.
VARINTS = [
    (0, b"\x00"),
    (127, b"\x7f"),
    (128, b"\x80\x01"),
    (16_383, b"\xff\x7f"),
    (16_384, b"\x80\x80\x01"),
    (2_097_151, b"\xff\xff\x7f"),
    (2_097_152, b"\x80\x80\x80\x01"),
    (268_435_455, b"\xff\xff\xff\x7f"),
]


@pytest.mark.parametrize(("n", "encoded"), VARINTS)
def test_remaining_length_encodes_as_the_daemon_reads_it(n: int, encoded: bytes) -> None:
    assert wire.encode_varint(n) == encoded
    buf = bytearray(encoded + b"rest")
    assert wire.read_varint(buf, 0, len(buf)) == (n, len(encoded))
    assert wire.read_varint(bytearray(encoded[:-1]), 0, len(encoded) - 1)[0] == -1


def test_every_short_length_round_trips() -> None:
    for n in range(0, 40_000, 7):
        buf = bytearray(wire.encode_varint(n))
        assert wire.read_varint(buf, 0, len(buf)) == (n, len(buf))


def test_remaining_length_limits() -> None:
    with pytest.raises(ValueError):
        wire.encode_varint(268_435_456)
    with pytest.raises(ValueError):
        wire.encode_varint(-1)
    with pytest.raises(ProtocolError):
        PacketReader().feed(b"\x40\xff\xff\xff\xff\x01")
    assert PacketReader().feed(b"\x40\xff\xff\xff") == []  # not known yet: wait


def test_connect_packet() -> None:
    assert connect_packet("c1", keepalive=30) == (b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x1e\x00\x02c1")
    packet = connect_packet("c1", keepalive=60, username="u", password="p@ss")
    assert packet[9] == 0xC2  # user name, password, clean session
    assert packet.endswith(b"\x00\x02c1\x00\x01u\x00\x04p@ss")
    assert packet[1] == len(packet) - 2
    assert connect_packet("c1", keepalive=1, password="p")[9] == 0x02  # no password alone


def test_publish_packets_are_what_the_daemon_parses() -> None:
    topic = topic_field("devices/dev-00001/telemetry")
    assert topic[:2] == (27).to_bytes(2, "big")
    qos0 = publish_packet(topic, b'{"x":1}')
    assert qos0 == b"\x30" + bytes((len(topic) + 7,)) + topic + b'{"x":1}'
    qos1 = publish_packet(topic, b'{"x":1}', 0x1234)
    assert qos1 == b"\x32" + bytes((len(topic) + 9,)) + topic + b"\x12\x34" + b'{"x":1}'
    big = publish_packet(topic, b"x" * 20_000, 1)
    buf = bytearray(qos0 + qos1 + big)
    out: deque[wire.Inbound] = deque()
    taken = wire.take_publishes(buf, False, out, 10, 1 << 20)
    assert taken == len(buf)
    assert [(t, p, q, m) for t, p, q, m, _size in out] == [
        ("devices/dev-00001/telemetry", b'{"x":1}', 0, 0),
        ("devices/dev-00001/telemetry", b'{"x":1}', 1, 0x1234),
        ("devices/dev-00001/telemetry", b"x" * 20_000, 1, 1),
    ]


def test_topics_are_utf8() -> None:
    assert topic_field("d/é") == b"\x00\x04d/\xc3\xa9"


def test_packet_reader_reassembles_packets_split_anywhere() -> None:
    stream = b"\x20\x02\x00\x00" + b"\x40\x02\x00\x01" + b"\xd0\x00" + b"\x40\x02\xff\xff"
    stream += b"\x30" + wire.encode_varint(300) + b"y" * 300
    expected = [
        (0x20, b"\x00\x00"),
        (0x40, b"\x00\x01"),
        (0xD0, b""),
        (0x40, b"\xff\xff"),
        (0x30, b"y" * 300),
    ]
    assert PacketReader().feed(stream) == expected
    for cut in range(1, len(stream)):
        reader = PacketReader()
        assert reader.feed(stream[:cut]) + reader.feed(stream[cut:]) == expected
    reader = PacketReader()
    assert [p for byte in stream for p in reader.feed(bytes((byte,)))] == expected


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


def connection() -> tuple[Connection, FakeTransport, list[object]]:
    acked: list[object] = []
    conn = Connection(acked.append, lambda _c: None)
    transport = FakeTransport()
    conn.connection_made(transport)
    return conn, transport, acked


def test_pubacks_resolve_their_tokens_however_the_bytes_arrive() -> None:
    async def scenario() -> None:
        conn, transport, acked = connection()
        mids = [conn.next_mid() for _ in range(300)]
        assert mids == list(range(1, 301))
        for mid in mids:
            conn.inflight[mid] = f"token-{mid}"
        stream = b"".join(b"\x40\x02" + mid.to_bytes(2, "big") for mid in mids)
        stream = stream[:40] + b"\xd0\x00" + stream[40:]  # a PINGRESP in between
        stream += b"\x40\x02\x7f\x7f"  # an id not in flight: ignored
        cuts = [0, 1, 3, 41, 42, 43, 44, 1001, 1002, len(stream)]
        for a, b in itertools.pairwise(cuts):
            conn.data_received(stream[a:b])
        conn.data_received(stream)  # a replay: those ids are no longer in flight
        assert acked == [f"token-{m}" for m in mids]
        assert len(acked) == len(mids) and not conn.inflight
        assert not transport.aborted

    asyncio.run(scenario())


def test_pubacks_split_in_the_middle_are_reassembled() -> None:
    async def scenario() -> None:
        conn, _transport, acked = connection()
        for mid in (1, 2, 3):
            conn.inflight[mid] = mid
        stream = b"\x40\x02\x00\x01\x40\x02\x00\x02\x40\x02\x00\x03"
        for i in range(len(stream)):
            conn.data_received(stream[i : i + 1])
        assert acked == [1, 2, 3]

    asyncio.run(scenario())


def test_packet_ids_skip_those_in_flight_and_wrap() -> None:
    async def scenario() -> None:
        conn, _transport, _acked = connection()
        conn.inflight[2] = "busy"
        assert [conn.next_mid() for _ in range(3)] == [1, 3, 4]
        conn._mid = 65_534
        assert [conn.next_mid() for _ in range(3)] == [65_535, 1, 3]

    asyncio.run(scenario())


def test_an_unexpected_packet_drops_the_connection() -> None:
    async def scenario() -> None:
        conn, transport, _acked = connection()
        conn.data_received(b"\x30\x03\x00\x01x")  # a PUBLISH: we never subscribed
        assert transport.aborted and conn.error is not None and "unexpected" in conn.error

    asyncio.run(scenario())
