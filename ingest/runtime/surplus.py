"""At start, ``ingest run`` retires the sessions an earlier, larger worker set left behind.

Restarting ``--workers 8`` as ``--workers 4`` leaves the sessions of workers 4 to 7 at the
broker, each keeping its share of the shared subscription (queued while the workers were away,
and queued again from every new message until the session expires). So at start, once, the
recorded sessions (``ingest.db.sessions``) of this client id's family on this broker that this
run does not use and that are not retired yet are retired: ``<client_id>-<i>`` with ``i >= N``,
the bare ``<client_id>`` of an earlier single worker; and when running as one worker (no
index), every ``<client_id>-<i>``. Retiring is ``ingest sessions retire`` in a child process
(the supervisor owns no data and runs no pipeline), beside the new workers.

A session that may be live (seen within two minutes and not disconnected cleanly: a worker that
crashed a moment ago, or another instance using the same client ids) is not taken over: it is
looked at again once that window has passed, and left alone with a warning if its row is still
being refreshed. Nothing here is fatal: a database that cannot be read is retried, a retire
that failed is logged (its sessions are kept; run ``ingest sessions retire`` by hand).
``INGEST_RETIRE_SURPLUS=false`` (``--no-retire-surplus``) turns it off.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping, Set
from typing import Any

import anyio
import asyncpg
from anyio.abc import Process

from ingest.backoff import Backoff
from ingest.db.dashboard import describe_error
from ingest.db.sessions import LIVE_WINDOW, SessionRow, fetch_sessions, in_family, is_live
from ingest.runtime.retire import DEFAULT_IDLE
from ingest.settings import Settings

__all__ = ["retire_surplus", "surplus_of"]


def surplus_of(rows: list[SessionRow], settings: Settings, keep: Set[str]) -> list[SessionRow]:
    """The sessions of ``rows`` this run leaves behind: of its client id's family and its
    broker, not retired, not among ``keep`` (the client ids this run connects with)."""
    broker = settings.mqtt_endpoint().name()
    return [
        r
        for r in rows
        if r.retired_at is None
        and r.broker == broker
        and r.client_id not in keep
        and in_family(r.client_id, settings.client_id)
    ]


async def retire_surplus(
    settings: Settings, keep: Set[str], env: Mapping[str, str], log: logging.Logger
) -> None:
    """Retire the surplus sessions once (module docstring); returns when done or given up."""
    rows = surplus_of(await _read(settings, log), settings, keep)
    waited = False
    while rows:
        ready = [r for r in rows if not is_live(r)]
        live = [r for r in rows if is_live(r)]
        if ready:
            await _retire(ready, settings, env, log)
        if not live:
            return
        if waited:
            log.warning(
                "sessions %s are still refreshed by a running worker (another instance with "
                "client id %s?): not retired",
                ", ".join(r.client_id for r in live),
                settings.client_id,
            )
            return
        log.info(
            "sessions %s may still be live (seen within %ds, not disconnected cleanly): "
            "looked at again in %ds",
            ", ".join(r.client_id for r in live),
            LIVE_WINDOW.total_seconds(),
            LIVE_WINDOW.total_seconds(),
        )
        await anyio.sleep(LIVE_WINDOW.total_seconds() + 1)
        waited = True
        seen = {r.client_id: r.last_seen for r in live}
        rows = [
            r for r in surplus_of(await _read(settings, log), settings, keep) if r.client_id in seen
        ]


async def _read(settings: Settings, log: logging.Logger) -> list[SessionRow]:
    """The sessions table, retried until it can be read; none when it does not exist yet (its
    migration is pending, so no session was ever recorded)."""
    backoff = Backoff(initial=1.0, maximum=settings.retry_max_delay)
    while True:
        try:
            conn = await asyncpg.connect(settings.database_url, timeout=settings.db_connect_timeout)
            try:
                return await fetch_sessions(conn)
            finally:
                conn.terminate()
        except asyncpg.UndefinedTableError:
            return []
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            delay = backoff.next_delay()
            log.warning(
                "cannot read the sessions table to retire surplus sessions (retrying in %.1fs): %s",
                delay,
                describe_error(exc),
            )
            await anyio.sleep(delay)


async def _retire(
    rows: list[SessionRow], settings: Settings, env: Mapping[str, str], log: logging.Logger
) -> None:
    ids = [r.client_id for r in rows]
    log.info("retiring %d surplus sessions of an earlier worker set: %s", len(ids), ", ".join(ids))
    command = [sys.executable, "-m", "ingest", "sessions", "retire", "--json"]
    command += ["--idle", f"{DEFAULT_IDLE:g}", "--", *ids]
    process = await anyio.open_process(
        command,
        env={**env, "INGEST_METRICS_PORT": "0"},
        stdin=None,
        stderr=None,  # its log lines go where ours go
        start_new_session=True,  # a terminal's Ctrl-C reaches us; we forward one SIGTERM
    )
    try:
        out = await _read_all(process)
        code = await process.wait()
    except BaseException:
        await _stop(process, settings.shutdown_timeout)
        raise
    _report(ids, out, code, log)


async def _read_all(process: Process) -> bytes:
    assert process.stdout is not None
    chunks = []
    async for chunk in process.stdout:
        chunks.append(chunk)
    return b"".join(chunks)


async def _stop(process: Process, grace: float) -> None:
    """SIGTERM: the child stops draining, writes and acknowledges what it holds and keeps the
    sessions; killed if it takes longer than ``grace`` seconds."""
    with anyio.CancelScope(shield=True):
        if process.returncode is None:
            process.terminate()
            with anyio.move_on_after(grace):
                await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


def _report(ids: list[str], out: bytes, code: int, log: logging.Logger) -> None:
    try:
        outcomes: list[dict[str, Any]] = json.loads(out or b"[]")
    except ValueError:
        outcomes = []
    drained = 0
    for o in outcomes:
        if o.get("retired"):
            drained += int(o.get("drained", 0))
        else:
            log.error(
                "surplus session %s not retired (`ingest sessions retire` it by hand): %s",
                o.get("client_id"),
                o.get("error"),
            )
    retired = [str(o["client_id"]) for o in outcomes if o.get("retired")]
    if code != 0 and not outcomes:
        log.error(
            "retiring surplus sessions %s failed (exit status %d; see the lines above)",
            ", ".join(ids),
            code,
        )
        return
    log.info(
        "surplus sessions retired: %d of %d (%s), %d messages drained",
        len(retired),
        len(ids),
        ", ".join(retired) or "none",
        drained,
    )
