"""The ``sparkplug`` format: payloads built with the schema's message classes, decoded through
the dispatch (``ingest.formats.decode.decode``) with a route table and its alias state."""

from __future__ import annotations

import gc
import threading
import tracemalloc
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ingest.errors import ConfigError, DecodeError
from ingest.flow.births import Birth, newest_births
from ingest.formats.decode import FORMATS, REASONS, Limits, decode, load_routes
from ingest.formats.limits import DEFAULT_LIMITS
from ingest.formats.routes import RouteTable, parse_routes
from ingest.formats.sparkplug import REBIRTH_METRIC, SparkplugState, birth_topic
from ingest.formats.sparkplug_schema import DataType, Payload
from ingest.model import Decoded, DeviceUpdate, Reading, TextReading
from ingest.settings import Settings
from tests.sparkplug_payloads import sparkplug_payload

RECEIVED = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)
T0 = int(RECEIVED.timestamp() * 1000) - 60_000  # the node's clock, a minute before arrival
AT0 = datetime.fromtimestamp(T0 / 1000, UTC)
NODE = "plant/edge1"
DEVICE = "plant/edge1/pump"


def ms(offset: int = 0) -> datetime:
    return AT0 + timedelta(milliseconds=offset)


def table(*, max_aliases: int = 100_000, rebirth_interval: float = 30.0) -> RouteTable:
    settings = Settings(
        sparkplug_max_aliases=max_aliases, sparkplug_rebirth_interval=rebirth_interval
    )
    return parse_routes([{"topic": "spBv1.0/#", "format": "sparkplug"}], FORMATS, settings)


def state_of(routes: RouteTable) -> SparkplugState:
    (state,) = routes.states
    assert isinstance(state, SparkplugState)
    return state


def payload(ts: int | None = T0, *metrics: dict[str, Any], seq: int = 0) -> bytes:
    return sparkplug_payload(ts, *metrics, seq=seq)


def nbirth(bdseq: int = 0, ts: int | None = T0) -> bytes:
    return payload(
        ts,
        {"name": "bdSeq", "datatype": DataType.Int64, "long_value": bdseq},
        {"name": "temp", "alias": 1, "datatype": DataType.Double, "double_value": 20.5,
         "unit": "°C"},
        {"name": "state", "alias": 2, "datatype": DataType.String, "string_value": "run"},
    )  # fmt: skip


def dbirth(ts: int = T0 + 1) -> bytes:
    return payload(
        ts,
        {"name": "rpm", "alias": 10, "datatype": DataType.UInt32, "long_value": 1500,
         "unit": "rpm"},
        {"name": "on", "alias": 11, "datatype": DataType.Boolean, "boolean_value": True},
        {"name": "fw", "alias": 12, "datatype": DataType.String, "string_value": "1.4.2"},
    )  # fmt: skip


def run(
    routes: RouteTable,
    kind: str,
    data: bytes,
    *,
    device: str | None = None,
    node: str = "edge1",
    received_at: datetime = RECEIVED,
    limits: Limits = DEFAULT_LIMITS,
) -> Decoded | DecodeError:
    topic = f"spBv1.0/plant/{kind}/{node}" + (f"/{device}" if device else "")
    return decode(topic, data, received_at, routes, limits=limits)


def ok(result: Decoded | DecodeError) -> Decoded:
    assert isinstance(result, Decoded), result
    return result


def error(result: Decoded | DecodeError) -> str:
    assert isinstance(result, DecodeError), result
    assert result.reason in REASONS
    return result.reason


def born() -> RouteTable:
    routes = table()
    ok(run(routes, "NBIRTH", nbirth(bdseq=7)))
    ok(run(routes, "DBIRTH", dbirth(), device="pump"))
    return routes


# --- topics and subscriptions ---------------------------------------------------------------


def test_births_are_subscribed_unshared_and_the_rest_shared() -> None:
    assert table().subscriptions("ingest") == [
        ("spBv1.0/+/NBIRTH/+", 1),
        ("spBv1.0/+/DBIRTH/+/+", 1),
        ("$share/ingest/spBv1.0/+/NDATA/+", 1),
        ("$share/ingest/spBv1.0/+/DDATA/+/+", 1),
        ("$share/ingest/spBv1.0/+/NDEATH/+", 1),
        ("$share/ingest/spBv1.0/+/DDEATH/+/+", 1),
    ]
    group = parse_routes([{"topic": "spBv1.0/plant/#", "format": "sparkplug", "qos": 0}], FORMATS)
    assert [f for f, _ in group.subscriptions()][:2] == [
        "spBv1.0/plant/NBIRTH/+",
        "spBv1.0/plant/DBIRTH/+/+",
    ]
    assert {q for _, q in group.subscriptions()} == {0}


@pytest.mark.parametrize(
    "topic", ["spBv1.0/+/NDATA/+", "spBv1.0/{group}/#", "spBv0/#", "spBv1.0/a/b/#", "#"]
)
def test_other_route_topics_are_configuration_errors(topic: str) -> None:
    with pytest.raises(ConfigError, match="routes"):
        parse_routes([{"topic": topic, "format": "sparkplug"}], FORMATS)


def test_route_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="no option"):
        parse_routes(
            [{"topic": "spBv1.0/#", "format": "sparkplug", "sparkplug": {"x": 1}}], FORMATS
        )


def test_a_group_route_leaves_other_groups_to_other_routes() -> None:
    routes = parse_routes(
        [
            {"topic": "spBv1.0/plant/#", "format": "sparkplug"},
            {"topic": "spBv1.0/{site}/{kind}/{device_id}", "format": "json"},
        ],
        FORMATS,
    )
    assert ok(decode("spBv1.0/plant/NBIRTH/edge1", nbirth(), RECEIVED, routes)).readings
    other = decode("spBv1.0/mill/NBIRTH/edge1", nbirth(), RECEIVED, routes)
    assert error(other) in ("invalid_utf8", "not_json")  # the json route took it


@pytest.mark.parametrize(
    "topic",
    [
        "spBv1.0/plant/NDATA",
        "spBv1.0/plant/NDATA/edge1/pump",  # node type with a device level
        "spBv1.0/plant/DDATA/edge1",  # device type without one
        "spBv1.0/plant/XDATA/edge1",
        "spBv1.0/plant//edge1",
        "spBv1.0//NDATA/edge1",
        "spBv1.0/plant/DDATA/edge1/",
        "spBv1.0/STATE/host1",
    ],
)
def test_a_topic_of_another_shape_is_bad_sparkplug(topic: str) -> None:
    assert error(decode(topic, nbirth(), RECEIVED, table())) == "bad_sparkplug"


def test_commands_are_not_ingested() -> None:
    routes = born()
    assert error(run(routes, "NCMD", payload())) == "bad_sparkplug"
    assert error(run(routes, "DCMD", payload(), device="pump")) == "bad_sparkplug"


def test_ids_follow_the_name_rules() -> None:
    assert error(run(table(), "NBIRTH", nbirth(), node="e\x01")) == "bad_device_id"
    assert error(run(table(), "NBIRTH", nbirth(), node="e" * 130)) == "bad_device_id"


# --- births, data, deaths ---------------------------------------------------------------------


def test_node_birth_gives_readings_texts_units_and_online() -> None:
    birth = nbirth(bdseq=3)
    result = ok(run(table(), "NBIRTH", birth))
    assert result.readings == [
        Reading(NODE, "bdSeq", AT0, 3.0),
        Reading(NODE, "temp", AT0, 20.5),
    ]
    assert result.texts == (TextReading(NODE, "state", AT0, "run"),)
    assert result.updates == (
        DeviceUpdate(NODE, status="online", status_at=AT0, units={"temp": "°C"}, birth=birth),
    )
    assert result.skipped == 0


def test_device_birth_and_data_by_alias_and_by_name() -> None:
    routes = table()
    ok(run(routes, "NBIRTH", nbirth()))
    birth = ok(run(routes, "DBIRTH", dbirth(), device="pump"))
    assert birth.updates[0].birth == dbirth()  # kept to rebuild the tables after a restart
    assert birth.readings == [
        Reading(DEVICE, "rpm", ms(1), 1500.0),
        Reading(DEVICE, "on", ms(1), 1.0),
    ]
    assert birth.texts == (TextReading(DEVICE, "fw", ms(1), "1.4.2"),)
    assert birth.updates == (
        DeviceUpdate(
            DEVICE, status="online", status_at=ms(1), units={"rpm": "rpm"}, birth=dbirth()
        ),
    )
    data = ok(
        run(
            routes,
            "DDATA",
            payload(
                T0 + 5,
                {"alias": 10, "long_value": 1490},
                {"alias": 11, "boolean_value": False, "timestamp": T0 + 3},
                {"name": "fw", "string_value": "1.5.0"},  # by name: the birth's datatype
                {"name": "extra", "datatype": DataType.Float, "float_value": 0.5},
            ),
            device="pump",
        )
    )
    assert data.readings == [
        Reading(DEVICE, "rpm", ms(5), 1490.0),
        Reading(DEVICE, "on", ms(3), 0.0),
        Reading(DEVICE, "extra", ms(5), 0.5),
    ]
    assert data.texts == (TextReading(DEVICE, "fw", ms(5), "1.5.0"),)
    assert data.updates == ()
    node = ok(run(routes, "NDATA", payload(T0 + 6, {"alias": 1, "double_value": 21.0})))
    assert node.readings == [Reading(NODE, "temp", ms(6), 21.0)]


def test_times_fall_back_to_the_payload_then_the_receive_time() -> None:
    routes = born()
    data = ok(run(routes, "NDATA", payload(None, {"alias": 1, "double_value": 1.0})))
    assert data.readings == [Reading(NODE, "temp", RECEIVED, 1.0)]
    birth = ok(run(table(), "NBIRTH", nbirth(ts=None)))
    assert birth.updates[0].status_at == RECEIVED


def test_a_new_node_birth_replaces_the_node_and_device_tables() -> None:
    routes = born()
    ok(
        run(
            routes,
            "NBIRTH",
            payload(T0 + 10, {"name": "x", "alias": 5, "datatype": DataType.Int8, "int_value": 1}),
        )
    )
    assert (
        error(run(routes, "NDATA", payload(T0 + 11, {"alias": 1, "double_value": 1.0})))
        == "unknown_alias"
    )
    assert error(run(routes, "DDATA", payload(T0 + 11, {"alias": 10, "long_value": 1}), device="pump")) == "unknown_alias"  # fmt: skip
    assert ok(run(routes, "NDATA", payload(T0 + 12, {"alias": 5, "int_value": 2}))).readings == [
        Reading(NODE, "x", ms(12), 2.0)
    ]


def test_a_device_birth_without_its_node_birth_still_declares_its_aliases() -> None:
    routes = table()  # after a restart: the NBIRTH came before we started
    ok(run(routes, "DBIRTH", dbirth(), device="pump"))
    data = ok(run(routes, "DDATA", payload(T0 + 2, {"alias": 10, "long_value": 7}), device="pump"))
    assert data.readings == [Reading(DEVICE, "rpm", ms(2), 7.0)]


def test_node_death_takes_the_node_and_its_devices_offline() -> None:
    routes = born()
    death = ok(run(routes, "NDEATH", payload(T0 + 100, {"name": "bdSeq", "datatype": DataType.Int64, "long_value": 7})))  # fmt: skip
    assert death.readings == [] and death.texts == ()
    assert death.skipped == 1  # its bdSeq metric is stored nowhere
    assert death.updates == (
        DeviceUpdate(NODE, status="offline", status_at=ms(100)),
        DeviceUpdate(DEVICE, status="offline", status_at=ms(100)),
    )


def test_device_death_takes_the_device_offline() -> None:
    death = ok(run(born(), "DDEATH", payload(T0 + 50), device="pump"))
    assert death.updates == (DeviceUpdate(DEVICE, status="offline", status_at=ms(50)),)


def test_a_will_written_before_its_birth_is_dated_on_arrival() -> None:
    """The NDEATH registered as the MQTT will carries the time of the connect, before the
    NBIRTH: dated so, the writer (newest status_at wins) would keep the node online."""
    routes = table()
    ok(run(routes, "NBIRTH", nbirth(bdseq=1, ts=T0)))
    will = payload(T0 - 5, {"name": "bdSeq", "datatype": DataType.Int64, "long_value": 1})
    death = ok(run(routes, "NDEATH", will))
    assert death.updates == (DeviceUpdate(NODE, status="offline", status_at=RECEIVED),)
    late_clock = ok(run(routes, "NDEATH", will, received_at=AT0 - timedelta(seconds=1)))
    assert late_clock.updates[0].status_at == ms(1)  # still after the birth


def test_a_death_of_an_earlier_session_changes_nothing() -> None:
    routes = born()  # bdSeq 7
    stale = ok(run(routes, "NDEATH", payload(T0 + 100, {"name": "bdSeq", "datatype": DataType.Int64, "long_value": 6})))  # fmt: skip
    assert stale.updates == () and stale.readings == [] and stale.skipped == 1
    assert state_of(routes).statistics().stale_deaths == 1
    # The tables stay: the node's session goes on.
    assert ok(run(routes, "NDATA", payload(T0 + 101, {"alias": 1, "double_value": 2.0}))).readings


def test_a_death_of_a_node_never_seen_is_applied() -> None:
    death = ok(run(table(), "NDEATH", payload(T0, {"name": "bdSeq", "datatype": DataType.Int64, "long_value": 4})))  # fmt: skip
    assert death.updates == (DeviceUpdate(NODE, status="offline", status_at=AT0),)


# --- unknown aliases and rebirth requests -----------------------------------------------------


def test_unknown_alias_records_one_rebirth_request_per_interval() -> None:
    routes = table(rebirth_interval=30.0)
    state = state_of(routes)
    data = payload(T0, {"alias": 1, "double_value": 1.0})
    assert error(run(routes, "NDATA", data)) == "unknown_alias"
    assert error(run(routes, "DDATA", data, device="pump")) == "unknown_alias"  # same node
    later = RECEIVED + timedelta(seconds=10)
    assert error(run(routes, "NDATA", data, received_at=later)) == "unknown_alias"
    (request,) = state.take_requests(RECEIVED.timestamp())
    topic, body = request
    assert topic == "spBv1.0/plant/NCMD/edge1"
    ncmd = Payload.FromString(body)
    (metric,) = ncmd.metrics
    assert (metric.name, metric.datatype, metric.boolean_value) == (
        REBIRTH_METRIC,
        DataType.Boolean,
        True,
    )
    assert ncmd.timestamp == int(RECEIVED.timestamp() * 1000)
    assert state.take_requests(RECEIVED.timestamp()) == []
    stats = state.statistics()
    assert (stats.rebirths_suppressed, stats.rebirths_sent) == (2, 0)
    # Past the interval the node is asked again; another node at once.
    run(routes, "NDATA", data, received_at=RECEIVED + timedelta(seconds=31))
    run(routes, "NDATA", data, node="edge2", received_at=RECEIVED + timedelta(seconds=31))
    topics = [t for t, _ in state.take_requests(RECEIVED.timestamp())]
    assert topics == ["spBv1.0/plant/NCMD/edge1", "spBv1.0/plant/NCMD/edge2"]
    state.requests_sent(2, 1)
    assert state.statistics()[4:] == (2, 2, 1)


def test_rebirth_requests_can_be_disabled() -> None:
    routes = table(rebirth_interval=0)
    assert error(run(routes, "NDATA", payload(T0, {"alias": 1, "double_value": 1.0}))) == "unknown_alias"  # fmt: skip
    assert state_of(routes).take_requests(0.0) == []
    assert state_of(routes).statistics().rebirths_suppressed == 0


def test_a_name_without_datatype_that_no_birth_declared_is_unknown() -> None:
    routes = born()
    result = run(routes, "NDATA", payload(T0, {"name": "nope", "double_value": 1.0}))
    assert error(result) == "unknown_alias"
    assert len(state_of(routes).take_requests(0.0)) == 1


def test_an_unknown_alias_spoils_the_whole_message() -> None:
    result = run(born(), "NDATA", payload(T0, {"alias": 1, "double_value": 1.0}, {"alias": 99, "double_value": 2.0}))  # fmt: skip
    assert error(result) == "unknown_alias"


# --- datatypes --------------------------------------------------------------------------------


def one_value(datatype: int, **value: Any) -> float | str | None:
    """The stored value of a one-metric NBIRTH of that datatype; None when skipped."""
    metric = {"name": "m", "alias": 1, "datatype": datatype, **value}
    result = ok(run(table(), "NBIRTH", payload(T0, metric)))
    stored = [r.value for r in result.readings] + [t.value for t in result.texts]
    assert len(stored) + result.skipped == 1
    return stored[0] if stored else None


@pytest.mark.parametrize(
    ("datatype", "value", "expected"),
    [
        (DataType.Int8, {"int_value": (-5) & 0xFFFFFFFF}, -5.0),  # 32-bit two's complement
        (DataType.Int8, {"int_value": 0xFB}, -5.0),  # 8-bit two's complement
        (DataType.Int8, {"int_value": 127}, 127.0),
        (DataType.Int16, {"int_value": (-300) & 0xFFFFFFFF}, -300.0),
        (DataType.Int32, {"int_value": 0x80000000}, -2147483648.0),
        (DataType.Int64, {"long_value": (-7) & 0xFFFFFFFFFFFFFFFF}, -7.0),
        (DataType.UInt8, {"int_value": 255}, 255.0),
        (DataType.UInt16, {"int_value": 65535}, 65535.0),
        (DataType.UInt32, {"long_value": 4294967295}, 4294967295.0),
        (DataType.UInt32, {"int_value": 4294967295}, 4294967295.0),  # either field
        (DataType.UInt64, {"long_value": 2**64 - 1}, float(2**64 - 1)),
        (DataType.Float, {"float_value": 1.5}, 1.5),
        (DataType.Double, {"double_value": -0.25}, -0.25),
        (DataType.Boolean, {"boolean_value": True}, 1.0),
        (DataType.Boolean, {"boolean_value": False}, 0.0),
        (DataType.String, {"string_value": "open"}, "open"),
        (DataType.Text, {"string_value": "a longer text"}, "a longer text"),
        (DataType.UUID, {"string_value": "7d44a1c2-0000-4000-8000-000000000000"},
         "7d44a1c2-0000-4000-8000-000000000000"),
        (DataType.DateTime, {"long_value": 1700000000123}, "2023-11-14T22:13:20.123Z"),
    ],
)  # fmt: skip
def test_stored_datatypes(datatype: int, value: dict[str, Any], expected: float | str) -> None:
    found = one_value(datatype, **value)
    assert found == expected and type(found) is type(expected)


@pytest.mark.parametrize(
    ("datatype", "value"),
    [
        (DataType.Double, {"double_value": 1.0, "is_null": True}),
        (DataType.Double, {}),  # no value at all
        (DataType.Double, {"double_value": float("nan")}),
        (DataType.Float, {"float_value": float("inf")}),
        (DataType.Bytes, {"bytes_value": b"\x00\x01"}),
        (DataType.File, {"bytes_value": b"PK"}),
        (DataType.DataSet, {"dataset_value": {"num_of_columns": 1, "columns": ["a"]}}),
        (DataType.Template, {"template_value": {"version": "1"}}),
        (DataType.Int32Array, {"bytes_value": b"\x01\x00\x00\x00"}),
        (DataType.StringArray, {"bytes_value": b"a\x00"}),
        (DataType.Unknown, {"int_value": 1}),
        (99, {"int_value": 1}),  # a datatype from a later version
        (DataType.String, {"string_value": "x" * 2000}),  # over max_text_bytes
        (DataType.String, {"string_value": "a\x00b"}),  # PostgreSQL text cannot hold a NUL
        (DataType.DateTime, {"long_value": 2**63}),  # beyond the calendar
    ],
)
def test_skipped_datatypes(datatype: int, value: dict[str, Any]) -> None:
    assert one_value(datatype, **value) is None


@pytest.mark.parametrize(
    ("datatype", "value"),
    [
        (DataType.Double, {"string_value": "1.5"}),
        (DataType.Int32, {"double_value": 1.0}),
        (DataType.Boolean, {"int_value": 1}),
        (DataType.String, {"int_value": 1}),
    ],
)
def test_a_value_that_does_not_fit_its_datatype_is_bad_sparkplug(
    datatype: int, value: dict[str, Any]
) -> None:
    metric = {"name": "m", "alias": 1, "datatype": datatype, **value}
    assert error(run(table(), "NBIRTH", payload(T0, metric))) == "bad_sparkplug"


# --- malformed input and limits ---------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xff\xff",
        b'{"temp": 21.5}',
        payload(T0, {"name": "x", "datatype": DataType.Double, "double_value": 1.0})[:-3],
    ],
)
def test_malformed_payloads_are_bad_sparkplug(data: bytes) -> None:
    assert error(run(born(), "NDATA", data)) == "bad_sparkplug"


def test_birth_metrics_need_a_name_and_a_datatype_and_unique_aliases() -> None:
    no_name = payload(T0, {"alias": 1, "datatype": DataType.Double, "double_value": 1.0})
    no_type = payload(T0, {"name": "a", "alias": 1, "double_value": 1.0})
    twice = payload(
        T0,
        {"name": "a", "alias": 1, "datatype": DataType.Double, "double_value": 1.0},
        {"name": "b", "alias": 1, "datatype": DataType.Double, "double_value": 1.0},
    )
    for data in (no_name, no_type, twice):
        assert error(run(table(), "NBIRTH", data)) == "bad_sparkplug"


def test_a_refused_birth_declares_nothing() -> None:
    routes = table()
    bad = payload(
        T0,
        {"name": "a", "alias": 1, "datatype": DataType.Double, "double_value": 1.0},
        {"name": "b\x07", "alias": 2, "datatype": DataType.Double, "double_value": 1.0},
    )
    assert error(run(routes, "NBIRTH", bad)) == "bad_metric"
    assert error(run(routes, "NDATA", payload(T0, {"alias": 1, "double_value": 1.0}))) == "unknown_alias"  # fmt: skip


def test_data_needs_a_name_or_an_alias() -> None:
    assert error(run(born(), "NDATA", payload(T0, {"double_value": 1.0}))) == "bad_sparkplug"


def test_metric_names_follow_the_name_rules() -> None:
    data = payload(T0, {"name": "x" * 129, "datatype": DataType.Double, "double_value": 1.0})
    assert error(run(born(), "NDATA", data)) == "bad_metric"


def test_times_outside_the_window_are_ts_out_of_range() -> None:
    routes = born()
    future = int((RECEIVED + timedelta(days=2)).timestamp() * 1000)
    assert error(run(routes, "NDATA", payload(future, {"alias": 1, "double_value": 1.0}))) == "ts_out_of_range"  # fmt: skip
    old = payload(T0, {"alias": 1, "double_value": 1.0, "timestamp": 5})  # 1970, in ms
    assert error(run(routes, "NDATA", old)) == "ts_out_of_range"
    huge = payload(2**64 - 1, {"alias": 1, "double_value": 1.0})
    assert error(run(routes, "NDATA", huge)) == "ts_out_of_range"


def test_too_many_metrics_in_one_message() -> None:
    routes = born()
    metrics = [{"alias": 1, "double_value": float(i), "timestamp": T0 + i} for i in range(11)]
    limits = Limits(max_readings_per_message=10)
    assert error(run(routes, "NDATA", payload(T0, *metrics), limits=limits)) == "too_many_readings"
    assert len(ok(run(routes, "NDATA", payload(T0, *metrics[:10]), limits=limits)).readings) == 10


def test_one_name_twice_at_one_time_is_duplicate_metric() -> None:
    routes = born()
    twice = payload(T0, {"alias": 1, "double_value": 1.0}, {"alias": 1, "double_value": 2.0})
    assert error(run(routes, "NDATA", twice)) == "duplicate_metric"
    history = payload(
        T0,
        {"alias": 1, "double_value": 1.0, "timestamp": T0 - 2},
        {"alias": 1, "double_value": 2.0, "timestamp": T0 - 1},
    )
    assert len(ok(run(routes, "NDATA", history)).readings) == 2


def test_data_with_nothing_to_store_is_no_readings() -> None:
    routes = born()
    assert error(run(routes, "NDATA", payload(T0))) == "no_readings"
    null = payload(T0, {"alias": 1, "is_null": True})
    assert error(run(routes, "NDATA", null)) == "no_readings"


# --- the bound on the alias tables ------------------------------------------------------------


def node_birth(n_metrics: int) -> bytes:
    metrics = [
        {"name": f"m{i}", "alias": i, "datatype": DataType.Int32, "int_value": i}
        for i in range(n_metrics)
    ]
    return payload(T0, *metrics)


def test_whole_nodes_are_evicted_least_recently_born_first() -> None:
    routes = table(max_aliases=12)  # each node: 1 + 4 metrics = 5 entries
    state = state_of(routes)
    for node in ("a", "b"):
        ok(run(routes, "NBIRTH", node_birth(4), node=node))
    ok(run(routes, "NBIRTH", node_birth(4), node="a"))  # a born again: b is now the oldest
    ok(run(routes, "NBIRTH", node_birth(4), node="c"))
    stats = state.statistics()
    assert (stats.nodes, stats.aliases, stats.nodes_evicted) == (2, 10, 1)
    by_alias = payload(T0, {"alias": 1, "int_value": 5})
    assert error(run(routes, "NDATA", by_alias, node="b")) == "unknown_alias"
    assert ok(run(routes, "NDATA", by_alias, node="a")).readings
    assert ok(run(routes, "NDATA", by_alias, node="c")).readings
    # Devices count towards their node.
    ok(run(routes, "DBIRTH", node_birth(2), node="a", device="d"))
    assert state.statistics()[:3] == (1, 8, 2)  # c evicted: a is now the most recent


def test_a_node_alone_over_the_bound_is_not_kept() -> None:
    routes = table(max_aliases=3)
    assert ok(run(routes, "NBIRTH", node_birth(5))).readings  # its readings are stored
    stats = state_of(routes).statistics()
    assert (stats.nodes, stats.aliases, stats.nodes_evicted) == (0, 0, 1)


def test_the_state_is_one_per_route_table_and_sized_by_the_settings() -> None:
    settings = Settings(
        routes='[{"topic": "spBv1.0/#", "format": "sparkplug"}]',
        sparkplug_max_aliases=77,
        sparkplug_rebirth_interval=5.0,
    )
    first, second = load_routes(settings), load_routes(settings)
    a, b = state_of(first), state_of(second)
    assert a is not b and (a.max_aliases, a.rebirth_interval) == (77, 5.0)
    with pytest.raises(ConfigError, match="INGEST_SPARKPLUG_REBIRTH_INTERVAL"):
        Settings(sparkplug_rebirth_interval=-1)
    with pytest.raises(ConfigError, match="INGEST_SPARKPLUG_MAX_ALIASES"):
        Settings(sparkplug_max_aliases=0)


def test_decoding_from_threads_keeps_the_tables_consistent() -> None:
    """A payload of 256 KiB or more is decoded in a worker thread: births and data of many
    nodes from several threads at once leave the counts exact."""
    routes = table(max_aliases=10_000)
    errors: list[object] = []

    def work(t: int) -> None:
        for i in range(50):
            node = f"n{t}-{i % 10}"
            for result in (
                run(routes, "NBIRTH", node_birth(3), node=node),
                run(routes, "NDATA", payload(T0 + i, {"alias": 2, "int_value": i}), node=node),
            ):
                if not isinstance(result, Decoded):
                    errors.append(result)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    stats = state_of(routes).statistics()
    assert (stats.nodes, stats.aliases) == (40, 40 * 4)


def test_alias_state_memory_per_entry() -> None:
    """The figures INGEST_SPARKPLUG_MAX_ALIASES' help gives: about 140 bytes an entry when
    nodes declare the same names (interned), 190 when every name differs."""

    def births(names: str) -> float:
        routes = table(max_aliases=10**7)
        blobs = [node_birth(10) if names == "same" else payload(T0, *[
            {"name": f"n{n}-m{i}", "alias": i, "datatype": DataType.Int32, "int_value": i}
            for i in range(10)
        ]) for n in range(500)]  # fmt: skip
        gc.collect()
        tracemalloc.start()
        try:
            for n, blob in enumerate(blobs):
                ok(run(routes, "NBIRTH", blob, node=f"edge-{n:04d}"))
                ok(run(routes, "DBIRTH", blob, node=f"edge-{n:04d}", device="d"))
            gc.collect()
            size = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        return size / state_of(routes).statistics().aliases

    assert births("same") < 160
    assert births("distinct") < 230


def test_a_route_s_static_tags_reach_every_device_the_message_speaks_of() -> None:
    routes = parse_routes(
        [{"topic": "spBv1.0/#", "format": "sparkplug", "tags": {"source": "ignition"}}], FORMATS
    )
    tags = {"source": "ignition"}
    birth = ok(run(routes, "NBIRTH", nbirth()))
    assert birth.updates == (
        DeviceUpdate(
            NODE, tags, status="online", status_at=AT0, units={"temp": "°C"}, birth=nbirth()
        ),
    )
    ok(run(routes, "DBIRTH", dbirth(), device="pump"))
    data = ok(run(routes, "NDATA", payload(T0 + 1, {"alias": 1, "double_value": 1.0})))
    assert data.updates == (DeviceUpdate(NODE, tags),)
    death = ok(run(routes, "NDEATH", payload(T0 + 2)))
    assert [(u.device_id, u.tags, u.status) for u in death.updates] == [
        (NODE, tags, "offline"),
        (DEVICE, tags, "offline"),
    ]


def test_births_are_kept_newest_per_device_with_the_topic_to_decode_them_again() -> None:
    old, new = nbirth(bdseq=1), nbirth(bdseq=2)
    updates = [
        DeviceUpdate(NODE, status="online", status_at=ms(5), birth=new),
        DeviceUpdate(NODE, status="online", status_at=ms(1), birth=old),
        DeviceUpdate(DEVICE, status="online", status_at=ms(2), birth=dbirth()),
        DeviceUpdate(DEVICE, status="offline", status_at=ms(9)),  # a death: no birth
    ]
    assert newest_births(updates) == [
        Birth(NODE, ms(5), new),
        Birth(DEVICE, ms(2), dbirth()),
    ]
    assert birth_topic(NODE) == "spBv1.0/plant/NBIRTH/edge1"
    assert birth_topic(DEVICE) == "spBv1.0/plant/DBIRTH/edge1/pump"
