"""Memory bounded in bytes, not only in messages (docs/design.md, Limits), against a real
broker and a real database: while the database cannot take writes, the daemon holds at most
about ``INGEST_MQTT_INFLIGHT_BYTES`` of payload, whatever the broker has queued for it; the
rest waits at the broker, and once writes go through again everything lands exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg

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

MIB = 1 << 20
MESSAGES = 200
SIZE = 512 * 1024  # 200 of them: 100 MiB queued for the daemon
BOUND = 4 * MIB
# What the daemon's peak memory may grow by: the bound twice (the session's inbox and the
# messages on their way to the database) and room for the interpreter, far below 100 MiB.
MAX_GROWTH = 30 * MIB


def _status_kib(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    assert found, f"no {field} in /proc/{pid}/status"
    return int(found.group(1))


def _reset_peak(pid: int) -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of ``pid``; False where that is not allowed."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    return False


@contextlib.contextmanager
def _readings_locked(database_url: str) -> Iterator[None]:
    """Hold an exclusive lock on ``readings`` in an open transaction (in a thread with its own
    event loop): every write of the daemon waits, as behind a stuck or slow database."""
    locked, release = threading.Event(), threading.Event()
    failure: list[BaseException] = []

    async def hold() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            async with conn.transaction():
                await conn.execute("LOCK TABLE readings IN ACCESS EXCLUSIVE MODE")
                locked.set()
                await asyncio.to_thread(release.wait)
        finally:
            await conn.close()

    def run() -> None:
        try:
            asyncio.run(hold())
        except BaseException as exc:  # reported by the test thread
            failure.append(exc)
            locked.set()

    thread = threading.Thread(target=run, name="lock-readings", daemon=True)
    thread.start()
    locked.wait(30)
    if failure:
        raise failure[0]
    try:
        yield
    finally:
        release.set()
        thread.join(30)


def _received(daemon: Daemon) -> int:
    stats = [r for r in daemon.log_records() if r.get("msg") == "stats"]
    return int(stats[-1]["received"]) if stats else 0


def _payload(seq: int) -> bytes:
    head = b'{"ts": %d, "seq": %d, "pad": "' % (1_700_000_000_000 + seq, seq)
    return head + b"p" * (SIZE - len(head) - 2) + b'"}'


def test_memory_stays_bounded_in_bytes_while_the_database_is_blocked(
    database_url: str, mqtt_url: str
) -> None:
    template = unique_topic()
    messages = [(topic_for(template, f"dev-{i % 4}"), _payload(i)) for i in range(MESSAGES)]
    daemon = Daemon(
        database_url=database_url,
        mqtt_url=mqtt_url,
        topic=template,
        extra_env={
            "INGEST_MQTT_INFLIGHT_BYTES": str(BOUND),
            # The lock is held on purpose: no write may be given up on meanwhile.
            "INGEST_DB_WRITE_TIMEOUT": "300",
        },
    )
    with daemon:
        daemon.wait_subscribed()
        assert daemon.proc is not None
        pid = daemon.proc.pid
        with _readings_locked(database_url):
            reset = _reset_peak(pid)
            start_kib = _status_kib(pid, "VmRSS")
            if not reset:  # then the peak so far counts as growth: an overestimate, never an under
                start_kib = min(start_kib, _status_kib(pid, "VmHWM"))
            with Publisher(mqtt_url) as pub:
                pub.publish_many(messages)
            # The daemon takes what the bound allows, then stops reading. A daemon without
            # the bound goes on to take all 200; give it the time to show it.
            wait_until(lambda: _received(daemon) >= BOUND // SIZE, timeout=60, what="the bound")
            time.sleep(3)
            held = _received(daemon)
            peak_kib = _status_kib(pid, "VmHWM")
        wait_rows(database_url, MESSAGES, timeout=120)
        assert daemon.stop() == 0
    growth = (peak_kib - start_kib) * 1024
    print(
        f"daemon peak RSS growth with 100 MiB queued and a {BOUND // MIB} MiB bound: "
        f"{growth / MIB:.1f} MiB ({held} messages received while blocked)"
    )
    assert growth < MAX_GROWTH, f"the daemon grew by {growth / MIB:.1f} MiB"
    assert held < MESSAGES, "the daemon read every queued message while it could not write"
    # Once released, exactly once: one reading per message, no dead letter, all acknowledged.
    rows = query(database_url, "SELECT value FROM readings WHERE metric = 'seq' ORDER BY value")
    assert [r["value"] for r in rows] == [float(i) for i in range(MESSAGES)]
    assert scalar(database_url, "SELECT count(*) FROM readings") == MESSAGES
    assert scalar(database_url, "SELECT count(*) FROM dead_letters") == 0
    drained = [r["msg"] for r in daemon.log_records() if r["msg"].startswith("drained:")]
    assert drained and f"{MESSAGES} acknowledged" in drained[-1], drained
