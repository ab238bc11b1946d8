"""The simulator against a real broker: what a subscriber receives is exactly what the
report says was published, at the rate asked for, through a broker restart.

Each test publishes under its own topic prefix (``sim-<uuid>/...``), so tests sharing a
broker never see each other's traffic.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import aiomqtt
import pytest

from ingest.devservers import free_port
from ingest.devservers.throwaway import MosquittoFactory
from simulators import BAD_KINDS, ConnectError, SimulatorConfig, simulate
from simulators._config import MqttUrl, parse_mqtt_url

pytestmark = pytest.mark.timeout(120)

Received = list[tuple[str, bytes]]


def new_prefix() -> str:
    return f"sim-{uuid.uuid4().hex[:12]}"


class Subscriber:
    """Collects every message under ``<prefix>/+/telemetry`` (QoS 1) in the background."""

    def __init__(self) -> None:
        self.received: Received = []
        self._changed = asyncio.Event()

    async def wait_for(self, n: int, within: float = 20.0) -> None:
        """Until ``n`` messages arrived (fails after ``within`` seconds)."""
        async with asyncio.timeout(within):
            while len(self.received) < n:
                self._changed.clear()
                await self._changed.wait()

    async def settle(self, quiet: float = 0.5) -> None:
        """Give stray extra messages time to show up (there must be none)."""
        await asyncio.sleep(quiet)

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            assert isinstance(payload, bytes | bytearray)
            self.received.append((str(message.topic), bytes(payload)))
            self._changed.set()


@asynccontextmanager
async def subscribed(url: MqttUrl, prefix: str) -> AsyncIterator[Subscriber]:
    sub = Subscriber()
    async with aiomqtt.Client(
        url.host, url.port, username=url.username, password=url.password
    ) as client:
        await client.subscribe(f"{prefix}/+/telemetry", qos=1)
        reader = asyncio.create_task(sub._read(client))
        try:
            yield sub
        finally:
            reader.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reader


async def start_cli(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "simulators",
        *args,
        "--report",
        "json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish_cli(proc: asyncio.subprocess.Process) -> tuple[int, dict[str, Any], str]:
    """Exit status, the parsed JSON report (exactly one object on stdout), stderr."""
    out, err = await asyncio.wait_for(proc.communicate(), 60.0)
    assert proc.returncode is not None
    lines = out.decode().splitlines()
    assert len(lines) == 1, out
    report = json.loads(lines[0])
    assert isinstance(report, dict)
    return proc.returncode, report, err.decode()


def classify(payload: bytes) -> tuple[str, list[dict[str, Any]]]:
    """``("valid", samples)`` or ``(bad kind, [])``: how a decoder would see the payload."""
    try:
        data = json.loads(payload)
    except UnicodeDecodeError:
        return "invalid_utf8", []
    except ValueError:
        return ("truncated_json" if payload.startswith(b"{") else "not_json"), []
    items = data if isinstance(data, list) else [data]
    if all(isinstance(s, dict) and isinstance(s.get("seq"), int) for s in items):
        return "valid", items
    if isinstance(data, dict) and isinstance(data.get("ts"), str):
        return "bad_ts", []
    return "no_numeric", []


def per_device(received: Received, prefix: str) -> dict[str, set[tuple[int, int]]]:
    """Unique ``(seq, ts)`` of valid samples per device id; checks every topic on the way."""
    out: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for topic, payload in received:
        head, dev, tail = topic.split("/")
        assert (head, tail) == (prefix, "telemetry") and dev.startswith("dev-")
        for s in classify(payload)[1]:
            out[dev].add((s["seq"], s["ts"]))
    return out


def assert_contiguous(samples: dict[str, set[tuple[int, int]]]) -> None:
    for dev, seen in samples.items():
        seqs = sorted(seq for seq, _ in seen)
        assert seqs == list(range(1, len(seqs) + 1)), dev
        assert len({ts for _, ts in seen}) == len(seen), f"{dev}: a ts used twice"


def test_subscriber_receives_exactly_what_the_report_says_qos1(mqtt_url: str) -> None:
    prefix = new_prefix()
    config = SimulatorConfig(
        mqtt_url=mqtt_url,
        devices=5,
        rate=40.0,
        count=20,
        qos=1,
        topic=f"{prefix}/{{device_id}}/telemetry",
        seed=1234,
        samples_per_message=3,
        bad_ratio=0.15,
        duplicate_ratio=0.2,
        late_ratio=0.1,
        connections=2,
    )

    async def scenario() -> tuple[Any, Received]:
        async with subscribed(config.broker, prefix) as sub:
            report = await simulate(config)
            await sub.wait_for(report.published)
            await sub.settle()
            return report, sub.received

    report, received = asyncio.run(scenario())

    # QoS 1: published means acknowledged, and the subscriber got exactly those.
    assert report.failed == 0 and report.exit_status == 0
    assert report.messages == 5 * 20
    assert report.published == report.messages + report.faults["duplicate"] == len(received)
    assert {t for t, _ in received} == {f"{prefix}/dev-{i:05d}/telemetry" for i in range(1, 6)}

    # Duplicates are byte-identical repeats of valid messages (two malformed messages of one
    # device may be equal by chance: they carry no seq).
    repeats = Counter(m for m in received if classify(m[1])[0] == "valid")
    assert sum(n - 1 for n in repeats.values()) == report.faults["duplicate"] > 0

    # Malformed messages: as many of each kind as reported.
    kinds = Counter(classify(p)[0] for _t, p in received)
    assert report.faults["bad"] > 0
    assert {k: kinds[k] for k in BAD_KINDS} == report.faults["bad_kinds"]

    # Valid samples: contiguous seq and unique ts per device, late ones as reported.
    samples = per_device(received, prefix)
    assert_contiguous(samples)
    assert report.per_device is not None
    for dev, seen in samples.items():
        assert max(seq for seq, _ in seen) == report.per_device[dev]["last_seq"]
    assert sum(len(s) for s in samples.values()) == report.samples
    started_ms = datetime.fromisoformat(report.started_at).timestamp() * 1000
    late = sum(1 for seen in samples.values() for _, ts in seen if ts < started_ms - 60_000)
    assert late == report.faults["late"] > 0


def test_cli_json_report_qos0_with_sample_arrays(mqtt_url: str) -> None:
    prefix = new_prefix()

    async def scenario() -> tuple[int, dict[str, Any], str, Received]:
        async with subscribed(parse_mqtt_url(mqtt_url), prefix) as sub:
            proc = await start_cli(
                "--mqtt-url", mqtt_url, "--devices", "3", "--count", "10", "--rate", "20",
                "--qos", "0", "--samples-per-message", "2", "--seed", "7",
                "--topic", f"{prefix}/{{device_id}}/telemetry",
            )  # fmt: skip
            code, report, err = await finish_cli(proc)
            await sub.wait_for(30)
            await sub.settle()
            return code, report, err, sub.received

    code, report, err, received = asyncio.run(scenario())
    assert code == 0 and err == ""  # stderr is not a terminal: no progress line
    for key in ("published", "failed", "seconds", "rate", "devices", "target_rate", "faults"):
        assert key in report
    assert (report["published"], report["failed"], report["devices"]) == (30, 0, 3)
    assert report["samples"] == 60 and report["qos"] == 0
    assert len(received) == 30
    samples = per_device(received, prefix)
    assert sorted(samples) == ["dev-00001", "dev-00002", "dev-00003"]
    assert_contiguous(samples)
    assert all(len(s) == 20 for s in samples.values())


def test_processes_split_the_fleet_and_merge_their_reports(mqtt_url: str) -> None:
    prefix = new_prefix()

    async def scenario() -> tuple[int, dict[str, Any], Received]:
        async with subscribed(parse_mqtt_url(mqtt_url), prefix) as sub:
            proc = await start_cli(
                "--mqtt-url", mqtt_url, "--devices", "6", "--count", "5", "--rate", "10",
                "--processes", "2", "--connections", "4", "--duplicate-ratio", "0.2",
                "--seed", "3", "--quiet", "--topic", f"{prefix}/{{device_id}}/telemetry",
            )  # fmt: skip
            code, report, _err = await finish_cli(proc)
            await sub.wait_for(report["published"])
            await sub.settle()
            return code, report, sub.received

    code, report, received = asyncio.run(scenario())
    assert code == 0
    assert report["processes"] == 2 and report["connections"] == 4
    assert report["messages"] == 30
    assert report["published"] == 30 + report["faults"]["duplicate"] == len(received)
    assert sorted(report["per_device"]) == [f"dev-{i:05d}" for i in range(1, 7)]
    assert all(d["messages"] == 5 and d["last_seq"] == 5 for d in report["per_device"].values())
    samples = per_device(received, prefix)
    assert_contiguous(samples)
    assert all(len(s) == 5 for s in samples.values())


def test_achieved_rate_is_within_tolerance_of_the_target(mqtt_url: str) -> None:
    prefix = new_prefix()

    async def scenario() -> tuple[int, dict[str, Any], Received]:
        async with subscribed(parse_mqtt_url(mqtt_url), prefix) as sub:
            proc = await start_cli(
                "--mqtt-url", mqtt_url, "--devices", "50", "--rate", "20", "--duration", "3",
                "--topic", f"{prefix}/{{device_id}}/telemetry",
            )  # fmt: skip
            code, report, _err = await finish_cli(proc)
            await sub.wait_for(report["published"])
            await sub.settle()
            return code, report, sub.received

    code, report, received = asyncio.run(scenario())
    assert code == 0
    assert report["target_rate"] == 1000.0
    # The one timed assertion: generous (2 busy cores), over 3 s.
    assert report["rate"] == pytest.approx(1000.0, rel=0.10)
    assert report["seconds"] == pytest.approx(3.0, rel=0.10)
    assert report["scheduled"] == 3000 and report["messages"] >= 2700
    assert len(received) == report["published"] == report["messages"]


def test_runs_until_interrupted_then_reports(mqtt_url: str) -> None:
    prefix = new_prefix()

    async def scenario() -> tuple[int, dict[str, Any], Received]:
        async with subscribed(parse_mqtt_url(mqtt_url), prefix) as sub:
            proc = await start_cli(
                "--mqtt-url", mqtt_url, "--devices", "4", "--rate", "25",
                "--topic", f"{prefix}/{{device_id}}/telemetry",
            )  # fmt: skip
            await sub.wait_for(20)
            proc.send_signal(signal.SIGINT)
            code, report, _err = await finish_cli(proc)
            await sub.wait_for(report["published"])
            await sub.settle()
            return code, report, sub.received

    code, report, received = asyncio.run(scenario())
    assert code == 0
    assert report["interrupted"] is True and report["failed"] == 0
    assert report["published"] == report["messages"] == len(received) >= 20
    assert_contiguous(per_device(received, prefix))


def test_an_unreachable_broker_fails_quickly_with_a_clear_error() -> None:
    port = free_port()  # nothing listens there
    config = SimulatorConfig(
        mqtt_url=f"mqtt://127.0.0.1:{port}", devices=2, count=1, connect_timeout=1.0
    )
    started = time.monotonic()
    with pytest.raises(ConnectError) as info:
        asyncio.run(simulate(config))
    assert time.monotonic() - started < 10.0
    assert f"127.0.0.1:{port}" in str(info.value)


def test_survives_a_broker_restart_and_counts_what_failed(
    mosquitto_factory: MosquittoFactory,
) -> None:
    own_broker = mosquitto_factory()
    prefix = new_prefix()
    url = own_broker.url

    async def scenario() -> tuple[int, dict[str, Any], int]:
        async with subscribed(parse_mqtt_url(url), prefix) as sub:
            proc = await start_cli(
                "--mqtt-url", url, "--devices", "10", "--rate", "50", "--duration", "5",
                "--topic", f"{prefix}/{{device_id}}/telemetry",
            )  # fmt: skip
            await sub.wait_for(1)  # publishing: now pull the broker away
        await asyncio.to_thread(own_broker.stop)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(own_broker.start)
        async with subscribed(parse_mqtt_url(url), prefix) as after:
            await after.wait_for(10)  # it reconnected and carries on
            code, report, _err = await finish_cli(proc)
            return code, report, len(after.received)

    code, report, after_restart = asyncio.run(scenario())
    assert after_restart >= 10
    assert code == 1  # some messages failed
    assert report["failed"] > 0 and report["published"] > 0
    assert report["published"] + report["failed"] == report["messages"]
    assert report["failed"] == sum(report["failures"].values())
    assert report["reconnects"] >= 1
