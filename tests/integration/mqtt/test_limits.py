"""The payload byte limit against a real broker and a real daemon (docs/design.md, Limits): a
publish over ``INGEST_MAX_PAYLOAD_BYTES`` becomes a ``too_large`` dead letter that keeps its
first 64 KiB and its full size, its neighbours land, and the daemon never holds it whole."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

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

READINGS_PER_SAMPLE = 5  # seq, temperature, humidity, battery, rssi
BIG = 100_000_000
MIB = 1 << 20
KEEP = 65536
# What the daemon's peak memory may grow by while a 100 MB and ten 1 MiB messages pass.
MAX_GROWTH = 40 * MIB


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


def test_an_oversized_publish_is_a_dead_letter_and_never_held_whole(
    database_url: str, mosquitto_factory: MosquittoFactory
) -> None:
    # A broker without the project's fence (max_packet_size): as one run by someone else might be.
    broker = mosquitto_factory({"max_packet_size": "268435455"})
    template = unique_topic()
    before = fleet(template, devices=4, count=5)
    after = fleet(template, devices=4, count=5, start=5)
    big_topic = template.replace("{device_id}", "dev-big")
    mib_topic = template.replace("{device_id}", "dev-mib")
    with Daemon(database_url=database_url, mqtt_url=broker.url, topic=template) as daemon:
        daemon.wait_subscribed()
        assert daemon.proc is not None
        pid = daemon.proc.pid
        reset = _reset_peak(pid)
        start_kib = _status_kib(pid, "VmRSS")
        if not reset:  # then the peak so far counts as growth: an overestimate, never an under
            start_kib = min(start_kib, _status_kib(pid, "VmHWM"))
        with Publisher(broker.url) as pub:
            pub.publish_many(before)
            pub.publish_many([(big_topic, b"x" * BIG)])
            pub.publish_many([(mib_topic, bytes([65 + i]) * MIB) for i in range(10)])
            pub.publish_many(after)
        wait_rows(database_url, (len(before) + len(after)) * READINGS_PER_SAMPLE, timeout=120)
        wait_until(
            lambda: scalar(database_url, "SELECT count(*) FROM dead_letters") == 11,
            timeout=120,
            what="11 dead letters",
        )
        peak_kib = _status_kib(pid, "VmHWM")
        assert daemon.stop() == 0
    growth = (peak_kib - start_kib) * 1024
    print(f"daemon peak RSS growth while 100 MB + 10 x 1 MiB passed: {growth / MIB:.1f} MiB")
    assert growth < MAX_GROWTH, f"the daemon grew by {growth / MIB:.1f} MiB"

    (big,) = query(
        database_url,
        "SELECT reason, octet_length(payload) AS kept, payload, payload_size FROM dead_letters"
        " WHERE topic = $1",
        big_topic,
    )
    assert big["reason"] == "too_large"
    assert big["kept"] <= KEEP
    assert bytes(big["payload"]) == b"x" * big["kept"]  # the start of the payload, as sent
    assert big["payload_size"] == BIG
    # At the limit (1 MiB) a message is whole, exactly as before the limit existed.
    mib = query(
        database_url,
        "SELECT reason, octet_length(payload) AS kept, payload_size FROM dead_letters"
        " WHERE topic = $1",
        mib_topic,
    )
    assert [(r["reason"], r["kept"]) for r in mib] == [("not_json", MIB)] * 10
    assert {r["payload_size"] for r in mib} <= {None, MIB}


def test_the_project_broker_config_fences_oversized_packets() -> None:
    """The second fence: the broker itself refuses packets far over the daemon's limit."""
    conf = (Path(__file__).resolve().parents[3] / "config" / "mosquitto.conf").read_text()
    found = re.search(r"^max_packet_size\s+(\d+)", conf, re.M)
    assert found, "config/mosquitto.conf sets no max_packet_size"
    fence = int(found.group(1))
    assert MIB < fence <= 268_435_455  # above INGEST_MAX_PAYLOAD_BYTES' default, below MQTT's
