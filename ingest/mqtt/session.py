"""The one place that reaches inside aiomqtt (2.5) and paho-mqtt (2.x).

aiomqtt has no public API for manual acknowledgement, so this adapter:

* switches the paho client inside aiomqtt to manual acks before connecting
  (``_client.manual_ack_set(True)``) and sends PUBACKs with ``_client.ack(mid, qos)``;
* replaces aiomqtt's per-message ``on_message`` (which wraps every message in a validated
  ``Topic`` and an ``asyncio.Queue`` round trip) by a callback that appends a plain tuple to a
  deque. The deque needs no bound of its own: we acknowledge only after commit, so the broker's
  in-flight window is the most it can ever hold, and nothing is ever discarded here (aiomqtt's
  own queue drops messages when ``max_queued_incoming_messages`` is hit);
* exposes the "disconnected" future so the source notices a dead connection;
* reads the socket through a 64 KiB buffer: paho reads every packet with 3+ ``recv`` calls (the
  fixed header byte by byte) and aiomqtt handles one packet per event-loop callback;
* parses the QoS 0/1 PUBLISH packets in that buffer itself (``take_publishes``): paho builds an
  ``MQTTMessage``, logs, and matches the topic against its callback table for each one, which
  was over a third of a worker's CPU. Every other packet (CONNACK, SUBACK, PINGRESP, QoS 2, a
  packet split across reads, anything unusual) is still read and handled by paho, one packet
  at a time and only once the reader has looked at its fixed header;
* never holds a PUBLISH over the payload limit whole: once its fixed header shows a remaining
  length over ``max_payload``, the reader takes it piece by piece as it arrives
  (``PartialPublish``), keeps its topic, packet id and first 64 KiB, counts the rest, and puts
  it in the inbox with its full size. paho never sees it (docs/design.md, Limits);
* sends the PUBACKs of a batch as one write (``ack_many``): paho would queue each one, wake the
  loop and issue a ``send`` per acknowledgement;
* bounds the inbox itself, in messages and in bytes. The broker's in-flight window is meant to
  bound it, but Mosquitto 2.0 stops honouring ``max_inflight_messages`` for a persistent
  session with a backlog once the first acknowledgements arrive (measured: 1,000 in flight,
  then after 1,000 PUBACKs the remaining 19,000 at once), and a window of messages is no bound
  on memory when each may be 1 MiB. When the inbox reaches the window, or holds more payload
  bytes than ``max_inbox_bytes``, we stop reading the socket, so TCP flow control holds the
  backlog at the broker; we read again at half of both. While we are not
  reading on purpose, paho's keepalive timer is held (it would take the PINGRESP we do not read
  for a dead link); a dead link is noticed as soon as we read again.

Every private attribute used here is listed in ``ingest.mqtt.guard`` and checked on each new
client; the versions are pinned in pyproject.toml. If aiomqtt ever re-registers its own socket
reader after ours, paho would be read behind the fast path's back: the reader notices and stops
the daemon with a ``FatalError`` rather than running silently slower.

Keep this module small: it is what has to change when aiomqtt grows a public manual-ack API.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Sequence
from itertools import islice
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest.errors import FatalError
from ingest.model import SessionStatistics
from ingest.mqtt.guard import TESTED_VERSIONS, check_internals
from ingest.mqtt.wire import (
    Inbound,
    MalformedPublish,
    PartialPublish,
    oversized_publish,
    read_varint,
    take_publishes,
)
from ingest.settings import MqttEndpoint

__all__ = ["Inbound", "MqttSession", "end_session"]

_READ_SIZE = 65536
# Buffer refills (of up to _READ_SIZE bytes) handled per event-loop callback before yielding.
_ROUNDS_PER_CALLBACK = 8
_PUBACK_HEAD = bytes((0x40, 0x02))
# What is kept of a payload over the limit (docs/design.md, Limits: dead letter too_large).
_KEEP_OF_OVERSIZED = 65536
_DEFAULT_MAX_PAYLOAD = 1048576  # Settings.max_payload_bytes' default, for callers that omit it
_DEFAULT_INBOX_BYTES = 67108864  # Settings.mqtt_inflight_bytes' default, likewise
_READER_REPLACED = (
    "MQTT client library internals changed: paho read the socket outside this adapter's reader "
    "(aiomqtt registered its own reader after ours); tested with "
    + ", ".join(f"{name}=={version}" for name, version in TESTED_VERSIONS.items())
)


class MqttSession:
    """One connection: a fresh aiomqtt ``Client`` (packet ids do not survive a reconnect)."""

    def __init__(
        self,
        endpoint: MqttEndpoint,
        *,
        client_id: str,
        protocol: str,
        keepalive: int,
        receive_maximum: int,
        session_expiry: int,
        max_payload: int = _DEFAULT_MAX_PAYLOAD,
        max_inbox_bytes: int = _DEFAULT_INBOX_BYTES,
        username: str | None = None,
        password: str | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        """``username``/``password`` override the endpoint's. ``tls_context`` (built by
        ``ingest.mqtt.tls``) is used for an ``mqtts://`` endpoint; without one, the system's
        trust store verifies the broker: there is no unverified connection."""
        v5 = protocol == "5"
        self.client = _new_client(
            endpoint,
            client_id=client_id,
            v5=v5,
            keepalive=keepalive,
            receive_maximum=receive_maximum,
            session_expiry=session_expiry,
            username=username if username is not None else endpoint.username,
            password=password if password is not None else endpoint.password,
            tls_context=tls_context,
        )
        check_internals(self.client)
        self._paho: paho.Client = self.client._client
        self._subacks: dict[int, asyncio.Future[None]] = {}
        self._unsubacks: dict[int, asyncio.Future[None]] = {}
        #: the CONNACK's session-present flag: did the broker hold a session for our id?
        self.session_present: bool | None = None
        self._rbuf = bytearray()
        self._take_over_paho()
        self._v5 = v5
        self._max_payload = max_payload
        self._partial: PartialPublish | None = None
        # Set once the reader has looked at the fixed header of the packet paho may read next.
        self._vetted = False
        self._reading = False  # inside our reader callback
        self._reader_installed = False
        self.fast_path = 0
        self.paho_path = 0
        self.too_large = 0
        self._high = max(receive_maximum, 1)
        self._low = self._high // 2
        self._high_bytes = max_inbox_bytes
        self._low_bytes = max_inbox_bytes // 2
        self.paused = False
        self.pauses = 0
        self._hold: asyncio.TimerHandle | None = None
        # Read with take(); inbox_bytes counts the payload bytes it holds.
        self.inbox: deque[Inbound] = deque()
        self.inbox_bytes = 0
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False

    def _take_over_paho(self) -> None:
        """Manual acks, and our callbacks and reader in place of aiomqtt's (module docstring)."""
        self._paho.manual_ack_set(True)
        self._paho.on_message = self._on_message
        self._paho.on_subscribe = self._on_subscribe
        self._paho.on_unsubscribe = self._on_unsubscribe
        self._aiomqtt_on_connect: Any = self._paho.on_connect
        self._paho.on_connect = self._on_connect
        self._paho._sock_recv = self._buffered_recv  # type: ignore[method-assign]
        self._aiomqtt_socket_open = self._paho.on_socket_open
        self._paho.on_socket_open = self._on_socket_open

    # -- reading ----------------------------------------------------------------------------
    #
    # Our reader fills the buffer from the socket; between packets it looks first: the fast
    # path takes the complete QoS 0/1 PUBLISH packets, a PUBLISH over the limit is read in
    # pieces, and only then may paho read one packet (``_vetted``) through ``_buffered_recv``.

    def _readable(self) -> None:
        self._reading = True
        try:
            for _ in range(_ROUNDS_PER_CALLBACK):
                if not self._read_round():
                    return
            # Still buffered: continue on the next loop iteration so other tasks get a turn.
            self.client._loop.call_soon(self._readable)
        except Exception as exc:  # same contract as aiomqtt's reader: the connection is dead
            disconnected = self.client._disconnected
            if not disconnected.done():
                disconnected.set_exception(exc)
        finally:
            self._reading = False

    def _read_round(self) -> bool:
        """One step; False when this callback has nothing more to do (the socket has nothing
        now, reading is paused, or the connection is gone)."""
        if self._paho._in_packet["command"] != 0:
            return self._paho_read()  # paho is inside a packet it was allowed to start
        if self._partial is not None:
            return self._feed_partial()
        buf = self._rbuf
        if buf:
            self._take_fast()
            if self._full():
                self._pause()
                return False
        over = oversized_publish(buf, self._max_payload)
        if over < 0:  # empty, or a PUBLISH whose fixed header is still incomplete
            return self._fill()
        if over > 0:
            self._start_partial(over)
            return True
        self._vetted = True
        return self._paho_read()

    def _take_fast(self) -> None:
        buf = self._rbuf
        inbox = self.inbox
        before = len(inbox)
        used = take_publishes(buf, self._v5, inbox, self._high - before, self._max_payload)
        if used:
            del buf[:used]
            taken = len(inbox) - before
            self.fast_path += taken
            self.inbox_bytes += sum([len(m[1]) for m in islice(reversed(inbox), taken)])
            self._wake()

    def _paho_read(self) -> bool:
        if self._paho.loop_read() != paho.MQTT_ERR_SUCCESS:
            return False
        if self._full():
            self._pause()
            return False
        return bool(self._rbuf) or self._tls_pending()

    def _fill(self) -> bool:
        """Read the socket into the buffer; False when it has nothing now. At its end (or on
        an error) paho reads it once more itself, to report the lost connection its own way."""
        sock = self._paho._sock
        if sock is None:
            return False
        try:
            data = sock.recv(_READ_SIZE)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except OSError:
            data = b""
        if not data:
            self._partial = None
            self._vetted = True
            self._paho.loop_read()
            return False
        self._rbuf += data
        self._paho._last_bytes_received = time.monotonic()
        return True

    def _start_partial(self, length: int) -> None:
        buf = self._rbuf
        first = buf[0]
        if (first >> 1) & 0x03 == 2:
            # Subscribed at QoS 1, the broker downgrades: a QoS 2 one breaks the protocol.
            raise MalformedPublish("QoS 2 PUBLISH on a QoS 1 subscription")
        _, header_end = read_varint(buf, 1, len(buf))
        del buf[:header_end]
        self._partial = PartialPublish(
            first, length, v5=self._v5, max_payload=self._max_payload, keep=_KEEP_OF_OVERSIZED
        )

    def _feed_partial(self) -> bool:
        partial = self._partial
        assert partial is not None
        buf = self._rbuf
        if not buf:
            return self._fill()
        del buf[: partial.feed(buf)]
        if partial.done:
            self._partial = None
            message = partial.inbound()
            if message[4] is not None:
                self.too_large += 1
            self.inbox.append(message)
            self.inbox_bytes += len(message[1])
            self._wake()
            if self._full():
                self._pause()
                return False
        return True

    def _buffered_recv(self, bufsize: int) -> bytes:
        """paho's socket reads, served from our buffer first."""
        if self._paho._in_packet["command"] == 0:
            # paho is about to start a packet: only the one our reader has looked at.
            if not self._vetted:
                if self._reader_installed and not self._reading:
                    raise FatalError(_READER_REPLACED)
                raise BlockingIOError
            self._vetted = False
        buf = self._rbuf
        if not buf:
            sock = self._paho._sock
            if sock is None:
                raise ConnectionError("socket closed")
            try:
                data = sock.recv(_READ_SIZE)
            except ssl.SSLWantReadError as err:
                raise BlockingIOError from err
            if not data:
                return b""  # EOF: paho reports the connection lost
            if len(data) <= bufsize:
                return data
            buf += data
        out = bytes(buf[:bufsize])
        del buf[:bufsize]
        return out

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        self.session_present = bool(getattr(flags, "session_present", False))
        self._aiomqtt_on_connect(client, userdata, flags, reason_code, properties)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # aiomqtt's handler registers its reader and starts its housekeeping task; then ours
        # replaces the reader (call_soon_threadsafe keeps the order: this may run in the
        # executor thread that connects).
        assert self._aiomqtt_socket_open is not None
        self._aiomqtt_socket_open(client, userdata, sock)
        self.client._loop.call_soon_threadsafe(self._install_reader, sock.fileno())

    def _install_reader(self, fileno: int) -> None:
        self.client._loop.add_reader(fileno, self._readable)
        self._reader_installed = True

    def _tls_pending(self) -> bool:
        sock = self._paho._sock
        return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0

    def statistics(self) -> SessionStatistics:
        return SessionStatistics(self.fast_path, self.paho_path, self.too_large)

    # -- flow control -------------------------------------------------------------------------

    def _full(self) -> bool:
        return len(self.inbox) >= self._high or self.inbox_bytes > self._high_bytes

    def _pause(self) -> None:
        sock = self._paho._sock
        if self.paused or sock is None:
            return
        self.paused = True
        self.pauses += 1
        loop = self.client._loop
        loop.remove_reader(sock.fileno())
        self._hold = loop.call_later(1.0, self._hold_keepalive)

    def _hold_keepalive(self) -> None:
        if not self.paused:
            return
        self._paho._last_bytes_received = time.monotonic()
        self._paho._ping_t = 0
        self._hold = self.client._loop.call_later(1.0, self._hold_keepalive)

    def resume_if_drained(self) -> None:
        """Read the socket again once the inbox is down to half the window, and to half its
        bytes."""
        if not self.paused or len(self.inbox) > self._low or self.inbox_bytes > self._low_bytes:
            return
        self.paused = False
        if self._hold is not None:
            self._hold.cancel()
            self._hold = None
        sock = self._paho._sock
        if sock is not None and not self.closed:
            loop = self.client._loop
            loop.add_reader(sock.fileno(), self._readable)
            loop.call_soon(self._readable)  # bytes may already wait in our buffer

    # -- messages -----------------------------------------------------------------------------

    def _on_message(self, _client: Any, _userdata: Any, msg: paho.MQTTMessage) -> None:
        # The packets take_publishes leaves to paho. paho raises on a topic that is not UTF-8.
        raw_topic: bytes = msg._topic
        topic = raw_topic.decode("utf-8", "surrogateescape")
        payload = bytes(msg.payload)
        self.inbox.append((topic, payload, msg.qos, msg.mid, None))
        self.inbox_bytes += len(payload)
        self.paho_path += 1
        self._wake()

    def take(self) -> Inbound:
        """The oldest message of the inbox (which must not be empty); reading resumes once
        enough has been taken."""
        message = self.inbox.popleft()
        self.inbox_bytes -= len(message[1])
        if self.paused:
            self.resume_if_drained()
        return message

    def discard(self) -> int:
        """Empty the inbox of a lost connection (never acknowledged: the broker redelivers
        those messages on the next one); returns how many there were."""
        count = len(self.inbox)
        self.inbox.clear()
        self.inbox_bytes = 0
        return count

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- subscribing --------------------------------------------------------------------------

    def subscribe(self, topic: str | list[tuple[str, int]], qos: int = 1) -> asyncio.Future[None]:
        """Send SUBSCRIBE and return a future resolved by the SUBACK, without waiting for it.
        ``topic`` may be a list of ``(filter, qos)``: all of them in one SUBSCRIBE, and the
        future fails when the broker refuses any of them.

        A resumed session may deliver its backlog before the SUBACK, and a broker whose
        in-flight window is full may hold the SUBACK back until we acknowledge (rumqttd does):
        waiting for it before reading (as ``aiomqtt.Client.subscribe`` does) can deadlock.
        """
        future: asyncio.Future[None] = self.client._loop.create_future()
        rc, mid = self._paho.subscribe(topic, qos)
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            raise aiomqtt.MqttError(f"could not send SUBSCRIBE: {paho.error_string(rc)}")
        self._subacks[mid] = future
        return future

    def _on_subscribe(
        self, _client: Any, _userdata: Any, mid: int, reason_codes: Any, _properties: Any
    ) -> None:
        future = self._subacks.pop(mid, None)
        if future is None or future.done():
            return
        failed = [rc for rc in reason_codes if getattr(rc, "is_failure", False)]
        if failed:
            future.set_exception(
                aiomqtt.MqttError(f"subscription refused by the broker: {failed[0]}")
            )
        else:
            future.set_result(None)

    def unsubscribe(self, filters: list[str]) -> asyncio.Future[None]:
        """Send UNSUBSCRIBE for ``filters`` and return a future resolved by the UNSUBACK. The
        broker stops adding messages for them to our session; those it had queued before are
        still delivered (MQTT 3.1.1 3.10.4, Mosquitto does), which is what retiring needs."""
        future: asyncio.Future[None] = self.client._loop.create_future()
        rc, mid = self._paho.unsubscribe(filters)
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            raise aiomqtt.MqttError(f"could not send UNSUBSCRIBE: {paho.error_string(rc)}")
        self._unsubacks[mid] = future
        return future

    def _on_unsubscribe(
        self, _client: Any, _userdata: Any, mid: int, _reason_codes: Any, _properties: Any
    ) -> None:
        future = self._unsubacks.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(None)

    # -- waiting --------------------------------------------------------------------------------

    async def wait_inbox(self, also: asyncio.Future[None] | None = None) -> None:
        """Wait until a message is in ``inbox`` (or ``also`` is done); raise
        ``aiomqtt.MqttError`` on disconnect."""
        disconnected: asyncio.Future[None] = self.client._disconnected
        while not self.inbox and (also is None or not also.done()):
            if disconnected.done():
                cause = disconnected.exception() if not disconnected.cancelled() else None
                if isinstance(cause, FatalError):
                    raise cause  # not a connection problem: retrying cannot help
                raise aiomqtt.MqttError("disconnected from the broker") from cause
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                waits: set[asyncio.Future[None]] = {waiter, disconnected}
                if also is not None:
                    waits.add(also)
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._waiter = None
                if not waiter.done():
                    waiter.cancel()

    @property
    def connected(self) -> bool:
        return not self.closed and not self.client._disconnected.done()

    def ack_many(self, acks: Sequence[tuple[int, int]]) -> int:
        """Acknowledge ``(mid, qos)`` pairs in this order with one write; returns how many
        were sent (0 when the connection is gone, and then nothing is written: a packet id of
        a closed connection may name another message on the next one)."""
        if not self.connected:
            return 0
        packet = bytearray()
        sent = 0
        for mid, qos in acks:
            if qos == 1:
                # PUBACK: fixed header 0x40, remaining length 2, packet id. Also valid in MQTT
                # v5, where reason code 0 (success) may be omitted.
                packet += _PUBACK_HEAD + mid.to_bytes(2, "big")
                sent += 1
            elif qos == 2:
                # Not subscribed at QoS 2, but never leave one hanging. paho answered the
                # PUBLISH with PUBREC and handed the message on at PUBREL, so what is left is
                # PUBCOMP (0x70, same shape as PUBACK, reason code omitted likewise). Encoded
                # into the same write rather than through paho.ack, which would queue it ahead
                # of the PUBACKs of earlier messages: acknowledgements leave in receive order.
                packet += b"\x70\x02" + mid.to_bytes(2, "big")
                sent += 1
        if packet:
            # paho's own queue keeps the write in order with its other packets and completes
            # partial writes.
            rc = self._paho._packet_queue(paho.PUBACK, bytes(packet), 0, 0)
            if rc != paho.MQTT_ERR_SUCCESS:
                return 0
        return sent

    def publish(self, topic: str, payload: bytes) -> bool:
        """Publish at QoS 0 without waiting (a request to a device, such as a Sparkplug
        Rebirth); False when there is no connection to send it on."""
        if not self.connected:
            return False
        info = self._paho.publish(topic, payload, qos=0)
        return info.rc == paho.MQTT_ERR_SUCCESS


def _new_client(
    endpoint: MqttEndpoint,
    *,
    client_id: str,
    v5: bool,
    keepalive: int,
    receive_maximum: int,
    session_expiry: int,
    username: str | None,
    password: str | None,
    tls_context: ssl.SSLContext | None,
) -> aiomqtt.Client:
    """A fresh aiomqtt client for one connection of our persistent session. An ``mqtts://``
    endpoint without a context gets the system's trust store: never an unverified
    connection."""
    if endpoint.tls and tls_context is None:
        tls_context = ssl.create_default_context()
    properties: Properties | None = None
    if v5:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        # aiomqtt's default clean_start (first connection only) would wipe our session on
        # every new Client; an expiry keeps it (and its queue) while we are away.
        properties.SessionExpiryInterval = session_expiry
        properties.ReceiveMaximum = min(receive_maximum, 65535)
    return aiomqtt.Client(
        endpoint.host,
        endpoint.port,
        username=username,
        password=password,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        clean_session=None if v5 else False,
        clean_start=False if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
        keepalive=keepalive,
        properties=properties,
        tls_context=tls_context if endpoint.tls else None,
        timeout=10,
    )


async def end_session(
    endpoint: MqttEndpoint,
    *,
    client_id: str,
    protocol: str,
    username: str | None = None,
    password: str | None = None,
    tls_context: ssl.SSLContext | None = None,
) -> None:
    """End the persistent session of ``client_id`` at the broker: connect with a clean session
    (3.1.1 ``clean_session=True``; v5 ``clean_start=True`` and a session expiry of 0) and
    disconnect. The broker discards the old session, its subscriptions and whatever it still
    queued; the new one ends with the connection. Raises ``aiomqtt.MqttError``."""
    v5 = protocol == "5"
    properties: Properties | None = None
    if v5:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 0
    if endpoint.tls and tls_context is None:
        tls_context = ssl.create_default_context()
    client = aiomqtt.Client(
        endpoint.host,
        endpoint.port,
        username=username if username is not None else endpoint.username,
        password=password if password is not None else endpoint.password,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        clean_session=None if v5 else True,
        clean_start=True if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
        properties=properties,
        tls_context=tls_context if endpoint.tls else None,
        timeout=10,
    )
    async with client:
        pass
