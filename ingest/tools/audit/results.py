"""What an audit found, per device and in total, and its JSON form."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from ingest.tools.audit.reconcile import Verdict, reconcile
from ingest.tools.audit.simulator_report import DeviceExpectation, SimReport

__all__ = ["DUPLICATES_NOTE", "AuditResult", "DeviceAudit", "SeqStats"]

DUPLICATES_NOTE: Final = (
    "not recorded per device: the daemon counts them in ingest_readings_duplicates_total"
)


@dataclass(slots=True)
class SeqStats:
    """``seq`` values of one device in the window. ``missing`` counts the numbers absent
    between ``first`` and ``last`` in ``gaps`` ranges; ``first_gaps`` lists the first few."""

    first: int
    last: int
    rows: int
    repeats: int
    gaps: int
    missing: int
    first_gaps: list[tuple[int, int]]


@dataclass(slots=True)
class DeviceAudit:
    device_id: str
    rows: int = 0
    samples: int = 0
    seq: SeqStats | None = None
    dead_letters: int = 0
    dead_letter_reasons: Counter[str] = field(default_factory=Counter)
    #: Dead letters that decode with the current decoder and template.
    dead_letters_decodable: int = 0
    #: Samples of those dead letters (in the window) that are not in ``readings``.
    dead_letter_samples: int = 0
    #: The ``seq`` values of those samples.
    dead_letter_seqs: set[int] = field(default_factory=set)
    expected: DeviceExpectation | None = None
    #: Sequence numbers missing and not found in a dead letter (None: nothing to compare).
    unexplained_missing: int | None = None
    missing_ranges: list[tuple[int, int]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def messages_estimated(self, samples_per_message: int) -> int:
        return round(self.samples / samples_per_message)

    def to_json(self, samples_per_message: int) -> dict[str, Any]:
        seq = self.seq
        exp = self.expected
        return {
            "device_id": self.device_id,
            "rows": self.rows,
            "samples": self.samples,
            "messages_estimated": self.messages_estimated(samples_per_message),
            "seq": None
            if seq is None
            else {
                "first": seq.first,
                "last": seq.last,
                "rows": seq.rows,
                "repeats": seq.repeats,
                "gaps": seq.gaps,
                "missing": seq.missing,
                "first_gaps": [list(g) for g in seq.first_gaps],
            },
            "missing_ranges": [list(g) for g in self.missing_ranges],
            "unexplained_missing": self.unexplained_missing,
            "dead_letters": self.dead_letters,
            "dead_letter_reasons": dict(sorted(self.dead_letter_reasons.items())),
            "dead_letters_decodable": self.dead_letters_decodable,
            "dead_letter_samples": self.dead_letter_samples,
            "duplicates_absorbed": None,
            "expected": None
            if exp is None
            else {
                "samples": exp.samples,
                "published": exp.published,
                "failed": exp.failed,
                "bad": exp.bad,
                "duplicates_sent": exp.duplicates,
            },
            "ok": self.ok,
            "problems": self.problems,
            "notes": self.notes,
        }


@dataclass(slots=True)
class AuditResult:
    since: datetime | None
    until: datetime | None
    template: str
    devices: list[DeviceAudit]
    #: Dead letters in the window whose topic does not match the template, by reason.
    unmatched_dead_letters: Counter[str]
    samples_per_message: int
    report: SimReport | None = None
    #: ``--device`` restricted the audit: totals are not compared with the report.
    devices_filtered: bool = False
    verdict: Verdict | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        spm = self.samples_per_message
        devices = self.devices
        verdict = self.verdict or reconcile(self)
        report = self.report
        return {
            "window": {
                "since": self.since.isoformat() if self.since else None,
                "until": self.until.isoformat() if self.until else None,
            },
            "topic_template": self.template,
            "samples_per_message": spm,
            "totals": {
                "devices": len([d for d in devices if d.rows or d.dead_letters]),
                "rows": sum(d.rows for d in devices),
                "samples": sum(d.samples for d in devices),
                "messages_estimated": sum(d.messages_estimated(spm) for d in devices),
                "seq_gaps": sum(d.seq.gaps for d in devices if d.seq),
                "seq_missing": sum(d.seq.missing for d in devices if d.seq),
                "unexplained_missing": sum(d.unexplained_missing or 0 for d in devices),
                "dead_letters": sum(d.dead_letters for d in devices)
                + sum(self.unmatched_dead_letters.values()),
                "dead_letters_decodable": sum(d.dead_letters_decodable for d in devices),
                "dead_letter_samples": sum(d.dead_letter_samples for d in devices),
                "duplicates_absorbed": None,
            },
            "duplicates_absorbed_note": DUPLICATES_NOTE,
            "unmatched_dead_letters": {
                "count": sum(self.unmatched_dead_letters.values()),
                "reasons": dict(sorted(self.unmatched_dead_letters.items())),
            },
            "report": None
            if report is None
            else {
                "published": report.published,
                "failed": report.failed,
                "devices": report.devices,
                "samples": report.samples,
                "bad": report.bad,
                "duplicates_sent": report.duplicates,
                "per_device": report.per_device is not None,
            },
            "devices": [d.to_json(spm) for d in devices],
            "verdict": {
                "ok": verdict.ok,
                "line": verdict.line,
                "problems": verdict.problems,
                "notes": verdict.notes,
            },
            "seconds": round(self.seconds, 3),
        }
