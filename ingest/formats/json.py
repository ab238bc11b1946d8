"""The ``json`` format: one MQTT message -> readings and text readings, or the reason it is
a dead letter.

Contract: docs/design.md, "Routes and payload formats" and "Limits". ``decode_json`` is pure
and synchronous: no I/O, no logging; the dispatch (``ingest.formats.decode``) found the route
and checked the device id the topic gives.

Payload without ``{metric}`` in the route's template:

- a JSON object ``{"ts": <time>, "<metric>": <number>, ...}``, or a non-empty JSON array of
  such objects (several samples, each with its own ``ts``);
- every number or boolean (stored as 1.0 / 0.0) other than the top-level ``ts`` is one reading
  named after its field; nested objects flatten with dots (``{"env": {"t": 20}}`` ->
  ``env.t``);
- every string is a text reading (``TextReading``); one over ``max_text_bytes`` in UTF-8, or
  holding a NUL or a lone surrogate, is skipped;
- nulls, lists, empty objects, non-finite numbers (``1e400``) and integers too large for a
  double are skipped: counted in ``Decoded.skipped``, never stored, never an error.

A route's ``[routes.json]`` options (``JsonOptions``) take the general path, ``_with_options``:
the timestamp at another (dotted) path, a list of ``{name, value, ts}`` samples, fields that
become device tags, numbers sent as strings. The default route never goes there.

Payload with ``{metric}``: a bare number (or boolean), a bare JSON string (a text reading at
the receive time, within the text limits), ``{"ts": ..., "value": ...}``, or an array of such
objects; fields other than ``ts`` and ``value`` are skipped.

``ts``: absent or null -> ``received_at``; an int or float is epoch seconds, or epoch
milliseconds when its magnitude is above 1e11; a string is RFC 3339 (``T``, ``t`` or space
separator, optional fraction, ``Z`` or an offset; without an offset it is UTC). Every
timestamp comes out timezone-aware in ``datetime.UTC``, at microsecond precision (RFC 3339
fractions beyond microseconds are truncated; float epochs round half-even to the
microsecond; integer milliseconds are exact).

Every sample's time must then fall in the window ``[limits.min_ts, received_at +
limits.max_ts_ahead]``, else the message is ``ts_out_of_range`` (replayable once the
settings change). The seconds/milliseconds rule never makes a far-future seconds value
plausible: a number above 1e11 in magnitude is milliseconds, and as seconds it would be year
5138 or later; read as milliseconds, a value below 1e12 (2001-09-09) is a 1973-2001 time, so
it is only accepted when ``min_ts`` allows that millisecond time (the default, 2000-01-01,
refuses all of them before 2000). ``253402300800`` (9999-12-31 in seconds) is thus 1978 in
milliseconds: ``ts_out_of_range``. A finite number beyond the calendar (before year 1 or
after 9999) is ``ts_out_of_range`` too; ``bad_ts`` is for what is not a time at all.

Limits (``Limits``, built from the settings): more than ``max_readings_per_message`` readings,
or an array of more samples than that, is ``too_many_readings``, found before the readings
are built. Names (device ids, metrics) are at most 128 characters, non-empty, and hold no
control character (U+0000-U+001F, U+007F-U+009F): error messages show names escaped, so no
raw control character reaches a log or a terminal.

A message is stored whole or not at all: any malformed part makes it a dead letter, with one
of the reason codes in ``REASONS``:

=================  ======================================================================
invalid_utf8       payload is not UTF-8
not_json           payload is not JSON (``NaN`` / ``Infinity`` literals are not JSON)
not_object         top level is neither an object nor an array (a number, unless the
                   template has ``{metric}``)
no_readings        nothing to store: an empty array, or no finite number, boolean or text
bad_ts             ``ts`` is a bool, list, object, non-finite or unparseable
ts_out_of_range    a sample's time is outside the window (above), or beyond the calendar
bad_sample         an array element that is not an object, or a ``tag_fields`` value over
                   128 characters or holding a control character
bad_device_id      device id from the topic empty, over 128 characters or holding a
                   control character
bad_metric         metric name empty, over 128 characters or holding a control character
duplicate_metric   two fields of one sample flatten to one name (``{"a.b": 1, "a": {"b": 2}}``)
bad_topic          the topic matches no route, or a level that becomes a tag value is over
                   128 characters or holds a control character
too_large          the payload is over ``max_payload_bytes`` (decided by the source, which
                   never hands such a payload to ``decode``)
too_many_readings  more readings, or samples, than ``max_readings_per_message``
internal           a bug in this module (never expected)
=================  ======================================================================

A key repeated inside one JSON object is not detected: the parser keeps the last value
(as orjson and the standard library both do). Two samples of one array at the same ``ts``
(or both without one) are not an error here: the second is a duplicate row the writer
counts.
"""

from __future__ import annotations

import json as _json
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

import orjson

from ingest.errors import ConfigError, DecodeError
from ingest.formats.limits import Limits
from ingest.model import NO_TEXTS, NO_UPDATES, Decoded, DeviceUpdate, Reading, TextReading, build

if TYPE_CHECKING:
    from ingest.formats.routes import Match, Route

__all__ = ["REASONS", "JsonOptions", "decode_json", "json_options", "sample_time", "text_fits"]

REASONS: Final = (
    "invalid_utf8",
    "not_json",
    "not_object",
    "no_readings",
    "bad_ts",
    "ts_out_of_range",
    "bad_sample",
    "bad_device_id",
    "bad_metric",
    "duplicate_metric",
    "bad_topic",
    "too_large",
    "too_many_readings",
    "bad_senml",
    "internal",
)

_MAX_NAME: Final = 128
# C0 and C1 control characters: refused in names (a terminal would act on them).
_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f]")

_UTC: Final = UTC
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=_UTC)
_MS_THRESHOLD: Final = 100_000_000_000  # 1e11: above it (in magnitude) an epoch is in ms
# Below 2**33 s a double holds an epoch to better than 0.5 µs, so ``ms / 1000`` rounds back to
# the exact millisecond; beyond it (year 2242) integer arithmetic takes over.
_FAST_MS_LIMIT: Final = 2**33 * 1000

_fromtimestamp = datetime.fromtimestamp
_fromisoformat = datetime.fromisoformat

# How many checked metric names a route remembers (Route.checked_names).
_GOOD_NAMES_MAX: Final = 4096


# --- payload -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class JsonOptions:
    """A route's ``[routes.json]`` table (docs/design.md, "Routes and payload formats").

    ``ts``: the timestamp's field path; ``samples``: the path of a list of ``{name, value,
    ts}`` objects (keys ``sample_name`` / ``sample_value`` / ``sample_ts``); ``tag_fields``:
    field paths that become device tags; ``numeric_strings``: ``"21.5"`` stored as a number.
    """

    ts: str = "ts"
    samples: str | None = None
    sample_name: str = "name"
    sample_value: str = "value"
    sample_ts: str = "ts"
    tag_fields: frozenset[str] = frozenset()
    numeric_strings: bool = False


_OPTION_KEYS: Final = frozenset(
    {"ts", "samples", "sample_name", "sample_value", "sample_ts", "tag_fields", "numeric_strings"}
)


def json_options(table: Mapping[str, Any], where: str) -> JsonOptions | None:
    """Options from ``[routes.json]``; None when they are all the defaults (the fast path)."""
    for key, value in table.items():
        if key not in _OPTION_KEYS:
            raise ConfigError(where, f"[routes.json] has no option {key!r}")
        if key == "numeric_strings":
            if type(value) is not bool:
                raise ConfigError(where, "[routes.json] numeric_strings must be true or false")
        elif key == "tag_fields":
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ConfigError(where, "[routes.json] tag_fields must be a list of field names")
        elif not isinstance(value, str) or not value or value.startswith(".") or ".." in value:
            raise ConfigError(where, f"[routes.json] {key} must be a field name or dotted path")
    if not table or dict(table) == {"ts": "ts"}:
        return None
    values = dict(table)
    if "tag_fields" in values:
        values["tag_fields"] = frozenset(values["tag_fields"])
    return JsonOptions(**values)


def decode_json(
    match: Match, payload: bytes, received_at: datetime, route: Route, limits: Limits
) -> Decoded | DecodeError:
    """The ``json`` format: readings and text readings of one message (the dispatch checked
    the device id already)."""
    device_id, metric, topic_tags = match
    assert device_id is not None
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        doc = _loads_strict(payload, exc)
        if isinstance(doc, DecodeError):
            return doc

    try:
        latest = received_at + limits.max_ts_ahead  # the latest time a sample may carry
    except OverflowError:
        latest = limits.latest(received_at)
    readings: list[Reading] = []
    texts: list[TextReading] = []
    names = route.checked_names
    # The topic's tags are a fresh dict; static tags need a merge, the default route neither.
    tags = topic_tags if route.tags is None else route.device_tags(match)
    options = route.options
    if metric is not None:
        result = _decode_metric(
            doc, device_id, metric, received_at, readings, texts, names, limits, latest
        )
    elif options is not None:
        if tags is None and options.tag_fields:
            tags = {}
        result = _with_options(doc, device_id, received_at, readings, texts, tags, options, limits)
    elif type(doc) is dict:
        result = _sample(doc, device_id, received_at, readings, texts, names, limits, latest)
    elif type(doc) is list:
        result = _samples(doc, device_id, received_at, readings, texts, None, names, limits, latest)
    else:
        return DecodeError("not_object", f"top level is {_kind(doc)}, not an object or an array")
    if isinstance(result, DecodeError):
        return result
    if not readings and not texts:
        return DecodeError("no_readings", "no number, boolean or text in the message")
    updates = (DeviceUpdate(device_id, tags),) if tags else NO_UPDATES
    # A tuple, not the list: the collector untracks a tuple of untracked items (the
    # TextReadings, once seen), and a list would stay tracked while the message is in flight.
    return build(Decoded, (readings, result, tuple(texts) if texts else NO_TEXTS, updates))


def _samples(
    doc: list[Any],
    device_id: str,
    received_at: datetime,
    out: list[Reading],
    texts: list[TextReading],
    metric: str | None,
    names: set[str],
    limits: Limits,
    latest: datetime,
) -> int | DecodeError:
    if not doc:
        return DecodeError("no_readings", "empty array")
    if len(doc) > limits.max_readings_per_message:  # each sample holds a reading, or is pointless
        return _too_many(f"{len(doc)} samples", limits.max_readings_per_message)
    skipped = 0
    for i, sample in enumerate(doc):
        if type(sample) is not dict:
            return DecodeError("bad_sample", f"sample {i} is {_kind(sample)}, not an object")
        if metric is None:
            result = _sample(sample, device_id, received_at, out, texts, names, limits, latest)
        else:
            result = _value_sample(sample, device_id, metric, received_at, out, limits, latest)
        if isinstance(result, DecodeError):
            return DecodeError(result.reason, f"sample {i}: {result.message}")
        skipped += result
    return skipped


def _sample(
    obj: dict[str, Any],
    device_id: str,
    received_at: datetime,
    out: list[Reading],
    texts: list[TextReading],
    names: set[str],
    limits: Limits,
    latest: datetime,
) -> int | DecodeError:
    """Append the readings (``out``) and texts of one flat-or-nested object; return the skip
    count. ``names``: metric names already checked (the route's ``checked_names``)."""
    raw_ts = obj.get("ts")
    ts = received_at if raw_ts is None else _checked_ts(raw_ts, limits, latest)
    if isinstance(ts, DecodeError):
        return ts
    start, text_start = len(out), len(texts)
    if start + text_start + len(obj) > limits.max_readings_per_message:  # rare: count first
        refused = _big_sample(obj, device_id, ts, out, texts, limits)
        if refused is not None:
            return refused
    # Fast path: a flat object, where keys are unique by construction.
    append = out.append
    skipped = 0
    for key, value in obj.items():
        kind = type(value)
        if kind is float or kind is int:  # orjson ints fit in 64 bits: a finite double
            if key in names:
                append(build(Reading, (device_id, key, ts, float(value))))
                continue
            if key == "ts":
                continue
        elif kind is bool:
            value = 1.0 if value else 0.0
        elif kind is str:
            if key not in names:
                if key == "ts":
                    continue
                refused = _remember(key, names)
                if refused is not None:
                    return refused
            if text_fits(value, limits):
                texts.append(build(TextReading, (device_id, key, ts, value)))
            else:
                skipped += 1
            continue
        elif kind is dict:
            del out[start:], texts[text_start:]
            return _nested(obj, device_id, ts, out, texts, limits)
        else:
            if key != "ts":
                skipped += 1
            continue
        refused = _remember(key, names)  # a number or boolean of a name not seen yet
        if refused is not None:
            return refused
        append(build(Reading, (device_id, key, ts, float(value))))
    return skipped


def _remember(key: str, names: set[str]) -> DecodeError | None:
    """Check a metric name seen for the first time and remember it (``names`` is bounded: a
    stream of random names cannot grow it without limit), or say why it is refused."""
    if _bad_name(key):
        return DecodeError("bad_metric", f"metric {_show(key)}: {_name_fault(key)}")
    if len(names) >= _GOOD_NAMES_MAX:
        names.clear()
    names.add(key)
    return None


def _checked_ts(raw: Any, limits: Limits, latest: datetime) -> datetime | DecodeError:
    """A sample's ``ts`` field read and checked against the window ending at ``latest``."""
    parsed = _ts(raw)
    if parsed is None:
        return _ts_fault(raw)
    if parsed < limits.min_ts or parsed > latest:
        return _out_of_range(parsed, limits, latest)
    return parsed


def _big_sample(
    obj: dict[str, Any],
    device_id: str,
    ts: datetime,
    out: list[Reading],
    texts: list[TextReading],
    limits: Limits,
) -> int | DecodeError | None:
    """A sample with more fields than readings are left: ``too_many_readings`` when its
    numbers and booleans (not its ``ts``) would take ``out`` over ``cap``, counted before any
    reading is built; a nested one is flattened at once (``_nested`` counts as it goes);
    None when the fast path may go on."""
    cap = limits.max_readings_per_message
    count = len(out) + len(texts)
    for key, value in obj.items():
        kind = type(value)
        if kind is dict:
            return _nested(obj, device_id, ts, out, texts, limits)
        if (kind is float or kind is int or kind is bool or kind is str) and key != "ts":
            count += 1
    return _too_many(f"{count} readings", cap) if count > cap else None


def _nested(
    obj: dict[str, Any],
    device_id: str,
    ts: datetime,
    out: list[Reading],
    texts: list[TextReading],
    limits: Limits,
) -> int | DecodeError:
    """Flatten nested objects with dots; a name produced twice is an error.

    Iterative (explicit stack) so that nesting depth cannot exhaust Python's recursion limit.
    Names stop growing past 128 characters: whatever is below is an error if it is a reading.
    A 1 MiB payload may hold some 50,000 small objects: the loop is kept lean.
    """
    skipped = 0
    cap = limits.max_readings_per_message
    room = cap - len(out) - len(texts)
    seen: set[str] = set()
    append = out.append
    stack: list[tuple[str | None, Any]] = [(None, iter(obj.items()))]
    while stack:
        prefix, items = stack[-1]
        for key, value in items:
            if prefix is None:
                if key == "ts":
                    continue
                name = key
            elif len(prefix) > _MAX_NAME:
                name = prefix
            else:
                name = f"{prefix}.{key}"
            kind = type(value)
            if kind is dict and value:
                stack.append((name, iter(value.items())))
                break
            short = len(name) <= _MAX_NAME
            if short:
                if name in seen:
                    return DecodeError("duplicate_metric", f"two fields flatten to {_show(name)}")
                seen.add(name)
            if kind is int:
                value = float(value)
            elif kind is bool:
                value = 1.0 if value else 0.0
            elif kind is not float and (kind is not str or not text_fits(value, limits)):
                skipped += 1
                continue
            if not short or not name or (not name.isprintable() and _bad_name(name)):
                return DecodeError("bad_metric", f"metric {_show(name)}: {_name_fault(name)}")
            if not room:
                return _too_many(f"more than {cap} readings", cap)
            room -= 1
            if kind is str:
                texts.append(build(TextReading, (device_id, name, ts, value)))
            else:
                append(build(Reading, (device_id, name, ts, value)))
        else:
            stack.pop()
    return skipped


def _decode_metric(
    doc: Any,
    device_id: str,
    metric: str,
    received_at: datetime,
    out: list[Reading],
    texts: list[TextReading],
    names: set[str],
    limits: Limits,
    latest: datetime,
) -> int | DecodeError:
    """``{metric}`` templates: a bare value, ``{"ts":..., "value":...}``, or an array of those.
    A bare string is a text reading, as a string field is (too long or holding NUL: skipped)."""
    if _bad_name(metric):
        return DecodeError("bad_metric", f"metric {_show(metric)}: {_name_fault(metric)}")
    kind = type(doc)
    if kind is float or kind is int:
        out.append(build(Reading, (device_id, metric, received_at, float(doc))))
        return 0
    if kind is bool:
        out.append(build(Reading, (device_id, metric, received_at, 1.0 if doc else 0.0)))
        return 0
    if kind is dict:
        return _value_sample(doc, device_id, metric, received_at, out, limits, latest)
    if kind is list:
        return _samples(doc, device_id, received_at, out, [], metric, names, limits, latest)
    if kind is str and text_fits(doc, limits):
        texts.append(build(TextReading, (device_id, metric, received_at, doc)))
        return 0
    return 1  # null, a non-finite number or an unfit string: skipped (and so no readings)


def _value_sample(
    obj: dict[str, Any],
    device_id: str,
    metric: str,
    received_at: datetime,
    out: list[Reading],
    limits: Limits,
    latest: datetime,
) -> int | DecodeError:
    raw_ts = obj.get("ts")
    ts = received_at if raw_ts is None else _checked_ts(raw_ts, limits, latest)
    if isinstance(ts, DecodeError):
        return ts
    skipped = len(obj) - ("ts" in obj) - ("value" in obj)
    if "value" not in obj:
        return skipped
    value = obj["value"]
    kind = type(value)
    if kind is float or kind is int:
        value = float(value)
    elif kind is bool:
        value = 1.0 if value else 0.0
    else:
        return skipped + 1
    out.append(build(Reading, (device_id, metric, ts, value)))
    return skipped


# --- options (a route's [routes.json] table) ------------------------------------------------


def _with_options(
    doc: Any,
    device_id: str,
    received_at: datetime,
    out: list[Reading],
    texts: list[TextReading],
    tags: dict[str, str] | None,
    options: JsonOptions,
    limits: Limits,
) -> int | DecodeError:
    """The general path, for routes with options: slower than ``_sample``, never on the
    default route."""
    if type(doc) is dict:
        docs = [doc]
    elif type(doc) is list:
        if not doc:
            return DecodeError("no_readings", "empty array")
        if len(doc) > limits.max_readings_per_message:
            return _too_many(f"{len(doc)} samples", limits.max_readings_per_message)
        docs = doc
    else:
        return DecodeError("not_object", f"top level is {_kind(doc)}, not an object or an array")
    sink = _Sink(device_id, out, texts, tags, options, limits)
    for i, obj in enumerate(docs):
        if type(obj) is not dict:
            return DecodeError("bad_sample", f"sample {i} is {_kind(obj)}, not an object")
        error = _option_sample(obj, received_at, sink, options, limits)
        if error is not None:
            if len(docs) == 1:
                return error
            return DecodeError(error.reason, f"sample {i}: {error.message}")
    return sink.skipped


class _Sink:
    """Where the general path puts what it reads: readings, texts, tags, the skip count."""

    __slots__ = ("device_id", "limits", "numeric_strings", "out", "skipped", "tags", "texts")

    def __init__(
        self,
        device_id: str,
        out: list[Reading],
        texts: list[TextReading],
        tags: dict[str, str] | None,
        options: JsonOptions,
        limits: Limits,
    ) -> None:
        self.device_id = device_id
        self.out = out
        self.texts = texts
        self.tags = tags
        self.limits = limits
        self.numeric_strings = options.numeric_strings
        self.skipped = 0

    def add(self, name: str, ts: datetime, value: Any) -> DecodeError | None:
        kind = type(value)
        if kind is str and self.numeric_strings:
            number = _numeric_string(value)
            if number is not None:
                value, kind = number, float
        if kind is bool:
            value, kind = (1.0 if value else 0.0), float
        if kind is str:
            if not text_fits(value, self.limits):
                self.skipped += 1
                return None
        elif kind is not float and kind is not int:
            self.skipped += 1
            return None
        if _bad_name(name):
            return DecodeError("bad_metric", f"metric {_show(name)}: {_name_fault(name)}")
        cap = self.limits.max_readings_per_message
        if len(self.out) + len(self.texts) >= cap:
            return _too_many(f"more than {cap} readings", cap)
        if kind is str:
            self.texts.append(build(TextReading, (self.device_id, name, ts, value)))
        else:
            self.out.append(build(Reading, (self.device_id, name, ts, float(value))))
        return None

    def tag(self, name: str, value: Any) -> DecodeError | None:
        if self.tags is None or type(value) not in (str, int, float, bool):
            self.skipped += 1
            return None
        text = str(value).lower() if type(value) is bool else str(value)
        fault = bad_tag_value(text)
        if fault is not None:
            return DecodeError("bad_sample", f"tag field {_show(name)} = {_show(text)}: {fault}")
        self.tags[name] = text
        return None


def _option_sample(
    obj: dict[str, Any], received_at: datetime, sink: _Sink, options: JsonOptions, limits: Limits
) -> DecodeError | None:
    raw_ts = _path(obj, options.ts)
    ts = sample_time(raw_ts, received_at, limits)
    if isinstance(ts, DecodeError):
        return ts
    skip = {options.ts}
    if options.samples is not None:
        skip.add(options.samples)
        listed = _path(obj, options.samples)
        if listed is not None:
            error = _listed_samples(listed, received_at, ts, sink, options, limits)
            if error is not None:
                return error
    return _flatten(obj, ts, sink, skip, options.tag_fields)


def _listed_samples(
    listed: Any,
    received_at: datetime,
    ts: datetime,
    sink: _Sink,
    options: JsonOptions,
    limits: Limits,
) -> DecodeError | None:
    """A list of ``{name, value, ts}`` objects (Kepware / IoT-gateway style)."""
    if type(listed) is not list:
        return DecodeError("bad_sample", f"{options.samples} is {_kind(listed)}, not an array")
    if len(listed) > limits.max_readings_per_message:
        return _too_many(f"{len(listed)} samples", limits.max_readings_per_message)
    for i, item in enumerate(listed):
        if type(item) is not dict:
            return DecodeError("bad_sample", f"{options.samples}[{i}] is {_kind(item)}")
        name = item.get(options.sample_name)
        if type(name) is not str:
            return DecodeError(
                "bad_sample", f"{options.samples}[{i}].{options.sample_name} is {_kind(name)}"
            )
        at = sample_time(item.get(options.sample_ts), received_at, limits, ts)
        if isinstance(at, DecodeError):
            return DecodeError(at.reason, f"{options.samples}[{i}]: {at.message}")
        # What else the item holds (quality flags and the like) is not stored: counted.
        sink.skipped += len(item) - 1 - (options.sample_value in item) - (options.sample_ts in item)
        if options.sample_value not in item:
            sink.skipped += 1
            continue
        error = sink.add(name, at, item[options.sample_value])
        if error is not None:
            return error
    return None


def _flatten(
    obj: dict[str, Any], ts: datetime, sink: _Sink, skip: set[str], tag_fields: frozenset[str]
) -> DecodeError | None:
    """The object's fields, nested objects flattened with dots, but for ``skip`` (the ts and
    samples paths); ``tag_fields`` become tags. Iterative: nesting cannot exhaust the stack."""
    seen: set[str] = set()
    stack: list[tuple[str | None, Any]] = [(None, iter(obj.items()))]
    while stack:
        prefix, items = stack[-1]
        for key, value in items:
            name = key if prefix is None else f"{prefix}.{key}"
            if name in skip:
                continue
            if name in tag_fields:
                error = sink.tag(name, value)
                if error is not None:
                    return error
                continue
            if type(value) is dict and value and len(name) <= _MAX_NAME:
                stack.append((name, iter(value.items())))
                break
            if name in seen:
                return DecodeError("duplicate_metric", f"two fields flatten to {_show(name)}")
            seen.add(name)
            error = sink.add(name, ts, value)
            if error is not None:
                return error
        else:
            stack.pop()
    return None


def _path(obj: dict[str, Any], path: str) -> Any:
    """The value at a dotted path (a field named with the dots wins), or None."""
    if path in obj or "." not in path:
        return obj.get(path)
    value: Any = obj
    for part in path.split("."):
        if type(value) is not dict:
            return None
        value = value.get(part)
    return value


def _numeric_string(text: str) -> float | None:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return float(value) if type(value) is int or type(value) is float else None


# --- shared with the other formats -----------------------------------------------------------


def sample_time(
    raw: Any, received_at: datetime, limits: Limits, default: datetime | None = None
) -> datetime | DecodeError:
    """A sample's time from its raw field, checked against the window around ``received_at``;
    None gives ``default`` (the time of the message holding the sample) or ``received_at``."""
    if raw is None:
        return received_at if default is None else default
    parsed = _ts(raw)
    if parsed is None:
        return _ts_fault(raw)
    latest = limits.latest(received_at)
    if parsed < limits.min_ts or parsed > latest:
        return _out_of_range(parsed, limits, latest)
    return parsed


def text_fits(value: str, limits: Limits) -> bool:
    """Whether a text value can be stored: at most ``max_text_bytes`` in UTF-8, no NUL (which
    PostgreSQL text cannot hold), no lone surrogate (which UTF-8 cannot)."""
    if value.isascii():
        size = len(value)
    else:
        try:
            size = len(value.encode())
        except UnicodeEncodeError:
            return False
    return size <= limits.max_text_bytes and "\x00" not in value


def bad_name(name: str) -> str | None:
    """Why a device id or metric name is refused, or None when it is fine."""
    return _name_fault(name) if _bad_name(name) else None


def bad_tag_value(value: str) -> str | None:
    """Why a tag value (a topic level or a ``tag_fields`` field) is refused, or None: the
    rules of names but for emptiness (an empty tag value says something; an empty name
    names nothing)."""
    if not value or not _bad_name(value):
        return None
    return _name_fault(value)


def show(value: object) -> str:
    """A value for an error message: bounded, control characters escaped."""
    return _show(value)


def _too_many(what: str, cap: int) -> DecodeError:
    return DecodeError("too_many_readings", f"{what} in one message, at most {cap} allowed")


def _out_of_range(ts: datetime, limits: Limits, latest: datetime) -> DecodeError:
    if ts < limits.min_ts:
        side = f"before INGEST_MIN_TS {limits.min_ts.isoformat()}"
    else:
        side = f"after {latest.isoformat()} (INGEST_MAX_TS_AHEAD past its arrival)"
    return DecodeError("ts_out_of_range", f"ts {ts.isoformat()} is {side}")


def _ts_fault(raw: Any) -> DecodeError:
    if type(raw) is int or type(raw) is float:  # a time: only too far away for a datetime
        return DecodeError("ts_out_of_range", f"ts {_show(raw)} is beyond the calendar")
    return DecodeError("bad_ts", f"ts {_show(raw)} is not a readable time")


# --- timestamps ----------------------------------------------------------------------------


def _ts(raw: Any) -> datetime | None:
    """An aware UTC datetime from a ``ts`` field, or None when it cannot be read: not a time,
    or (an int or a float, ``_ts_fault`` tells) a time no datetime holds."""
    kind = type(raw)
    try:
        if kind is int:
            if -_MS_THRESHOLD <= raw <= _MS_THRESHOLD:
                return _fromtimestamp(raw, _UTC)
            if 0 < raw < _FAST_MS_LIMIT:
                return _fromtimestamp(raw / 1000, _UTC)
            return _EPOCH + timedelta(0, 0, raw * 1000)
        if kind is float:
            if -_MS_THRESHOLD <= raw <= _MS_THRESHOLD:
                return _fromtimestamp(raw, _UTC)  # rounds half-even to the microsecond
            whole = int(raw)  # exact, and ``raw - whole`` is exact too
            return _EPOCH + timedelta(0, 0, whole * 1000 + round((raw - whole) * 1000))
        if kind is str:
            return _rfc3339(raw)
    except (OverflowError, ValueError, OSError):
        return None
    return None  # bool, list, dict, non-finite


def _rfc3339(text: str) -> datetime | None:
    # fromisoformat alone would also take dates, week dates or "HH:MM" times: require at
    # least "YYYY-MM-DDTHH:MM:SS" before handing the rest (fraction, offset) to it.
    if len(text) < 19 or text[4] != "-" or text[7] != "-" or text[13] != ":" or text[16] != ":":
        return None
    sep = text[10]
    if sep != "T" and sep != " ":
        if sep != "t":
            return None
        text = f"{text[:10]}T{text[11:]}"
    if text[-1] == "z":
        text = f"{text[:-1]}Z"
    dt = _fromisoformat(text)  # ValueError is caught by _ts
    tz = dt.tzinfo
    if tz is _UTC:
        return dt
    if tz is None:
        return dt.replace(tzinfo=_UTC)
    return dt.astimezone(_UTC)


# --- the slow parser -----------------------------------------------------------------------


class _NonFinite:
    """Stands for a number a double cannot hold (``1e400``): skipped as a value, bad as ts."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<non-finite number>"


_NON_FINITE: Final = _NonFinite()


def _loads_strict(payload: bytes, error: orjson.JSONDecodeError) -> Any:
    """Second opinion when orjson refuses a payload.

    orjson rejects valid JSON holding a number out of double range (``1e400``, a 400-digit
    integer), which the contract skips instead. The standard library reads those; it is
    only used on this rare path, and made as strict as orjson otherwise (no ``NaN``, no lone
    surrogate escape in a key) but for one harmless difference: a lone surrogate escape in a
    string value (``"\\ud800"``) is accepted, and the string skipped like any other.
    """
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return DecodeError("invalid_utf8", f"not UTF-8: {exc.reason} at byte {exc.start}")
    # Checking every object's keys costs more than the parse itself: only when a surrogate
    # escape is there to be found.
    pairs_hook = _object_pairs if b"\\ud" in payload or b"\\uD" in payload else None
    try:
        return _json.loads(
            text,
            parse_float=_parse_float,
            parse_int=_parse_int,
            parse_constant=_reject_constant,
            object_pairs_hook=pairs_hook,
        )
    except RecursionError:
        return DecodeError("not_json", "not JSON: nested too deep")
    except ValueError as exc:
        return DecodeError("not_json", f"not JSON: {_show_error(exc, error)}")


def _parse_float(text: str) -> float | _NonFinite:
    value = float(text)
    return value if value - value == 0.0 else _NON_FINITE


def _parse_int(text: str) -> int | float | _NonFinite:
    if len(text) < 20:
        return int(text)
    return _parse_float(text)  # float() has no digit limit and saturates to inf


def _reject_constant(text: str) -> Any:
    raise ValueError(f"{text} is not a JSON value")


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    for key, _ in pairs:
        if not key.isascii():
            key.encode()  # UnicodeEncodeError (a ValueError) on a lone surrogate escape
    return dict(pairs)


# --- messages ------------------------------------------------------------------------------


def _show(value: object) -> str:
    # reprlib: bounded output, and no recursion into a payload nested 1000 deep.
    return _repr.repr(value)


def _show_error(exc: ValueError, first: orjson.JSONDecodeError) -> str:
    if isinstance(exc, _json.JSONDecodeError | UnicodeEncodeError):
        return str(first)  # orjson says where
    return str(exc)


_repr = reprlib.Repr()
_repr.maxlevel = 2
_repr.maxstring = _repr.maxother = 60


def _bad_name(name: str) -> bool:
    # isprintable() is false for every control character and true for most names: the
    # regular expression only runs on the rest (non-ASCII spaces and the like).
    return not 0 < len(name) <= _MAX_NAME or (
        not name.isprintable() and _CONTROL.search(name) is not None
    )


def _name_fault(name: str) -> str:
    if not name:
        return "empty"
    if len(name) > _MAX_NAME:
        return f"over {_MAX_NAME} characters"
    control = _CONTROL.search(name)
    return f"holds the control character U+{ord(control.group()) if control else 0:04X}"


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, _NonFinite):
        return "a non-finite number"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(value), type(value).__name__)
