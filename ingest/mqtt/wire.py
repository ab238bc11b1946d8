"""The MQTT wire codec shared by the daemon and the simulator (no I/O, no paho).

``take_publishes`` is the daemon's PUBLISH fast path: it parses complete QoS 0/1 PUBLISH
packets out of the session's read buffer (see ``ingest.mqtt.session``). ``read_varint`` reads
the variable byte integers of MQTT 3.1.1 §2.2.3 / MQTT 5 §1.5.5.
"""

from __future__ import annotations

from collections import deque

__all__ = ["Inbound", "read_varint", "take_publishes"]

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
