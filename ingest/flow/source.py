"""Stages 1-2, the source: MQTT messages in, decoded ``Delivery`` values out.

One persistent session (stable client id, QoS 1, ``clean_session=False`` / v5 ``clean_start=False``
with a session expiry), a fresh ``Client`` per connection, reconnecting forever with capped,
jittered backoff. Decoding is a pure function called here, so what goes into the bounded channel
is already readings or a dead letter. When the channel is full the source stops taking messages:
unacknowledged messages then wait at the broker, whose in-flight window bounds what the client
library holds, and memory stays flat however long the database is away.

Stopping (``stop_reading``) closes the channel's send side; the batcher sees ``EndOfStream``,
the writer flushes and acknowledges, the pipeline sets ``drained``, and only then does the
source disconnect (keeping the session), so the last acknowledgements still go out.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime

import aiomqtt
import anyio
from anyio.streams.memory import MemoryObjectSendStream

from ingest.backoff import Backoff
from ingest.errors import DecodeError
from ingest.flow.acker import Acker, Delivery
from ingest.formats.decode import TopicTemplate, decode
from ingest.model import Envelope, SourceStatistics, build
from ingest.mqtt.session import MqttSession
from ingest.settings import Settings

__all__ = ["Source"]


class Source:
    def __init__(
        self,
        settings: Settings,
        *,
        acker: Acker,
        drained: anyio.Event,
        log: logging.Logger | None = None,
    ) -> None:
        self._settings = settings
        self._template = TopicTemplate(settings.topic)
        self._filter = self._template.filter
        if settings.share_group:
            self._filter = f"$share/{settings.share_group}/{self._filter}"
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

    @property
    def filter(self) -> str:
        return self._filter

    def stop_reading(self) -> None:
        """Stop taking messages; what is already in the channel is still written and acked."""
        self._stopping = True
        if self._scope is not None:
            self._scope.cancel()

    def statistics(self) -> SourceStatistics:
        return SourceStatistics(
            received=self.received,
            decode_errors=dict(self.decode_errors),
            fields_skipped=self.fields_skipped,
            connected=self._session is not None and self._session.connected,
            subscribed=self.subscribed,
            connects=self.connects,
            inbox=len(self._session.inbox) if self._session is not None else 0,
            disconnects=dict(self.disconnects),
        )

    def _new_session(self) -> MqttSession:
        s = self._settings
        return MqttSession(
            s.mqtt_endpoint(),
            client_id=s.client_id,
            protocol=s.mqtt_protocol,
            keepalive=s.mqtt_keepalive,
            receive_maximum=s.mqtt_inflight,
            session_expiry=s.mqtt_session_expiry,
        )

    async def run(self, send: MemoryObjectSendStream[Delivery]) -> None:
        endpoint = self._settings.mqtt_endpoint()
        where = f"{endpoint.host}:{endpoint.port}"
        backoff = Backoff(initial=0.2, maximum=self._settings.retry_max_delay)
        failures = 0
        async with send:
            while not self._stopping:
                session = self._new_session()
                self._session = session
                try:
                    async with session.client:
                        suback = session.subscribe(self._filter, qos=1)

                        def subscribed() -> None:
                            nonlocal failures
                            self.subscribed = True
                            self.connects += 1
                            self._log.info(
                                "subscribed to %s at %s as %s (MQTT %s)%s",
                                self._filter,
                                where,
                                self._settings.client_id,
                                self._settings.mqtt_protocol,
                                f" after {failures} failed attempts" if failures else "",
                            )
                            failures = 0
                            backoff.reset()

                        with anyio.CancelScope() as self._scope:
                            if not self._stopping:
                                await self._pump(session, send, suback, subscribed)
                        self._scope = None
                        # Stopping: let the pipeline drain and acknowledge on this connection.
                        await send.aclose()
                        await self._drained.wait()
                        self._log.info("disconnecting from %s (session kept)", where)
                    return
                except aiomqtt.MqttError as exc:
                    self.subscribed = False
                    session.closed = True
                    reason = _reason(exc)
                    if self.connects and failures == 0:
                        self.disconnects[reason] += 1
                    failures += 1
                    delay = backoff.next_delay()
                    # One line per attempt (attempts are spaced by the backoff), not a flood.
                    self._log.warning(
                        "MQTT broker %s unavailable (%s); attempt %d, retrying in %.1fs",
                        where,
                        exc,
                        failures,
                        delay,
                    )
                    if len(session.inbox):
                        # Not acknowledged: the broker redelivers them on the next connection.
                        self._log.info(
                            "dropped %d unacknowledged messages of the lost connection "
                            "(the broker redelivers them)",
                            len(session.inbox),
                        )
                        session.inbox.clear()
                    with anyio.CancelScope() as self._scope:
                        if not self._stopping:
                            await anyio.sleep(delay)
                    self._scope = None
                finally:
                    session.closed = True
                    self.subscribed = False

    async def _pump(
        self,
        session: MqttSession,
        send: MemoryObjectSendStream[Delivery],
        suback: asyncio.Future[None],
        on_subscribed: Callable[[], None],
    ) -> None:
        """Decode and hand on messages. Reading starts before the SUBACK: a resumed session's
        backlog may arrive first, and it belongs to us."""
        inbox = session.inbox
        template = self._template
        acker = self._acker
        decode_errors = self.decode_errors
        pending: asyncio.Future[None] | None = suback
        while True:
            if pending is not None and pending.done():
                pending.result()  # raises MqttError when the broker refused the subscription
                pending = None
                on_subscribed()
            if not inbox:
                await session.wait_inbox(pending)
                continue
            received_at = datetime.now(UTC)
            while inbox:
                if pending is not None and pending.done():
                    break  # the SUBACK: report it now, not once a long backlog is drained
                topic, payload, qos, mid = inbox.popleft()
                if session.paused:
                    session.resume_if_drained()
                result = decode(topic, payload, received_at, template)
                if isinstance(result, DecodeError):
                    decode_errors[result.reason] += 1
                else:
                    self.fields_skipped += result.skipped
                delivery = build(
                    Delivery,
                    (
                        build(Envelope, (topic, payload, received_at, result, None)),
                        session,
                        mid,
                        qos,
                    ),
                )
                self.received += 1
                acker.received()
                try:
                    send.send_nowait(delivery)
                except anyio.WouldBlock:
                    await send.send(delivery)  # backpressure: stop reading until there is room
                    received_at = datetime.now(UTC)


def _reason(exc: BaseException) -> str:
    text = str(exc).lower()
    if "refused" in text or "not authori" in text:
        return "refused"
    if "timed out" in text or "timeout" in text:
        return "timeout"
    if "disconnected" in text:
        return "disconnected"
    return "error"
