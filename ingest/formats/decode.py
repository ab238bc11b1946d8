"""The decode stage: one MQTT message -> what to store, or the reason it is a dead letter.

Contract: docs/design.md, "Routes and payload formats" and "Limits". ``decode`` is pure and
synchronous: no I/O, no logging, and it never raises (a bug comes back as
``DecodeError("internal", ...)``). It finds the first route whose template matches the topic
(none: ``bad_topic``), checks the device id the topic gives, and hands the payload to the
route's format, looked up once per route at start-up in ``FORMATS``, the dispatch table.
Formats: ``json`` (``ingest.formats.json``), ``value`` (``ingest.formats.value``), ``senml``
(``ingest.formats.senml``), ``sparkplug`` (``ingest.formats.sparkplug``); a new one is a module
with a decoder and an options reader, and a line in ``FORMATS``.

The name rules (device ids and metrics non-empty, at most 128 characters, no control
character; tag values the same but may be empty) and the limits (readings per message, the time window, text size) hold for every
format: the dispatch checks what the topic names, each format what its payload names, with
the shared helpers of ``ingest.formats.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import orjson

from ingest.errors import ConfigError, DecodeError
from ingest.formats.json import REASONS as _JSON_REASONS
from ingest.formats.json import bad_name as _bad_name
from ingest.formats.json import bad_tag_value, decode_json, json_options, show
from ingest.formats.limits import DEFAULT_LIMITS, Limits
from ingest.formats.routes import FormatSpec, RouteTable, parse_routes
from ingest.formats.senml import decode_senml, senml_options
from ingest.formats.sparkplug import REASONS as _SPARKPLUG_REASONS
from ingest.formats.sparkplug import (
    SparkplugState,
    decode_sparkplug,
    sparkplug_options,
    sparkplug_topics,
)
from ingest.formats.value import decode_value, value_options
from ingest.model import Decoded

if TYPE_CHECKING:
    from ingest.settings import Settings

__all__ = ["FORMATS", "REASONS", "Limits", "RouteTable", "decode", "load_routes", "single_route"]

#: The dispatch table: format name -> decoder and options reader. ``senml`` and ``sparkplug``
#: (formats that name their devices in the payload: ``names_devices=True``) go here.
FORMATS: Final[Mapping[str, FormatSpec]] = {
    "json": FormatSpec(decode_json, json_options),
    "value": FormatSpec(decode_value, value_options),
    "senml": FormatSpec(decode_senml, senml_options, names_devices=True),
    "sparkplug": FormatSpec(
        decode_sparkplug,
        sparkplug_options,
        names_devices=True,
        topics=sparkplug_topics,
        state=SparkplugState.from_settings,
    ),
}

#: Every dead letter reason a decoder gives.
REASONS: Final = (*_JSON_REASONS, *_SPARKPLUG_REASONS)


def decode(
    topic: str,
    payload: bytes,
    received_at: datetime,
    routes: RouteTable,
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> Decoded | DecodeError:
    """Decode one message; ``received_at`` (aware UTC) stands in for a missing timestamp.

    Returns what to store (readings, text readings, device updates, the skipped count) or a
    ``DecodeError`` whose ``reason`` is one of ``REASONS``. Never raises.
    """
    try:
        for match_topic, route in routes.matchers:  # noqa: B007 (the route found is used below)
            match = match_topic(topic)
            if match is not None:
                break
        else:
            return DecodeError("bad_topic", f"topic {show(topic)} matches no route")
        device_id = match[0]
        if device_id is not None and (not 0 < len(device_id) <= 128 or not device_id.isprintable()):
            fault = _bad_name(device_id)
            if fault is not None:
                return DecodeError("bad_device_id", f"device id {show(device_id)}: {fault}")
        if match[2]:
            error = _check_tags(match[2])
            if error is not None:
                return error
        return route.decode(match, payload, received_at, route, limits)
    except Exception as exc:  # a bug: the message must still become a dead letter
        return DecodeError("internal", f"decoder bug: {type(exc).__name__}: {show(exc)}")


def _check_tags(tags: Mapping[str, str]) -> DecodeError | None:
    """A topic level that would become a tag value must follow the tag rules: the topic is
    what is wrong, as when it matches no route."""
    for name, value in tags.items():
        fault = bad_tag_value(value)
        if fault is not None:
            return DecodeError("bad_topic", f"tag {name} = {show(value)}: {fault}")
    return None


def single_route(topic: str) -> RouteTable:
    """The table ``INGEST_TOPIC`` alone gives: one ``json`` route."""
    return parse_routes([{"topic": topic, "format": "json"}], FORMATS)


def load_routes(settings: Settings) -> RouteTable:
    """The daemon's route table: ``settings.routes`` (``[[routes]]`` of the config file, as
    JSON) or else one ``json`` route on ``settings.topic``. Raises ``ConfigError``."""
    if settings.routes is None:
        try:
            return single_route(settings.topic)
        except ConfigError as exc:
            raise ConfigError("INGEST_TOPIC", exc.message) from None
    try:
        raw: Any = orjson.loads(settings.routes)
    except orjson.JSONDecodeError as exc:
        raise ConfigError("INGEST_ROUTES", f"not JSON: {exc}") from None
    return parse_routes(raw, FORMATS, settings)
