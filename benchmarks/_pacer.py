"""A paced QoS 1 publisher: the stand-in for ``simulate`` when it is not installed.

``python -m benchmarks._pacer --url URL --devices D --rate-total R --duration S`` publishes R
messages per second in total, round-robin over D devices (``devices/dev-NNNNN/telemetry``),
each payload stamped at publish time: ``ts`` is ``time.time()`` in epoch milliseconds (unique
per device), so ``commit time - ts`` is the publish-to-commit latency. Prints one JSON object
like ``simulate --report json``: ``published`` (acknowledged by the broker), ``failed``,
``seconds``, ``rate``, ``devices``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from benchmarks._backlog import device_id, dumps, sample_body
from benchmarks._tls import client_endpoint


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks._pacer")
    p.add_argument("--url", required=True, help="mqtt://... or mqtts://...")
    p.add_argument("--ca-file", default=None, help="CA for an mqtts:// URL (default: system's)")
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--rate-total", type=float, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--readings", type=int, default=5)
    a = p.parse_args()

    endpoint, tls = client_endpoint(a.url, a.ca_file)
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    if tls is not None:
        client.tls_set_context(tls)
    if endpoint.username is not None:
        client.username_pw_set(endpoint.username, endpoint.password)
    client.max_inflight_messages_set(100)
    acked = 0
    lock = threading.Lock()

    def on_publish(*_args: Any) -> None:
        nonlocal acked
        with lock:
            acked += 1

    client.on_publish = on_publish
    client.connect(endpoint.host, endpoint.port)
    client.loop_start()
    topics = [f"devices/{device_id(d)}/telemetry" for d in range(a.devices)]
    last_ts = [0] * a.devices
    seqs = [0] * a.devices
    total = int(a.rate_total * a.duration)
    sent = failed = 0
    started = time.monotonic()
    while sent < total:
        due = min(total, int((time.monotonic() - started) * a.rate_total) + 1)
        while sent < due:
            d = sent % a.devices
            now_ms = int(time.time() * 1000)
            ts = last_ts[d] = max(now_ms, last_ts[d] + 1)
            seqs[d] += 1
            body = sample_body(ts, seqs[d], a.readings)
            body["fw"] = "bench-pacer"
            info = client.publish(topics[d], dumps(body), qos=1)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                failed += 1
            sent += 1
        time.sleep(0.001)
    deadline = time.monotonic() + 30
    while acked + failed < total and time.monotonic() < deadline:
        time.sleep(0.01)
    seconds = time.monotonic() - started
    client.disconnect()
    client.loop_stop()
    failed += total - acked - failed
    json.dump(
        {
            "published": acked,
            "failed": failed,
            "seconds": round(seconds, 3),
            "rate": round(acked / seconds, 1),
            "devices": a.devices,
        },
        sys.stdout,
    )
    print()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
