"""Several worker processes (``ingest run --workers N``), one metrics port.

Each worker labels every family (histograms too) with its ``worker``; the process that owns
the port fetches each worker's exposition and serves :func:`merge_expositions` of them (with
several brokers, labelling the families about messages and the connection with the
worker's ``broker`` too).
prometheus-client's multiprocess mode is not used on purpose: it cannot run custom collectors
across processes, so it would put a counter increment on the hot path and label by pid instead
of worker.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

__all__ = ["PER_BROKER", "merge_expositions"]

#: Families about one broker's messages and connection (received, acknowledged, unacknowledged,
#: connected, subscribed, ...): with several brokers, each sample gets its worker's ``broker``.
PER_BROKER = ("ingest_messages_", "ingest_broker_", "ingest_mqtt_", "ingest_inflight_window")


def merge_expositions(texts: Iterable[str], *, brokers: Sequence[str | None] = ()) -> bytes:
    """One exposition from several processes' (each labelled with its own ``worker``): the
    samples of a family are regrouped under one HELP/TYPE, as the text format requires.
    ``brokers``, when given, is the broker of each text (None: none), added as a ``broker``
    label to the samples of its :data:`PER_BROKER` families."""
    families: dict[str, Metric] = {}
    for n, text in enumerate(texts):
        broker = brokers[n] if n < len(brokers) else None
        for family in text_string_to_metric_families(text):
            if broker is not None and family.name.startswith(PER_BROKER):
                family.samples = [
                    s._replace(labels={**s.labels, "broker": broker}) for s in family.samples
                ]
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
