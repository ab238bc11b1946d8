"""The adapter's PUBLISH fast path (ingest.mqtt.wire.take_publishes) against hand-built packets
and against paho's own reading of the same bytes (through its public callbacks and the socket
attribute the adapter itself relies on, listed in ingest.mqtt.guard)."""

from __future__ import annotations

import random
from collections import deque

import paho.mqtt.client as paho
import pytest

from ingest.mqtt.wire import Inbound, take_publishes

NO_LIMIT = 268_435_455  # the largest remaining length MQTT can express


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(
    topic: bytes, payload: bytes, *, qos: int = 1, mid: int = 7, props: bytes | None = None
) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic
    if qos:
        body += mid.to_bytes(2, "big")
    if props is not None:
        body += varint(len(props)) + props
    body += payload
    return bytes((0x30 | qos << 1,)) + varint(len(body)) + body


def take(
    buf: bytes, *, v5: bool = False, limit: int = 10**6, max_length: int = NO_LIMIT
) -> tuple[list[Inbound], int]:
    out: deque[Inbound] = deque()
    used = take_publishes(bytearray(buf), v5, out, limit, max_length)
    return list(out), used


def test_several_packets_in_order() -> None:
    data = (
        publish(b"devices/a/telemetry", b'{"x":1}', mid=1)
        + publish(b"devices/b/telemetry", b"", qos=0)
        + publish(b"d/c", b"p" * 300, mid=65535)
    )
    got, used = take(data)
    assert used == len(data)
    assert got == [
        ("devices/a/telemetry", b'{"x":1}', 1, 1, None),
        ("devices/b/telemetry", b"", 0, 0, None),
        ("d/c", b"p" * 300, 1, 65535, None),
    ]
    assert all(type(message[1]) is bytes for message in got)


def test_stops_before_an_incomplete_packet() -> None:
    whole = publish(b"t/1", b"abc", mid=1)
    nxt = publish(b"t/2", b"x" * 200, mid=2)
    for cut in range(len(nxt)):
        got, used = take(whole + nxt[:cut])
        assert used == len(whole)
        assert got == [("t/1", b"abc", 1, 1, None)]


def test_leaves_other_packets_to_paho() -> None:
    suback = bytes((0x90, 0x03, 0x00, 0x01, 0x01))
    pingresp = bytes((0xD0, 0x00))
    qos2 = publish(b"t", b"x", qos=2, mid=3)
    first = publish(b"t", b"1", mid=1)
    for other in (suback, pingresp, qos2):
        got, used = take(first + other + publish(b"t", b"2", mid=2))
        assert used == len(first)
        assert [m[1] for m in got] == [b"1"]


def test_inconsistent_packets_are_left_to_paho() -> None:
    # topic length beyond the packet; packet id 0 at QoS 1; a remaining length of 5 bytes.
    bad_topic = bytes((0x32, 0x04, 0x00, 0x09, 0x61, 0x62))
    mid_zero = publish(b"t", b"x", mid=0)
    too_long = bytes((0x32, 0xFF, 0xFF, 0xFF, 0xFF, 0x01))
    for bad in (bad_topic, mid_zero, too_long):
        got, used = take(bad)
        assert (got, used) == ([], 0)


def test_limit() -> None:
    data = b"".join(publish(b"t", str(i).encode(), mid=i + 1) for i in range(10))
    got, used = take(data, limit=4)
    assert [m[3] for m in got] == [1, 2, 3, 4]
    assert used == len(b"".join(publish(b"t", str(i).encode(), mid=i + 1) for i in range(4)))


def test_leaves_a_packet_over_the_length_limit() -> None:
    small = publish(b"t", b"x" * 10, mid=1)
    big = publish(b"t", b"y" * 100, mid=2)
    got, used = take(small + big + small, max_length=len(small) - 2)
    assert [m[3] for m in got] == [1]
    assert used == len(small)
    got, _ = take(big, max_length=2 + 1 + 2 + 100)  # exactly at the limit: taken
    assert [m[3] for m in got] == [2]


def test_v5_properties_are_skipped() -> None:
    props = bytes((0x01, 0x01)) + bytes((0x26,)) + b"\x00\x01k\x00\x01v"  # format + user prop
    data = publish(b"t/x", b"payload", mid=9, props=props) + publish(
        b"t/y", b"p2", qos=0, props=b""
    )
    got, used = take(data, v5=True)
    assert used == len(data)
    assert got == [("t/x", b"payload", 1, 9, None), ("t/y", b"p2", 0, 0, None)]


def test_v5_topic_alias_is_left_to_paho() -> None:
    got, used = take(publish(b"", b"x", mid=1, props=bytes((0x23, 0x00, 0x01))), v5=True)
    assert (got, used) == ([], 0)


def test_a_topic_that_is_not_utf8_does_not_raise() -> None:
    got, _ = take(publish(b"devices/\xff/telemetry", b"{}", mid=1))
    topic = got[0][0]
    assert topic.encode("utf-8", "surrogateescape") == b"devices/\xff/telemetry"
    with pytest.raises(UnicodeEncodeError):
        topic.encode()  # so it cannot reach the database as if it were a device id


class _BytesSocket:
    """A socket that holds ``data`` and then has nothing more (would block)."""

    def __init__(self, data: bytes) -> None:
        self._data = bytearray(data)

    def recv(self, size: int) -> bytes:
        if not self._data:
            raise BlockingIOError
        out = bytes(self._data[:size])
        del self._data[:size]
        return out

    def close(self) -> None:
        self._data.clear()


def paho_reads(data: bytes, *, v5: bool, packets: int) -> list[Inbound]:
    """What paho's own reader makes of ``data``: its on_message callbacks."""
    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]
        protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
    )
    client.manual_ack_set(True)  # nothing to send back: this socket cannot be written to
    got: list[Inbound] = []

    def on_message(_client: object, _userdata: object, msg: paho.MQTTMessage) -> None:
        got.append((msg.topic, bytes(msg.payload), msg.qos, msg.mid if msg.qos else 0, None))

    client.on_message = on_message
    client._sock = _BytesSocket(data)  # type: ignore[assignment]
    for _ in range(packets):
        assert client.loop_read() == paho.MQTT_ERR_SUCCESS
    client._sock = None
    return got


@pytest.mark.parametrize("v5", [False, True])
def test_agrees_with_paho(v5: bool) -> None:
    rng = random.Random(5)
    packets = []
    for _ in range(500):
        topic = "/".join(rng.choice(["dev", "é", "x" * rng.randint(1, 40)]) for _ in range(3))
        payload = rng.randbytes(rng.choice([0, 1, 127, 128, 16383, 16384, 70000]))
        qos = rng.randint(0, 1)
        # v5: no properties, or a payload format indicator and a user property.
        props = rng.choice([b"", bytes((0x01, 0x01, 0x26, 0, 1, 0x6B, 0, 2, 0x76, 0x76))])
        packets.append(
            publish(
                topic.encode(),
                payload,
                qos=qos,
                mid=rng.randint(1, 65535),
                props=props if v5 else None,
            )
        )
    data = b"".join(packets)
    got, used = take(data, v5=v5)
    assert used == len(data)
    assert got == paho_reads(data, v5=v5, packets=len(packets))
