"""The one place that reaches inside aiomqtt (2.5) and paho-mqtt (2.x).

aiomqtt has no public API for manual acknowledgement, so this adapter:

* switches the paho client inside aiomqtt to manual acks before connecting
  (``_client.manual_ack_set(True)``) and sends PUBACKs with ``_client.ack(mid, qos)``;
* replaces aiomqtt's per-message ``on_message`` (which wraps every message in a validated
  ``Topic`` and an ``asyncio.Queue`` round trip) by a callback that appends a plain tuple to a
  deque. The deque needs no bound of its own: we acknowledge only after commit, so the broker's
  in-flight window is the most it can ever hold, and nothing is ever discarded here (aiomqtt's
  own queue drops messages when ``max_queued_incoming_messages`` is hit);
* exposes the "disconnected" future so the source notices a dead connection.

Keep this module small: it is what has to change when aiomqtt grows a public manual-ack API.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest.settings import MqttEndpoint

__all__ = ["Inbound", "MqttSession"]

# (topic, payload, qos, mid): the fields we need of a paho MQTTMessage.
Inbound = tuple[str, bytes, int, int]


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
    ) -> None:
        v5 = protocol == "5"
        properties: Properties | None = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            # aiomqtt's default clean_start (first connection only) would wipe our session on
            # every new Client; an expiry keeps it (and its queue) while we are away.
            properties.SessionExpiryInterval = session_expiry
            properties.ReceiveMaximum = min(receive_maximum, 65535)
        self.client = aiomqtt.Client(
            endpoint.host,
            endpoint.port,
            username=endpoint.username,
            password=endpoint.password,
            identifier=client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            clean_session=None if v5 else False,
            clean_start=False if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            keepalive=keepalive,
            properties=properties,
            tls_context=ssl.create_default_context() if endpoint.tls else None,
            timeout=10,
        )
        self._paho: paho.Client = self.client._client
        self._paho.manual_ack_set(True)
        self._paho.on_message = self._on_message
        self.inbox: deque[Inbound] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False

    def _on_message(self, _client: Any, _userdata: Any, msg: paho.MQTTMessage) -> None:
        self.inbox.append((msg.topic, bytes(msg.payload), msg.qos, msg.mid))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_inbox(self) -> None:
        """Wait until a message is in ``inbox``; raise ``aiomqtt.MqttError`` on disconnect."""
        disconnected: asyncio.Future[None] = self.client._disconnected
        while not self.inbox:
            if disconnected.done():
                raise aiomqtt.MqttError("disconnected from the broker") from (
                    disconnected.exception() if not disconnected.cancelled() else None
                )
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await asyncio.wait((waiter, disconnected), return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._waiter = None
                if not waiter.done():
                    waiter.cancel()

    @property
    def connected(self) -> bool:
        return not self.closed and not self.client._disconnected.done()

    def ack(self, mid: int, qos: int) -> bool:
        """Send the PUBACK for ``mid``; False when this connection is gone (the broker will
        redeliver the message on the next connection, and the idempotent write absorbs it)."""
        if qos == 0:
            return True
        if not self.connected:
            return False
        return self._paho.ack(mid, qos) == paho.MQTT_ERR_SUCCESS
