"""``ingest audit``: what arrived per device in a time window, and does it reconcile?

Per device, readings are selected by device timestamp (``--since`` / ``--until``, half open),
dead letters by ``received_at`` in the same window. Reported per device:

- ``rows``: readings stored; ``samples``: distinct timestamps (one sample = one ``ts``);
  ``messages_estimated``: samples / samples-per-message (a message is stored whole);
- ``seq``: first, last, repeats, and the gaps, i.e. sequence numbers missing between the first
  and the last (computed in SQL with ``lag()`` over ``(device_id ORDER BY value)``: one sort of
  the ``seq`` rows, fine for millions of rows);
- dead letters, attributed to a device through the topic template; those that decode now
  (``rejected_by_database``, or after a decoder or template fix) are decoded, and their
  samples that are not in ``readings`` count as accounted for, not missing;
- duplicates absorbed: not recorded per device (the daemon counts them in its metrics, as
  ``ingest_readings_duplicates_total``), so always ``null`` / ``n/a``.

With a simulator report (``simulate --report json``) the expected counts are compared: per
device when the report carries ``per_device`` (expected samples = the device's ``last_seq``),
and in total otherwise (expected samples = ``samples``, valid samples of published messages).
Publishes that failed (no PUBACK) may or may not have arrived: they are the slack allowed.

Exit status: 0 when everything reconciles (no unexplained gaps; counts match the report when
one is given), 1 when not (or the database cannot be read), 2 for configuration errors.

The package: :mod:`.window` (the time arguments), :mod:`.simulator_report` (what the simulator
says it sent), :mod:`.scan` (the three scans of the database, run at once) and :mod:`.queries`
(their SQL), :mod:`.reconcile` (found against expected, pure), :mod:`.results` (what an audit found, as JSON), :mod:`.output` (the human
table, progress on a terminal), :mod:`.cli` (the subcommand).
"""

from __future__ import annotations

from ingest.tools.audit.cli import register
from ingest.tools.audit.output import format_table
from ingest.tools.audit.reconcile import Verdict, reconcile
from ingest.tools.audit.results import AuditResult, DeviceAudit, SeqStats
from ingest.tools.audit.scan import audit
from ingest.tools.audit.simulator_report import DeviceExpectation, SimReport, load_report
from ingest.tools.audit.window import parse_time

__all__ = [
    "AuditResult",
    "DeviceAudit",
    "DeviceExpectation",
    "SeqStats",
    "SimReport",
    "Verdict",
    "audit",
    "format_table",
    "load_report",
    "parse_time",
    "reconcile",
    "register",
]
