"""The ``sessions`` table (migrations/0007_sessions.sql): which persistent MQTT sessions the
daemons opened, so that the ones of workers that are gone can be found and retired.

* :class:`Recorder` runs beside the daemon's pipeline: it upserts the daemon's row at each
  connect, refreshes ``last_seen`` at most once a minute while connected, and marks a clean
  disconnect. It reads the source's counters, so it never sits in the pipeline's way, and a
  failure is logged and retried, never fatal and never counted as bad data (a permission
  error, SQLSTATE 42501, is named as such).
* The queries ``ingest sessions`` and the supervisor use: :func:`fetch_sessions`,
  :func:`mark_retired`, and the rule that tells a session that may be live (:func:`is_live`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Final, NamedTuple

import anyio
import asyncpg

from ingest.backoff import Backoff
from ingest.db.dashboard import describe_error

__all__ = [
    "LIVE_WINDOW",
    "REFRESH_INTERVAL",
    "Recorder",
    "SessionRow",
    "fetch_sessions",
    "in_family",
    "is_live",
    "mark_retired",
]

#: ``last_seen`` is refreshed this often (seconds) while connected.
REFRESH_INTERVAL: Final = 60.0
#: A session seen this recently that did not disconnect cleanly may be live: two refreshes.
LIVE_WINDOW: Final = timedelta(seconds=2 * REFRESH_INTERVAL)
# How often the recorder looks at the source's counters (a connect is recorded this soon).
_POLL: Final = 1.0
_TIMEOUT: Final = 10.0

_UPSERT_SQL: Final = """
    INSERT INTO sessions AS s (client_id, broker, share_group, first_seen, last_seen)
    VALUES ($1, $2, $3, now(), now())
    ON CONFLICT (client_id) DO UPDATE SET
        broker = excluded.broker,
        share_group = excluded.share_group,
        -- a retired client id used again starts a new session
        first_seen = CASE WHEN s.retired_at IS NULL THEN s.first_seen ELSE now() END,
        last_seen = now(),
        disconnected_at = NULL,
        retired_at = NULL
"""
_TOUCH_SQL: Final = "UPDATE sessions SET last_seen = now() WHERE client_id = $1"
_LEFT_SQL: Final = (
    "UPDATE sessions SET last_seen = now(), disconnected_at = now() WHERE client_id = $1"
)
_FETCH_SQL: Final = """
    SELECT client_id, broker, share_group, first_seen, last_seen, disconnected_at, retired_at,
           now() AS now
    FROM sessions WHERE $1::text[] IS NULL OR client_id = ANY ($1::text[])
    ORDER BY broker, client_id
"""
_RETIRED_SQL: Final = """
    INSERT INTO sessions AS s (client_id, broker, share_group, retired_at)
    VALUES ($1, $2, $3, now())
    ON CONFLICT (client_id) DO UPDATE SET retired_at = now()
"""


class SessionRow(NamedTuple):
    client_id: str
    broker: str
    share_group: str | None
    first_seen: datetime | None
    last_seen: datetime | None
    disconnected_at: datetime | None
    retired_at: datetime | None
    #: the database's clock when the row was read (liveness is judged against it)
    now: datetime


def is_live(row: SessionRow) -> bool:
    """May a worker be connected with this client id right now? Yes while it was seen within
    :data:`LIVE_WINDOW` and has neither disconnected cleanly nor been retired since. Connecting
    with a live worker's id would take it over (the broker disconnects the first of two)."""
    return (
        row.retired_at is None
        and row.disconnected_at is None
        and row.last_seen is not None
        and row.now - row.last_seen < LIVE_WINDOW
    )


def in_family(client_id: str, base: str) -> bool:
    """Is ``client_id`` one a daemon started with client id ``base`` may use: ``base`` itself
    (one worker), ``base-<i>`` (``--workers N``) or ``base-b<k>-<i>`` (several brokers)?"""
    return (
        client_id == base
        or re.fullmatch(re.escape(base) + r"-(?:b\d+-)?\d+", client_id) is not None
    )


async def fetch_sessions(
    conn: asyncpg.Connection[asyncpg.Record], client_ids: Sequence[str] | None = None
) -> list[SessionRow]:
    """Every recorded session (or those of ``client_ids``), by broker and client id."""
    rows = await conn.fetch(_FETCH_SQL, None if client_ids is None else list(client_ids))
    return [SessionRow(*r) for r in rows]


async def mark_retired(
    conn: asyncpg.Connection[asyncpg.Record], client_id: str, broker: str, share_group: str | None
) -> None:
    """Set ``retired_at`` (a row is made for a client id the table did not know)."""
    await conn.execute(_RETIRED_SQL, client_id, broker, share_group)


class Recorder:
    """Keeps this daemon's row of ``sessions`` current; the daemon runs :meth:`run` as a task
    and calls :meth:`left` after a clean drain.

    ``status`` returns the source's ``(connects, subscribed)``: a new connect is upserted within
    a second, and ``last_seen`` refreshed every :data:`REFRESH_INTERVAL` while subscribed."""

    def __init__(
        self,
        dsn: str | None,
        *,
        client_id: str,
        broker: str,
        share_group: str | None,
        status: Callable[[], tuple[int, bool]],
        log: logging.Logger,
        refresh_interval: float = REFRESH_INTERVAL,
    ) -> None:
        self._dsn = dsn
        self._client_id = client_id
        self._broker = broker
        self._share_group = share_group
        self._status = status
        self._log = log
        # Nothing waits on this row: retries slow down to one a refresh interval (and so do the
        # log lines of a failure that lasts, a missing privilege say).
        self._backoff = Backoff(initial=1.0, maximum=refresh_interval)
        self._refresh = refresh_interval
        self._recorded_connects = 0
        self._touched_at: float | None = None  # monotonic time of the last write that worked
        self.failures = 0

    async def run(self) -> None:
        while True:
            connects, subscribed = self._status()
            now = anyio.current_time()
            due = self._touched_at is None or now - self._touched_at >= self._refresh
            if connects > self._recorded_connects:
                args = (self._client_id, self._broker, self._share_group)
                if await self._write(_UPSERT_SQL, *args):
                    self._recorded_connects = connects
                    self._touched_at = now
            elif subscribed and due and await self._write(_TOUCH_SQL, self._client_id):
                self._touched_at = now
            await anyio.sleep(_POLL)

    async def left(self) -> None:
        """After a clean drain (the session kept at the broker, nobody connected to it): a
        later ``ingest sessions retire`` need not wait for the row to age. A connect not
        recorded yet (stopped within a second of it) is recorded first. Best effort."""
        connects, _ = self._status()
        if connects > self._recorded_connects:
            args = (self._client_id, self._broker, self._share_group)
            if not await self._write(_UPSERT_SQL, *args, retry=False):
                return
            self._recorded_connects = connects
        if self._recorded_connects:
            await self._write(_LEFT_SQL, self._client_id, retry=False)

    async def _write(self, sql: str, *args: object, retry: bool = True) -> bool:
        """One statement on a connection of its own (never one of the writer's); on failure
        log and wait out a backoff, so the next try comes later. True when it worked."""
        try:
            with anyio.fail_after(_TIMEOUT):
                conn = await asyncpg.connect(
                    self._dsn,
                    timeout=_TIMEOUT,
                    server_settings={"application_name": "iot-ingest sessions"},
                )
                try:
                    await conn.execute(sql, *args)
                finally:
                    conn.terminate()
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self._failed(exc)
            if retry:
                await anyio.sleep(self._backoff.next_delay())
            return False
        if self.failures:
            self._log.info("sessions table written again after %d failures", self.failures)
        self.failures = 0
        self._backoff.reset()
        return True

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        if getattr(exc, "sqlstate", None) == "42501":
            self._log.error(
                "cannot record session %s: permission denied (SQLSTATE 42501): the login needs "
                "ingest_writer's privileges on table sessions (run ingest migrate); retrying: %s",
                self._client_id,
                describe_error(exc),
            )
            return
        level = logging.WARNING if self.failures < 5 else logging.DEBUG
        if self.failures == 5:
            self._log.warning("sessions table still failing; further failures logged at DEBUG")
        self._log.log(
            level,
            "cannot record session %s (attempt %d, retried): %s",
            self._client_id,
            self.failures,
            describe_error(exc),
        )
