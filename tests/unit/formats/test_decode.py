"""The decode stage: payload contract (README "Payload format") and topic templates."""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from ingest.errors import ConfigError, DecodeError
from ingest.formats import json as decode_module
from ingest.formats.decode import REASONS, Limits, RouteTable, decode, single_route
from ingest.model import Decoded, Reading, TextReading, build

RECEIVED = datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
TEMPLATE = single_route("devices/{device_id}/telemetry")
METRIC_TEMPLATE = single_route("devices/{device_id}/{metric}")
TOPIC = "devices/dev-00001/telemetry"
TS = datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)  # 1700000000123 ms
# The whole calendar: the payload-form tests below are about reading times, not the window
# (tested apart with the default limits, under "limits").
OPEN = Limits(min_ts=datetime.min.replace(tzinfo=UTC), max_ts_ahead=timedelta.max)


def run(
    payload: bytes | str,
    topic: str = TOPIC,
    template: RouteTable = TEMPLATE,
    limits: Limits = OPEN,
) -> Any:
    raw = payload.encode() if isinstance(payload, str) else payload
    return decode(topic, raw, RECEIVED, template, limits=limits)


def ok(payload: bytes | str, topic: str = TOPIC, template: RouteTable = TEMPLATE) -> Decoded:
    result = run(payload, topic, template)
    assert isinstance(result, Decoded), result
    for reading in result.readings:
        assert type(reading) is Reading
        assert type(reading.value) is float
        assert reading.ts.tzinfo is UTC
    return result


def values(payload: bytes | str) -> dict[str, float]:
    return {r.metric: r.value for r in ok(payload).readings}


def one_ts(payload: bytes | str) -> datetime:
    (ts,) = {r.ts for r in ok(payload).readings}
    return ts


def reason(payload: bytes | str, topic: str = TOPIC, template: RouteTable = TEMPLATE) -> str:
    result = run(payload, topic, template)
    assert isinstance(result, DecodeError), result
    assert result.reason in REASONS
    assert result.message
    return result.reason


# --- the typical message -------------------------------------------------------------------


def test_typical_payload() -> None:
    payload = (
        b'{"ts": 1700000000123, "seq": 42, "temperature": 21.5, "humidity": 40.1,'
        b' "battery": 3.71, "rssi": -67, "fw": "1.2.3"}'
    )
    assert run(payload) == Decoded(
        [
            Reading("dev-00001", "seq", TS, 42.0),
            Reading("dev-00001", "temperature", TS, 21.5),
            Reading("dev-00001", "humidity", TS, 40.1),
            Reading("dev-00001", "battery", TS, 3.71),
            Reading("dev-00001", "rssi", TS, -67.0),
        ],
        0,
        (TextReading("dev-00001", "fw", TS, "1.2.3"),),
    )


def test_same_result_twice() -> None:
    # The names cache must not change the outcome of a second decode.
    payload = b'{"a": 1, "b": 2.5, "c": true}'
    assert (
        run(payload)
        == run(payload)
        == Decoded(
            [
                Reading("dev-00001", "a", RECEIVED, 1.0),
                Reading("dev-00001", "b", RECEIVED, 2.5),
                Reading("dev-00001", "c", RECEIVED, 1.0),
            ],
            0,
        )
    )


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ('{"on": true, "off": false}', {"on": 1.0, "off": 0.0}),
        (
            '{"i": 7, "neg": -3, "zero": 0, "f": 0.25}',
            {"i": 7.0, "neg": -3.0, "zero": 0.0, "f": 0.25},
        ),
        ('{"negzero": -0.0}', {"negzero": -0.0}),
        ('{"tiny": 1e-400}', {"tiny": 0.0}),  # underflow is finite: a reading
        ('{"big": 1.7e308}', {"big": 1.7e308}),
        ('{"i53": 9007199254740993}', {"i53": 9007199254740992.0}),  # beyond 2**53: rounded
        ('{"u64": 18446744073709551615}', {"u64": 18446744073709551616.0}),
        ('{"i65": 36893488147419103232}', {"i65": 36893488147419103232.0}),
        ('{"e": 12e3}', {"e": 12000.0}),
        ('{"a.b": 1}', {"a.b": 1.0}),
        ('{"unicode µ°": 1}', {"unicode µ°": 1.0}),
        ('{"' + "m" * 128 + '": 1}', {"m" * 128: 1.0}),
    ],
)
def test_numbers_and_booleans(payload: str, expected: dict[str, float]) -> None:
    assert values(payload) == expected


@pytest.mark.parametrize(
    ("payload", "n_readings", "skipped"),
    [
        ('{"a": 1, "s": [], "t": "text"}', 1, 1),  # a string is a text reading
        ('{"a": 1, "n": null}', 1, 1),
        ('{"a": 1, "l": [1, 2, 3]}', 1, 1),
        ('{"a": 1, "e": {}}', 1, 1),
        ('{"a": 1, "inf": 1e400}', 1, 1),
        ('{"a": 1, "ninf": -1e400}', 1, 1),
        ('{"a": 1, "huge": 1' + "0" * 400 + "}", 1, 1),
        ('{"a": 1, "huge": -1' + "0" * 5000 + "}", 1, 1),
        ('{"a": 1, "x": [1], "y": null, "z": [], "w": {"v": null}}', 1, 4),
        ('{"a": 1, "ts": null}', 1, 0),
        ('{"ts": 1700000000, "a": 1}', 1, 0),  # ts is neither a reading nor skipped
        ('{"ts": "2023-11-14T22:13:20Z", "a": 1}', 1, 0),
        ('[{"a": 1, "s": null}, {"b": 2, "t": null}]', 2, 2),
        ('{"env": {"t": 1, "s": [], "l": [], "n": null}}', 1, 3),
    ],
)
def test_skipped_fields(payload: str, n_readings: int, skipped: int) -> None:
    result = ok(payload)
    assert (len(result.readings), result.skipped) == (n_readings, skipped)


def test_orjson_rejects_out_of_range_numbers() -> None:
    # Why decode has a second parser: orjson refuses these, the contract skips them.
    for text in (b"1e400", b"1" + b"0" * 400):
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(text)


def test_duplicate_json_key_keeps_last() -> None:
    assert values('{"a": 1, "a": 2}') == {"a": 2.0}
    # Also on the second parser's path (taken because of 1e400).
    assert values('{"a": 1, "a": 2, "x": 1e400}') == {"a": 2.0}


# --- nested objects ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ('{"env": {"temp": 20}}', {"env.temp": 20.0}),
        (
            '{"a": 1, "env": {"temp": 20, "hum": 50.5}, "z": 3}',
            {"a": 1, "env.temp": 20, "env.hum": 50.5, "z": 3},
        ),
        ('{"a": {"b": {"c": {"d": true}}}}', {"a.b.c.d": 1.0}),
        ('{"a": {"ts": 5}}', {"a.ts": 5.0}),  # only the top-level ts is the time
        ('{"a": {"": 1}}', {"a.": 1.0}),
        ('{"": {"x": 1}}', {".x": 1.0}),
        ('{"a": {"b": 1}, "a.c": 2}', {"a.b": 1.0, "a.c": 2.0}),
    ],
)
def test_nested_flattening(payload: str, expected: dict[str, float]) -> None:
    assert values(payload) == expected


def test_nested_keeps_document_order_and_ts() -> None:
    result = ok('{"ts": 1700000000123, "a": 1, "b": {"c": 2, "d": {"e": 3}}, "f": 4}')
    assert [(r.metric, r.ts) for r in result.readings] == [
        ("a", TS),
        ("b.c", TS),
        ("b.d.e", TS),
        ("f", TS),
    ]


@pytest.mark.parametrize(
    "payload",
    [
        '{"a.b": 1, "a": {"b": 2}}',
        '{"a": {"b": 2}, "a.b": 1}',
        '{"a": {"b.c": 1, "b": {"c": 2}}}',
        '{"a.b": "text", "a": {"b": 2}}',  # a skipped field still owns its name
        '{"a.b": {}, "a": {"b": 2}}',
        '[{"x": 1}, {"a.b": 1, "a": {"b": 2}}]',
    ],
)
def test_duplicate_metric(payload: str) -> None:
    assert reason(payload) == "duplicate_metric"


def test_same_name_in_two_samples_is_fine() -> None:
    assert len(ok('[{"ts": 1, "a": {"b": 1}}, {"ts": 2, "a.b": 2}]').readings) == 2


def test_deep_nesting_never_crashes() -> None:
    assert len(ok('{"k":' * 64 + "1" + "}" * 64).readings[0].metric) == 127
    for depth in (65, 200, 1000, 1500, 5000):
        deep = '{"k":' * depth + "1" + "}" * depth
        result = run(deep)
        # Deep enough, the name is over 128 characters; deeper, the parsers refuse it.
        assert isinstance(result, DecodeError)
        assert result.reason in ("bad_metric", "not_json"), (depth, result)
    assert reason('{"a": 1, "ts": ' + "[" * 1000 + "]" * 1000 + "}") == "bad_ts"
    assert reason('{"a": 1, "ts": ' + '{"k":' * 1000 + "1" + "}" * 1001) == "bad_ts"
    skipped_only = '{"a": 1, "k":' + '{"k":' * 300 + "null" + "}" * 301
    assert ok(skipped_only).skipped == 1


# --- timestamps ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("1700000000", datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        ("1700000000.5", datetime(2023, 11, 14, 22, 13, 20, 500000, tzinfo=UTC)),
        ("1700000000.123", datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)),
        ("1700000000.1234567", datetime(2023, 11, 14, 22, 13, 20, 123457, tzinfo=UTC)),
        ("1700000000123", TS),
        ("1700000000123.0", TS),
        ("1700000000123.456", datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC)),
        ("0", datetime(1970, 1, 1, tzinfo=UTC)),
        ("-86400", datetime(1969, 12, 31, tzinfo=UTC)),
        ("-1.5", datetime(1969, 12, 31, 23, 59, 58, 500000, tzinfo=UTC)),
        ("100000000000", datetime(5138, 11, 16, 9, 46, 40, tzinfo=UTC)),  # 1e11: seconds
        ("100000000001", datetime(1973, 3, 3, 9, 46, 40, 1000, tzinfo=UTC)),  # above: ms
        ("-100000000001", datetime(1966, 10, 31, 14, 13, 19, 999000, tzinfo=UTC)),  # ms
        ("253402300799999", datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)),
        ("-62135596800", datetime(1, 1, 1, tzinfo=UTC)),
        ('"2023-11-14T22:13:20Z"', datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        ('"2023-11-14t22:13:20z"', datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        ('"2023-11-14 22:13:20Z"', datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        ('"2023-11-14T22:13:20"', datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        ('"2023-11-14T22:13:20.123Z"', TS),
        (
            '"2023-11-14T22:13:20.123456789Z"',
            datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC),
        ),
        ('"2023-11-14T23:13:20.123+01:00"', TS),
        ('"2023-11-14T17:13:20.123-05:00"', TS),
        ('"2023-11-14T22:13:20.123-00:00"', TS),
        ('"2023-11-14T22:13:20.123+00:00"', TS),
        ('"2023-11-15T03:43:20.123+0530"', TS),
        ('"1969-07-20T20:17:40Z"', datetime(1969, 7, 20, 20, 17, 40, tzinfo=UTC)),
    ],
)
def test_ts_forms(ts: str, expected: datetime) -> None:
    got = one_ts(f'{{"ts": {ts}, "a": 1}}')
    assert got == expected
    assert got.tzinfo is UTC


@pytest.mark.parametrize("payload", ['{"a": 1}', '{"ts": null, "a": 1}', '[{"a": 1}]'])
def test_ts_absent_or_null_is_received_at(payload: str) -> None:
    assert one_ts(payload) == RECEIVED


def test_ms_timestamps_round_trip_exactly() -> None:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    rng = random.Random(1)
    samples = [1700000000000 + i for i in range(2000)]
    samples += [rng.randrange(100_000_000_001, 253402300799999) for _ in range(3000)]
    samples += [2**33 * 1000 - 1, 2**33 * 1000, 2**33 * 1000 + 1]
    for ms in samples:
        assert one_ts(f'{{"ts": {ms}, "a": 1}}') == epoch + timedelta(milliseconds=ms), ms
        assert one_ts(f'{{"ts": {ms}.0, "a": 1}}') == epoch + timedelta(milliseconds=ms), ms


def test_every_sample_has_its_own_ts() -> None:
    result = ok('[{"ts": 1700000000123, "a": 1}, {"ts": 1700000000124, "a": 2}, {"a": 3}]')
    assert [(r.ts, r.value) for r in result.readings] == [
        (TS, 1.0),
        (TS + timedelta(milliseconds=1), 2.0),
        (RECEIVED, 3.0),
    ]


@pytest.mark.parametrize(
    "ts",
    [
        "true",
        "false",
        "[]",
        "[1700000000]",
        "{}",
        '{"s": 1}',
        '""',
        '"yesterday"',
        '"1700000000"',
        '"2023-11-14"',
        '"2023-11-14T22:13"',
        '"2023-11-14T22:13:60Z"',
        '"2023-11-14T24:00:00Z"',
        '"2023-02-30T00:00:00Z"',
        '"2023-11-14T22:13:20 "',
        '"2023-11-14X22:13:20Z"',
        '"2023-11-14T22:13:20+25:00"',
        '"0001-01-01T00:00:00+01:00"',
        '"9999-12-31T23:00:00-05:00"',
        "1e400",
        "-1e400",
        "1" + "0" * 400,
    ],
)
def test_bad_ts(ts: str) -> None:
    assert reason(f'{{"ts": {ts}, "a": 1}}') == "bad_ts"
    assert reason(f'[{{"a": 1}}, {{"ts": {ts}, "a": 1}}]') == "bad_ts"


@pytest.mark.parametrize(
    "ts",
    [
        "1e300",
        "-1e300",
        "-100000000000",  # seconds (not above 1e11), before year 1
        "-62135596801",
        "253402300800000",  # ms, year 10000
        "99999999999999999999",
    ],
)
def test_a_number_beyond_the_calendar_is_out_of_range(ts: str) -> None:
    # A time, just one no datetime holds: even the widest window cannot take it.
    assert reason(f'{{"ts": {ts}, "a": 1}}') == "ts_out_of_range"
    assert reason(f'[{{"a": 1}}, {{"ts": {ts}, "a": 1}}]') == "ts_out_of_range"


# --- arrays --------------------------------------------------------------------------------


def test_array_of_samples() -> None:
    payload = (
        b"["
        + b",".join(b'{"ts": %d, "seq": %d, "t": 1.5}' % (1700000000123 + i, i) for i in range(10))
        + b"]"
    )
    result = ok(payload)
    assert len(result.readings) == 20
    assert result.readings[2] == Reading("dev-00001", "seq", TS + timedelta(milliseconds=1), 1.0)


@pytest.mark.parametrize(
    "payload", ['[{"a": 1}, 2]', '[{"a": 1}, [{"a": 1}]]', "[null]", '["x"]', '[{"a": 1}, true]']
)
def test_bad_sample(payload: str) -> None:
    assert reason(payload) == "bad_sample"


def test_array_with_a_sample_without_readings_is_fine() -> None:
    assert ok('[{"a": 1}, {"ts": 1700000000}, {}]').skipped == 0


# --- malformed messages --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"\xff\xfe", "invalid_utf8"),
        (b'{"a": 1, "s": "caf\xe9"}', "invalid_utf8"),
        (b'{"a": 1, "s": "\xed\xa0\x80"}', "invalid_utf8"),  # an encoded surrogate
        (b"", "not_json"),
        (b"   ", "not_json"),
        (b"{", "not_json"),
        (b'{"a": 1,}', "not_json"),
        (b"{'a': 1}", "not_json"),
        (b'{"a": NaN}', "not_json"),
        (b'{"a": Infinity}', "not_json"),
        (b'{"a": -Infinity, "b": 1e400}', "not_json"),
        (b'{"a": 1} {"b": 2}', "not_json"),
        (b'{"a": 1, "s": "tab\there"}', "not_json"),
        (b'\xef\xbb\xbf{"a": 1}', "not_json"),  # byte order mark
        (b'{"\\ud800": 1}', "not_json"),  # lone surrogate in a key
        (b'{"\\ud800": 1, "x": 1e400}', "not_json"),
        (b"[" * 100_000, "not_json"),
        (b"1", "not_object"),
        (b"1.5", "not_object"),
        (b"1e400", "not_object"),
        (b"true", "not_object"),
        (b"null", "not_object"),
        (b'"text"', "not_object"),
        (b"[]", "no_readings"),
        (b"{}", "no_readings"),
        (b'{"ts": 1700000000}', "no_readings"),
        (b'{"s": [], "n": null, "l": [1]}', "no_readings"),
        (b'{"inf": 1e400}', "no_readings"),
        (b'{"e": {}}', "no_readings"),
        (b"[{}, {}]", "no_readings"),
        (b'{"": 1}', "bad_metric"),
        (b'{"a\\u0000b": 1}', "bad_metric"),
        (b'{"' + b"m" * 129 + b'": 1}', "bad_metric"),
        (b'{"a": {"": 1}, "": {"b": 2}, "x": {"' + b"m" * 127 + b'": 1}}', "bad_metric"),
        (b'{"env": {"a\\u0000": 1}}', "bad_metric"),
        (b'[{"a": 1}, {"": 1}]', "bad_metric"),
    ],
)
def test_malformed(payload: bytes, expected: str) -> None:
    assert reason(payload) == expected


def test_lone_surrogate_in_a_string_value_is_skipped() -> None:
    # orjson refuses it, the second parser takes it: a string is never stored anyway.
    assert ok(b'{"a": 1, "x": "\\udc00"}').skipped == 1
    assert ok(b'{"a": 1, "x": "\\ud800", "y": 1e400}').skipped == 2
    assert reason(b'{"ts": "2023-11-14T22:13:20\\ud800", "a": 1}') == "bad_ts"


@pytest.mark.parametrize("name", ["", "\x00", "a\x00b", "m" * 129, "é" * 129])
def test_bad_metric_name_never_cached(name: str) -> None:
    payload = orjson.dumps({name: 1})
    assert reason(payload) == "bad_metric"
    assert reason(payload) == "bad_metric"
    assert reason(orjson.dumps({"ok": 1, "n": {"": 2}, name: 3})) == "bad_metric"


def test_name_cache_is_bounded_and_owned_by_the_template() -> None:
    template = single_route("devices/{device_id}/telemetry")
    for i in range(decode_module._GOOD_NAMES_MAX + 10):
        ok(f'{{"m{i}": 1}}', template=template)
    assert 0 < len(template.routes[0].checked_names) <= decode_module._GOOD_NAMES_MAX
    assert "m0" not in single_route("devices/{device_id}/telemetry").routes[0].checked_names


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("devices/dev-1/other", "bad_topic"),
        ("devices/dev-1", "bad_topic"),
        ("devices/a/b/telemetry", "bad_topic"),
        ("", "bad_topic"),
        ("devices//telemetry", "bad_device_id"),
        ("devices/a\x00b/telemetry", "bad_device_id"),
        (f"devices/{'d' * 129}/telemetry", "bad_device_id"),
    ],
)
def test_bad_topic_and_device_id(topic: str, expected: str) -> None:
    assert reason(b'{"a": 1}', topic=topic) == expected


def test_device_id_limits() -> None:
    assert (
        ok(b'{"a": 1}', topic=f"devices/{'d' * 128}/telemetry").readings[0].device_id == "d" * 128
    )
    assert ok(b'{"a": 1}', topic="devices/é/telemetry").readings[0].device_id == "é"


def test_topic_is_checked_before_the_payload() -> None:
    assert reason(b"\xff", topic="nope") == "bad_topic"
    assert reason(b"\xff", topic="devices//telemetry") == "bad_device_id"


def test_messages_are_whole_or_nothing() -> None:
    # Good readings in the same message do not survive a bad part.
    assert reason('[{"a": 1}, {"ts": true, "b": 2}]') == "bad_ts"
    assert reason('{"a": 1, "b": 2, "": 3}') == "bad_metric"
    assert reason('{"a": 1, "b": {"c": 1}, "b.c": 2}') == "duplicate_metric"


def test_error_messages_are_short_and_name_the_sample() -> None:
    result = run('[{"a": 1}, {"ts": "' + "x" * 1000 + '", "a": 1}]')
    assert isinstance(result, DecodeError)
    assert result.message.startswith("sample 1: ts ")
    assert len(result.message) < 200


def test_internal_error_never_escapes(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(TEMPLATE.routes[0], "decode", boom)
    result = run(b'{"a": 1}')
    assert isinstance(result, DecodeError)
    assert result.reason == "internal"
    assert "RuntimeError" in result.message


def test_random_garbage_never_raises() -> None:
    rng = random.Random(42)
    seeds = [
        b'{"ts": 1700000000123, "a": 1, "b": {"c": [1, "x"]}, "d": true, "e": null}',
        b'[{"ts": "2023-11-14T22:13:20Z", "a": 1.5}, {"b": -2}]',
        b'{"a": 1e400, "b": 123456789012345678901234567890}',
    ]
    alphabet = b'{}[]":,.-+eE0123456789 tsabnulrfx\\\x00\xff'
    for _ in range(5000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data) + 1)
            data[i:i] = bytes([rng.choice(alphabet)])
            if data and rng.random() < 0.5:
                del data[rng.randrange(len(data))]
        for template in (TEMPLATE, METRIC_TEMPLATE):
            topic = "devices/d/telemetry"
            result = decode(topic, bytes(data), RECEIVED, template)
            if isinstance(result, DecodeError):
                assert result.reason in REASONS and result.reason != "internal", result
            else:
                assert result.readings
                assert all(r.ts.tzinfo is UTC and type(r.value) is float for r in result.readings)


# --- {metric} in the template --------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected", "skipped"),
    [
        ("21.5", [("temp", RECEIVED, 21.5)], 0),
        ("-3", [("temp", RECEIVED, -3.0)], 0),
        ("true", [("temp", RECEIVED, 1.0)], 0),
        ("false", [("temp", RECEIVED, 0.0)], 0),
        ('{"value": 7}', [("temp", RECEIVED, 7.0)], 0),
        ('{"ts": 1700000000123, "value": 7}', [("temp", TS, 7.0)], 0),
        ('{"ts": null, "value": 7}', [("temp", RECEIVED, 7.0)], 0),
        ('{"ts": "2023-11-14T22:13:20.123Z", "value": false}', [("temp", TS, 0.0)], 0),
        ('{"value": 7, "unit": "C", "other": 5}', [("temp", RECEIVED, 7.0)], 2),
        (
            '[{"ts": 1700000000123, "value": 1}, {"ts": 1700000000124, "value": 2}]',
            [("temp", TS, 1.0), ("temp", TS + timedelta(milliseconds=1), 2.0)],
            0,
        ),
        ('[{"value": 1}, {"value": "x"}, {"ts": 1}]', [("temp", RECEIVED, 1.0)], 1),
    ],
)
def test_metric_template(
    payload: str, expected: list[tuple[str, datetime, float]], skipped: int
) -> None:
    result = ok(payload, topic="devices/dev-7/temp", template=METRIC_TEMPLATE)
    assert [(r.metric, r.ts, r.value) for r in result.readings] == expected
    assert all(r.device_id == "dev-7" for r in result.readings)
    assert result.skipped == skipped


@pytest.mark.parametrize(
    ("payload", "topic", "expected"),
    [
        ("1", "devices/dev-7/", "bad_metric"),
        ("1", "devices/dev-7/a\x00", "bad_metric"),
        ("1", f"devices/dev-7/{'m' * 129}", "bad_metric"),
        ("1", "devices//temp", "bad_device_id"),
        ("1", "devices/dev-7", "bad_topic"),
        ('"\\u0000"', "devices/dev-7/temp", "no_readings"),
        ("null", "devices/dev-7/temp", "no_readings"),
        ("1e400", "devices/dev-7/temp", "no_readings"),
        ("{}", "devices/dev-7/temp", "no_readings"),
        ('{"ts": 1700000000}', "devices/dev-7/temp", "no_readings"),
        ('{"value": null}', "devices/dev-7/temp", "no_readings"),
        ('{"value": {"a": 1}}', "devices/dev-7/temp", "no_readings"),
        ("[]", "devices/dev-7/temp", "no_readings"),
        ("[1, 2]", "devices/dev-7/temp", "bad_sample"),
        ('{"ts": true, "value": 1}', "devices/dev-7/temp", "bad_ts"),
        ('[{"value": 1}, {"ts": "x", "value": 1}]', "devices/dev-7/temp", "bad_ts"),
        ("NaN", "devices/dev-7/temp", "not_json"),
        (b"\xff", "devices/dev-7/temp", "invalid_utf8"),
    ],
)
def test_metric_template_malformed(payload: str | bytes, topic: str, expected: str) -> None:
    assert reason(payload, topic=topic, template=METRIC_TEMPLATE) == expected


@pytest.mark.parametrize("text", ["21.5", "ON", "", "é" * 512])
def test_metric_template_bare_string_is_a_text_reading(text: str) -> None:
    result = ok(orjson.dumps(text), topic="devices/dev-7/state", template=METRIC_TEMPLATE)
    assert result.texts == (TextReading("dev-7", "state", RECEIVED, text),)
    assert result.readings == [] and result.skipped == 0


def test_metric_template_bare_string_over_the_text_limit_is_skipped() -> None:
    long = orjson.dumps("é" * 513)  # 1026 bytes of UTF-8, over the 1024 default
    assert reason(long, topic="devices/dev-7/state", template=METRIC_TEMPLATE) == "no_readings"
    limits = Limits(max_text_bytes=2048)
    result = run(long, "devices/dev-7/state", METRIC_TEMPLATE, limits)
    assert isinstance(result, Decoded) and len(result.texts) == 1


def test_received_at_passes_through_unchanged() -> None:
    other = datetime(2020, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    result = decode(TOPIC, b'{"a": 1}', other, TEMPLATE)
    assert isinstance(result, Decoded)
    assert result.readings[0].ts is other


# --- limits (docs/design.md, Limits) -------------------------------------------------------

LIMITS = Limits()  # the settings' defaults: 10,000 readings, 1 day ahead, from 2000-01-01


def limited(payload: bytes | str, template: RouteTable = TEMPLATE, topic: str = TOPIC) -> Any:
    return run(payload, topic, template, LIMITS)


def test_default_limits_are_the_settings_defaults() -> None:
    from ingest.settings import Settings

    assert Limits.from_settings(Settings()) == LIMITS
    result = decode(TOPIC, b'{"ts": 1, "a": 1}', RECEIVED, TEMPLATE)
    assert isinstance(result, DecodeError) and result.reason == "ts_out_of_range"


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"max_readings_per_message": 0}, "INGEST_MAX_READINGS_PER_MESSAGE"),
        ({"max_ts_ahead": timedelta(seconds=-1)}, "INGEST_MAX_TS_AHEAD"),
        ({"min_ts": datetime(2000, 1, 1)}, "INGEST_MIN_TS"),
        ({"max_text_bytes": 0}, "INGEST_MAX_TEXT_BYTES"),
    ],
)
def test_limits_are_checked(kwargs: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigError, match=setting):
        Limits(**kwargs)


def _ms(dt: datetime) -> int:
    return (dt - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


@pytest.mark.parametrize(
    "ts",
    [
        str(_ms(RECEIVED + timedelta(days=1))),  # the window's edges are inside
        str(_ms(datetime(2000, 1, 1, tzinfo=UTC))),
        str(round(datetime(2000, 1, 1, tzinfo=UTC).timestamp())),
        '"2000-01-01T00:00:00Z"',
        f'"{(RECEIVED + timedelta(hours=23)).isoformat()}"',
        str(_ms(RECEIVED)),
    ],
)
def test_inside_the_window(ts: str) -> None:
    result = limited(f'{{"ts": {ts}, "a": 1}}')
    assert isinstance(result, Decoded), result


@pytest.mark.parametrize(
    "ts",
    [
        "253402300800",  # 9999-12-31 in seconds: 1978 in milliseconds, never a plausible date
        "253402300799",
        "253402300800000",  # year 10000 in milliseconds
        '"9999-12-31T23:59:59Z"',
        str(_ms(RECEIVED + timedelta(days=1)) + 1),
        str(round((RECEIVED + timedelta(days=2)).timestamp())),
        str(_ms(datetime(2000, 1, 1, tzinfo=UTC)) - 1),
        "946684799",  # 1999-12-31T23:59:59 in seconds
        '"1999-12-31T23:59:59Z"',
        "0",
        "-1",
        "100000000001",  # just above 1e11: 1973 in milliseconds
        "1e300",
    ],
)
def test_outside_the_window(ts: str) -> None:
    assert limited(f'{{"ts": {ts}, "a": 1}}').reason == "ts_out_of_range"
    assert limited(f'[{{"a": 1}}, {{"ts": {ts}, "a": 1}}]').reason == "ts_out_of_range"
    assert limited(f'{{"ts": {ts}, "a": {{"b": 1}}}}').reason == "ts_out_of_range"
    result = limited(f'{{"ts": {ts}, "value": 1}}', METRIC_TEMPLATE, "devices/d/temp")
    assert result.reason == "ts_out_of_range"


def test_999999999999_is_ms_when_min_ts_allows_it() -> None:
    # The one ambiguous band (1e11..1e12): milliseconds, and only within the window.
    limits = Limits(min_ts=datetime(2001, 1, 1, tzinfo=UTC))
    result = decode(TOPIC, b'{"ts": 999999999999, "a": 1}', RECEIVED, TEMPLATE, limits=limits)
    assert isinstance(result, Decoded)
    assert result.readings[0].ts == datetime(2001, 9, 9, 1, 46, 39, 999000, tzinfo=UTC)


def test_window_follows_the_arrival_not_the_clock() -> None:
    # A replay decodes with the dead letter's received_at: the same verdict as on arrival.
    old = datetime(2010, 5, 1, tzinfo=UTC)
    payload = b'{"ts": "2010-05-01T20:00:00Z", "a": 1}'
    assert isinstance(decode(TOPIC, payload, old, TEMPLATE, limits=LIMITS), Decoded)
    later = decode(TOPIC, payload, old - timedelta(days=2), TEMPLATE, limits=LIMITS)
    assert isinstance(later, DecodeError) and later.reason == "ts_out_of_range"
    wider = Limits(max_ts_ahead=timedelta(days=3))
    assert isinstance(
        decode(TOPIC, payload, old - timedelta(days=2), TEMPLATE, limits=wider), Decoded
    )


def test_window_at_the_end_of_the_calendar_does_not_overflow() -> None:
    late = datetime(9999, 12, 31, 12, tzinfo=UTC)
    result = decode(TOPIC, b'{"a": 1}', late, TEMPLATE, limits=LIMITS)
    assert isinstance(result, Decoded)


def test_absent_ts_is_never_out_of_range() -> None:
    assert isinstance(limited('{"a": 1}'), Decoded)


def test_out_of_range_message_names_the_bound() -> None:
    result = limited('{"ts": "2100-01-01T00:00:00Z", "a": 1}')
    assert isinstance(result, DecodeError)
    assert (
        "2100-01-01T00:00:00" in result.message
        and "after 2024-01-03T03:04:05.678901" in result.message
    )
    result = limited('{"ts": "1999-01-01T00:00:00Z", "a": 1}')
    assert isinstance(result, DecodeError) and "before INGEST_MIN_TS 2000-01-01" in result.message


def _fields(n: int, *, extra: str = "") -> bytes:
    return ("{" + extra + ",".join(f'"m{i}": {i}' for i in range(n)) + "}").encode()


def test_readings_up_to_the_limit() -> None:
    limits = Limits(max_readings_per_message=10)
    ok_ = decode(
        TOPIC, _fields(10, extra='"ts": 1700000000, "s": null, '), RECEIVED, TEMPLATE, limits=limits
    )
    assert isinstance(ok_, Decoded) and len(ok_.readings) == 10 and ok_.skipped == 1
    assert len(limited(_fields(10_000)).readings) == 10_000


@pytest.mark.parametrize(
    "payload",
    [
        _fields(10_001),
        _fields(10_001, extra='"ts": 1700000000, '),
        b"[" + b",".join([_fields(5_000), _fields(5_001)]) + b"]",
        b"[" + b",".join([b'{"a": 1}'] * 10_001) + b"]",  # more samples than readings allowed
        b'{"x": {' + b",".join(b'"m%d": %d' % (i, i) for i in range(10_001)) + b"}}",
        b'{"x": 1, "y": {' + b",".join(b'"m%d": true' % i for i in range(10_000)) + b"}}",
    ],
)
def test_too_many_readings(payload: bytes) -> None:
    result = limited(payload)
    assert isinstance(result, DecodeError), result
    assert result.reason == "too_many_readings", result
    assert "10000" in result.message


def test_too_many_readings_in_metric_template() -> None:
    payload = b"[" + b",".join([b'{"value": 1}'] * 10_001) + b"]"
    assert limited(payload, METRIC_TEMPLATE, "devices/d/temp").reason == "too_many_readings"
    payload = b"[" + b",".join([b'{"value": 1}'] * 10_000) + b"]"
    assert len(limited(payload, METRIC_TEMPLATE, "devices/d/temp").readings) == 10_000


def test_too_many_readings_builds_none(monkeypatch: pytest.MonkeyPatch) -> None:
    # Refused before the readings are built: count what the decoder makes.
    built = 0
    real = build

    def counting(cls: Any, values: Any) -> Any:
        nonlocal built
        if cls is Reading:
            built += 1
        return real(cls, values)

    monkeypatch.setattr(decode_module, "build", counting)
    assert limited(_fields(100_000)).reason == "too_many_readings"
    assert built == 0
    nested = b'{"x": {' + b",".join(b'"m%d": %d' % (i, i) for i in range(100_000)) + b"}}"
    assert limited(nested).reason == "too_many_readings"
    assert built <= 10_000


def test_many_skipped_fields_are_not_readings() -> None:
    payload = b'{"a": 1, ' + b",".join(b'"s%d": null' % i for i in range(20_000)) + b"}"
    result = limited(payload)
    assert isinstance(result, Decoded) and len(result.readings) == 1
    assert result.skipped == 20_000


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
CONTROLS = ["\x00", "\x07", "\x1b[2J", "\t", "\n", "\x1f", "\x7f", "\x80", "\x9b", "\x9f"]


@pytest.mark.parametrize("control", CONTROLS)
def test_control_characters_in_a_metric_name(control: str) -> None:
    name = f"temp{control}x"
    for payload in (
        orjson.dumps({name: 1}),
        orjson.dumps({"ok": 1, name: 2}),
        orjson.dumps({"env": {name: 1}}),
        orjson.dumps([{"ok": 1}, {name: True}]),
    ):
        result = limited(payload)
        assert isinstance(result, DecodeError), payload
        assert result.reason == "bad_metric"
        assert f"U+{ord(control[0]):04X}" in result.message
        assert not _CONTROL.search(result.message)  # shown escaped, never raw
    result = limited(b"1", METRIC_TEMPLATE, f"devices/d/{name}")
    assert result.reason == "bad_metric"


@pytest.mark.parametrize("control", CONTROLS)
def test_control_characters_in_a_device_id(control: str) -> None:
    result = limited(b'{"a": 1}', topic=f"devices/d{control}1/telemetry")
    assert isinstance(result, DecodeError)
    assert result.reason == "bad_device_id"
    assert not _CONTROL.search(result.message)


@pytest.mark.parametrize(
    "name", ["temp é", "température", "温度", "a\u00a0b", "a\u2028b", "x" * 128]
)
def test_printable_and_other_unicode_names_are_fine(name: str) -> None:
    assert values(orjson.dumps({name: 1})) == {name: 1.0}
    assert isinstance(limited(b'{"a": 1}', topic=f"devices/{name}/telemetry"), Decoded)


def test_extreme_values_are_readings() -> None:
    got = values(
        b'{"a": 1.7976931348623157e308, "b": -1.7976931348623157e308, "c": 1e308,'
        b' "d": -1e308, "e": 5e-324}'
    )
    assert got == {
        "a": 1.7976931348623157e308,
        "b": -1.7976931348623157e308,
        "c": 1e308,
        "d": -1e308,
        "e": 5e-324,
    }


def test_new_reasons_are_listed() -> None:
    for name in ("too_large", "too_many_readings", "ts_out_of_range"):
        assert name in REASONS
