"""Retiring sessions: ``ingest run --workers N`` after a larger worker set, and ``ingest sessions
list | retire`` as an operator runs them (real mosquitto and PostgreSQL)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import paho.mqtt.client as paho
import pytest

from ingest.devservers import free_port
from ingest.devservers.throwaway import MosquittoFactory
from tests.integration.support import (
    Daemon,
    Publisher,
    fleet,
    query,
    scalar,
    unique_topic,
    wait_rows,
    wait_until,
)


def session_present(mqtt_url: str, client_id: str) -> bool:
    """Does the broker hold a session for ``client_id``? Connects with clean_session=False and
    reads the CONNACK (the session this makes is ended again with a clean connection)."""
    port = int(mqtt_url.rsplit(":", 1)[1])
    flags: dict[str, bool] = {}
    done = threading.Event()

    def on_connect(_c: Any, _u: Any, f: Any, _rc: Any, _p: Any) -> None:
        flags["present"] = bool(f.session_present)
        done.set()

    for clean in (False, True):
        c = paho.Client(
            paho.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]
            client_id=client_id,
            clean_session=clean,
        )
        c.on_connect = on_connect
        c.connect("127.0.0.1", port)
        c.loop_start()
        assert done.wait(10), "no CONNACK"
        c.disconnect()
        c.loop_stop()
        if not clean:
            present = flags["present"]
            done.clear()
    return present


def recorded(database_url: str) -> int:
    """Rows of the sessions table (0 before the daemon migrated)."""
    try:
        return int(scalar(database_url, "SELECT count(*) FROM sessions"))
    except asyncpg.UndefinedTableError:
        return 0


def sessions_cli(
    *args: str,
    database_url: str,
    mqtt_url: str | None = None,
    topic: str | None = None,
    protocol: str | None = None,
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "ingest", "sessions", *args, "--database-url", database_url]
    if protocol is not None:
        command += ["--mqtt-protocol", protocol]
    if mqtt_url is not None:
        command += ["--mqtt-url", mqtt_url]
    if topic is not None:
        command += ["--topic", topic]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def test_restart_with_fewer_workers_retires_the_surplus_sessions(
    database_url: str, mosquitto_factory: MosquittoFactory
) -> None:
    """8 workers, stopped; a backlog queued while they are away (each session holds its share);
    restarted as 4: the sessions of workers 4-7 are drained through the pipeline and ended,
    every message lands exactly once, and the broker holds nothing for the removed ids."""
    broker = mosquitto_factory()
    topic = unique_topic()
    client_id = f"ingest-test-{uuid.uuid4().hex[:8]}"
    env = {"INGEST_SHUTDOWN_TIMEOUT": "60", "INGEST_DB_POOL_SIZE": "1"}
    eight = Daemon(
        database_url=database_url, mqtt_url=broker.url, topic=topic, client_id=client_id,
        args=["--workers", "8"], extra_env=env,
    )  # fmt: skip
    try:
        eight.start()
        wait_until(lambda: eight.log_text().count("subscribed to $share/") >= 8, 180)
        wait_until(lambda: recorded(database_url) == 8, 60)
        assert eight.stop(timeout=90) == 0
    finally:
        eight.close()
    msgs = fleet(topic, devices=20, count=80)  # 1,600 messages, ~200 per session
    with Publisher(broker.url) as pub:
        assert pub.publish_many(msgs) == len(msgs)

    four = Daemon(
        database_url=database_url, mqtt_url=broker.url, topic=topic, client_id=client_id,
        args=["--workers", "4"], extra_env=env,
    )  # fmt: skip
    try:
        four.start()
        four.wait_for_log("surplus sessions retired: 4 of 4", timeout=240)
        wait_rows(database_url, len(msgs) * 5, timeout=120)
        assert four.stop(timeout=90) == 0
    finally:
        four.close()
    log = four.log_text()
    retired = [f"{client_id}-{i}" for i in range(4, 8)]
    assert f"retiring 4 surplus sessions of an earlier worker set: {', '.join(retired)}" in log
    summary = re.search(r"surplus sessions retired: 4 of 4 \(.*\), (\d+) messages drained", log)
    assert summary is not None
    drained = int(summary.group(1))
    # Roughly half of the backlog waited in the removed sessions (mosquitto spreads a shared
    # subscription's messages over its sessions, connected or not).
    assert len(msgs) // 4 < drained < len(msgs) * 3 // 4, drained
    # Exactly once: every reading, no reading twice (the key would collapse a copy, so equal
    # counts mean nothing is missing), and no dead letter.
    assert scalar(database_url, "SELECT count(*) FROM readings") == len(msgs) * 5
    assert scalar(database_url, "SELECT count(DISTINCT (device_id, ts)) FROM readings") == len(msgs)
    assert scalar(database_url, "SELECT count(*) FROM dead_letters") == 0
    rows = {
        r["client_id"]: r["retired_at"]
        for r in query(database_url, "SELECT client_id, retired_at FROM sessions")
    }
    assert {cid for cid, at in rows.items() if at is not None} == set(retired)
    assert all(rows[f"{client_id}-{i}"] is None for i in range(4))
    for cid in retired:
        assert not session_present(broker.url, cid), cid
    assert session_present(broker.url, f"{client_id}-0")


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_sessions_list_and_retire_from_the_command_line(
    database_url: str, mosquitto_factory: MosquittoFactory, protocol: str
) -> None:
    broker = mosquitto_factory()
    topic = unique_topic()
    d = Daemon(
        database_url=database_url, mqtt_url=broker.url, topic=topic,
        extra_env={"INGEST_MQTT_PROTOCOL": protocol},
    )  # fmt: skip
    cid = d.client_id
    try:
        d.start()
        d.wait_subscribed(timeout=60)
        wait_until(lambda: recorded(database_url) == 1, 30)
        listed = sessions_cli("list", "--json", database_url=database_url)
        assert listed.returncode == 0, listed.stderr
        (row,) = json.loads(listed.stdout)
        assert row["client_id"] == cid and row["state"] == "live"
        assert row["broker"] == broker.url and row["share_group"] is None
        # A live session is not taken over.
        live = sessions_cli(
            "retire", cid, database_url=database_url, topic=topic, protocol=protocol
        )
        assert live.returncode == 1
        assert f"client id {cid} may be live" in live.stderr and "--force" in live.stderr
        assert d.proc is not None and d.proc.poll() is None
        assert d.stop(timeout=60) == 0
    finally:
        d.close()
    msgs = fleet(topic, devices=5, count=60)
    with Publisher(broker.url) as pub:
        pub.publish_many(msgs)

    table = sessions_cli("list", database_url=database_url)
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].split() == [
        "client", "id", "broker", "group", "first", "seen", "last", "seen", "retired", "state",
    ]  # fmt: skip
    assert table.stdout.splitlines()[1].split()[-1] == "away"
    done = sessions_cli(
        "retire", cid, "--idle", "2", "--json",
        database_url=database_url, topic=topic, protocol=protocol,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (outcome,) = json.loads(done.stdout)
    assert outcome["retired"] and outcome["drained"] == len(msgs) and outcome["held_session"]
    assert f"draining {cid}: {len(msgs)} messages, " in done.stderr  # the progress line
    assert scalar(database_url, "SELECT count(*) FROM readings") == len(msgs) * 5
    assert not session_present(broker.url, cid)
    (row,) = json.loads(sessions_cli("list", "--json", database_url=database_url).stdout)
    assert row["state"] == "retired" and row["retired_at"] is not None


def test_retire_errors_are_clear(database_url: str, mqtt_url: str) -> None:
    from tests.integration.support import migrate

    migrate(database_url)
    unknown = sessions_cli("retire", "nobody-7", database_url=database_url)
    assert unknown.returncode == 1
    assert "unknown client id nobody-7" in unknown.stderr and "--broker" in unknown.stderr

    down = f"mqtt://127.0.0.1:{free_port()}"
    refused = sessions_cli("retire", "nobody-7", "--broker", down, database_url=database_url)
    assert refused.returncode == 1
    assert "nobody-7: MQTT broker 127.0.0.1:" in refused.stderr
    assert "refused" in refused.stderr and "the session is kept" in refused.stderr
    assert scalar(database_url, "SELECT count(*) FROM sessions") == 0

    # An id the table does not know, on a broker that is up: there is nothing to drain, and
    # the table records it as retired.
    ok = sessions_cli(
        "retire",
        "nobody-7",
        "--broker",
        mqtt_url,
        "--idle",
        "1",
        "--json",
        database_url=database_url,
    )
    assert ok.returncode == 0, ok.stderr
    (outcome,) = json.loads(ok.stdout)
    assert outcome["drained"] == 0 and outcome["held_session"] is False
    assert scalar(database_url, "SELECT count(*) FROM sessions WHERE retired_at IS NOT NULL") == 1

    no_table = sessions_cli("list", database_url=database_url.rsplit("/", 1)[0] + "/postgres")
    assert no_table.returncode == 1 and "ingest migrate" in no_table.stderr


def test_one_worker_after_several_retires_every_indexed_session(
    database_url: str, mosquitto_factory: MosquittoFactory
) -> None:
    """``ingest run`` without --workers uses the bare client id: the sessions of an earlier
    ``--workers 2`` (``<client_id>-0``, ``-1``) are all surplus."""
    broker = mosquitto_factory()
    topic = unique_topic()
    client_id = f"ingest-test-{uuid.uuid4().hex[:8]}"
    two = Daemon(
        database_url=database_url, mqtt_url=broker.url, topic=topic, client_id=client_id,
        args=["--workers", "2"],
    )  # fmt: skip
    try:
        two.start()
        wait_until(lambda: recorded(database_url) == 2, 120)
        assert two.stop(timeout=60) == 0
    finally:
        two.close()
    msgs = fleet(topic, devices=10, count=40)
    with Publisher(broker.url) as pub:
        pub.publish_many(msgs)

    one = Daemon(database_url=database_url, mqtt_url=broker.url, topic=topic, client_id=client_id)
    try:
        one.start()
        one.wait_for_log("surplus sessions retired: 2 of 2", timeout=180)
        wait_rows(database_url, len(msgs) * 5, timeout=60)
        assert one.stop(timeout=60) == 0
    finally:
        one.close()
    assert scalar(database_url, "SELECT count(*) FROM readings") == len(msgs) * 5
    retired = query(database_url, "SELECT client_id FROM sessions WHERE retired_at IS NOT NULL")
    assert sorted(r[0] for r in retired) == [f"{client_id}-0", f"{client_id}-1"]
    assert not session_present(broker.url, f"{client_id}-0")


def test_a_session_that_cannot_be_recorded_never_stops_the_flow(
    database_url: str, mqtt_url: str, postgres_server: str
) -> None:
    """A login without its privileges on ``sessions``: the daemon names the 42501 and goes on
    storing readings; nothing becomes a dead letter."""
    from ingest.devservers.throwaway import run_sql
    from tests.integration.support import migrate

    migrate(database_url)
    role = f"writer_{uuid.uuid4().hex[:8]}"
    run_sql(postgres_server, f"CREATE ROLE {role} LOGIN IN ROLE ingest_writer")
    run_sql(database_url, "REVOKE ALL ON sessions FROM ingest_writer")
    parts = urlsplit(database_url)
    as_writer = urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}"))
    topic = unique_topic()
    d = Daemon(database_url=as_writer, mqtt_url=mqtt_url, topic=topic)
    msgs = fleet(topic, devices=5, count=20)
    try:
        d.start()
        d.wait_subscribed(timeout=60)
        with Publisher(mqtt_url) as pub:
            pub.publish_many(msgs)
        wait_rows(database_url, len(msgs) * 5, timeout=60)
        d.wait_for_log("permission denied (SQLSTATE 42501)", timeout=30)
        assert d.stop(timeout=60) == 0
    finally:
        d.close()
        run_sql(postgres_server, f"DROP ROLE IF EXISTS {role}")
    assert f"cannot record session {d.client_id}: permission denied" in d.log_text()
    assert scalar(database_url, "SELECT count(*) FROM dead_letters") == 0
    assert scalar(database_url, "SELECT count(*) FROM sessions") == 0


_SLOW_INSERTS = (
    "CREATE FUNCTION test_hold_5ms() RETURNS trigger LANGUAGE plpgsql AS"
    " $$ BEGIN PERFORM pg_sleep(0.005); RETURN NULL; END $$",
    "CREATE TRIGGER slow_inserts AFTER INSERT ON points FOR EACH STATEMENT"
    " EXECUTE FUNCTION test_hold_5ms()",
)


def test_an_interrupted_retire_keeps_the_session_and_runs_again(
    database_url: str, mosquitto_factory: MosquittoFactory, tmp_path: Path
) -> None:
    """SIGTERM while draining: what is in hand is written and acknowledged, the session stays
    at the broker with the rest (exit 1), and a second retire stores the rest."""
    broker = mosquitto_factory()
    topic = unique_topic()
    d = Daemon(database_url=database_url, mqtt_url=broker.url, topic=topic)
    try:
        d.start()
        wait_until(lambda: recorded(database_url) == 1, 60)
        assert d.stop(timeout=60) == 0
    finally:
        d.close()
    msgs = fleet(topic, devices=30, count=100)
    with Publisher(broker.url) as pub:
        pub.publish_many(msgs)

    # One message a transaction, one transaction at a time, each held 5 ms by the server: at
    # least 15 s for the lot on any machine, so the SIGTERM comes mid-drain.
    for statement in _SLOW_INSERTS:
        query(database_url, statement)
    slow = ["--batch-max-rows", "5", "--db-pool-size", "1", "--topic", topic]
    command = [sys.executable, "-m", "ingest", "sessions", "retire", d.client_id, "--json"]
    command += [*slow, "--idle", "2", "--database-url", database_url]
    errors = tmp_path / "stderr"
    with errors.open("w") as sink:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=sink, text=True)
        try:
            wait_until(lambda: f"draining {d.client_id}: " in errors.read_text(), 120)
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 1
    (outcome,) = json.loads(out)
    assert outcome["error"].startswith("interrupted: the session is kept")
    assert 0 < outcome["drained"] < len(msgs)
    assert scalar(database_url, "SELECT count(*) FROM readings") == outcome["drained"] * 5

    query(database_url, "DROP TRIGGER slow_inserts ON points")
    again = sessions_cli(
        "retire", d.client_id, "--idle", "2", database_url=database_url, topic=topic
    )
    assert again.returncode == 0, again.stderr
    assert scalar(database_url, "SELECT count(*) FROM readings") == len(msgs) * 5
