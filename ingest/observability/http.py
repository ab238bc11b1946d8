"""A few lines of HTTP/1.1 for ``/metrics``, ``/healthz`` and ``/readyz``.

It runs in the daemon's own event loop (anyio TCP listener, ``Connection: close``), so an
answer proves the loop is alive. It imports neither the pipeline nor the MQTT or database
clients: the supervisor serves its workers' merged metrics with it alone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

__all__ = ["Route", "handle_http"]

_log = logging.getLogger("ingest.metrics")

REQUEST_TIMEOUT = 5.0
MAX_REQUEST_HEAD = 8192

Route = Callable[[str, str], Awaitable[tuple[int, str, bytes]]]


async def handle_http(stream: SocketStream, route: Route) -> None:
    """Answer one HTTP/1.1 request on ``stream`` with ``route(method, path)``."""
    async with stream:
        try:
            with anyio.fail_after(REQUEST_TIMEOUT):
                head = await BufferedByteReceiveStream(stream).receive_until(
                    b"\r\n\r\n", MAX_REQUEST_HEAD
                )
                method, _, rest = head.partition(b"\r\n")[0].decode("latin-1").partition(" ")
                path = rest.partition(" ")[0].partition("?")[0]
                status, content_type, body = await route(method, path)
                reason = _REASONS.get(status, "")
                header = (
                    f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n"
                    "Cache-Control: no-store\r\n\r\n"
                ).encode("latin-1")
                await stream.send(header if method == "HEAD" else header + body)
        except (
            TimeoutError,
            OSError,
            anyio.EndOfStream,
            anyio.IncompleteRead,
            anyio.DelimiterNotFound,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
        ):
            return  # a client that went away or sent garbage: nothing to answer
        except Exception:
            # A bug here must never take the daemon down with it (the handler runs in the
            # server's task group).
            _log.exception("metrics endpoint: request failed")


_JSON = "application/json"
_REASONS = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


def _json(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body).encode() + b"\n"
