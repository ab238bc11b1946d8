"""``ingest run --workers N``: shared subscription, supervision, one metrics port."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

from ingest.devservers import free_port
from ingest.devservers.throwaway import MosquittoFactory
from tests.integration.support import (
    Daemon,
    Publisher,
    fleet,
    scalar,
    unique_topic,
    wait_rows,
    wait_until,
)


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out.extend(int(p) for p in text)
    return out


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_two_workers_share_the_load_restart_and_drain(
    database_url: str, mosquitto_factory: MosquittoFactory
) -> None:
    broker = mosquitto_factory()
    topic = unique_topic()
    port = free_port()
    d = Daemon(
        database_url=database_url,
        mqtt_url=broker.url,
        topic=topic,
        args=["--workers", "2"],
        extra_env={"INGEST_METRICS_PORT": str(port), "INGEST_METRICS_HOST": "127.0.0.1"},
    )
    msgs = fleet(topic, devices=10, count=200)
    try:
        d.start()
        d.wait_for_log("subscribed to $share/", timeout=30)
        wait_until(lambda: d.log_text().count("subscribed to $share/") >= 2, 30)
        with Publisher(broker.url) as pub:
            pub.publish_many(msgs[:1000])
        wait_rows(database_url, 1000 * 5, timeout=30)
        # Both workers got a share, and one port reports both (worker label).
        status, body = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        received = {
            line.split('"')[1]: float(line.rsplit(" ", 1)[1])
            for line in body.decode().splitlines()
            if line.startswith("ingest_messages_received_total{")
        }
        assert set(received) == {"0", "1"} and all(v > 0 for v in received.values())
        assert sum(received.values()) == 1000
        status, body = get(f"http://127.0.0.1:{port}/readyz")
        assert status == 200, body
        assert set(json.loads(body)["workers"]) == {"0", "1"}

        # A worker that dies is restarted by the supervisor; nothing is lost.
        assert d.proc is not None
        victim = children(d.proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        d.wait_for_log("restarting in", timeout=15)
        with Publisher(broker.url) as pub:
            pub.publish_many(msgs[1000:])
        wait_rows(database_url, 2000 * 5, timeout=60)
        wait_until(lambda: d.log_text().count("subscribed to $share/") >= 3, 30)

        # SIGTERM drains every worker: exit 0.
        t0 = time.monotonic()
        assert d.stop(timeout=40) == 0
        assert time.monotonic() - t0 < 35
        assert d.log_text().count("drained:") >= 2
    finally:
        d.close()
    assert scalar(database_url, "SELECT count(*) FROM readings") == 2000 * 5
