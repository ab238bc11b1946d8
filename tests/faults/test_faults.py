"""Nothing lost, nothing stored twice, under one injected fault per test (real Mosquitto, real
PostgreSQL, the daemon as a process, the fleet published by ``simulate``).

Each test reconciles what the simulator reports as acknowledged by the broker against the
database (``harness.reconcile``: per device, every ``seq`` exactly once) and records figures
for the report printed at the end (conftest.py). Every figure is measured: counts from the
database and the simulator's report, ``received``/``duplicates`` from the daemon's own
``/metrics``, memory from ``/proc``, durations from the clock (never asserted).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from functools import partial
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from ingest.devservers.brokers import Broker
from ingest.devservers.throwaway import MosquittoFactory, PostgresCluster, PostgresFactory
from tests.faults.harness import (
    READINGS,
    UNACKNOWLEDGED,
    WINDOW,
    Fleet,
    Meter,
    Simulation,
    counted,
    peak_rss_mb,
    publish,
    reconcile,
    rows_now,
    rss_mb,
)
from tests.faults.proxy import FaultProxy
from tests.integration.support import (
    Daemon,
    Publisher,
    query,
    scalar,
    topic_for,
    unique_topic,
    wait_rows,
    wait_until,
)

pytestmark = pytest.mark.slow


def via(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username + '@' if parts.username else ''}127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def reached(url: str, rows: int) -> bool:
    return rows_now(url) >= rows


def daemon(url: str, mqtt_url: str, fleet: Fleet, meter: Meter, **env: str) -> Daemon:
    return Daemon(
        database_url=url, mqtt_url=mqtt_url, topic=fleet.topic, extra_env={**meter.env, **env}
    )


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
    fleet = Fleet(topic=unique_topic(), devices=20, count=1500)
    meter = Meter()
    d = daemon(database_url, broker.url, fleet, meter)
    sim = Simulation(broker.url, fleet, rate=200)  # 4,000 msg/s: the kills land mid-stream
    try:
        d.start().wait_subscribed()
        sim.start()
        peak = 0.0
        for kill in range(3):
            target = (kill + 1) * fleet.messages * READINGS // 5
            wait_until(partial(reached, database_url, target), 120, what="progress")
            peak = max(peak, peak_rss_mb(d))
            meter.scrape()
            d.kill()
            d.start().wait_subscribed()
            meter.restarted()
        report = sim.report()
        t0 = time.monotonic()
        wait_rows(database_url, fleet.messages * READINGS, timeout=180)
        recovery = time.monotonic() - t0
        peak = max(peak, peak_rss_mb(d))
        meter.scrape()
        assert d.stop() == 0
    finally:
        sim.close()
        d.close()
    figures = {**reconcile(database_url, report), **counted(meter)}
    # The kills really left messages unacknowledged: the broker sent them again (C5), and
    # what had been committed collapsed on its key (C3).
    assert figures["duplicates"] > 0 or figures["received"] > report["published"], figures
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
    fleet = Fleet(topic=unique_topic(), devices=10, count=2000)
    meter = Meter()
    d = daemon(url, broker.url, fleet, meter)
    sim = Simulation(broker.url, fleet, rate=200)
    try:
        d.start().wait_subscribed()
        sim.start()
        wait_until(lambda: rows_now(url) > 10_000, 120)
        cluster.stop("fast")
        time.sleep(2)  # the daemon meets a database that is gone, not one restarting
        cluster.start()
        t0 = time.monotonic()
        report = sim.report()
        wait_rows(url, fleet.messages * READINGS, timeout=180)
        recovery = time.monotonic() - t0
        assert d.proc is not None and d.proc.poll() is None
        peak = peak_rss_mb(d)
        meter.scrape()
        assert d.stop() == 0
    finally:
        sim.close()
        d.close()
    figures = {**reconcile(url, report), **counted(meter)}
    fault_report.append(
        {
            "fault": "Postgres fast restart",
            **figures,
            "recovery_s": round(recovery, 1),
            "peak_rss_mb": peak,
        }
    )


# What one unacknowledged message may cost the daemon while the database is away: its payload
# (~200 bytes here), its Envelope and delivery record, and five decoded readings waiting in the
# batch being retried; a few hundred bytes of objects each, rounded up generously to 4 KiB,
# plus 32 MiB for the allocator's and the retries' own churn. Only the broker's in-flight
# window can reach the daemon while nothing is acknowledged, so memory growth during the
# outage stays under window x 4 KiB + 32 MiB whatever its length: that is the bound asserted.
PER_MESSAGE_BOUND = 4 * 1024
CHURN_BOUND_MB = 32.0
BLACKHOLE_SECONDS = 30


def test_postgres_blackholed_for_30s(
    pg: tuple[PostgresCluster, str], broker: Broker, fault_report: list[dict[str, Any]]
) -> None:
    _cluster, url = pg
    port = urlsplit(url).port
    assert port is not None
    fleet = Fleet(topic=unique_topic(), devices=10, count=1500)
    meter = Meter()
    with FaultProxy("127.0.0.1", port) as proxy:
        d = daemon(
            via(url, proxy.port), broker.url, fleet, meter,
            INGEST_DB_WRITE_TIMEOUT="5", INGEST_DB_CONNECT_TIMEOUT="3",
        )  # fmt: skip
        sim = Simulation(broker.url, fleet, rate=100)
        try:
            d.start().wait_subscribed()
            sim.start()
            wait_until(lambda: rows_now(url) > 5_000, 120)
            proxy.blackhole()
            steady = rss_mb(d)
            during, unacked, window = [steady], [], 0.0
            for _ in range(BLACKHOLE_SECONDS):
                time.sleep(1)
                during.append(rss_mb(d))
                values = meter.scrape()
                unacked.append(values[UNACKNOWLEDGED])
                window = values[WINDOW]
            assert d.proc is not None and d.proc.poll() is None
            proxy.heal()
            t0 = time.monotonic()
            report = sim.report()
            wait_rows(url, fleet.messages * READINGS, timeout=180)
            recovery = time.monotonic() - t0
            peak = peak_rss_mb(d)
            meter.scrape()
            assert d.stop() == 0
        finally:
            sim.close()
            d.close()
    figures = {**reconcile(url, report), **counted(meter)}
    # Held back by the window, not by luck: what the daemon holds never exceeds the window...
    assert window > 0 and max(unacked) <= window, (unacked, window)
    # ...and neither does the memory that holding it costs.
    growth = max(during) - steady
    bound = window * PER_MESSAGE_BOUND / 2**20 + CHURN_BOUND_MB
    assert growth <= bound, (steady, during, bound)
    fault_report.append(
        {
            "fault": f"Postgres blackholed {BLACKHOLE_SECONDS}s "
            f"(RSS {steady}->{max(during)} MB, bound +{bound:.0f}; "
            f"{max(unacked):.0f} unacked, window {window:.0f})",
            **figures,
            "recovery_s": round(recovery, 1),
            "peak_rss_mb": peak,
        }
    )


def test_broker_restart_mid_drain(
    database_url: str, broker: Broker, fault_report: list[dict[str, Any]]
) -> None:
    # Large enough that the drain (~20k msg/s) is still under way when the broker restarts
    # (Mosquitto took ~4 s to act on SIGTERM with 100,000 messages queued).
    fleet = Fleet(topic=unique_topic(), devices=10, count=30_000)
    meter = Meter()
    d = daemon(database_url, broker.url, fleet, meter)
    try:
        d.start().wait_subscribed()
        d.stop()
        # The backlog waits at the broker in our persistent session...
        report = publish(broker.url, fleet)
        d.start().wait_subscribed()
        wait_until(lambda: rows_now(database_url) > 10_000, 120)
        # ...and survives a broker restart in the middle of the drain (persistence).
        broker.restart()
        t0 = time.monotonic()
        wait_rows(database_url, fleet.messages * READINGS, timeout=180)
        recovery = time.monotonic() - t0
        assert d.log_text().count("subscribed to") >= 3
        peak = peak_rss_mb(d)
        meter.scrape()
        assert d.stop() == 0
    finally:
        d.close()
    figures = {**reconcile(database_url, report), **counted(meter)}
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
    fleet = Fleet(topic=unique_topic(), devices=5, count=400)
    meter = Meter()
    with FaultProxy("127.0.0.1", broker.port) as proxy:
        d = daemon(
            database_url, f"mqtt://127.0.0.1:{proxy.port}", fleet, meter,
            INGEST_MQTT_KEEPALIVE="3",
        )  # fmt: skip
        # Straight to the broker, 20 s long: while our link is dead the messages wait in our
        # session.
        sim = Simulation(broker.url, fleet, rate=20)
        try:
            d.start().wait_subscribed()
            sim.start()
            wait_until(lambda: rows_now(database_url) >= fleet.messages * READINGS // 4, 60)
            proxy.blackhole()
            d.wait_for_log("unavailable", timeout=30)  # the keepalive noticed
            proxy.heal()
            t0 = time.monotonic()
            report = sim.report()
            wait_rows(database_url, fleet.messages * READINGS, timeout=120)
            recovery = time.monotonic() - t0
            peak = peak_rss_mb(d)
            meter.scrape()
            assert d.stop() == 0
        finally:
            sim.close()
            d.close()
    figures = {**reconcile(database_url, report), **counted(meter)}
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
    fleet = Fleet(topic=unique_topic(), devices=10, count=1000)
    meter = Meter()
    with FaultProxy("127.0.0.1", port) as proxy:
        d = daemon(via(url, proxy.port), broker.url, fleet, meter)
        try:
            d.start().wait_subscribed()
            proxy.delay(0.2)
            t0 = time.monotonic()
            report = publish(broker.url, fleet)
            rss = [rss_mb(d)]

            def caught_up() -> bool:
                rss.append(rss_mb(d))
                return rows_now(url) >= fleet.messages * READINGS

            wait_until(caught_up, 300)
            took = time.monotonic() - t0
            peak = peak_rss_mb(d)
            meter.scrape()
            assert d.stop() == 0
        finally:
            d.close()
    figures = {**reconcile(url, report), **counted(meter)}
    fault_report.append(
        {
            "fault": f"slow DB +200ms/RTT ({fleet.messages / took:.0f} msg/s, "
            f"RSS {min(rss)}-{max(rss)} MB)",
            **figures,
            "recovery_s": "",  # nothing to recover from: the database stays slow
            "peak_rss_mb": peak,
        }
    )


def test_poison_rows_rejected_by_postgres_only_those_dead_lettered(
    database_url: str, mqtt_url: str, fault_report: list[dict[str, Any]]
) -> None:
    from tests.integration.support import migrate

    migrate(database_url)
    # An operator's constraint the decoder knows nothing about.
    query(database_url, "ALTER TABLE points ADD CONSTRAINT sane CHECK (value > -1e9)")
    fleet = Fleet(topic=unique_topic(), devices=5, count=400)
    poison = [
        (
            topic_for(fleet.topic, "dev-poison"),
            json.dumps({"ts": 1_700_000_000 + i, "x": -1e12}).encode(),
        )
        for i in range(10)
    ]
    meter = Meter()
    d = daemon(database_url, mqtt_url, fleet, meter)
    sim = Simulation(mqtt_url, fleet, rate=100)
    try:
        d.start().wait_subscribed()
        t0 = time.monotonic()
        sim.start()
        with Publisher(mqtt_url) as pub:  # ten hand-made messages, amid the fleet and after
            wait_until(lambda: rows_now(database_url) > 0, 60)
            pub.publish_many(poison[:5])
            report = sim.report()
            pub.publish_many(poison[5:])
        wait_rows(database_url, fleet.messages * READINGS, timeout=120)
        wait_until(lambda: scalar(database_url, "SELECT count(*) FROM dead_letters") == 10, 30)
        took = time.monotonic() - t0
        peak = peak_rss_mb(d)
        meter.scrape()
        assert d.stop() == 0
    finally:
        sim.close()
        d.close()
    figures = {**reconcile(database_url, report, dead=10), **counted(meter)}
    reasons = query(database_url, "SELECT DISTINCT reason FROM dead_letters")
    assert [r["reason"] for r in reasons] == ["rejected_by_database"]
    assert figures["received"] == report["published"] + len(poison)
    fault_report.append(
        {
            "fault": f"poison rows (CHECK), all stored in {took:.1f}s",
            **figures,
            "recovery_s": "",  # no outage
            "peak_rss_mb": peak,
        }
    )


def test_flood_of_malformed_mixed_with_good(
    database_url: str, broker: Broker, fault_report: list[dict[str, Any]]
) -> None:
    fleet = Fleet(topic=unique_topic(), devices=10, count=2000)
    meter = Meter()
    d = daemon(database_url, broker.url, fleet, meter)
    try:
        d.start().wait_subscribed()
        t0 = time.monotonic()
        report = publish(broker.url, fleet, bad_ratio=0.5)
        bad = report["faults"]["bad"]
        wait_rows(database_url, report["samples"] * READINGS, timeout=180)
        wait_until(lambda: scalar(database_url, "SELECT count(*) FROM dead_letters") == bad, 60)
        took = time.monotonic() - t0

        def settled() -> bool:
            values = meter.scrape()
            return (values.get("ingest_messages_received_total"), values[UNACKNOWLEDGED]) == (
                report["published"],
                0,
            )

        wait_until(settled, 10, what="every message acknowledged")  # no in-flight slot leaked
        peak = peak_rss_mb(d)
        assert d.stop() == 0
    finally:
        d.close()
    figures = {**reconcile(database_url, report, dead=bad), **counted(meter)}
    fault_report.append(
        {
            "fault": f"{bad / report['published']:.0%} malformed flood "
            f"({report['published'] / took:.0f} msg/s incl. publishing)",
            **figures,
            "recovery_s": "",  # no outage
            "peak_rss_mb": peak,
        }
    )


def test_sigterm_under_heavy_load_exits_0_then_resumes(
    database_url: str, broker: Broker, fault_report: list[dict[str, Any]]
) -> None:
    fleet = Fleet(topic=unique_topic(), devices=20, count=1500)
    meter = Meter()
    d = daemon(database_url, broker.url, fleet, meter, INGEST_SHUTDOWN_TIMEOUT="15")
    sim = Simulation(broker.url, fleet, rate=200)
    try:
        d.start().wait_subscribed()
        sim.start()
        wait_until(lambda: rows_now(database_url) > 20_000, 120)
        meter.scrape()
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        assert d.wait(20) == 0
        drain = time.monotonic() - t0
        report = sim.report()
        d.start().wait_subscribed()
        meter.restarted()
        t1 = time.monotonic()
        wait_rows(database_url, fleet.messages * READINGS, timeout=180)
        recovery = time.monotonic() - t1
        peak = peak_rss_mb(d)
        meter.scrape()
        assert d.stop() == 0
    finally:
        sim.close()
        d.close()
    figures = {**reconcile(database_url, report), **counted(meter)}
    fault_report.append(
        {
            "fault": f"SIGTERM under load (drained in {drain:.1f}s)",
            **figures,
            "recovery_s": round(recovery, 1),
            "peak_rss_mb": peak,
        }
    )
