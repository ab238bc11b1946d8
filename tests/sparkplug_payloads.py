"""Sparkplug B payloads built for tests with the schema's own classes."""

from __future__ import annotations

from typing import Any

from ingest.formats.sparkplug_schema import DataType, Payload


def sparkplug_payload(ts: int | None, *metrics: dict[str, Any], seq: int = 0) -> bytes:
    """A payload of ``metrics`` (each the keyword fields of one Metric, plus ``unit`` for an
    ``engUnit`` property) stamped ``ts`` (epoch ms; None: no timestamp)."""
    p = Payload(seq=seq)
    if ts is not None:
        p.timestamp = ts
    for m in metrics:
        fields = dict(m)
        unit = fields.pop("unit", None)
        metric = p.metrics.add(**fields)
        if unit is not None:
            metric.properties.keys.append("engUnit")
            metric.properties.values.add(type=DataType.String, string_value=unit)
    return bytes(p.SerializeToString())
