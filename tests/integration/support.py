"""Test helpers: run ``ingest`` as a real process, publish real messages, read the database."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import paho.mqtt.client as paho

Payload = bytes | str


def unique_topic() -> str:
    """A topic template no other test uses (tests share the session broker)."""
    return f"t{uuid.uuid4().hex[:10]}/{{device_id}}/telemetry"


def topic_for(template: str, device_id: str) -> str:
    return template.replace("{device_id}", device_id)


def sample(device: int, seq: int, base_ms: int = 1_700_000_000_000) -> bytes:
    """A 5-reading payload with a unique ts per (device, seq)."""
    return json.dumps(
        {
            "ts": base_ms + seq,
            "seq": seq,
            "temperature": 20 + (seq % 10) / 10,
            "humidity": 40.5,
            "battery": 3.7,
            "rssi": -60 - device % 7,
            "fw": "1.0.0",
        }
    ).encode()


class Publisher:
    """A synchronous QoS 1 publisher (paho's network thread) that waits for every PUBACK."""

    def __init__(self, mqtt_url: str, client_id: str | None = None) -> None:
        parts = urlsplit(mqtt_url)
        self._client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]
            client_id=client_id or f"pub-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv311,
        )
        self._client.max_inflight_messages_set(500)
        self._client.max_queued_messages_set(0)
        self._client.connect(parts.hostname or "127.0.0.1", parts.port or 1883, keepalive=30)
        self._client.loop_start()
        self.published = 0

    def publish_many(self, items: Iterable[tuple[str, Payload]], qos: int = 1) -> int:
        infos = []
        for topic, payload in items:
            infos.append(self._client.publish(topic, payload, qos=qos))
            if len(infos) >= 2000:
                self._wait(infos)
                infos = []
        self._wait(infos)
        return self.published

    def _wait(self, infos: list[paho.MQTTMessageInfo]) -> None:
        for info in infos:
            info.wait_for_publish(timeout=60)
            if not info.is_published():
                raise RuntimeError(f"publish of mid {info.mid} not acknowledged")
            self.published += 1

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fleet(template: str, devices: int, count: int, start: int = 0) -> list[tuple[str, bytes]]:
    """``devices`` x ``count`` messages, interleaved across devices like a real fleet."""
    return [
        (topic_for(template, f"dev-{d:05d}"), sample(d, seq))
        for seq in range(start, start + count)
        for d in range(1, devices + 1)
    ]


class Daemon:
    """``python -m ingest run`` as a subprocess with its log in a file; ``prefix`` runs it
    through another command (``["ip", "netns", "exec", "<namespace>"]``)."""

    def __init__(
        self,
        *,
        database_url: str,
        mqtt_url: str,
        topic: str | None,
        client_id: str | None = None,
        extra_env: dict[str, str] | None = None,
        args: list[str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.client_id = client_id or f"ingest-test-{uuid.uuid4().hex[:8]}"
        self.env = {
            **os.environ,
            "INGEST_DATABASE_URL": database_url,
            "INGEST_MQTT_URL": mqtt_url,
            # None: the routes come from --config or INGEST_ROUTES, and a topic beside them
            # (even the default one) is a configuration error.
            **({"INGEST_TOPIC": topic} if topic is not None else {}),
            "INGEST_CLIENT_ID": self.client_id,
            "INGEST_METRICS_PORT": "0",
            "INGEST_LOG_FORMAT": "json",
            "INGEST_STATS_INTERVAL": "1",
            "INGEST_SHUTDOWN_TIMEOUT": "20",
            "INGEST_RETRY_MAX_DELAY": "1",
            **(extra_env or {}),
        }
        self.args = args or []
        self.prefix = list(prefix)
        self._dir = Path(tempfile.mkdtemp(prefix="ingest-daemon-"))
        self.log_path = self._dir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def start(self) -> Daemon:
        self.runs += 1
        log = open(self.log_path, "ab")  # noqa: SIM115 (kept open by the child)
        log.write(f"--- run {self.runs}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "ingest", "run", *self.args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def wait_for_log(self, needle: str, timeout: float = 30.0, after_run: bool = True) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()
            if after_run:
                text = text.rsplit(f"--- run {self.runs}\n", 1)[-1]
            if needle in text:
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}):\n{self.log_text()}")
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not logged within {timeout}s:\n{self.log_text()[-5000:]}")

    def wait_subscribed(self, timeout: float = 30.0) -> None:
        self.wait_for_log("subscribed to", timeout)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"daemon still running after {timeout}s:\n{self.log_text()[-5000:]}"
            ) from None

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except AssertionError:
            self.close()
            raise

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def query(database_url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(database_url)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


def scalar(database_url: str, sql: str, *args: Any) -> Any:
    rows = query(database_url, sql, *args)
    return rows[0][0] if rows else None


def wait_until(
    predicate: Callable[[], bool], timeout: float = 60.0, interval: float = 0.2, what: str = ""
) -> float:
    """Poll until ``predicate()``; returns the seconds it took."""
    t0 = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def wait_rows(database_url: str, expected: int, timeout: float = 60.0) -> float:
    last = [0]

    def done() -> bool:
        last[0] = scalar(database_url, "SELECT count(*) FROM readings") or 0
        return bool(last[0] >= expected)

    try:
        return wait_until(done, timeout, what=f"{expected} rows")
    except AssertionError:
        raise AssertionError(f"only {last[0]} of {expected} rows after {timeout}s") from None


def migrate(database_url: str) -> None:
    from ingest.db.migrate import migrate_dsn

    asyncio.run(migrate_dsn(database_url))


def audit_reconciled(
    database_url: str,
    config: Path,
    report: dict[str, Any],
    *,
    devices: Sequence[str] = (),
    timeout: float = 60.0,
) -> dict[str, Any]:
    """``ingest audit --json`` of a simulator ``report`` against the database, retried until it
    reconciles (what is in flight lands meanwhile) or ``timeout``; its result. ``devices``: audit
    only these (fleets sharing the database). On a timeout the assertion shows the verdict."""
    argv = ["audit", "--database-url", database_url, "--config", str(config), "--report", "-"]
    if devices:
        argv += ["--device", *devices]
    result: dict[str, Any] = {}

    def done() -> bool:
        proc = subprocess.run(
            [sys.executable, "-m", "ingest", *argv, "--json"],
            input=json.dumps(report), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode in (0, 1), proc.stderr
        result.update(json.loads(proc.stdout))
        return proc.returncode == 0

    try:
        wait_until(done, timeout=timeout, interval=0.5, what="the audit to reconcile")
    except AssertionError:
        raise AssertionError(json.dumps(result.get("verdict"), indent=1)) from None
    return result
