"""Zero lost, zero duplicated, under each fault of issue 4 (real Mosquitto, real Postgres)."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from ingest.devservers.brokers import Broker
from ingest.devservers.throwaway import (
    MosquittoFactory,
    PostgresCluster,
    PostgresFactory,
)
from tests.faults.proxy import FaultProxy
from tests.integration.support import (
    Daemon,
    Publisher,
    fleet,
    query,
    scalar,
    topic_for,
    unique_topic,
    wait_rows,
    wait_until,
)

pytestmark = pytest.mark.slow

READINGS = 5  # per sample of tests.integration.support.sample


def via(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username + '@' if parts.username else ''}127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def peak_rss_mb(d: Daemon) -> float:
    assert d.proc is not None
    for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def rss_mb(d: Daemon) -> float:
    assert d.proc is not None
    for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def reconcile(url: str, devices: int, count: int, *, dead: int = 0) -> dict[str, Any]:
    """Every published sample is in ``readings`` exactly once; ``dead`` dead letters exist."""
    per_device = query(
        url,
        "SELECT device_id, count(*) AS n, min(value) AS lo, max(value) AS hi"
        " FROM readings WHERE metric = 'seq' GROUP BY device_id ORDER BY device_id",
    )
    assert len(per_device) == devices
    for r in per_device:
        # seq 0..count-1, each once: count, min and max pin it down under the primary key.
        assert (r["n"], r["lo"], r["hi"]) == (count, 0, count - 1), dict(r)
    rows = scalar(url, "SELECT count(*) FROM readings")
    assert rows == devices * count * READINGS
    dup_keys = scalar(
        url,
        "SELECT count(*) FROM (SELECT 1 FROM readings"
        " GROUP BY device_id, metric, ts HAVING count(*) > 1) x",
    )
    assert dup_keys == 0
    dead_found = scalar(url, "SELECT count(DISTINCT (topic, payload)) FROM dead_letters")
    assert dead_found == dead
    # The operator tool agrees (and is tested by this suite).
    totals = audit(url)["totals"]
    assert (totals["rows"], totals["seq_gaps"], totals["seq_missing"]) == (rows, 0, 0), totals
    return {"published": devices * count, "rows": rows, "dead_letters": dead_found, "duplicates": 0}


def audit(url: str) -> dict[str, Any]:
    """The operator tool must agree with the reconciliation (it is tested by this suite)."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "ingest", "audit", "--json", "--since", "1970-01-01T00:00:00Z"],
        env={"INGEST_DATABASE_URL": url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode in (0, 1), proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def publish_background(url: str, msgs: list[tuple[str, bytes]]) -> threading.Thread:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with Publisher(url) as pub:
                pub.publish_many(msgs)
        except BaseException as exc:  # reported by join_ok
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.errors = errors  # type: ignore[attr-defined]
    t.start()
    return t


def join_ok(t: threading.Thread, timeout: float = 180) -> None:
    t.join(timeout)
    assert not t.is_alive(), "publisher stuck"
    errors = t.errors  # type: ignore[attr-defined]
    assert not errors, errors


def reached(url: str, target: int) -> bool:
    return rows_now(url) >= target


def rows_now(url: str) -> int:
    return int(scalar(url, "SELECT count(*) FROM readings") or 0)


@pytest.fixture
def pg(postgres_factory: PostgresFactory) -> Iterator[tuple[PostgresCluster, str]]:
    cluster = postgres_factory()
    yield cluster, cluster.create_database("ingest")


@pytest.fixture
def broker(mosquitto_factory: MosquittoFactory) -> Broker:
    return mosquitto_factory()


def test_sigkill_under_load_three_times(
    database_url: str, broker: Broker, fault_report: list[dict[str, Any]]
) -> None:
    topic = unique_topic()
    devices, count = 20, 1500
    d = Daemon(database_url=database_url, mqtt_url=broker.url, topic=topic)
    try:
        d.start().wait_subscribed()
        pub = publish_background(broker.url, fleet(topic, devices, count))
        peak = 0.0
        for kill in range(3):
            target = (kill + 1) * devices * count * READINGS // 5
            wait_until(partial(reached, database_url, target), 120, what="progress")
            peak = max(peak, peak_rss_mb(d))
            d.kill()
            d.start().wait_subscribed()
        join_ok(pub)
        t0 = time.monotonic()
        wait_rows(database_url, devices * count * READINGS, timeout=180)
        recovery = time.monotonic() - t0
        peak = max(peak, peak_rss_mb(d))
        assert d.stop() == 0
    finally:
        d.close()
    figures = reconcile(database_url, devices, count)
    fault_report.append(
        {
            "fault": "SIGKILL x3 under load",
            **figures,
            "recovery_s": round(recovery, 1),
            "peak_rss_mb": peak,
        }
    )


def test_postgres_fast_restart(
    pg: tuple[PostgresCluster, str], broker: Broker, fault_report: list[dict[str, Any]]
) -> None:
    cluster, url = pg
    topic = unique_topic()
    devices, count = 10, 2000
    d = Daemon(database_url=url, mqtt_url=broker.url, topic=topic)
    try:
        d.start().wait_subscribed()
        pub = publish_background(broker.url, fleet(topic, devices, count))
        wait_until(lambda: rows_now(url) > 10_000, 120)
        cluster.stop("fast")
        time.sleep(2)
        cluster.start()
        t0 = time.monotonic()
        join_ok(pub)
        wait_rows(url, devices * count * READINGS, timeout=180)
        recovery = time.monotonic() - t0
        assert d.proc is not None and d.proc.poll() is None
        peak = peak_rss_mb(d)
        assert d.stop() == 0
    finally:
        d.close()
    figures = reconcile(url, devices, count)
    fault_report.append(
        {
            "fault": "Postgres fast restart",
            **figures,
            "recovery_s": round(recovery, 1),
            "peak_rss_mb": peak,
        }
    )


def test_postgres_blackholed_for_30s(
    pg: tuple[PostgresCluster, str], broker: Broker, fault_report: list[dict[str, Any]]
) -> None:
    _cluster, url = pg
    port = urlsplit(url).port
    assert port is not None
    topic = unique_topic()
    devices, count = 10, 1500
    with FaultProxy("127.0.0.1", port) as proxy:
        d = Daemon(
            database_url=via(url, proxy.port),
            mqtt_url=broker.url,
            topic=topic,
            extra_env={"INGEST_DB_WRITE_TIMEOUT": "5", "INGEST_DB_CONNECT_TIMEOUT": "3"},
        )
        try:
            d.start().wait_subscribed()
            pub = publish_background(broker.url, fleet(topic, devices, count))
            wait_until(lambda: rows_now(url) > 5_000, 120)
            proxy.blackhole()
            steady = rss_mb(d)
            time.sleep(30)
            during = rss_mb(d)
            assert d.proc is not None and d.proc.poll() is None
            proxy.heal()
            t0 = time.monotonic()
            join_ok(pub)
            wait_rows(url, devices * count * READINGS, timeout=180)
            recovery = time.monotonic() - t0
            peak = peak_rss_mb(d)
            assert d.stop() == 0
        finally:
            d.close()
    figures = reconcile(url, devices, count)
    fault_report.append(
        {
            "fault": f"Postgres blackholed 30s (RSS {steady}->{during} MB)",
            **figures,
            "recovery_s": round(recovery, 1),
            "peak_rss_mb": peak,
        }
    )


def test_broker_restart_mid_drain(
    database_url: str, broker: Broker, fault_report: list[dict[str, Any]]
) -> None:
    topic = unique_topic()
    # Large enough that the drain (~20k msg/s) is still under way when the broker restarts
    # (Mosquitto took ~4 s to act on SIGTERM with 100,000 messages queued).
    devices, count = 10, 30_000
    d = Daemon(database_url=database_url, mqtt_url=broker.url, topic=topic)
    try:
        d.start().wait_subscribed()
        d.stop()
        # The backlog waits at the broker in our persistent session...
        with Publisher(broker.url) as pub:
            pub.publish_many(fleet(topic, devices, count))
        d.start().wait_subscribed()
        wait_until(lambda: rows_now(database_url) > 10_000, 120)
        # ...and survives a broker restart in the middle of the drain (persistence).
        broker.restart()
        t0 = time.monotonic()
        wait_rows(database_url, devices * count * READINGS, timeout=180)
        recovery = time.monotonic() - t0
        assert d.log_text().count("subscribed to") >= 3
        peak = peak_rss_mb(d)
        assert d.stop() == 0
    finally:
        d.close()
    figures = reconcile(database_url, devices, count)
    fault_report.append(
        {
            "fault": "broker restart mid-drain",
            **figures,
            "recovery_s": round(recovery, 1),
            "peak_rss_mb": peak,
        }
    )


def test_broker_blackholed_keepalive_notices(
    database_url: str, broker: Broker, fault_report: list[dict[str, Any]]
) -> None:
    topic = unique_topic()
    devices, count = 5, 400
    with FaultProxy("127.0.0.1", broker.port) as proxy:
        d = Daemon(
            database_url=database_url,
            mqtt_url=f"mqtt://127.0.0.1:{proxy.port}",
            topic=topic,
            extra_env={"INGEST_MQTT_KEEPALIVE": "3"},
        )
        try:
            d.start().wait_subscribed()
            with Publisher(broker.url) as pub:
                pub.publish_many(fleet(topic, devices, count // 2))
            wait_rows(database_url, devices * (count // 2) * READINGS, timeout=60)
            proxy.blackhole()
            # Published straight to the broker while our link is dead: kept in our session.
            with Publisher(broker.url) as pub:
                pub.publish_many(fleet(topic, devices, count - count // 2, start=count // 2))
            d.wait_for_log("unavailable", timeout=30)  # the keepalive noticed
            proxy.heal()
            t0 = time.monotonic()
            wait_rows(database_url, devices * count * READINGS, timeout=120)
            recovery = time.monotonic() - t0
            peak = peak_rss_mb(d)
            assert d.stop() == 0
        finally:
            d.close()
    figures = reconcile(database_url, devices, count)
    fault_report.append(
        {
            "fault": "broker blackholed",
            **figures,
            "recovery_s": round(recovery, 1),
            "peak_rss_mb": peak,
        }
    )


def test_slow_database_200ms_per_round_trip(
    pg: tuple[PostgresCluster, str], broker: Broker, fault_report: list[dict[str, Any]]
) -> None:
    _cluster, url = pg
    port = urlsplit(url).port
    assert port is not None
    topic = unique_topic()
    devices, count = 10, 1000
    with FaultProxy("127.0.0.1", port) as proxy:
        d = Daemon(database_url=via(url, proxy.port), mqtt_url=broker.url, topic=topic)
        try:
            d.start().wait_subscribed()
            proxy.delay(0.2)
            t0 = time.monotonic()
            with Publisher(broker.url) as pub:
                pub.publish_many(fleet(topic, devices, count))
            rss = [rss_mb(d)]

            def caught_up() -> bool:
                rss.append(rss_mb(d))
                return rows_now(url) >= devices * count * READINGS

            wait_until(caught_up, 300)
            took = time.monotonic() - t0
            peak = peak_rss_mb(d)
            assert d.stop() == 0
        finally:
            d.close()
    figures = reconcile(url, devices, count)
    fault_report.append(
        {
            "fault": f"slow DB +200ms/RTT ({devices * count / took:.0f} msg/s, RSS {min(rss)}-{max(rss)} MB)",
            **figures,
            "recovery_s": 0,
            "peak_rss_mb": peak,
        }
    )


def test_poison_rows_rejected_by_postgres_only_those_dead_lettered(
    database_url: str, mqtt_url: str, fault_report: list[dict[str, Any]]
) -> None:
    from tests.integration.support import migrate

    migrate(database_url)
    # An operator's constraint the decoder knows nothing about.
    query(database_url, "ALTER TABLE readings ADD CONSTRAINT sane CHECK (value > -1e9)")
    topic = unique_topic()
    devices, count = 5, 400
    msgs = fleet(topic, devices, count)
    poison = [
        (topic_for(topic, "dev-poison"), json.dumps({"ts": 1_700_000_000 + i, "x": -1e12}).encode())
        for i in range(10)
    ]
    mixed = msgs[:1000] + poison[:5] + msgs[1000:] + poison[5:]
    d = Daemon(database_url=database_url, mqtt_url=mqtt_url, topic=topic)
    try:
        d.start().wait_subscribed()
        t0 = time.monotonic()
        with Publisher(mqtt_url) as pub:
            pub.publish_many(mixed)
        wait_rows(database_url, devices * count * READINGS, timeout=120)
        wait_until(lambda: scalar(database_url, "SELECT count(*) FROM dead_letters") == 10, 30)
        took = time.monotonic() - t0
        assert d.stop() == 0
    finally:
        d.close()
    figures = reconcile(database_url, devices, count, dead=10)
    reasons = query(database_url, "SELECT DISTINCT reason FROM dead_letters")
    assert [r["reason"] for r in reasons] == ["rejected_by_database"]
    fault_report.append(
        {"fault": "poison rows (CHECK)", **figures, "recovery_s": round(took, 1), "peak_rss_mb": ""}
    )


def test_flood_of_malformed_mixed_with_good(
    database_url: str, broker: Broker, fault_report: list[dict[str, Any]]
) -> None:
    topic = unique_topic()
    devices, count = 10, 1000
    good = fleet(topic, devices, count)
    bad_kinds = [
        b"not json %d",
        b'{"ts": %d, "x": ',
        b'{"fw": "%d"}',
        b'{"ts": "yesterday-%d", "x": 1}',
    ]
    bad = [
        (
            topic_for(topic, f"dev-{i % devices + 1:05d}"),
            bad_kinds[i % 4].replace(b"%d", str(i).encode()),
        )
        for i in range(10_000)
    ]
    mixed: list[tuple[str, bytes]] = []
    for i, g in enumerate(good):
        mixed.append(g)
        mixed.append(bad[i])
    d = Daemon(database_url=database_url, mqtt_url=broker.url, topic=topic)
    try:
        d.start().wait_subscribed()
        t0 = time.monotonic()
        with Publisher(broker.url) as pub:
            pub.publish_many(mixed)
        wait_rows(database_url, devices * count * READINGS, timeout=180)
        wait_until(
            lambda: scalar(database_url, "SELECT count(*) FROM dead_letters") == len(bad), 60
        )
        took = time.monotonic() - t0

        def settled() -> bool:
            stats = [r for r in d.log_records() if r["msg"] == "stats"]
            return bool(stats) and (stats[-1]["received"], stats[-1]["unacked"]) == (len(mixed), 0)

        wait_until(settled, 10, what="every message acknowledged")  # no in-flight slot leaked
        peak = peak_rss_mb(d)
        assert d.stop() == 0
    finally:
        d.close()
    figures = reconcile(database_url, devices, count, dead=len(bad))
    fault_report.append(
        {
            "fault": f"50% malformed flood ({len(mixed) / took:.0f} msg/s incl. publishing)",
            **figures,
            "recovery_s": 0,
            "peak_rss_mb": peak,
        }
    )


def test_sigterm_under_heavy_load_exits_0_then_resumes(
    database_url: str, broker: Broker, fault_report: list[dict[str, Any]]
) -> None:
    topic = unique_topic()
    devices, count = 20, 1500
    d = Daemon(
        database_url=database_url,
        mqtt_url=broker.url,
        topic=topic,
        extra_env={"INGEST_SHUTDOWN_TIMEOUT": "15"},
    )
    try:
        d.start().wait_subscribed()
        pub = publish_background(broker.url, fleet(topic, devices, count))
        wait_until(lambda: rows_now(database_url) > 20_000, 120)
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        assert d.wait(20) == 0
        drain = time.monotonic() - t0
        join_ok(pub)
        d.start().wait_subscribed()
        t1 = time.monotonic()
        wait_rows(database_url, devices * count * READINGS, timeout=180)
        recovery = time.monotonic() - t1
        peak = peak_rss_mb(d)
        assert d.stop() == 0
    finally:
        d.close()
    figures = reconcile(database_url, devices, count)
    fault_report.append(
        {
            "fault": f"SIGTERM under load (drained in {drain:.1f}s)",
            **figures,
            "recovery_s": round(recovery, 1),
            "peak_rss_mb": peak,
        }
    )
