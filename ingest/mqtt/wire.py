"""The MQTT wire codec shared by the daemon and the simulator (no I/O, no paho).

``take_publishes`` is the daemon's PUBLISH fast path: it parses complete QoS 0/1 PUBLISH
packets out of the session's read buffer (see ``ingest.mqtt.session``). ``read_varint`` reads
the variable byte integers of MQTT 3.1.1 §2.2.3 / MQTT 5 §1.5.5.
"""

from __future__ import annotations

from collections import deque

__all__ = [
    "DISCONNECT",
    "PINGREQ",
    "Inbound",
    "connect_packet",
    "encode_string",
    "encode_varint",
    "publish_packet",
    "read_varint",
    "take_publishes",
]

# (topic, payload, qos, mid): the fields we need of a paho MQTTMessage.
Inbound = tuple[str, bytes, int, int]


def take_publishes(buf: bytearray, v5: bool, out: deque[Inbound], limit: int) -> int:
    """Parse the complete QoS 0/1 PUBLISH packets at the front of ``buf`` into ``out`` (at most
    ``limit``) and return how many bytes they took; the caller deletes them from ``buf``.

    Stops at the first packet it does not take: another type, QoS 2, a v5 topic alias, an
    incomplete or inconsistent packet. paho reads that one (and reports a malformed packet the
    way it always does). A topic that is not UTF-8 (a broker should never forward one) is
    decoded with surrogate escapes: it becomes a dead letter downstream, not a crash.
    """
    pos = 0
    end_of_data = len(buf)
    taken = 0
    append = out.append
    while taken < limit and pos < end_of_data:
        first = buf[pos]
        if first & 0xF0 != 0x30:
            break
        qos = (first >> 1) & 0x03
        if qos > 1:
            break
        length, i = read_varint(buf, pos + 1, end_of_data)  # the remaining length
        if length < 0:
            break
        end = i + length
        if end > end_of_data or length < 2:
            break
        topic_end = i + 2 + ((buf[i] << 8) | buf[i + 1])
        start = topic_end + 2 if qos else topic_end
        if start > end or topic_end == i + 2:
            break  # inconsistent, or an empty topic (a v5 topic alias): paho's call
        mid = (buf[topic_end] << 8) | buf[topic_end + 1] if qos else 0
        if qos and mid == 0:
            break  # a QoS 1 packet id must not be 0: paho's call
        if v5:  # properties: a length (variable byte integer) and that many bytes, skipped
            plen, start = read_varint(buf, start, end)
            start += plen
            if plen < 0 or start > end:
                break
        raw_topic = buf[i + 2 : topic_end]
        try:
            topic = raw_topic.decode()
        except UnicodeDecodeError:
            topic = raw_topic.decode("utf-8", "surrogateescape")
        append((topic, bytes(buf[start:end]), qos, mid))
        taken += 1
        pos = end
    return pos


def read_varint(buf: bytearray, i: int, end: int) -> tuple[int, int]:
    """An MQTT variable byte integer at ``buf[i:end]`` (1 to 4 bytes, 7 bits each, least
    significant first) and the index after it; ``(-1, i)`` when incomplete or too long."""
    value = 0
    shift = 0
    for j in range(i, min(end, i + 4)):
        byte = buf[j]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, j + 1
        shift += 7
    return -1, i


# -- Encoding: what a client sends (the simulator's publisher; MQTT 3.1.1 §2.2.3, §3). ----------

#: PINGREQ (3.12) and DISCONNECT (3.14): fixed headers with no body.
PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"

_MAX_VARINT = 268_435_455  # four bytes of seven bits
_SHORT = 16_384  # every length below this fits in two bytes: precomputed, one lookup a packet
_VARINTS = [bytes((n,)) if n < 128 else bytes(((n & 0x7F) | 0x80, n >> 7)) for n in range(_SHORT)]


def encode_varint(n: int) -> bytes:
    """A variable byte integer (the remaining length): 7 bits a byte, high bit = more follows.
    The inverse of :func:`read_varint`; raises ValueError outside 0..268,435,455."""
    if 0 <= n < _SHORT:
        return _VARINTS[n]
    if not 0 <= n <= _MAX_VARINT:
        raise ValueError(f"remaining length out of range: {n}")
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_string(value: str | bytes) -> bytes:
    """A UTF-8 string as MQTT carries it (1.5.3): two bytes of length, then the bytes."""
    data = value.encode() if isinstance(value, str) else value
    if len(data) > 65_535:
        raise ValueError("MQTT string longer than 65,535 bytes")
    return len(data).to_bytes(2, "big") + data


def connect_packet(
    client_id: str, *, keepalive: int, username: str | None = None, password: str | None = None
) -> bytes:
    """CONNECT (3.1), protocol level 4, clean session: a publisher has nothing to resume. A
    password is sent only with a user name (3.1.2.9)."""
    flags = 0x02
    payload = encode_string(client_id)
    if username is not None:
        flags |= 0x80
        payload += encode_string(username)
        if password is not None:
            flags |= 0x40
            payload += encode_string(password)
    body = encode_string("MQTT") + bytes((4, flags)) + keepalive.to_bytes(2, "big") + payload
    return b"\x10" + encode_varint(len(body)) + body


def publish_packet(topic: bytes, payload: bytes, mid: int = 0) -> bytes:
    """PUBLISH (3.3) to a topic already :func:`encode_string`-ed (once per device, not per
    message); ``mid`` 0 means QoS 0, otherwise QoS 1 with that packet id."""
    if mid:
        return (
            b"\x32" + encode_varint(len(topic) + 2 + len(payload)) + topic
            + mid.to_bytes(2, "big") + payload
        )  # fmt: skip
    return b"\x30" + encode_varint(len(topic) + len(payload)) + topic + payload
