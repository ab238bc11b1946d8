"""``ingest demo``: the whole job on servers that come with pip, in one command.

Starts PostgreSQL (the ``pgserver`` wheel) and an MQTT broker (``mosquitto`` when it is
installed, else the ``iotcore`` wheel) on free 127.0.0.1 ports with their data in one
directory, applies the migrations, runs ``ingest run`` and a simulated fleet
(``python -m simulators``), shows a live progress line on stderr, then prints a summary and a
few dashboard-style queries on stdout and stops everything it started.

This is a synchronous orchestrator, not an event loop: it starts child processes, polls the
daemon's ``/metrics`` and a counting MQTT subscriber (paho's own network thread) twice a
second, and runs its few database queries with a short ``asyncio.run`` each. Nothing here can
stall the daemon: that runs in its own process.

Stopping: the children run in sessions of their own, so a Ctrl-C reaches only us. The first
Ctrl-C (or SIGTERM) ends the fleet early and still drains the daemon and prints the summary; a
second one skips to the clean-up. Either way every process started here is stopped, and the
data directory is removed unless ``--keep`` or ``--data-dir`` was given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import asyncpg

from ingest.devservers import (
    EmbeddedServerError,
    IotcoreBroker,
    MosquittoBroker,
    PostgresServer,
    find_mosquitto,
    free_port,
)

__all__ = ["register", "run_demo"]

DEVICES = 50
RATE = 2.0
DURATION = 30.0
TOPIC = "devices/{device_id}/telemetry"
DATABASE = "ingest"
CLIENT_ID = "ingest-demo"
DRAIN_TIMEOUT = 30.0
EXIT_INTERRUPTED = 130

DESCRIPTION = """\
Run the whole pipeline on this machine with nothing but Python: an embedded PostgreSQL 16
(the pgserver wheel) and an MQTT broker (mosquitto when it is installed, else the iotcore
wheel) on free 127.0.0.1 ports, the ingestion daemon, and a simulated fleet. A live line on
stderr shows messages published, readings written, dead letters and messages per second; at
the end a summary and a few dashboard-style queries go to stdout, and every process started
is stopped (also on Ctrl-C). Nothing is written outside the data directory.
"""

EPILOG = """\
needs: pip install 'iot-ingest[embedded]' (pgserver, iotcore).

as root: PostgreSQL refuses to run as root, so the server runs as user 'postgres' when there
is one, else as a system user 'pgserver', created for it with useradd (as the pgserver package
itself does). That user must be able to enter the data directory (the default, under the
system temp dir, is fine; somewhere under /root is not).

examples:
  ingest demo                                    50 devices x 2 msg/s for 30 s
  ingest demo --devices 200 --rate 5 --duration 60
  ingest demo --data-dir ./demo-data             keep the database; run again to add to it
"""


def register(sub: Any) -> None:
    """Add the ``demo`` subcommand to the ``ingest`` parser (``sub``: its subparsers)."""
    p = sub.add_parser(
        "demo",
        help="run broker, database, daemon and a simulated fleet on embedded servers",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--devices", type=_positive_int, default=DEVICES, metavar="N",
        help=f"simulated devices (default {DEVICES})",
    )  # fmt: skip
    p.add_argument(
        "--rate", type=_positive_float, default=RATE, metavar="R",
        help=f"messages per second per device (default {RATE:g})",
    )  # fmt: skip
    p.add_argument(
        "--duration", type=_positive_float, default=DURATION, metavar="S",
        help=f"seconds the fleet publishes (default {DURATION:g})",
    )  # fmt: skip
    p.add_argument(
        "--data-dir", type=Path, metavar="DIR",
        help="keep the servers' data here (created if missing, reused if it holds a previous "
        "demo); default: a temporary directory, removed at the end",
    )  # fmt: skip
    p.add_argument("--keep", action="store_true", help="do not remove the temporary data directory")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


# --- live counters -------------------------------------------------------------------------------


class _PublishCounter:
    """Counts what the broker routes on the fleet's topics: a QoS 0 subscriber in paho's
    network thread. It shows "published" live; the simulator's report has the final word."""

    def __init__(self, mqtt_url: str, topic_filter: str) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.count = 0
        host, port = mqtt_url.removeprefix("mqtt://").rsplit(":", 1)
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{CLIENT_ID}-counter",
            protocol=paho.MQTTv311,
            clean_session=True,
        )
        self._client.on_message = self._on_message
        self._client.on_connect = lambda c, *_: c.subscribe(topic_filter, qos=0)
        self._client.connect(host, int(port), keepalive=30)
        self._client.loop_start()

    def _on_message(self, *_: Any) -> None:
        self.count += 1  # only paho's thread writes

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self._client.loop_stop()


def _scrape(port: int) -> dict[str, float] | None:
    """The daemon's /metrics, summed over labels, ``_total`` suffixes dropped."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
            text = r.read().decode()
    except OSError:
        return None
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        name = name.split("{", 1)[0].removesuffix("_total")
        with contextlib.suppress(ValueError):
            out[name] = out.get(name, 0.0) + float(value)
    return out


# --- the run -----------------------------------------------------------------------------------


@dataclass
class _Run:
    """Everything started, so that clean-up can stop exactly that."""

    data_dir: Path
    remove_data: bool
    postgres: PostgresServer | None = None
    broker: MosquittoBroker | IotcoreBroker | None = None
    daemon: subprocess.Popen[bytes] | None = None
    simulator: subprocess.Popen[bytes] | None = None
    counter: _PublishCounter | None = None
    database_url: str = ""
    metrics_port: int = 0
    files: list[IO[bytes]] = field(default_factory=list)

    def open_log(self, name: str) -> IO[bytes]:
        f = (self.data_dir / name).open("ab")
        self.files.append(f)
        return f


class _DemoError(Exception):
    """The demo cannot go on; the message says why (with a log tail)."""


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_demo(args: argparse.Namespace) -> int:
    if args.data_dir is not None:
        data_dir = args.data_dir.resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        remove = False
    else:
        data_dir = Path(tempfile.mkdtemp(prefix="ingest-demo-"))
        remove = not args.keep
    if os.geteuid() == 0:
        data_dir.chmod(data_dir.stat().st_mode | 0o711)  # the PostgreSQL user must enter it
    run = _Run(data_dir=data_dir, remove_data=remove)
    previous = {
        # SIGINT too: a parent that started us with SIGINT ignored (a background job of a
        # non-interactive shell) would otherwise leave Ctrl-C without effect.
        s: signal.signal(s, signal.default_int_handler)
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    interrupted = False
    try:
        try:
            _start(run)
            interrupted = _run_fleet(run, args)
            _drain(run)
            _print_summary(run)
        except KeyboardInterrupt:
            interrupted = True
            _say("\ninterrupted: stopping everything")
        except (EmbeddedServerError, _DemoError) as exc:
            _say(f"ingest demo: {exc}")
            return 1
        return EXIT_INTERRUPTED if interrupted else 0
    finally:
        try:
            _cleanup(run)
        except KeyboardInterrupt:  # a second Ctrl-C: finish the clean-up all the same
            _cleanup(run)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _start(run: _Run) -> None:
    d = run.data_dir
    _say(f"ingest demo: data in {d}")
    run.postgres = PostgresServer(d / "postgres")
    run.postgres.start()
    version = _postgres_version(run.postgres)
    _say(
        f"  PostgreSQL {version} on 127.0.0.1:{run.postgres.port} (binaries {run.postgres.bindir})"
    )
    if find_mosquitto():
        run.broker = MosquittoBroker(d / "mosquitto")
    else:
        run.broker = IotcoreBroker(d / "iotcore")
    run.broker.start()
    _say(f"  MQTT broker {run.broker.name} on {run.broker.url}")
    run.database_url = run.postgres.create_database(DATABASE)
    from ingest.db.migrate import migrate_dsn

    applied = asyncio.run(migrate_dsn(run.database_url))
    _say(f"  migrations applied: {', '.join(applied) if applied else 'none pending'}")
    run.metrics_port = free_port()
    env = _child_env()
    env.update(
        INGEST_DATABASE_URL=run.database_url,
        INGEST_MQTT_URL=run.broker.url,
        INGEST_TOPIC=TOPIC,
        INGEST_CLIENT_ID=CLIENT_ID,
        INGEST_METRICS_PORT=str(run.metrics_port),
        INGEST_METRICS_HOST="127.0.0.1",
        INGEST_LOG_FORMAT="json",
        INGEST_STATS_INTERVAL="5",
    )
    log = run.open_log("ingest.log")
    run.daemon = subprocess.Popen(
        [sys.executable, "-m", "ingest", "run"],
        env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=d,
        start_new_session=True,
    )  # fmt: skip
    _wait_subscribed(run)
    _say(f"  ingest run: pid {run.daemon.pid}, metrics on 127.0.0.1:{run.metrics_port}")


def _child_env() -> dict[str, str]:
    # Hermetic: the user's own INGEST_* settings would point the children elsewhere.
    return {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}


def _postgres_version(pg: PostgresServer) -> str:
    async def fetch() -> str:
        conn = await asyncpg.connect(pg.dsn())
        try:
            return str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()

    return asyncio.run(fetch())


def _wait_subscribed(run: _Run, timeout: float = 60.0) -> None:
    assert run.daemon is not None
    log = run.data_dir / "ingest.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if "subscribed to" in text:
            return
        if run.daemon.poll() is not None:
            raise _DemoError(
                f"ingest run exited with status {run.daemon.returncode}:\n{_tail(text)}"
            )
        time.sleep(0.1)
    raise _DemoError(f"ingest run did not subscribe within {timeout:g}s:\n{_tail(log)}")


def _tail(source: str | Path, lines: int = 15) -> str:
    text = source.read_text(errors="replace") if isinstance(source, Path) else source
    return "\n".join(text.splitlines()[-lines:])


class _Progress:
    """One line on stderr: rewritten in place on a terminal, every few seconds otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self._last_print = 0.0
        self._last_line = self._shown = ""
        self._window: list[tuple[float, int]] = []

    def update(self, elapsed: float, published: int, written: int | None, dead: int | None) -> None:
        now = time.monotonic()
        self._window = [(t, n) for t, n in self._window if now - t <= 2.0] + [(now, published)]
        t0, n0 = self._window[0]
        rate = (published - n0) / (now - t0) if now > t0 else 0.0
        line = (
            f"{elapsed:6.1f} s  published {published:,}  written {_n(written)} readings  "
            f"dead letters {_n(dead)}  {rate:,.0f} msgs/s"
        )
        self._last_line = line
        if self.tty:
            sys.stderr.write("\r" + line + "\x1b[K")
            sys.stderr.flush()
        elif now - self._last_print >= 5.0:
            self._last_print, self._shown = now, line
            _say(line)

    def finish(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()
        elif self._last_line != self._shown:
            _say(self._last_line)


def _n(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def _run_fleet(run: _Run, args: argparse.Namespace) -> bool:
    """Run the simulator to its end; True when a Ctrl-C ended it early."""
    assert run.broker is not None
    run.counter = _PublishCounter(run.broker.url, TOPIC.replace("{device_id}", "+"))
    _say(
        f"  fleet: {args.devices} devices x {args.rate:g} msg/s for {args.duration:g} s "
        f"(Ctrl-C ends it early)"
    )
    out = run.open_log("simulator.json")
    err = run.open_log("simulator.log")
    run.simulator = subprocess.Popen(
        [sys.executable, "-m", "simulators", "--mqtt-url", run.broker.url, "--topic", TOPIC,
         "--devices", str(args.devices), "--rate", f"{args.rate:g}",
         "--duration", f"{args.duration:g}", "--qos", "1", "--report", "json", "--quiet"],
        env=_child_env(), stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=run.data_dir,
        start_new_session=True,
    )  # fmt: skip
    progress = _Progress()
    started = time.monotonic()
    interrupted = False
    try:
        while run.simulator.poll() is None:
            _show(run, progress, started)
            time.sleep(0.5)
    except KeyboardInterrupt:
        interrupted = True
        progress.finish()
        _say("interrupted: stopping the fleet, draining the daemon (Ctrl-C again to skip)")
        _stop(run.simulator, signal.SIGINT, 15.0)
    else:
        _show(run, progress, started)
        progress.finish()
    return interrupted


def _show(run: _Run, progress: _Progress, started: float) -> None:
    assert run.counter is not None
    m = _scrape(run.metrics_port)
    written = int(m["ingest_readings_written"]) if m and "ingest_readings_written" in m else None
    dead = int(m["ingest_dead_letters"]) if m and "ingest_dead_letters" in m else None
    progress.update(time.monotonic() - started, run.counter.count, written, dead)


def _simulator_report(run: _Run) -> dict[str, Any] | None:
    try:
        text = (run.data_dir / "simulator.json").read_text().strip().splitlines()
        report: dict[str, Any] = json.loads(text[-1])
        return report
    except (OSError, ValueError, IndexError):
        return None


def _drain(run: _Run) -> None:
    """Wait until the daemon has acknowledged what the fleet published, then stop it."""
    report = _simulator_report(run)
    published = int(report["published"]) if report else None
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while published is not None and time.monotonic() < deadline:
        m = _scrape(run.metrics_port)
        if m is None or m.get("ingest_messages_acknowledged", 0) >= published:
            break
        time.sleep(0.2)
    if run.daemon is not None:
        code = _stop(run.daemon, signal.SIGTERM, DRAIN_TIMEOUT + 15)
        if code != 0:
            _say(f"  ingest run exited with status {code}: see {run.data_dir / 'ingest.log'}")


def _stop(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> int:
    """Signal, wait, then kill: the process is gone when this returns."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _cleanup(run: _Run) -> None:
    if run.counter is not None:
        run.counter.close()
        run.counter = None
    for proc, sig, timeout in (
        (run.simulator, signal.SIGINT, 10.0),
        (run.daemon, signal.SIGTERM, DRAIN_TIMEOUT + 15),
    ):
        if proc is not None:
            _stop(proc, sig, timeout)
    if run.broker is not None:
        run.broker.close()
        run.broker = None
    if run.postgres is not None:
        run.postgres.close()
        run.postgres = None
    for f in run.files:
        f.close()
    run.files.clear()
    if run.remove_data:
        shutil.rmtree(run.data_dir, ignore_errors=True)
    else:
        _say(f"data kept in {run.data_dir} (run `ingest demo --data-dir {run.data_dir}` again)")


# --- the summary -------------------------------------------------------------------------------


async def _queries(dsn: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        have = {
            name: await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name)
            for name in ("devices", "latest_readings")
        }
        out: dict[str, Any] = {"have": have}
        out["readings"] = await conn.fetchval("SELECT count(*) FROM readings")
        out["texts"] = await conn.fetchval("SELECT count(*) FROM text_readings")
        out["dead_letters"] = await conn.fetch(
            "SELECT reason, count(*) AS n FROM dead_letters GROUP BY reason ORDER BY n DESC"
        )
        # The dashboard tables when present and folded (cheaper), else the raw readings.
        out["devices_from"] = "readings"
        out["devices"] = await conn.fetchval("SELECT count(DISTINCT device_id) FROM readings")
        if have["devices"] and (n := await conn.fetchval("SELECT count(*) FROM devices")):
            out["devices_from"], out["devices"] = "devices", n
        out["per_metric"] = await conn.fetch(
            "SELECT metric, count(*) AS n, min(value) AS min, avg(value) AS avg,"
            " max(value) AS max FROM readings GROUP BY metric ORDER BY metric"
        )
        device = await conn.fetchval("SELECT min(device_id) FROM readings")
        out["device"] = device
        out["latest_from"] = "readings"
        out["latest"] = []
        if device is not None and have["latest_readings"]:
            out["latest_from"] = "latest_readings"
            out["latest"] = await conn.fetch(
                "SELECT metric, value, ts FROM latest_readings WHERE device_id = $1"
                " ORDER BY metric",
                device,
            )
        if device is not None and not out["latest"]:
            out["latest_from"] = "readings"
            out["latest"] = await conn.fetch(
                "SELECT DISTINCT ON (metric) metric, value, ts FROM readings"
                " WHERE device_id = $1 ORDER BY metric, ts DESC",
                device,
            )
        return out
    finally:
        await conn.close()


def _print_summary(run: _Run) -> None:
    report = _simulator_report(run)
    q = asyncio.run(_queries(run.database_url))
    p = print
    p()
    p("Summary")
    if report is not None:
        p(
            f"  published     {report['published']:>12,} messages in {report['seconds']:.1f} s "
            f"({report['rate']:,.1f} msg/s; {report['failed']:,} failed)"
        )
    else:
        p(f"  published     {'?':>12} (no simulator report: see {run.data_dir / 'simulator.log'})")
    p(
        f"  written       {q['readings']:>12,} readings in the database"
        f" (and {q['texts']:,} text readings)"
    )
    dead = sum(r["n"] for r in q["dead_letters"])
    reasons = ", ".join(f"{r['reason']} {r['n']:,}" for r in q["dead_letters"])
    p(f"  dead letters  {dead:>12,}" + (f" ({reasons})" if reasons else ""))
    p()
    p(f"Devices seen: {q['devices']:,} (from {q['devices_from']})")
    p()
    p("Readings per metric:")
    p(f"  {'metric':<16}{'readings':>10}{'min':>12}{'avg':>12}{'max':>12}")
    for r in q["per_metric"]:
        p(f"  {r['metric']:<16}{r['n']:>10,}{r['min']:>12.2f}{r['avg']:>12.2f}{r['max']:>12.2f}")
    p()
    p(f"Latest values of {q['device']} (from {q['latest_from']}):")
    for r in q["latest"]:
        p(
            f"  {r['metric']:<16}{r['value']:>12.2f}  at {r['ts'].isoformat(timespec='milliseconds')}"
        )
    sys.stdout.flush()
