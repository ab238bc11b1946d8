"""Throwaway PostgreSQL and Mosquitto servers for the integration tests.

Local binaries first (`Mosquitto`, `PostgresCluster`): each server lives in its own directory
under one process-wide temp dir, listens on a free 127.0.0.1 port and keeps that port across
restarts. Docker (`DockerPostgres`, `DockerMosquitto`) only when the binaries are missing and a
daemon answers. Last, the servers that come with `pip install -e '.[test]'` (`EmbeddedPostgres`:
the pgserver wheel; `EmbeddedBroker`: the iotcore wheel), so the suite runs on a machine with
nothing but Python. Whatever is still running at interpreter exit is stopped by an atexit hook, so a
failing or interrupted session leaves nothing behind; nothing is written outside the temp dir.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol, Self

import asyncpg

from ingest.devservers import brokers as _brokers
from ingest.devservers import postgres as _postgres
from ingest.devservers._process import (
    EmbeddedServerError,
    _read,
    _tail,
    local_servers_allowed,
)
from ingest.devservers.brokers import Broker, Listener, find_mosquitto
from ingest.devservers.ports import free_port as _free_port

__all__ = [
    "EmbeddedBroker",
    "EmbeddedPostgres",
    "Listener",
    "Mosquitto",
    "MosquittoFactory",
    "PostgresCluster",
    "PostgresFactory",
    "ServerError",
    "embedded_broker_available",
    "embedded_postgres_available",
    "find_mosquitto",
    "find_postgres_bindir",
    "run_sql",
]

_START_TIMEOUT = 30.0


class ServerError(RuntimeError):
    """A throwaway server did not start or stop; the message carries the tail of its log."""


class MosquittoFactory(Protocol):
    """The ``mosquitto_factory`` fixture: a started :class:`Mosquitto`, closed at test end."""

    def __call__(
        self,
        overrides: Mapping[str, str] | None = None,
        *,
        listeners: Sequence[Listener] = (),
        password_file: Path | None = None,
        acl_file: Path | None = None,
        allow_anonymous: bool | None = None,
    ) -> Broker: ...


class PostgresFactory(Protocol):
    def __call__(self) -> PostgresCluster: ...


# --- shared plumbing ---------------------------------------------------------------------------

_live: list[Mosquitto | PostgresCluster] = []
_root: Path | None = None


def _is_root() -> bool:
    return os.geteuid() == 0


def _root_dir() -> Path:
    """The process-wide temp dir; every server lives in a subdirectory of it."""
    global _root
    if _root is None:
        _root = Path(tempfile.mkdtemp(prefix="iot-ingest-servers-"))
        # Postgres runs as another user when we are root: it must be able to traverse to its dir.
        _root.chmod(0o755)
        atexit.register(_cleanup)
    return _root


def _cleanup() -> None:
    for server in reversed(_live[:]):
        with contextlib.suppress(Exception):
            server.close()
    if _root is not None:
        shutil.rmtree(_root, ignore_errors=True)


# --- Mosquitto ---------------------------------------------------------------------------------


class Mosquitto(_brokers.MosquittoBroker):
    """A :class:`~ingest.devservers.brokers.MosquittoBroker` (same arguments: overrides,
    listeners, password and ACL files) in a folder of its own under the process-wide temp dir,
    deleted on close; restartable on the same ports."""

    def __init__(
        self,
        overrides: Mapping[str, str] | None = None,
        *,
        listeners: Sequence[Listener] = (),
        password_file: Path | None = None,
        acl_file: Path | None = None,
        allow_anonymous: bool | None = None,
    ) -> None:
        super().__init__(
            Path(tempfile.mkdtemp(prefix="mosquitto-", dir=_root_dir())),
            overrides=overrides,
            listeners=listeners,
            password_file=password_file,
            acl_file=acl_file,
            allow_anonymous=allow_anonymous,
        )

    def close(self) -> None:
        """Stop (SIGKILL: nothing of it is kept) and delete the directory."""
        self.kill()
        super().close()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- PostgreSQL --------------------------------------------------------------------------------


def find_postgres_bindir() -> Path | None:
    """A directory holding initdb and pg_ctl: PATH first, then the usual Debian/RHEL places."""
    if not local_servers_allowed():
        return None
    if _is_root():
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return None  # Postgres refuses to run as root and we have no one to run it as
        if shutil.which("runuser") is None:
            return None
    candidates: list[Path] = []
    if pg_ctl := shutil.which("pg_ctl"):
        candidates.append(Path(pg_ctl).parent)

    def version(p: str) -> float:
        digits = "".join(c for c in Path(p).parent.name.split("-")[-1] if c.isdigit() or c == ".")
        try:
            return float(digits)
        except ValueError:
            return 0.0

    found = glob.glob("/usr/lib/postgresql/*/bin") + glob.glob("/usr/pgsql-*/bin")
    candidates += [Path(p) for p in sorted(found, key=version, reverse=True)]
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    return None


def _pg_run(bindir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [str(bindir / args[0]), *args[1:]]
    if _is_root():
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(
        cmd, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )


def _give_to_postgres(path: Path) -> None:
    if not _is_root():
        return
    pw = pwd.getpwnam("postgres")
    for dirpath, dirnames, filenames in os.walk(path):
        os.chown(dirpath, pw.pw_uid, pw.pw_gid)
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), pw.pw_uid, pw.pw_gid, follow_symlinks=False)


def _check_traversable(path: Path) -> None:
    if not _is_root():
        return
    for parent in path.parents:
        if not parent.stat().st_mode & 0o001:
            raise ServerError(
                f"{parent} is not traversable by user postgres; set TMPDIR to a directory it can"
                " reach (e.g. /tmp)"
            )


_COMMON_CONF = """
# iot-ingest test cluster: disposable, so durability against an OS crash does not matter.
# A process crash (pg_ctl stop -m immediate) still keeps every commit: fsync only affects the
# OS cache, and synchronous_commit stays on.
listen_addresses = '127.0.0.1'
fsync = off
full_page_writes = off
shared_buffers = 32MB
max_connections = 100
include 'iot_ingest_cluster.conf'
"""


@functools.cache
def _template(bindir: Path) -> Path:
    """One initdb per process; every cluster starts from a copy of it (initdb is the slow part)."""
    root = _root_dir()
    _check_traversable(root)
    tdir = root / "pg-template"
    tdir.mkdir()
    _give_to_postgres(tdir)
    data = tdir / "data"
    r = _pg_run(
        bindir, "initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
        "--locale=C", "--no-sync", cwd=tdir,
    )  # fmt: skip
    if r.returncode != 0:
        raise ServerError(f"initdb failed:\n{_tail(r.stdout + r.stderr)}")
    with (data / "postgresql.conf").open("a") as f:
        f.write(_COMMON_CONF)
    return data


class PostgresCluster:
    """A local throwaway cluster (initdb + pg_ctl) on a free port; restartable, same port."""

    def __init__(self) -> None:
        bindir = find_postgres_bindir()
        if bindir is None:
            raise ServerError("no initdb/pg_ctl (PATH, /usr/lib/postgresql/*/bin)")
        self._bindir = bindir
        template = _template(bindir)
        self.dir = Path(tempfile.mkdtemp(prefix="pg-", dir=_root_dir()))
        self.dir.chmod(0o700)
        self.data = self.dir / "data"
        shutil.copytree(template, self.data, symlinks=True)
        self._log = self.dir / "postgres.log"
        _give_to_postgres(self.dir)
        self._port = 0
        self._running = False

    @property
    def port(self) -> int:
        return self._port

    @property
    def running(self) -> bool:
        return self._running

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self._port}/{dbname}"

    def log_text(self) -> str:
        return _read(self._log)

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _pg_run(self._bindir, "pg_ctl", "-D", str(self.data), *args, cwd=self.dir)

    def start(self) -> Self:
        if self._running:
            return self
        first = self._port == 0
        for _ in range(5 if first else 1):
            if first:
                self._port = _free_port()
            conf = self.data / "iot_ingest_cluster.conf"
            conf.write_text(f"port = {self._port}\nunix_socket_directories = '{self.dir}'\n")
            _give_to_postgres(conf)
            r = self._pg_ctl("-l", str(self._log), "-w", "-t", str(int(_START_TIMEOUT)), "start")
            if r.returncode == 0:
                self._running = True
                if self not in _live:
                    _live.append(self)
                return self
            # pg_ctl gave up waiting but the postmaster may still come up later: make sure not.
            self._pg_ctl("-m", "immediate", "-w", "stop")
            if not first or "could not bind" not in self.log_text():
                break
        raise ServerError(
            f"postgres did not start on port {self._port}:\n{_tail(r.stdout + r.stderr)}\n"
            f"{_tail(self.log_text())}"
        )

    def stop(self, mode: Literal["fast", "immediate"] = "fast") -> None:
        """`fast`: clean shutdown; `immediate`: like a crash, recovery on the next start."""
        if not self._running:
            return
        r = self._pg_ctl("-m", mode, "-w", "-t", str(int(_START_TIMEOUT)), "stop")
        if r.returncode != 0 and "Is server running?" not in r.stderr:
            raise ServerError(f"pg_ctl stop failed:\n{_tail(r.stdout + r.stderr)}")
        self._running = False

    def restart(self, mode: Literal["fast", "immediate"] = "fast") -> Self:
        self.stop(mode)
        return self.start()

    def create_database(self, name: str) -> str:
        """Create database `name` and return its DSN."""
        run_sql(self.dsn(), f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def close(self) -> None:
        """Stop (immediately: the data is thrown away) and delete the directory."""
        if self._running:
            self._pg_ctl("-m", "immediate", "-w", "stop")
            self._running = False
        if self in _live:
            _live.remove(self)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PostgresCluster {self.dsn()} running={self._running}>"


def run_sql(dsn: str, *statements: str) -> None:
    """Run admin statements synchronously, from a fresh thread and event loop: callers may sit
    inside a running loop (an async test), where asyncio.run would refuse to start."""

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            for sql in statements:
                await conn.execute(sql)
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: asyncio.run(run())).result()


# --- Embedded last resort (issue 7): the pgserver and iotcore wheels -----------------------------


def embedded_postgres_available() -> bool:
    return _postgres.pgserver_bindir() is not None


def embedded_broker_available() -> bool:
    return _brokers.iotcore_available()


class EmbeddedPostgres(_postgres.PostgresServer, PostgresCluster):
    """PostgreSQL 16 from the pgserver wheel, with `PostgresCluster`'s interface: restartable
    (fast or immediate) on the same port, `dsn()`, `create_database()`. As root it runs as user
    postgres, else as a system user pgserver created for it.

    Every method comes from `PostgresServer` (first in the MRO); `PostgresCluster` is a base
    only so that it stands wherever tests annotate one.
    """

    def __init__(self) -> None:
        bindir = _postgres.pgserver_bindir()
        if bindir is None:
            raise ServerError("the pgserver wheel is not installed")
        directory = Path(tempfile.mkdtemp(prefix="pg-embedded-", dir=_root_dir()))
        super().__init__(directory, bindir=bindir, durable=False)

    def close(self) -> None:
        """Stop (immediately: the data is thrown away) and delete the directory."""
        with contextlib.suppress(EmbeddedServerError, subprocess.TimeoutExpired):
            self.stop("immediate")
        super().close()
        shutil.rmtree(self.dir, ignore_errors=True)


class EmbeddedBroker(_brokers.IotcoreBroker):
    """rumqttd from the iotcore wheel, MQTT 3.1.1 with the project's in-flight window, in a
    folder of its own under the process-wide temp dir, deleted on close.

    Restartable on the same port, but it keeps no sessions or queued messages across a restart
    (no persistence: ``persistent`` is False). It also ignores Receive Maximum and drops a client
    that acknowledges out of order.
    """

    def __init__(self) -> None:
        super().__init__(Path(tempfile.mkdtemp(prefix="iotcore-", dir=_root_dir())))

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.dir, ignore_errors=True)
