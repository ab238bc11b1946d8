"""Which recorded sessions a run leaves behind, and which may be live (no sockets)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ingest.db.sessions import LIVE_WINDOW, SessionRow, in_family, is_live
from ingest.runtime.retire import Outcome, _plan
from ingest.runtime.surplus import surplus_of
from ingest.settings import Settings

NOW = datetime(2026, 11, 30, 12, tzinfo=UTC)
BROKER = "mqtt://127.0.0.1:1883"


def row(
    cid: str,
    *,
    broker: str = BROKER,
    seen: timedelta = timedelta(hours=1),
    left: bool = False,
    retired: bool = False,
) -> SessionRow:
    last = NOW - seen
    return SessionRow(
        cid, broker, "ingest", last, last, last if left else None, NOW if retired else None, NOW
    )


@pytest.mark.parametrize(
    ("cid", "member"),
    [
        ("ingest", True),
        ("ingest-0", True),
        ("ingest-17", True),
        ("ingest-b1-3", True),
        ("ingest-x", False),
        ("ingest-1-2", False),
        ("ingestion-1", False),
        ("other-1", False),
        ("ingest-", False),
    ],
)
def test_family(cid: str, member: bool) -> None:
    assert in_family(cid, "ingest") is member


def test_family_base_is_literal() -> None:
    assert in_family("a.b-1", "a.b") and not in_family("axb-1", "a.b")


def test_live_means_seen_lately_and_not_gone_cleanly() -> None:
    assert is_live(row("a", seen=timedelta(seconds=30)))
    assert not is_live(row("a", seen=LIVE_WINDOW + timedelta(seconds=1)))
    assert not is_live(row("a", seen=timedelta(seconds=30), left=True))
    assert not is_live(row("a", seen=timedelta(seconds=30), retired=True))


def test_surplus_after_a_larger_worker_set() -> None:
    settings = Settings(client_id="ingest", mqtt_url=BROKER, workers=4)
    rows = [
        *(row(f"ingest-{i}") for i in range(8)),
        row("ingest"),  # an earlier single worker
        row("ingest-9", retired=True),
        row("ingest-10", broker="mqtt://elsewhere:1883"),
        row("other-5"),
    ]
    keep = {f"ingest-{i}" for i in range(4)}
    assert [r.client_id for r in surplus_of(rows, settings, keep)] == [
        "ingest-4", "ingest-5", "ingest-6", "ingest-7", "ingest",
    ]  # fmt: skip


def test_surplus_of_a_single_worker_is_every_indexed_session() -> None:
    settings = Settings(client_id="ingest", mqtt_url=BROKER)
    rows = [row("ingest"), row("ingest-0"), row("ingest-1")]
    assert [r.client_id for r in surplus_of(rows, settings, {"ingest"})] == [
        "ingest-0",
        "ingest-1",
    ]


def test_plan_refuses_unknown_and_live_ids() -> None:
    settings = Settings(client_id="ingest", mqtt_url="mqtt://user:pw@127.0.0.1:1883")
    unknown = _plan(settings, "x-1", None, broker=None, force=False)
    assert isinstance(unknown, Outcome) and not unknown.retired
    assert str(unknown.error).startswith("unknown client id x-1")
    live = _plan(settings, "x-1", row("x-1", seen=timedelta(seconds=5)), broker=None, force=False)
    assert isinstance(live, Outcome) and "may be live: seen 5s ago" in str(live.error)
    forced = _plan(settings, "x-1", row("x-1", seen=timedelta(seconds=5)), broker=None, force=True)
    assert not isinstance(forced, Outcome)


def test_plan_connects_with_the_configured_login_to_the_same_broker() -> None:
    settings = Settings(client_id="ingest", mqtt_url="mqtt://user:pw@127.0.0.1:1883")
    plan = _plan(settings, "ingest-5", row("ingest-5"), broker=None, force=False)
    assert not isinstance(plan, Outcome)
    assert plan.settings.mqtt_url == settings.mqtt_url
    assert (plan.settings.client_id, plan.settings.share_group) == ("ingest-5", "ingest")
    other = _plan(
        settings, "ingest-5", row("ingest-5", broker="mqtt://b2:1883"), broker=None, force=False
    )
    assert not isinstance(other, Outcome) and other.settings.mqtt_url == "mqtt://b2:1883"
    bad = _plan(settings, "ingest-5", None, broker="http://x", force=False)
    assert isinstance(bad, Outcome) and str(bad.error).startswith("--broker:")
