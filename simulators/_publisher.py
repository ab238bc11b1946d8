"""One MQTT connection's share of the fleet: due messages out, acknowledgements in.

A :class:`Publisher` owns a group of devices and one :class:`~simulators._mqtt.Connection`.
Its sender walks the schedule, and whenever messages are due it generates them and writes
them in one batch; it only ever waits on a future (the next due time, room in the QoS 1
window, a writable transport, a new connection, stop), so the loop never blocks.

Counting (``published + failed == messages + duplicates`` at the end):

- QoS 0: published when handed to the connection's transport.
- QoS 1: published when the broker's PUBACK arrives. Messages in flight when the connection
  drops, or still unacknowledged ``ack_timeout`` after the schedule ends, are failed
  ("unacknowledged": the broker may or may not have them). They are not sent again, which
  would add duplicates nobody asked for.
- Messages due while the connection is down are generated (their ``seq`` is used, so the
  audit shows the gap) and failed ("disconnected"). A supervisor reconnects with capped,
  jittered backoff meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import secrets
from collections.abc import Iterator, Sequence

import orjson

from simulators._config import METRIC_PLACEHOLDER, MqttUrl
from simulators._errors import ConnectError
from simulators._faults import BAD_KINDS, HOSTILE_BAD_KINDS, SPARKPLUG_BAD_KINDS
from simulators._mqtt import Connection, ProtocolError, RefusedError, publish_packet, topic_field
from simulators._payloads import Device, Message
from simulators._schedule import Schedule, Slot

#: Messages generated and written per batch before the loop gets a turn.
BATCH = 256
#: With --duration, messages still unsent this long after the end are left out.
END_GRACE = 0.25


class Stats:
    """Counters of one process, shared by its publishers (read live for progress)."""

    __slots__ = (
        "bad",
        "connect_failures",
        "duplicates",
        "failed",
        "failures",
        "lag",
        "late",
        "max_lag",
        "messages",
        "nodes",
        "published",
        "published_duplicates",
        "reconnects",
        "samples",
        "sparkplug",
    )

    def __init__(self) -> None:
        self.messages = 0  # scheduled messages generated (valid or malformed)
        self.duplicates = 0  # extra publishes of a message (--duplicate-ratio)
        self.published = 0  # duplicates included
        self.published_duplicates = 0
        self.failed = 0
        self.samples = 0  # valid samples in published messages (duplicates excluded)
        self.late = 0
        self.bad = dict.fromkeys((*BAD_KINDS, *HOSTILE_BAD_KINDS, *SPARKPLUG_BAD_KINDS), 0)
        #: Sparkplug edge nodes' messages outside the schedule (``simulators._sparkplug``).
        self.sparkplug: dict[str, int] = {}
        #: Sparkplug edge node -> [NBIRTHs sent, acknowledged, failed]: each is a sample.
        self.nodes: dict[str, list[int]] = {}
        self.failures = {"disconnected": 0, "unacknowledged": 0}
        self.reconnects = 0
        self.connect_failures = 0
        self.lag = 0.0  # how far behind schedule the latest batch was, seconds
        self.max_lag = 0.0


class Backoff:
    """Capped exponential backoff with full jitter (never below a tenth of the ceiling)."""

    def __init__(self, initial: float = 0.1, maximum: float = 5.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.attempts = 0
        self._random = random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * 2 ** min(self.attempts, 30))
        self.attempts += 1
        return self._random.uniform(ceiling / 10, ceiling)

    def reset(self) -> None:
        self.attempts = 0


#: What a QoS 1 packet id stands for until its PUBACK: (device, is a duplicate, samples); the
#: device is None for a message that is not one of the schedule's (a Sparkplug birth or death,
#: the flag then saying whether it is an NBIRTH).
Token = tuple[Device | None, bool, int]


class Publisher:
    """Sends the messages of ``devices`` over one connection (see the module docstring)."""

    def __init__(
        self,
        *,
        name: str,
        url: MqttUrl,
        devices: Sequence[Device],
        schedule: Schedule,
        qos: int,
        stats: Stats,
        keepalive: int = 30,
        inflight_window: int = 1000,
        ack_timeout: float = 10.0,
    ) -> None:
        self.name = name
        self._url = url
        self._devices = list(devices)
        for device in self._devices:
            if METRIC_PLACEHOLDER in device.topic:
                device.metric_topics = {
                    m: topic_field(device.topic.replace(METRIC_PLACEHOLDER, m))
                    for m in VALUE_METRICS
                }
            else:
                device.wire_topic = topic_field(device.topic)
        self._schedule = schedule
        self._qos = qos
        self._stats = stats
        self._keepalive = keepalive
        self._window = inflight_window
        self._ack_timeout = ack_timeout
        self._client_id = f"sim-{os.getpid()}-{name}-{secrets.token_hex(3)}"
        self._conn: Connection | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._wake_at_inflight = -1  # wake the sender on PUBACK once inflight <= this
        self._stopping = False
        self._forced = False
        self.last_error: str | None = None

    # -- connecting ---------------------------------------------------------------------------

    async def _open(self, within: float) -> Connection:
        return await Connection.open(
            self._url,
            client_id=self._client_id,
            keepalive=self._keepalive,
            within=within,
            on_ack=self._on_ack,
            on_event=self._on_event,
        )

    async def connect(self, within: float) -> None:
        """The first connection: retried with backoff for ``within`` seconds at most."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        backoff = Backoff()
        while True:
            try:
                self._conn = await self._open(max(0.1, deadline - loop.time()))
                return
            except RefusedError as exc:
                if not exc.retryable:
                    raise ConnectError(self._url.redacted(), str(exc)) from None
                self.last_error = str(exc)
            except (OSError, TimeoutError, ProtocolError) as exc:
                self.last_error = str(exc) or type(exc).__name__
            self._stats.connect_failures += 1
            delay = backoff.next_delay()
            if loop.time() + delay >= deadline:
                raise ConnectError(self._url.redacted(), self.last_error or "timed out")
            await asyncio.sleep(delay)

    async def _supervise(self) -> None:
        """Reconnects whenever the connection is lost, until cancelled."""
        backoff = Backoff()
        while True:
            conn = self._conn
            if conn is not None:
                await conn.wait_closed()
                continue  # _on_event has set self._conn to None
            try:
                conn = await self._open(self._keepalive)
            except (OSError, TimeoutError, ProtocolError, RefusedError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                self._stats.connect_failures += 1
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            self._stats.reconnects += 1
            self._conn = conn
            self._wake()

    # -- events from the connection -----------------------------------------------------------

    def _on_ack(self, token: Token) -> None:
        device, duplicate, samples = token
        if device is None:
            self._control_settled(duplicate, published=True)
        else:
            device.published += 1
            stats = self._stats
            stats.published += 1
            if duplicate:
                stats.published_duplicates += 1
            else:
                stats.samples += samples
        conn = self._conn
        if (
            self._waiter is not None
            and conn is not None
            and len(conn.inflight) <= self._wake_at_inflight
        ):
            self._wake()

    def _on_event(self, conn: Connection) -> None:
        if conn is self._conn and not conn.is_open:
            self._conn = None
            self.last_error = conn.error
            self._fail_inflight(conn)
        self._wake()

    def _fail_inflight(self, conn: Connection) -> None:
        stats = self._stats
        failed = 0
        for device, flag, _samples in conn.inflight.values():
            if device is None:
                self._control_settled(flag, published=False)
                continue
            device.failed += 1
            failed += 1
        stats.failed += failed
        stats.failures["unacknowledged"] += failed
        conn.inflight.clear()

    def _control_settled(self, flag: bool, *, published: bool) -> None:
        """A message outside the schedule (none here: see ``simulators._sparkplug``) was
        acknowledged, or failed; ``flag`` is its token's second field."""

    # -- waiting ------------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, deadline: float | None = None, *, inflight_at_most: int = -1) -> None:
        """Until ``deadline`` (loop time), or until something happens that may change what the
        sender can do (including, with ``inflight_at_most``, acks bringing inflight that low).
        """
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        self._wake_at_inflight = inflight_at_most
        handle = loop.call_at(deadline, self._wake) if deadline is not None else None
        try:
            await waiter
        finally:
            self._waiter = None
            self._wake_at_inflight = -1
            if handle is not None:
                handle.cancel()

    def abort(self) -> None:
        """Drop the connection at once (before the run: nothing was sent on it)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()

    def stop(self) -> None:
        """Send nothing more; still wait (bounded) for outstanding acknowledgements."""
        self._stopping = True
        self._wake()

    def force(self) -> None:
        """Stop waiting for acknowledgements too."""
        self._stopping = self._forced = True
        self._wake()

    # -- running ------------------------------------------------------------------------------

    async def run(self, start: float, start_wall_ms: float) -> float:
        """Send the schedule from ``start`` (loop time; ``start_wall_ms`` the same instant in
        epoch ms), drain, close. Returns the loop time when the last message was settled.
        """
        supervisor = asyncio.create_task(self._supervise(), name=f"simulate[{self.name}:connect]")
        try:
            await self._send(start, start_wall_ms)
            return await self._drain()
        finally:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
            await self._close()

    async def _send(self, start: float, start_wall_ms: float) -> None:
        loop = asyncio.get_running_loop()
        per_slot = self._schedule.interval
        slots = self._schedule.slots(self._devices)
        pending = next(slots, None)
        # --duration bounds the run's time: what a slow machine could not send by then (plus
        # a little grace for a late wake-up) is left out, and the report shows the shortfall.
        duration = self._schedule.duration
        cutoff = start + duration + END_GRACE if duration is not None else math.inf
        while pending is not None and not self._stopping:
            now = loop.time()
            if now >= cutoff:
                break
            due = start + pending[0] * per_slot
            if due > now:
                self._stats.lag = 0.0
                await self._wait(due)
                continue
            room = await self._room()
            if room is None:
                continue  # waited: time, connection and window may all have changed
            self._note_lag(now - due)
            pending = self._send_due(slots, pending, room, start, start_wall_ms, now)
            # Let acknowledgements and the other connections in before the next batch.
            await asyncio.sleep(0)

    async def _room(self) -> int | None:
        """How many messages may be generated now, or None after waiting for room. While
        disconnected, a batch is generated all the same (and failed: ``_send_due``)."""
        conn = self._conn
        if conn is None or not conn.is_open:
            return BATCH
        if not conn.writable:
            await self._wait()
            return None
        if self._qos != 1:
            return BATCH
        room = min(BATCH, self._window - len(conn.inflight) - 1)
        if room <= 0:
            await self._wait(inflight_at_most=self._window // 2)
            return None
        return room

    def _note_lag(self, lag: float) -> None:
        stats = self._stats
        stats.lag = lag
        if lag > stats.max_lag:
            stats.max_lag = lag

    def _send_due(
        self,
        slots: Iterator[Slot],
        pending: Slot | None,
        room: int,
        start: float,
        start_wall_ms: float,
        now: float,
    ) -> Slot | None:
        """Generate the messages due by ``now`` (at most ``room``, a duplicate counting
        twice) and write them in one go; returns the first slot not yet sent."""
        devices = self._devices
        per_slot = self._schedule.interval
        per_slot_ms = per_slot * 1000.0
        conn = self._conn
        if conn is not None and not conn.is_open:
            conn = None
        packets: list[bytes] = []
        while room > 0 and pending is not None:
            slot, position = pending
            if start + slot * per_slot > now:
                break
            device = devices[position]
            message = self._message(device, start_wall_ms + slot * per_slot_ms)
            copies = self._count(message)
            if conn is None:
                self._fail(device, copies, "disconnected")
            elif self._qos == 1:
                self._queue_qos1(
                    conn, device, self._parts(device, message[0]), message, copies, packets
                )
            else:
                self._queue_qos0(device, message, copies, packets)
            room -= copies
            pending = next(slots, None)
        if packets and conn is not None:
            conn.write(b"".join(packets))
        return pending

    def _message(self, device: Device, wall_ms: float) -> Message:
        """``device``'s message scheduled at ``wall_ms`` (a hook: Sparkplug nodes wrap it)."""
        return device.next_message(wall_ms)

    def _parts(self, device: Device, payload: bytes) -> list[tuple[bytes, bytes, bool]]:
        """What one message is on the wire (a hook: Sparkplug nodes send it their way)."""
        return _parts(device, payload)

    def _count(self, message: Message) -> int:
        """Count a generated message; returns how many copies of it go out."""
        _payload, _samples, bad, duplicate, late = message
        stats = self._stats
        stats.messages += 1
        stats.late += late
        if bad is not None:
            stats.bad[bad] += 1
        elif duplicate:
            stats.duplicates += 1
            return 2
        return 1

    def _fail(self, device: Device, copies: int, why: str) -> None:
        device.failed += copies
        self._stats.failed += copies
        self._stats.failures[why] += copies

    @staticmethod
    def _queue_qos1(
        conn: Connection,
        device: Device,
        parts: list[tuple[bytes, bytes, bool]],
        message: Message,
        copies: int,
        packets: list[bytes],
    ) -> None:
        # Published when the PUBACK arrives (_on_ack); the token says what to count then.
        samples = message[1]
        inflight = conn.inflight
        for copy in range(copies):
            for topic, part, carries in parts:
                mid = conn.next_mid()
                inflight[mid] = (device, copy == 1, samples if carries else 0)
                packets.append(publish_packet(topic, part, mid))

    def _queue_qos0(
        self, device: Device, message: Message, copies: int, packets: list[bytes]
    ) -> None:
        # Published when handed to the transport: counted now.
        payload, samples = message[0], message[1]
        stats = self._stats
        parts = self._parts(device, payload)
        for topic, part, _carries in parts:
            packet = publish_packet(topic, part)
            packets.append(packet)
            if copies == 2:
                packets.append(packet)
                stats.published_duplicates += 1
        device.published += copies * len(parts)
        stats.published += copies * len(parts)
        stats.samples += samples

    async def _drain(self) -> float:
        """Wait (at most ``ack_timeout``) for outstanding acknowledgements."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._ack_timeout
        while (
            not self._forced
            and (conn := self._conn) is not None
            and conn.inflight
            and loop.time() < deadline
        ):
            await self._wait(deadline, inflight_at_most=0)
        settled = loop.time()
        conn = self._conn
        if conn is not None and conn.inflight:
            self._fail_inflight(conn)
        return settled

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._forced:
            conn.abort()
            return
        conn.close()  # writes what is buffered (QoS 0 messages already counted), then closes
        try:
            async with asyncio.timeout(max(1.0, self._ack_timeout)):
                await conn.wait_closed()
        except TimeoutError:
            conn.abort()


#: The metrics of a sample, each on its own topic with ``--format value`` (``seq`` too: it is
#: what an audit reconciles).
VALUE_METRICS = ("seq", "temperature", "humidity", "battery", "rssi", "fw")


def _parts(device: Device, payload: bytes) -> list[tuple[bytes, bytes, bool]]:
    """What one message is on the wire: ``(topic, payload, carries its samples)``. With
    ``--format value``, one ``{"ts": ..., "value": ...}`` per metric, the seq's carrying the
    sample (so it is counted once)."""
    topics = device.metric_topics
    if topics is None:
        return [(device.wire_topic, payload, True)]
    sample = orjson.loads(payload)
    ts = sample.pop("ts")
    return [
        (topics[name], orjson.dumps({"ts": ts, "value": value}), name == "seq")
        for name, value in sample.items()
    ]
