"""The ceiling per worker: a bare aiomqtt client draining its session with manual acks.

``python -m benchmarks._bare --url mqtt://127.0.0.1:PORT --client-id ID --messages N`` connects
to the persistent session ``ID`` (registered beforehand), acknowledges every message as it
arrives and does nothing else. Prints one JSON object: ``first`` and ``done`` (``time.time()``
of the first message and of the N-th acknowledgement) and ``received``. An ``mqtts://`` URL
is verified against ``--ca-file`` (or the system's certificates), host name included, as the
daemon does.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import ssl
import sys
import time
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from benchmarks._procstat import peak_rss_mb
from benchmarks._tls import client_endpoint
from ingest.urls import MqttEndpoint


def _client(
    endpoint: MqttEndpoint, tls: ssl.SSLContext | None, client_id: str, protocol: str
) -> aiomqtt.Client:
    common: dict[str, Any] = {
        "identifier": client_id,
        "username": endpoint.username,
        "password": endpoint.password,
        "tls_context": tls,
    }
    if protocol == "5":
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 0xFFFFFFFF
        return aiomqtt.Client(
            endpoint.host,
            endpoint.port,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=properties,
            **common,
        )
    return aiomqtt.Client(
        endpoint.host,
        endpoint.port,
        protocol=aiomqtt.ProtocolVersion.V311,
        clean_session=False,
        **common,
    )


async def drain(
    endpoint: MqttEndpoint,
    tls: ssl.SSLContext | None,
    client_id: str,
    messages: int,
    protocol: str,
) -> dict[str, float | None]:
    client = _client(endpoint, tls, client_id, protocol)
    client._client.manual_ack_set(True)
    received = 0
    first = done = 0.0
    async with client:
        async for m in client.messages:
            client._client.ack(m.mid, m.qos)
            received += 1
            if received == 1:
                first = time.time()
            if received >= messages:
                done = time.time()
                break
        # Let the last PUBACKs leave before disconnecting (not timed): with a large window
        # paho may still hold some, and the broker would redeliver them.
        for _ in range(5000):  # at most 5 s
            if not client._client._out_packet:
                break
            await asyncio.sleep(0.001)
    return {
        "first": first,
        "done": done,
        "received": received,
        "peak_rss_mb": peak_rss_mb(os.getpid(), tree=False),
    }


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks._bare")
    p.add_argument("--url", required=True, help="mqtt://... or mqtts://...")
    p.add_argument("--ca-file", default=None, help="CA for an mqtts:// URL (default: system's)")
    p.add_argument("--client-id", required=True)
    p.add_argument("--messages", type=int, required=True)
    p.add_argument("--protocol", choices=("3.1.1", "5"), default="3.1.1")
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    a = p.parse_args()
    # Reads the CA file: blocking I/O, so before the event loop starts.
    endpoint, tls = client_endpoint(a.url, a.ca_file)
    coro = drain(endpoint, tls, a.client_id, a.messages, a.protocol)
    if a.loop == "uvloop":
        # Optional (the project's `fast` extra): imported by name so its absence type-checks.
        uvloop = importlib.import_module("uvloop")
        result = uvloop.run(coro)
    else:
        result = asyncio.run(coro)
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
