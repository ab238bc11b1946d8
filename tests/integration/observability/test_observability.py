"""Observability against real servers: /metrics under traffic, /healthz, /readyz, secrets in logs."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit, urlunsplit

from prometheus_client.parser import text_string_to_metric_families

from ingest.devservers import free_port
from ingest.devservers.throwaway import PostgresFactory
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

READINGS_PER_SAMPLE = 5  # tests.integration.support.sample: 5 numbers and one string ("fw")
Metrics = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_env(port: int, **more: str) -> dict[str, str]:
    return {"INGEST_METRICS_PORT": str(port), "INGEST_METRICS_HOST": "127.0.0.1", **more}


def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> Metrics:
    status, text = get(port, "/metrics")
    assert status == 200, text
    out: Metrics = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(found: Metrics, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def wait_http(port: int, path: str, status: int, timeout: float = 60.0) -> str:
    last: list[tuple[int, str]] = [(0, "")]

    def check() -> bool:
        try:
            last[0] = get(port, path)
        except OSError as exc:
            last[0] = (0, repr(exc))
        return last[0][0] == status

    try:
        wait_until(check, timeout, interval=0.2)
    except AssertionError:
        raise AssertionError(f"{path} never answered {status}; last {last[0]}") from None
    return last[0][1]


def test_metrics_match_published_and_written_traffic(database_url: str, mqtt_url: str) -> None:
    port = free_port()
    topic = unique_topic()
    good = fleet(topic, devices=20, count=150)  # 3000 messages, 15000 readings
    dupes = good[:200]  # redelivered copies: same keys, absorbed as duplicates
    bad = [(topic_for(topic, f"dev-{i:05d}"), b"{not json") for i in range(1, 8)]
    messages = good[:1500] + bad + dupes + good[1500:]
    d = Daemon(
        database_url=database_url, mqtt_url=mqtt_url, topic=topic, extra_env=metrics_env(port)
    )
    try:
        d.start().wait_subscribed()
        wait_http(port, "/readyz", 200, timeout=30)

        def publish() -> None:
            with Publisher(mqtt_url) as pub:
                for i in range(0, len(messages), 250):
                    pub.publish_many(messages[i : i + 250])
                    time.sleep(0.02)  # keep traffic flowing while we scrape

        publisher = threading.Thread(target=publish)
        publisher.start()
        # While traffic flows: scrapes and probes answer fast, counters only grow.
        previous: Metrics = {}
        slowest = 0.0
        scrapes = 0
        while publisher.is_alive() or scrapes < 3:
            t0 = time.monotonic()
            now = scrape(port)
            assert get(port, "/healthz")[0] == 200
            get(port, "/readyz")
            slowest = max(slowest, time.monotonic() - t0)
            for key in ("ingest_messages_received_total", "ingest_readings_written_total"):
                assert metric(now, key) >= metric(previous, key)
            assert metric(now, "ingest_messages_acknowledged_total") <= metric(
                now, "ingest_messages_received_total"
            )
            assert metric(now, "ingest_channel_depth") <= metric(now, "ingest_channel_capacity")
            previous = now
            scrapes += 1
            time.sleep(0.1)
        publisher.join()
        assert slowest < 2.0, f"a scrape + probes took {slowest:.2f}s under load"
        assert metric(previous, "ingest_messages_received_total") > 0
        wait_rows(database_url, len(good) * READINGS_PER_SAMPLE)
        wait_until(
            lambda: metric(scrape(port), "ingest_messages_acknowledged_total") == len(messages),
            30,
            what="every message acknowledged",
        )
        found = scrape(port)
        readings = scalar(database_url, "SELECT count(*) FROM readings")
        texts = scalar(database_url, "SELECT count(*) FROM text_readings")
        dead = scalar(database_url, "SELECT count(*) FROM dead_letters")
        assert metric(found, "ingest_messages_received_total") == len(messages)
        assert metric(found, "ingest_messages_acknowledged_total") == len(messages)
        assert metric(found, "ingest_messages_unacknowledged") == 0
        # Text readings ("fw", one a sample) are readings too: written and duplicated alike.
        assert (readings, texts) == (15_000, 3_000)
        assert metric(found, "ingest_readings_written_total") == readings + texts
        assert metric(found, "ingest_readings_duplicates_total") == len(dupes) * (5 + 1)
        assert metric(found, "ingest_dead_letters_total", reason="not_json") == dead == len(bad)
        # the one string field ("fw") of a sample is a text reading, not skipped
        assert metric(found, "ingest_fields_skipped_total") == 0
        batches = metric(found, "ingest_batches_total")
        assert batches > 0
        assert metric(found, "ingest_batch_size_rows_count") == batches
        assert metric(found, "ingest_batch_size_rows_sum") == (
            readings + texts + len(dupes) * (5 + 1) + len(bad)
        )
        assert metric(found, "ingest_batch_commit_duration_seconds_count") == batches
        assert 0 < metric(found, "ingest_commit_lag_seconds_count") <= 2 * batches
        assert metric(found, "ingest_device_lag_seconds_count") > 0
        assert metric(found, "ingest_broker_connected") == 1
        assert metric(found, "ingest_broker_subscribed") == 1
        assert metric(found, "ingest_database_connected") == 1
        assert metric(found, "ingest_last_commit_timestamp_seconds") > time.time() - 60
        assert metric(found, "process_resident_memory_bytes") > 0
        assert json.loads(wait_http(port, "/readyz", 200))["ready"] is True
        assert d.stop() == 0
    finally:
        d.close()


def test_readyz_follows_postgres_down_and_back(
    postgres_factory: PostgresFactory, mqtt_url: str
) -> None:
    pg = postgres_factory()
    pg.create_database("ingest")
    url = pg.dsn("ingest")
    port = free_port()
    topic = unique_topic()
    d = Daemon(
        database_url=url,
        mqtt_url=mqtt_url,
        topic=topic,
        extra_env=metrics_env(port, INGEST_READY_MAX_LAG="5"),
    )
    try:
        d.start().wait_subscribed()
        wait_http(port, "/readyz", 200, timeout=30)
        pg.stop()
        # Idle: the ping finds the database gone.
        body = json.loads(wait_http(port, "/readyz", 503, timeout=30))
        assert body["ready"] is False and "database" in body["reason"], body
        assert wait_http(port, "/healthz", 200)  # alive all along
        # Traffic while it is down waits at the broker / in the channel.
        msgs = fleet(topic, devices=5, count=10)
        with Publisher(mqtt_url) as pub:
            pub.publish_many(msgs)
        wait_until(
            lambda: metric(scrape(port), "ingest_database_connected") == 0,
            30,
            what="database_connected 0",
        )
        assert get(port, "/readyz")[0] == 503
        pg.start()
        wait_http(port, "/readyz", 200, timeout=60)
        wait_rows(url, len(msgs) * READINGS_PER_SAMPLE)
        found = scrape(port)
        assert metric(found, "ingest_database_connected") == 1
        assert metric(found, "ingest_write_retries_total", **{"class": "transient"}) > 0
        assert d.stop() == 0
    finally:
        d.close()


def test_readyz_names_a_dashboard_fold_that_keeps_failing(database_url: str, mqtt_url: str) -> None:
    port = free_port()
    topic = unique_topic()
    max_lag = 2
    with Daemon(
        database_url=database_url,
        mqtt_url=mqtt_url,
        topic=topic,
        extra_env=metrics_env(port, INGEST_READY_MAX_LAG=str(max_lag)),
    ) as d:
        d.wait_subscribed()
        wait_http(port, "/readyz", 200, timeout=30)
        # The readings are stored, but the fold cannot reach one of the tables it maintains.
        query(database_url, "ALTER TABLE readings_fleet_1m RENAME TO readings_fleet_1m_away")
        msgs = fleet(topic, devices=2, count=3)
        with Publisher(mqtt_url) as pub:
            pub.publish_many(msgs)
        wait_rows(database_url, len(msgs) * READINGS_PER_SAMPLE)
        body = json.loads(wait_http(port, "/readyz", 503, timeout=60))
        assert body["ready"] is False, body
        assert "dashboard fold failing" in body["reason"], body
        assert "readings_fleet_1m" in body["reason"], body  # the error, as the database said it
        found = scrape(port)
        assert metric(found, "ingest_dashboard_fold_failures_total") >= 1
        assert wait_http(port, "/healthz", 200)  # alive all along
        query(database_url, "ALTER TABLE readings_fleet_1m_away RENAME TO readings_fleet_1m")
        wait_http(port, "/readyz", 200, timeout=60)
        wait_until(
            lambda: (
                metric(scrape(port), "ingest_dashboard_pending_batches") == 0
                and scalar(database_url, "SELECT count(*) FROM readings_fleet_1m") > 0
            ),
            60,
            what="the pending batches folded once the table is back",
        )
        assert d.stop() == 0


def _with_password(url: str, password: str, port: int | None = None) -> str:
    parts = urlsplit(url)
    user = parts.username or "postgres"
    host = f"{parts.hostname}:{port if port is not None else parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


def test_passwords_never_appear_in_logs(database_url: str, mqtt_url: str) -> None:
    db_secret, mqtt_secret = "Db-Secr3t-7f1c", "Mqtt-Secr3t-9e2a"
    secret_mqtt_url = _with_password(mqtt_url, mqtt_secret)
    topic = unique_topic()
    logs: list[str] = []

    # 1. Works (the trust-auth server ignores the password), at DEBUG, with traffic and a
    #    malformed message, then a drain.
    d = Daemon(
        database_url=_with_password(database_url, db_secret),
        mqtt_url=secret_mqtt_url,
        topic=topic,
        extra_env={"INGEST_LOG_LEVEL": "DEBUG"},
    )
    try:
        d.start().wait_subscribed()
        with Publisher(mqtt_url) as pub:
            pub.publish_many([*fleet(topic, 3, 20), (topic_for(topic, "dev-00001"), b"\xff")])
        wait_rows(database_url, 3 * 20 * READINGS_PER_SAMPLE)
        d.wait_for_log('"stats"')
        assert d.stop() == 0
        logs.append(d.log_text())
    finally:
        d.close()

    # 2. Errors: nothing listens on the database port (retries logged), then SIGTERM.
    dead_port = free_port()
    d = Daemon(
        database_url=_with_password(database_url, db_secret, port=dead_port),
        mqtt_url=secret_mqtt_url,
        topic=topic,
        extra_env={"INGEST_LOG_LEVEL": "DEBUG"},
    )
    try:
        d.start().wait_for_log("failed")
        d.stop()
        logs.append(d.log_text())
    finally:
        d.close()

    # 3. Fatal: a database that does not exist, password in the query string this time.
    missing = urlsplit(database_url)._replace(path="/no_such_db", query=f"password={db_secret}")
    d = Daemon(database_url=urlunsplit(missing), mqtt_url=secret_mqtt_url, topic=topic)
    try:
        assert d.start().wait(60) == 1
        logs.append(d.log_text())
    finally:
        d.close()

    text = "\n".join(logs)
    assert "***@" in text and "no_such_db" in text  # the URLs were logged, masked
    assert db_secret not in text
    assert mqtt_secret not in text


def test_metrics_port_already_taken_exits_2(database_url: str, mqtt_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "ingest", "run"],
            env={
                "PATH": "/usr/bin:/bin",
                "INGEST_DATABASE_URL": database_url,
                "INGEST_MQTT_URL": mqtt_url,
                **metrics_env(port),
            },
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "INGEST_METRICS_PORT" in lines[0], proc.stderr
    assert str(port) in lines[0]
