"""The simulator's ``--format value`` and ``--tags``: configuration, topics and wire parts."""

from __future__ import annotations

import orjson
import pytest

from simulators import ConfigError, SimulatorConfig
from simulators._config import parse_tags
from simulators._payloads import Device
from simulators._publisher import VALUE_METRICS, _parts
from simulators.cli import build_parser, config_from_args


def test_tags_spread_devices_over_the_combinations() -> None:
    config = SimulatorConfig(
        devices=5,
        topic="f/{site}/{line}/{device_id}/telemetry",
        tags=parse_tags(["site=a,b", "line=1,2"]),
    )
    assert [config.topic_of(i) for i in range(5)] == [
        "f/a/1/dev-00001/telemetry",
        "f/a/2/dev-00002/telemetry",
        "f/b/1/dev-00003/telemetry",
        "f/b/2/dev-00004/telemetry",
        "f/a/1/dev-00005/telemetry",
    ]


@pytest.mark.parametrize(
    ("kwargs", "setting", "words"),
    [
        ({"topic": "f/{site}/{device_id}"}, "--tags", "'site'"),
        ({"tags": (("site", ("a",)),)}, "--tags", "'site'"),
        ({"format": "value"}, "--topic", "{metric}"),
        ({"topic": "d/{device_id}/{metric}"}, "--topic", "{metric}"),
        ({"format": "xml"}, "--format", "json, value"),
        (
            {"format": "value", "topic": "d/{device_id}/{metric}", "samples_per_message": 2},
            "--format",
            "one sample per topic",
        ),
        (
            {"format": "value", "topic": "d/{device_id}/{metric}", "bad_ratio": 0.1},
            "--format",
            "--bad-ratio",
        ),
    ],
)
def test_invalid(kwargs: dict[str, object], setting: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        SimulatorConfig(**kwargs)  # type: ignore[arg-type]
    assert info.value.setting == setting
    assert words in info.value.message


@pytest.mark.parametrize("item", ["site", "site=", "site=a,,b", "1x=a", "metric=a", "s=a/b"])
def test_bad_tags(item: str) -> None:
    with pytest.raises(ConfigError, match="--tags"):
        parse_tags([item])


def test_value_format_defaults_to_a_topic_per_metric() -> None:
    parser = build_parser()
    env = {"INGEST_TOPIC": "t/{device_id}"}  # a json route's template: not for --format value
    config = config_from_args(parser.parse_args(["--format", "value"]), env)
    assert config.topic == "devices/{device_id}/{metric}"
    assert config_from_args(parser.parse_args([]), env).topic == "t/{device_id}"
    tagged = config_from_args(
        parser.parse_args(["--topic", "x/{s}/{device_id}", "--tags", "s=1,2"]), env
    )
    assert tagged.tags == (("s", ("1", "2")),)


def test_value_parts_one_topic_per_metric_seq_carries_the_sample() -> None:
    device = Device(0, seed=1, topic_template="devices/dev-00001/{metric}", rate=1.0)
    device.metric_topics = {m: m.encode() for m in VALUE_METRICS}
    payload, samples, *_ = device.next_message(1_700_000_000_000.0)
    assert samples == 1
    parts = _parts(device, payload)
    assert [topic for topic, _, _ in parts] == [m.encode() for m in VALUE_METRICS]
    assert [carries for _, _, carries in parts] == [m == "seq" for m in VALUE_METRICS]
    seq = orjson.loads(parts[0][1])
    assert seq == {"ts": 1_700_000_000_000, "value": 1}
    assert isinstance(orjson.loads(parts[-1][1])["value"], str)  # the firmware, a text


def test_json_parts_are_the_message() -> None:
    device = Device(0, seed=1, topic_template="devices/dev-00001/telemetry", rate=1.0)
    device.wire_topic = b"t"
    assert _parts(device, b"{}") == [(b"t", b"{}", True)]
