"""The MQTT wire codec shared by the daemon and the simulator (no I/O, no paho).

``take_publishes`` is the daemon's PUBLISH fast path: it parses complete QoS 0/1 PUBLISH
packets out of the session's read buffer (see ``ingest.mqtt.session``). ``oversized_publish``
and ``PartialPublish`` keep a PUBLISH over the payload limit from ever being held whole: it is
read piece by piece as it arrives, its start kept and the rest counted (docs/design.md,
Limits). ``read_varint`` reads the variable byte integers of MQTT 3.1.1 §2.2.3 / MQTT 5 §1.5.5.
"""

from __future__ import annotations

from collections import deque

__all__ = [
    "DISCONNECT",
    "PINGREQ",
    "Inbound",
    "MalformedPublish",
    "PartialPublish",
    "connect_packet",
    "encode_string",
    "encode_varint",
    "oversized_publish",
    "puback_packet",
    "publish_packet",
    "read_varint",
    "subscribe_packet",
    "take_publishes",
]

# (topic, payload, qos, mid, size): the fields we need of a paho MQTTMessage, and the payload's
# full size when ``payload`` holds only its start (None: the payload is whole).
Inbound = tuple[str, bytes, int, int, int | None]


class MalformedPublish(ValueError):
    """A PUBLISH whose fields do not add up (the broker broke the protocol)."""


def take_publishes(
    buf: bytearray, v5: bool, out: deque[Inbound], limit: int, max_length: int
) -> int:
    """Parse the complete QoS 0/1 PUBLISH packets at the front of ``buf`` into ``out`` (at most
    ``limit``) and return how many bytes they took; the caller deletes them from ``buf``.

    Stops at the first packet it does not take: another type, QoS 2, a v5 topic alias, a
    remaining length over ``max_length`` (``PartialPublish``'s), an incomplete or inconsistent
    packet. paho reads that one (and reports a malformed packet the way it always does). A
    topic that is not UTF-8 (a broker should never forward one) is decoded with surrogate
    escapes: it becomes a dead letter downstream, not a crash.
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
        if length < 0 or length > max_length:
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
        append((topic, bytes(buf[start:end]), qos, mid, None))
        taken += 1
        pos = end
    return pos


def oversized_publish(buf: bytearray, max_length: int) -> int:
    """The remaining length of the PUBLISH at the front of ``buf`` when it is over
    ``max_length``; 0 when the packet there is anything else (paho may read it); -1 when
    ``buf`` does not hold a PUBLISH's whole fixed header yet."""
    if not buf:
        return -1
    if buf[0] & 0xF0 != 0x30:
        return 0
    length, _ = read_varint(buf, 1, len(buf))
    if length < 0:
        # Four bytes with the continuation bit: malformed, which paho reports.
        return -1 if len(buf) < 5 else 0
    return length if length > max_length else 0


class PartialPublish:
    """A PUBLISH over the size limit, read piece by piece as it arrives, never held whole.

    ``feed`` takes the bytes that follow the fixed header. It keeps the topic, the packet id and
    at most ``keep`` bytes of the payload, and counts the rest. The limit was checked on the
    remaining length, which counts the topic and properties too: a payload that turns out to
    be within ``max_payload`` is kept whole after all.
    """

    def __init__(
        self, first_byte: int, remaining: int, *, v5: bool, max_payload: int, keep: int
    ) -> None:
        self.qos = (first_byte >> 1) & 0x03
        self.topic = ""
        self.mid = 0
        self.payload = bytearray()
        self.payload_size = 0
        self._v5 = v5
        self._remaining = remaining
        self._left = remaining  # bytes of the packet not fed yet
        self._max_payload = max_payload
        self._keep_at_most = keep
        self._keep = 0
        self._head = bytearray()  # topic length, topic, packet id, v5 property length
        self._head_needed = 2  # bytes of _head that tell the next field
        self._header_done = False
        self._skip = 0  # v5 properties not fed yet (not kept)

    @property
    def done(self) -> bool:
        return self._left == 0

    def feed(self, data: bytearray) -> int:
        """Take the start of ``data`` (up to the end of this packet); return how many bytes."""
        n = min(len(data), self._left)
        pos = 0
        while pos < n and not self._header_done:
            piece = data[pos : pos + min(self._head_needed - len(self._head), n - pos)]
            self._head += piece
            pos += len(piece)
            if len(self._head) == self._head_needed:
                self._parse_head()
        if pos < n and self._skip:
            step = min(self._skip, n - pos)
            self._skip -= step
            pos += step
        if pos < n and not self._skip:
            room = self._keep - len(self.payload)
            if room > 0:
                self.payload += data[pos : pos + min(room, n - pos)]
        self._left -= n
        if self._left == 0 and not self._header_done:
            raise MalformedPublish("PUBLISH shorter than its own header")
        return n

    def inbound(self) -> Inbound:
        size = self.payload_size if self.payload_size > self._max_payload else None
        return (self.topic, bytes(self.payload), self.qos, self.mid, size)

    def _parse_head(self) -> None:
        head = self._head
        topic_end = 2 + ((head[0] << 8) | head[1])
        fixed = topic_end + 2 if self.qos else topic_end
        if len(head) < fixed:
            self._head_needed = fixed
            return
        after = fixed
        if self._v5:
            self._skip, after = read_varint(head, fixed, len(head))
            if self._skip < 0:
                if len(head) - fixed >= 4:
                    raise MalformedPublish("PUBLISH property length longer than 4 bytes")
                self._skip = 0
                self._head_needed = len(head) + 1
                return
        self._header_done = True
        raw_topic = bytes(head[2:topic_end])
        self.topic = raw_topic.decode("utf-8", "surrogateescape")
        self.mid = (head[topic_end] << 8) | head[topic_end + 1] if self.qos else 0
        if self.qos and self.mid == 0:
            raise MalformedPublish("PUBLISH with packet id 0")
        self.payload_size = self._remaining - after - self._skip
        if self.payload_size < 0:
            raise MalformedPublish("PUBLISH shorter than its own header")
        size = self.payload_size
        self._keep = size if size <= self._max_payload else min(size, self._keep_at_most)


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


#: A will (3.1.2.5): ``(topic, payload, qos)``, published by the broker if the connection
#: ends without a DISCONNECT (a Sparkplug edge node's NDEATH).
Will = tuple[str, bytes, int]


def connect_packet(
    client_id: str,
    *,
    keepalive: int,
    username: str | None = None,
    password: str | None = None,
    will: Will | None = None,
) -> bytes:
    """CONNECT (3.1), protocol level 4, clean session: a publisher has nothing to resume. A
    password is sent only with a user name (3.1.2.9); a will is never retained."""
    flags = 0x02
    payload = encode_string(client_id)
    if will is not None:
        topic, message, qos = will
        flags |= 0x04 | (qos << 3)
        payload += encode_string(topic) + encode_string(message)
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


def subscribe_packet(mid: int, filters: list[tuple[str, int]]) -> bytes:
    """SUBSCRIBE (3.8) to ``(topic filter, maximum QoS)`` pairs with packet id ``mid``."""
    body = mid.to_bytes(2, "big") + b"".join(
        encode_string(topic) + bytes((qos,)) for topic, qos in filters
    )
    return b"\x82" + encode_varint(len(body)) + body


def puback_packet(mid: int) -> bytes:
    """PUBACK (3.4): a QoS 1 PUBLISH from the broker received."""
    return b"\x40\x02" + mid.to_bytes(2, "big")
