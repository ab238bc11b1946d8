"""Servers that come with pip: PostgreSQL from the ``pgserver`` wheel, an MQTT broker.

Used by ``ingest demo`` and, as their last resort, by the test fixtures. Each server lives in
one directory of its own, listens on a free 127.0.0.1 port that it keeps across restarts, and
writes nothing outside that directory. ``close()`` stops it; whatever is still running when the
interpreter exits is stopped by an atexit hook.

* :class:`PostgresServer`: ``initdb`` + ``pg_ctl`` from a directory of PostgreSQL binaries,
  by default the ones inside the ``pgserver`` wheel (PostgreSQL 16). PostgreSQL refuses to run
  as root: as root the server runs as user ``postgres`` when there is one, else as a system
  user ``pgserver`` that is created for it (what the ``pgserver`` package itself does).
* :class:`MosquittoBroker`: a ``mosquitto`` found on PATH, with the project's broker config.
* :class:`IotcoreBroker`: rumqttd from the ``iotcore`` wheel, MQTT 3.1.1, in a child process
  that exits by itself when its parent goes away. Limits, compared with mosquitto: no
  persistence (sessions and queued messages are lost when it stops), it ignores the client's
  Receive Maximum, and it drops a client that acknowledges out of order.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, Self

import asyncpg

from ingest.errors import IngestError

__all__ = [
    "Broker",
    "EmbeddedServerError",
    "IotcoreBroker",
    "MosquittoBroker",
    "PostgresServer",
    "find_mosquitto",
    "find_postgres_bindir",
    "iotcore_available",
    "mosquitto_config",
    "pgserver_bindir",
    "start_broker",
]

START_TIMEOUT = 30.0
PGSERVER_USER = "pgserver"


class EmbeddedServerError(IngestError):
    """A server did not start or stop; the message carries the tail of its log."""


# --- plumbing ---------------------------------------------------------------------------------

_live: set[_Server] = set()
_atexit_registered = False


class _Server(Protocol):
    def close(self) -> None: ...


def _track(server: _Server) -> None:
    # Registered at the first start, not at import: atexit runs hooks last-in first-out, so
    # servers stop before the hooks of whoever created their directories delete them.
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(_close_all)
        _atexit_registered = True
    _live.add(server)


def _close_all() -> None:
    for server in list(_live):
        with contextlib.suppress(Exception):
            server.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _is_root() -> bool:
    return os.geteuid() == 0


# --- PostgreSQL ---------------------------------------------------------------------------------


def pgserver_bindir() -> Path | None:
    """The PostgreSQL binaries inside the installed ``pgserver`` wheel (found without importing
    it: its import sets up lock files in the user's runtime directory)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return bindir if _has_postgres(bindir) else None


def find_postgres_bindir() -> Path | None:
    """pgserver's binaries, else a PostgreSQL installation on PATH."""
    if bindir := pgserver_bindir():
        return bindir
    if pg_ctl := shutil.which("pg_ctl"):
        bindir = Path(pg_ctl).resolve().parent
        if _has_postgres(bindir):
            return bindir
    return None


def _has_postgres(bindir: Path) -> bool:
    return all((bindir / name).is_file() for name in ("initdb", "pg_ctl", "postgres"))


def _postgres_account() -> pwd.struct_passwd | None:
    """Who runs PostgreSQL: ourselves, or as root an unprivileged system user."""
    if not _is_root():
        return None
    for name in ("postgres", PGSERVER_USER):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    useradd = shutil.which("useradd") or shutil.which("useradd", path="/usr/sbin:/sbin")
    if useradd is None:
        raise EmbeddedServerError(
            "PostgreSQL cannot run as root and there is no user 'postgres' to run it as; "
            f"create one, or a user {PGSERVER_USER!r} (useradd is missing here)"
        )
    r = subprocess.run(
        [useradd, "--system", "--user-group", "--no-create-home",
         "--shell", "/usr/sbin/nologin", PGSERVER_USER],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if r.returncode != 0 and "already exists" not in r.stderr:
        raise EmbeddedServerError(f"useradd {PGSERVER_USER} failed: {r.stderr.strip()}")
    return pwd.getpwnam(PGSERVER_USER)


def _reachable_by_others(path: Path) -> bool:
    """Another user can reach ``path`` (execute bit for others on every parent)."""
    return all(p.stat().st_mode & 0o001 for p in [path, *path.parents])


_POSTGRES_CONF = """
# iot-ingest embedded server: TCP on the loopback interface only, no Unix socket (its path
# length limit would depend on where the data directory is).
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
max_connections = 100
shared_buffers = 64MB
include_if_exists = 'iot_ingest_port.conf'
"""

_FAST_CONF = """
# Throwaway data: durability against an OS crash does not matter. A process crash
# (stop -m immediate) still keeps every commit: synchronous_commit stays on.
fsync = off
full_page_writes = off
"""


class PostgresServer:
    """A PostgreSQL cluster in ``directory`` (``data/``, ``postgres.log``) on a free port.

    ``durable=False`` turns fsync off (tests). Restartable on the same port; ``start`` on a
    directory that holds a cluster already reuses it.
    """

    def __init__(
        self, directory: Path, *, bindir: Path | None = None, durable: bool = True
    ) -> None:
        found = bindir or find_postgres_bindir()
        if found is None:
            raise EmbeddedServerError(
                "no PostgreSQL: install the embedded extra (pip install 'iot-ingest[embedded]')"
            )
        self.dir = directory
        self.data = directory / "data"
        self._bindir = found
        self._durable = durable
        self._log = directory / "postgres.log"
        self._account = _postgres_account()
        self._port = 0
        self._running = False

    @property
    def port(self) -> int:
        return self._port

    @property
    def running(self) -> bool:
        return self._running

    @property
    def bindir(self) -> Path:
        return self._bindir

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self._port}/{dbname}"

    def log_text(self) -> str:
        return _read(self._log)

    # -- running the binaries as the right user --

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {}
        if self._account is not None:
            kwargs = {
                "user": self._account.pw_uid,
                "group": self._account.pw_gid,
                "extra_groups": [],
            }
        return subprocess.run(
            [str(self._bindir / args[0]), *args[1:]],
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            env={**os.environ, "LC_ALL": "C", "LANG": "C"},
            **kwargs,
        )

    def _give_away(self, path: Path) -> None:
        if self._account is None:
            return
        uid, gid = self._account.pw_uid, self._account.pw_gid
        os.chown(path, uid, gid)
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)

    def _prepare(self) -> None:
        """Create the directory and the cluster (once); as root, hand both to the server user."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._account is not None:
            self.dir.chmod(0o700)
            for p in self.dir.parents:
                if not p.stat().st_mode & 0o001:
                    raise EmbeddedServerError(
                        f"{p} cannot be entered by user {self._account.pw_name!r}, who runs "
                        "PostgreSQL: choose a data directory under one that can (e.g. /tmp)"
                    )
            if not _reachable_by_others(self._bindir):
                # The venv is somewhere the server user cannot enter (e.g. /root): use a copy.
                # The binaries find their vendored libraries through the RPATH
                # $ORIGIN/../../../pgserver.libs, so the copy keeps that layout.
                install = self._bindir.parent  # site-packages/pgserver/pginstall
                root = self.dir / "pgcopy"
                copy = root / "pgserver" / "pginstall"
                if not copy.exists():
                    shutil.copytree(install, copy, symlinks=True)
                    libs = install.parent.parent / "pgserver.libs"
                    if libs.is_dir():
                        shutil.copytree(libs, root / "pgserver.libs", symlinks=True)
                self._bindir = copy / "bin"
            self._give_away(self.dir)
        if (self.data / "PG_VERSION").exists():
            return
        r = self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
            "--locale=C", "--no-sync",
        )  # fmt: skip
        if r.returncode != 0:
            raise EmbeddedServerError(f"initdb failed:\n{_tail(r.stdout + r.stderr)}")
        with (self.data / "postgresql.conf").open("a") as f:
            f.write(_POSTGRES_CONF + ("" if self._durable else _FAST_CONF))

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self._run("pg_ctl", "-D", str(self.data), *args)

    def start(self) -> Self:
        if self._running:
            return self
        self._prepare()
        if (self.data / "postmaster.pid").exists():
            # Left by a run that was killed: that server is ours (same data directory).
            self._pg_ctl("-m", "immediate", "-w", "stop")
        first = self._port == 0
        r: subprocess.CompletedProcess[str] | None = None
        for _ in range(5 if first else 1):
            if first:
                self._port = free_port()
            conf = self.data / "iot_ingest_port.conf"
            conf.write_text(f"port = {self._port}\n")
            self._give_away(conf)
            r = self._pg_ctl("-l", str(self._log), "-w", "-t", str(int(START_TIMEOUT)), "start")
            if r.returncode == 0:
                self._running = True
                _track(self)
                return self
            # pg_ctl gave up waiting but the postmaster may still come up later: make sure not.
            self._pg_ctl("-m", "immediate", "-w", "stop")
            if not first or "could not bind" not in self.log_text():
                break
        out = _tail(r.stdout + r.stderr) if r is not None else ""
        raise EmbeddedServerError(
            f"PostgreSQL did not start on port {self._port}:\n{out}\n{_tail(self.log_text())}"
        )

    def stop(self, mode: Literal["fast", "immediate"] = "fast") -> None:
        """``fast``: clean shutdown; ``immediate``: like a crash, recovery on the next start."""
        if not self._running:
            return
        r = self._pg_ctl("-m", mode, "-w", "-t", str(int(START_TIMEOUT)), "stop")
        if r.returncode != 0 and "Is server running?" not in r.stderr:
            if mode == "fast":
                r = self._pg_ctl("-m", "immediate", "-w", "stop")
            if r.returncode != 0 and "Is server running?" not in r.stderr:
                raise EmbeddedServerError(f"pg_ctl stop failed:\n{_tail(r.stdout + r.stderr)}")
        self._running = False

    def restart(self, mode: Literal["fast", "immediate"] = "fast") -> Self:
        self.stop(mode)
        return self.start()

    def create_database(self, name: str) -> str:
        """Create database ``name`` unless it exists; returns its DSN."""
        exists = _fetchval(self.dsn(), "SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            _fetchval(self.dsn(), f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def close(self) -> None:
        """Stop (fast, else immediate). The directory stays: it belongs to the caller."""
        try:
            self.stop("fast")
        except (EmbeddedServerError, subprocess.TimeoutExpired):
            with contextlib.suppress(Exception):
                self.stop("immediate")
        if (self.data / "postmaster.pid").exists():
            # A start that was interrupted (Ctrl-C) after the postmaster had forked.
            with contextlib.suppress(Exception):
                self._pg_ctl("-m", "immediate", "-w", "stop")
        self._running = False
        _live.discard(self)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PostgresServer {self.dsn()} running={self._running}>"


def _fetchval(dsn: str, sql: str, *args: Any) -> Any:
    """One statement, synchronously, from a fresh thread and event loop: callers may sit
    inside a running loop, where asyncio.run would refuse to start."""

    async def run() -> Any:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetchval(sql, *args)
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(run())).result()


# --- MQTT brokers ------------------------------------------------------------------------------


class Broker(Protocol):
    """What the demo and the fixtures need of a broker."""

    name: str
    dir: Path
    persistent: bool

    @property
    def url(self) -> str: ...
    @property
    def port(self) -> int: ...
    def start(self) -> Self: ...
    def stop(self) -> None: ...
    def kill(self) -> None: ...
    def restart(self) -> Self: ...
    def close(self) -> None: ...
    def log_text(self) -> str: ...


def find_mosquitto() -> str | None:
    """A mosquitto on PATH (only there: hiding it from PATH must be enough to get iotcore)."""
    return shutil.which("mosquitto")


def iotcore_available() -> bool:
    return importlib.util.find_spec("iotcore") is not None


# The settings of config/mosquitto.conf (see the comments there), for installs that do not carry
# the repository's config/ folder; tests/unit/devservers/test_embedded.py keeps the two equal.
_MOSQUITTO_SETTINGS = """\
max_inflight_messages 10000
max_queued_messages 2000000
max_queued_bytes 0
queue_qos0_messages false
persistence true
autosave_interval 30
persistent_client_expiration 7d
allow_anonymous true
"""


def mosquitto_config() -> str:
    """The project's broker config: config/mosquitto.conf in a source checkout, else the same
    settings built in."""
    path = Path(__file__).resolve().parents[2] / "config" / "mosquitto.conf"
    if path.is_file():
        return path.read_text()
    return _MOSQUITTO_SETTINGS


def _override_config(base: str, settings: dict[str, str]) -> str:
    """``base`` with each key of ``settings`` replaced in place (or appended when absent)."""
    pending = dict(settings)
    out: list[str] = []
    for line in base.splitlines():
        words = line.split(maxsplit=1)
        key = words[0] if words and not words[0].startswith("#") else ""
        if key in settings:
            if key in pending:
                out.append(f"{key} {pending.pop(key)}")
            continue
        out.append(line)
    out += [f"{key} {value}" for key, value in pending.items()]
    return "\n".join(out) + "\n"


class _ProcessBroker:
    """A broker in a child process of ours, on a port it keeps across restarts."""

    name = "broker"
    persistent = False

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._stderr = directory / f"{self.name}.stderr"
        self._proc: subprocess.Popen[bytes] | None = None
        self._port = 0

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self._port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        return _read(self._stderr)

    def _command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> Self:
        if self.running:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        first = self._port == 0
        for _ in range(5 if first else 1):
            if first:
                self._port = free_port()
            if self._spawn():
                _track(self)
                return self
            if not first or "in use" not in self.log_text():
                break
        raise EmbeddedServerError(
            f"{self.name} did not start on port {self._port}:\n{_tail(self.log_text())}"
        )

    def _spawn(self) -> bool:
        command = self._command()
        with self._stderr.open("ab") as err:
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,  # iotcore's child exits when this pipe closes
                stdout=err,
                stderr=err,
                cwd=self.dir,
                start_new_session=True,  # a Ctrl-C reaches our handlers, not the broker
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._reap()
                return False
            if port_open(self._port):
                return True
            time.sleep(0.02)
        self.kill()
        return False

    def _reap(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()

    def _signal_and_wait(self, sig: int) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=START_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._reap()

    def stop(self) -> None:
        self._signal_and_wait(signal.SIGTERM)

    def kill(self) -> None:
        self._signal_and_wait(signal.SIGKILL)

    def restart(self) -> Self:
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop; the directory stays (it belongs to the caller)."""
        self.stop()
        _live.discard(self)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url} running={self.running}>"


class MosquittoBroker(_ProcessBroker):
    """mosquitto with the project config (in-flight window, queue limits, persistence in its
    directory) plus a listener on 127.0.0.1; ``overrides`` replace settings of that config."""

    name = "mosquitto"
    persistent = True

    def __init__(
        self, directory: Path, *, binary: str | None = None, overrides: dict[str, str] | None = None
    ) -> None:
        super().__init__(directory)
        found = binary or find_mosquitto()
        if found is None:
            raise EmbeddedServerError("no mosquitto binary (PATH, /usr/sbin)")
        self._binary = found
        self._overrides = dict(overrides or {})

    def log_text(self) -> str:
        return _read(self.dir / "mosquitto.log") + super().log_text()

    def _command(self) -> list[str]:
        settings = {
            "persistence_location": f"{self.dir}/",
            "log_dest": f"file {self.dir / 'mosquitto.log'}",
            **({"user": "root"} if _is_root() else {}),  # else it drops to user `mosquitto`
            **self._overrides,
        }
        text = _override_config(mosquitto_config(), settings)
        text += f"listener {self._port} 127.0.0.1\n"
        config = self.dir / "mosquitto.conf"
        config.write_text(text)
        return [self._binary, "-c", str(config)]


# rumqttd's equivalents of config/mosquitto.conf. Its commit log per subscription filter
# (segments x segment size, in memory) is what bounds the backlog of an offline session, like
# mosquitto's max_queued_messages: 16 x 64 MiB, a few million of our messages.
_RUMQTTD_CONFIG = """\
id = 0

[router]
id = 0
max_connections = 10010
max_outgoing_packet_count = 1000
max_segment_size = 67108864
max_segment_count = 16

[v4.1]
name = "v4-1"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1

[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = {max_payload}
max_inflight_count = {inflight}
dynamic_filters = true
"""

# The child: rumqttd has no shutdown API, so it runs in a process of its own that exits when
# stdin (a pipe from us) closes, i.e. when we exit, whatever the way.
_IOTCORE_MAIN = """\
import logging, os, sys, threading
logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
# rumqttd logs every packet as an ERROR span; keep only what is really wrong.
logging.getLogger("rumqttd").setLevel(logging.CRITICAL)
def _orphaned():
    try:
        sys.stdin.buffer.read()
    finally:
        os._exit(0)
threading.Thread(target=_orphaned, daemon=True).start()
from iotcore.iotcore import IotCoreBroker
IotCoreBroker(config_path=sys.argv[1]).run_forever()
"""


class IotcoreBroker(_ProcessBroker):
    """rumqttd from the ``iotcore`` wheel, MQTT 3.1.1 on 127.0.0.1.

    ``persistent`` is False: a restart loses every session and queued message.
    """

    name = "iotcore"
    persistent = False

    def __init__(
        self, directory: Path, *, inflight: int = 10000, max_payload: int = 16 * 1024 * 1024
    ) -> None:
        super().__init__(directory)
        if not iotcore_available():
            raise EmbeddedServerError(
                "no MQTT broker: install the embedded extra (pip install 'iot-ingest[embedded]')"
            )
        self._inflight = inflight
        self._max_payload = max_payload

    def _command(self) -> list[str]:
        config = self.dir / "rumqttd.toml"
        config.write_text(
            _RUMQTTD_CONFIG.format(
                port=self._port, inflight=self._inflight, max_payload=self._max_payload
            )
        )
        return [sys.executable, "-c", _IOTCORE_MAIN, str(config)]


def start_broker(directory: Path) -> MosquittoBroker | IotcoreBroker:
    """A started broker: mosquitto when it is installed, else iotcore."""
    broker: MosquittoBroker | IotcoreBroker
    broker = MosquittoBroker(directory) if find_mosquitto() else IotcoreBroker(directory)
    return broker.start()
