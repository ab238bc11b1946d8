"""``ingest run`` end to end against a real broker and a real Postgres."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from ingest.devservers.throwaway import MosquittoFactory, PostgresFactory
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

READINGS_PER_SAMPLE = 5  # seq, temperature, humidity, battery, rssi ("fw" is a text reading)


def test_values_and_shapes_land_exactly(database_url: str, mqtt_url: str) -> None:
    topic = unique_topic()
    with Daemon(database_url=database_url, mqtt_url=mqtt_url, topic=topic) as d:
        d.wait_subscribed()
        with Publisher(mqtt_url) as pub:
            pub.publish_many(
                [
                    (topic_for(topic, "a"), '{"ts": 1700000000, "t": 21.5, "on": true}'),
                    (topic_for(topic, "b"), '{"ts": 1700000000123, "env": {"temp": -3}}'),
                    (
                        topic_for(topic, "c"),
                        '[{"ts": "2024-05-01T12:00:00Z", "x": 1},'
                        ' {"ts": "2024-05-01T12:00:01+02:00", "x": 2}]',
                    ),
                    (topic_for(topic, "d"), '{"ts": "2024-05-01T12:00:00", "x": 1, "s": "str"}'),
                ]
            )
        wait_rows(database_url, 6, timeout=10)
        rows = query(
            database_url, "SELECT device_id, metric, ts, value FROM readings ORDER BY 1, 2, 3"
        )
        got = [(r["device_id"], r["metric"], r["ts"], r["value"]) for r in rows]
        assert got == [
            ("a", "on", datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC), 1.0),
            ("a", "t", datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC), 21.5),
            ("b", "env.temp", datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC), -3.0),
            ("c", "x", datetime(2024, 5, 1, 10, 0, 1, tzinfo=UTC), 2.0),
            ("c", "x", datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC), 1.0),
            ("d", "x", datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC), 1.0),
        ]
        assert d.stop() == 0


def test_large_and_small_messages_interleaved_land_exactly(
    database_url: str, mqtt_url: str
) -> None:
    # The adapter parses PUBLISH packets from a 64 KiB read buffer itself and leaves packets
    # split across reads (every one of these large ones) to paho: both paths, interleaved,
    # at QoS 1 and QoS 0, must hand on every message exactly once and in order.
    topic = unique_topic()
    sizes = [10, 70_000, 50, 200_000, 30, 65_536, 1, 131_072]
    items = []
    for i in range(240):
        pad = "x" * sizes[i % len(sizes)]
        items.append(
            (
                topic_for(topic, f"d{i % 3}"),
                f'{{"ts": {1700000000 + i}, "seq": {i}, "pad": "{pad}"}}',
                i % 5 == 0,
            )
        )
    with Daemon(database_url=database_url, mqtt_url=mqtt_url, topic=topic) as d:
        d.wait_subscribed()
        with Publisher(mqtt_url) as pub:
            for t, payload, qos0 in items:
                pub.publish_many([(t, payload)], qos=0 if qos0 else 1)
        wait_rows(database_url, len(items), timeout=30)
        rows = query(database_url, "SELECT device_id, metric, value FROM readings ORDER BY value")
        assert [(r["device_id"], r["metric"], r["value"]) for r in rows] == [
            (f"d{i % 3}", "seq", float(i)) for i in range(len(items))
        ]
        assert scalar(database_url, "SELECT count(*) FROM dead_letters") == 0
        assert d.stop() == 0


def test_missing_ts_uses_receive_time_within_a_second(database_url: str, mqtt_url: str) -> None:
    topic = unique_topic()
    with Daemon(database_url=database_url, mqtt_url=mqtt_url, topic=topic) as d:
        d.wait_subscribed()
        before = datetime.now(UTC)
        with Publisher(mqtt_url) as pub:
            pub.publish_many([(topic_for(topic, "dev-1"), b'{"temp": 20}')])
        took = wait_rows(database_url, 1, timeout=10)
        assert took < 1.5  # "within a second under light load" (plus polling)
        ts = scalar(database_url, "SELECT ts FROM readings")
        assert before.timestamp() - 1 <= ts.timestamp() <= datetime.now(UTC).timestamp()
        assert d.stop() == 0


def test_malformed_become_dead_letters_and_neighbours_land(
    database_url: str, mqtt_url: str
) -> None:
    topic = unique_topic()
    bad = [
        b"not json",
        b'{"ts": 1700000000, "x": ',
        b"\xff\xfe",
        b'{"fw": null}',
        b'{"ts": true, "x": 1}',
    ]
    with Daemon(database_url=database_url, mqtt_url=mqtt_url, topic=topic) as d:
        d.wait_subscribed()
        items: list[tuple[str, bytes]] = []
        for i, payload in enumerate(bad):
            items.append(
                (topic_for(topic, "good"), json.dumps({"ts": 1700000000 + i, "x": i}).encode())
            )
            items.append((topic_for(topic, "bad"), payload))
        with Publisher(mqtt_url) as pub:
            pub.publish_many(items)
        wait_until(lambda: scalar(database_url, "SELECT count(*) FROM dead_letters") == 5, 15)
        wait_rows(database_url, 5, timeout=10)
        dead = query(
            database_url, "SELECT topic, payload, reason, error FROM dead_letters ORDER BY id"
        )
        assert [bytes(r["payload"]) for r in dead] == bad
        assert {r["topic"] for r in dead} == {topic_for(topic, "bad")}
        assert [r["reason"] for r in dead] == [
            "not_json",
            "not_json",
            "invalid_utf8",
            "no_readings",
            "bad_ts",
        ]
        assert all(r["error"] for r in dead)
        assert scalar(database_url, "SELECT count(*) FROM readings WHERE device_id = 'good'") == 5
        assert d.stop() == 0


def test_duplicates_collapse(database_url: str, mqtt_url: str) -> None:
    topic = unique_topic()
    msgs = fleet(topic, devices=3, count=50)
    with Daemon(database_url=database_url, mqtt_url=mqtt_url, topic=topic) as d:
        d.wait_subscribed()
        with Publisher(mqtt_url) as pub:
            pub.publish_many(msgs)
            pub.publish_many(msgs[:60])  # redelivered by a device
        wait_rows(database_url, 150 * READINGS_PER_SAMPLE)
        # The copies may still be on their way (a small broker window): wait for their count.
        wait_until(
            lambda: any(
                r.get("duplicates") == 60 * (READINGS_PER_SAMPLE + 1)  # and the "fw" text
                for r in d.log_records()
                if r["msg"] == "stats"
            ),
            30,
            what="the duplicates to be counted",
        )
        assert d.stop() == 0
    assert scalar(database_url, "SELECT count(*) FROM readings") == 150 * READINGS_PER_SAMPLE
    text = d.log_text()
    drained = [r for r in d.log_records() if r["msg"].startswith("drained:")]
    assert drained, text[-3000:]
    assert f"{60 * (READINGS_PER_SAMPLE + 1)} duplicates" in drained[-1]["msg"]
    assert scalar(database_url, "SELECT count(*) FROM text_readings") == 150


def _publish_in_background(mqtt_url: str, msgs: list[tuple[str, bytes]]) -> threading.Thread:
    def run() -> None:
        with Publisher(mqtt_url) as pub:
            pub.publish_many(msgs)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _no_duplicate_keys(database_url: str) -> None:
    # The primary key makes duplicates impossible; check the count by key anyway.
    assert (
        scalar(
            database_url,
            "SELECT count(*) FROM (SELECT 1 FROM readings GROUP BY device_id, metric, ts HAVING count(*) > 1) x",
        )
        == 0
    )


def test_sigkill_mid_stream_then_restart_exact_count(
    database_url: str, mosquitto_factory: MosquittoFactory
) -> None:
    broker = mosquitto_factory()
    topic = unique_topic()
    msgs = fleet(topic, devices=20, count=1000)  # 20,000 messages
    d = Daemon(database_url=database_url, mqtt_url=broker.url, topic=topic)
    try:
        d.start().wait_subscribed()
        publisher = _publish_in_background(broker.url, msgs)
        wait_until(
            lambda: (scalar(database_url, "SELECT count(*) FROM readings") or 0) > 10_000, 60
        )
        d.kill()
        publisher.join(120)
        assert not publisher.is_alive()
        d.start().wait_subscribed()
        wait_rows(database_url, len(msgs) * READINGS_PER_SAMPLE, timeout=120)
        assert d.stop() == 0
    finally:
        d.close()
    assert scalar(database_url, "SELECT count(*) FROM readings") == len(msgs) * READINGS_PER_SAMPLE
    assert scalar(database_url, "SELECT count(*) FROM dead_letters") == 0
    _no_duplicate_keys(database_url)


def test_sigterm_drains_exit_0_and_resume_loses_nothing(
    database_url: str, mosquitto_factory: MosquittoFactory
) -> None:
    broker = mosquitto_factory()
    topic = unique_topic()
    msgs = fleet(topic, devices=10, count=1000)
    d = Daemon(database_url=database_url, mqtt_url=broker.url, topic=topic)
    try:
        d.start().wait_subscribed()
        publisher = _publish_in_background(broker.url, msgs)
        wait_until(lambda: (scalar(database_url, "SELECT count(*) FROM readings") or 0) > 5_000, 60)
        assert d.stop(timeout=30) == 0
        assert "drained:" in d.log_text()
        publisher.join(120)
        d.start().wait_subscribed()
        wait_rows(database_url, len(msgs) * READINGS_PER_SAMPLE, timeout=120)
        assert d.stop() == 0
    finally:
        d.close()
    assert scalar(database_url, "SELECT count(*) FROM readings") == len(msgs) * READINGS_PER_SAMPLE
    _no_duplicate_keys(database_url)


def test_postgres_restart_mid_stream_exact_count(
    postgres_factory: PostgresFactory, mqtt_url: str
) -> None:
    pg = postgres_factory()
    pg.create_database("ingest")
    url = pg.dsn("ingest")
    topic = unique_topic()
    msgs = fleet(topic, devices=10, count=500)
    d = Daemon(database_url=url, mqtt_url=mqtt_url, topic=topic)
    try:
        d.start().wait_subscribed()
        publisher = _publish_in_background(mqtt_url, msgs)
        wait_until(lambda: (scalar(url, "SELECT count(*) FROM readings") or 0) > 2_000, 60)
        pg.restart()
        publisher.join(120)
        wait_rows(url, len(msgs) * READINGS_PER_SAMPLE, timeout=120)
        assert d.proc is not None and d.proc.poll() is None, "daemon died"
        assert d.stop() == 0
    finally:
        d.close()
    assert scalar(url, "SELECT count(*) FROM readings") == len(msgs) * READINGS_PER_SAMPLE
    assert scalar(url, "SELECT count(*) FROM dead_letters") == 0


def test_broker_restart_resubscribes(
    database_url: str, mosquitto_factory: MosquittoFactory
) -> None:
    broker = mosquitto_factory()
    topic = unique_topic()
    d = Daemon(database_url=database_url, mqtt_url=broker.url, topic=topic)
    try:
        d.start().wait_subscribed()
        with Publisher(broker.url) as pub:
            pub.publish_many(fleet(topic, devices=2, count=10))
        wait_rows(database_url, 20 * READINGS_PER_SAMPLE, timeout=15)
        broker.restart()
        # Published while the daemon is reconnecting: kept in its persistent session.
        with Publisher(broker.url) as pub:
            pub.publish_many(fleet(topic, devices=2, count=10, start=10))
        wait_rows(database_url, 40 * READINGS_PER_SAMPLE, timeout=30)
        assert d.log_text().count("subscribed to") >= 2
        assert d.stop() == 0
    finally:
        d.close()


def test_waits_for_servers_at_startup(
    database_url: str, mosquitto_factory: MosquittoFactory
) -> None:
    broker = mosquitto_factory()
    broker.stop()
    topic = unique_topic()
    d = Daemon(database_url=database_url, mqtt_url=broker.url, topic=topic)
    try:
        d.start()
        d.wait_for_log("unavailable", timeout=15)
        assert d.proc is not None and d.proc.poll() is None
        broker.start()
        d.wait_subscribed(timeout=30)
        with Publisher(broker.url) as pub:
            pub.publish_many([(topic_for(topic, "x"), b'{"v": 1}')])
        wait_rows(database_url, 1, timeout=10)
        assert d.stop() == 0
    finally:
        d.close()


MIB = 1 << 20


def _fill_to_a_mib(head: bytes, unit: Callable[[int], bytes], tail: bytes) -> bytes:
    """``head``, then ``unit(0)``, ``unit(1)``, ... comma-separated, then ``tail``: as many units
    as fit in 1 MiB, the largest payload allowed by default."""
    parts: list[bytes] = []
    size = len(head) + len(tail)
    while size + len(unit(len(parts))) + 1 <= MIB:
        parts.append(unit(len(parts)))
        size += len(parts[-1]) + 1
    return head + b",".join(parts) + tail


def _worst_payloads() -> list[bytes]:
    """The largest allowed payloads in the shapes that cost the most to decode: nested, with
    a ``1e400`` that forces the slow JSON path, 9,999 readings then padding; 10,000 flat
    readings with long names; a 1 MiB array of tiny samples (``too_many_readings``); and one
    just over the limit (``too_large``)."""

    def nested(i: int) -> bytes:
        return (b'"k%d":{"x":{"y":1}}' if i < 9_999 else b'"k%d":{"x":{"y":null}}') % i

    return [
        _fill_to_a_mib(b'{"big": 1e400, "a": {"b": 1}, ', nested, b"}"),
        b"{" + b",".join(b'"m%05d%s": %d.25' % (i, b"x" * 85, i) for i in range(10_000)) + b"}",
        _fill_to_a_mib(b"[", lambda i: b'{"v":1}', b"]"),
        b'{"a": 1, "s": "' + b"x" * (MIB + 100) + b'"}',
    ]


def _slowness() -> float:
    """How much slower than a typical core this one runs Python now (at least 1): a fixed
    loop's best time of three against the ~0.15 s it takes on one. Shared CI machines are
    throttled at times to a third of that speed, and a loop step's wall time with them."""
    best = min(_timed(lambda: sum(range(10**7))) for _ in range(3))
    return max(1.0, best / 0.15)


def _timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def test_event_loop_never_blocks_over_100ms(database_url: str, mqtt_url: str) -> None:
    # asyncio's debug mode logs "Executing <callback> took N seconds" for every callback over
    # slow_callback_duration: 0.1 s on a typical core, scaled by how much slower this one runs
    # now (a wall-clock limit on a throttled machine would measure the machine). A burst of the
    # largest, costliest payloads back to back must not produce one. Measured here: decoding
    # the costliest of them on the loop takes about that limit, so the test guards the
    # biggest regressions only; the longest steps it sees now take about two thirds of it.
    limit = 0.1 * _slowness()
    topic = unique_topic()
    rounds = 3
    burst = [
        (topic_for(topic, f"dev-{r}-{i}"), payload)
        for r in range(rounds)
        for i, payload in enumerate(_worst_payloads())
    ]
    small = fleet(topic, devices=10, count=30)
    d = Daemon(
        database_url=database_url,
        mqtt_url=mqtt_url,
        topic=topic,
        extra_env={
            "INGEST_ASYNCIO_DEBUG": "1",
            "INGEST_ASYNCIO_SLOW": f"{limit:.3f}",
            "PYTHONASYNCIODEBUG": "1",
        },
    )
    try:
        d.start().wait_subscribed()
        with Publisher(mqtt_url) as pub:
            pub.publish_many(burst)
            pub.publish_many(small)
        # Per round: 9,999 + 1 ("a.b") nested readings, 10,000 flat ones; two dead letters.
        wait_rows(database_url, rounds * 20_000 + len(small) * READINGS_PER_SAMPLE, timeout=120)
        wait_until(
            lambda: scalar(database_url, "SELECT count(*) FROM dead_letters") == rounds * 2,
            timeout=60,
            what=f"{rounds * 2} dead letters",
        )
        reasons = query(
            database_url, "SELECT reason, count(*) AS n FROM dead_letters GROUP BY 1 ORDER BY 1"
        )
        assert [(r["reason"], r["n"]) for r in reasons] == [
            ("too_large", rounds),
            ("too_many_readings", rounds),
        ]
        assert d.stop() == 0
    finally:
        d.close()
    slow = [r["msg"] for r in d.log_records() if "took" in r["msg"] and "seconds" in r["msg"]]
    assert not slow, slow


def test_bad_configuration_exits_2_with_one_line(database_url: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ingest", "run"],
        env={
            "INGEST_DATABASE_URL": database_url,
            "INGEST_BATCH_MAX_ROWS": "lots",
            "PATH": "/usr/bin",
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "INGEST_BATCH_MAX_ROWS" in lines[0], proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "ingest", "run", "--mqtt-url", "ftp://x"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (
        proc.returncode == 2 and "--mqtt-url" in proc.stderr
    ) or "INGEST_MQTT_URL" in proc.stderr


def test_concurrent_migrate_does_not_collide(database_url: str) -> None:
    env = {"INGEST_DATABASE_URL": database_url, "PATH": "/usr/bin:/bin"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "ingest", "migrate"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=60)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    versions = query(database_url, "SELECT version FROM schema_migrations ORDER BY 1")
    assert next(r["version"] for r in versions) == "0001_initial"
    assert len(versions) == len({r["version"] for r in versions})


@pytest.mark.parametrize("protocol", ["5"])
def test_mqtt_v5_persistent_session(
    database_url: str, mosquitto_factory: MosquittoFactory, protocol: str
) -> None:
    broker = mosquitto_factory()
    topic = unique_topic()
    d = Daemon(
        database_url=database_url,
        mqtt_url=broker.url,
        topic=topic,
        extra_env={"INGEST_MQTT_PROTOCOL": protocol},
    )
    try:
        d.start().wait_subscribed()
        assert d.stop() == 0
        # Published while the daemon is away: the v5 session (clean_start=False + expiry)
        # keeps them for us.
        with Publisher(broker.url) as pub:
            pub.publish_many(fleet(topic, devices=2, count=25))
        d.start().wait_subscribed()
        wait_rows(database_url, 50 * READINGS_PER_SAMPLE, timeout=30)
        assert d.stop() == 0
    finally:
        d.close()


def test_sigint_while_waiting_for_the_database_exits_0(mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory()
    d = Daemon(
        database_url="postgresql://postgres@127.0.0.1:1/none",  # nothing listens there
        mqtt_url=broker.url,
        topic=unique_topic(),
    )
    try:
        d.start()
        d.wait_for_log("retrying", timeout=20)
        assert d.proc is not None and d.proc.poll() is None  # waits, never crash-loops
        d.signal(signal.SIGINT)
        assert d.wait(15) == 0  # nothing to drain while starting
    finally:
        d.close()


def test_second_sigint_forces_when_the_drain_cannot_finish(
    postgres_factory: PostgresFactory, mosquitto_factory: MosquittoFactory
) -> None:
    pg = postgres_factory()
    url = pg.create_database("ingest")
    broker = mosquitto_factory()
    topic = unique_topic()
    d = Daemon(
        database_url=url,
        mqtt_url=broker.url,
        topic=topic,
        extra_env={"INGEST_SHUTDOWN_TIMEOUT": "60"},
    )
    try:
        d.start().wait_subscribed()
        pg.stop()
        with Publisher(broker.url) as pub:
            pub.publish_many(fleet(topic, devices=2, count=5))
        d.wait_for_log("failed", timeout=20)
        d.signal(signal.SIGINT)
        d.wait_for_log("draining", timeout=10)
        d.signal(signal.SIGINT)
        assert d.wait(15) == 1
        assert "forcing exit" in d.log_text()
        # Nothing was acknowledged: the broker redelivers everything once the database is back.
        pg.start()
        d.start().wait_subscribed()
        wait_rows(url, 10 * READINGS_PER_SAMPLE, timeout=30)
        assert d.stop() == 0
    finally:
        d.close()


def test_fatal_error_is_one_line_with_root_cause_and_sqlstate(
    database_url: str, mqtt_url: str
) -> None:
    # The daemon's login role may not write the table each batch records itself in: the
    # writer stops (class 42 is never data), and what reaches the operator is the server's
    # own words and SQLSTATE, not "unhandled errors in a TaskGroup".
    import uuid
    from urllib.parse import urlsplit, urlunsplit

    from tests.integration.support import migrate

    migrate(database_url)
    role = f"ingest_fatal_{uuid.uuid4().hex[:8]}"
    for sql in (
        f"CREATE ROLE {role} LOGIN",
        f"GRANT USAGE, CREATE ON SCHEMA public TO {role}",
        f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}",
        f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}",
        f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO {role}",
        f"REVOKE INSERT ON dashboard_pending FROM {role}",
    ):
        query(database_url, sql)
    parts = urlsplit(database_url)
    as_role = urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}"))
    topic = unique_topic()
    d = Daemon(
        database_url=as_role,
        mqtt_url=mqtt_url,
        topic=topic,
        extra_env={"INGEST_MIGRATE": "false"},
    )
    try:
        d.start().wait_subscribed()
        with Publisher(mqtt_url) as pub:
            pub.publish_many(fleet(topic, devices=1, count=1))
        assert d.wait(60) == 1
        fatal = [r for r in d.log_records() if str(r.get("msg", "")).startswith("fatal")]
        assert [(r["level"], r["msg"]) for r in fatal] == [
            ("error", "fatal: permission denied for table dashboard_pending (SQLSTATE 42501)")
        ]
        assert "TaskGroup" not in d.log_text()
        assert "Traceback" not in d.log_text()
        assert scalar(database_url, "SELECT count(*) FROM dead_letters") == 0
    finally:
        d.close()
        query(database_url, f"DROP OWNED BY {role}")
        query(database_url, f"DROP ROLE {role}")
