"""The ``value`` format: one value per message, for the topic's ``{metric}`` (Tasmota, Shelly,
Zigbee2MQTT, ESPHome and Home Assistant state topics; docs/design.md, "Routes and payload
formats").

The payload, surrounding white space ignored, is one of:

- a number (``21.5``, ``-3``, ``1e3``): a reading;
- ``true`` / ``false`` / ``on`` / ``off`` in any case: a reading of 1 or 0;
- ``{"ts": <time>, "value": <one of these>}``: the same, at that time (fields other than
  ``ts`` and ``value`` are skipped and counted);
- a JSON string (``"21.5"``, ``"ON"``): its text, read by these same rules;
- ``null`` or a non-finite number: skipped and counted (and so ``no_readings``);
- any other UTF-8 text: a text reading (over ``max_text_bytes``: skipped and counted).

Without a ``ts`` the receive time is the reading's time.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

import orjson

from ingest.errors import ConfigError, DecodeError
from ingest.formats.json import bad_name, sample_time, show, text_fits
from ingest.formats.limits import Limits
from ingest.formats.routes import Match, Route
from ingest.model import NO_TEXTS, NO_UPDATES, Decoded, DeviceUpdate, Reading, TextReading, build

__all__ = ["decode_value", "value_options"]

_SWITCH: Final = {"true": 1.0, "false": 0.0, "on": 1.0, "off": 0.0}
# First bytes of a payload that may be JSON (a number, an object, a string or a literal).
_JSONISH: Final = frozenset(b'-0123456789{"tfn')


def value_options(table: Mapping[str, Any], where: str) -> None:
    """The ``value`` format has no options yet: an option given is a configuration error."""
    if table:
        raise ConfigError(where, f"[routes.value] has no option {next(iter(table))!r}")


def decode_value(
    match: Match, payload: bytes, received_at: datetime, route: Route, limits: Limits
) -> Decoded | DecodeError:
    device_id, metric = match.device_id, match.metric
    assert device_id is not None
    if metric is None:
        return DecodeError("bad_topic", f"route {route.name} has no {{metric}} level")
    fault = bad_name(metric)
    if fault is not None:
        return DecodeError("bad_metric", f"metric {show(metric)}: {fault}")
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        return DecodeError("invalid_utf8", f"not UTF-8: {exc.reason} at byte {exc.start}")
    value: Any = text
    ts = received_at
    skipped = 0
    if text and text.encode()[0] in _JSONISH:
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError:
            value = text
        if type(value) is dict:
            at = sample_time(value.get("ts"), received_at, limits)
            if isinstance(at, DecodeError):
                return at
            ts = at
            skipped = len(value) - ("ts" in value) - ("value" in value)
            value = value.get("value")
    reading = _reading(device_id, metric, ts, value, limits)
    if reading is None:
        return DecodeError("no_readings", f"no storable value in {show(text)}")
    tags = route.device_tags(match)
    updates = (DeviceUpdate(device_id, tags),) if tags else NO_UPDATES
    if type(reading) is TextReading:
        return build(Decoded, ([], skipped, (reading,), updates))
    return build(Decoded, ([reading], skipped, NO_TEXTS, updates))


def _reading(
    device_id: str, metric: str, ts: datetime, value: Any, limits: Limits
) -> Reading | TextReading | None:
    kind = type(value)
    if kind is bool:
        return build(Reading, (device_id, metric, ts, 1.0 if value else 0.0))
    if kind is int or kind is float:
        return build(Reading, (device_id, metric, ts, float(value)))
    if kind is not str:
        return None  # null, a list, a nested object, a non-finite number
    text = value.strip()
    switch = _SWITCH.get(text.lower())
    if switch is not None:
        return build(Reading, (device_id, metric, ts, switch))
    if text and text[0] in "-0123456789":
        try:
            number = orjson.loads(text)
        except orjson.JSONDecodeError:
            number = None
        if type(number) is int or type(number) is float:
            return build(Reading, (device_id, metric, ts, float(number)))
    if not text or not text_fits(text, limits):
        return None
    return build(TextReading, (device_id, metric, ts, text))
