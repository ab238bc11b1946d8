"""The ``json`` format's route options ([routes.json]) and its text readings."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from ingest.errors import DecodeError
from ingest.formats.decode import FORMATS, Limits, decode
from ingest.formats.limits import DEFAULT_LIMITS
from ingest.formats.routes import parse_routes
from ingest.model import Decoded, DeviceUpdate, Reading, TextReading

RECEIVED = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
T1 = datetime(2024, 1, 2, 3, 0, tzinfo=UTC)  # 1704164400
T2 = datetime(2024, 1, 2, 3, 1, tzinfo=UTC)  # 1704164460
TOPIC = "gw/d1"


def run(
    options: dict[str, Any], payload: Any, limits: Limits = DEFAULT_LIMITS, **route: Any
) -> Decoded | DecodeError:
    routes = parse_routes([{"topic": "gw/{device_id}", "json": options, **route}], FORMATS)
    raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return decode(TOPIC, raw, RECEIVED, routes, limits=limits)


def ok(options: dict[str, Any], payload: Any, **route: Any) -> Decoded:
    result = run(options, payload, **route)
    assert isinstance(result, Decoded), result
    return result


def reason(options: dict[str, Any], payload: Any, limits: Limits = DEFAULT_LIMITS) -> str:
    result = run(options, payload, limits)
    assert isinstance(result, DecodeError), result
    return result.reason


def test_ts_path_nested() -> None:
    result = ok({"ts": "meta.time"}, {"meta": {"time": 1704164400, "fw": "1.2"}, "t": 20})
    assert result.readings == [Reading("d1", "t", T1, 20.0)]
    assert result.texts == (TextReading("d1", "meta.fw", T1, "1.2"),)


def test_ts_path_renamed_and_absent() -> None:
    assert ok({"ts": "time"}, {"time": "2024-01-02T03:00:00Z", "t": 1}).readings[0].ts == T1
    assert ok({"ts": "time"}, {"t": 1}).readings[0].ts == RECEIVED
    # With another ts path, a field named ts is an ordinary reading.
    assert {r.metric for r in ok({"ts": "time"}, {"ts": 5, "t": 1}).readings} == {"ts", "t"}
    assert reason({"ts": "time"}, {"time": "soon", "t": 1}) == "bad_ts"
    assert reason({"ts": "time"}, {"time": 946684799, "t": 1}) == "ts_out_of_range"


KEPWARE = {
    "timestamp": 1704164400000,
    "values": [
        {"id": "Channel1.Device1.Temp", "v": 20.5, "q": True, "t": 1704164460000},
        {"id": "Channel1.Device1.Run", "v": True, "q": True, "t": 1704164460000},
        {"id": "Channel1.Device1.Mode", "v": "AUTO", "q": True},
    ],
}
KEPWARE_OPTIONS = {
    "ts": "timestamp",
    "samples": "values",
    "sample_name": "id",
    "sample_value": "v",
    "sample_ts": "t",
}


def test_samples_list_kepware_style() -> None:
    result = ok(KEPWARE_OPTIONS, KEPWARE)
    assert result.readings == [
        Reading("d1", "Channel1.Device1.Temp", T2, 20.5),
        Reading("d1", "Channel1.Device1.Run", T2, 1.0),
    ]
    assert result.texts == (TextReading("d1", "Channel1.Device1.Mode", T1, "AUTO"),)
    assert result.skipped == 3  # the three quality flags


def test_samples_defaults_name_value_ts() -> None:
    payload = {"data": [{"name": "a", "value": 1, "ts": 1704164400}, {"name": "b", "value": "x"}]}
    result = ok({"samples": "data"}, payload)
    assert result.readings == [Reading("d1", "a", T1, 1.0)]
    assert result.texts == (TextReading("d1", "b", RECEIVED, "x"),)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"values": 3}, "bad_sample"),
        ({"values": [1]}, "bad_sample"),
        ({"values": [{"v": 1}]}, "bad_sample"),
        ({"values": [{"id": 5, "v": 1}]}, "bad_sample"),
        ({"values": [{"id": "a", "v": 1, "t": "x"}]}, "bad_ts"),
        ({"values": [{"id": "", "v": 1}]}, "bad_metric"),
        ({"values": [{"id": "a\x1b", "v": 1}]}, "bad_metric"),
        ({"values": []}, "no_readings"),
        ({"values": [{"id": "a", "v": None}]}, "no_readings"),
    ],
)
def test_samples_faults(payload: Any, expected: str) -> None:
    assert reason(KEPWARE_OPTIONS, payload) == expected


def test_samples_limit() -> None:
    payload: dict[str, Any] = {"values": [{"id": f"m{i}", "v": i} for i in range(11)]}
    assert (
        reason(KEPWARE_OPTIONS, payload, Limits(max_readings_per_message=10)) == "too_many_readings"
    )
    payload = {
        "values": [{"id": f"m{i}", "v": i} for i in range(6)],
        "x": {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5},
    }
    assert (
        reason(KEPWARE_OPTIONS, payload, Limits(max_readings_per_message=10)) == "too_many_readings"
    )


def test_tag_fields() -> None:
    payload = {"t": 21.5, "location": "hall", "meta": {"room": 3, "on": True}}
    result = ok(
        {"tag_fields": ["location", "meta.room", "meta.on"]}, payload, tags={"source": "z2m"}
    )
    assert result.readings == [Reading("d1", "t", RECEIVED, 21.5)]
    assert not result.texts
    assert result.updates == (
        DeviceUpdate(
            "d1", {"source": "z2m", "location": "hall", "meta.room": "3", "meta.on": "true"}
        ),
    )


def test_tag_fields_without_other_tags() -> None:
    result = ok({"tag_fields": ["location"]}, {"t": 1, "location": "hall", "missing": None})
    assert result.updates == (DeviceUpdate("d1", {"location": "hall"}),)
    # A tag field that is not a scalar is skipped and counted.
    assert ok({"tag_fields": ["location"]}, {"t": 1, "location": [1]}).skipped == 1


@pytest.mark.parametrize("value", ["hall\x01", "a\nb", "\x00", "c1\x9f", "x" * 129])
def test_a_bad_tag_field_value_is_bad_sample(value: str) -> None:
    result = run({"tag_fields": ["location"]}, {"t": 1, "location": value})
    assert isinstance(result, DecodeError), result
    assert result.reason == "bad_sample"
    assert "location" in result.message


def test_an_empty_tag_field_value_is_a_tag() -> None:
    result = ok({"tag_fields": ["location"]}, {"t": 1, "location": ""})
    assert result.updates == (DeviceUpdate("d1", {"location": ""}),)


@pytest.mark.parametrize(
    ("value", "stored"),
    [("21.5", 21.5), ("-3", -3.0), ("1e2", 100.0), ("abc", "abc"), ("1,5", "1,5"), ("NaN", "NaN")],
)
def test_numeric_strings(value: str, stored: float | str) -> None:
    result = ok({"numeric_strings": True}, {"v": value})
    got = result.readings[0].value if result.readings else result.texts[0].value
    assert got == stored
    plain = ok({"tag_fields": []}, {"v": value})
    assert plain.texts == (TextReading("d1", "v", RECEIVED, value),)


def test_array_of_samples_with_options() -> None:
    payload = [{"time": 1704164400, "a": 1}, {"time": 1704164460, "a": 2}]
    result = ok({"ts": "time"}, payload)
    assert result.readings == [Reading("d1", "a", T1, 1.0), Reading("d1", "a", T2, 2.0)]
    assert reason({"ts": "time"}, [{"a": 1}, 3]) == "bad_sample"
    assert reason({"ts": "time"}, 3) == "not_object"
    assert reason({"ts": "time"}, []) == "no_readings"


def test_duplicate_metric_with_options() -> None:
    assert reason({"ts": "time"}, {"a.b": 1, "a": {"b": 2}}) == "duplicate_metric"


def test_deep_nesting_with_options_never_crashes() -> None:
    deep = b'{"k":' * 3000 + b"1" + b"}" * 3000
    assert reason({"ts": "time"}, deep) in ("bad_metric", "not_json")


# --- text readings on the default route ----------------------------------------------------

DEFAULT = parse_routes([{"topic": "devices/{device_id}/telemetry"}], FORMATS)


def default(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Decoded | DecodeError:
    return decode("devices/d1/telemetry", payload, RECEIVED, DEFAULT, limits=limits)


def test_strings_are_text_readings() -> None:
    result = default(b'{"t": 1, "state": "open", "env": {"mode": "eco"}}')
    assert isinstance(result, Decoded)
    assert result.texts == (
        TextReading("d1", "state", RECEIVED, "open"),
        TextReading("d1", "env.mode", RECEIVED, "eco"),
    )
    only_text = default(b'{"state": "open"}')
    assert isinstance(only_text, Decoded) and only_text.readings == [] and len(only_text.texts) == 1


def test_text_limit_in_utf8_bytes() -> None:
    limits = Limits(max_text_bytes=4)
    result = default('{"t": 1, "a": "abcd", "b": "abcde", "c": "éé", "d": "ééé"}'.encode(), limits)
    assert isinstance(result, Decoded)
    assert [t.metric for t in result.texts] == ["a", "c"]
    assert result.skipped == 2


def test_text_with_nul_is_skipped() -> None:
    result = default(b'{"t": 1, "a": "x\\u0000y"}')
    assert isinstance(result, Decoded) and result.texts == () and result.skipped == 1


def test_texts_count_toward_the_readings_limit() -> None:
    payload = orjson.dumps({f"s{i}": "x" for i in range(11)})
    result = default(payload, Limits(max_readings_per_message=10))
    assert isinstance(result, DecodeError) and result.reason == "too_many_readings"


def test_text_metric_names_follow_the_rules() -> None:
    result = default(b'{"t": 1, "a\\u0007": "x"}')
    assert isinstance(result, DecodeError) and result.reason == "bad_metric"


def test_texts_of_earlier_samples_survive_a_nested_one() -> None:
    # A nested sample restarts its own flattening: the samples before it keep their texts.
    result = default(b'[{"ts": 1704164400, "s": "a"}, {"ts": 1704164401, "n": {"v": 1}, "t": "b"}]')
    assert isinstance(result, Decoded)
    assert [(t.metric, t.value) for t in result.texts] == [("s", "a"), ("t", "b")]
    assert [(r.metric, r.value) for r in result.readings] == [("n.v", 1.0)]
