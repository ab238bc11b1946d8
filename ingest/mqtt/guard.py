"""What the adapter needs of aiomqtt's and paho's private internals, checked in one place.

``ingest.mqtt.session`` reaches inside both libraries (docs/design.md, the source): the
versions it was tested with are pinned exactly in pyproject.toml, and every private attribute
it touches is listed here. ``check_internals`` runs on each new client, before it connects, so
a library that changed its insides stops the daemon with one line naming what is missing,
instead of a fast path that silently turns itself off or a ``AttributeError`` deep in a
socket callback.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

import paho.mqtt.client as paho

from ingest.errors import FatalError

__all__ = ["TESTED_VERSIONS", "check_internals", "internals_error"]

#: The versions the adapter was tested with; pyproject.toml pins exactly these.
TESTED_VERSIONS = {"aiomqtt": "2.5.1", "paho-mqtt": "2.2.0"}

#: aiomqtt.Client: the paho client inside it, its event loop, the future its paho
#: on_disconnect callback resolves.
AIOMQTT_CLIENT = ("_client", "_loop", "_disconnected")

#: paho.mqtt.client.Client: the socket and its read function (replaced by our buffered one),
#: the packet being read (``_in_packet["command"]`` is 0 between packets), the keepalive
#: clock we hold while not reading on purpose, the outgoing queue PUBACKs are written
#: through; and two public methods whose behaviour the adapter relies on.
PAHO_CLIENT = (
    "_sock",
    "_sock_recv",
    "_in_packet",
    "_last_bytes_received",
    "_ping_t",
    "_packet_queue",
    "manual_ack_set",
    "loop_read",
)

#: paho.mqtt.client.MQTTMessage: the raw topic bytes (its ``topic`` property raises on a topic
#: that is not UTF-8).
PAHO_MESSAGE = ("_topic",)


def internals_error(aiomqtt_client: Any) -> str | None:
    """What the adapter needs and ``aiomqtt_client`` lacks, or None."""
    for name in AIOMQTT_CLIENT:
        if not hasattr(aiomqtt_client, name):
            return f"aiomqtt.Client has no attribute {name!r}"
    inner = aiomqtt_client._client
    for name in PAHO_CLIENT:
        if not hasattr(inner, name):
            return f"paho.mqtt.client.Client has no attribute {name!r}"
    in_packet = inner._in_packet
    if not isinstance(in_packet, dict) or "command" not in in_packet:
        return "paho.mqtt.client.Client._in_packet has no 'command' entry"
    for name in PAHO_MESSAGE:
        if not hasattr(paho.MQTTMessage, name):
            return f"paho.mqtt.client.MQTTMessage has no attribute {name!r}"
    # aiomqtt registers its socket reader from paho's on_socket_open; the adapter wraps that
    # callback to put its own reader in place. Without it the fast path would never run.
    if getattr(inner, "on_socket_open", None) is None:
        return "aiomqtt.Client no longer sets paho's on_socket_open callback"
    return None


def check_internals(aiomqtt_client: Any) -> None:
    """Raise ``FatalError`` naming the first missing internal and the tested versions."""
    problem = internals_error(aiomqtt_client)
    if problem is not None:
        raise FatalError(
            f"MQTT client library internals changed: {problem}; this daemon is tested with "
            f"{_versions(TESTED_VERSIONS)}, installed: {_versions(_installed())} "
            "(install with the project's constraints.txt)"
        )


def _installed() -> dict[str, str]:
    out = {}
    for name in TESTED_VERSIONS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "?"
    return out


def _versions(versions: dict[str, str]) -> str:
    return ", ".join(f"{name}=={version}" for name, version in versions.items())
