"""The writer: stores batches in PostgreSQL, one transaction per batch (docs/design.md, stage 5).

Contract of :meth:`Writer.write`:

- A batch is stored in one transaction: the numeric and text readings of every decoded
  message, what its messages say about their devices (tags merged newest-wins per key, a status
  only when newer, units on the series: :mod:`ingest.flow.series`, written only when they
  changed since this writer last wrote them), and one ``dead_letters`` row per message that did
  not decode (``payload_size``: its size on the wire when the payload holds only its start, a
  ``too_large`` one). A message is stored whole or not at all.
- Readings are stored by series id: ``(device_id, metric)`` is resolved through a bounded cache,
  missing series created in bulk in their own short transaction first
  (:func:`ingest.flow.series.resolve`). Text values are stored as given: the formats skip those
  over ``INGEST_MAX_TEXT_BYTES`` (and count them).
- Idempotent on ``(device_id, metric, ts)``: the first write wins, later ones are counted as
  duplicates (redeliveries, and duplicates inside one batch).
- Fast path: binary COPY straight into ``points`` and ``text_points``. Only when that hits a
  unique violation is the batch redone, in a new transaction, through per-connection temporary
  tables and ``INSERT ... ON CONFLICT DO NOTHING`` (slower, conflict-safe).
- Dashboard tables (``devices``, ``latest_readings``, ``latest_text``, ``readings_1m``,
  ``readings_fleet_1m``)
  come from the rows a batch actually inserted, exactly once (:mod:`ingest.db.dashboard`):
  the batch's transaction tags its rows with a batch number and records the batch; a batch
  copied on the fast path (every row inserted) whose readings are at least two per series and
  minute on average also hands over its aggregates per series and minute
  (``dashboard_staged``, computed here in the pass that encodes the COPY data), which the fold
  then reads instead of its points. The dashboard tables are folded shortly after. A
  rolled-back batch (a rejected row, bisection) leaves nothing behind.
- Errors are sorted by :func:`ingest.flow.classify.classify`:

  - TRANSIENT: the batch is retried forever with capped jittered backoff; the caller's bounded
    channel holds the broker back meanwhile.
  - A write that outlasts ``write_timeout`` is cancelled and its connection terminated; then a
    tiny commit on another connection says who is to blame. Not done within ``ping_timeout``:
    the database is away (a blackholed server sends no reset), which is TRANSIENT. An answer:
    the batch is too slow, and it is narrowed down as ROW errors are (below); a message that
    still times out alone :data:`SLOW_ATTEMPTS_ALONE` times becomes a dead letter
    ``rejected_by_database`` ("write timed out ..."): one message holds back the
    acknowledgements of the others only while its own batch is written, about
    log2(messages) + SLOW_ATTEMPTS_ALONE write timeouts, never for good (docs/design.md,
    Limits). Waiting
    for a lock held elsewhere is nobody's data: ``lock_timeout`` (half of ``write_timeout``)
    turns it into 55P03, transient, before the write timeout could blame the batch.
  - ROW: the batch is narrowed down by bisection over its messages, committing the halves that
    pass, so only the messages whose rows the database rejects become dead letters (reason
    ``rejected_by_database``, raw payload kept). For n messages of which k are rejected this
    takes at most 2n - 1 transactions, about 2k·log2(n/k) in practice.
  - FATAL: :class:`~ingest.errors.FatalError` with the SQLSTATE, and the daemon stops.

Known limit: ``dead_letters`` has no natural key, so a commit whose acknowledgement is lost
with the connection is retried and stores its dead letters twice (readings stay exactly-once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from operator import itemgetter
from types import TracebackType
from typing import TYPE_CHECKING, Self, TypeAlias, TypeVar
from urllib.parse import parse_qs, urlsplit

import asyncpg

from ingest.backoff import Backoff
from ingest.db.dashboard import BEGIN_BATCH_SQL
from ingest.errors import ConfigError, DecodeError, FatalError
from ingest.flow.births import Birth, load_births
from ingest.flow.classify import ErrorClass, classify, sqlstate_of
from ingest.flow.pgcopy import (
    POINT_COLUMNS,
    STAGED_COLUMNS,
    PointsCopy,
    Rollups,
    TextRollups,
    TextsCopy,
    encode_staged,
    holds_huge,
)
from ingest.flow.series import (
    DeviceMemory,
    DevicePlan,
    SeriesCache,
    apply_plan,
    chunks,
    resolve,
    unit_keys,
)
from ingest.model import (
    DeadLetter,
    Decoded,
    DeviceUpdate,
    Envelope,
    Reading,
    TextReading,
    WriterStatistics,
)

__all__ = ["Batch", "WriteResult", "Writer", "batch_series", "store"]

_T = TypeVar("_T")
if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    from ingest.settings import Settings

    # Generic only in the stubs; at run time the annotations below stay strings.
    # A pool's connection (the daemon), or one of its own (ingest replay).
    _Conn: TypeAlias = PoolConnectionProxy[asyncpg.Record] | asyncpg.Connection[asyncpg.Record]

REJECTED_BY_DATABASE = "rejected_by_database"
#: Attempts a single message gets, alone, to be written within ``write_timeout`` while the
#: database answers a probe; then it is a dead letter instead of holding back the ones after it.
SLOW_ATTEMPTS_ALONE = 3

# In DeadLetter's field order: copy_records_to_table takes the records as they are.
_DEAD_LETTER_COLUMNS = ("received_at", "topic", "payload", "error", "reason", "payload_size")
_STAGING = {"points": "ingest_staging", "text_points": "ingest_staging_text"}
# Temporary, so per connection and never seen by others; ON COMMIT DELETE ROWS empties them at
# the end of every transaction that touched them (PostgreSQL skips that for transactions that
# did not). Only the columns COPY fills, not LIKE points (which has more: batch, with its
# default).
_CREATE_STAGING = """
    CREATE TEMPORARY TABLE IF NOT EXISTS ingest_staging
        (series_id integer, ts timestamptz, value double precision, batch bigint)
        ON COMMIT DELETE ROWS;
    CREATE TEMPORARY TABLE IF NOT EXISTS ingest_staging_text
        (series_id integer, ts timestamptz, value text, batch bigint) ON COMMIT DELETE ROWS
"""
# Staging rows come back in COPY order, so inside one batch the first occurrence wins too.
_INSERT_FROM_STAGING = """
    INSERT INTO {table} (series_id, ts, value, batch)
    SELECT series_id, ts, value, batch FROM {staging}
    ON CONFLICT (series_id, ts) DO NOTHING
"""

_TS = itemgetter(2)
_TLS_FILE_PARAMETERS = ("sslrootcert", "sslcert", "sslkey", "sslcrl")
# Allowed on a process of one's own role; false when it is gone already.
_TERMINATE = "SELECT pg_terminate_backend($1)"
_TERMINATE_AND_WAIT = "SELECT pg_terminate_backend($1, $2::bigint)"
# Writes a WAL record in a transaction (open to any role, no table needed), so its commit is
# flushed and waits for synchronous standbys as a batch's does; txid_current() alone would not
# (a transaction that wrote no WAL commits without either). Logical decoding consumers see a
# message with this prefix, after write timeouts only.
_COMMIT_PROBE = "SELECT pg_logical_emit_message(true, 'iot-ingest', 'probe')"


class _WriteTimeout(TimeoutError):
    """``write_timeout`` ran out in the middle of a write on server process ``pid``. Whether
    the database is away or the batch is too slow, a probe on another connection decides
    (:meth:`Writer._database_answers`)."""

    def __init__(self, message: str, pid: int) -> None:
        super().__init__(message)
        self.pid = pid


class _TooSlow(Exception):
    """A segment outlasted ``write_timeout`` while the database answered a probe promptly:
    the segment is the problem, not the database. Narrowed down like rejected rows."""


@dataclass(frozen=True, slots=True)
class Batch:
    """What one transaction stores: numeric and text readings, device updates, dead letters."""

    rows: Sequence[Reading]
    texts: Sequence[TextReading]
    updates: Sequence[DeviceUpdate]
    dead: Sequence[DeadLetter] = ()

    @classmethod
    def of(cls, messages: Iterable[Decoded], dead: Sequence[DeadLetter] = ()) -> Batch:
        rows: list[Reading] = []
        texts: list[TextReading] = []
        updates: list[DeviceUpdate] = []
        for decoded in messages:
            rows.extend(decoded.readings)
            texts.extend(decoded.texts)
            updates.extend(decoded.updates)
        return cls(rows, texts, updates, dead)

    def __bool__(self) -> bool:
        return bool(self.rows or self.texts or self.updates or self.dead)


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What one :meth:`Writer.write` did.

    ``retries`` counts the extra attempts the batch needed: transient retries plus the
    transactions spent narrowing down rejected rows.
    """

    inserted: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    dead_reasons: dict[str, int] = field(default_factory=dict)
    retries: int = 0


@dataclass(slots=True)
class _Tally:
    """Outcome of one ``write`` call while it is being built."""

    inserted: int = 0
    duplicates: int = 0
    dead: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    rejected: int = 0
    # Once a batch hit a unique violation its halves will too: skip the fast path for them.
    conflict_safe: bool = False

    def result(self) -> WriteResult:
        return WriteResult(
            inserted=self.inserted,
            duplicates=self.duplicates,
            dead_letters=sum(self.dead.values()),
            dead_reasons=dict(self.dead),
            retries=self.retries,
        )


class _OutageLog:
    """Logs a run of transient failures: the first at WARNING, then at most one line every
    ``interval`` seconds, and one line when it ends. Never a line per attempt."""

    def __init__(self, logger: logging.Logger, what: str, interval: float) -> None:
        self._log = logger
        self._what = what
        self._interval = interval
        self._attempts = 0
        self._started = 0.0
        self._last_line = 0.0

    def failed(self, exc: BaseException, delay: float) -> None:
        now = time.monotonic()
        self._attempts += 1
        if self._attempts == 1:
            self._started = self._last_line = now
            self._log.warning(
                "%s failed, retrying in %.2fs (further failures logged every %.0fs): %s",
                self._what,
                delay,
                self._interval,
                _describe(exc),
            )
        elif now - self._last_line >= self._interval:
            self._last_line = now
            self._log.warning(
                "%s still failing after %d attempts in %.0fs, retrying in %.2fs: %s",
                self._what,
                self._attempts,
                now - self._started,
                delay,
                _describe(exc),
            )

    def succeeded(self) -> None:
        if self._attempts:
            self._log.info(
                "%s succeeded after %d retries in %.1fs",
                self._what,
                self._attempts,
                time.monotonic() - self._started,
            )
            self._attempts = 0


class Writer:
    """Stores batches of :class:`~ingest.model.Envelope` in PostgreSQL (module docstring).

    An async context manager: entering waits for the database (never giving up while it is
    unreachable, stopping on a FATAL error such as bad credentials or a certificate that does
    not verify, and on a ConfigError when a TLS file the DSN names cannot be read, since
    asyncpg's error would say neither which nor that it is no outage); exiting closes the pool,
    terminating it when a graceful close takes longer than ``close_timeout``.
    """

    @classmethod
    def from_settings(cls, s: Settings) -> Self:
        """The writer of a daemon (or of a retire) configured by ``s``."""
        return cls(
            dsn=s.database_url,
            pool_size=s.db_pool_size,
            connect_timeout=s.db_connect_timeout,
            write_timeout=s.db_write_timeout,
            backoff_max=s.retry_max_delay,
            series_cache_size=s.series_cache_size,
            logger=logging.getLogger("ingest.writer"),
        )

    def __init__(
        self,
        *,
        dsn: str | None,
        pool_size: int = 2,
        connect_timeout: float = 10.0,
        write_timeout: float = 30.0,
        close_timeout: float = 10.0,
        ping_timeout: float = 5.0,
        backoff_initial: float = 0.2,
        backoff_max: float = 10.0,
        retry_log_interval: float = 10.0,
        application_name: str = "iot-ingest",
        series_cache_size: int = 1_000_000,
        logger: logging.Logger | None = None,
    ) -> None:
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("write_timeout", write_timeout),
            ("close_timeout", close_timeout),
            ("ping_timeout", ping_timeout),
            ("backoff_initial", backoff_initial),
            ("retry_log_interval", retry_log_interval),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size!r}")
        if backoff_max < backoff_initial:
            raise ValueError(
                f"backoff_max must be >= backoff_initial ({backoff_initial!r}), got {backoff_max!r}"
            )
        self._dsn = dsn
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._write_timeout = write_timeout
        self._close_timeout = close_timeout
        self._ping_timeout = ping_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._retry_log_interval = retry_log_interval
        self._application_name = application_name
        self._log = logger if logger is not None else logging.getLogger("ingest.writer")
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._batches = 0
        self._rows_inserted = 0
        self._duplicates = 0
        self._dead_letters = 0
        self._retries: Counter[str] = Counter()
        self._connected = False
        self._last_commit: float | None = None
        self._series = SeriesCache(series_cache_size)
        # Devices hold more than a series id each (tags, units): a fifth as many of them.
        self._device_memory = DeviceMemory(max(1, series_cache_size // 5))
        self._series_created = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._pool is not None:
            raise RuntimeError("Writer is already open")
        if unreadable := await asyncio.to_thread(_unreadable_tls_file, self._dsn):
            # Found by asyncpg, it would be an OSError at every attempt: an outage that never
            # ends, and one that does not name the file.
            raise ConfigError("INGEST_DATABASE_URL", unreadable)
        # min_size=0: creating the pool does no I/O; connections open on first use, so the
        # wait below (and every reconnect later) goes through one retry loop.
        pool: asyncpg.Pool[asyncpg.Record] = await asyncpg.create_pool(
            self._dsn,
            min_size=0,
            max_size=self._pool_size,
            timeout=self._connect_timeout,
            command_timeout=None,
            reset=_keep_session,
            init=self._init_connection,
            server_settings={"application_name": self._application_name},
        )
        self._pool = pool
        try:
            await self._retrying(self._probe, what="connecting to the database", tally=None)
        except BaseException as exc:
            self._pool = None
            pool.terminate()
            if isinstance(exc, Exception):
                raise _fatal("cannot connect to the database", exc) from exc
            raise
        self._log.info("database connected (pool of %d)", self._pool_size)
        return self

    async def _init_connection(self, conn: asyncpg.Connection[asyncpg.Record]) -> None:
        # A lock held elsewhere (an operator's ALTER TABLE, partition upkeep) is not the
        # batch's fault: waiting for it fails as "lock not available", retried whole, before
        # write_timeout could blame the batch and split it. A SET, not a startup parameter,
        # which connection poolers such as PgBouncer refuse.
        await conn.execute(f"SET lock_timeout = {max(1, round(self._write_timeout * 500))}")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pool, self._pool = self._pool, None
        self._connected = False
        if pool is None:
            return
        try:
            # Pool.close() waits for connections in use to come back, then closes each
            # politely; on a dead or blackholed server that could take forever.
            await asyncio.wait_for(pool.close(), self._close_timeout)
        except TimeoutError:
            self._log.warning(
                "database pool did not close within %.0fs; terminating it", self._close_timeout
            )
            pool.terminate()

    # -- public API ---------------------------------------------------------------------------

    async def write(self, envelopes: Sequence[Envelope]) -> WriteResult:
        """Store one batch (see the module docstring); returns what happened to it.

        Waits (retrying) while the database is unavailable; raises FatalError when it refuses
        the batch for a reason that neither retrying nor narrowing can fix.
        """
        self._require_pool()
        tally = _Tally()
        if not envelopes:
            return tally.result()
        try:
            await self._write_narrowing(envelopes, tally)
        finally:
            # Halves committed before a failure or a cancellation are in the database too.
            self._rows_inserted += tally.inserted
            self._duplicates += tally.duplicates
            self._dead_letters += sum(tally.dead.values())
        self._batches += 1
        return tally.result()

    async def ping(self) -> None:
        """One ``SELECT 1`` round trip within ``ping_timeout`` (readiness); raises on failure."""
        try:
            async with asyncio.timeout(self._ping_timeout):
                await self._probe()
        except BaseException:
            self._connected = False
            raise

    def statistics(self) -> WriterStatistics:
        return WriterStatistics(
            batches=self._batches,
            rows_inserted=self._rows_inserted,
            duplicates=self._duplicates,
            dead_letters=self._dead_letters,
            retries_by_class=dict(self._retries),
            connected=self._connected,
            last_commit=self._last_commit,
            series_created=self._series_created,
            series_cached=len(self._series),
            series_evicted=self._series.evicted,
        )

    # -- narrowing (ROW errors) ---------------------------------------------------------------

    async def _write_narrowing(self, envelopes: Sequence[Envelope], tally: _Tally) -> None:
        # A stack of segments, left half on top, so messages still commit in receive order
        # (and the first of two duplicates in one batch stays the one that wins). Each segment
        # carries how often it timed out alone.
        pending: list[tuple[Sequence[Envelope], int]] = [(envelopes, 0)]
        first_failure: BaseException | None = None
        while pending:
            segment, slow = pending.pop()
            failure = await self._try_segment(segment, tally)
            if failure is None:
                continue
            if first_failure is None:
                first_failure = failure
            self._count_retry(ErrorClass.ROW, tally)
            if len(segment) > 1:
                middle = len(segment) // 2
                pending.append((segment[middle:], 0))
                pending.append((segment[:middle], 0))
            elif isinstance(failure, _TooSlow) and slow + 1 < SLOW_ATTEMPTS_ALONE:
                pending.append((segment, slow + 1))
            else:
                await self._reject(segment[0], failure, tally)
        if first_failure is not None:
            self._log.warning(
                "batch of %d messages: %d rejected by the database (or too slow to write)"
                " became dead letters "
                "(%d extra attempts); first error: %s",
                len(envelopes),
                tally.rejected,
                tally.retries,
                _describe(first_failure),
            )

    async def _try_segment(self, segment: Sequence[Envelope], tally: _Tally) -> Exception | None:
        """Write ``segment``: None when it committed; the error when the database refused its
        rows or it was too slow (narrow it down); FatalError for anything else."""
        try:
            await self._write_segment(segment, (), tally)
        except _TooSlow as exc:
            return exc
        except Exception as exc:
            if classify(exc) is not ErrorClass.ROW:
                raise _fatal("cannot write to the database", exc) from exc
            return exc
        return None

    async def _reject(self, envelope: Envelope, exc: BaseException, tally: _Tally) -> None:
        """Store ``envelope`` alone as a dead letter, since the database refused it as is."""
        if isinstance(envelope.result, DecodeError):
            # Its own dead-letter row was refused (text the database cannot store).
            error, reason = str(envelope.result), envelope.result.reason
        elif isinstance(exc, _TooSlow):
            error, reason = f"{exc}, {SLOW_ATTEMPTS_ALONE} times alone", REJECTED_BY_DATABASE
        else:
            error, reason = _database_message(exc), REJECTED_BY_DATABASE
        dead = DeadLetter(
            received_at=envelope.received_at,
            topic=_storable(envelope.topic),
            payload=envelope.payload,
            error=_storable(error),
            reason=_storable(reason),
            payload_size=envelope.size,
        )
        self._log.debug("dead-lettering a message on %r: %s", envelope.topic, error)
        try:
            await self._write_segment((), (dead,), tally)
        except Exception as dead_exc:
            raise _fatal(
                f"cannot store the dead letter of a message on {envelope.topic!r}", dead_exc
            ) from dead_exc
        tally.rejected += 1

    # -- one segment, retried while transient --------------------------------------------------

    async def _write_segment(
        self, segment: Sequence[Envelope], extra_dead: Sequence[DeadLetter], tally: _Tally
    ) -> None:
        dead: list[DeadLetter] = list(extra_dead)
        decoded: list[Decoded] = []
        for envelope in segment:
            result = envelope.result
            if isinstance(result, DecodeError):
                dead.append(
                    DeadLetter(
                        received_at=envelope.received_at,
                        topic=envelope.topic,
                        payload=envelope.payload,
                        error=str(result),
                        reason=result.reason,
                        payload_size=envelope.size,
                    )
                )
            else:
                decoded.append(result)
        batch = Batch.of(decoded, dead)
        if not batch:
            return

        async def attempt() -> int:
            return await self._attempt(batch, tally)

        inserted = await self._retrying(attempt, what="database write", tally=tally)
        self._last_commit = time.monotonic()
        tally.inserted += inserted
        tally.duplicates += len(batch.rows) + len(batch.texts) - inserted
        tally.dead.update(d.reason for d in dead)

    async def _retrying(
        self, operation: Callable[[], Awaitable[_T]], *, what: str, tally: _Tally | None
    ) -> _T:
        """Run ``operation`` until it succeeds or fails with a non-TRANSIENT error."""
        backoff = Backoff(initial=self._backoff_initial, maximum=self._backoff_max)
        outage = _OutageLog(self._log, what, self._retry_log_interval)
        while True:
            try:
                result = await operation()
            except Exception as exc:
                if classify(exc) is not ErrorClass.TRANSIENT:
                    raise
                if isinstance(exc, _WriteTimeout) and await self._database_answers(exc.pid):
                    raise _TooSlow(
                        f"write timed out after {self._write_timeout:g}s"
                        " (INGEST_DB_WRITE_TIMEOUT) while the database answered"
                    ) from exc
                self._connected = False
                self._count_retry(ErrorClass.TRANSIENT, tally)
                delay = backoff.next_delay()
                outage.failed(exc, delay)
                await asyncio.sleep(delay)
                continue
            self._connected = True
            outage.succeeded()
            return result

    def _count_retry(self, error_class: ErrorClass, tally: _Tally | None) -> None:
        self._retries[error_class.value] += 1
        if tally is not None:
            tally.retries += 1

    # -- one attempt on one connection ---------------------------------------------------------

    async def _attempt(self, batch: Batch, tally: _Tally) -> int:
        async with self._connection() as conn:
            pid = conn.get_server_pid()
            try:
                async with asyncio.timeout(self._write_timeout):
                    # Committed before the batch's transaction starts: see ingest.flow.series.
                    ids, created = await batch_series(conn, self._series, batch)
                    self._series_created += created
                    plan = self._device_memory.plan(batch.updates)
                    inserted = await self._first_try(conn, batch, ids, plan, tally)
                    self._device_memory.remember(plan)
                    return inserted
            except TimeoutError as exc:
                raise _WriteTimeout(
                    f"no answer within write_timeout={self._write_timeout:g}s,"
                    " connection presumed dead",
                    pid,
                ) from exc

    async def _first_try(
        self, conn: _Conn, batch: Batch, ids: list[int], plan: DevicePlan, tally: _Tally
    ) -> int:
        """The fast path (COPY straight into the tables), then, if the batch holds keys stored
        already, the conflict-safe one."""
        if not tally.conflict_safe:
            try:
                return await self._transaction(conn, batch, ids, plan, conflict_safe=False)
            except asyncpg.UniqueViolationError:
                self._log.debug("batch holds duplicates: redoing it conflict-safe")
                tally.conflict_safe = True
        return await self._transaction(conn, batch, ids, plan, conflict_safe=True)

    async def _transaction(
        self,
        conn: _Conn,
        batch: Batch,
        ids: list[int],
        plan: DevicePlan,
        *,
        conflict_safe: bool,
    ) -> int:
        transaction = conn.transaction()
        await transaction.start()
        try:
            inserted = await store(conn, batch, ids, plan, conflict_safe=conflict_safe)
        except Exception as exc:
            # Refused data leaves a healthy connection: roll back and keep it. Anything else
            # (lost connection, timeout, cancellation) leaves it in an unknown state, and a
            # ROLLBACK could hang on a blackholed server: _connection() terminates it instead.
            if classify(exc) is ErrorClass.ROW:
                await transaction.rollback()
            raise
        await transaction.commit()
        return inserted

    async def _database_answers(self, pid: int) -> bool:
        """After a write on server process ``pid`` timed out: does the database commit a tiny
        transaction on another connection within ``ping_timeout``? Yes: the write was too slow.
        No: the database (or the path to it) is away, and nothing may become a dead letter for
        that.

        A commit, not a ``SELECT 1``: a server whose commits hang (storage stalled, a
        synchronous standby gone) still answers reads, and every batch would look too slow.
        First it ends that process: a server does not notice that its client left until it
        next writes to it, and meanwhile the abandoned transaction holds the keys of its rows,
        on which the next attempt would wait.
        """
        try:
            async with self._connection() as conn, asyncio.timeout(self._ping_timeout):
                if conn.get_server_version().major >= 14:
                    # Waits (server side) until the process is gone and its locks with it.
                    await conn.fetchval(_TERMINATE_AND_WAIT, pid, round(self._ping_timeout * 1000))
                else:
                    await conn.fetchval(_TERMINATE, pid)
                await conn.fetchval(_COMMIT_PROBE)
        except Exception as exc:
            self._log.debug("probe after a write timeout failed: %s", _describe(exc))
            return False
        self._connected = True
        return True

    async def sparkplug_births(self, page: int = 1000) -> AsyncIterator[list[Birth]]:
        """The Sparkplug births stored (``ingest.flow.births``), oldest first, a page at a
        time (a connection held only while a page is read)."""
        after: Birth | None = None
        while True:
            async with self._connection() as conn:
                births = await load_births(conn, after, page)
            if births:
                yield births
            if len(births) < page:
                return
            after = births[-1]

    async def _probe(self) -> None:
        async with self._connection() as conn, asyncio.timeout(self._write_timeout):
            await conn.fetchval("SELECT 1")
        self._connected = True

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[_Conn]:
        """A pooled connection, terminated rather than reused when an error left it in doubt."""
        pool = self._require_pool()
        conn = await pool.acquire(timeout=self._connect_timeout)
        try:
            yield conn
        except BaseException as exc:
            refused_data = isinstance(exc, Exception) and classify(exc) is ErrorClass.ROW
            # A connection that died already was handed back to the pool by asyncpg, and its
            # proxy then raises InterfaceError on every call: nothing is left to terminate.
            with suppress(asyncpg.InterfaceError):
                if not refused_data or conn.is_in_transaction():
                    conn.terminate()
            raise
        finally:
            await pool.release(conn, timeout=self._connect_timeout)

    def _require_pool(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._pool is None:
            raise RuntimeError("Writer is not open: use it as `async with Writer(...)`")
        return self._pool


async def batch_series(conn: _Conn, cache: SeriesCache, batch: Batch) -> tuple[list[int], int]:
    """The series ids of ``batch`` for :func:`store` (the readings', the texts', then the
    units', in order) and how many series were created, committed outside any transaction
    (:func:`ingest.flow.series.resolve`)."""
    keys: list[Sequence[object]] = [*batch.rows, *batch.texts, *unit_keys(batch.updates)]
    return await resolve(conn, cache, keys)


async def store(
    conn: _Conn,
    batch: Batch,
    ids: list[int],
    plan: DevicePlan,
    *,
    conflict_safe: bool,
) -> int:
    """All the SQL that stores a batch, inside the caller's transaction: ``ids`` from
    :func:`batch_series` (before that transaction), ``plan`` what its device updates change.
    Conflict-safe or not: see the module docstring (fast path). ``ingest replay`` stores
    through this too.

    Returns how many of its numeric and text readings were inserted (the rest were
    duplicates). Anything else that must change with the batch, in the same transaction
    (its record for the dashboard fold, its device updates), belongs here.
    """
    inserted = 0
    # ids: the readings', the texts', then the units' (batch_series)
    units_at = len(batch.rows) + len(batch.texts)
    if units_at:
        inserted = await _store_readings(conn, batch, ids, conflict_safe=conflict_safe)
    if plan:
        units = unit_keys(batch.updates)
        await apply_plan(conn, plan, dict(zip(units, ids[units_at:], strict=True)))
    if batch.dead:
        await conn.copy_records_to_table(
            "dead_letters", records=batch.dead, columns=_DEAD_LETTER_COLUMNS
        )
    return inserted


async def _store_readings(conn: _Conn, batch: Batch, ids: list[int], *, conflict_safe: bool) -> int:
    """The readings and texts of ``batch``, its ``dashboard_pending`` row and, when they pay,
    its staged aggregates (module docstring); the rows inserted."""
    # Tags the rows below with a new batch, recorded for ingest.db.dashboard.fold.
    stamps = [*map(_TS, batch.rows), *map(_TS, batch.texts)]
    number = int(await conn.fetchval(BEGIN_BATCH_SQL, min(stamps), max(stamps)))
    (points, rollups), (texts, text_rollups) = await _encode(batch, ids, number)
    tables = [("points", points, batch.rows), ("text_points", texts, batch.texts)]
    if conflict_safe:
        await conn.execute(_CREATE_STAGING)
    inserted = 0
    for table, data, rows in tables:
        if rows:
            inserted += await _copy(conn, table, data, conflict_safe=conflict_safe)
    # Every row was inserted (or the COPY failed): the aggregates computed here are those of
    # the rows stored. Handed over only where they are fewer than the points (the fold then
    # reads them instead), and never for values the fold sums in numeric.
    aggregates = len(rollups) + len(text_rollups)
    if not conflict_safe and aggregates <= inserted // 2 and not holds_huge(rollups):
        staged = encode_staged(number, rollups, text_rollups)
        await conn.copy_to_table(
            "dashboard_staged", source=_one_chunk(staged), columns=STAGED_COLUMNS, format="binary"
        )
    return inserted


async def _encode(
    batch: Batch, ids: list[int], number: int
) -> tuple[tuple[bytes, Rollups], tuple[bytes, TextRollups]]:
    """The COPY data of ``batch``'s points and texts, with their dashboard aggregates, encoded
    ingest.flow.series.ROWS_BETWEEN_TURNS rows at a time (~0.5 us a row), letting the other tasks
    turn between. A worker thread instead cost more than the encoding (measured: about 6% of
    the drain benchmark's rate)."""
    points, texts = PointsCopy(number), TextsCopy(number)
    texts_at = len(batch.rows)
    for start, end in chunks(len(batch.rows)):
        if start:
            await asyncio.sleep(0)
        points.add(batch.rows[start:end], ids[start:end])
    for start, end in chunks(len(batch.texts)):
        if start or texts_at:
            await asyncio.sleep(0)
        texts.add(batch.texts[start:end], ids[texts_at + start : texts_at + end])
    return (points.data(), points.rollups), (texts.data(), texts.rollups)


def _unreadable_tls_file(dsn: str | None) -> str | None:
    """What is wrong with the first TLS file the DSN names (``sslrootcert``, ``sslcert``,
    ``sslkey``, ``sslcrl``) that cannot be read, or None. Only the parameter and its path are
    told, never the DSN (it may hold a password)."""
    try:
        query = parse_qs(urlsplit(dsn or "").query)
    except ValueError:
        return None  # a malformed DSN is asyncpg's to refuse
    for name in _TLS_FILE_PARAMETERS:
        for path in query.get(name, ()):
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                return f"{name} {path!r} cannot be read: {exc.strerror or exc}"
    return None


async def _copy(conn: _Conn, table: str, data: bytes, *, conflict_safe: bool) -> int:
    """Binary COPY of ``data`` (ingest.flow.pgcopy) into ``table``, or, conflict-safe, into its
    staging table and from there with ``ON CONFLICT DO NOTHING``; the rows inserted."""
    if not conflict_safe:
        status = await conn.copy_to_table(
            table, source=_one_chunk(data), columns=POINT_COLUMNS, format="binary"
        )
        return _status_count(status)
    staging = _STAGING[table]
    await conn.copy_to_table(
        staging, source=_one_chunk(data), columns=POINT_COLUMNS, format="binary"
    )
    return _status_count(
        await conn.execute(_INSERT_FROM_STAGING.format(table=table, staging=staging))
    )


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    # asyncpg takes the data as an async iterable of chunks (its stubs have no plain buffer).
    yield data


async def _keep_session(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Pool reset hook: the connections are ours alone, so skip asyncpg's default RESET ALL
    round trip on every release (and keep the session's staging table)."""


def _status_count(status: str) -> int:
    # "COPY 1000", "INSERT 0 998"
    return int(status.rsplit(" ", 1)[-1])


def _describe(exc: BaseException) -> str:
    state = sqlstate_of(exc)
    where = f" [SQLSTATE {state}]" if state else ""
    return f"{type(exc).__name__}{where}: {str(exc) or 'no message'}"


def _fatal(context: str, exc: BaseException) -> FatalError:
    return FatalError(f"{context}: {_describe(exc)} ({classify(exc).value}, not retried)")


def _database_message(exc: BaseException) -> str:
    if isinstance(exc, asyncpg.PostgresError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _storable(text: str) -> str:
    """``text`` with what PostgreSQL cannot hold in a text column (NUL, lone surrogates)
    escaped, so a dead letter can always be stored; the raw payload stays intact."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
