"""The ``sparkplug`` format: Sparkplug B 3.0 (protobuf) on
``spBv1.0/<group>/<type>/<edge_node>[/<device>]`` (docs/design.md, "Routes and payload
formats", "Sparkplug B").

Route: ``topic = "spBv1.0/#"`` (every group) or ``"spBv1.0/<group>/#"``; no other shape.

Devices: the metrics of an edge node (NBIRTH, NDATA) belong to the device ``<group>/<edge_node>``,
those of one of its devices (DBIRTH, DDATA) to ``<group>/<edge_node>/<device>``. The name rules
apply to those ids and to metric names as for every format. A route's static ``tags`` go to
every device a message speaks of.

Messages:

- NBIRTH / DBIRTH declare the metrics: name, alias (optional), datatype, unit (a metric
  property ``engUnit``, as Ignition sends it, or ``engUnits`` / ``unit`` / ``units``). Their
  values are readings like any other, and the device goes ``online`` (``devices.status``).
  An NBIRTH starts a new session of the node: the node's alias table and those of all its
  devices are replaced, and its ``bdSeq`` metric is remembered.
- NDATA / DDATA carry values by alias (or by name); a metric without a datatype takes the one
  its birth declared.
- NDEATH marks the node and every device of it we know ``offline``; DDEATH the device. An
  NDEATH whose ``bdSeq`` is not the one of the node's last NBIRTH is the death of an earlier
  session (a will the broker sent late): it changes nothing, is acknowledged, its metrics are
  counted as skipped, and ``ingest_sparkplug_stale_deaths`` counts it. It is not bad input, so
  not a dead letter. A death's time is its payload's timestamp unless that is not later than
  the birth of the session it ends (a will is written when its node connects, before the
  birth): then the receive time, so the ``offline`` outranks the ``online``.
- NCMD, DCMD and STATE are not ingested (not subscribed; ``bad_sparkplug`` if a route gets them).

Values: Int8..Int64 and UInt8..UInt64 (from ``int_value`` or ``long_value``, signed ones
read as two's complement of their width), Float and Double are readings; Boolean a reading of
0/1; String, Text and UUID text readings (within ``max_text_bytes``); DateTime a text reading,
its time in RFC 3339 UTC with milliseconds (a time is no quantity: a number would be averaged
into the rollups). DataSet, Bytes, File, Template, the property and array types, a
null (``is_null``), a metric without a value, a non-finite float: skipped and counted. A value
field that does not fit its datatype (a String sent as ``double_value``) is ``bad_sparkplug``.

Times: a metric's ``timestamp`` (ms since the epoch), else the payload's, else the receive
time; each in the limits' window (``ts_out_of_range``). Two readings of one name at one time in
one message are ``duplicate_metric``.

Dead letters: ``bad_sparkplug`` (not a Sparkplug B protobuf payload, a topic of another shape,
a birth metric without a name or a datatype, an alias declared twice, a value that does not fit
its datatype); ``unknown_alias`` (data naming an alias no birth declared, or a name without a
datatype that no birth declared); and the reasons every format shares.

The alias state (``SparkplugState``) is the one mutable part: one per route per route table,
so one per worker process, kept across MQTT reconnects, bounded by
``INGEST_SPARKPLUG_MAX_ALIASES`` (declared metrics, plus one per node and device; past it whole
nodes are forgotten, the least recently born first, and counted). A lock guards it, since a
large payload is decoded in a worker thread. A birth's update carries its raw payload
(``DeviceUpdate.birth``): the writer stores it with its batch and the source decodes the
stored births again at start (``ingest.flow.births``), so a restart keeps the tables. Data
by an alias still unknown (a node never seen, an eviction) is ``unknown_alias``, and the
state records a Rebirth request for its edge node: an NCMD with the Boolean metric
``Node Control/Rebirth`` = true, which the source publishes (QoS 0), at most once per node per
``INGEST_SPARKPLUG_REBIRTH_INTERVAL`` seconds (0: never). The decoder stays pure from its
caller's view: same input and state, same result.

Several workers (a shared subscription): births are subscribed without the share group, so
every worker learns every alias table; data and deaths through the shared subscription, so
each is taken by one worker. A birth's readings are thus written by every worker: they
collapse on the key and are counted as duplicates. The filters name each message type
(``spBv1.0/<group>/NBIRTH/+``, ...), so none overlaps another: a broker delivers a message
once per matching subscription of a client, shared or not.

Not checked: the payload ``seq`` (0..255), the order of messages, Template definitions.
"""

from __future__ import annotations

import math
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from google.protobuf.message import DecodeError as ProtobufError

from ingest.errors import ConfigError, DecodeError
from ingest.formats.json import bad_name, show, text_fits
from ingest.formats.limits import Limits
from ingest.formats.routes import FormatTopics, Match, Route, Template
from ingest.formats.sparkplug_schema import DataType, Payload
from ingest.model import (
    NO_TEXTS,
    Decoded,
    DeviceUpdate,
    Reading,
    SparkplugStatistics,
    TextReading,
    build,
    device_status,
)

if TYPE_CHECKING:
    from ingest.settings import Settings

__all__ = [
    "NAMESPACE",
    "REASONS",
    "REBIRTH_METRIC",
    "SparkplugState",
    "birth_topic",
    "decode_sparkplug",
    "rebirth_request",
    "sparkplug_options",
    "sparkplug_topics",
]

REASONS: Final = ("bad_sparkplug", "unknown_alias")
NAMESPACE: Final = "spBv1.0"
REBIRTH_METRIC: Final = "Node Control/Rebirth"
DEFAULT_MAX_ALIASES: Final = 100_000
DEFAULT_REBIRTH_INTERVAL: Final = 30.0

_NODE_TYPES: Final = frozenset({"NBIRTH", "NDATA", "NDEATH", "NCMD"})
_DEVICE_TYPES: Final = frozenset({"DBIRTH", "DDATA", "DDEATH", "DCMD"})
_BIRTHS: Final = frozenset({"NBIRTH", "DBIRTH"})
_UNIT_KEYS: Final = ("engunit", "engunits", "unit", "units")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
# Nodes remembered for the rebirth rate limit at most; past it requests are suppressed.
_MAX_ASKED: Final = 65536

# How each datatype's value is read: signed integers carry their width (two's complement).
_SIGNED: Final[dict[int, int]] = {
    DataType.Int8: 8,
    DataType.Int16: 16,
    DataType.Int32: 32,
    DataType.Int64: 64,
}
_UNSIGNED: Final[dict[int, int]] = {
    DataType.UInt8: 8,
    DataType.UInt16: 16,
    DataType.UInt32: 32,
    DataType.UInt64: 64,
}
_FLOATS: Final = frozenset({DataType.Float, DataType.Double})
_TEXTS: Final = frozenset({DataType.String, DataType.Text, DataType.UUID})
_INT_FIELDS: Final = frozenset({"int_value", "long_value"})
_NO_ALIASES: Final[dict[int, _Decl]] = {}
_isfinite = math.isfinite
_FLOAT_FIELDS: Final = frozenset({"float_value", "double_value"})


# --- topics -----------------------------------------------------------------------------------


def sparkplug_options(table: Mapping[str, Any], where: str) -> None:
    """The ``sparkplug`` format has no route options (its settings are global)."""
    if table:
        raise ConfigError(where, f"[routes.sparkplug] has no option {next(iter(table))!r}")


def sparkplug_topics(template: Template, where: str) -> FormatTopics:
    """The matcher and filters of a route ``spBv1.0/#`` or ``spBv1.0/<group>/#``: births
    unshared (every worker learns every alias table), data and deaths shared."""
    levels = template.text.split("/")
    if levels[0] != NAMESPACE or levels[-1] != "#" or len(levels) > 3:
        raise ConfigError(
            where, f"{template.text!r}: a sparkplug route's topic is {NAMESPACE}/# or"
            f" {NAMESPACE}/<group>/#",
        )  # fmt: skip
    group = levels[1] if len(levels) == 3 else "+"
    if group != "+" and "{" in group:
        raise ConfigError(where, f"{template.text!r}: the group is a name or +")
    head = f"{NAMESPACE}/{group}"
    filters = (
        (f"{head}/NBIRTH/+", False),
        (f"{head}/DBIRTH/+/+", False),
        (f"{head}/NDATA/+", True),
        (f"{head}/DDATA/+/+", True),
        (f"{head}/NDEATH/+", True),
        (f"{head}/DDEATH/+/+", True),
    )
    return FormatTopics(_matcher(None if group == "+" else group), filters)


def _matcher(group: str | None) -> Callable[[str], Match | None]:
    """Topics of the namespace (and group): ``Match(device id, message type, None)``, or
    ``Match(None, None, None)`` for a shape that is not Sparkplug's (``bad_sparkplug``)."""
    prefix = f"{NAMESPACE}/" if group is None else f"{NAMESPACE}/{group}/"

    def match(topic: str) -> Match | None:
        if not topic.startswith(prefix):
            return None
        parts = topic.split("/")
        n = len(parts)
        kind = parts[2] if n > 2 else ""
        shape = (n == 4 and kind in _NODE_TYPES) or (n == 5 and kind in _DEVICE_TYPES)
        if shape and all(parts):
            del parts[2]
            return build(Match, ("/".join(parts[1:]), kind, None))
        return build(Match, (None, None, None))

    return match


def birth_topic(device_id: str) -> str:
    """The topic of the birth of ``<group>/<edge_node>`` (NBIRTH) or of
    ``<group>/<edge_node>/<device>`` (DBIRTH)."""
    group, edge_node, *device = device_id.split("/")
    kind = "DBIRTH" if device else "NBIRTH"
    return "/".join((NAMESPACE, group, kind, edge_node, *device))


def rebirth_request(node_id: str, at_ms: int) -> tuple[str, bytes]:
    """The NCMD asking edge node ``<group>/<edge_node>`` to publish its births again."""
    group, edge_node = node_id.split("/")
    payload = Payload(timestamp=at_ms)
    payload.metrics.add(name=REBIRTH_METRIC, datatype=DataType.Boolean, boolean_value=True)
    return f"{NAMESPACE}/{group}/NCMD/{edge_node}", payload.SerializeToString()


# --- the alias state --------------------------------------------------------------------------


class _Decl(NamedTuple):
    """A metric a birth declared."""

    name: str
    datatype: int


class _Tables:
    """What one birth declared: alias -> metric, name -> datatype."""

    __slots__ = ("aliases", "names")

    def __init__(self, aliases: dict[int, _Decl], names: dict[str, int]) -> None:
        self.aliases = aliases
        self.names = names

    @property
    def size(self) -> int:
        return 1 + len(self.names)


class _Node:
    """One edge node's session: its tables, its devices' tables, its bdSeq and birth time."""

    __slots__ = ("bdseq", "born", "devices", "size", "tables")

    def __init__(self, tables: _Tables, bdseq: int | None, born: datetime | None) -> None:
        self.tables = tables
        self.bdseq = bdseq
        self.born = born
        self.devices: dict[str, _Tables] = {}
        self.size = tables.size


class SparkplugState:
    """The alias tables of one Sparkplug route, and the Rebirth requests waiting to be sent.

    Made with the route table (``FormatSpec.state``); ``decode_sparkplug`` reads and updates it
    under ``lock``; the source takes the requests (``take_requests``) and publishes them.
    """

    def __init__(
        self,
        *,
        max_aliases: int = DEFAULT_MAX_ALIASES,
        rebirth_interval: float = DEFAULT_REBIRTH_INTERVAL,
    ) -> None:
        self.lock = threading.Lock()
        self.max_aliases = max_aliases
        self.rebirth_interval = rebirth_interval
        self._nodes: OrderedDict[str, _Node] = OrderedDict()  # least recently born first
        self._size = 0
        self._asked: OrderedDict[str, float] = OrderedDict()  # node -> last request, oldest first
        self._pending: list[str] = []  # nodes to ask, in order
        self.nodes_evicted = 0
        self.stale_deaths = 0
        self.rebirths_sent = 0
        self.rebirths_suppressed = 0
        self.rebirths_failed = 0

    @classmethod
    def from_settings(cls, settings: Settings | None) -> SparkplugState:
        if settings is None:
            return cls()
        return cls(
            max_aliases=settings.sparkplug_max_aliases,
            rebirth_interval=settings.sparkplug_rebirth_interval,
        )

    def statistics(self) -> SparkplugStatistics:
        with self.lock:
            return SparkplugStatistics(
                len(self._nodes),
                self._size,
                self.nodes_evicted,
                self.stale_deaths,
                self.rebirths_sent,
                self.rebirths_suppressed,
                self.rebirths_failed,
            )

    # -- tables (called under the lock) --------------------------------------------------------

    def node(self, node_id: str) -> _Node | None:
        return self._nodes.get(node_id)

    def tables(self, node_id: str, device_id: str) -> _Tables | None:
        node = self._nodes.get(node_id)
        if node is None:
            return None
        return node.tables if device_id == node_id else node.devices.get(device_id)

    def node_born(
        self, node_id: str, tables: _Tables, bdseq: int | None, born: datetime | None
    ) -> None:
        """A new session: the node's tables replaced, its devices' forgotten."""
        self._forget(node_id)
        node = _Node(tables, bdseq, born)
        self._nodes[node_id] = node
        self._size += node.size
        self._fit(node_id)

    def device_born(self, node_id: str, device_id: str, tables: _Tables) -> None:
        node = self._nodes.get(node_id)
        if node is None:  # its NBIRTH came before we started: the device's tables still hold
            node = self._nodes[node_id] = _Node(_Tables({}, {}), None, None)
            self._size += node.size
        old = node.devices.pop(device_id, None)
        change = tables.size - (old.size if old is not None else 0)
        node.devices[device_id] = tables
        node.size += change
        self._size += change
        self._nodes.move_to_end(node_id)
        self._fit(node_id)

    def _forget(self, node_id: str) -> None:
        node = self._nodes.pop(node_id, None)
        if node is not None:
            self._size -= node.size

    def _fit(self, newest: str) -> None:
        """Forget whole nodes, least recently born first, until the tables fit; the node just
        born too when it alone is over the bound."""
        while self._size > self.max_aliases and self._nodes:
            node_id = next(iter(self._nodes))
            self._forget(node_id)
            self.nodes_evicted += 1
            if node_id == newest:
                break

    # -- rebirth requests ----------------------------------------------------------------------

    def ask_rebirth(self, node_id: str, now: float) -> None:
        """Record a Rebirth request for ``node_id`` (at most one per interval; ``now`` in
        seconds, the receive time of the message that needs it)."""
        if self.rebirth_interval <= 0:
            return
        asked = self._asked
        while asked:  # forget the requests older than the interval
            first, at = next(iter(asked.items()))
            if now - at < self.rebirth_interval and at <= now:
                break
            del asked[first]
        last = asked.get(node_id)
        if (last is not None and 0 <= now - last < self.rebirth_interval) or (
            last is None and len(asked) >= _MAX_ASKED
        ):
            self.rebirths_suppressed += 1
            return
        asked[node_id] = now
        asked.move_to_end(node_id)
        self._pending.append(node_id)

    def take_requests(self, now: float) -> list[tuple[str, bytes]]:
        """The NCMD messages waiting to be published (topic, payload), oldest first."""
        if not self._pending:  # read without the lock: a request seen late waits a turn
            return []
        with self.lock:
            pending, self._pending = self._pending, []
        return [rebirth_request(node_id, int(now * 1000)) for node_id in pending]

    def requests_sent(self, sent: int, failed: int) -> None:
        with self.lock:
            self.rebirths_sent += sent
            self.rebirths_failed += failed


# --- decoding ---------------------------------------------------------------------------------


class _Out:
    """What one message decodes to, built metric by metric."""

    __slots__ = ("aliases", "names", "readings", "seen", "skipped", "texts", "times", "units")

    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.texts: list[TextReading] = []
        self.units: dict[str, str] = {}
        self.skipped = 0
        self.aliases: dict[int, _Decl] = {}  # a birth's declarations
        self.names: dict[str, int] = {}
        self.seen: set[tuple[str, int]] = set()  # (name, ms): duplicate_metric
        self.times: dict[int, datetime] = {}  # ms -> checked time


def decode_sparkplug(
    match: Match, payload: bytes, received_at: datetime, route: Route, limits: Limits
) -> Decoded | DecodeError:
    """One Sparkplug B message (the dispatch checked the device id); see the module text."""
    device_id, kind = match.device_id, match.metric
    if device_id is None or kind is None:
        return DecodeError(
            "bad_sparkplug", f"topic is not {NAMESPACE}/<group>/<type>/<edge node>[/<device>]"
        )
    if kind not in _BIRTHS and kind not in ("NDATA", "DDATA", "NDEATH", "DDEATH"):
        return DecodeError("bad_sparkplug", f"{kind} messages are not ingested")
    try:
        message = Payload.FromString(payload)
    except ProtobufError as exc:
        return DecodeError("bad_sparkplug", f"not a Sparkplug B payload: {show(exc)}")
    if len(message.metrics) > limits.max_readings_per_message:
        return DecodeError(
            "too_many_readings",
            f"{len(message.metrics)} metrics in one message, at most"
            f" {limits.max_readings_per_message} allowed",
        )
    at = _message_time(message, received_at, limits)
    if isinstance(at, DecodeError):
        return at
    state: SparkplugState = route.state
    node_id = device_id if kind[0] == "N" else device_id.rpartition("/")[0]
    with state.lock:
        if kind in _BIRTHS:
            result = _birth(
                message, payload, kind, node_id, device_id, at, received_at, limits, state
            )
        elif kind in ("NDATA", "DDATA"):
            result = _data(message, node_id, device_id, at, received_at, limits, state)
        else:
            result = _death(message, kind, node_id, device_id, at, received_at, state)
    if route.tags is not None and type(result) is Decoded:
        return _tagged(result, device_id, route.tags)
    return result


def _tagged(result: Decoded, device_id: str, tags: Mapping[str, str]) -> Decoded:
    """The route's static tags on every device the message speaks of."""
    updates = [u._replace(tags=dict(tags)) for u in result.updates]
    if not any(u.device_id == device_id for u in updates):
        updates.append(DeviceUpdate(device_id, dict(tags)))
    return result._replace(updates=tuple(updates))


def _message_time(message: Any, received_at: datetime, limits: Limits) -> datetime | DecodeError:
    if not message.HasField("timestamp"):
        return received_at
    return _checked_time(message.timestamp, received_at, limits)


def _checked_time(ms: int, received_at: datetime, limits: Limits) -> datetime | DecodeError:
    try:
        at = _EPOCH + timedelta(milliseconds=ms)
    except OverflowError:
        return DecodeError("ts_out_of_range", f"timestamp {ms} ms is beyond the calendar")
    latest = limits.latest(received_at)
    if at < limits.min_ts:
        return DecodeError(
            "ts_out_of_range", f"ts {at.isoformat()} is before INGEST_MIN_TS {limits.min_ts}"
        )
    if at > latest:
        return DecodeError(
            "ts_out_of_range",
            f"ts {at.isoformat()} is after {latest.isoformat()} (INGEST_MAX_TS_AHEAD past its"
            " arrival)",
        )
    return at


def _birth(
    message: Any,
    payload: bytes,
    kind: str,
    node_id: str,
    device_id: str,
    at: datetime,
    received_at: datetime,
    limits: Limits,
    state: SparkplugState,
) -> Decoded | DecodeError:
    out = _Out()
    for metric in message.metrics:
        decl = _declare(metric, out)
        if isinstance(decl, DecodeError):
            return decl
        error = _store(metric, decl, device_id, at, received_at, limits, out)
        if error is not None:
            return error
    tables = _Tables(out.aliases, out.names)
    if kind == "NBIRTH":
        state.node_born(node_id, tables, _bdseq(message), at)
    else:
        state.device_born(node_id, device_id, tables)
    update = device_status(device_id, "online", at)._replace(units=out.units or None, birth=payload)
    return build(Decoded, (out.readings, out.skipped, _texts(out), (update,)))


def _declare(metric: Any, out: _Out) -> _Decl | DecodeError:
    """A birth's metric: its name, alias and datatype recorded in ``out``."""
    if not metric.HasField("name") or not metric.HasField("datatype"):
        what = "name" if not metric.HasField("name") else "datatype"
        return DecodeError("bad_sparkplug", f"a birth metric without a {what}")
    # Interned: a fleet's nodes declare the same names, held once however many nodes.
    name = sys.intern(metric.name)
    fault = bad_name(name)
    if fault is not None:
        return DecodeError("bad_metric", f"metric {show(name)}: {fault}")
    decl = build(_Decl, (name, metric.datatype))
    if metric.HasField("alias"):
        alias = metric.alias
        if alias in out.aliases and out.aliases[alias].name != name:
            return DecodeError("bad_sparkplug", f"alias {alias} declared twice in one birth")
        out.aliases[alias] = decl
    out.names[name] = decl.datatype
    return decl


def _bdseq(message: Any) -> int | None:
    for metric in message.metrics:
        if metric.name == "bdSeq":
            field = metric.WhichOneof("value")
            if field in _INT_FIELDS:
                return int(getattr(metric, field))
    return None


def _data(
    message: Any,
    node_id: str,
    device_id: str,
    at: datetime,
    received_at: datetime,
    limits: Limits,
    state: SparkplugState,
) -> Decoded | DecodeError:
    tables = state.tables(node_id, device_id)
    aliases = tables.aliases if tables is not None else _NO_ALIASES
    out = _Out()
    for metric in message.metrics:
        # The common case first: by an alias the birth declared (an unset alias reads 0).
        found = None if metric.HasField("name") else aliases.get(metric.alias)
        if found is None or (found is aliases.get(0) and not metric.HasField("alias")):
            resolved = _resolve(metric, tables)
            if isinstance(resolved, DecodeError):
                if resolved.reason == "unknown_alias":
                    state.ask_rebirth(node_id, received_at.timestamp())
                return resolved
            found = resolved
        error = _store(metric, found, device_id, at, received_at, limits, out)
        if error is not None:
            return error
    if not out.readings and not out.texts and not out.units:
        return DecodeError("no_readings", "no number, boolean or text in the message")
    updates = (DeviceUpdate(device_id, units=out.units),) if out.units else ()
    return build(Decoded, (out.readings, out.skipped, _texts(out), updates))


def _resolve(metric: Any, tables: _Tables | None) -> _Decl | DecodeError:
    """A data message's metric: by alias, or by name (its datatype its own or its birth's)."""
    if metric.HasField("name"):
        name = metric.name
        fault = bad_name(name)
        if fault is not None:
            return DecodeError("bad_metric", f"metric {show(name)}: {fault}")
        if metric.HasField("datatype"):
            return build(_Decl, (name, metric.datatype))
        datatype = tables.names.get(name) if tables is not None else None
        if datatype is None:
            return DecodeError(
                "unknown_alias", f"metric {show(name)} has no datatype and no birth declared it"
            )
        return build(_Decl, (name, datatype))
    if not metric.HasField("alias"):
        return DecodeError("bad_sparkplug", "a metric with neither name nor alias")
    decl = tables.aliases.get(metric.alias) if tables is not None else None
    if decl is None:
        return DecodeError("unknown_alias", f"alias {metric.alias} was declared by no birth")
    return decl


def _store(
    metric: Any,
    decl: _Decl,
    device_id: str,
    at: datetime,
    received_at: datetime,
    limits: Limits,
    out: _Out,
) -> DecodeError | None:
    """Append the metric's reading or text reading to ``out`` (or count it skipped)."""
    name = decl[0]
    if metric.HasField("properties"):
        unit = _unit(metric.properties)
        if unit is not None:
            out.units[name] = unit
    value = _value(metric, decl[1], limits)
    kind = type(value)
    if kind is not float and kind is not str:
        if value is None:
            out.skipped += 1
            return None
        assert isinstance(value, DecodeError)
        return DecodeError(value.reason, f"metric {show(name)}: {value.message}")
    ms = metric.timestamp  # 0 when unset (and 1970 is never in the window anyway)
    if ms or metric.HasField("timestamp"):
        ts = out.times.get(ms)
        if ts is None:
            found = _checked_time(ms, received_at, limits)
            if isinstance(found, DecodeError):
                return found
            ts = out.times[ms] = found
    else:
        ts, ms = at, -1
    key = (name, ms)
    seen = out.seen
    if key in seen:
        return DecodeError("duplicate_metric", f"metric {show(name)} twice at {ts}")
    seen.add(key)
    if kind is str:
        out.texts.append(build(TextReading, (device_id, name, ts, value)))
    else:
        out.readings.append(build(Reading, (device_id, name, ts, value)))
    return None


def _value(metric: Any, datatype: int, limits: Limits) -> float | str | DecodeError | None:
    """The metric's value as a float or a text, None when it is stored nowhere (counted)."""
    field = metric.WhichOneof("value")
    if field is None or metric.is_null:
        return None
    if datatype in _FLOATS:
        if field not in _FLOAT_FIELDS:
            return _mismatch(datatype, field)
        number = float(getattr(metric, field))
        return number if _isfinite(number) else None
    width = _SIGNED.get(datatype) or _UNSIGNED.get(datatype)
    if width is not None:
        if field not in _INT_FIELDS:
            return _mismatch(datatype, field)
        raw = int(getattr(metric, field)) & ((1 << width) - 1)
        if datatype in _SIGNED and raw >= 1 << (width - 1):
            raw -= 1 << width
        return float(raw)
    if datatype == DataType.Boolean:
        if field != "boolean_value":
            return _mismatch(datatype, field)
        return 1.0 if metric.boolean_value else 0.0
    if datatype in _TEXTS:
        if field != "string_value":
            return _mismatch(datatype, field)
        text: str = metric.string_value
        return text if text_fits(text, limits) else None
    if datatype == DataType.DateTime and field in _INT_FIELDS:
        return _datetime_text(int(getattr(metric, field)))
    return None  # DataSet, Bytes, File, Template, arrays, properties: stored nowhere


def _mismatch(datatype: int, field: str) -> DecodeError:
    return DecodeError("bad_sparkplug", f"datatype {_type_name(datatype)} sent as {field}")


def _type_name(datatype: int) -> str:
    try:
        return DataType(datatype).name
    except ValueError:
        return str(datatype)


def _datetime_text(ms: int) -> str | None:
    """A DateTime value (ms since the epoch) in RFC 3339 UTC; None beyond the calendar."""
    try:
        at = _EPOCH + timedelta(milliseconds=ms)
    except OverflowError:
        return None
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def _unit(properties: Any) -> str | None:
    """The unit among a metric's properties (``engUnit`` and the like), if a string."""
    for key, value in zip(properties.keys, properties.values, strict=False):
        if key.lower() in _UNIT_KEYS and value.WhichOneof("value") == "string_value":
            unit: str = value.string_value
            if unit and bad_name(unit) is None:
                return unit
    return None


def _texts(out: _Out) -> tuple[TextReading, ...]:
    # A tuple, as ingest.formats.json explains (the garbage collector untracks it).
    return tuple(out.texts) if out.texts else NO_TEXTS


def _death(
    message: Any,
    kind: str,
    node_id: str,
    device_id: str,
    at: datetime,
    received_at: datetime,
    state: SparkplugState,
) -> Decoded:
    """NDEATH: the node and its known devices offline, unless the bdSeq says the death is of
    an earlier session; DDEATH: the device offline. Their metrics are stored nowhere."""
    skipped = len(message.metrics)
    if kind == "DDEATH":
        return build(Decoded, ([], skipped, NO_TEXTS, (device_status(device_id, "offline", at),)))
    node = state.node(node_id)
    bdseq = _bdseq(message)
    if node is not None and node.bdseq is not None and bdseq is not None and bdseq != node.bdseq:
        state.stale_deaths += 1
        return build(Decoded, ([], skipped, NO_TEXTS, ()))
    devices = [node_id]
    if node is not None:
        if node.born is not None and at <= node.born:
            at = max(received_at, node.born + timedelta(milliseconds=1))
        devices.extend(node.devices)
    updates = tuple(device_status(d, "offline", at) for d in devices)
    return build(Decoded, ([], skipped, NO_TEXTS, updates))
