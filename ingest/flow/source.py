"""Stages 1-2, the source: MQTT messages in, decoded ``Delivery`` values out.

One persistent session (stable client id, QoS 1, ``clean_session=False`` / v5 ``clean_start=False``
with a session expiry), a fresh ``Client`` per connection, reconnecting forever with capped,
jittered backoff. Decoding is a pure function called here, so what goes into the bounded channel
is already readings or a dead letter. When the channel is full the source stops taking messages:
unacknowledged messages then wait at the broker, whose in-flight window bounds what the client
library holds, and memory stays flat however long the database is away. Memory is bounded in
bytes as well (docs/design.md, Limits): the source stops taking messages while the payload
bytes not yet acknowledged are over ``INGEST_MQTT_INFLIGHT_BYTES``, and the session stops
reading the socket when its inbox holds more than that.

Decoding is CPU work: after every ~256 KiB of payload decoded the source lets the other tasks
run, and a payload of 256 KiB or more is decoded in a worker thread (the interpreter hands the
event loop its turn every few milliseconds meanwhile), so neither a burst of messages nor one
of the largest and costliest shapes stalls the loop for long.

A route may keep state across messages (Sparkplug's alias tables, ``ingest.formats.sparkplug``),
made with the route table, so once per process and kept across reconnects. Before its first
connection the source rebuilds it from the Sparkplug births stored in the database, and after
each run of decoding it publishes (QoS 0) the Rebirth requests the decoder recorded.

Stopping (``stop_reading``) closes the channel's send side; the batcher sees ``EndOfStream``,
the writer flushes and acknowledges, the pipeline sets ``drained``, and only then does the
source disconnect (keeping the session), so the last acknowledgements still go out.

A source made with ``retiring=True`` drains the session of a worker that is gone (``ingest
sessions retire``): it connects with that worker's client id and, instead of subscribing,
unsubscribes from the route filters, so the broker adds nothing new to the session while the
messages it had queued are delivered, written and acknowledged as usual. It does not
reconnect: a failed or lost connection is an error naming the cause (the session is kept,
nothing is lost).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from functools import partial

import aiomqtt
import anyio
import anyio.lowlevel
import anyio.to_thread
import asyncpg
from anyio.streams.memory import MemoryObjectSendStream

from ingest.backoff import Backoff
from ingest.errors import ConfigError, DecodeError, FatalError
from ingest.flow.acker import Acker, Delivery
from ingest.flow.births import Birth, decode_births
from ingest.formats.decode import Limits, decode, load_routes
from ingest.formats.sparkplug import SparkplugState
from ingest.model import (
    Decoded,
    Envelope,
    SessionStatistics,
    SourceStatistics,
    SparkplugStatistics,
    build,
)
from ingest.mqtt.answers import explain
from ingest.mqtt.session import Inbound, MqttSession
from ingest.mqtt.tls import credentials, tls_context
from ingest.settings import Settings

__all__ = ["STABLE_AFTER", "Source"]

#: Seconds a connection must last before the reconnect backoff starts over. A broker that
#: takes every connection away at once (another client with our id, credentials revoked after
#: CONNACK) then meets a growing delay, not a reconnect every fraction of a second.
STABLE_AFTER = 10.0

# Payload bytes decoded between two turns of the other tasks, and the payload size from which
# one message is decoded in a worker thread. Decoding runs at 10 to 50 MB/s depending on the
# shape (nested objects with a number orjson cannot read are the slowest): a 1 MiB payload
# can take 100 ms on its own, while 256 KiB stays well under it.
_DECODED_BETWEEN_YIELDS = 256 * 1024
_DECODE_APART_FROM = 256 * 1024


class Source:
    def __init__(
        self,
        settings: Settings,
        *,
        acker: Acker,
        drained: anyio.Event,
        log: logging.Logger | None = None,
        retiring: bool = False,
        births: Callable[[], AsyncIterator[list[Birth]]] | None = None,
    ) -> None:
        """``births``: the Sparkplug births stored in the database, oldest first (the
        writer's ``sparkplug_births``), fed to the decoder before the first connection."""
        self._settings = settings
        self._retiring = retiring
        #: the broker held a session for our client id when we (last) connected
        self.session_present: bool | None = None
        self._births = births
        self._routes = load_routes(settings)
        # Every route's filter, in one SUBSCRIBE of one session. Overlapping filters make the
        # broker deliver a message once per matching subscription: the key absorbs the copy
        # and the writer counts it as a duplicate (README, Routes).
        self._subscriptions = self._routes.subscriptions(settings.share_group)
        self._filter = ", ".join(f for f, _ in self._subscriptions)
        # Route states that may ask for messages to be published (Sparkplug Rebirth requests).
        self._states = self._routes.states
        self._acker = acker
        self._drained = drained
        self._log = log or logging.getLogger("ingest.source")
        self._stopping = False
        self._scope: anyio.CancelScope | None = None
        self._session: MqttSession | None = None
        self.subscribed = False
        self.received = 0
        self.fields_skipped = 0
        self.decode_errors: Counter[str] = Counter()
        self.connects = 0
        self.disconnects: Counter[str] = Counter()
        self._limits = Limits.from_settings(settings)
        endpoint = settings.mqtt_endpoint()
        self._where = f"{endpoint.host}:{endpoint.port}"
        self._backoff = Backoff(initial=0.2, maximum=settings.retry_max_delay)
        self._failures = 0  # attempts since the last connection that lasted
        self._connected_at: float | None = None
        self._tls: ssl.SSLContext | None = None
        self._tls_loaded = False
        self._past = SessionStatistics(0, 0, 0)  # of the connections before the current one

    @property
    def filter(self) -> str:
        """The subscription filters, comma-separated (for log lines)."""
        return self._filter

    def stop_reading(self) -> None:
        """Stop taking messages; what is already in the channel is still written and acked."""
        self._stopping = True
        if self._scope is not None:
            self._scope.cancel()

    def statistics(self) -> SourceStatistics:
        read = self._past
        if self._session is not None:
            read = _plus(read, self._session.statistics())
        return SourceStatistics(
            received=self.received,
            decode_errors=dict(self.decode_errors),
            fields_skipped=self.fields_skipped,
            connected=self._session is not None and self._session.connected,
            subscribed=self.subscribed,
            connects=self.connects,
            inbox=len(self._session.inbox) if self._session is not None else 0,
            disconnects=dict(self.disconnects),
            parsed_fast=read.fast_path,
            parsed_paho=read.paho_path,
            too_large=read.too_large,
            sparkplug=self._sparkplug_statistics(),
        )

    def _sparkplug_statistics(self) -> SparkplugStatistics | None:
        found = [s.statistics() for s in self._states if isinstance(s, SparkplugState)]
        if not found:
            return None
        return SparkplugStatistics(*(sum(column) for column in zip(*found, strict=True)))

    def _new_session(self, tls: ssl.SSLContext | None) -> MqttSession:
        s = self._settings
        login = credentials(s)
        return MqttSession(
            s.mqtt_endpoint(),
            client_id=s.client_id,
            protocol=s.mqtt_protocol,
            keepalive=s.mqtt_keepalive,
            receive_maximum=s.mqtt_inflight,
            session_expiry=s.mqtt_session_expiry,
            max_payload=s.max_payload_bytes,
            max_inbox_bytes=s.mqtt_inflight_bytes,
            username=login.username,
            password=login.password,
            tls_context=tls,
        )

    async def run(self, send: MemoryObjectSendStream[Delivery]) -> None:
        async with send:
            await self._restore_births()
            while not self._stopping:
                session = self._new_session(await self._tls_context())
                self._use(session)
                try:
                    await self._connection(session, send)
                    return
                except aiomqtt.MqttError as exc:
                    if self._retiring:
                        raise self._retire_failed(exc) from None  # the text names it
                    await self._retry_after(session, exc)
                finally:
                    session.closed = True
                    self.subscribed = False

    async def _restore_births(self) -> None:
        """Rebuild the Sparkplug alias tables from the births stored in the database, before
        the broker hands us the data it kept for us (in a worker thread, a page at a time).
        Without them (a database error) every node is asked for its births instead."""
        if self._births is None or not any(isinstance(s, SparkplugState) for s in self._states):
            return
        restored = 0
        try:
            async for page in self._births():
                await anyio.to_thread.run_sync(decode_births, page, self._routes, self._limits)
                restored += len(page)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self._log.warning(
                "could not read the stored Sparkplug births (%s): data by alias of the nodes "
                "not restored will ask them for their births",
                exc,
            )
        self._log.info("restored the alias tables of %d Sparkplug births", restored)

    def _use(self, session: MqttSession) -> None:
        """Make ``session`` the current one; the counts of the one before are kept."""
        if self._session is not None:
            self._past = _plus(self._past, self._session.statistics())
        self._session = session

    async def _tls_context(self) -> ssl.SSLContext | None:
        """Read the TLS files again for each connection (renewed certificates are picked up);
        in a worker thread, since it reads files. At start-up a file that cannot be used is a
        configuration error; later the previous context is kept and the problem logged."""
        try:
            self._tls = await anyio.to_thread.run_sync(tls_context, self._settings)
        except ConfigError as exc:
            if not self._tls_loaded:
                raise
            self._log.error("%s; connecting with the files read before", exc)
        self._tls_loaded = True
        return self._tls

    async def _connection(
        self, session: MqttSession, send: MemoryObjectSendStream[Delivery]
    ) -> None:
        """One connection, from CONNACK to the drain on stopping (the session is kept)."""
        async with session.client:
            self._connected_at = time.monotonic()
            self.session_present = session.session_present
            if self._retiring:
                suback = session.unsubscribe([f for f, _ in self._subscriptions])
            else:
                suback = session.subscribe(self._subscriptions)
            with anyio.CancelScope() as self._scope:
                if not self._stopping:
                    await self._pump(session, send, suback)
            self._scope = None
            # Stopping: let the pipeline drain and acknowledge on this connection.
            await send.aclose()
            await self._drained.wait()
            self._log.info("disconnecting from %s (session kept)", self._where)

    def _on_subscribed(self) -> None:
        self.subscribed = True
        self.connects += 1
        if self._retiring:
            self._log.info(
                "draining the session of %s at %s (%s; unsubscribed from %s)",
                self._settings.client_id,
                self._where,
                "the broker held it" if self.session_present else "the broker held none",
                self._filter,
            )
            return
        self._log.info(
            "subscribed to %s at %s as %s (MQTT %s)%s",
            self._filter,
            self._where,
            self._settings.client_id,
            self._settings.mqtt_protocol,
            f" after {self._failures} failed attempts" if self._failures else "",
        )

    def _retire_failed(self, exc: aiomqtt.MqttError) -> FatalError:
        lasted = None if self._connected_at is None else time.monotonic() - self._connected_at
        answer = explain(
            exc,
            client_id=self._settings.client_id,
            lost_soon=lasted is not None and lasted < STABLE_AFTER,
        )
        return FatalError(f"MQTT broker {self._where}: {answer.text}")

    async def _retry_after(self, session: MqttSession, exc: aiomqtt.MqttError) -> None:
        """Name what went wrong, count it, and wait (capped, jittered backoff). The backoff
        restarts only after a connection that lasted: one taken away at once (another client
        with our id, credentials revoked after CONNACK) must not turn into a reconnect loop."""
        self.subscribed = False
        session.closed = True
        lasted = None if self._connected_at is None else time.monotonic() - self._connected_at
        self._connected_at = None
        if lasted is not None and lasted >= STABLE_AFTER:
            self._backoff.reset()
            self._failures = 0
        answer = explain(
            exc,
            client_id=self._settings.client_id,
            lost_soon=lasted is not None and lasted < STABLE_AFTER,
        )
        if lasted is not None or answer.cause in ("not_authorized", "tls"):
            self.disconnects[answer.cause] += 1
        self._failures += 1
        delay = self._backoff.next_delay()
        # One line per attempt (attempts are spaced by the backoff), not a flood.
        self._log.log(
            logging.ERROR if answer.cause in ("not_authorized", "tls") else logging.WARNING,
            "MQTT broker %s: %s; attempt %d, retrying in %.1fs",
            self._where,
            answer.text,
            self._failures,
            delay,
        )
        if session.inbox:
            # Not acknowledged: the broker redelivers them on the next connection.
            self._log.info(
                "dropped %d unacknowledged messages of the lost connection "
                "(the broker redelivers them)",
                session.discard(),
            )
        with anyio.CancelScope() as self._scope:
            if not self._stopping:
                await anyio.sleep(delay)
        self._scope = None

    async def _pump(
        self,
        session: MqttSession,
        send: MemoryObjectSendStream[Delivery],
        suback: asyncio.Future[None],
    ) -> None:
        """Decode and hand on messages. Reading starts before the SUBACK: a resumed session's
        backlog may arrive first, and it belongs to us."""
        pending: asyncio.Future[None] | None = suback
        while True:
            if pending is not None and pending.done():
                pending.result()  # raises MqttError when the broker refused the subscription
                pending = None
                self._on_subscribed()
            if not session.inbox:
                await session.wait_inbox(pending)
                continue
            await self._hand_on(session, send, pending)
            if self._states:
                self._send_requests(session)

    async def _hand_on(
        self,
        session: MqttSession,
        send: MemoryObjectSendStream[Delivery],
        pending: asyncio.Future[None] | None,
    ) -> None:
        """Decode what the inbox holds and send it on, until it is empty or the SUBACK came
        (reported at once, not once a long backlog is drained). Yields to the other tasks every
        ``_DECODED_BETWEEN_YIELDS`` bytes, and waits while the bytes not yet acknowledged are
        over the bound; ``received_at`` is taken afresh after every wait."""
        inbox = session.inbox
        take = session.take
        acker = self._acker
        bound = self._settings.mqtt_inflight_bytes
        routes = self._routes
        limits = self._limits
        errors = self.decode_errors
        received_at = datetime.now(UTC)
        decoded = 0  # payload bytes decoded since the other tasks last had a turn
        while inbox and (pending is None or not pending.done()):
            message = take()
            topic, payload, qos, mid, size = message
            n = len(payload)
            if size is None and n < _DECODE_APART_FROM:  # the common case, kept inline
                result = decode(topic, payload, received_at, routes, limits=limits)
                if isinstance(result, DecodeError):
                    errors[result.reason] += 1
                else:
                    self.fields_skipped += result.skipped
                envelope = build(Envelope, (topic, payload, received_at, result, None))
                delivery = build(Delivery, (envelope, session, mid, qos))
            elif size is None:
                delivery = await self._delivery_apart(session, message, received_at)
                decoded = _DECODED_BETWEEN_YIELDS  # the loop had its turns meanwhile
            else:
                delivery = self._delivery(session, message, received_at)
            self.received += 1
            acker.received(n)
            decoded += n
            try:
                send.send_nowait(delivery)
            except anyio.WouldBlock:
                await send.send(delivery)  # backpressure: stop reading until there is room
            else:
                if decoded < _DECODED_BETWEEN_YIELDS and acker.outstanding_bytes <= bound:
                    continue
                if acker.outstanding_bytes > bound:
                    await acker.wait_bytes_at_most(bound)  # the bytes bound: as above
                else:
                    await anyio.lowlevel.checkpoint()
            received_at = datetime.now(UTC)
            decoded = 0
            if self._states:  # a long backlog must not hold the requests back
                self._send_requests(session)

    def _send_requests(self, session: MqttSession) -> None:
        """Publish (QoS 0) what the routes' states ask for: Sparkplug Rebirth requests, which
        the decoder records for edge nodes whose data names an alias we do not know."""
        for state in self._states:
            requests = state.take_requests(time.time())
            if not requests:
                continue
            sent = sum(session.publish(topic, payload) for topic, payload in requests)
            state.requests_sent(sent, len(requests) - sent)
            self._log.info(
                "asked %d edge nodes for their births again (data named unknown aliases), "
                "%d not sent (no connection): %s",
                sent,
                len(requests) - sent,
                ", ".join(topic for topic, _ in requests[:5])
                + (", ..." if len(requests) > 5 else ""),
            )

    async def _delivery_apart(
        self, session: MqttSession, message: Inbound, received_at: datetime
    ) -> Delivery:
        """``_delivery`` for a large payload: decoded in a worker thread (``decode`` is pure),
        counted here."""
        result = await anyio.to_thread.run_sync(
            partial(decode, limits=self._limits), message[0], message[1], received_at,
            self._routes,
        )  # fmt: skip
        return self._delivery(session, message, received_at, result)

    def _delivery(
        self,
        session: MqttSession,
        message: Inbound,
        received_at: datetime,
        result: Decoded | DecodeError | None = None,
    ) -> Delivery:
        """The delivery of a message decoded apart (``result``), or of one the session kept
        only in part (its ``size`` set: over the limit, never decoded). The common case is
        built inline in ``_hand_on``, where a call per message shows in the profile."""
        topic, payload, qos, mid, size = message
        if size is not None:
            result = DecodeError(
                "too_large",
                f"payload of {size} bytes is over INGEST_MAX_PAYLOAD_BYTES "
                f"({self._settings.max_payload_bytes}); its first {len(payload)} bytes kept",
            )
        assert result is not None
        if isinstance(result, DecodeError):
            self.decode_errors[result.reason] += 1
        else:
            self.fields_skipped += result.skipped
        return build(
            Delivery,
            (build(Envelope, (topic, payload, received_at, result, size)), session, mid, qos),
        )


def _plus(a: SessionStatistics, b: SessionStatistics) -> SessionStatistics:
    return SessionStatistics(*(x + y for x, y in zip(a, b, strict=True)))
