"""A minimal MQTT 3.1.1 publisher on an asyncio ``Protocol``.

Why not aiomqtt or paho: the simulator only ever sends PUBLISH and reads PUBACK, and on this
path paho's per-message bookkeeping (locks, ``MQTTMessageInfo``, a socket-pair wake-up per
publish) dominates. Measured against the local Mosquitto, one process, 100 topics, 110-byte
payloads: aiomqtt 5,000 msg/s at QoS 0 and 3,500 at QoS 1; raw paho on the asyncio loop 18,000
and 5,700; this module 140,000 and 94,000. It speaks the subset a publisher needs (CONNECT,
CONNACK, PUBLISH QoS 0/1, PUBACK, PINGREQ/PINGRESP, DISCONNECT; and for a Sparkplug edge node
a will, SUBSCRIBE/SUBACK and the PUBLISHes it is sent), writes many packets with one
``transport.write``, and never blocks: writes go to the transport's buffer, and the
transport's flow control (``pause_writing``) tells the sender to wait.

The packets are encoded and the remaining lengths read by ``ingest.mqtt.wire``, the codec the
daemon reads with: one implementation of the wire format. ``mqtts://`` always verifies the
broker's certificate and host name (:func:`tls_context`).

Spec: MQTT Version 3.1.1, OASIS Standard, sections 2 (fixed header, remaining length) and 3.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Callable
from typing import Any

from ingest.mqtt.wire import (
    DISCONNECT,
    PINGREQ,
    Will,
    connect_packet,
    encode_string,
    puback_packet,
    publish_packet,
    read_varint,
    subscribe_packet,
)
from ingest.urls import MqttEndpoint
from simulators._errors import ConfigError

__all__ = [
    "CONNACK_CODES",
    "DISCONNECT",
    "PINGREQ",
    "Connection",
    "PacketReader",
    "ProtocolError",
    "RefusedError",
    "Will",
    "connect_packet",
    "publish_packet",
    "tls_context",
    "topic_field",
]

_CONNACK = 0x20
_PUBLISH = 0x30
_PUBACK = 0x40
_SUBACK = 0x90
_PINGRESP = 0xD0

#: CONNACK return codes (3.2.2.3). Only "server unavailable" is worth retrying.
CONNACK_CODES = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}

_LOST = -1  # "CONNACK code" when the connection closed before it

#: Bytes the transport may buffer before it asks the sender to wait.
WRITE_BUFFER_HIGH = 1 << 20


class ProtocolError(Exception):
    """The broker sent something a publisher does not expect."""


class RefusedError(Exception):
    """The broker answered CONNECT with a non-zero return code."""

    def __init__(self, code: int) -> None:
        super().__init__(f"connection refused: {CONNACK_CODES.get(code, f'return code {code}')}")
        self.code = code

    @property
    def retryable(self) -> bool:
        return self.code == 3


def topic_field(topic: str) -> bytes:
    """A topic as PUBLISH carries it (length-prefixed UTF-8); computed once per device."""
    return encode_string(topic)


class PacketReader:
    """Splits the byte stream from the broker into ``(first byte, body)`` packets."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete packet held back."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        packets = []
        pos = 0
        while len(buf) - pos >= 2:
            header = buf[pos]
            if buf[pos + 1] < 128:  # the usual case: a short packet
                length, start = buf[pos + 1], pos + 2
            else:
                length, start = read_varint(buf, pos + 1, len(buf))
                if length < 0:
                    if len(buf) - pos > 4:  # four bytes, each saying "more follows"
                        raise ProtocolError("remaining length longer than 4 bytes")
                    break
            if len(buf) - start < length:
                break
            packets.append((header, bytes(buf[start : start + length])))
            pos = start + length
        del buf[:pos]
        return packets


@functools.cache
def tls_context(ca_file: str | None, cert_file: str | None, key_file: str | None) -> ssl.SSLContext:
    """The context of every mqtts:// connection of this process: the broker's certificate and
    host name always verified, against ``ca_file`` alone when given (else the system's trust
    store); ``cert_file`` (and ``key_file``, unless the key is in it): our certificate for
    mutual TLS. Reads the files (once per process: cached).

    Raises :class:`ConfigError` naming the flag of a file that cannot be read or used.
    """
    for flag, path in (
        ("--ca-file", ca_file),
        ("--cert-file", cert_file),
        ("--key-file", key_file),
    ):
        if path is not None:
            _check_readable(flag, path)
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except ssl.SSLError as exc:
        raise ConfigError(
            "--ca-file", f"no usable PEM certificate in {ca_file}: {_reason(exc)}"
        ) from None
    if cert_file is not None:
        try:
            context.load_cert_chain(cert_file, key_file, password=_no_key_password)
        except ssl.SSLError as exc:
            files = cert_file if key_file is None else f"{cert_file} and {key_file}"
            raise ConfigError(
                "--cert-file", f"no usable certificate and key in {files}: {_reason(exc)}"
            ) from None
    return context


def _check_readable(flag: str, path: str) -> None:
    try:
        with open(path, "rb") as file:
            file.read(1)
    except OSError as exc:
        raise ConfigError(flag, f"cannot read {path}: {exc.strerror or exc}") from None


def _no_key_password() -> bytes:
    # Without a callback, OpenSSL would prompt on the terminal for an encrypted key's passphrase.
    raise ConfigError("--key-file", "the key is encrypted; the simulator needs an unencrypted key")


def _reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc).lower().replace("_", " ")


class Connection(asyncio.Protocol):
    """One connection that publishes. ``inflight`` maps packet ids to the owner's tokens;
    ``on_ack(token)`` runs for each PUBACK, ``on_event()`` when the owner may want to look
    again (writable again, connection lost), ``on_publish(topic, payload)`` for each message
    the broker sends (only a connection opened with ``subscribe`` has one; any other fails
    the connection). Open it with :meth:`open`.
    """

    def __init__(
        self,
        on_ack: Callable[[Any], None],
        on_event: Callable[[Connection], None],
        on_publish: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self.inflight: dict[int, Any] = {}
        self.writable = True
        self.error: str | None = None
        self._on_ack = on_ack
        self._on_event = on_event
        self._on_publish = on_publish
        self._reader = PacketReader()
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._connack: asyncio.Future[int] = self._loop.create_future()
        self._suback: asyncio.Future[bytes] = self._loop.create_future()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._mid = 0
        self._ping_sent: float | None = None
        self._ping_handle: asyncio.TimerHandle | None = None
        self._keepalive = 0

    @classmethod
    async def open(
        cls,
        url: MqttEndpoint,
        *,
        client_id: str,
        keepalive: int,
        within: float,
        on_ack: Callable[[Any], None],
        on_event: Callable[[Connection], None],
        will: Will | None = None,
        subscribe: list[tuple[str, int]] | None = None,
        on_publish: Callable[[str, bytes], None] | None = None,
    ) -> Connection:
        """Connect, send CONNECT (with ``will``) and wait for CONNACK, then subscribe to
        ``subscribe`` and wait for SUBACK, all ``within`` seconds; raises ``OSError``,
        ``TimeoutError``, :class:`RefusedError` or :class:`ProtocolError`.
        """
        loop = asyncio.get_running_loop()
        conn = cls(on_ack, on_event, on_publish)
        tls = None
        if url.tls:  # reads files the first time: off the event loop
            tls = await asyncio.to_thread(tls_context, url.ca_file, url.cert_file, url.key_file)
        async with asyncio.timeout(within):
            await loop.create_connection(
                lambda: conn, url.host, url.port, ssl=tls, server_hostname=url.host if tls else None
            )
            try:
                assert conn._transport is not None
                conn._transport.write(
                    connect_packet(
                        client_id,
                        keepalive=keepalive,
                        username=url.username,
                        password=url.password,
                        will=will,
                    )
                )
                code = await asyncio.shield(conn._connack)
                if code == 0 and subscribe:
                    await conn._subscribe(subscribe)
            except BaseException:
                conn.abort()
                raise
        if code == _LOST:
            raise ConnectionError(f"{conn.error} before CONNACK (is it an MQTT broker?)")
        if code:
            conn.abort()
            raise RefusedError(code)
        conn._keepalive = keepalive
        conn._ping_handle = loop.call_later(keepalive / 2, conn._ping)
        return conn

    async def _subscribe(self, filters: list[tuple[str, int]]) -> None:
        assert self._transport is not None
        self._transport.write(subscribe_packet(self.next_mid(), filters))
        codes = await asyncio.shield(self._suback)
        if self.error is not None:
            raise ConnectionError(f"{self.error} before SUBACK")
        if any(code & 0x80 for code in codes):
            raise ProtocolError(f"the broker refused the subscription to {filters[0][0]}")

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)

    def data_received(self, data: bytes) -> None:
        inflight = self.inflight
        if not self._reader.buffered:
            # Runs of PUBACKs are nearly all a QoS 1 publisher reads: take them without copies.
            i, n = 0, len(data)
            on_ack = self._on_ack
            while n - i >= 4 and data[i] == _PUBACK and data[i + 1] == 2:
                token = inflight.pop((data[i + 2] << 8) | data[i + 3], None)
                if token is not None:
                    on_ack(token)
                i += 4
            if i == n:
                return
            data = data[i:]
        try:
            packets = self._reader.feed(data)
        except ProtocolError as exc:
            self._fail(str(exc))
            return
        for header, body in packets:
            kind = header & 0xF0
            if kind == _PUBACK and len(body) == 2:
                token = inflight.pop((body[0] << 8) | body[1], None)
                if token is not None:
                    self._on_ack(token)
            elif kind == _PINGRESP:
                self._ping_sent = None
            elif kind == _CONNACK and len(body) == 2 and not self._connack.done():
                self._connack.set_result(body[1])
            elif kind == _PUBLISH and self._on_publish is not None:
                if not self._inbound(header, body):
                    return
            elif kind == _SUBACK and len(body) > 2 and not self._suback.done():
                self._suback.set_result(body[2:])
            else:
                self._fail(f"unexpected packet type {header >> 4} from the broker")
                return

    def _inbound(self, header: int, body: bytes) -> bool:
        """A PUBLISH from the broker (QoS 0 or 1: we subscribe at most at 1); False when it
        was malformed and the connection is failed."""
        qos = (header >> 1) & 0x03
        topic_end = 2 + int.from_bytes(body[:2], "big")
        start = topic_end + (2 if qos else 0)
        if qos > 1 or len(body) < start:
            self._fail("malformed PUBLISH from the broker")
            return False
        if qos:
            self.write(puback_packet(int.from_bytes(body[topic_end:start], "big")))
        assert self._on_publish is not None
        self._on_publish(body[2:topic_end].decode("utf-8", "replace"), body[start:])
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is None:
            self.error = str(exc) if exc else "connection closed"
        if not self._connack.done():
            self._connack.set_result(_LOST)  # a result, not an exception: nobody may await it
        if not self._suback.done():
            self._suback.set_result(b"")
        if self._ping_handle is not None:
            self._ping_handle.cancel()
        if not self._closed.done():
            self._closed.set_result(None)
        self._on_event(self)

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True
        self._on_event(self)

    # -- the owner's side ---------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def next_mid(self) -> int:
        """A packet id (1..65535) not in flight."""
        mid = self._mid
        while True:
            mid = mid + 1 if mid < 65_535 else 1
            if mid not in self.inflight:
                self._mid = mid
                return mid

    def write(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    def close(self) -> None:
        """DISCONNECT, then close once the buffered bytes are written."""
        if self.is_open:
            assert self._transport is not None
            self._transport.write(DISCONNECT)
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _fail(self, error: str) -> None:
        self.error = error
        self.abort()

    def _ping(self) -> None:
        # Ping whether or not we publish: a broker that stopped answering (half-open TCP)
        # is noticed within one keep-alive even at QoS 0, where nothing else answers us.
        now = self._loop.time()
        if self._ping_sent is not None and now - self._ping_sent >= self._keepalive:
            self._fail(f"no answer from the broker for {self._keepalive} s")
            return
        if self.is_open:
            if self._ping_sent is None:
                self._ping_sent = now
            self.write(PINGREQ)
            self._ping_handle = self._loop.call_later(self._keepalive / 2, self._ping)
