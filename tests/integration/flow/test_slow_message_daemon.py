"""``ingest run`` against a real broker and database: one message that cannot be written within
INGEST_DB_WRITE_TIMEOUT does not hold back the acknowledgements of the others; it ends as a
dead letter and everything received is acknowledged (docs/design.md, Limits).

Its device's rows are made slow by a trigger that sleeps (tests/integration/flow/
test_slow_writes.py has the writer-level cases)."""

from __future__ import annotations

import json
from typing import Any

from ingest.devservers.throwaway import run_sql
from tests.integration.flow.test_slow_writes import SLOW_DEVICE, slow_trigger
from tests.integration.support import (
    Daemon,
    Publisher,
    migrate,
    query,
    scalar,
    topic_for,
    unique_topic,
    wait_until,
)

BEFORE, AFTER = 8, 8


def stats_lines(daemon: Daemon) -> list[dict[str, Any]]:
    return [r for r in daemon.log_records() if r.get("msg") == "stats"]


def test_a_message_too_slow_to_write_is_dead_lettered_and_all_are_acknowledged(
    database_url: str, mqtt_url: str
) -> None:
    migrate(database_url)
    run_sql(database_url, slow_trigger())
    topic = unique_topic()

    def good(i: int) -> tuple[str, bytes]:
        return topic_for(topic, f"dev-{i:02d}"), json.dumps(
            {"ts": 1_700_000_000 + i, "x": i}
        ).encode()

    slow = (topic_for(topic, SLOW_DEVICE), json.dumps({"ts": 1_700_000_000, "x": -1}).encode())
    items = [*map(good, range(BEFORE)), slow, *map(good, range(BEFORE, BEFORE + AFTER))]
    env = {"INGEST_DB_WRITE_TIMEOUT": "1"}
    with Daemon(database_url=database_url, mqtt_url=mqtt_url, topic=topic, extra_env=env) as d:
        d.wait_subscribed()
        with Publisher(mqtt_url) as pub:
            pub.publish_many(items)
        try:
            wait_until(
                lambda: scalar(database_url, "SELECT count(*) FROM dead_letters") == 1,
                180,
                what="the slow message's dead letter",
            )
            # Every message received is acknowledged: the slow one holds nothing back for good.
            wait_until(
                lambda: any(
                    s["received"] == len(items) and s["unacked"] == 0 for s in stats_lines(d)
                ),
                60,
                what="all acknowledged",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{d.log_text()[-6000:]}") from None
        assert d.stop() == 0
    rows = query(database_url, "SELECT device_id, count(*) AS n FROM readings GROUP BY 1")
    assert {r["device_id"]: r["n"] for r in rows} == {
        f"dev-{i:02d}": 1 for i in range(BEFORE + AFTER)
    }
    [dead] = query(database_url, "SELECT topic, payload, reason, error FROM dead_letters")
    assert (dead["topic"], bytes(dead["payload"])) == slow
    assert dead["reason"] == "rejected_by_database"
    assert "write timed out after 1s (INGEST_DB_WRITE_TIMEOUT)" in dead["error"]
