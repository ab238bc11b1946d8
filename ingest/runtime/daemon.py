"""Lifecycle of ``ingest run``: start-up, signals, stats lines, shutdown, exit status.

* Start-up waits for the database (and the broker, in the source) with backoff: a server that
  is not up yet is never a reason to exit.
* The first SIGTERM/SIGINT drains: stop reading, flush, commit, acknowledge, disconnect keeping
  the session, bounded by ``shutdown_timeout`` (exit 0; 1 if the timeout ran out: whatever was
  not acknowledged is redelivered next time). A second signal forces (exit 1), like uvicorn.
* Beside the pipeline: the session's row of the ``sessions`` table kept current
  (``ingest.db.sessions``), and, for a daemon that is not a supervisor's worker, the sessions
  an earlier run of its client id left behind retired once (``ingest.runtime.surplus``).
* A fatal error stops the daemon with one line naming its root cause, unwrapped from task
  groups, with the SQLSTATE of a database error (exit 1): ``fatal: permission denied for
  table dashboard_pending (SQLSTATE 42501)``. Anything that escapes the flow is fatal: the
  stages retry what is transient themselves.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import anyio
import asyncpg
from anyio import CancelScope

from ingest.db import dashboard, partitions
from ingest.db.migrate import migrate_dsn
from ingest.db.sessions import Recorder
from ingest.errors import ConfigError, FatalError, IngestError, describe_root, root_cause
from ingest.flow.pipeline import Pipeline
from ingest.flow.writer import Writer
from ingest.formats.decode import load_routes
from ingest.observability.service import Observability
from ingest.runtime.collector import tune_collector
from ingest.runtime.surplus import retire_surplus
from ingest.settings import Settings, redact_url, worker_environ

__all__ = ["Daemon", "run_daemon"]

EXIT_OK = 0
EXIT_FAILURE = 1


class Daemon:
    def __init__(self, settings: Settings, *, log: logging.Logger | None = None) -> None:
        self.settings = settings
        self.log = log or logging.getLogger("ingest")
        self.pipeline: Pipeline | None = None
        self.writer: Writer | None = None
        self.observability = Observability.from_settings(settings, worker=settings.worker_id)
        self.exit_code = EXIT_OK
        self._signals = 0

    async def run(self) -> int:
        if os.environ.get("INGEST_ASYNCIO_DEBUG") == "1":
            # A test hook: asyncio logs every step of the loop longer than this many seconds.
            loop = asyncio.get_running_loop()
            loop.set_debug(True)
            loop.slow_callback_duration = float(os.environ.get("INGEST_ASYNCIO_SLOW", "0.1"))
        # Bound before any task group, so a taken port is a plain ConfigError (exit 2).
        metrics_listener = await self.observability.listen()
        try:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(
                        self._watch_signals, signals, tg.cancel_scope, name="ingest[signals]"
                    )
                    tg.start_soon(
                        self.observability.serve, metrics_listener, name="ingest[metrics]"
                    )
                    if self.settings.worker_id is not None:
                        tg.start_soon(self._watch_parent, name="ingest[parent]")
                    await self._main()
                    tg.cancel_scope.cancel()
        except* Exception as group:
            self._stop_on_error(group)
        return self.exit_code

    def _stop_on_error(self, group: BaseExceptionGroup[Exception]) -> None:
        """One line naming the root cause, out of the task groups it travelled through (their
        own message, "unhandled errors in a TaskGroup", says nothing); exit status 1. A
        configuration error found late is still one (exit 2, printed by the command line)."""
        root = root_cause(group)
        if isinstance(root, ConfigError):
            raise root from None
        self.log.error("fatal: %s", describe_root(group))
        # The whole story for a developer, without cluttering an operator's log.
        self.log.debug("fatal error in full", exc_info=group)
        self.exit_code = EXIT_FAILURE

    async def _watch_parent(self) -> None:
        """A worker whose supervisor died drains and exits instead of running orphaned."""
        parent = os.getppid()
        while os.getppid() == parent:  # noqa: ASYNC110 (polling: no event exists for this)
            await anyio.sleep(1)
        self.log.warning("supervisor (pid %d) is gone: draining", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    async def _watch_signals(self, signals: object, outer: CancelScope) -> None:
        async with anyio.create_task_group() as timers:
            async for signum in signals:  # type: ignore[attr-defined]
                self._signals += 1
                name = signal.Signals(signum).name
                if self._signals > 1:
                    self.log.warning("%s again: forcing exit without draining", name)
                    self.exit_code = EXIT_FAILURE
                    outer.cancel()
                    return
                if self.pipeline is None:
                    self.log.info("%s while starting: exiting", name)
                    outer.cancel()
                    return
                self.log.info(
                    "%s: draining (stop reading, flush, commit, acknowledge) within %.0fs",
                    name,
                    self.settings.shutdown_timeout,
                )
                self.pipeline.stop_reading()
                # Keep listening: a second signal forces while the drain is bounded here.
                timers.start_soon(self._shutdown_deadline, self.pipeline, outer)

    async def _shutdown_deadline(self, pipeline: Pipeline, outer: CancelScope) -> None:
        await anyio.sleep(self.settings.shutdown_timeout)
        self.log.error(
            "shutdown timeout after %.0fs: %d messages not acknowledged; the broker "
            "redelivers them on the next start",
            self.settings.shutdown_timeout,
            pipeline.statistics().outstanding,
        )
        self.exit_code = EXIT_FAILURE
        outer.cancel()

    async def _main(self) -> None:
        self._log_start()
        async with self._open_writer() as writer:
            self.writer = writer
            await self._prepare_database()
            pipeline = Pipeline(
                self.settings,
                writer,
                on_commit=self.observability.record_commit,
                log=logging.getLogger("ingest.pipeline"),
            )
            self.pipeline = pipeline
            folder = dashboard.Folder(
                self.settings.database_url, self.settings, logging.getLogger("ingest.dashboard")
            )
            self.observability.attach(pipeline, writer, dashboard=folder.statistics)
            await self._run_pipeline(pipeline, folder)
            await self._final_fold()
            self._log_drained(pipeline)

    def _log_start(self) -> None:
        s = self.settings
        self.log.info(
            "starting: database %s, broker %s, %s, client id %s",
            redact_url(s.database_url) if s.database_url else "(libpq defaults)",
            redact_url(s.mqtt_url),
            f"topic {s.topic}" if s.routes is None else f"routes {load_routes(s).filters}",
            s.client_id,
        )

    def _open_writer(self) -> Writer:
        return Writer.from_settings(self.settings)

    async def _prepare_database(self) -> None:
        """Pending migrations (unless disabled), then partitions ahead: a failed migration is
        fatal, failed partition maintenance only a warning (it is retried hourly)."""
        s = self.settings
        if s.migrate:
            try:
                applied = await migrate_dsn(s.database_url)
            except IngestError as exc:
                raise FatalError(str(exc)) from exc
            if applied:
                self.log.info("migrations applied: %s", ", ".join(applied))
        try:
            created, dropped = await partitions.run_once(s.database_url, s)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self.log.warning("partition maintenance failed at start (%s): retried hourly", exc)
            return
        if created:
            self.log.info("partitions created: %s", ", ".join(created))
        if dropped:
            self.log.info("partitions dropped (retention): %s", ", ".join(dropped))

    async def _run_pipeline(self, pipeline: Pipeline, folder: dashboard.Folder) -> None:
        """The pipeline, with the stats line and the maintenance tasks beside it until it
        has drained."""
        s = self.settings
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._stats_loop, pipeline, name="ingest[stats]")
            # Partitions ahead + retention (hourly), and the dashboard tables folded from
            # committed batches (every INGEST_DASHBOARD_INTERVAL): both safe from several
            # instances at once, both retried and never fatal, both cancelled at shutdown.
            tg.start_soon(
                partitions.maintain,
                s.database_url,
                s,
                logging.getLogger("ingest.partitions"),
                name="ingest[partitions]",
            )
            tg.start_soon(folder.run, name="ingest[dashboard]")
            recorder = self._recorder(pipeline)
            tg.start_soon(recorder.run, name="ingest[sessions]")
            if s.retire_surplus and s.worker_id is None:  # a supervisor retires for its workers
                tg.start_soon(
                    retire_surplus, s, {s.client_id}, worker_environ(s, os.environ),
                    logging.getLogger("ingest.sessions"), name="ingest[retire-surplus]",
                )  # fmt: skip
            await pipeline.run()
            with anyio.move_on_after(5):  # drained and disconnected, the session kept
                await recorder.left()
            tg.cancel_scope.cancel()

    def _recorder(self, pipeline: Pipeline) -> Recorder:
        """Keeps this session's row of the sessions table current (ingest/db/sessions.py)."""
        s = self.settings

        def status() -> tuple[int, bool]:
            st = pipeline.source.statistics()
            return st.connects, st.subscribed

        return Recorder(
            s.database_url,
            client_id=s.client_id,
            broker=s.mqtt_endpoint().name(),
            share_group=s.share_group,
            status=status,
            log=logging.getLogger("ingest.sessions"),
        )

    def _log_drained(self, pipeline: Pipeline) -> None:
        st = pipeline.statistics()
        self.log.info(
            "drained: %d received, %d acknowledged, %d rows written, %d duplicates, "
            "%d dead letters",
            st.received,
            st.acknowledged,
            st.rows_inserted,
            st.duplicates,
            st.dead_letters,
        )

    async def _final_fold(self) -> None:
        """Fold what the last batches recorded, so dashboards are current after a clean stop.
        Best effort within a few seconds: anything left is folded by the next run."""
        with anyio.move_on_after(5):
            try:
                conn = await asyncpg.connect(self.settings.database_url, timeout=3)
            except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
                self.log.info("dashboard tables not folded at stop (%s): next run will", exc)
                return
            try:
                await dashboard.fold(conn)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                self.log.info("dashboard tables not folded at stop (%s): next run will", exc)
            finally:
                conn.terminate()

    async def _stats_loop(self, pipeline: Pipeline) -> None:
        last_received, last_t = 0, time.monotonic()
        while True:
            await anyio.sleep(self.settings.stats_interval)
            st = pipeline.statistics()
            now = time.monotonic()
            rate = (st.received - last_received) / max(now - last_t, 1e-9)
            last_received, last_t = st.received, now
            self.log.info(
                "stats",
                extra={
                    "received": st.received,
                    "rows": st.rows_inserted,
                    "duplicates": st.duplicates,
                    "dead_letters": st.dead_letters,
                    "channel_depth": st.channel_depth,
                    "inbox": st.inbox,
                    "unacked": st.outstanding,
                    "msgs_per_s": round(rate, 1),
                },
            )


def run_daemon(settings: Settings) -> int:
    """Run the daemon to completion on asyncio; returns the exit code. The garbage collector is
    set for a stream of messages first (ingest.runtime.collector).

    uvloop is opt-in (``INGEST_UVLOOP=1``): with aiomqtt 2.5 under uvloop, a socket the broker
    closed is sometimes not noticed (``add_writer`` on a closed handle) and the connection is
    only found dead by the keepalive, 30 s later: measured in the broker-restart fault test.
    """
    options: dict[str, object] = {}
    if os.environ.get("INGEST_UVLOOP") == "1":
        options["use_uvloop"] = True
    daemon = Daemon(settings)
    tune_collector()
    return anyio.run(daemon.run, backend="asyncio", backend_options=options)
