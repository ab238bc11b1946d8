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
from anyio.abc import Listener, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from ingest.errors import ConfigError

__all__ = [
    "JSON",
    "METHOD_NOT_ALLOWED",
    "NOT_FOUND",
    "Response",
    "Route",
    "bind",
    "handle_http",
    "json_response",
    "serve_http",
]

_log = logging.getLogger("ingest.metrics")

REQUEST_TIMEOUT = 5.0
MAX_REQUEST_HEAD = 8192
ACCEPT_RETRY = 1.0

#: (status, content type, body)
Response = tuple[int, str, bytes]
#: ``route(method, path)``: the answer to one request.
Route = Callable[[str, str], Awaitable[Response]]

JSON = "application/json"
_TEXT = "text/plain; charset=utf-8"
METHOD_NOT_ALLOWED: Response = (405, _TEXT, b"method not allowed\n")
NOT_FOUND: Response = (404, _TEXT, b"not found: try /metrics, /healthz, /readyz\n")
_REASONS = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}

# A client that went away or sent garbage: nothing to answer.
_CLIENT_GONE = (
    TimeoutError,
    OSError,
    anyio.EndOfStream,
    anyio.IncompleteRead,
    anyio.DelimiterNotFound,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
)


def json_response(ok: bool, body: Mapping[str, Any]) -> Response:
    """200 with ``body`` as JSON when ``ok``, else 503."""
    return (200 if ok else 503), JSON, json.dumps(body).encode() + b"\n"


async def bind(host: str, port: int) -> Listener[SocketStream] | None:
    """Bind the metrics port (None when ``port`` is 0, disabled); a port that cannot be bound
    is a configuration error, raised before any task group so that it exits with status 2."""
    if port == 0:
        return None
    try:
        return await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as exc:
        raise ConfigError(
            "INGEST_METRICS_PORT", f"cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from None


async def serve_http(listener: Listener[SocketStream], route: Route) -> None:
    """Answer requests with ``route`` until cancelled; closes ``listener``."""
    async with listener, anyio.create_task_group() as tg:
        while True:
            try:
                await listener.serve(lambda stream: handle_http(stream, route), tg)
            except OSError as exc:  # e.g. out of file descriptors: never stop the daemon
                _log.warning(
                    "metrics endpoint: accept failed (%s); retrying in %gs", exc, ACCEPT_RETRY
                )
                await anyio.sleep(ACCEPT_RETRY)


async def handle_http(stream: SocketStream, route: Route) -> None:
    """Answer one HTTP/1.1 request on ``stream`` with ``route(method, path)``."""
    async with stream:
        try:
            with anyio.fail_after(REQUEST_TIMEOUT):
                method, path = await _read_request_line(stream)
                await stream.send(_answer(method, await route(method, path)))
        except _CLIENT_GONE:
            return
        except Exception:
            # A bug here must never take the daemon down with it (the handler runs in the
            # server's task group).
            _log.exception("metrics endpoint: request failed")


async def _read_request_line(stream: SocketStream) -> tuple[str, str]:
    """The method and the path (query string dropped) of the request on ``stream``."""
    head = await BufferedByteReceiveStream(stream).receive_until(b"\r\n\r\n", MAX_REQUEST_HEAD)
    method, _, rest = head.partition(b"\r\n")[0].decode("latin-1").partition(" ")
    return method, rest.partition(" ")[0].partition("?")[0]


def _answer(method: str, response: Response) -> bytes:
    status, content_type, body = response
    header = (
        f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n"
        "Cache-Control: no-store\r\n\r\n"
    ).encode("latin-1")
    return header if method == "HEAD" else header + body
