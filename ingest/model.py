"""Values that flow through the pipeline (see docs/design.md, Data flow).

They are plain tuples on purpose: a ``Reading`` is handed to asyncpg's binary COPY as it is,
and millions of them are built per minute.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from ingest.errors import DecodeError

#: ``build(Reading, (...))`` makes a NamedTuple from a tuple without NamedTuple.__new__'s
#: Python-level argument handling: for the per-message and per-reading hot path.
build = tuple.__new__


class Reading(NamedTuple):
    """One value of one metric of one device at one device timestamp (UTC-aware)."""

    device_id: str
    metric: str
    ts: datetime
    value: float


class TextReading(NamedTuple):
    """One text value (a door's ``"open"``, a firmware ``"1.4.2"``) of one metric of one
    device at one device timestamp; stored apart from the numeric readings."""

    device_id: str
    metric: str
    ts: datetime
    value: str


class DeviceUpdate(NamedTuple):
    """What a message says about a device besides its readings: tags (topic levels, a route's
    static tags, tag fields; merged into the device's, newest wins per key), a status
    (``online``/``offline`` with its time, from Sparkplug births and deaths), units of its
    metrics (metric -> unit) and the payload of a Sparkplug birth (stored with the batch, so
    the alias tables are rebuilt after a restart). ``None``: nothing said."""

    device_id: str
    tags: Mapping[str, str] | None = None
    status: str | None = None
    status_at: datetime | None = None
    units: Mapping[str, str] | None = None
    birth: bytes | None = None


DEVICE_STATUSES = ("online", "offline")


def device_status(device_id: str, status: str, at: datetime) -> DeviceUpdate:
    """The one way a format reports a device going ``online`` or ``offline`` at ``at``."""
    if status not in DEVICE_STATUSES:
        raise ValueError(f"device status {status!r} is not one of {DEVICE_STATUSES}")
    return DeviceUpdate(device_id, status=status, status_at=at)


NO_TEXTS: tuple[TextReading, ...] = ()
NO_UPDATES: tuple[DeviceUpdate, ...] = ()


class Decoded(NamedTuple):
    """What a well-formed message decodes to: numeric readings, text readings and what it
    says about its devices. A message with none of the three is a dead letter ``no_readings``.

    ``skipped`` counts the fields that are stored nowhere (nulls, lists, non-finite numbers,
    integers too large for a double, text over the size limit): counted, never an error.
    """

    readings: list[Reading]
    skipped: int
    texts: Sequence[TextReading] = NO_TEXTS
    updates: Sequence[DeviceUpdate] = NO_UPDATES


class DeadLetter(NamedTuple):
    """A message (or the rows of one) that could not be stored as readings."""

    received_at: datetime
    topic: str
    payload: bytes
    error: str
    reason: str
    #: bytes the message had on the wire when ``payload`` holds only its start (``too_large``);
    #: None means ``len(payload)``.
    payload_size: int | None = None


class Envelope(NamedTuple):
    """One MQTT message after decoding, on its way to the database.

    ``result`` is the decoded readings or the reason the message is a dead letter. The writer
    stores a message whole or not at all: its readings, or one dead letter with its raw bytes.
    """

    topic: str
    payload: bytes
    received_at: datetime
    result: Decoded | DecodeError
    #: bytes the message had on the wire when ``payload`` holds only its start (a payload over
    #: the size limit is not kept whole); None means ``len(payload)``.
    size: int | None = None


# --- statistics: what each stage reports (anyio MemoryObjectStreamStatistics style) -------


class SessionStatistics(NamedTuple):
    """How the messages of one MQTT connection were read (``ingest.mqtt.session``)."""

    fast_path: int  # PUBLISH packets parsed from the read buffer by take_publishes
    paho_path: int  # delivered by paho's on_message (split packets, QoS 2, the unusual)
    too_large: int  # over the payload limit: read in pieces, kept in part


class SparkplugStatistics(NamedTuple):
    """The Sparkplug alias state's totals (``ingest.formats.sparkplug``), summed over routes."""

    nodes: int  # edge nodes whose alias tables are held
    aliases: int  # entries held: declared metrics, plus one per edge node and device
    nodes_evicted: int  # nodes forgotten to stay under INGEST_SPARKPLUG_MAX_ALIASES
    stale_deaths: int  # NDEATHs of an earlier session (bdSeq not the last NBIRTH's)
    rebirths_sent: int  # Rebirth requests (NCMD) published
    rebirths_suppressed: int  # not asked: the node was asked within the interval
    rebirths_failed: int  # not published: no connection at the time


@dataclass(frozen=True, slots=True)
class SourceStatistics:
    received: int
    decode_errors: dict[str, int]
    fields_skipped: int
    connected: bool
    subscribed: bool
    connects: int
    inbox: int = 0  # received by the MQTT client, not yet decoded (bounded by the window)
    disconnects: dict[str, int] = field(default_factory=dict)
    # How the MQTT messages were read (ingest.mqtt.session): parsed by our fast path, by paho,
    # or over the payload limit and kept in part.
    parsed_fast: int = 0
    parsed_paho: int = 0
    too_large: int = 0
    #: None without a Sparkplug route
    sparkplug: SparkplugStatistics | None = None


@dataclass(frozen=True, slots=True)
class BatcherStatistics:
    batches: int
    cut_by_rows: int
    cut_by_delay: int
    cut_by_window: int
    window: int
    observed_window: int | None


@dataclass(frozen=True, slots=True)
class AckStatistics:
    outstanding: int
    acknowledged: int
    lost_connection: int
    held_batches: int
    outstanding_bytes: int = 0  # payload bytes of the outstanding messages


@dataclass(frozen=True, slots=True)
class WriterStatistics:
    """Totals since the writer was created (anyio ``MemoryObjectStreamStatistics`` style).

    ``retries_by_class`` is keyed by :class:`ErrorClass` value (``transient``, ``row``);
    ``connected`` is whether the last database round trip succeeded; ``last_commit`` is a
    ``time.monotonic()`` value.
    """

    batches: int
    rows_inserted: int
    duplicates: int
    dead_letters: int
    retries_by_class: dict[str, int]
    connected: bool
    last_commit: float | None
    #: series rows this writer created, the (device, metric) pairs its cache holds, and the
    #: devices dropped from that cache when full (ingest.flow.series)
    series_created: int = 0
    series_cached: int = 0
    series_evicted: int = 0


@dataclass(frozen=True, slots=True)
class PipelineStatistics:
    received: int
    acknowledged: int
    outstanding: int
    rows_inserted: int
    duplicates: int
    dead_letters: int
    dead_reasons: dict[str, int]
    fields_skipped: int
    batches: int
    channel_depth: int
    channel_capacity: int
    window: int
    last_commit_lag: float | None
    subscribed: bool
    inbox: int = 0  # received by the MQTT client, not yet decoded


@dataclass(frozen=True, slots=True)
class DashboardStatistics:
    """What the dashboard fold (``ingest.db.dashboard``) has done since the daemon started.

    ``failing_since`` is the ``time.monotonic()`` of the first of the folds that have failed in
    a row, None while folds succeed; ``last_error`` names the last failure's error (type and
    message). ``set_aside`` counts the batches put aside because they could not be folded;
    ``pending_batches`` is how many committed batches wait to be folded, as last seen.
    """

    folds: int
    fold_failures: int
    failing_since: float | None
    set_aside: int
    pending_batches: int
    last_error: str | None = None
