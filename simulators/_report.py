"""The run's outcome: counters merged over processes, the JSON and text reports, progress."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from simulators._config import SimulatorConfig
from simulators._faults import BAD_KINDS, HOSTILE_BAD_KINDS, SPARKPLUG_BAD_KINDS

#: Per-device counters go into the report up to this many devices.
PER_DEVICE_LIMIT = 1000

#: The achieved rate may fall this far below the target before the report calls it short.
RATE_TOLERANCE = 0.05


DeviceCounts = tuple[int, int, int, int, int, int, int]
#: A broker's (devices, messages, published, failed), with several brokers.
BrokerCounts = tuple[int, int, int, int]
DeviceKinds = tuple[int, dict[str, int]]


@dataclass(slots=True)
class ProcessResult:
    """What one process sends back (picklable: plain fields only)."""

    messages: int = 0
    duplicates: int = 0
    published: int = 0
    published_duplicates: int = 0
    failed: int = 0
    samples: int = 0
    late: int = 0
    bad: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            (*BAD_KINDS, *HOSTILE_BAD_KINDS, *SPARKPLUG_BAD_KINDS), 0
        )
    )
    extreme: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    reconnects: int = 0
    connect_failures: int = 0
    max_lag: float = 0.0
    #: Epoch seconds when its last message was settled (acknowledged, failed or handed over).
    finished: float = 0.0
    #: device id -> (messages, published, failed, last seq, bad, duplicates, late)
    devices: dict[str, DeviceCounts] | None = None
    #: device id -> (extreme messages, bad messages by kind), kept with ``devices``
    kinds: dict[str, DeviceKinds] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    #: Connections it opened (with several brokers at least one per broker it has devices of).
    connections: int = 0
    #: broker name -> its devices' counts (several brokers only)
    brokers: dict[str, BrokerCounts] = field(default_factory=dict)
    #: ``--format sparkplug``: counters of the births, deaths and commands
    sparkplug: dict[str, int] = field(default_factory=dict)
    #: ``--format sparkplug``: edge node -> [NBIRTHs sent, acknowledged, failed]
    nodes: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Progress:
    """A live snapshot for the progress line."""

    elapsed: float
    published: int
    failed: int
    messages: int
    lag: float
    target_rate: float


@dataclass(frozen=True, kw_only=True, slots=True)
class Report:
    """The outcome of a run. ``rate`` is scheduled messages published per second (duplicates
    not counted), comparable with ``target_rate`` = devices x rate per device.
    """

    published: int
    failed: int
    seconds: float
    rate: float
    devices: int
    target_rate: float
    rate_per_device: float
    on_target: bool
    max_lag: float
    messages: int
    scheduled: int | None
    samples: int
    faults: dict[str, Any]
    failures: dict[str, int]
    reconnects: int
    connect_failures: int
    interrupted: bool
    qos: int
    connections: int
    processes: int
    samples_per_message: int
    count: int | None
    duration: float | None
    seed: int
    topic: str
    mqtt_url: str
    started_at: str
    finished_at: str
    errors: list[str]
    per_device: dict[str, dict[str, Any]] | None
    #: With several brokers: each one's ``devices``, ``messages``, ``published``, ``failed``
    #: (by its URL without user info); None with one (the totals say it all).
    brokers: dict[str, dict[str, int]] | None = None
    #: ``--format sparkplug``: the group, nodes and counters of births, deaths, commands.
    sparkplug: dict[str, Any] | None = None

    @property
    def exit_status(self) -> int:
        """0 when every message was published, 1 otherwise."""
        return 1 if self.failed or self.errors else 0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for optional in ("per_device", "brokers", "sparkplug"):
            if data[optional] is None:
                del data[optional]
        return data

    def to_text(self) -> str:
        target = self.target_rate
        pct = 100.0 * self.rate / target if target else 0.0
        lines = [
            f"simulate: {self.devices:,} devices x {self.rate_per_device:g} msg/s "
            f"(target {target:,.1f} msg/s), QoS {self.qos}, {self.connections} connection(s), "
            f"{self.processes} process(es), seed {self.seed}"
            + (" (interrupted)" if self.interrupted else ""),
            f"  published {self.published:,} of {self.messages + self.faults['duplicate']:,} "
            f"messages ({self.samples:,} samples) in {self.seconds:.2f} s",
            f"  rate      {self.rate:,.1f} msg/s, {pct:.1f}% of target; max lag {self.max_lag:.3f} s",
            f"  failed    {self.failed:,}"
            + (
                " (" + ", ".join(f"{k} {v:,}" for k, v in self.failures.items() if v) + ")"
                if self.failed
                else ""
            ),
        ]
        bad = self.faults["bad_kinds"]
        lines.append(
            f"  faults    bad {self.faults['bad']:,} ("
            + ", ".join(f"{k} {bad[k]:,}" for k in bad)
            + f"), duplicate {self.faults['duplicate']:,}, late samples {self.faults['late']:,}"
            + (f", extreme {self.faults['extreme']:,}" if "extreme" in self.faults else "")
        )
        if self.reconnects or self.connect_failures:
            lines.append(
                f"  reconnects {self.reconnects:,}, failed connection attempts "
                f"{self.connect_failures:,}"
            )
        if self.scheduled is not None and self.messages < self.scheduled:
            lines.append(
                f"  not sent  {self.scheduled - self.messages:,} of {self.scheduled:,} scheduled "
                "messages were still due when the duration ended"
            )
        if not self.on_target and self.messages:
            if self.failed:
                why = "messages failed"
            elif self.max_lag > 0.5:
                why = "this machine could not keep up; add --processes" + (
                    "" if self.sparkplug is not None else " or --connections"
                )
            else:
                why = "the run was too short to measure"
            lines.append(
                f"  BELOW TARGET: {self.rate:,.1f} msg/s achieved, {target:,.1f} asked ({why})"
            )
        for name, b in (self.brokers or {}).items():
            lines.append(
                f"  broker    {name}: {b['devices']:,} devices, published {b['published']:,}, "
                f"failed {b['failed']:,}"
            )
        if self.sparkplug is not None:
            sp = self.sparkplug
            lines.append(
                f"  sparkplug group {sp['group_id']}, {sp['nodes']:,} edge node(s): NBIRTH "
                f"{sp['births']:,}, DBIRTH {sp['device_births']:,}, rebirth requests answered "
                f"{sp['rebirth_requests']:,}, deaths {sp['deaths']:,}"
            )
        lines.extend(f"  error: {e}" for e in self.errors)
        return "\n".join(lines)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


def build_report(
    config: SimulatorConfig,
    results: list[ProcessResult],
    *,
    started: float,
    stopped: float | None,
    nominal: float | None,
    scheduled: int | None,
) -> Report:
    """Merge the processes' results. ``started`` is the schedule's epoch start; ``stopped``
    the epoch time of an interruption; ``nominal`` the schedule's length and ``scheduled`` its
    messages (``None``: until stopped).
    """
    total, per_device = _merge(results)
    finished = max(total.finished, started)
    elapsed = finished - started
    # A run that kept up ends with its last slot, one slot short of the schedule's length:
    # measure it over the whole schedule so that on time means exactly the target rate.
    floor = max(0.0, stopped - started) if stopped is not None else nominal
    seconds = max(elapsed, floor or 0.0, 1e-9)
    rate = (total.published - total.published_duplicates) / seconds
    target = config.target_rate
    on_target = rate >= (1.0 - RATE_TOLERANCE) * target
    return Report(
        published=total.published,
        failed=total.failed,
        seconds=round(seconds, 6),
        rate=round(rate, 3),
        devices=config.devices,
        target_rate=target,
        rate_per_device=config.rate,
        on_target=on_target,
        max_lag=round(total.max_lag, 6),
        messages=total.messages,
        scheduled=scheduled if stopped is None else None,
        samples=total.samples,
        faults=_faults(config, total),
        failures=total.failures,
        reconnects=total.reconnects,
        connect_failures=total.connect_failures,
        interrupted=stopped is not None,
        qos=config.qos,
        connections=total.connections or config.connection_count,
        processes=config.processes,
        samples_per_message=config.samples_per_message,
        count=config.count,
        duration=config.duration,
        seed=config.seed_value,
        topic=config.topic,
        mqtt_url=",".join(b.redacted() for b in config.brokers),
        started_at=_iso(started),
        finished_at=_iso(finished),
        errors=total.errors,
        per_device=dict(sorted(per_device.items())) if per_device else None,
        brokers=_brokers(config, total) if len(config.brokers) > 1 else None,
        sparkplug=_sparkplug(config, total),
    )


def _brokers(config: SimulatorConfig, total: ProcessResult) -> dict[str, dict[str, int]]:
    keys = ("devices", "messages", "published", "failed")
    return {
        b.name(): dict(zip(keys, total.brokers.get(b.name(), (0, 0, 0, 0)), strict=True))
        for b in config.brokers
    }


def _sparkplug(config: SimulatorConfig, total: ProcessResult) -> dict[str, Any] | None:
    if config.format != "sparkplug":
        return None
    return {
        "group_id": config.group_id,
        "nodes": config.nodes,
        "devices_per_node": config.devices_per_node,
        **total.sparkplug,
    }


def _merge(results: list[ProcessResult]) -> tuple[ProcessResult, dict[str, dict[str, Any]]]:
    """The processes' totals, and the counters of each device (when they were kept)."""
    total = ProcessResult(failures={})
    per_device: dict[str, dict[str, Any]] = {}
    for r in results:
        total.messages += r.messages
        total.duplicates += r.duplicates
        total.published += r.published
        total.published_duplicates += r.published_duplicates
        total.failed += r.failed
        total.samples += r.samples
        total.late += r.late
        total.extreme += r.extreme
        for kind, n in r.bad.items():
            total.bad[kind] = total.bad.get(kind, 0) + n
        for reason, n in r.failures.items():
            total.failures[reason] = total.failures.get(reason, 0) + n
        total.reconnects += r.reconnects
        total.connect_failures += r.connect_failures
        total.max_lag = max(total.max_lag, r.max_lag)
        total.finished = max(total.finished, r.finished)
        total.errors.extend(r.errors)
        total.connections += r.connections
        for name, (n, messages, published, failed) in r.brokers.items():
            was = total.brokers.get(name, (0, 0, 0, 0))
            total.brokers[name] = (
                was[0] + n,
                was[1] + messages,
                was[2] + published,
                was[3] + failed,
            )
        for dev, counts in (r.devices or {}).items():
            per_device[dev] = _device(counts, r.kinds.get(dev, (0, {})))
        for name, n in r.sparkplug.items():
            total.sparkplug[name] = total.sparkplug.get(name, 0) + n
        for node, (sent, acked, failed) in r.nodes.items():
            total.samples += acked
            if r.devices is not None:
                per_device[node] = _node(sent, acked, failed)
    return total, per_device


def _device(counts: DeviceCounts, more: DeviceKinds) -> dict[str, Any]:
    msgs, pub, failed, seq, bad, dup, late = counts
    extreme, kinds = more
    return {
        "messages": msgs,
        "published": pub,
        "failed": failed,
        "last_seq": seq,
        "bad": bad,
        "duplicates": dup,
        "late": late,
        "extreme": extreme,
        # Bad messages by kind (``_faults.REASONS`` names the dead letter reason of each):
        # with ``failed`` 0, this device's dead letters by reason, kind for kind.
        "bad_kinds": dict(sorted(kinds.items())),
    }


def _node(sent: int, acked: int, failed: int) -> dict[str, Any]:
    """A Sparkplug edge node: its samples are its NBIRTHs (``bdSeq`` and the Rebirth control
    at the birth's timestamp); it has no ``seq``, so its expected samples are its messages."""
    return {
        "messages": sent,
        "published": acked,
        "failed": failed,
        "bad": 0,
        "duplicates": 0,
        "late": 0,
    }


def _faults(config: SimulatorConfig, total: ProcessResult) -> dict[str, Any]:
    """The fault counters; the hostile kinds (and ``extreme``) only when they were asked
    for, so that a run without them reports exactly what it always did."""
    kinds: tuple[str, ...] = (*BAD_KINDS, *HOSTILE_BAD_KINDS) if config.hostile_ratio else BAD_KINDS
    if config.format == "sparkplug":
        kinds = SPARKPLUG_BAD_KINDS
    faults: dict[str, Any] = {
        "bad": sum(total.bad.values()),
        "bad_kinds": {k: total.bad.get(k, 0) for k in kinds},
        "duplicate": total.duplicates,
        "late": total.late,
    }
    if config.hostile_ratio:
        faults["extreme"] = total.extreme
    return faults


def progress_line(p: Progress) -> str:
    rate = p.published / p.elapsed if p.elapsed > 0 else 0.0
    return (
        f"{p.elapsed:7.1f} s  published {p.published:,}  failed {p.failed:,}  "
        f"{rate:,.1f} msg/s (target {p.target_rate:,.1f})  lag {p.lag:.2f} s"
    )
