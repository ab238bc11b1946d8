"""Prometheus metrics, ``/healthz`` and ``/readyz``.

* :mod:`~ingest.observability.collector`: counters and gauges read from the stages'
  statistics at scrape time;
* :mod:`~ingest.observability.histograms`: the four histograms, observed once per batch;
* :mod:`~ingest.observability.health`: liveness and readiness verdicts;
* :mod:`~ingest.observability.http`: the HTTP listener;
* :mod:`~ingest.observability.merge`: one exposition from several worker processes;
* :mod:`~ingest.observability.service`: :class:`Observability`, what one daemon process runs.

Nothing is imported here on purpose: the supervisor imports ``http`` and ``merge`` without
pulling in the pipeline, the MQTT client or the database driver.
"""
