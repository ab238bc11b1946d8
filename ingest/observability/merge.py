"""Several worker processes (``ingest run --workers N``), one metrics port.

Each worker labels every family (histograms too) with its ``worker``; the process that owns
the port fetches each worker's exposition and serves :func:`merge_expositions` of them.
prometheus-client's multiprocess mode is not used on purpose: it cannot run custom collectors
across processes, so it would put a counter increment on the hot path and label by pid instead
of worker.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

__all__ = ["merge_expositions"]


def merge_expositions(texts: Iterable[str]) -> bytes:
    """One exposition from several processes' (each labelled with its own ``worker``): the
    samples of a family are regrouped under one HELP/TYPE, as the text format requires."""
    families: dict[str, Metric] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                families[family.name] = family
            else:
                merged.samples.extend(family.samples)

    class _Parsed(Collector):
        def collect(self) -> Iterable[Metric]:
            return families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Parsed())
    return generate_latest(registry)
