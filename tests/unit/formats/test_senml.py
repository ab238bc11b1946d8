"""The ``senml`` format (RFC 8428): packs in JSON and CBOR, base fields, times, units, reasons.

Payloads are typed by hand (JSON) or built with ``cbor2.dumps`` from maps keyed by the RFC's
integer labels, never by the simulator's pack builder.
"""

from __future__ import annotations

import random
import re
import time
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
import pytest

from ingest.errors import ConfigError, DecodeError
from ingest.formats.decode import FORMATS, REASONS, Limits, decode
from ingest.formats.routes import RouteTable, parse_routes
from ingest.model import Decoded, DeviceUpdate, Reading, TextReading

RECEIVED = datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
#: Device named by the topic; device named by the pack's base name; a template with {metric}.
ROUTES = parse_routes(
    [
        {"topic": "senml/{device_id}", "format": "senml"},
        {"topic": "site/{site}/senml/#", "format": "senml", "tags": {"source": "gw"}},
        {"topic": "packs/#", "format": "senml"},
        {"topic": "metric/{device_id}/{metric}", "format": "senml"},
    ],
    FORMATS,
)
BY_TOPIC = "senml/d1"
BY_PACK = "packs/any/level"
OPEN = Limits(min_ts=datetime.min.replace(tzinfo=UTC), max_ts_ahead=timedelta.max)

# RFC 8428 section 6, Table 4.
BVER, BN, BT, BU, BV, BS = -1, -2, -3, -4, -5, -6
N, U, V, VS, VB, S, T, UT, VD = 0, 1, 2, 3, 4, 5, 6, 7, 8


def run(
    payload: bytes | str,
    topic: str = BY_TOPIC,
    limits: Limits = OPEN,
    routes: RouteTable = ROUTES,
) -> Decoded | DecodeError:
    raw = payload.encode() if isinstance(payload, str) else payload
    return decode(topic, raw, RECEIVED, routes, limits=limits)


def ok(payload: bytes | str, topic: str = BY_TOPIC, limits: Limits = OPEN) -> Decoded:
    result = run(payload, topic, limits)
    assert isinstance(result, Decoded), result
    for reading in result.readings:
        assert type(reading) is Reading and type(reading.value) is float
        assert reading.ts.tzinfo is UTC
    return result


def error(payload: bytes | str, topic: str = BY_TOPIC, limits: Limits = OPEN) -> DecodeError:
    result = run(payload, topic, limits)
    assert isinstance(result, DecodeError), result
    assert result.reason in REASONS and result.message
    return result


def reason(payload: bytes | str, topic: str = BY_TOPIC, limits: Limits = OPEN) -> str:
    return error(payload, topic, limits).reason


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


# --- RFC 8428's own examples (section 5.1) --------------------------------------------------


def test_rfc_single_datapoint_on_a_route_naming_the_device() -> None:
    result = ok('[{"n":"urn:dev:ow:10e2073a01080063","u":"Cel","v":23.1}]')
    assert result == Decoded(
        [Reading("d1", "urn:dev:ow:10e2073a01080063", RECEIVED, 23.1)],
        0,
        (),
        (DeviceUpdate("d1", units={"urn:dev:ow:10e2073a01080063": "Cel"}),),
    )


def test_rfc_single_datapoint_without_a_device_anywhere_is_bad_device_id() -> None:
    result = error('[{"n":"urn:dev:ow:10e2073a01080063","u":"Cel","v":23.1}]', BY_PACK)
    assert result.reason == "bad_device_id"
    assert "no bn" in result.message and "{device_id}" in result.message


def test_rfc_multiple_datapoints_base_name_names_the_device() -> None:
    payload = """[
        {"bn":"urn:dev:ow:10e2073a01080063:","n":"voltage","u":"V","v":120.1},
        {"n":"current","u":"A","v":1.2}
    ]"""
    device = "urn:dev:ow:10e2073a01080063"
    assert ok(payload, BY_PACK) == Decoded(
        [
            Reading(device, "voltage", RECEIVED, 120.1),
            Reading(device, "current", RECEIVED, 1.2),
        ],
        0,
        (),
        (DeviceUpdate(device, units={"voltage": "V", "current": "A"}),),
    )
    # The topic's device id wins over the base name; the metric is still the record's n.
    assert {(r.device_id, r.metric) for r in ok(payload).readings} == {
        ("d1", "voltage"),
        ("d1", "current"),
    }


def test_rfc_multiple_datapoints_relative_to_base_time_with_base_unit() -> None:
    payload = """[
        {"bn":"urn:dev:ow:10e2073a0108006:","bt":1.276020076001e+09,
         "bu":"A","bver":5,
         "n":"voltage","u":"V","v":120.1},
        {"n":"current","t":-5,"v":1.2},
        {"n":"current","t":-4,"v":1.3},
        {"n":"current","t":-3,"v":1.4},
        {"n":"current","t":-2,"v":1.5},
        {"n":"current","t":-1,"v":1.6},
        {"n":"current","v":1.7}
    ]"""
    result = ok(payload, BY_PACK)
    base = datetime(2010, 6, 8, 18, 1, 16, 1000, tzinfo=UTC)
    device = "urn:dev:ow:10e2073a0108006"
    assert result.readings == [
        Reading(device, "voltage", base, 120.1),
        *(
            Reading(device, "current", base - timedelta(seconds=s), v)
            for s, v in ((5, 1.2), (4, 1.3), (3, 1.4), (2, 1.5), (1, 1.6), (0, 1.7))
        ),
    ]
    assert result.updates == (DeviceUpdate(device, units={"voltage": "V", "current": "A"}),)


def test_rfc_sensor_named_by_its_base_name_alone() -> None:
    payload = """[
        {"bn":"urn:dev:ow:10e2073a01080063","bt":1.320067464e+09,
         "bu":"%RH","v":21.2},
        {"t":10,"v":21.3},
        {"t":20,"v":21.4}
    ]"""
    name = "urn:dev:ow:10e2073a01080063"
    expected = [
        Reading(name, name, at(1.320067464e09 + s), v)
        for s, v in ((0, 21.2), (10, 21.3), (20, 21.4))
    ]
    result = ok(payload, BY_PACK)
    assert result.readings == expected
    assert result.updates == (DeviceUpdate(name, units={name: "%RH"}),)
    assert [r.metric for r in ok(payload).readings] == [name] * 3


def test_rfc_multiple_data_types() -> None:
    payload = """[
        {"bn":"urn:dev:ow:10e2073a01080063:","n":"temp","u":"Cel","v":23.1},
        {"n":"label","vs":"Machine Room"},
        {"n":"open","vb":false},
        {"n":"nfc-reader","vd":"aGkgCg"}
    ]"""
    device = "urn:dev:ow:10e2073a01080063"
    assert ok(payload, BY_PACK) == Decoded(
        [Reading(device, "temp", RECEIVED, 23.1), Reading(device, "open", RECEIVED, 0.0)],
        1,  # the vd
        (TextReading(device, "label", RECEIVED, "Machine Room"),),
        (DeviceUpdate(device, units={"temp": "Cel"}),),
    )


@pytest.mark.parametrize(
    "payload",
    [
        # Section 5.1.4: one name, told apart only by units, at one time.
        """[
            {"bn":"urn:dev:ow:10e2073a01080063","bt":1.320067464e+09,"bu":"%RH","v":20},
            {"u":"lon","v":24.30621},
            {"u":"lat","v":60.07965}
        ]""",
        # Section 5.1.5: the same, resolved.
        """[
            {"n":"urn:dev:ow:10e2073a01080063","u":"%RH","t":1.320067464e+09,"v":20},
            {"n":"urn:dev:ow:10e2073a01080063","u":"lon","t":1.320067464e+09,"v":24.30621}
        ]""",
    ],
)
def test_rfc_measurements_told_apart_by_unit_are_duplicate_metrics(payload: str) -> None:
    # A series is (device, metric): its unit is not part of the key, so one name at one time
    # holds one value.
    result = error(payload)
    assert result.reason == "duplicate_metric"
    assert "record 1" in result.message and "twice" in result.message


# --- devices, names, tags -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("bn", "device"),
    [("gw-7:", "gw-7"), ("gw-7/", "gw-7"), ("gw-7", "gw-7"), ("a/b/", "a/b"), ("x::", "x:")],
)
def test_base_name_without_one_trailing_separator_is_the_device(bn: str, device: str) -> None:
    result = ok(f'[{{"bn":"{bn}","n":"t","v":1}}]', BY_PACK)
    assert result.readings == [Reading(device, "t", RECEIVED, 1.0)]


def test_base_name_changing_mid_pack_names_the_next_devices() -> None:
    payload = """[
        {"bn":"2001:db8::2/","n":"temperature","u":"Cel","v":25.2},
        {"n":"humidity","u":"%RH","v":30},
        {"bn":"2001:db8::1/","n":"temperature","u":"Cel","v":12.3},
        {"n":"humidity","u":"%RH","v":67}
    ]"""
    result = ok(payload, "site/north/senml/gw")
    assert [(r.device_id, r.metric, r.value) for r in result.readings] == [
        ("2001:db8::2", "temperature", 25.2),
        ("2001:db8::2", "humidity", 30.0),
        ("2001:db8::1", "temperature", 12.3),
        ("2001:db8::1", "humidity", 67.0),
    ]
    tags = {"source": "gw", "site": "north"}
    units = {"temperature": "Cel", "humidity": "%RH"}
    assert result.updates == (
        DeviceUpdate("2001:db8::2", tags, units=units),
        DeviceUpdate("2001:db8::1", tags, units=units),
    )


def test_on_a_route_naming_the_device_every_base_name_is_that_device() -> None:
    payload = '[{"bn":"a/","n":"t","v":1},{"bn":"b/","n":"t","v":2}]'
    assert len(ok(payload, BY_PACK).readings) == 2
    result = error(payload)
    assert result.reason == "duplicate_metric" and "'t' of 'd1'" in result.message


def test_route_tags_without_units_still_reach_the_device() -> None:
    result = ok('[{"bn":"gw:","n":"t","v":1}]', "site/south/senml/x")
    assert result.updates == (DeviceUpdate("gw", {"source": "gw", "site": "south"}),)


def test_no_units_and_no_tags_send_no_device_update() -> None:
    assert ok('[{"n":"t","v":1}]').updates == ()


@pytest.mark.parametrize(
    ("bn", "words"), [("dev\x01:", "control character"), ("d" * 129, "over 128")]
)
def test_a_bad_device_id_from_the_base_name(bn: str, words: str) -> None:
    payload = '[{"bn":"' + bn.replace("\x01", "\\u0001") + '","n":"t","v":1}]'
    result = error(payload, BY_PACK)
    assert result.reason == "bad_device_id" and words in result.message
    # On a route naming the device the base name only prefixes names: no device id from it.
    assert isinstance(run(payload), Decoded)


def test_an_empty_base_name_leaves_the_records_after_it_without_a_device() -> None:
    payload = '[{"bn":"gw:","n":"a","v":1},{"bn":":","n":"b","v":2}]'
    result = error(payload, BY_PACK)
    assert result.reason == "bad_device_id" and "record 1" in result.message


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        ('[{"v":1}]', "neither n nor bn"),
        ('[{"n":"","v":1}]', "neither n nor bn"),
        ('[{"n":"a\\u0000b","v":1}]', "control character"),
        ('[{"n":"' + "m" * 129 + '","v":1}]', "over 128"),
    ],
)
def test_bad_metric(payload: str, words: str) -> None:
    result = error(payload)
    assert result.reason == "bad_metric" and words in result.message


def test_a_metric_template_level_is_bad_topic() -> None:
    assert reason('[{"n":"t","v":1}]', "metric/d1/temp") == "bad_topic"


def test_senml_routes_take_wildcards_and_no_options() -> None:
    assert [f for f, _ in ROUTES.subscriptions()][2] == "packs/#"
    with pytest.raises(ConfigError, match="has no option 'x'"):
        parse_routes([{"topic": "s/#", "format": "senml", "senml": {"x": 1}}], FORMATS)


# --- values ---------------------------------------------------------------------------------


def test_base_value_is_added_to_v_only() -> None:
    payload = """[
        {"bn":"d:","bv":100,"n":"a","v":1.5},
        {"n":"b","vb":true},
        {"n":"c","vs":"x"},
        {"bv":0,"n":"d","v":1.5}
    ]"""
    result = ok(payload, BY_PACK)
    assert [(r.metric, r.value) for r in result.readings] == [("a", 101.5), ("b", 1.0), ("d", 1.5)]
    assert result.texts == (TextReading("d", "c", RECEIVED, "x"),)


def test_units_base_unit_default_and_record_unit_override() -> None:
    payload = """[
        {"bn":"d:","bu":"Cel","n":"a","v":1},
        {"n":"b","u":"%RH","v":2},
        {"n":"c","v":3},
        {"bu":"","n":"e","v":4},
        {"n":"f","u":"","v":5}
    ]"""
    result = ok(payload, BY_PACK)
    assert result.updates == (DeviceUpdate("d", units={"a": "Cel", "b": "%RH", "c": "Cel"}),)


@pytest.mark.parametrize(
    ("payload", "skipped"),
    [
        ('[{"n":"a","v":1,"s":30}]', 1),  # a sum beside the value
        ('[{"n":"a","v":1},{"n":"b","s":30}]', 1),  # a record with only a sum
        ('[{"n":"a","v":1,"ut":60}]', 1),  # update time
        ('[{"bs":5,"n":"a","v":1}]', 0),  # a base sum alone is nothing stored
        ('[{"n":"a","v":1,"vendor":{"x":1},"q":2}]', 2),  # fields of unknown extensions
        ('[{"n":"a","v":1},{"n":"b","vd":"aGkgCg"}]', 1),  # data
        ('[{"n":"a","v":1},{"n":"b","vs":"' + "x" * 1025 + '"}]', 1),  # text over the limit
        ('[{"n":"a","v":1},{"n":"b","vs":"nul\\u0000"}]', 1),  # NUL: PostgreSQL cannot store it
        ('[{"bn":"d:"},{"n":"a","v":1},{}]', 0),  # base-only and empty records
    ],
)
def test_skipped_and_counted(payload: str, skipped: int) -> None:
    result = ok(payload)
    assert result.skipped == skipped
    assert [r.metric for r in result.readings] == ["a"]
    assert result.texts == ()


def test_text_up_to_the_limit_is_stored() -> None:
    result = ok('[{"n":"fw","vs":"' + "é" * 512 + '"}]')  # 1024 bytes of UTF-8
    assert result.texts == (TextReading("d1", "fw", RECEIVED, "é" * 512),)
    assert result.readings == []


@pytest.mark.parametrize(
    "payload", ["[]", '[{"n":"a","vd":"aGkgCg"}]', '[{"n":"a","s":1}]', '[{"bn":"x:"}]']
)
def test_nothing_to_store_is_no_readings(payload: str) -> None:
    assert reason(payload) == "no_readings"


# --- times ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ("", RECEIVED),
        (',"t":0', RECEIVED),
        (',"t":-5', RECEIVED - timedelta(seconds=5)),
        (',"t":-0.25', RECEIVED - timedelta(seconds=0.25)),
        (',"t":30', RECEIVED + timedelta(seconds=30)),
        (',"t":268435455', RECEIVED + timedelta(seconds=2**28 - 1)),  # still relative
        (',"t":268435456', at(2**28)),  # 1978-07-04: absolute from here on
        (',"t":1700000000.123456', datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC)),
    ],
)
def test_time_is_relative_below_2_to_the_28(fields: str, expected: datetime) -> None:
    result = ok(f'[{{"n":"a","v":1{fields}}}]')
    assert [r.ts for r in result.readings] == [expected]


def test_base_time_adds_to_t_and_decides_relative_or_absolute_on_the_sum() -> None:
    payload = """[
        {"bt":1700000000,"n":"a","v":1},
        {"n":"b","t":-10,"v":2},
        {"bt":-60,"n":"c","v":3},
        {"n":"d","t":30,"v":4}
    ]"""
    result = ok(payload)
    assert [r.ts for r in result.readings] == [
        at(1700000000),
        at(1699999990),
        RECEIVED - timedelta(seconds=60),
        RECEIVED - timedelta(seconds=30),
    ]


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        ('[{"n":"a","v":1,"t":946684799}]', "before INGEST_MIN_TS"),  # 1999-12-31T23:59:59Z
        ('[{"n":"a","v":1,"t":86401}]', "INGEST_MAX_TS_AHEAD"),  # relative: a day and a second
        ('[{"bt":1e300,"n":"a","v":1}]', "beyond the calendar"),
        ('[{"n":"a","v":1,"t":-1e300}]', "beyond the calendar"),
        ('[{"n":"a","v":1,"t":1e15}]', "beyond the calendar"),  # milliseconds are not read
    ],
)
def test_times_outside_the_window(payload: str, words: str) -> None:
    result = error(payload, limits=Limits())
    assert result.reason == "ts_out_of_range" and words in result.message


def test_the_default_window_takes_a_time_a_day_ahead() -> None:
    result = ok('[{"n":"a","v":1,"t":86400}]', limits=Limits())
    assert result.readings[0].ts == RECEIVED + timedelta(days=1)


def test_same_name_same_time_is_duplicate_metric() -> None:
    result = error('[{"n":"a","v":1},{"n":"a","vs":"x"}]')
    assert result.reason == "duplicate_metric"
    # Another time, or another device, is another key.
    assert len(ok('[{"n":"a","v":1},{"n":"a","v":2,"t":-1}]').readings) == 2
    two_devices = '[{"bn":"x:","n":"a","v":1},{"bn":"y:","n":"a","v":1}]'
    assert len(ok(two_devices, BY_PACK).readings) == 2


def test_too_many_records() -> None:
    limits = Limits(max_readings_per_message=3, min_ts=OPEN.min_ts, max_ts_ahead=OPEN.max_ts_ahead)
    three = '[{"n":"a","v":1},{"n":"b","v":2},{"n":"c","vs":"x"}]'
    assert len(ok(three, limits=limits).readings) == 2
    four = '[{"n":"a","v":1},{"n":"b","v":2},{"n":"c","v":3},{"n":"d","v":4}]'
    result = error(four, limits=limits)
    assert result.reason == "too_many_readings" and "4 records" in result.message


# --- malformed packs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (b"", "empty payload"),
        (b'{"n":"a","v":1}', "neither a JSON array"),
        (b"21.5", "neither a JSON array"),
        (b'[{"n":"a","v":1}', "not JSON"),
        (b'[{"n":"a","vs":"\xff"}]', "not JSON"),
        (b'[{"n":"a","v":1e400}]', "not JSON"),
        (b'[{"n":"a","v":1}, 2]', "record 1: a number, not an object"),
        (b'[[{"n":"a","v":1}]]', "record 0: an array, not an object"),
        (b'[{"n":"a","v":1,"vs":"x"}]', "two values, v and vs"),
        (b'[{"n":"a","vb":true,"vd":"aGk"}]', "two values"),
        (b'[{"n":"a","v":"21.5"}]', "v is text, not a number"),
        (b'[{"n":"a","v":true}]', "v is a boolean, not a number"),
        (b'[{"n":"a","v":null}]', "v is null, not a number"),
        (b'[{"n":"a","vb":1}]', "vb is a number, not a boolean"),
        (b'[{"n":"a","vs":5}]', "vs is a number, not text"),
        (b'[{"n":"a","vd":[1]}]', "vd is an array, not a string"),
        (b'[{"n":7,"v":1}]', "n is a number, not text"),
        (b'[{"n":"a","u":7,"v":1}]', "u is a number, not text"),
        (b'[{"n":"a","u":"' + b"U" * 129 + b'","v":1}]', "over 128"),
        (b'[{"n":"a","u":"C\\u0007","v":1}]', "control character"),
        (b'[{"bn":5,"n":"a","v":1}]', "bn is a number, not text"),
        (b'[{"bt":"now","n":"a","v":1}]', "bt is text, not a number"),
        (b'[{"bu":1,"n":"a","v":1}]', "bu is a number, not text"),
        (b'[{"bv":"1","n":"a","v":1}]', "bv is text"),
        (b'[{"bs":[],"n":"a","v":1}]', "bs is an array"),
        (b'[{"n":"a","v":1,"t":"2024-01-01T00:00:00Z"}]', "t is text, not a number"),
        (b'[{"n":"a","v":1,"s":"x"}]', "s is text"),
        (b'[{"n":"a","v":1,"ut":false}]', "ut is a boolean"),
        (b'[{"bver":11,"n":"a","v":1}]', "base version 11 is newer than 10"),
        (b'[{"bver":0,"n":"a","v":1}]', "not a positive integer"),
        (b'[{"bver":10.0,"n":"a","v":1}]', "not a positive integer"),
        (b'[{"n":"a"}]', "no value (v, vs, vb or vd) and no sum (s)"),
        (b'[{"n":"a","u":"Cel","ut":5}]', "no value"),
        (b'[{"n":"a","v":1,"crit_":true}]', "'crit_' must be understood"),
    ],
)
def test_malformed_packs_are_bad_senml(payload: bytes, words: str) -> None:
    result = error(payload)
    assert result.reason == "bad_senml"
    assert words in result.message, result.message


def test_json_may_start_with_white_space() -> None:
    assert ok(b' \r\n\t[{"n":"a","v":1}]').readings == [Reading("d1", "a", RECEIVED, 1.0)]


def test_the_base_version_10_and_below_is_read() -> None:
    assert len(ok('[{"bver":10,"n":"a","v":1}]').readings) == 1
    assert len(ok('[{"bver":1,"n":"a","v":1}]').readings) == 1


# --- CBOR (RFC 8428 section 6) ------------------------------------------------------------------


def test_cbor_pack_reads_as_its_json_twin() -> None:
    json_pack = """[
        {"bn":"urn:dev:ow:10e2073a01080063:","bt":1700000000,"bu":"Cel","bver":10,
         "n":"temp","v":23.1},
        {"n":"hum","u":"%RH","v":40,"t":-5},
        {"n":"label","vs":"Machine Room"},
        {"n":"open","vb":true},
        {"n":"nfc-reader","vd":"aGkgCg"},
        {"n":"energy","s":42.5,"ut":60,"v":0.5}
    ]"""
    cbor_pack = cbor2.dumps(
        [
            {BN: "urn:dev:ow:10e2073a01080063:", BT: 1700000000, BU: "Cel", BVER: 10,
             N: "temp", V: 23.1},
            {N: "hum", U: "%RH", V: 40, T: -5},
            {N: "label", VS: "Machine Room"},
            {N: "open", VB: True},
            {N: "nfc-reader", VD: b"hi \n"},
            {N: "energy", S: 42.5, UT: 60, V: 0.5},
        ]
    )  # fmt: skip
    assert cbor_pack[0] == 0x86  # an array of six
    from_json, from_cbor = ok(json_pack, BY_PACK), ok(cbor_pack, BY_PACK)
    assert from_cbor == from_json
    assert [(r.metric, r.value) for r in from_cbor.readings] == [
        ("temp", 23.1),
        ("hum", 40.0),
        ("open", 1.0),
        ("energy", 0.5),
    ]
    assert from_cbor.skipped == 3  # vd, s, ut
    assert from_cbor.texts[0].value == "Machine Room"


def test_cbor_indefinite_length_array_and_string_labels_of_extensions() -> None:
    pack = b"\x9f" + cbor2.dumps({N: "a", V: 1, "vendor": 5}) + b"\xff"
    result = ok(pack)
    assert result.readings == [Reading("d1", "a", RECEIVED, 1.0)]
    assert result.skipped == 1


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (cbor2.CBORTag(4, [-2, 2315]), 23.15),  # decimal fraction 2315e-2
        (cbor2.CBORTag(4, [2, -7]), -700.0),
        (cbor2.CBORTag(4, [-1000, 5]), 0.0),
        (2**64, float(2**64)),  # a bignum (tag 2)
        (-(2**70), float(-(2**70))),  # tag 3
        (21, 21.0),
    ],
)
def test_cbor_numbers(value: Any, expected: float) -> None:
    result = ok(cbor2.dumps([{N: "a", V: value}]))
    assert result.readings == [Reading("d1", "a", RECEIVED, expected)]


@pytest.mark.parametrize(
    "value",
    [
        float("nan"),
        float("inf"),
        10**400,  # a bignum beyond a double
        cbor2.CBORTag(4, [400, 10**300]),
        cbor2.CBORTag(4, [0, 2**2000]),
    ],
)
def test_cbor_values_no_double_holds_are_skipped(value: Any) -> None:
    result = ok(cbor2.dumps([{N: "a", V: value}, {N: "b", V: 1}]))
    assert [r.metric for r in result.readings] == ["b"] and result.skipped == 1


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (cbor2.dumps([{N: "a", V: 1}]) + b"\x00", "1 byte(s) after the CBOR array"),
        (cbor2.dumps([{N: "a", V: 1}])[:-1], "not CBOR"),
        (b"\x81\xa2\x00\x61a\x00\x61b", "not CBOR"),  # label n twice
        (b"\x81\xa2\x00\x62\xff\xfe\x02\x01", "not CBOR"),  # text that is not UTF-8
        (b"\x81" * 20 + b"\x01", "not CBOR"),  # nested deeper than a pack
        (cbor2.dumps([{N: "a", V: 1, 99: 2}]), "label 99 is not a SenML label"),
        (cbor2.dumps([{N: "a", V: 1, b"k": 2}]), "is not a SenML label"),
        (cbor2.dumps([{N: "a", V: cbor2.CBORTag(1, 1700000000)}]), "v is a CBOR tag"),
        (cbor2.dumps([{N: "a", V: cbor2.CBORTag(35, "a+")}]), "v is a CBOR tag"),
        (cbor2.dumps([{N: "a", V: cbor2.CBORTag(99999, 1)}]), "v is a CBOR tag"),
        (cbor2.dumps([{N: "a", V: cbor2.CBORTag(4, [1.5, 2])}]), "v is a CBOR tag"),
        (cbor2.dumps([{N: "a", VD: "aGk"}]), "vd is text, not a byte string"),
        (cbor2.dumps([{N: "a", V: cbor2.undefined}]), "v is undefined"),
        (cbor2.dumps([{BVER: 2**80, N: "a", V: 1}]), "base version a bignum is newer"),
        (cbor2.dumps([{N: "a", "x_": 1, V: 1}]), "'x_' must be understood"),
        (cbor2.dumps([{N: "a", V: 1, T: float("nan")}]), "t is not a finite number"),
        (cbor2.dumps([{BT: float("inf"), N: "a", V: 1}]), "bt is not a finite number"),
        (cbor2.dumps([{N: "a", V: 1}, [1]]), "record 1: an array, not a map"),
    ],
)
def test_malformed_cbor_is_bad_senml(payload: bytes, words: str) -> None:
    result = error(payload)
    assert result.reason == "bad_senml"
    assert words in result.message, result.message


def test_cbor_json_labels_are_extensions_there() -> None:
    # CBOR packs use the integer labels; "v" as text is some extension's field.
    result = error(cbor2.dumps([{N: "a", "v": 1}]))
    assert result.reason == "bad_senml" and "no value" in result.message


def test_hostile_cbor_numbers_decode_fast() -> None:
    # A decimal fraction with a 64 KiB mantissa takes cbor2 seconds to turn into a Decimal;
    # a 1 MiB payload could hold fifteen. The decoder reads such values without building them.
    mantissa = cbor2.CBORTag(2, b"\xff" * 65536)
    payload = cbor2.dumps([{N: f"m{i}", V: cbor2.CBORTag(4, [-3, mantissa])} for i in range(15)])
    started = time.process_time()
    result = run(payload)
    assert time.process_time() - started < 2.0
    assert isinstance(result, DecodeError) and result.reason == "no_readings"


def test_reasons_list_bad_senml() -> None:
    assert "bad_senml" in REASONS


def test_the_readme_example_reads_as_the_readme_says() -> None:
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### SenML\n", 1)[1].split("\n## ", 1)[0]
    toml_block, json_block = re.findall(r"```(?:toml|json)\n(.*?)```", section, re.S)[:2]
    routes = parse_routes(tomllib.loads(toml_block)["routes"], FORMATS)
    received = datetime(2023, 11, 14, 22, 13, 30, tzinfo=UTC)
    by_pack = decode("senml/gw/1", json_block.encode(), received, routes)
    by_topic = decode("lwm2m/north/boiler-1", json_block.encode(), received, routes)
    assert isinstance(by_pack, Decoded) and isinstance(by_topic, Decoded)
    ts = datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)
    assert {(r.device_id, r.metric, r.ts) for r in by_pack.readings} == {
        ("dev-00001", m, ts) for m in ("seq", "temperature", "humidity", "battery", "rssi")
    }
    assert by_pack.texts == (TextReading("dev-00001", "fw", ts, "1.2.3"),)
    units = {"temperature": "Cel", "humidity": "%RH", "battery": "V"}
    assert by_pack.updates == (DeviceUpdate("dev-00001", units=units),)
    tags = {"source": "lwm2m", "site": "north"}
    assert by_topic.updates == (DeviceUpdate("boiler-1", tags, units=units),)


# --- whatever arrives -----------------------------------------------------------------------

_ODD_VALUES: list[Any] = [
    None, True, False, 0, -1, 2**28, 2**64, -(2**70), 10**400, 1.5, -0.0, float("nan"),
    float("inf"), 1e300, -1e300, "", "x", "a\x00", "é" * 600, b"", b"\xff", [], [1], {}, {1: 2},
    cbor2.CBORTag(4, [-2, 5]), cbor2.CBORTag(4, [10**9, 1]), cbor2.CBORTag(4, ["a", 1]),
    cbor2.CBORTag(1, 0), cbor2.CBORTag(30, [1, 3]), cbor2.CBORTag(77, 1), cbor2.undefined,
    cbor2.CBORSimpleValue(99),
]  # fmt: skip


def _checked(result: Decoded | DecodeError) -> None:
    if isinstance(result, DecodeError):
        assert result.reason in REASONS and result.reason != "internal", result
        return
    assert result.readings or result.texts
    assert all(type(r.value) is float and r.value - r.value == 0.0 for r in result.readings)
    assert all(r.ts.tzinfo is UTC for r in result.readings)
    assert all(t.ts.tzinfo is UTC for t in result.texts)


def test_random_cbor_records_never_raise() -> None:
    rng = random.Random(8428)
    labels = [*range(-7, 10), "x", "y_", 3.0]
    for _ in range(3000):
        records = [
            {rng.choice(labels): rng.choice(_ODD_VALUES) for _ in range(rng.randint(0, 4))}
            for _ in range(rng.randint(1, 4))
        ]
        payload = cbor2.dumps(records)
        for topic in (BY_TOPIC, BY_PACK):
            _checked(run(payload, topic, limits=Limits()))


def test_random_garbage_never_raises() -> None:
    rng = random.Random(28)
    seeds = [
        b'[{"bn":"d:","bt":1700000000,"n":"a","v":1,"u":"Cel"},{"n":"b","vs":"x","t":-1}]',
        cbor2.dumps([{BN: "d:", BT: 1.7e9, N: "a", V: 1.5}, {N: "b", VB: True, T: 2}]),
    ]
    for _ in range(5000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data) + 1)
            data[i:i] = bytes([rng.randrange(256)])
            if data and rng.random() < 0.5:
                del data[rng.randrange(len(data))]
        for topic in (BY_TOPIC, BY_PACK):
            _checked(run(bytes(data), topic, limits=Limits()))
