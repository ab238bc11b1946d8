"""What the simulator says it sent: the parts of ``simulate --report json`` compared with."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ingest.errors import ConfigError

__all__ = ["DeviceExpectation", "SimReport", "load_report"]


@dataclass(frozen=True, slots=True)
class DeviceExpectation:
    """What the simulator says about one device. ``samples`` is its valid samples generated
    (its ``last_seq``); ``failed`` publishes may or may not have arrived."""

    samples: int | None
    published: int | None
    failed: int
    bad: int
    duplicates: int


@dataclass(frozen=True, slots=True)
class SimReport:
    """The parts of ``simulate --report json`` the audit compares with. ``samples`` is the
    valid samples of published messages (duplicates excluded), None when the report has not
    got it; ``bad`` and ``duplicates`` are the fault counts."""

    published: int
    failed: int
    devices: int
    samples: int | None
    bad: int
    duplicates: int
    samples_per_message: int
    per_device: dict[str, DeviceExpectation] | None


def _int(data: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        if value is None:
            raise ConfigError("--report", f"{where}: no {key!r} count")
        raise ConfigError("--report", f"{where}: {key!r} is {value!r}, not a count")
    return value


def load_report(text: str, source: str = "--report") -> SimReport:
    """Parse a ``simulate --report json`` object; ``ConfigError("--report")`` when it is not
    one (the whole output must be that single JSON object)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError("--report", f"{source} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("--report", f"{source} is not a JSON object")
    faults = data.get("faults") or {}
    if not isinstance(faults, dict):
        raise ConfigError("--report", f"{source}: 'faults' is not an object")
    spm = _int(data, "samples_per_message", source, 1) or 1
    raw_devices = data.get("per_device")
    per_device = None
    if isinstance(raw_devices, dict) and raw_devices:
        per_device = {
            str(dev): _expectation(counts, f"{source}: per_device[{dev!r}]", spm)
            for dev, counts in raw_devices.items()
        }
    return SimReport(
        published=_int(data, "published", source),
        failed=_int(data, "failed", source),
        devices=_int(data, "devices", source),
        samples=_int(data, "samples", source) if data.get("samples") is not None else None,
        bad=_int(faults, "bad", f"{source}: faults", 0),
        duplicates=_int(faults, "duplicate", f"{source}: faults", 0),
        samples_per_message=spm,
        per_device=per_device,
    )


def _expectation(counts: object, where: str, spm: int) -> DeviceExpectation:
    """One device of the report's ``per_device``: its samples are its ``last_seq`` (else its
    valid messages times the samples per message, when the report counts messages)."""
    if not isinstance(counts, dict):
        raise ConfigError("--report", f"{where} is not an object")
    bad = _int(counts, "bad", where, 0)
    samples: int | None = None
    if "last_seq" in counts:
        samples = _int(counts, "last_seq", where)
    elif "messages" in counts:
        samples = (_int(counts, "messages", where) - bad) * spm
    published = counts.get("published")
    return DeviceExpectation(
        samples=samples,
        published=_int(counts, "published", where) if published is not None else None,
        failed=_int(counts, "failed", where, 0),
        bad=bad,
        duplicates=_int(counts, "duplicates", where, 0),
    )
