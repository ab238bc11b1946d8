"""``ingest run --workers N``: N daemon processes sharing one subscription, supervised.

Past one core the MQTT client, not Postgres, is the ceiling (a worker spends most of its CPU in
paho), so throughput scales with processes, not coroutines. Each worker is a full ``ingest run``
with its own client id ``<client_id>-<i>`` (its own persistent session) in one shared
subscription group (``$share/<group>/<filter>``; the group is ``INGEST_SHARE_GROUP``, else the
client id), so the broker spreads messages over the workers.

The parent owns no data. It
* starts the workers with the merged settings in their environment (they migrate under the
  advisory lock, safely at once);
* restarts a worker that dies, with capped jittered backoff (a worker that keeps exiting with a
  configuration error stops everything: exit 2);
* forwards the first SIGTERM/SIGINT (each worker drains) and a second one (each worker forces);
  exit 0 when every worker drained cleanly, else 1;
* retires, beside the new workers, the sessions an earlier and larger worker set left at the
  broker (``ingest.runtime.surplus``; ``--no-retire-surplus`` turns it off);
* serves ``/metrics`` (every worker's metrics, labelled ``worker``), ``/healthz`` (the parent
  and every worker alive) and ``/readyz`` (every worker ready) on the one metrics port.

Several brokers (``INGEST_MQTT_URL`` a list, or ``[[brokers]]``): a worker set per broker,
``--workers N`` each (worker ``i`` of broker ``k``, 0-based in the list, is
``<client_id>-b<k>-<i>``, its ``worker`` label ``b<k>-<i>``), each set in the shared group on its
own broker. The group keeps one name on every broker: two URLs that are nodes of one cluster
then still deliver each message once. The metrics about messages and the broker connection
carry a ``broker`` label (its URL without user info); ``/healthz`` and ``/readyz`` answer per
broker, and are 200 only when every broker's workers are. One database: the workers migrate
it under the advisory lock, so the first applies what is pending and the others find nothing.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
from typing import Any

import anyio
from anyio.abc import Process
from prometheus_client import CONTENT_TYPE_LATEST

from ingest.backoff import Backoff
from ingest.observability.http import (
    JSON,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    Response,
    bind,
    serve_http,
)
from ingest.observability.merge import merge_expositions
from ingest.settings import Settings, worker_environ

__all__ = ["Supervisor", "run_supervisor", "worker_client_id"]

EXIT_CONFIG = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_client_id(client_id: str, worker: int, broker: int | None = None) -> str:
    """Worker ``worker``'s MQTT client id (its persistent session): ``<client_id>-<i>`` with
    one broker, ``<client_id>-b<k>-<i>`` for broker ``k`` (0-based) of several."""
    if broker is None:
        return f"{client_id}-{worker}"
    return f"{client_id}-b{broker}-{worker}"


class _Worker:
    def __init__(
        self,
        label: str,
        env: dict[str, str],
        metrics_port: int,
        broker: str | None = None,
    ) -> None:
        self.label = label  # its metrics' worker label: "<i>", or "b<k>-<i>" with several brokers
        self.broker = broker  # the broker's name with several brokers
        self.env = env
        self.metrics_port = metrics_port
        self.process: Process | None = None
        self.starts = 0
        self.config_failures = 0

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None


class Supervisor:
    def __init__(self, settings: Settings, *, log: logging.Logger | None = None) -> None:
        self.settings = settings
        self.log = log or logging.getLogger("ingest.supervisor")
        self.stopping = False
        self.exit_code = 0
        self._signals = 0
        brokers = settings.broker_settings()
        self.brokers = [b.mqtt_endpoint().name() for b in brokers] if len(brokers) > 1 else []
        self.workers: list[_Worker] = []
        # Per broker: its settings, the environment its workers start from, their client ids.
        self._broker_sets: list[tuple[Settings, dict[str, str], set[str]]] = []
        for k, one in enumerate(brokers):
            # A worker sees exactly what the parent resolved for its broker; a parent started
            # with INGEST_X_FILE must not hand a worker both INGEST_X and INGEST_X_FILE.
            base = worker_environ(one, os.environ)
            made = [
                self._worker(base, i, k if self.brokers else None) for i in range(settings.workers)
            ]
            self.workers.extend(made)
            keep = {w.env["INGEST_CLIENT_ID"] for w in made}
            self._broker_sets.append((one, base, keep))

    def _worker(self, base: dict[str, str], i: int, broker: int | None) -> _Worker:
        s = self.settings
        port = _free_port() if s.metrics_port else 0
        env = {
            **base,
            "INGEST_WORKERS": "1",
            "INGEST_CLIENT_ID": worker_client_id(s.client_id, i, broker),
            "INGEST_SHARE_GROUP": s.share_group or s.client_id,
            "INGEST_WORKER_ID": str(i) if broker is None else f"b{broker}-{i}",
            "INGEST_METRICS_PORT": str(port),
            "INGEST_METRICS_HOST": "127.0.0.1",
        }
        name = None if broker is None else self.brokers[broker]
        return _Worker(env["INGEST_WORKER_ID"], env, port, name)

    async def run(self) -> int:
        # Bound before any task group, so a taken port is a plain ConfigError (exit 2).
        listener = await bind(self.settings.metrics_host, self.settings.metrics_port)
        self._log_start()
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_signals, signals, name="ingest[signals]")
                if listener is not None:
                    tg.start_soon(self._serve, listener, name="ingest[metrics]")
                if self.settings.retire_surplus:
                    # Beside the new workers: sessions of an earlier, larger worker set. Imported
                    # here: the parent loads the database client only to read the sessions table.
                    from ingest.runtime.surplus import retire_surplus

                    for one, base, keep in self._broker_sets:
                        tg.start_soon(
                            retire_surplus, one, keep, base, self.log,
                            name="ingest[retire-surplus]",
                        )  # fmt: skip
                async with anyio.create_task_group() as workers:
                    for w in self.workers:
                        workers.start_soon(self._supervise, w, name=f"ingest[worker-{w.label}]")
                tg.cancel_scope.cancel()
        return self.exit_code

    def _log_start(self) -> None:
        s = self.settings
        group = s.share_group or s.client_id
        if not self.brokers:
            self.log.info(
                "starting %d workers (client ids %s-0..%d, shared subscription group %s)",
                len(self.workers),
                s.client_id,
                len(self.workers) - 1,
                group,
            )
            return
        for k, name in enumerate(self.brokers):
            self.log.info(
                "broker %s: starting %d workers (client ids %s-b%d-0..%d, shared subscription "
                "group %s)",
                name,
                s.workers,
                s.client_id,
                k,
                s.workers - 1,
                group,
            )

    async def _supervise(self, w: _Worker) -> None:
        backoff = Backoff(initial=0.5, maximum=self.settings.retry_max_delay)
        while not self.stopping:
            w.starts += 1
            w.process = await anyio.open_process(
                [sys.executable, "-m", "ingest", "run"],
                env=w.env,
                stdin=None,
                stdout=None,
                stderr=None,
                # Own session: a terminal's Ctrl-C reaches only the parent, which forwards one
                # SIGTERM (a second signal straight from the terminal would force the workers).
                start_new_session=True,
            )
            code = await w.process.wait()
            if self.stopping:
                if code != 0:
                    self.exit_code = 1
                self.log.info("worker %s exited with status %d", w.label, code)
                return
            if code == EXIT_CONFIG:
                w.config_failures += 1
                if w.config_failures >= 3:
                    self.log.error("worker %s: configuration error, stopping", w.label)
                    self.exit_code = EXIT_CONFIG
                    self._stop(signal.SIGTERM)
                    return
            delay = backoff.next_delay()
            self.log.warning(
                "worker %s exited with status %d; restarting in %.1fs (start %d)",
                w.label,
                code,
                delay,
                w.starts + 1,
            )
            await anyio.sleep(delay)

    def _stop(self, sig: signal.Signals) -> None:
        self.stopping = True
        for w in self.workers:
            if w.alive and w.process is not None:
                w.process.send_signal(sig)

    async def _kill_stragglers(self) -> None:
        # Bounded: workers drain within shutdown_timeout; past that (plus a margin), kill.
        await anyio.sleep(self.settings.shutdown_timeout + 5)
        for w in self.workers:
            if w.alive and w.process is not None:
                self.log.error("worker %s did not drain in time: killing it", w.label)
                w.process.kill()
                self.exit_code = 1

    async def _watch_signals(self, signals: object) -> None:
        async with anyio.create_task_group() as timers:
            await self._signal_loop(signals, timers)

    async def _signal_loop(self, signals: object, timers: anyio.abc.TaskGroup) -> None:
        async for signum in signals:  # type: ignore[attr-defined]
            self._signals += 1
            name = signal.Signals(signum).name
            if self._signals == 1:
                self.log.info("%s: draining every worker", name)
                self._stop(signal.SIGTERM)
                timers.start_soon(self._kill_stragglers)
            else:
                self.log.warning("%s again: forcing every worker", name)
                self.exit_code = 1
                self._stop(signal.SIGINT)

    # -- one port for every worker ----------------------------------------------------------

    async def _serve(self, listener: anyio.abc.Listener[anyio.abc.SocketStream]) -> None:
        self.log.info(
            "metrics of all workers on http://%s:%d/metrics",
            self.settings.metrics_host,
            self.settings.metrics_port,
        )
        await serve_http(listener, self._route)

    async def _fetch(self, w: _Worker, path: str) -> tuple[int, bytes]:
        with anyio.fail_after(2):
            async with await anyio.connect_tcp("127.0.0.1", w.metrics_port) as stream:
                await stream.send(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
                chunks = []
                try:
                    while True:
                        chunks.append(await stream.receive())
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    pass
        raw = b"".join(chunks)
        head, _, body = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        return status, body

    async def _route(self, method: str, path: str) -> Response:
        if method not in ("GET", "HEAD"):
            return METHOD_NOT_ALLOWED
        results: dict[str, tuple[int, bytes]] = {}

        async def one(w: _Worker) -> None:
            try:
                results[w.label] = await self._fetch(w, path)
            except (OSError, TimeoutError, ValueError, IndexError) as exc:
                results[w.label] = (503, f'{{"error": "{type(exc).__name__}"}}'.encode())

        async with anyio.create_task_group() as tg:
            for w in self.workers:
                tg.start_soon(one, w)
        if path == "/metrics":
            up = [w for w in self.workers if results[w.label][0] == 200]
            texts = [results[w.label][1].decode() for w in up]
            merged = merge_expositions(texts, brokers=[w.broker for w in up])
            return 200, CONTENT_TYPE_LATEST, merged
        if path in ("/healthz", "/readyz"):
            ok = all(status == 200 for status, _ in results.values()) and all(
                w.alive for w in self.workers
            )
            if self.brokers:
                return (200 if ok else 503), JSON, self._by_broker(path, results)
            body = (
                b'{"workers": {'
                + b", ".join(
                    f'"{w.label}": '.encode() + (results[w.label][1].strip() or b"null")
                    for w in self.workers
                )
                + b"}}\n"
            )
            return (200 if ok else 503), JSON, body
        return NOT_FOUND

    def _by_broker(self, path: str, results: dict[str, tuple[int, bytes]]) -> bytes:
        """``{"ready": ..., "brokers": {"mqtt://host:port": {"ready": ..., "workers": {...}}}}``
        (``healthy`` for /healthz): a broker is ready when all its workers are, each worker
        with its own answer (the reason it is not ready)."""
        key = "ready" if path == "/readyz" else "healthy"
        brokers: dict[str, dict[str, Any]] = {}
        for w in self.workers:
            assert w.broker is not None  # several brokers: every worker has one
            status, body = results[w.label]
            entry = brokers.setdefault(w.broker, {key: True, "workers": {}})
            entry["workers"][w.label] = _json_or_text(body)
            entry[key] = entry[key] and status == 200 and w.alive
        everything = all(entry[key] for entry in brokers.values())
        return json.dumps({key: everything, "brokers": brokers}).encode() + b"\n"


def _json_or_text(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body.decode(errors="replace").strip() or None


def run_supervisor(settings: Settings) -> int:
    return anyio.run(Supervisor(settings).run, backend="asyncio")
