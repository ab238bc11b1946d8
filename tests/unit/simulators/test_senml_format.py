"""The simulator's ``--format senml`` (and ``--senml-cbor``): configuration and the packs."""

from __future__ import annotations

from typing import Any

import cbor2
import orjson
import pytest

from simulators import ConfigError, SimulatorConfig
from simulators._payloads import Device
from simulators._senml import encoder
from simulators.cli import build_parser, config_from_args

WALL_MS = 1_700_000_000_123.0


def device(cbor: bool = False, k: int = 1) -> Device:
    return Device(
        0,
        seed=7,
        topic_template="devices/dev-00001/senml",
        rate=10.0,
        samples_per_message=k,
        encode=encoder("senml", cbor),
    )


def test_senml_format_defaults_to_its_own_topic() -> None:
    parser = build_parser()
    env = {"INGEST_TOPIC": "t/{device_id}"}  # a json route's template: not for senml
    config = config_from_args(parser.parse_args(["--format", "senml"]), env)
    assert config.topic == "devices/{device_id}/senml"
    assert config.format == "senml" and not config.senml_cbor
    cbor = config_from_args(parser.parse_args(["--format", "senml", "--senml-cbor"]), env)
    assert cbor.senml_cbor


@pytest.mark.parametrize(
    ("kwargs", "setting", "words"),
    [
        ({"senml_cbor": True}, "--senml-cbor", "only with --format senml"),
        ({"format": "senml", "bad_ratio": 0.1}, "--format", "--bad-ratio"),
        ({"format": "senml", "hostile_ratio": 0.1}, "--format", "--hostile-ratio"),
        ({"format": "senml", "topic": "d/{device_id}/{metric}"}, "--topic", "{metric}"),
    ],
)
def test_invalid(kwargs: dict[str, Any], setting: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        SimulatorConfig(**kwargs)
    assert info.value.setting == setting
    assert words in info.value.message


def test_a_pack_names_the_device_and_carries_every_field_of_the_sample() -> None:
    payload, samples, bad, duplicate, late = device().next_message(WALL_MS)
    assert (samples, bad, duplicate, late) == (1, None, False, 0)
    records = orjson.loads(payload)
    first, *rest = records
    assert first["bn"] == "dev-00001:" and first["bt"] == 1_700_000_000.123
    assert "t" not in first
    assert [r["n"] for r in records] == [
        "seq", "temperature", "humidity", "battery", "rssi", "fw",
    ]  # fmt: skip
    assert first["v"] == 1  # the seq the audit reconciles
    assert {r["n"]: r.get("u") for r in records} == {
        "seq": None, "temperature": "Cel", "humidity": "%RH", "battery": "V", "rssi": None,
        "fw": None,
    }  # fmt: skip
    fw = records[-1]
    assert set(fw) == {"n", "vs"} and isinstance(fw["vs"], str)
    assert all(isinstance(r["v"], int | float) for r in records[:-1])
    assert not any("bn" in r or "bt" in r for r in rest)


def test_later_samples_carry_their_offset_from_the_base_time() -> None:
    dev = device(k=3)
    payload, samples, *_ = dev.next_message(WALL_MS)
    assert samples == 3
    records = orjson.loads(payload)
    assert len(records) == 18
    bt = records[0]["bt"]
    seqs = [(r["v"], round((bt + r.get("t", 0)) * 1000)) for r in records if r["n"] == "seq"]
    # Samples spread over the interval between messages (100 ms at 10 msg/s), ending now.
    assert seqs == [(1, 1_700_000_000_056), (2, 1_700_000_000_090), (3, 1_700_000_000_123)]


def test_cbor_pack_is_the_json_pack_with_integer_labels() -> None:
    json_payload = device().next_message(WALL_MS)[0]
    cbor_payload = device(cbor=True).next_message(WALL_MS)[0]
    assert cbor_payload[0] == 0x86  # a CBOR array of six records
    labels = {-2: "bn", -3: "bt", 0: "n", 1: "u", 2: "v", 3: "vs", 6: "t"}
    records = [{labels[k]: v for k, v in r.items()} for r in cbor2.loads(cbor_payload)]
    assert records == orjson.loads(json_payload)
