"""Retiring sessions: drain the persistent session of a worker that is gone, then end it.

A worker's persistent session keeps its share of a shared subscription while the worker is
away: the broker queues messages for it until the session expires (7 days by default). When a
worker set shrinks (``--workers 8`` restarted as ``--workers 4``), the sessions of the workers
that are gone hold messages nobody reads. Retiring one, for each client id:

1. refuse when the sessions table does not know it (unless ``broker`` says where it is) or when
   it may be live (:func:`ingest.db.sessions.is_live`; unless ``force``): connecting with a
   live worker's client id would take its connection over;
2. connect as that client id keeping its session, unsubscribe from the route filters (the
   broker adds nothing new to it; what it queued is still delivered), and run what arrives
   through the normal pipeline (decode, batch, write, acknowledge after commit:
   ``ingest.flow.pipeline``, with a retiring ``Source``), until nothing has arrived for ``idle``
   seconds and nothing is outstanding; then drain the pipeline as a daemon does at shutdown;
3. end the session at the broker (a clean-session connection: ``ingest.mqtt.session.
   end_session``) and set ``retired_at``.

A failure at any step leaves the session at the broker (what was not acknowledged is delivered
again next time): retiring again later is always safe. Up to four client ids are retired at once.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiomqtt
import anyio
import anyio.to_thread
import asyncpg

from ingest.db import dashboard
from ingest.db.sessions import SessionRow, fetch_sessions, is_live, mark_retired
from ingest.errors import ConfigError, FatalError, describe_root
from ingest.flow.acker import Acker
from ingest.flow.pipeline import Pipeline
from ingest.flow.source import Source
from ingest.flow.writer import Writer
from ingest.mqtt.session import end_session
from ingest.mqtt.tls import credentials, tls_context
from ingest.settings import Settings
from ingest.urls import UrlError, broker_name

__all__ = ["DEFAULT_IDLE", "Outcome", "retire_sessions"]

#: Seconds without a message (and nothing outstanding) after which a session counts as drained.
DEFAULT_IDLE: Final = 5.0
#: Sessions drained at once, each with its own pool of INGEST_DB_POOL_SIZE connections: a
#: long list must not exhaust the server's max_connections (the writer would wait forever).
_AT_ONCE: Final = 4
_PROGRESS_EVERY: Final = 2.0
_TICK: Final = 0.1


@dataclass(frozen=True, slots=True)
class Outcome:
    """What retiring one client id did. ``error`` is None when it was retired."""

    client_id: str
    broker: str | None
    drained: int = 0
    rows: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    #: from the start to the session ended (the idle wait included)
    seconds: float = 0.0
    #: from the start to the last message acknowledged: what the rate is measured over
    drain_seconds: float = 0.0
    held_session: bool | None = None
    error: str | None = None

    @property
    def retired(self) -> bool:
        return self.error is None

    @property
    def rate(self) -> float:
        return self.drained / self.drain_seconds if self.drain_seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "retired": self.retired,
            "msgs_per_s": round(self.rate, 1),
        }


@dataclass(frozen=True, slots=True)
class _Plan:
    client_id: str
    broker: str  # the broker's name (no user info)
    settings: Settings  # the client id's own: its broker, client id and share group


async def retire_sessions(
    settings: Settings,
    client_ids: Sequence[str],
    *,
    broker: str | None = None,
    idle: float = DEFAULT_IDLE,
    force: bool = False,
    log: logging.Logger | None = None,
) -> list[Outcome]:
    """Retire each of ``client_ids`` (in the order given); one :class:`Outcome` each. Raises
    only when the sessions table cannot be read (``FatalError`` naming the cause)."""
    log = log or logging.getLogger("ingest.sessions")
    rows = await _read_rows(settings, client_ids)
    outcomes: dict[str, Outcome] = {}
    plans: list[_Plan] = []
    for cid in dict.fromkeys(client_ids):
        plan = _plan(settings, cid, rows.get(cid), broker=broker, force=force)
        if isinstance(plan, Outcome):
            outcomes[cid] = plan
        else:
            plans.append(plan)
    stop = anyio.Event()
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                _watch_signals, signals, stop, tg.cancel_scope, log, name="ingest[signals]"
            )
            at_once = anyio.CapacityLimiter(_AT_ONCE)
            async with anyio.create_task_group() as work:
                for plan in plans:

                    async def one(p: _Plan = plan) -> None:
                        async with at_once:
                            outcomes[p.client_id] = await _retire_one(p, idle, stop, log)

                    work.start_soon(one, name=f"ingest[retire {plan.client_id}]")
            tg.cancel_scope.cancel()
    for plan in plans:
        if plan.client_id not in outcomes:  # a second signal forced the stop
            outcomes[plan.client_id] = Outcome(
                plan.client_id, plan.broker, error=f"{_FORCED}: the session is kept at the broker"
            )
    return [outcomes[cid] for cid in dict.fromkeys(client_ids)]


_FORCED: Final = (
    "forced to stop before its drain ended (unacknowledged messages are delivered again)"
)


async def _watch_signals(
    signals: Any, stop: anyio.Event, scope: anyio.CancelScope, log: logging.Logger
) -> None:
    """The first signal stops reading (what is in hand is written and acknowledged, the
    sessions are kept); a second one forces, like the daemon's."""
    async for signum in signals:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.warning("%s again: forcing the stop", name)
            scope.cancel()
            return
        log.info("%s: stop draining; the sessions not drained yet are kept at the broker", name)
        stop.set()


async def _read_rows(settings: Settings, client_ids: Sequence[str]) -> dict[str, SessionRow]:
    try:
        conn = await asyncpg.connect(settings.database_url, timeout=settings.db_connect_timeout)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise FatalError(f"cannot reach the database: {describe_root(exc)}") from exc
    try:
        return {r.client_id: r for r in await fetch_sessions(conn, client_ids)}
    except asyncpg.UndefinedTableError as exc:
        raise FatalError(
            "the database has no sessions table: run `ingest migrate` (migration 0007)"
        ) from exc
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise FatalError(f"cannot read the sessions table: {describe_root(exc)}") from exc
    finally:
        conn.terminate()


def _plan(
    settings: Settings, cid: str, row: SessionRow | None, *, broker: str | None, force: bool
) -> _Plan | Outcome:
    """What to connect to for ``cid``, or the Outcome that refuses it."""
    if row is None and broker is None:
        return Outcome(
            cid,
            None,
            error=f"unknown client id {cid}: the sessions table has no row for it (no daemon "
            "recorded it); give --broker URL to retire it anyway",
        )
    if row is not None and is_live(row) and not force:
        assert row.last_seen is not None
        ago = (row.now - row.last_seen).total_seconds()
        return Outcome(
            cid,
            row.broker,
            error=f"client id {cid} may be live: seen {ago:.0f}s ago at {row.broker} and it "
            "did not disconnect cleanly (connecting with its id would disconnect a running "
            "worker); stop that worker, or wait 2 minutes after it stopped, or use --force",
        )
    url = broker if broker is not None else row.broker if row is not None else ""
    try:
        name = broker_name(url)
    except UrlError as exc:
        return Outcome(cid, None, error=f"--broker: {exc}")
    # The configured broker when it is the same one: its settings carry the login and TLS files.
    own = _own_broker(settings, name) if broker is None else None
    group = row.share_group if row is not None else settings.share_group
    try:
        if own is not None:
            mine = dataclasses.replace(own, client_id=cid, share_group=group, workers=1)
        else:
            mine = dataclasses.replace(
                settings, client_id=cid, share_group=group, mqtt_url=url, brokers=None, workers=1
            )
    except ConfigError as exc:
        return Outcome(cid, name, error=str(exc))
    return _Plan(cid, name, mine)


def _own_broker(settings: Settings, name: str) -> Settings | None:
    """The single-broker settings of the configured broker named ``name`` (one of several when
    ``INGEST_MQTT_URL`` lists them), or None when none is."""
    try:
        return next(
            (b for b in settings.broker_settings() if b.mqtt_endpoint().name() == name), None
        )
    except ConfigError:
        return None


async def _retire_one(plan: _Plan, idle: float, stop: anyio.Event, log: logging.Logger) -> Outcome:
    started = time.monotonic()
    try:
        pipeline, held, quiet_at = await _drain(plan.settings, idle, stop, log)
        st = pipeline.statistics()
        drained = Outcome(
            plan.client_id,
            plan.broker,
            drained=st.acknowledged,
            rows=st.rows_inserted,
            duplicates=st.duplicates,
            dead_letters=st.dead_letters,
            seconds=time.monotonic() - started,
            drain_seconds=max(quiet_at - started, 0.0),
            held_session=held,
        )
        if stop.is_set():
            return dataclasses.replace(
                drained, error="interrupted: the session is kept at the broker"
            )
        await _end(plan)
    except Exception as exc:  # every step names its cause; the session stays at the broker
        log.debug("retiring %s failed", plan.client_id, exc_info=exc)
        return Outcome(
            plan.client_id,
            plan.broker,
            seconds=time.monotonic() - started,
            error=f"{describe_root(exc)} (the session is kept at the broker)",
        )
    try:
        await _mark(plan)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return dataclasses.replace(
            drained,
            error=f"ended at the broker, but retired_at not set: {describe_root(exc)}",
        )
    log.info(
        "retired %s at %s: %d messages drained in %.1fs (%.0f msg/s), %d rows written, "
        "%d duplicates, %d dead letters; ended %.1fs after the start%s",
        plan.client_id,
        plan.broker,
        drained.drained,
        drained.drain_seconds,
        drained.rate,
        drained.rows,
        drained.duplicates,
        drained.dead_letters,
        drained.seconds,
        "" if held else "; the broker held no session for it",
    )
    return drained


async def _drain(
    settings: Settings, idle: float, stop: anyio.Event, log: logging.Logger
) -> tuple[Pipeline, bool | None, float]:
    """The session's backlog through the normal pipeline, until it is idle (or ``stop``); also
    when it went quiet (``time.monotonic()``: the last message received and acknowledged)."""
    sources: list[Source] = []
    quiet_at = [time.monotonic()]

    def source(acker: Acker, drained: anyio.Event) -> Source:
        sources.append(Source(settings, acker=acker, drained=drained, log=log, retiring=True))
        return sources[0]

    s = settings
    async with Writer.from_settings(s) as writer:
        pipeline = Pipeline(s, writer, source=source, log=log)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_until_idle, pipeline, s.client_id, idle, stop, log, quiet_at)
            await pipeline.run()
            tg.cancel_scope.cancel()
    return pipeline, sources[0].session_present, quiet_at[0]


async def _until_idle(
    pipeline: Pipeline,
    client_id: str,
    idle: float,
    stop: anyio.Event,
    log: logging.Logger,
    quiet_at: list[float],
) -> None:
    """Stop the pipeline reading once the session is drained: connected and unsubscribed,
    nothing received for ``idle`` seconds, nothing outstanding. A progress line meanwhile;
    ``quiet_at[0]``: when it last received or acknowledged (``time.monotonic()``)."""
    last_received = -1
    quiet_since = anyio.current_time()
    next_line = quiet_since + _PROGRESS_EVERY
    line_received, line_t = 0, quiet_since
    while not stop.is_set():
        await anyio.sleep(_TICK)
        st = pipeline.statistics()
        now = anyio.current_time()
        if not st.subscribed or st.received != last_received or st.outstanding:
            last_received = st.received
            quiet_since = now
            quiet_at[0] = time.monotonic()
        elif now - quiet_since >= idle:
            break
        if now >= next_line and st.received:
            rate = (st.received - line_received) / (now - line_t)
            log.info(
                "draining %s: %d messages, %.0f msg/s, %d unacknowledged",
                client_id,
                st.received,
                rate,
                st.outstanding,
            )
            line_received, line_t, next_line = st.received, now, now + _PROGRESS_EVERY
    pipeline.stop_reading()


async def _end(plan: _Plan) -> None:
    s = plan.settings
    login = credentials(s)
    try:
        tls = await anyio.to_thread.run_sync(tls_context, s)
        await end_session(
            s.mqtt_endpoint(),
            client_id=plan.client_id,
            protocol=s.mqtt_protocol,
            username=login.username,
            password=login.password,
            tls_context=tls,
        )
    except aiomqtt.MqttError as exc:
        raise FatalError(f"drained, but could not end the session at {plan.broker}: {exc}") from exc


async def _mark(plan: _Plan) -> None:
    """``retired_at``, then the dashboard tables folded (best effort: a daemon folds later)."""
    s = plan.settings
    conn = await asyncpg.connect(s.database_url, timeout=s.db_connect_timeout)
    try:
        await mark_retired(conn, plan.client_id, plan.broker, s.share_group)
        with anyio.move_on_after(10):
            await dashboard.fold(conn)
    finally:
        conn.terminate()
