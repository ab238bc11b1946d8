"""``--format sparkplug``: the fleet as Sparkplug B 3.0 edge nodes.

Devices are grouped under edge nodes, ``--devices-per-node`` K to a node (the last one may have
fewer): node ``j`` (``node-0001``, ...) holds the devices ``j*K .. j*K+K-1`` of the fleet, all
in the group ``--group-id`` (``sim``). A node is one MQTT connection, since its NDEATH is that
connection's will: ``--connections`` is the number of nodes, and the nodes, not the devices, are
spread over ``--processes``. The daemon names a device ``<group>/<node>/<device>``
(``sim/node-0001/dev-00001``), and so does the report.

On every connection (the first and each reconnect) a node:

1. connects with its will, ``spBv1.0/<group>/NDEATH/<node>`` holding its ``bdSeq`` (QoS 1, not
   retained), ``bdSeq`` counting connections from 0 (mod 256); the will has no timestamp
   (written at connect time, it would predate the births: the daemon uses its receive time);
2. subscribes to ``spBv1.0/<group>/NCMD/<node>``;
3. publishes its NBIRTH (``seq`` 0, the metrics ``bdSeq`` and ``Node Control/Rebirth``) and
   one DBIRTH per device, declaring each metric's name, alias and datatype, and a unit
   (property ``engUnit``) on ``temperature``, ``humidity`` and ``rssi``.

Then each scheduled message of a device is one DDATA, by alias, with the readings of the JSON
format (``seq``, ``temperature``, ``humidity``, ``battery``, ``rssi``, the string ``fw``) at
the sample's timestamp. ``seq`` of the payload counts the node's messages 0..255 from its
NBIRTH. An NCMD whose ``Node Control/Rebirth`` is true is answered with the births again (same
``bdSeq``: the will cannot change without reconnecting). At the end every device publishes
its DDEATH and the node its NDEATH, then disconnects (a forced stop leaves the NDEATH to the
broker: the will); a Rebirth request after that is not answered. A node has no readings of
its own beyond its births: it sends no NDATA.

What births store: the DBIRTH metrics carry no value (``is_null``): the samples come from the
DDATA alone, so each device's rows reconcile with its ``seq`` exactly as in the JSON format.
The NBIRTH's ``bdSeq`` and ``Node Control/Rebirth`` are values of the node (device id
``<group>/<node>``), one sample per NBIRTH, each at a timestamp of its own: the report lists
the nodes in ``per_device`` with ``messages`` = their NBIRTHs, and counts those samples in
``samples`` (``sparkplug.births``).

Fault ``before_birth`` (``--bad-ratio``): the node renumbers its aliases (as when its metrics
change) and sends data by the new aliases before any birth declares them; it publishes the
births only when the host asks (an NCMD Rebirth) or it reconnects. Until then every message of
its devices is such a DDATA (without its ``seq`` metric: it takes no sequence number), counted
as bad, kind ``before_birth``: the daemon's dead letter ``unknown_alias``.

Unsupported with this format: ``--samples-per-message`` above 1 and ``--hostile-ratio``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any, Final

import orjson
from google.protobuf.message import DecodeError

from ingest.formats.sparkplug_schema import DataType, Payload
from simulators._config import MqttUrl, SimulatorConfig, node_name
from simulators._faults import SPARKPLUG_BAD_KINDS
from simulators._mqtt import Connection, publish_packet, topic_field
from simulators._payloads import Device, FaultRatios, Message
from simulators._publisher import Publisher, Stats
from simulators._schedule import Schedule
from simulators._signals import mix64

__all__ = [
    "BDSEQ",
    "DEVICE_METRICS",
    "NAMESPACE",
    "REBIRTH",
    "UNIT_PROPERTY",
    "SparkplugNode",
    "alias_of",
    "device_segment",
    "fleet",
    "node_name",
]

NAMESPACE: Final = "spBv1.0"
BDSEQ: Final = "bdSeq"
REBIRTH: Final = "Node Control/Rebirth"
#: The metric property holding a unit, as Ignition and Eclipse Tahu name it.
UNIT_PROPERTY: Final = "engUnit"
BEFORE_BIRTH: Final = SPARKPLUG_BAD_KINDS[0]

#: A device's metrics in alias order: (name, datatype, unit).
DEVICE_METRICS: Final = (
    ("seq", DataType.UInt64, None),
    ("temperature", DataType.Double, "°C"),
    ("humidity", DataType.Double, "%"),
    ("battery", DataType.Double, None),
    ("rssi", DataType.Int32, "dBm"),
    ("fw", DataType.String, None),
)
_METRICS: Final = len(DEVICE_METRICS)
#: The report's counters of messages outside the schedule.
COUNTERS: Final = (
    "births",
    "control_published",
    "control_failed",
    "device_births",
    "deaths",
    "rebirth_requests",
    "commands_ignored",
)


def device_segment(device_id: str) -> str:
    """The last topic level of a device named ``<group>/<node>/<device>``."""
    return device_id.rsplit("/", 1)[-1]


def alias_of(generation: int, devices: int, position: int, metric: int) -> int:
    """The alias of metric ``metric`` of the device at ``position`` in a node of ``devices``,
    in alias table ``generation`` (0 first; each ``before_birth`` fault starts a new one).
    Alias ``generation * stride + 1`` is the node's Rebirth control; aliases are unique in the
    node, as Sparkplug requires."""
    stride = 1 + devices * _METRICS
    return generation * stride + 2 + position * _METRICS + metric


def _value(metric: Any, datatype: int, value: Any) -> None:
    if datatype == DataType.Double:
        metric.double_value = value
    elif datatype == DataType.String:
        metric.string_value = value
    elif datatype == DataType.UInt64:
        metric.long_value = value
    else:  # Int32: two's complement in the uint32 field, as Sparkplug encodes signed types
        metric.int_value = value & 0xFFFFFFFF


class SparkplugNode(Publisher):
    """One edge node: its devices' messages as DDATA, births and deaths, Rebirth answered."""

    def __init__(
        self,
        *,
        group: str,
        node: int,
        url: MqttUrl,
        devices: Sequence[Device],
        schedule: Schedule,
        qos: int,
        stats: Stats,
        seed: int,
        bad_ratio: float = 0.0,
        keepalive: int = 30,
        inflight_window: int = 1000,
        ack_timeout: float = 10.0,
    ) -> None:
        self.node_id = node_name(node)
        prefix = f"{NAMESPACE}/{group}"
        self.node_device = f"{group}/{self.node_id}"
        super().__init__(
            name=self.node_id,
            url=url,
            devices=devices,
            schedule=schedule,
            qos=qos,
            stats=stats,
            keepalive=keepalive,
            inflight_window=inflight_window,
            ack_timeout=ack_timeout,
        )
        self._topics = {
            kind: f"{prefix}/{kind}/{self.node_id}" for kind in ("NBIRTH", "NDEATH", "NCMD")
        }
        self._device_topics = [
            {
                kind: topic_field(f"{prefix}/{kind}/{self.node_id}/{device_segment(d.device_id)}")
                for kind in ("DBIRTH", "DDEATH")
            }
            for d in self._devices
        ]
        self._position = {id(d): i for i, d in enumerate(self._devices)}
        self._bad_ratio = bad_ratio
        self._draw = random.Random(mix64((seed << 20) ^ node)).random
        self._bdseq = -1
        self._seq = 0
        self._generation = 0
        self._born = False
        self._dead = False  # its deaths are sent: the run is over
        self._last_ts = 0
        self._templates: dict[int, tuple[int, Any, list[Any]]] = {}
        self.counts = dict.fromkeys(COUNTERS, 0)
        stats.sparkplug = stats.sparkplug or dict.fromkeys(COUNTERS, 0)
        self._births_sent = stats.nodes.setdefault(self.node_device, [0, 0, 0])

    # -- the connection: will, NCMD, births ---------------------------------------------------

    async def _open(self, within: float) -> Connection:
        # The next connection's number; an attempt that fails leaves it for the next one.
        bdseq = (self._bdseq + 1) % 256
        death = Payload()
        death.metrics.add(name=BDSEQ, datatype=DataType.Int64, long_value=bdseq)
        conn = await Connection.open(
            self._url,
            client_id=self._client_id,
            keepalive=self._keepalive,
            within=within,
            on_ack=self._on_ack,
            on_event=self._on_event,
            will=(self._topics["NDEATH"], death.SerializeToString(), 1),
            subscribe=[(self._topics["NCMD"], 1)],
            on_publish=self._on_command,
        )
        self._bdseq = bdseq
        self._births(conn)
        return conn

    def _on_command(self, topic: str, payload: bytes) -> None:
        """An NCMD: ``Node Control/Rebirth`` true is answered with the births; anything else
        is counted and left (the simulated node has nothing else to control)."""
        try:
            metrics = Payload.FromString(payload).metrics
        except DecodeError:
            metrics = []
        rebirth_alias = self._generation * (1 + len(self._devices) * _METRICS) + 1
        for m in metrics:
            if (m.name == REBIRTH or (not m.name and m.alias == rebirth_alias)) and (
                m.WhichOneof("value") == "boolean_value" and m.boolean_value
            ):
                conn = self._conn
                if conn is not None and conn.is_open and not self._dead:
                    self._tally("rebirth_requests")
                    self._births(conn)
                    return
                break  # after its deaths a node stays dead: births now would revive it
        self._tally("commands_ignored")

    def _births(self, conn: Connection) -> None:
        """NBIRTH and a DBIRTH per device, in one write, ahead of any data of this
        connection (or of this rebirth)."""
        self._seq = 0
        generation = self._generation
        nbirth = Payload(timestamp=self._timestamp(), seq=0)
        nbirth.metrics.add(name=BDSEQ, datatype=DataType.Int64, long_value=self._bdseq)
        nbirth.metrics.add(
            name=REBIRTH,
            alias=alias_of(generation, len(self._devices), 0, 0) - 1,
            datatype=DataType.Boolean,
            boolean_value=False,
        )
        packets = [self._control(conn, topic_field(self._topics["NBIRTH"]), nbirth, nbirth=True)]
        now = nbirth.timestamp
        for position, topics in enumerate(self._device_topics):
            dbirth = Payload(timestamp=now, seq=self._next_seq())
            for k, (name, datatype, unit) in enumerate(DEVICE_METRICS):
                m = dbirth.metrics.add(
                    name=name,
                    alias=alias_of(generation, len(self._devices), position, k),
                    datatype=datatype,
                    is_null=True,
                )
                if unit is not None:
                    m.properties.keys.append(UNIT_PROPERTY)
                    m.properties.values.add(type=DataType.String, string_value=unit)
            packets.append(self._control(conn, topics["DBIRTH"], dbirth))
        conn.write(b"".join(packets))
        self._born = True
        self._tally("births")
        self._tally("device_births", len(self._device_topics))

    def _control(
        self, conn: Connection, topic: bytes, payload: Any, *, nbirth: bool = False
    ) -> bytes:
        """A message outside the schedule, at the fleet's QoS (1: so that the broker keeps it
        for a daemon that is away, like the data)."""
        if nbirth:
            self._births_sent[0] += 1
        if self._qos == 1:
            mid = conn.next_mid()
            conn.inflight[mid] = (None, nbirth, 0)
            return publish_packet(topic, payload.SerializeToString(), mid)
        self._control_settled(nbirth, published=True)
        return publish_packet(topic, payload.SerializeToString())

    def _control_settled(self, flag: bool, *, published: bool) -> None:
        self._tally("control_published" if published else "control_failed")
        if flag:  # an NBIRTH: one sample of the node
            self._births_sent[1 if published else 2] += 1

    def _tally(self, what: str, n: int = 1) -> None:
        self.counts[what] += n
        self._stats.sparkplug[what] += n

    def _timestamp(self) -> int:
        """Epoch ms, never the same twice for this node: each NBIRTH is a sample of the node."""
        now = int(time.time() * 1000)
        self._last_ts = ts = now if now > self._last_ts else self._last_ts + 1
        return ts

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) % 256
        return self._seq

    # -- data ---------------------------------------------------------------------------------

    def _message(self, device: Device, wall_ms: float) -> Message:
        if self._born and self._bad_ratio and self._draw() < self._bad_ratio:
            self._born = False
            self._generation += 1
        if not self._born:
            return self._before_birth(device, int(wall_ms))
        payload, samples, bad, duplicate, late = device.next_message(wall_ms)
        sample = orjson.loads(payload)
        data, metrics = self._data_template(device)
        data.timestamp = ts = sample["ts"]
        data.seq = self._next_seq()
        for m, (name, datatype, _unit) in zip(metrics, DEVICE_METRICS, strict=True):
            m.timestamp = ts
            _value(m, datatype, sample[name])
        return data.SerializeToString(), samples, bad, duplicate, late

    def _data_template(self, device: Device) -> tuple[Any, list[Any]]:
        """The device's DDATA of the current alias table, values filled in per message:
        building a protobuf message metric by metric costs ten times more than setting the
        values of one kept (42 against 3 us for six metrics)."""
        key = id(device)
        cached = self._templates.get(key)
        if cached is None or cached[0] != self._generation:
            data = Payload()
            position = self._position[key]
            for k, (_name, datatype, _unit) in enumerate(DEVICE_METRICS):
                data.metrics.add(
                    alias=alias_of(self._generation, len(self._devices), position, k),
                    datatype=datatype,
                )
            cached = self._templates[key] = (self._generation, data, list(data.metrics))
        return cached[1], cached[2]

    def _before_birth(self, device: Device, now: int) -> Message:
        """DDATA by aliases no birth has declared (the readings but ``seq``: it takes none)."""
        device.messages += 1
        device.bad += 1
        device.kinds[BEFORE_BIRTH] = device.kinds.get(BEFORE_BIRTH, 0) + 1
        t, h, b, r = device.signals.peek(now)
        data = Payload(timestamp=now, seq=self._next_seq())
        position = self._position[id(device)]
        for k, value in enumerate((t, h, b, r, device.signals.fw), start=1):
            datatype = DEVICE_METRICS[k][1]
            m = data.metrics.add(
                alias=alias_of(self._generation, len(self._devices), position, k),
                timestamp=now,
                datatype=datatype,
            )
            _value(m, datatype, value)
        return data.SerializeToString(), 0, BEFORE_BIRTH, False, 0

    # -- the end: deaths ----------------------------------------------------------------------

    async def _drain(self) -> float:
        conn = self._conn
        if not self._forced and conn is not None and conn.is_open:
            self._deaths(conn)
        return await super()._drain()

    def _deaths(self, conn: Connection) -> None:
        """A DDEATH per device, then the NDEATH the will would have been (same ``bdSeq``)."""
        self._dead = True
        now = self._timestamp()
        packets = []
        for topics in self._device_topics:
            packets.append(
                self._control(conn, topics["DDEATH"], Payload(timestamp=now, seq=self._next_seq()))
            )
        ndeath = Payload(timestamp=now)
        ndeath.metrics.add(name=BDSEQ, datatype=DataType.Int64, long_value=self._bdseq)
        packets.append(self._control(conn, topic_field(self._topics["NDEATH"]), ndeath))
        conn.write(b"".join(packets))
        self._tally("deaths")


def fleet(
    config: SimulatorConfig, part: int, stats: Stats, schedule: Schedule
) -> tuple[list[Device], list[Publisher]]:
    """Process ``part``'s edge nodes (every ``processes``-th) and their devices."""
    k = config.devices_per_node
    faults = FaultRatios(duplicate=config.duplicate_ratio, late=config.late_ratio)
    devices: list[Device] = []
    nodes: list[Publisher] = []
    for node in range(part, config.nodes, config.processes):
        own = [
            Device(
                i,
                seed=config.seed_value,
                topic_template=f"{NAMESPACE}/{config.group_id}/DDATA/{node_name(node)}/"
                + device_segment(config.device_name(i)),
                name=config.device_name(i),
                rate=config.rate,
                faults=faults,
            )
            for i in range(node * k, min(config.devices, (node + 1) * k))
        ]
        devices += own
        nodes.append(
            SparkplugNode(
                group=config.group_id,
                node=node,
                url=config.broker,
                devices=own,
                schedule=schedule,
                qos=config.qos,
                stats=stats,
                seed=config.seed_value,
                bad_ratio=config.bad_ratio,
                keepalive=config.keepalive,
                inflight_window=config.inflight_window,
                ack_timeout=config.ack_timeout,
            )
        )
    return devices, nodes
