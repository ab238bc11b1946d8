"""MQTT brokers in a child process of ours, on a free 127.0.0.1 port kept across restarts.

* :class:`MosquittoBroker`: a ``mosquitto`` found on PATH, with the project's broker config.
* :class:`IotcoreBroker`: rumqttd from the ``iotcore`` wheel, MQTT 3.1.1, in a child process
  that exits by itself when its parent goes away. Limits, compared with mosquitto: no
  persistence (sessions and queued messages are lost when it stops), it ignores the client's
  Receive Maximum, and it drops a client that acknowledges out of order.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

from ingest.devservers._process import (
    START_TIMEOUT,
    EmbeddedServerError,
    _is_root,
    _read,
    _tail,
    _track,
    _untrack,
    local_servers_allowed,
)
from ingest.devservers.ports import free_port, port_open

__all__ = [
    "Broker",
    "IotcoreBroker",
    "Listener",
    "MosquittoBroker",
    "find_mosquitto",
    "iotcore_available",
    "mosquitto_config",
    "start_broker",
]


class Broker(Protocol):
    """What the demo and the fixtures need of a broker."""

    name: str
    dir: Path
    persistent: bool

    @property
    def url(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def ports(self) -> tuple[int, ...]: ...
    @property
    def running(self) -> bool: ...
    def start(self) -> Self: ...
    def stop(self) -> None: ...
    def kill(self) -> None: ...
    def restart(self) -> Self: ...
    def close(self) -> None: ...
    def log_text(self) -> str: ...


def find_mosquitto() -> str | None:
    """A mosquitto on PATH or in the usual sbin folders; None when ``INGEST_TEST_LOCAL_SERVERS``
    is ``0`` (to prove the fallbacks on a machine that has one)."""
    if not local_servers_allowed():
        return None
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


def iotcore_available() -> bool:
    return importlib.util.find_spec("iotcore") is not None


# The settings of config/mosquitto.conf (see the comments there), for installs that do not carry
# the repository's config/ folder; tests/unit/devservers/test_brokers.py keeps the two equal.
_MOSQUITTO_SETTINGS = """\
max_inflight_messages 10000
max_queued_messages 2000000
max_queued_bytes 0
queue_qos0_messages false
persistence true
autosave_interval 30
persistent_client_expiration 7d
max_packet_size 16777216
allow_anonymous true
"""


def mosquitto_config() -> str:
    """The project's broker config: config/mosquitto.conf in a source checkout, else the same
    settings built in."""
    path = Path(__file__).resolve().parents[2] / "config" / "mosquitto.conf"
    if path.is_file():
        return path.read_text()
    return _MOSQUITTO_SETTINGS


def _override_config(base: str, settings: Mapping[str, str]) -> str:
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

    @property
    def ports(self) -> tuple[int, ...]:
        return (self._port,)

    def _pick_ports(self) -> None:
        self._port = free_port()

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _addresses(self) -> list[tuple[str, int]]:
        """Every (address, port) the broker listens on: all must answer before it is started."""
        return [("127.0.0.1", port) for port in self.ports]

    def start(self) -> Self:
        if self.running:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        first = self._port == 0
        for _ in range(5 if first else 1):
            if first:
                self._pick_ports()
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
            if all(port_open(port, host) for host, port in self._addresses()):
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
        _untrack(self)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url} running={self.running}>"


@dataclass(frozen=True, kw_only=True)
class Listener:
    """One more mosquitto listener, next to the plain one on 127.0.0.1 every broker has.

    ``host`` is the address it listens on: 127.0.0.1, or an address of the network namespace
    the broker runs in (the multi-host tests give each host a namespace of its own). ``port``
    0 picks a free port at the first start (kept across restarts). TLS when
    ``certfile`` and ``keyfile`` are given (PEM files, readable by whoever runs the broker);
    ``require_certificate`` makes clients present a certificate signed by ``cafile``.
    """

    port: int = 0
    host: str = "127.0.0.1"
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    require_certificate: bool = False

    def __post_init__(self) -> None:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("Listener: certfile and keyfile go together")
        if self.require_certificate and self.cafile is None:
            raise ValueError("Listener: require_certificate needs cafile")
        if not 0 <= self.port < 65536:
            raise ValueError(f"Listener: port must be 0..65535, not {self.port}")

    def config(self, port: int) -> str:
        """This listener's lines of mosquitto.conf, listening on ``port``."""
        lines = [f"listener {port} {self.host}"]
        lines += [
            f"{key} {value}"
            for key, value in (
                ("cafile", self.cafile),
                ("certfile", self.certfile),
                ("keyfile", self.keyfile),
            )
            if value is not None
        ]
        if self.require_certificate:
            lines.append("require_certificate true")
        return "\n".join(lines) + "\n"


class MosquittoBroker(_ProcessBroker):
    """mosquitto with the project config (in-flight window, queue limits, persistence in its
    directory) and a plain listener on 127.0.0.1 (``port``, ``url``).

    Extra configuration, all optional:

    * ``overrides``: settings of config/mosquitto.conf replaced (``{"max_inflight_messages":
      "20"}``), or appended when the config lacks them.
    * ``listeners``: more listeners (:class:`Listener`, e.g. TLS); ``ports`` lists every port
      bound, the plain one first, then one per listener in the order given.
    * ``password_file``, ``acl_file`` (made with ``mosquitto_passwd``; they apply to every
      listener) and ``allow_anonymous`` (the project config allows anonymous clients).
    """

    name = "mosquitto"
    persistent = True

    def __init__(
        self,
        directory: Path,
        *,
        binary: str | None = None,
        overrides: Mapping[str, str] | None = None,
        listeners: Sequence[Listener] = (),
        password_file: Path | None = None,
        acl_file: Path | None = None,
        allow_anonymous: bool | None = None,
    ) -> None:
        super().__init__(directory)
        found = binary or find_mosquitto()
        if found is None:
            raise EmbeddedServerError("no mosquitto binary (PATH, /usr/sbin)")
        self._binary = found
        self._overrides = dict(overrides or {})
        if password_file is not None:
            self._overrides["password_file"] = str(password_file)
        if acl_file is not None:
            self._overrides["acl_file"] = str(acl_file)
        if allow_anonymous is not None:
            self._overrides["allow_anonymous"] = "true" if allow_anonymous else "false"
        self._listeners = tuple(listeners)
        self._extra_ports: list[int] = []

    @property
    def ports(self) -> tuple[int, ...]:
        """Every port bound: the plain listener's, then each extra listener's in order."""
        return (self._port, *self._extra_ports)

    def log_text(self) -> str:
        return _read(self.dir / "mosquitto.log") + super().log_text()

    def _addresses(self) -> list[tuple[str, int]]:
        hosts = ["127.0.0.1", *(listener.host for listener in self._listeners)]
        return list(zip(hosts, self.ports, strict=True))

    def _pick_ports(self) -> None:
        super()._pick_ports()
        self._extra_ports = [listener.port or free_port() for listener in self._listeners]

    def _command(self) -> list[str]:
        settings = {
            "persistence_location": f"{self.dir}/",
            "log_dest": f"file {self.dir / 'mosquitto.log'}",
            **({"user": "root"} if _is_root() else {}),  # else it drops to user `mosquitto`
            **self._overrides,
        }
        text = _override_config(mosquitto_config(), settings)
        text += f"listener {self._port} 127.0.0.1\n"
        for listener, port in zip(self._listeners, self._extra_ports, strict=True):
            text += listener.config(port)
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
