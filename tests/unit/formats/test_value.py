"""The ``value`` format: one value per message for the topic's metric."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ingest.errors import DecodeError
from ingest.formats.decode import FORMATS, Limits, decode
from ingest.formats.limits import DEFAULT_LIMITS
from ingest.formats.routes import parse_routes
from ingest.model import Decoded, Reading, TextReading

RECEIVED = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
ROUTES = parse_routes([{"topic": "stat/{device_id}/{metric}", "format": "value"}], FORMATS)
TOPIC = "stat/plug1/POWER"


def run(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Decoded | DecodeError:
    return decode(TOPIC, payload, RECEIVED, ROUTES, limits=limits)


def reading(payload: bytes) -> float:
    result = run(payload)
    assert isinstance(result, Decoded), result
    assert result.texts == ()
    (r,) = result.readings
    assert r == Reading("plug1", "POWER", RECEIVED, r.value) and type(r.value) is float
    return r.value


def text(payload: bytes) -> str:
    result = run(payload)
    assert isinstance(result, Decoded), result
    assert result.readings == []
    (t,) = result.texts
    assert type(t) is TextReading and t[:3] == ("plug1", "POWER", RECEIVED)
    return t.value


@pytest.mark.parametrize(
    ("payload", "value"),
    [
        (b"21.5", 21.5),
        (b" -3 \n", -3.0),
        (b"1e3", 1000.0),
        (b"0", 0.0),
        (b"ON", 1.0),
        (b"off", 0.0),
        (b"On", 1.0),
        (b"TRUE", 1.0),
        (b"false", 0.0),
        (b"true", 1.0),
        (b'"21.5"', 21.5),
        (b'"ON"', 1.0),
        (b'{"value": 42}', 42.0),
        (b'{"value": true}', 1.0),
        (b'{"value": "off"}', 0.0),
    ],
)
def test_numbers_and_switches(payload: bytes, value: float) -> None:
    assert reading(payload) == value


@pytest.mark.parametrize(
    ("payload", "value"),
    [
        (b"open", "open"),
        (b"  closed \r\n", "closed"),
        (b"1.4.2", "1.4.2"),
        (b"12abc", "12abc"),
        (b'"heating"', "heating"),
        ("Küche".encode(), "Küche"),
        (b'{"value": "idle"}', "idle"),
        (b"nan", "nan"),
        (b"{not json", "{not json"),
        (b"[1, 2]", "[1, 2]"),
    ],
)
def test_other_text_is_a_text_reading(payload: bytes, value: str) -> None:
    assert text(payload) == value


def test_ts_object() -> None:
    result = run(b'{"ts": 1704164645, "value": 3, "unit": "W"}')
    assert isinstance(result, Decoded)
    assert result.readings == [
        Reading("plug1", "POWER", datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), 3.0)
    ]
    assert result.skipped == 1


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "no_readings"),
        (b"   ", "no_readings"),
        (b"null", "no_readings"),
        (b'{"ts": 1704164645}', "no_readings"),
        (b'{"value": null}', "no_readings"),
        (b"\xff\xfe", "invalid_utf8"),
        (b'{"ts": "soon", "value": 1}', "bad_ts"),
        (b'{"ts": 946684799, "value": 1}', "ts_out_of_range"),
        (b"a\x00b", "no_readings"),
    ],
)
def test_dead_letters(payload: bytes, reason: str) -> None:
    result = run(payload)
    assert isinstance(result, DecodeError), result
    assert result.reason == reason


def test_ts_window_follows_the_limits() -> None:
    ahead = int((RECEIVED + timedelta(hours=2)).timestamp())
    payload = b'{"ts": %d, "value": 1}' % ahead
    assert isinstance(run(payload), Decoded)
    short = run(payload, Limits(max_ts_ahead=timedelta(hours=1)))
    assert isinstance(short, DecodeError) and short.reason == "ts_out_of_range"


def test_text_over_the_limit_is_skipped() -> None:
    assert text(b"x" * 1024) == "x" * 1024
    result = run(b"x" * 1025)
    assert isinstance(result, DecodeError) and result.reason == "no_readings"
    small = run("éé".encode(), Limits(max_text_bytes=3))  # 4 bytes in UTF-8
    assert isinstance(small, DecodeError) and small.reason == "no_readings"


@pytest.mark.parametrize("metric", ["\x07", "m" * 129])
def test_metric_name_rules(metric: str) -> None:
    result = decode(f"stat/plug1/{metric}", b"1", RECEIVED, ROUTES)
    assert isinstance(result, DecodeError) and result.reason == "bad_metric"


def test_rest_of_topic_as_metric() -> None:
    routes = parse_routes(
        [{"topic": "shellies/{device_id}/{metric...}", "format": "value"}], FORMATS
    )
    result = decode("shellies/sh1/relay/0/power", b"42.1", RECEIVED, routes)
    assert isinstance(result, Decoded)
    assert result.readings == [Reading("sh1", "relay.0.power", RECEIVED, 42.1)]


def test_a_value_route_without_metric_level_is_bad_topic() -> None:
    routes = parse_routes([{"topic": "x/{device_id}", "format": "value"}], FORMATS)
    result = decode("x/d", b"1", RECEIVED, routes)
    assert isinstance(result, DecodeError) and result.reason == "bad_topic"
