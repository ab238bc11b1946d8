"""The naive baseline: paho + one autocommitted INSERT per message, acknowledged by paho.

What a first script usually looks like: ``json.loads`` each message and run one ``INSERT`` of
its readings (K rows in one VALUES list) on a single connection, in autocommit; paho
acknowledges the message when the callback returns. Run on a subset of the backlog and
extrapolated: prints ``first`` / ``done`` (``time.time()`` of the first message received and of
the last INSERT committed), ``received`` and ``peak_rss_mb``.

Uses asyncpg on a private event loop (the project's own driver; psycopg is not a dependency):
each ``INSERT`` is one synchronous round trip, as with psycopg.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from benchmarks._procstat import peak_rss_mb
from benchmarks._tls import client_endpoint


def _ts(value: Any) -> datetime:
    seconds = value / 1000 if value > 1e11 else value
    return datetime.fromtimestamp(seconds, UTC)


def _rows(topic: str, payload: bytes | bytearray) -> list[tuple[str, str, datetime, float]]:
    device = topic.split("/")[1]
    body = json.loads(payload)
    rows = []
    for sample in body if isinstance(body, list) else [body]:
        ts = _ts(sample["ts"])
        for key, value in sample.items():
            if key != "ts" and isinstance(value, int | float) and not isinstance(value, bool):
                rows.append((device, key, ts, float(value)))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks._naive")
    p.add_argument("--url", required=True, help="mqtt://... or mqtts://...")
    p.add_argument("--ca-file", default=None, help="CA for an mqtts:// URL (default: system's)")
    p.add_argument("--client-id", required=True)
    p.add_argument("--dsn", required=True)
    p.add_argument("--messages", type=int, required=True)
    p.add_argument("--protocol", choices=("3.1.1", "5"), default="3.1.1")
    a = p.parse_args()

    loop = asyncio.new_event_loop()
    conn: asyncpg.Connection[Any] = loop.run_until_complete(asyncpg.connect(a.dsn))
    sqls: dict[int, str] = {}
    received = 0
    first = done = 0.0

    def insert(rows: list[tuple[str, str, datetime, float]]) -> None:
        n = len(rows)
        if n not in sqls:
            values = ",".join(
                f"(${4 * i + 1},${4 * i + 2},${4 * i + 3},${4 * i + 4})" for i in range(n)
            )
            sqls[n] = f"INSERT INTO readings (device_id, metric, ts, value) VALUES {values}"
        args = [x for row in rows for x in row]
        loop.run_until_complete(conn.execute(sqls[n], *args))

    def on_message(client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        nonlocal received, first, done
        if received >= a.messages:
            return  # already in flight past the subset; the harness wipes the session after
        received += 1
        if received == 1:
            first = time.time()
        insert(_rows(msg.topic, msg.payload))
        if received == a.messages:
            done = time.time()
            client.disconnect()

    v5 = a.protocol == "5"
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=a.client_id,
        protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        clean_session=None if v5 else False,
    )
    client.on_message = on_message
    endpoint, tls = client_endpoint(a.url, a.ca_file)
    if tls is not None:
        client.tls_set_context(tls)
    if endpoint.username is not None:
        client.username_pw_set(endpoint.username, endpoint.password)
    if v5:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 0xFFFFFFFF
        client.connect(endpoint.host, endpoint.port, clean_start=False, properties=props)
    else:
        client.connect(endpoint.host, endpoint.port)
    client.loop_forever()
    loop.run_until_complete(conn.close())
    loop.close()
    rss = peak_rss_mb(os.getpid(), tree=False)
    json.dump({"first": first, "done": done, "received": received, "peak_rss_mb": rss}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
