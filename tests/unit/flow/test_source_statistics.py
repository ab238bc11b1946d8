"""The source's statistics add up the MQTT sessions it used: a reconnect starts a new session
(packet ids do not survive it), and the counts of the old one must not be lost with it."""

from __future__ import annotations

import asyncio

import anyio

from ingest.flow.acker import Acker
from ingest.flow.source import Source
from ingest.settings import Settings


def test_counts_of_earlier_sessions_are_kept() -> None:
    async def run() -> None:
        source = Source(
            Settings(mqtt_url="mqtt://127.0.0.1:1883", client_id="stats-test"),
            acker=Acker(),
            drained=anyio.Event(),
        )
        first = source._new_session(None)
        source._use(first)
        first.fast_path, first.paho_path, first.too_large = 100, 5, 1
        second = source._new_session(None)
        source._use(second)
        second.fast_path, second.paho_path = 7, 2
        st = source.statistics()
        assert (st.parsed_fast, st.parsed_paho, st.too_large) == (107, 7, 1)

    asyncio.run(run())
