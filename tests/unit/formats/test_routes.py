"""Route tables: template parsing and matching, route validation, dispatch to the first match."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from ingest.errors import ConfigError, DecodeError
from ingest.formats.decode import FORMATS, decode, load_routes, single_route
from ingest.formats.routes import FormatSpec, Match, RouteTable, Template, parse_routes
from ingest.model import Decoded, DeviceUpdate, Reading, TextReading
from ingest.settings import Settings, load_settings

RECEIVED = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)


def table(*routes: dict[str, Any]) -> RouteTable:
    return parse_routes(list(routes), FORMATS)


# --- templates -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "filter_"),
    [
        ("devices/{device_id}/telemetry", "devices/+/telemetry"),
        ("{device_id}", "+"),
        ("devices/{device_id}/{metric}", "devices/+/+"),
        ("tele/{site}/{device_id}/{metric...}", "tele/+/+/#"),
        ("shellies/{device_id}/{metric...}", "shellies/+/#"),
        ("/lead/{device_id}", "/lead/+"),
    ],
)
def test_template_filter(template: str, filter_: str) -> None:
    parsed = Template(template, where="r")
    assert parsed.filter == filter_
    assert parsed.text == template
    assert repr(parsed) == f"Template({template!r})"


@pytest.mark.parametrize(
    ("template", "topic", "expected"),
    [
        ("devices/{device_id}/telemetry", "devices/d1/telemetry", ("d1", None, None)),
        ("devices/{device_id}/telemetry", "devices//telemetry", ("", None, None)),
        ("devices/{device_id}/telemetry", "devices/d1/telemetryx", None),
        ("devices/{device_id}/telemetry", "devices/d1/telemetry/", None),
        ("devices/{device_id}/telemetry", "devices/telemetry", None),
        ("devices/{device_id}/telemetry", "other/d1/telemetry", None),
        ("devices/{device_id}/telemetry", "", None),
        ("devices/{device_id}/{metric}", "devices/d1/temp", ("d1", "temp", None)),
        ("devices/{device_id}/{metric}", "devices/d1/a/b", None),
        ("site/{metric}/x/{device_id}", "site/temp/x/d9", ("d9", "temp", None)),
        ("site/{metric}/x/{device_id}", "site/temp/y/d9", None),
        (
            "f/{site}/{line}/{device_id}/data",
            "f/north/3/d1/data",
            ("d1", None, {"site": "north", "line": "3"}),
        ),
        (
            "shellies/{device_id}/{metric...}",
            "shellies/sh1/relay/0/power",
            ("sh1", "relay.0.power", None),
        ),
        (
            "shellies/{device_id}/{metric...}",
            "shellies/sh1/temperature",
            ("sh1", "temperature", None),
        ),
        ("shellies/{device_id}/{metric...}", "shellies/sh1", None),
        ("t/{site}/{device_id}/{metric...}", "t/a/d/x/y", ("d", "x.y", {"site": "a"})),
    ],
)
def test_template_match(template: str, topic: str, expected: tuple[Any, ...] | None) -> None:
    match = Template(template, where="r").match(topic)
    assert match == expected
    if match is not None:
        assert type(match) is Match


def test_wildcards_only_for_formats_naming_devices() -> None:
    named = Template("spBv1.0/+/#", where="r", wildcards=True)
    assert named.filter == "spBv1.0/+/#"
    assert named.match("spBv1.0/g/NDATA/e1") == (None, None, None)
    assert named.match("other/g/NDATA") is None
    with pytest.raises(ConfigError, match="wildcards only where the format names devices"):
        Template("spBv1.0/+/#", where="r")


@pytest.mark.parametrize(
    ("template", "words"),
    [
        ("", "empty"),
        ("devices/+/telemetry", "wildcards only"),
        ("devices/{device_id}/#", "wildcards only"),
        ("devices/{device_id}+/x", "whole level"),
        ("devices/id-{device_id}/telemetry", "whole level"),
        ("devices/{device_id}x/telemetry", "whole level"),
        ("devices/{device_id/telemetry", "whole level"),
        ("devices/{{device_id}}/telemetry", "whole level"),
        ("devices/{}/telemetry", "whole level"),
        ("devices/{a-b}/{device_id}", "whole level"),
        ("devices/{device_id}/{device_id}", "more than once"),
        ("{metric}/{device_id}/{metric}", "more than once"),
        ("d/{device_id}/{metric...}/x", "only as the last level"),
        ("d/{device_id}/{metric}/{metric...}", "both {metric} and {metric...}"),
        ("devices/{device_id}/\x00", "NUL"),
        ("$share/g/devices/{device_id}", "INGEST_SHARE_GROUP"),
    ],
)
def test_template_invalid(template: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        Template(template, where="routes[2] ('x')")
    assert info.value.setting == "routes[2] ('x')"
    assert words in info.value.message


# --- route tables --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ({"topic": "devices/telemetry"}, "no {device_id}"),
        ({"topic": "d/{metric}", "format": "value"}, "no {device_id}"),
        ({"topic": "d/{device_id}", "format": "xml"}, "format 'xml' is not one of json, value"),
        ({"topic": "d/{device_id}", "qos": 3}, "qos must be 0, 1 or 2"),
        ({"topic": "d/{device_id}", "qos": True}, "qos must be 0, 1 or 2"),
        ({"topic": "d/{device_id}", "tags": {"a": 1}}, "tags must be a table of strings"),
        ({"topic": "d/{device_id}", "colour": "red"}, "unknown key 'colour'"),
        ({"topic": "d/{device_id}", "value": {}}, "unknown key 'value'"),
        ({"topic": "d/{device_id}", "json": {"tz": "x"}}, "has no option 'tz'"),
        ({"topic": "d/{device_id}", "json": {"ts": ""}}, "ts must be a field name"),
        ({"topic": "d/{device_id}", "json": {"ts": "a..b"}}, "ts must be a field name"),
        ({"topic": "d/{device_id}", "json": {"tag_fields": "x"}}, "tag_fields must be a list"),
        ({"topic": "d/{device_id}", "json": {"numeric_strings": 1}}, "true or false"),
        ({"topic": "d/{device_id}/{metric}", "format": "value", "value": {"x": 1}}, "no option"),
        ({"topic": 7}, "topic: must be a string"),
    ],
)
def test_route_invalid_names_the_route(entry: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        table({"topic": "ok/{device_id}"}, entry)
    assert info.value.setting.startswith("routes[2]")
    assert words in info.value.message


@pytest.mark.parametrize("raw", [[], {}, "x", [1]])
def test_table_must_be_a_list_of_tables(raw: Any) -> None:
    with pytest.raises(ConfigError):
        parse_routes(raw, FORMATS)


def test_subscriptions_dedupe_filters_and_take_the_highest_qos() -> None:
    routes = table(
        {"topic": "a/{device_id}/t", "qos": 0},
        {"topic": "a/{device_id}/t", "qos": 1, "json": {"ts": "time"}},
        {"topic": "b/{device_id}/{metric}", "format": "value", "qos": 2},
    )
    assert routes.subscriptions() == [("a/+/t", 1), ("b/+/+", 2)]
    assert routes.subscriptions("g") == [("$share/g/a/+/t", 1), ("$share/g/b/+/+", 2)]
    assert routes.filters == "a/+/t, b/+/+"


def test_first_matching_route_wins() -> None:
    routes = table(
        {"topic": "x/{device_id}/{metric}", "format": "value", "tags": {"src": "first"}},
        {"topic": "x/{device_id}/{metric}", "format": "json", "tags": {"src": "second"}},
    )
    result = decode("x/d1/temp", b"21.5", RECEIVED, routes)
    assert isinstance(result, Decoded)
    assert result.readings == [Reading("d1", "temp", RECEIVED, 21.5)]
    assert result.updates == (DeviceUpdate("d1", {"src": "first"}),)


def test_no_route_is_bad_topic() -> None:
    routes = table(
        {"topic": "a/{device_id}"}, {"topic": "b/{device_id}/{metric}", "format": "value"}
    )
    result = decode("c/d1", b"{}", RECEIVED, routes)
    assert isinstance(result, DecodeError) and result.reason == "bad_topic"


@pytest.mark.parametrize("device", ["", "d\x7f", "x" * 129])
def test_device_id_rules_hold_for_every_format(device: str) -> None:
    routes = table(
        {"topic": "a/{device_id}"}, {"topic": "b/{device_id}/{metric}", "format": "value"}
    )
    for topic, payload in ((f"a/{device}", b'{"t": 1}'), (f"b/{device}/t", b"1")):
        result = decode(topic, payload, RECEIVED, routes)
        assert isinstance(result, DecodeError) and result.reason == "bad_device_id", topic


def test_topic_levels_and_static_tags_become_device_tags() -> None:
    routes = table(
        {
            "topic": "f/{site}/{device_id}/{metric...}",
            "format": "value",
            "tags": {"src": "plc", "site": "static"},
        }
    )
    result = decode("f/north/d1/env/temp", b"on", RECEIVED, routes)
    assert isinstance(result, Decoded)
    assert result.readings == [Reading("d1", "env.temp", RECEIVED, 1.0)]
    # A topic level wins over a static tag of the same name.
    assert result.updates == (DeviceUpdate("d1", {"src": "plc", "site": "north"}),)


@pytest.mark.parametrize(
    "site", ["no\x01rth", "a\x00b", "tab\there", "del\x7f", "c1\x85", "x" * 129]
)
def test_a_topic_level_that_would_be_a_bad_tag_value_is_bad_topic(site: str) -> None:
    routes = table({"topic": "f/{site}/{device_id}/{metric}", "format": "value"})
    result = decode(f"f/{site}/d1/temp", b"1", RECEIVED, routes)
    assert isinstance(result, DecodeError), result
    assert result.reason == "bad_topic"
    assert "tag site" in result.message


def test_a_tag_value_of_128_characters_is_stored() -> None:
    routes = table({"topic": "f/{site}/{device_id}/{metric}", "format": "value"})
    site = "é" * 128
    result = decode(f"f/{site}/d1/temp", b"1", RECEIVED, routes)
    assert isinstance(result, Decoded), result
    assert result.updates == (DeviceUpdate("d1", {"site": site}),)


def test_default_route_sends_no_device_update() -> None:
    result = decode(
        "devices/d/telemetry",
        b'{"a": 1, "s": "x"}',
        RECEIVED,
        single_route("devices/{device_id}/telemetry"),
    )
    assert isinstance(result, Decoded)
    assert result.updates == ()
    assert result.texts == (TextReading("d", "s", RECEIVED, "x"),)


def test_a_new_format_is_a_line_in_the_dispatch_table() -> None:
    def decode_upper(
        match: Match, payload: bytes, at: datetime, route: Any, limits: Any
    ) -> Decoded:
        return Decoded([Reading(match.device_id or "?", "n", at, float(len(payload)))], 0)

    formats = {
        **FORMATS,
        "upper": FormatSpec(decode_upper, lambda table, where: None, names_devices=True),
    }
    routes = parse_routes([{"topic": "u/#", "format": "upper"}], formats)
    result = decode("u/x/y", b"abc", RECEIVED, routes)
    assert isinstance(result, Decoded) and result.readings[0].value == 3.0


# --- settings ------------------------------------------------------------------------------


def test_routes_setting_loads_the_table() -> None:
    s = Settings(routes='[{"topic": "stat/{device_id}/{metric}", "format": "value"}]')
    assert [r.format for r in load_routes(s).routes] == ["value"]
    assert load_routes(Settings()).filters == "devices/+/telemetry"


def test_routes_and_a_topic_both_set_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        Settings(topic="x/{device_id}", routes='[{"topic": "stat/{device_id}"}]')
    assert "INGEST_TOPIC" in info.value.setting and "[[routes]]" in info.value.setting


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"routes": "[{"}, "INGEST_ROUTES"),
        ({"routes": '[{"topic": "a/b"}]'}, "routes[1] ('a/b')"),
        ({"topic": "a/b"}, "INGEST_TOPIC"),
    ],
)
def test_bad_routes_are_config_errors_naming_the_route(
    kwargs: dict[str, Any], setting: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Settings(**kwargs)
    assert info.value.setting == setting


CONFIG = """
[ingest]
client_id = "c1"

[[routes]]
topic = "devices/{device_id}/telemetry"

[[routes]]
topic = "gw/{site}/{device_id}"
qos = 0
tags = { source = "kepware" }
[routes.json]
ts = "timestamp"
samples = "values"
sample_name = "id"
sample_value = "v"
sample_ts = "t"
"""


def test_config_file_routes(tmp_path: Any) -> None:
    path = tmp_path / "ingest.toml"
    path.write_text(CONFIG)
    settings = load_settings(config_file=path, environ={})
    routes = load_routes(settings)
    assert [r.template.text for r in routes.routes] == [
        "devices/{device_id}/telemetry",
        "gw/{site}/{device_id}",
    ]
    assert routes.subscriptions() == [("devices/+/telemetry", 1), ("gw/+/+", 0)]
    # Worker processes get the same table through the environment.
    again = load_settings(environ=settings.to_environ())
    assert load_routes(again).subscriptions() == routes.subscriptions()
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=path, environ={"INGEST_TOPIC": "x/{device_id}"})
    assert info.value.setting == "INGEST_TOPIC and [[routes]]"


DEFAULT_TOPIC = "devices/{device_id}/telemetry"
ONE_ROUTE = '[[routes]]\ntopic = "a/{device_id}"\n'


@pytest.mark.parametrize("how", ["env", "env_file", "flag", "file", "file_nested"])
def test_topic_set_to_its_default_beside_routes_is_an_error(tmp_path: Any, how: str) -> None:
    path = tmp_path / "ingest.toml"
    environ: dict[str, str] = {}
    overrides: dict[str, Any] = {}
    text = ONE_ROUTE
    expected = "INGEST_TOPIC and [[routes]]"
    if how == "env":
        environ["INGEST_TOPIC"] = DEFAULT_TOPIC
    elif how == "env_file":
        (tmp_path / "topic").write_text(DEFAULT_TOPIC + "\n")
        environ["INGEST_TOPIC_FILE"] = str(tmp_path / "topic")
        expected = "INGEST_TOPIC_FILE and [[routes]]"
    elif how == "flag":
        overrides["topic"] = DEFAULT_TOPIC
        expected = "--topic and [[routes]]"
    elif how == "file":
        text = f'topic = "{DEFAULT_TOPIC}"\n' + ONE_ROUTE
        expected = f"{path}: topic and [[routes]]"
    else:
        text = f'[ingest]\ntopic = "{DEFAULT_TOPIC}"\n' + ONE_ROUTE
        expected = f"{path}: topic and [[routes]]"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=path, environ=environ, overrides=overrides)
    assert info.value.setting == expected
    assert "both set" in info.value.message


def test_topic_beside_routes_from_the_environment_is_an_error() -> None:
    environ = {"INGEST_TOPIC": DEFAULT_TOPIC, "INGEST_ROUTES": '[{"topic": "a/{device_id}"}]'}
    with pytest.raises(ConfigError) as info:
        load_settings(environ=environ)
    assert info.value.setting == "INGEST_TOPIC and INGEST_ROUTES"


def test_routes_alone_leave_the_topic_out_of_a_workers_environment(tmp_path: Any) -> None:
    path = tmp_path / "ingest.toml"
    path.write_text(ONE_ROUTE)
    settings = load_settings(config_file=path, environ={})
    assert "INGEST_TOPIC" not in settings.to_environ()
    # Without routes the topic travels as before.
    assert load_settings(environ={}).to_environ()["INGEST_TOPIC"] == DEFAULT_TOPIC


def test_config_file_bad_route_names_it(tmp_path: Any) -> None:
    path = tmp_path / "ingest.toml"
    path.write_text('[[routes]]\ntopic = "ok/{device_id}"\n[[routes]]\ntopic = "a/{x}/b"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=path, environ={})
    assert info.value.setting == "routes[2] ('a/{x}/b')"
    assert "no {device_id}" in info.value.message
