"""The servers a benchmark runs against: a throwaway Mosquitto, and a throwaway PostgreSQL
cluster or an existing server; a fresh database for every measured run.

With ``tls=True`` the broker gets a second listener that speaks TLS, with a throwaway CA and a
server certificate for ``127.0.0.1`` (``ingest.devservers.tls.make_tls_files``). Backlogs,
sessions and broker checks keep using the plain listener (``mqtt_url``); consumers drain over
``consumer_url(tls=True)`` with the CA file, certificate and host name verified, so the
difference between the two is what TLS costs the consumer.

Uses the throwaway servers of ``ingest.devservers``. The throwaway cluster starts from the
tests' template (fsync off, 32 MB shared buffers) and is then set to server defaults for a
benchmark: durable (``fsync``, ``full_page_writes`` on) unless
``durable=False``, ``shared_buffers`` 128 MB, and ``track_commit_timestamp`` on, which gives
the exact commit time of every row (``pg_xact_commit_timestamp(xmin)``) without a trigger.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from benchmarks._procstat import postmaster_pid
from ingest.devservers.throwaway import Listener, Mosquitto, PostgresCluster
from ingest.devservers.tls import make_tls_files
from ingest.urls import parse_mqtt_url

__all__ = ["PG_TUNED", "Environment", "fetch", "fetchval", "open_environment"]


async def _fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    return asyncio.run(_fetch(dsn, sql, *args))


def fetchval(dsn: str, sql: str, *args: Any) -> Any:
    rows = fetch(dsn, sql, *args)
    return rows[0][0] if rows else None


def stored_rows(dsn: str) -> int:
    """Numeric rows stored so far, for a harness that polls while a daemon drains: counted in
    ``points``, not through the ``readings`` view, whose join with ``series`` makes every poll a
    hash join of all the rows (PostgreSQL CPU the daemon then lacks); 0 before it migrated."""
    try:
        return int(fetchval(dsn, "SELECT count(*) FROM points") or 0)
    except asyncpg.UndefinedTableError:
        return 0


def _with_db(dsn: str, db: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


def _pid_by_cmdline(marker: str) -> int | None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
            if marker.encode() in cmdline:
                return int(entry)
    return None


@dataclass
class Environment:
    mqtt_url: str
    broker_pid: int | None
    admin_dsn: str
    postgres_pid: int | None
    commit_timestamps: bool
    external_db: bool
    tls_url: str | None = None
    ca_file: Path | None = None
    databases: list[str] = field(default_factory=list)
    #: With ``brokers=K``: the other K-1 brokers (plain listeners), and their pids.
    more_urls: list[str] = field(default_factory=list)
    more_pids: list[int | None] = field(default_factory=list)

    @property
    def mqtt_urls(self) -> list[str]:
        """Every broker of the environment, the first one first."""
        return [self.mqtt_url, *self.more_urls]

    def pids(self) -> dict[str, int | None]:
        more = {f"broker{k}": pid for k, pid in enumerate(self.more_pids, 1)}
        return {"broker": self.broker_pid, **more, "postgres": self.postgres_pid}

    def consumer_url(self, *, tls: bool) -> str:
        """Where a consumer connects: the plain listener, or the TLS one."""
        if not tls:
            return self.mqtt_url
        if self.tls_url is None:
            raise ValueError("this environment has no TLS listener (open it with tls=True)")
        return self.tls_url

    def daemon_settings(self, *, tls: bool) -> dict[str, str]:
        """The daemon's broker settings for that listener."""
        settings = {"INGEST_MQTT_URL": self.consumer_url(tls=tls)}
        if tls and self.ca_file is not None:
            settings["INGEST_MQTT_CA_FILE"] = str(self.ca_file)
        return settings

    def tls_session(self) -> str:
        """What a handshake with the TLS listener agrees on, e.g. ``TLSv1.3
        TLS_AES_256_GCM_SHA384``, with the consumers' verification (CA, host name)."""
        endpoint = parse_mqtt_url(self.consumer_url(tls=True))
        context = ssl.create_default_context(cafile=self.ca_file)
        with (
            socket.create_connection((endpoint.host, endpoint.port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=endpoint.host) as sock,
        ):
            cipher = sock.cipher()
            return f"{sock.version()} {cipher[0] if cipher else '?'}"

    def transport_text(self, modes: Sequence[bool], *, plain_use: str = "backlog published") -> str:
        """For the report: the listener(s) the consumers used, and that ``plain_use`` (what
        goes over the plain listener whatever the consumers use) went over the plain one."""
        plain = f"{self.mqtt_url} (plain)"
        if True not in modes:
            return plain
        tls = (
            f"{self.consumer_url(tls=True)} ({self.tls_session()}, certificate and host name "
            "verified against a throwaway CA)"
        )
        both = f"{plain} and {tls}, alternately" if False in modes else tls
        return f"{both}; {plain_use} over {self.mqtt_url}"

    def client_args(self, *, tls: bool) -> list[str]:
        """``--url`` (and ``--ca-file``) for the benchmark's own clients (_bare, _naive, _pacer)."""
        args = ["--url", self.consumer_url(tls=tls)]
        if tls and self.ca_file is not None:
            args += ["--ca-file", str(self.ca_file)]
        return args

    def fresh_database(self, label: str) -> str:
        name = f"bench_{label}_{uuid.uuid4().hex[:8]}"
        fetch(self.admin_dsn, f'CREATE DATABASE "{name}"')
        self.databases.append(name)
        return _with_db(self.admin_dsn, name)

    def drop_databases(self) -> None:
        for name in self.databases:
            with contextlib.suppress(Exception):
                fetch(self.admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.databases.clear()


_BENCH_SETTINGS = {"shared_buffers": "128MB", "track_commit_timestamp": "on"}
#: README's settings for an ingest server ("PostgreSQL settings for ingest"), sized for a
#: benchmark machine: fewer checkpoints (and so fewer full-page images in the WAL), compressed
#: full-page images, a WAL buffer that holds several batches. Still durable.
PG_TUNED = {
    "shared_buffers": "2GB",
    "max_wal_size": "16GB",
    "min_wal_size": "2GB",
    "wal_buffers": "128MB",
    "wal_compression": "lz4",
    "checkpoint_timeout": "15min",
    "checkpoint_completion_target": "0.9",
}


@contextlib.contextmanager
def open_environment(
    *,
    inflight: int,
    database_url: str | None,
    durable: bool = True,
    tls: bool = False,
    tuned: bool = False,
    brokers: int = 1,
) -> Iterator[Environment]:
    """The servers; ``brokers`` > 1 starts that many Mosquitto instances (the first has the
    TLS listener, when asked for)."""
    with contextlib.ExitStack() as stack:
        listeners: list[Listener] = []
        ca_file: Path | None = None
        if tls:
            pki = make_tls_files(Path(stack.enter_context(tempfile.TemporaryDirectory())))
            ca_file = pki.ca
            listeners.append(
                Listener(cafile=pki.ca, certfile=pki.server_cert, keyfile=pki.server_key)
            )
        broker = stack.enter_context(
            Mosquitto(overrides={"max_inflight_messages": str(inflight)}, listeners=listeners)
        )
        broker_pid = _pid_by_cmdline(str(broker.dir / "mosquitto.conf"))
        more = [
            stack.enter_context(Mosquitto(overrides={"max_inflight_messages": str(inflight)}))
            for _ in range(brokers - 1)
        ]
        if database_url is None:
            cluster = stack.enter_context(PostgresCluster())
            settings = dict(_BENCH_SETTINGS)
            if durable:
                settings |= {"fsync": "on", "full_page_writes": "on"}
            if tuned:
                settings |= PG_TUNED
            for key, value in settings.items():
                fetch(cluster.dsn(), f"ALTER SYSTEM SET {key} = '{value}'")
            cluster.restart()
            admin = cluster.dsn()
            pg_pid = postmaster_pid(cluster.data)
        else:
            admin = database_url
            datadir = fetchval(
                admin, "SELECT setting FROM pg_settings WHERE name = 'data_directory'"
            )
            pg_pid = postmaster_pid(datadir) if datadir else None
        env = Environment(
            mqtt_url=broker.url,
            broker_pid=broker_pid,
            admin_dsn=admin,
            postgres_pid=pg_pid,
            commit_timestamps=fetchval(admin, "SHOW track_commit_timestamp") == "on",
            external_db=database_url is not None,
            tls_url=f"mqtts://127.0.0.1:{broker.ports[1]}" if tls else None,
            ca_file=ca_file,
            more_urls=[b.url for b in more],
            more_pids=[_pid_by_cmdline(str(b.dir / "mosquitto.conf")) for b in more],
        )
        try:
            yield env
        finally:
            if env.external_db:
                env.drop_databases()
