"""The source's and the MQTT session's metrics: how messages were parsed, the payload bytes
not yet acknowledged, and every disconnect cause present (at 0) before it first happens."""

from __future__ import annotations

from dataclasses import replace

from ingest.mqtt.answers import CAUSES
from tests.unit.observability.support import collect, snapshot, value


def test_parsed_by_path_and_unacknowledged_bytes() -> None:
    base = snapshot()
    snap = replace(
        base,
        source=replace(base.source, parsed_fast=1150, parsed_paho=47, too_large=3),
        acker=replace(base.acker, outstanding_bytes=123_456),
    )
    found = collect(snap)
    assert value(found, "ingest_mqtt_messages_parsed_total", path="fast") == 1150
    assert value(found, "ingest_mqtt_messages_parsed_total", path="paho") == 47
    assert value(found, "ingest_messages_unacknowledged_bytes") == 123_456


def test_every_disconnect_cause_is_there_before_it_happens() -> None:
    found = collect(snapshot())  # disconnects: timeout 1, disconnected 1
    for cause in CAUSES:
        expected = 1 if cause in ("timeout", "disconnected") else 0
        assert value(found, "ingest_broker_disconnects_total", cause=cause) == expected, cause
    assert {"not_authorized", "taken_over", "tls"} <= set(CAUSES)


def test_parse_paths_are_zero_before_the_first_message() -> None:
    found = collect(snapshot())
    assert value(found, "ingest_mqtt_messages_parsed_total", path="fast") == 0
    assert value(found, "ingest_mqtt_messages_parsed_total", path="paho") == 0
    assert value(found, "ingest_messages_unacknowledged_bytes") == 0
