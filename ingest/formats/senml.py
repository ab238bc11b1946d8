"""The ``senml`` format: RFC 8428 Sensor Measurement Lists (SenML) packs, in JSON or in CBOR.

Contract: docs/design.md, "Routes and payload formats" and "Limits"; README, "SenML".
``decode_senml`` is pure and synchronous: no I/O, no logging; the dispatch
(``ingest.formats.decode``) found the route and checked the device id the topic gives, if any.

A pack is a JSON array of objects, or a CBOR array of maps keyed by the integer labels of RFC
8428 section 6 (``bver`` -1, ``bn`` -2, ``bt`` -3, ``bu`` -4, ``bv`` -5, ``bs`` -6, ``n`` 0,
``u`` 1, ``v`` 2, ``vs`` 3, ``vb`` 4, ``s`` 5, ``t`` 6, ``ut`` 7, ``vd`` 8; other CBOR labels
are strings). The first byte that is not white space tells the two apart: ``[`` is JSON,
0x80-0x9f (CBOR major type 4, an array) is CBOR.

Records are read in order. The base fields of a record apply to it and to the records after
it, until a later record changes them (RFC 8428 section 4.1), so a pack may speak of several
devices (``bn`` changing mid-pack). Each record gives at most one reading:

- device: the topic's ``{device_id}`` when the route's template has one; otherwise the base
  name ``bn`` without one trailing ``:`` or ``/`` (``urn:dev:ow:10e2073a01080063:`` ->
  ``urn:dev:ow:10e2073a01080063``). A record before any ``bn`` (or after an empty one), on a
  route whose topic names no device, names no device: ``bad_device_id``. On a route whose
  topic names the device, every record is that device's, whatever its ``bn``: a pack of
  several base names with one ``n`` at one time is then ``duplicate_metric``.
- metric: the record's name ``n``. A record without one is named by the base name alone
  (RFC 8428 section 4.5.1: the sensor's name is ``bn`` + ``n``), and that base name is its
  metric. Neither a name nor a base name: ``bad_metric``.
- time: ``bt`` + ``t``, seconds (either absent: 0). Below 2**28 it is relative to the receive
  time (RFC 8428 section 4.5.3: 0 is "now", -5 five seconds before); from 2**28 on, seconds
  since the epoch. Rounded to the microsecond. It must fall in the window ``[limits.min_ts,
  received_at + limits.max_ts_ahead]``, and a time beyond the calendar is out of it:
  ``ts_out_of_range``.
- value: ``v`` (plus ``bv``) a numeric reading; ``vb`` a reading of 1 or 0; ``vs`` a text
  reading. Skipped and counted (``Decoded.skipped``), stored nowhere: a ``vs`` over
  ``max_text_bytes`` or holding NUL; a ``v`` that is not finite (a CBOR NaN or infinity, a
  bignum or decimal fraction beyond a double, ``v`` + ``bv`` overflowing); ``vd`` (data);
  ``s`` (sum: RFC 8428 integrals have no column here); ``ut`` (update time); a field of an
  extension this decoder does not know (a JSON name or a CBOR text label).
- unit: ``u``, else ``bu``: the unit of the reading's series (``DeviceUpdate.units``, stored in
  ``series.unit``; the newest wins).

Route tags (topic levels, a route's static tags) go to every device the pack stores readings
of. The route's template must not have ``{metric}``: a pack names its metrics itself
(``bad_topic`` for every message of such a route).

A message is stored whole or not at all. Dead letters:

=================  ======================================================================
bad_senml          not a pack: the payload is not JSON or CBOR (bad UTF-8, truncated,
                   bytes after the CBOR array, a JSON number beyond a double), or not an
                   array; a record that is not an object (map); a field of the wrong type
                   (``n``/``u``/``bn``/``bu``/``vs`` not text, ``bt``/``t``/``v``/``bv``/``s``/
                   ``bs``/``ut`` not a finite number, ``vb`` not a boolean, ``vd`` not a
                   string (JSON) or byte string (CBOR), ``bver`` not a positive integer);
                   a base version above 10; two value fields in one record; a record with
                   a name, unit or time but neither a value nor a sum; an unknown CBOR
                   integer label; an unknown field whose name ends in ``_`` (RFC 8428
                   section 4.4: it must be understood); a unit over 128 characters or
                   holding a control character; a CBOR tag other than 2, 3 (bignums) and
                   4 (decimal fractions, RFC 8428 section 6); a map key given twice; CBOR
                   nested deeper than a pack can be
no_readings        an empty pack, or nothing storable in it
bad_device_id      a device id from ``bn`` over 128 characters or holding a control
                   character, or no device at all (above)
bad_metric         a metric empty (no ``n``, no ``bn``), over 128 characters or holding a
                   control character
duplicate_metric   one device's metric twice at one time in a pack (its key
                   ``(device_id, metric, ts)`` holds one value)
ts_out_of_range    a record's time outside the window, or beyond the calendar
too_many_readings  more records than ``max_readings_per_message``
bad_topic          the route's template has ``{metric}``
=================  ======================================================================

RFC 8428 section 4.5.1 restricts the characters of names; this decoder does not: it holds
them to the project's name rules (non-empty, at most 128 characters, no control character),
as for every format. A JSON key repeated in one object is not detected (the parser keeps
the last one); a CBOR map key repeated is ``bad_senml``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from io import BytesIO
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

import cbor2
import orjson

from ingest.errors import ConfigError, DecodeError
from ingest.formats.json import bad_name, show, text_fits
from ingest.formats.limits import Limits
from ingest.model import NO_TEXTS, NO_UPDATES, Decoded, DeviceUpdate, Reading, TextReading, build

if TYPE_CHECKING:
    from ingest.formats.routes import Match, Route

__all__ = ["CBOR_LABELS", "RELATIVE_BELOW", "VERSION", "decode_senml", "senml_options"]

#: The base version (``bver``) of RFC 8428; a pack of a newer one must not be used (section 4.4).
VERSION: Final = 10
#: A resolved time below this is relative to the receive time (RFC 8428 section 4.5.3).
RELATIVE_BELOW: Final = 2**28
#: RFC 8428 section 6, Table 4: the CBOR label of every field.
CBOR_LABELS: Final = MappingProxyType(
    {"bver": -1, "bn": -2, "bt": -3, "bu": -4, "bv": -5, "bs": -6, "n": 0, "u": 1, "v": 2,
     "vs": 3, "vb": 4, "s": 5, "t": 6, "ut": 7, "vd": 8}
)  # fmt: skip

# How many checked metric names a route remembers (Route.checked_names), as ingest.formats.json.
_NAMES_MAX: Final = 4096
# A pack is an array of maps; a decimal fraction or a bignum inside adds a level or two.
_CBOR_MAX_DEPTH: Final = 8
_WHITE_SPACE: Final = b" \t\r\n"
_fromtimestamp = datetime.fromtimestamp


@dataclass(frozen=True, slots=True)
class _Labels:
    """One representation's labels: ``roles`` maps each label to its JSON name."""

    roles: Mapping[Any, str]
    #: The labels of the common record (``n``, ``u``, ``v``, ``t``): read without a loop.
    common: frozenset[Any]
    n: Any
    u: Any
    v: Any
    t: Any
    #: What ``vd`` holds: base64url text in JSON, a byte string in CBOR.
    data: type
    record: str


def _labels(roles: Mapping[Any, str], data: type, record: str) -> _Labels:
    label = {name: key for key, name in roles.items()}
    common = frozenset(label[name] for name in ("n", "u", "v", "t"))
    return _Labels(
        MappingProxyType(dict(roles)), common, label["n"], label["u"], label["v"], label["t"],
        data, record,
    )  # fmt: skip


_JSON: Final = _labels({name: name for name in CBOR_LABELS}, str, "an object")
_CBOR: Final = _labels({key: name for name, key in CBOR_LABELS.items()}, bytes, "a map")

_BASE_FIELDS: Final = frozenset({"bn", "bt", "bu", "bv", "bs", "bver"})
# The types of a t equal to the one before that may take that one's time (not True for 1).
_PLAIN_TIMES: Final = frozenset({type(None), float, int})
_VALUE_FIELDS: Final = frozenset({"v", "vs", "vb", "vd"})


def senml_options(table: Mapping[str, Any], where: str) -> None:
    """The ``senml`` format has no options: an option given is a configuration error."""
    if table:
        raise ConfigError(where, f"[routes.senml] has no option {next(iter(table))!r}")


def decode_senml(
    match: Match, payload: bytes, received_at: datetime, route: Route, limits: Limits
) -> Decoded | DecodeError:
    """The readings, text readings and device updates (units, route tags) of one pack."""
    if match.metric is not None:
        return DecodeError(
            "bad_topic", f"route {route.name}: a SenML pack names its metrics, so its template"
            " must not have {metric}",
        )  # fmt: skip
    loaded = _load(payload)
    if isinstance(loaded, DecodeError):
        return loaded
    records, labels = loaded
    if not records:
        return DecodeError("no_readings", "empty pack")
    cap = limits.max_readings_per_message
    if len(records) > cap:
        return DecodeError(
            "too_many_readings", f"{len(records)} records in one pack, at most {cap} allowed"
        )
    pack = _Pack(match.device_id, received_at, limits, route.checked_names)
    error = pack.read(records, labels)
    if error is not None:
        return error
    if not pack.readings and not pack.texts:
        return DecodeError("no_readings", "nothing to store: no v, vb or vs value in the pack")
    texts = tuple(pack.texts) if pack.texts else NO_TEXTS
    return build(
        Decoded, (pack.readings, pack.skipped, texts, pack.updates(route.device_tags(match)))
    )


# --- reading a pack -----------------------------------------------------------------------


class _Pack:
    """A pack as its records are read: the base fields in force, what to store, the skips."""

    __slots__ = (
        "_at",
        "_at_bt",
        "_at_raw",
        "_at_t",
        "base_name",
        "base_time",
        "base_unit",
        "base_value",
        "device",
        "devices",
        "latest",
        "limits",
        "names",
        "readings",
        "received_at",
        "seen",
        "skipped",
        "texts",
        "topic_device",
    )

    def __init__(
        self, device_id: str | None, received_at: datetime, limits: Limits, names: set[str]
    ) -> None:
        self.topic_device = device_id
        self.device = device_id  # the device of the records read now
        self.base_name = ""
        self.base_time = 0.0
        self.base_unit: str | None = None
        self.base_value = 0.0
        self.readings: list[Reading] = []
        self.texts: list[TextReading] = []
        #: Every device something is stored of, with the units of its metrics.
        self.devices: dict[str, dict[str, str]] = {}
        self.seen: set[tuple[str, str, datetime]] = set()
        self.skipped = 0
        self.received_at = received_at
        self.limits = limits
        self.latest = limits.latest(received_at)
        self.names = names
        # The last time resolved (``_at``), from ``bt`` + ``t`` (``_at_bt``, ``_at_t``) =
        # ``_at_raw``: the records of one sample share it.
        self._at_raw = 0.0
        self._at_bt = 0.0
        self._at_t: Any = None
        self._at = received_at

    def read(self, records: list[Any], labels: _Labels) -> DecodeError | None:
        """Every record in order; the first that is wrong ends the pack's reading."""
        common = labels.common
        v_label = labels.v
        kind: str | None
        for i, record in enumerate(records):
            if type(record) is not dict:
                return _bad(i, f"{_kind(record)}, not {labels.record}")
            if common.issuperset(record):  # the common record: n, v, maybe u and t
                kind, value = "v", record.get(v_label, _ABSENT)
                if value is _ABSENT:
                    if not record:
                        continue  # an empty record holds nothing, and needs nothing
                    return _bad(i, "no value (v, vs, vb or vd) and no sum (s)")
            else:
                found = self._fields(i, record, labels)
                if isinstance(found, DecodeError):
                    return found
                kind, value = found
                if kind is None:
                    continue
            error = self._store(i, record, labels, kind, value)
            if error is not None:
                return error
        return None

    def _fields(
        self, i: int, record: dict[Any, Any], labels: _Labels
    ) -> tuple[str | None, Any] | DecodeError:
        """A record beyond the common one: base fields, other values, sums, extensions.
        Returns the value to store (its field's name and the value), or ``(None, None)``."""
        kind: str | None = None
        value: Any = None
        regular = summed = False  # n, u, t or ut seen; s seen
        roles = labels.roles
        for label, field in record.items():
            role = roles.get(label)
            if role is None:
                error = self._extension(i, label)
            elif role in _BASE_FIELDS:
                error = self._base(i, role, field)
            elif role in _VALUE_FIELDS:
                if kind is not None:
                    return _bad(i, f"two values, {kind} and {role}")
                kind, value = role, field
                continue
            elif role == "s" or role == "ut":
                if _finite(field) is None:
                    return _not_number(i, role, field)
                self.skipped += 1  # sums and update times: stored nowhere
                summed |= role == "s"
                regular |= role == "ut"
                continue
            else:
                regular = True  # n, u, t: read by _store
                continue
            if error is not None:
                return error
        if kind is None:
            if regular and not summed:
                return _bad(i, "no value (v, vs, vb or vd) and no sum (s)")
            return None, None
        return self._value(i, labels, kind, value)

    def _value(
        self, i: int, labels: _Labels, kind: str, value: Any
    ) -> tuple[str | None, Any] | DecodeError:
        """A value field other than ``v`` checked: ``vd`` is counted and stored nowhere."""
        if kind == "vb":
            if type(value) is not bool:
                return _bad(i, f"vb is {_kind(value)}, not a boolean")
        elif kind == "vs":
            if type(value) is not str:
                return _bad(i, f"vs is {_kind(value)}, not text")
        elif kind == "vd":
            if type(value) is not labels.data:
                want = "a string" if labels.data is str else "a byte string"
                return _bad(i, f"vd is {_kind(value)}, not {want}")
            self.skipped += 1
            return None, None
        return kind, value

    def _extension(self, i: int, label: Any) -> DecodeError | None:
        """A field of an extension: skipped and counted, unless it must be understood."""
        if type(label) is not str:
            return _bad(i, f"label {_show_label(label)} is not a SenML label")
        if label.endswith("_"):
            return _bad(
                i, f"field {show(label)} must be understood (RFC 8428 section 4.4), and this"
                " decoder does not know it",
            )  # fmt: skip
        self.skipped += 1
        return None

    def _base(self, i: int, role: str, field: Any) -> DecodeError | None:
        if role == "bn":
            if type(field) is not str:
                return _bad(i, f"bn is {_kind(field)}, not text")
            return self._base_name(i, field)
        if role == "bu":
            unit = _unit(i, "bu", field)
            if isinstance(unit, DecodeError):
                return unit
            self.base_unit = unit or None
            return None
        if role == "bver":
            if type(field) is not int or field < 1:
                return _bad(i, f"bver is {_show_label(field)}, not a positive integer")
            if field > VERSION:
                return _bad(
                    i, f"base version {_show_label(field)} is newer than {VERSION}, the one read"
                    " here",
                )  # fmt: skip
            return None
        number = _finite(field)
        if number is None:
            return _not_number(i, role, field)
        if role == "bt":
            self.base_time = number
        elif role == "bv":
            self.base_value = number
        return None  # bs: sums are not stored

    def _base_name(self, i: int, name: str) -> DecodeError | None:
        self.base_name = name
        if self.topic_device is not None:
            return None
        device = name[:-1] if name[-1:] in (":", "/") else name
        if not device:
            self.device = None
            return None
        fault = bad_name(device)
        if fault is not None:
            return DecodeError(
                "bad_device_id", f"record {i}: device id {show(device)} (bn): {fault}"
            )
        self.device = device
        return None

    def _store(
        self, i: int, record: dict[Any, Any], labels: _Labels, kind: str, value: Any
    ) -> DecodeError | None:
        """The reading of one record, with its name, time and unit. The hot path: what most
        records hold is checked inline, the rest by the helpers."""
        name = record.get(labels.n)
        if type(name) is not str or name not in self.names:
            name = self._name(i, name)
            if isinstance(name, DecodeError):
                return name
        device = self.device
        if device is None:
            return _no_device(i)
        t = record.get(labels.t)
        if t == self._at_t and self.base_time == self._at_bt and type(t) in _PLAIN_TIMES:
            ts = self._at  # the time of the record before
        else:
            at = self._time(i, t)
            if isinstance(at, DecodeError):
                return at
            ts = at
        if kind == "v":
            if type(value) is not float:
                value = _finite_or_not(value)
                if value is None:
                    return _not_number(i, "v", record[labels.v])
            value += self.base_value
            if value - value != 0.0:  # not finite: no double holds it
                self.skipped += 1
                return None
        elif kind == "vs" and not text_fits(value, self.limits):
            self.skipped += 1
            return None
        key = (device, name, ts)
        if key in self.seen:
            return _duplicate(i, key)
        self.seen.add(key)
        if kind == "vs":
            self.texts.append(build(TextReading, (device, name, ts, value)))
        else:
            number = value if kind == "v" else (1.0 if value else 0.0)
            self.readings.append(build(Reading, (device, name, ts, number)))
        units = self.devices.get(device)
        if units is None:
            units = self.devices[device] = {}
        unit = record.get(labels.u)
        if unit is None:
            unit = self.base_unit
        elif type(unit) is not str or len(unit) > 128 or not unit.isprintable():
            unit = _unit(i, "u", unit)
            if isinstance(unit, DecodeError):
                return unit
        if unit:
            units[name] = unit
        return None

    def _name(self, i: int, name: Any) -> str | DecodeError:
        if name is None or name == "":
            name = self.base_name
            if not name:
                return DecodeError("bad_metric", f"record {i}: no name: neither n nor bn")
        elif type(name) is not str:
            return _bad(i, f"n is {_kind(name)}, not text")
        names = self.names
        if name not in names:
            fault = bad_name(name)
            if fault is not None:
                return DecodeError("bad_metric", f"record {i}: metric {show(name)}: {fault}")
            if len(names) >= _NAMES_MAX:
                names.clear()
            names.add(name)
        return name  # type: ignore[no-any-return]

    def _time(self, i: int, t: Any) -> datetime | DecodeError:
        """The time ``bt`` + ``t`` of a record, read and checked against the window."""
        if t is None:
            raw = self.base_time
        elif type(t) is float and t - t == 0.0:
            raw = self.base_time + t
        else:
            number = _finite(t)
            if number is None:
                return _not_number(i, "t", t)
            raw = self.base_time + number
        self._at_t, self._at_bt = t, self.base_time
        if raw == self._at_raw:
            return self._at
        try:
            if raw < RELATIVE_BELOW:
                ts = self.received_at + timedelta(seconds=raw)
            else:
                ts = _fromtimestamp(raw, UTC)
        except (OverflowError, ValueError, OSError):
            return DecodeError(
                "ts_out_of_range", f"record {i}: time bt + t = {raw:g} s is beyond the calendar"
            )
        limits = self.limits
        if ts < limits.min_ts:
            side = f"before INGEST_MIN_TS {limits.min_ts.isoformat()}"
        elif ts > self.latest:
            side = f"after {self.latest.isoformat()} (INGEST_MAX_TS_AHEAD past its arrival)"
        else:
            self._at_raw, self._at = raw, ts
            return ts
        return DecodeError("ts_out_of_range", f"record {i}: time {ts.isoformat()} is {side}")

    def updates(self, tags: dict[str, str] | None) -> Sequence[DeviceUpdate]:
        """Per device stored: the route's tags and the units of its metrics, when any."""
        return (
            tuple(
                build(DeviceUpdate, (device, tags, None, None, units or None, None))
                for device, units in self.devices.items()
                if tags or units
            )
            or NO_UPDATES
        )


# --- fields ------------------------------------------------------------------------------

_ABSENT: Final = object()


def _finite(value: Any) -> float | None:
    """A number field as a finite float, or None (not a number, or not finite)."""
    number = _finite_or_not(value)
    return number if number is not None and number - number == 0.0 else None


def _finite_or_not(value: Any) -> float | None:
    """A number field as a float (infinite when no double holds it), or None."""
    kind = type(value)
    if kind is float:
        return value  # type: ignore[no-any-return]
    if kind is int:
        try:
            return float(value)
        except OverflowError:  # a CBOR bignum beyond a double
            return math.inf if value > 0 else -math.inf
    return None


def _unit(i: int, role: str, unit: Any) -> str | DecodeError:
    if type(unit) is not str:
        return _bad(i, f"{role} is {_kind(unit)}, not text")
    if unit and (len(unit) > 128 or not unit.isprintable()):
        fault = bad_name(unit)
        if fault is not None:
            return _bad(i, f"{role} {show(unit)}: {fault}")
    return unit


def _duplicate(i: int, key: tuple[str, str, datetime]) -> DecodeError:
    device, name, ts = key
    return DecodeError(
        "duplicate_metric", f"record {i}: {show(name)} of {show(device)} twice at {ts.isoformat()}"
    )


def _no_device(i: int) -> DecodeError:
    return DecodeError(
        "bad_device_id", f"record {i}: no device: no bn names one, and the route's template"
        " has no {device_id}",
    )  # fmt: skip


def _bad(i: int, what: str) -> DecodeError:
    return DecodeError("bad_senml", f"record {i}: {what}")


def _not_number(i: int, role: str, value: Any) -> DecodeError:
    if _finite_or_not(value) is not None:
        return _bad(i, f"{role} is not a finite number")
    return _bad(i, f"{role} is {_kind(value)}, not a number")


# --- loading ----------------------------------------------------------------------------------


def _load(payload: bytes) -> tuple[list[Any], _Labels] | DecodeError:
    """The records of a pack, and the labels they use; or why the payload is no pack."""
    first = payload[:1]
    if first and first in _WHITE_SPACE:
        payload = payload.lstrip(_WHITE_SPACE)
        first = payload[:1]
    if first == b"[":
        try:
            return orjson.loads(payload), _JSON
        except orjson.JSONDecodeError as exc:
            return DecodeError("bad_senml", f"not a SenML pack: not JSON: {exc}")
    if first and 0x80 <= first[0] <= 0x9F:
        return _load_cbor(payload)
    if not first:
        return DecodeError("bad_senml", "not a SenML pack: empty payload")
    return DecodeError(
        "bad_senml", f"not a SenML pack: starts with byte 0x{first[0]:02x}, neither a JSON"
        " array ([) nor a CBOR array (0x80-0x9f)",
    )  # fmt: skip


def _load_cbor(payload: bytes) -> tuple[list[Any], _Labels] | DecodeError:
    stream = BytesIO(payload)
    try:
        pack = cbor2.CBORDecoder(
            stream,
            semantic_decoders=_CBOR_TAGS,
            max_depth=_CBOR_MAX_DEPTH,
            allow_duplicate_keys=False,
        ).decode()
    except cbor2.CBORError as exc:
        return DecodeError("bad_senml", f"not a SenML pack: not CBOR: {exc}")
    extra = len(payload) - stream.tell()
    if extra:
        return DecodeError("bad_senml", f"not a SenML pack: {extra} byte(s) after the CBOR array")
    return pack, _CBOR


class _Refused:
    """What a CBOR tag becomes that SenML does not use: a value no field accepts."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<a CBOR tag>"


_REFUSED: Final = _Refused()
# Beyond these a decimal fraction is no finite double (its mantissa would take a quadratic
# conversion to read exactly: refused before it is tried).
_MANTISSA_BITS: Final = 1100  # about 10**331
_MAX_EXPONENT: Final = 400
_MIN_EXPONENT: Final = -800  # 10**331 * 10**-800 is below the smallest double


def _decimal_fraction(value: Any, immutable: bool) -> Any:
    """CBOR tag 4, ``[exponent, mantissa]``: a float (RFC 8428 section 6 allows them for
    numbers). A mantissa over ``_MANTISSA_BITS`` or an exponent over ``_MAX_EXPONENT`` is
    taken as infinite (beyond a double), an exponent under ``_MIN_EXPONENT`` as zero."""
    if type(value) not in (list, tuple) or len(value) != 2:
        return _REFUSED
    exponent, mantissa = value
    if type(exponent) is not int or type(mantissa) is not int:
        return _REFUSED
    if not mantissa:
        return 0.0
    if mantissa.bit_length() > _MANTISSA_BITS or exponent > _MAX_EXPONENT:
        return math.inf if mantissa > 0 else -math.inf
    if exponent < _MIN_EXPONENT:
        return 0.0 if mantissa > 0 else -0.0
    return float(Decimal(f"{mantissa}E{exponent}"))


def _refuse(value: Any, immutable: bool) -> Any:
    return _REFUSED


_REFUSED_TAGS: Final = (
    0, 1, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004, 55799
)  # fmt: skip
# cbor2 reads these tags into objects (dates, regular expressions, MIME messages, shared
# references, ...): none is a SenML value, and some cost much to build. Tags 2 and 3
# (bignums) stay cbor2's: ints.
_CBOR_TAGS: Final = MappingProxyType({4: _decimal_fraction} | dict.fromkeys(_REFUSED_TAGS, _refuse))


# --- messages ------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    kind = type(value)
    if kind is int or kind is float:
        return "a number"
    return _KINDS.get(kind) or (
        "a CBOR tag" if kind in (_Refused, cbor2.CBORTag) else kind.__name__
    )


_KINDS: Final = MappingProxyType(
    {
        type(None): "null",
        bool: "a boolean",
        str: "text",
        bytes: "a byte string",
        list: "an array",
        dict: "an object (map)",
        cbor2.CBORSimpleValue: "a CBOR simple value",
        type(cbor2.undefined): "undefined",
    }
)


def _show_label(label: Any) -> str:
    # Never repr a bignum: thousands of digits, and Python refuses to print them.
    if type(label) is int and label.bit_length() > 64:
        return "a bignum"
    return show(label)
