"""A PUBLISH over the payload limit, read in pieces (ingest.mqtt.wire.PartialPublish): what is
kept, what is counted, whatever the sizes of the pieces it arrives in."""

from __future__ import annotations

import pytest

from ingest.mqtt.wire import MalformedPublish, PartialPublish, oversized_publish, read_varint
from tests.unit.mqtt.test_session_parse import publish

KEEP = 64


def read_in_pieces(
    packet: bytes, piece: int, *, v5: bool = False, max_payload: int = 100
) -> PartialPublish:
    """Feed ``packet`` (fixed header included) in pieces of ``piece`` bytes."""
    remaining, header_end = read_varint(bytearray(packet), 1, len(packet))
    partial = PartialPublish(packet[0], remaining, v5=v5, max_payload=max_payload, keep=KEEP)
    rest = bytearray(packet[header_end:])
    while rest:
        chunk = bytearray(rest[:piece])
        used = partial.feed(chunk)
        assert used == len(chunk)
        del rest[:piece]
    assert partial.done
    return partial


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 64, 1000, 10**6])
def test_keeps_the_start_and_counts_the_rest(piece: int) -> None:
    payload = bytes(range(256)) * 4
    partial = read_in_pieces(publish(b"devices/d1/telemetry", payload, mid=513), piece)
    assert partial.inbound() == ("devices/d1/telemetry", payload[:KEEP], 1, 513, len(payload))


@pytest.mark.parametrize("piece", [1, 5, 4096])
def test_v5_properties_are_skipped_not_kept(piece: int) -> None:
    props = bytes((0x26, 0, 1, 0x6B, 0, 200)) + b"v" * 200  # a user property of 200 bytes
    payload = b"p" * 500
    partial = read_in_pieces(
        publish(b"t/x", payload, qos=0, props=props), piece, v5=True, max_payload=100
    )
    assert partial.inbound() == ("t/x", b"p" * KEEP, 0, 0, 500)


def test_within_the_payload_limit_after_all_it_is_kept_whole() -> None:
    # The reader looks at the remaining length, which counts the topic: a payload within the
    # limit whose topic pushed the packet over it is a normal message.
    payload = b"z" * 90
    partial = read_in_pieces(publish(b"a" * 50, payload, mid=1), 9, max_payload=100)
    assert partial.inbound() == ("a" * 50, payload, 1, 1, None)


def test_stops_at_the_end_of_its_packet() -> None:
    packet = publish(b"t", b"x" * 300, mid=1)
    following = publish(b"t", b"next", mid=2)
    remaining, header_end = read_varint(bytearray(packet), 1, len(packet))
    partial = PartialPublish(packet[0], remaining, v5=False, max_payload=100, keep=KEEP)
    data = bytearray(packet[header_end:] + following)
    assert partial.feed(data) == len(packet) - header_end
    assert partial.done


def test_memory_stays_bounded_by_what_is_kept() -> None:
    topic = b"t"
    size = 50_000_000
    head = publish(topic, b"", mid=1)  # header for an empty payload; the length is patched in
    body_len = 2 + len(topic) + 2 + size
    partial = PartialPublish(0x32, body_len, v5=False, max_payload=1000, keep=KEEP)
    partial.feed(bytearray(head[2:]))  # topic and packet id
    chunk = bytearray(65536)
    left = size
    while left:
        step = min(left, len(chunk))
        partial.feed(chunk if step == len(chunk) else bytearray(step))
        left -= step
        assert len(partial.payload) <= KEEP
    assert partial.inbound()[4] == size


@pytest.mark.parametrize(
    "body",
    [
        b"\x00\x09ab",  # a topic longer than the packet
        b"\x00\x01t\x00\x00" + b"x" * 200,  # packet id 0 at QoS 1
    ],
)
def test_malformed_packets_are_refused(body: bytes) -> None:
    partial = PartialPublish(0x32, len(body), v5=False, max_payload=100, keep=KEEP)
    with pytest.raises(MalformedPublish):
        partial.feed(bytearray(body))


def test_oversized_publish_looks_only_at_the_fixed_header() -> None:
    big = publish(b"t", b"x" * 1000, mid=1)
    assert oversized_publish(bytearray(big[:3]), 100) == 1000 + 5  # the rest need not be there
    assert oversized_publish(bytearray(big[:1]), 100) == -1  # remaining length incomplete
    assert oversized_publish(bytearray(), 100) == -1
    assert oversized_publish(bytearray(publish(b"t", b"x" * 10, mid=1)), 100) == 0
    assert oversized_publish(bytearray(b"\x90\x03\x00\x01\x01"), 1) == 0  # a SUBACK: paho's
    assert oversized_publish(bytearray(b"\x32\xff\xff\xff\xff\x01"), 1) == 0  # malformed: paho's
