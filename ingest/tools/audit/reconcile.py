"""Found against expected: every device's problems and notes, and the verdict. Pure: no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from ingest.tools.audit.results import AuditResult, DeviceAudit
    from ingest.tools.audit.simulator_report import SimReport

__all__ = ["Verdict", "reconcile"]

_COPIES: Final = " (a redelivered message is dead-lettered again: dead letters have no natural key)"


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    line: str
    problems: list[str]
    notes: list[str]


def _ranges_text(ranges: Sequence[tuple[int, int]], total: int) -> str:
    shown = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)
    more = total - len(ranges)
    return shown + (f" (+{more} more)" if more > 0 else "")


def _in_dead_letters(explained: int) -> str:
    return f"; not counting {explained} found in dead letters" if explained else ""


def _reconcile_device(d: DeviceAudit, report: SimReport | None, spm: int) -> None:
    d.problems.clear()
    d.notes.clear()
    seq = d.seq
    exp = d.expected
    if seq is not None and seq.repeats:
        d.notes.append(f"{seq.repeats} repeated seq values (seq restarted?)")
    dl_seqs = d.dead_letter_seqs
    if exp is None or exp.samples is None:
        d.missing_ranges = list(seq.first_gaps) if seq else []
        if seq is None:
            d.unexplained_missing = None
            return
        explained = sum(1 for s in dl_seqs if seq.first <= s <= seq.last)
        d.unexplained_missing = max(0, seq.missing - explained)
        if d.unexplained_missing:
            d.problems.append(
                f"{d.unexplained_missing} seq missing in {seq.gaps} gap(s): "
                + _ranges_text(seq.first_gaps, seq.gaps)
                + _in_dead_letters(explained)
            )
        if report is not None and report.per_device is not None:
            d.notes.append("not in the simulator report")
        return

    expected = exp.samples
    slack = exp.failed * spm
    found = d.samples + d.dead_letter_samples
    if seq is not None:
        head = max(0, seq.first - 1)
        tail = max(0, expected - seq.last)
        ranges = ([(1, seq.first - 1)] if head else []) + list(seq.first_gaps)
        ranges += [(seq.last + 1, expected)] if tail else []
        d.missing_ranges = ranges
        missing = head + seq.missing + tail
        if seq.first < 1 or seq.last > expected:
            d.problems.append(f"seq {seq.first}..{seq.last} outside the 1..{expected} published")
        explained = sum(1 for s in dl_seqs if 1 <= s <= expected)
        unexplained = max(0, missing - explained)
        ranges_total = seq.gaps + (1 if head else 0) + (1 if tail else 0)
        where = ": seq " + _ranges_text(ranges, ranges_total) if ranges else ""
        where += _in_dead_letters(explained)
    else:
        d.missing_ranges = []
        unexplained = max(0, expected - found)
        where = " (no seq field to say which)"
    d.unexplained_missing = unexplained
    if found > expected:
        d.problems.append(f"{found - expected} samples more than the {expected} generated")
    if unexplained > slack:
        d.problems.append(f"{unexplained} of {expected} samples missing{where}")
    elif unexplained:
        d.notes.append(
            f"{unexplained} samples missing{where}, within the {exp.failed} failed publishes"
        )
    undecodable = d.dead_letters - d.dead_letters_decodable
    if undecodable < exp.bad - exp.failed:
        d.problems.append(f"{undecodable} dead letters for {exp.bad} bad messages sent")
    elif undecodable > exp.bad:
        d.notes.append(f"{undecodable} dead letters for {exp.bad} bad messages sent{_COPIES}")
    if d.dead_letter_samples:
        d.notes.append(f"{d.dead_letter_samples} samples are in dead letters that decode now")


def reconcile(result: AuditResult) -> Verdict:
    """Fill in every device's problems and notes; the overall verdict. Pure: no I/O."""
    report = result.report
    spm = result.samples_per_message
    for d in result.devices:
        _reconcile_device(d, report, spm)
    problems = [f"{d.device_id}: {p}" for d in result.devices for p in d.problems]
    notes: list[str] = []
    devices = result.devices
    seen = [d for d in devices if d.rows or d.dead_letters]
    samples = sum(d.samples for d in devices)
    dl_samples = sum(d.dead_letter_samples for d in devices)
    unmatched = sum(result.unmatched_dead_letters.values())
    dead = sum(d.dead_letters for d in devices) + unmatched
    undecodable = dead - sum(d.dead_letters_decodable for d in devices)
    if unmatched:
        notes.append(f"{unmatched} dead letters have a topic that does not match the template")

    if report is not None and result.devices_filtered:
        notes.append("--device given: totals not compared with the report")
    elif report is not None:
        slack = report.failed * spm
        found = samples + dl_samples
        if report.samples is not None:
            low, high = report.samples, report.samples + slack
        else:
            low = max(0, report.published - report.duplicates - report.bad - report.failed) * spm
            high = low + slack
            notes.append("report without 'samples': expected samples derived from 'published'")
        if found < low:
            problems.append(f"total: {found} samples found, {low} published")
        elif found > high:
            problems.append(f"total: {found} samples found, more than the {high} sent")
        if report.per_device is None:
            gaps = sum(d.unexplained_missing or 0 for d in devices)
            if gaps > slack:
                problems.append(f"total: {gaps} seq missing inside the devices' ranges")
        if undecodable < report.bad - report.failed:
            problems.append(f"total: {undecodable} dead letters for {report.bad} bad messages")
        elif undecodable > report.bad:
            notes.append(f"{undecodable} dead letters for {report.bad} bad messages{_COPIES}")
        if len(seen) < report.devices:
            problems.append(f"total: data from {len(seen)} devices of {report.devices}")
        elif len(seen) > report.devices:
            notes.append(f"data from {len(seen)} devices, the report has {report.devices}")
        if report.failed:
            notes.append(f"{report.failed} publishes failed: they may or may not have arrived")

    ok = not problems
    summary = (
        f"{len(seen)} devices, {samples:,} samples"
        + (f" (+{dl_samples:,} in dead letters)" if dl_samples else "")
        + f", {dead:,} dead letters"
    )
    if report is None:
        missing = sum(d.unexplained_missing or 0 for d in devices)
        head = "NO GAPS" if ok else "GAPS"
        line = f"verdict: {head}: {summary}, {missing:,} seq missing (no report to compare counts)"
    else:
        expected = (
            f"{report.samples:,} samples published" if report.samples is not None else "report"
        )
        head = "RECONCILED" if ok else "NOT RECONCILED"
        line = f"verdict: {head}: {summary}; expected {expected}, {report.bad:,} bad sent"
        if not ok:
            line += f"; {len(problems)} problem(s)"
    verdict = Verdict(ok=ok, line=line, problems=problems, notes=notes)
    result.verdict = verdict
    return verdict
