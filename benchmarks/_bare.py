"""The ceiling per worker: a bare aiomqtt client draining its session with manual acks.

``python -m benchmarks._bare --url mqtt://127.0.0.1:PORT --client-id ID --messages N`` connects
to the persistent session ``ID`` (registered beforehand), acknowledges every message as it
arrives and does nothing else. Prints one JSON object: ``first`` and ``done`` (``time.time()``
of the first message and of the N-th acknowledgement) and ``received``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
import time
from urllib.parse import urlsplit

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from benchmarks._procstat import peak_rss_mb


async def drain(url: str, client_id: str, messages: int, protocol: str) -> dict[str, float | None]:
    parts = urlsplit(url)
    v5 = protocol == "5"
    if v5:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 0xFFFFFFFF
        client = aiomqtt.Client(
            parts.hostname or "127.0.0.1",
            parts.port or 1883,
            identifier=client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=properties,
        )
    else:
        client = aiomqtt.Client(
            parts.hostname or "127.0.0.1",
            parts.port or 1883,
            identifier=client_id,
            protocol=aiomqtt.ProtocolVersion.V311,
            clean_session=False,
        )
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
    p.add_argument("--url", required=True)
    p.add_argument("--client-id", required=True)
    p.add_argument("--messages", type=int, required=True)
    p.add_argument("--protocol", choices=("3.1.1", "5"), default="3.1.1")
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    a = p.parse_args()
    coro = drain(a.url, a.client_id, a.messages, a.protocol)
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
