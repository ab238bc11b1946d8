"""The daemon's HTTP routes, answered without a socket."""

from __future__ import annotations

import json

import pytest

from ingest.observability.http import JSON
from ingest.observability.service import Observability


def observability() -> Observability:
    return Observability(host="127.0.0.1", port=0, ready_max_lag=30, process_metrics=False)


@pytest.mark.anyio
async def test_routes_answer_by_path_and_method() -> None:
    obs = observability()
    status, content_type, body = await obs._route("GET", "/healthz")
    assert (status, content_type, json.loads(body)) == (200, JSON, {"alive": True})
    status, _, body = await obs._route("GET", "/readyz")
    assert status == 503 and json.loads(body)["reason"].startswith("starting")
    status, content_type, body = await obs._route("GET", "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    assert b"ingest_build_info" in body
    assert (await obs._route("POST", "/metrics"))[0] == 405
    assert (await obs._route("GET", "/nope"))[0] == 404


@pytest.mark.anyio
async def test_port_zero_disables_the_listener() -> None:
    obs = observability()
    assert await obs.listen() is None
    await obs.serve(None)  # returns at once: nothing to serve
