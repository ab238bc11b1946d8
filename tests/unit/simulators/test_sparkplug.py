"""``simulate --format sparkplug`` without sockets: configuration, the packets a node adds
(will, SUBSCRIBE), its births, data, deaths and Rebirth answers, and its report."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from ingest.formats.sparkplug_schema import DataType, Payload
from ingest.mqtt import wire
from simulators._config import SimulatorConfig
from simulators._errors import ConfigError
from simulators._mqtt import Connection, PacketReader
from simulators._publisher import Publisher, Stats
from simulators._report import ProcessResult, build_report
from simulators._runner import _fill, _fleet
from simulators._sparkplug import DEVICE_METRICS, REBIRTH, SparkplugNode, alias_of

URL = "mqtt://127.0.0.1:1883"


def config(**kwargs: Any) -> SimulatorConfig:
    base: dict[str, Any] = {"mqtt_url": URL, "format": "sparkplug", "seed": 3, "count": 2}
    return SimulatorConfig(**(base | kwargs))


class FakeConnection:
    """What a node writes, and the packet ids it takes (no socket)."""

    def __init__(self) -> None:
        self.inflight: dict[int, Any] = {}
        self.written = b""
        self._mid = 0
        self.is_open = True

    def next_mid(self) -> int:
        self._mid += 1
        return self._mid

    def write(self, data: bytes) -> None:
        self.written += data

    def publishes(self) -> list[tuple[str, Any]]:
        """The PUBLISH packets written, as (topic, decoded payload)."""
        out = []
        for header, body in PacketReader().feed(self.written):
            assert header & 0xF0 == 0x30
            end = 2 + int.from_bytes(body[:2], "big")
            start = end + (2 if header & 0x06 else 0)
            out.append((body[2:end].decode(), Payload.FromString(body[start:])))
        self.written = b""
        return out


def nodes(cfg: SimulatorConfig, part: int = 0) -> list[SparkplugNode]:
    _devices, publishers = _fleet(cfg, part, Stats())
    return [cast(SparkplugNode, p) for p in publishers]


def test_nodes_group_the_devices_and_each_is_a_connection() -> None:
    cfg = config(devices=25, devices_per_node=10, group_id="plant")
    assert (cfg.nodes, cfg.connections, cfg.topic) == (3, 3, "spBv1.0/plant/#")
    assert cfg.device_name(0) == "plant/node-0001/dev-00001"
    assert cfg.device_name(24) == "plant/node-0003/dev-00025"
    found = nodes(cfg)
    assert [n.node_id for n in found] == ["node-0001", "node-0002", "node-0003"]
    assert [len(n._devices) for n in found] == [10, 10, 5]
    assert found[2]._devices[0].device_id == "plant/node-0003/dev-00021"
    assert found[2]._devices[0].topic == "spBv1.0/plant/DDATA/node-0003/dev-00021"
    # Processes take whole nodes, in turn.
    two = config(devices=25, devices_per_node=10, processes=2)
    assert [n.node_id for n in nodes(two, 1)] == ["node-0002"]


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"connections": 2, "devices": 30}, "--connections"),
        ({"processes": 4, "devices": 30}, "--processes"),
        ({"topic": "x/{device_id}"}, "--format"),
        ({"samples_per_message": 2}, "--format"),
        ({"hostile_ratio": 0.1}, "--format"),
        ({"group_id": "a/b"}, "--group-id"),
        ({"group_id": ""}, "--group-id"),
        ({"devices_per_node": 0}, "--devices-per-node"),
    ],
)
def test_what_sparkplug_refuses(kwargs: dict[str, Any], flag: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config(**kwargs)
    assert caught.value.setting == flag


def test_aliases_are_unique_in_a_node_across_generations() -> None:
    devices = 7
    seen = {alias_of(g, devices, p, k) for g in range(3) for p in range(devices) for k in range(6)}
    rebirth = {alias_of(g, devices, 0, 0) - 1 for g in range(3)}
    assert len(seen) == 3 * devices * 6 and not seen & rebirth and min(seen | rebirth) >= 1


def test_connect_with_a_will_and_subscribe_packets() -> None:
    packet = wire.connect_packet("n1", keepalive=30, will=("spBv1.0/g/NDEATH/n1", b"\x01", 1))
    assert packet[9] == 0x02 | 0x04 | 0x08  # clean session, will, will QoS 1, not retained
    assert packet.endswith(wire.encode_string("spBv1.0/g/NDEATH/n1") + wire.encode_string(b"\x01"))
    assert wire.subscribe_packet(5, [("a/b", 1)]) == b"\x82\x08\x00\x05\x00\x03a/b\x01"
    assert wire.puback_packet(0x1234) == b"\x40\x02\x12\x34"


def test_births_data_and_deaths_of_a_node() -> None:
    node = nodes(config(devices=2, group_id="g"))[0]
    conn = FakeConnection()
    node._bdseq = 4
    node._births(cast(Connection, conn))
    (nb_topic, nb), *dbirths = conn.publishes()
    assert nb_topic == "spBv1.0/g/NBIRTH/node-0001" and nb.seq == 0
    assert [(m.name, m.long_value) for m in nb.metrics if m.name == "bdSeq"] == [("bdSeq", 4)]
    assert [(m.name, m.datatype, m.alias) for m in nb.metrics][1] == (REBIRTH, DataType.Boolean, 1)
    assert [t for t, _ in dbirths] == [
        "spBv1.0/g/DBIRTH/node-0001/dev-00001",
        "spBv1.0/g/DBIRTH/node-0001/dev-00002",
    ]
    second = dbirths[1][1]
    assert second.seq == 2
    assert [(m.name, m.alias, m.datatype, m.is_null) for m in second.metrics] == [
        (name, alias_of(0, 2, 1, k), datatype, True)
        for k, (name, datatype, _unit) in enumerate(DEVICE_METRICS)
    ]
    units = {m.name: list(m.properties.values) for m in second.metrics if m.properties.keys}
    assert {k: v[0].string_value for k, v in units.items()} == {
        "temperature": "°C",
        "humidity": "%",
        "rssi": "dBm",
    }
    assert len(conn.inflight) == 3  # QoS 1: each is acknowledged like the data

    device = node._devices[1]
    payload, samples, bad, _dup, _late = node._message(device, 1_800_000_000_000.0)
    data = Payload.FromString(payload)
    assert (samples, bad, data.seq, data.timestamp) == (1, None, 3, 1_800_000_000_000)
    values = {m.alias: m for m in data.metrics}
    assert not any(m.name for m in data.metrics)  # by alias only
    assert values[alias_of(0, 2, 1, 0)].long_value == 1  # seq
    rssi = values[alias_of(0, 2, 1, 4)].int_value
    assert -120 <= rssi - (1 << 32) <= -30  # Int32 as two's complement
    assert values[alias_of(0, 2, 1, 5)].string_value == device.signals.fw

    node._deaths(cast(Connection, conn))
    deaths = conn.publishes()
    assert [t for t, _ in deaths] == [
        "spBv1.0/g/DDEATH/node-0001/dev-00001",
        "spBv1.0/g/DDEATH/node-0001/dev-00002",
        "spBv1.0/g/NDEATH/node-0001",
    ]
    assert [m.long_value for m in deaths[2][1].metrics] == [4]


def test_data_before_birth_until_a_rebirth_request() -> None:
    node = nodes(config(devices=2, bad_ratio=1.0))[0]
    conn = FakeConnection()
    node._conn = cast(Connection, conn)
    node._bdseq = 0
    node._births(cast(Connection, conn))
    conn.publishes()
    device = node._devices[0]
    payload, samples, bad, _dup, _late = node._message(device, 1_800_000_000_000.0)
    data = Payload.FromString(payload)
    assert (samples, bad, device.seq, device.bad) == (0, "before_birth", 0, 1)
    # The next generation's aliases, no seq metric (it takes no sequence number).
    assert {m.alias for m in data.metrics} == {alias_of(1, 2, 0, k) for k in range(1, 6)}
    request = Payload(timestamp=1)
    request.metrics.add(name=REBIRTH, datatype=DataType.Boolean, boolean_value=True)
    node._on_command("spBv1.0/sim/NCMD/node-0001", request.SerializeToString())
    births = conn.publishes()
    assert len(births) == 3 and node.counts["rebirth_requests"] == 1
    assert births[1][1].metrics[0].alias == alias_of(1, 2, 0, 0)  # declares the new aliases
    node._bad_ratio = 0.0
    _payload, samples, bad, *_ = node._message(device, 1_800_000_000_100.0)
    assert (samples, bad, device.seq) == (1, None, 1)
    node._on_command("spBv1.0/sim/NCMD/node-0001", b"\xff not protobuf")
    assert node.counts["commands_ignored"] == 1 and not conn.publishes()


def test_a_rebirth_request_after_the_deaths_is_not_answered() -> None:
    node = nodes(config(devices=1))[0]
    conn = FakeConnection()
    node._conn = cast(Connection, conn)
    node._bdseq = 0
    node._deaths(cast(Connection, conn))
    conn.publishes()
    request = Payload(timestamp=1)
    request.metrics.add(name=REBIRTH, datatype=DataType.Boolean, boolean_value=True)
    node._on_command("spBv1.0/sim/NCMD/node-0001", request.SerializeToString())
    assert not conn.publishes()
    assert (node.counts["rebirth_requests"], node.counts["commands_ignored"]) == (0, 1)


def test_report_lists_nodes_and_counts_their_births() -> None:
    cfg = config(devices=3, devices_per_node=2)
    stats = Stats()
    devices, publishers = _fleet(cfg, 0, stats)
    stats.nodes["sim/node-0001"][:] = [2, 2, 0]
    stats.nodes["sim/node-0002"][:] = [1, 0, 1]
    stats.sparkplug["births"] = 3
    stats.samples = 10
    result = ProcessResult(failures={})
    _fill(cfg, result, stats, devices, keep_devices=True)
    report = build_report(cfg, [result], started=0.0, stopped=None, nominal=2.0, scheduled=6)
    data = report.to_json()
    assert data["samples"] == 12  # the devices' 10 and the 2 NBIRTHs acknowledged
    assert data["per_device"]["sim/node-0002"] == {
        "messages": 1,
        "published": 0,
        "failed": 1,
        "bad": 0,
        "duplicates": 0,
        "late": 0,
    }
    assert "sim/node-0001/dev-00001" in data["per_device"]
    assert data["faults"]["bad_kinds"] == {"before_birth": 0}
    assert data["sparkplug"]["group_id"] == "sim" and data["sparkplug"]["nodes"] == 2
    assert "sparkplug group sim, 2 edge node(s): NBIRTH 3" in report.to_text()
    assert all(isinstance(p, Publisher) for p in publishers)


def test_a_json_report_has_no_sparkplug_section() -> None:
    cfg = SimulatorConfig(mqtt_url=URL, seed=1, count=1)
    report = build_report(
        cfg, [ProcessResult(failures={})], started=0, stopped=None, nominal=1, scheduled=10
    )
    assert "sparkplug" not in report.to_json()


def test_nodes_are_built_inside_a_loop() -> None:
    # Publishers take the running loop's time only when run; building them needs none.
    async def build() -> int:
        return len(nodes(config(devices=4, devices_per_node=2)))

    assert asyncio.run(build()) == 2
