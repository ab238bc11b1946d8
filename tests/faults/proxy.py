"""A fault-injecting TCP proxy for the fault suite (asyncio, in a background thread).

Modes, switchable at any moment from the (synchronous) test:

* ``forward``: bytes flow both ways.
* ``blackhole``: bytes are swallowed in both directions and new connections are accepted but
  never answered; nothing is closed or reset. This is what a pulled cable or a dropping
  firewall looks like: the peers only notice through their own timeouts and keepalives.
* ``delay(seconds)``: every chunk is held back ``seconds / 2`` in each direction, so a request/
  response round trip costs ``seconds`` more (a slow or distant database).

``heal()`` returns to ``forward`` and aborts the connections that lived through a blackhole (their
protocol streams are torn, as they would be after a real outage).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="proxy")
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._mode = "forward"
        self._delay = 0.0
        self.port = 0
        self.connections = 0

    # --- control from the test thread -------------------------------------------------
    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def blackhole(self) -> None:
        self._set("blackhole", 0.0)

    def delay(self, seconds: float) -> None:
        self._set("delay", seconds)

    def forward(self) -> None:
        self._set("forward", 0.0)

    def heal(self) -> None:
        self._set("forward", 0.0)
        self._call(self._abort_all())

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- inside the proxy's loop ------------------------------------------------------------
    def _set(self, mode: str, delay: float) -> None:
        def apply() -> None:
            self._mode, self._delay = mode, delay

        self._loop.call_soon_threadsafe(apply)

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._abort_all()

    async def _abort_all(self) -> None:
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        if self._mode == "blackhole":
            # Accepted, never answered: swallow until the client gives up.
            with contextlib.suppress(OSError):
                while await reader.read(65536):
                    pass
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.ensure_future(self._send_later(queue, sink))
        try:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    if self._mode == "blackhole":
                        continue  # dropped on the floor, no reset
                    due = self._loop.time() + (self._delay / 2 if self._mode == "delay" else 0.0)
                    queue.put_nowait((due, data))
        finally:
            await queue.put((0.0, b""))
            with contextlib.suppress(Exception):
                await sender
            sink.transport.abort()

    async def _send_later(
        self, queue: asyncio.Queue[tuple[float, bytes]], sink: asyncio.StreamWriter
    ) -> None:
        while True:
            due, data = await queue.get()
            if not data:
                return
            wait = due - self._loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if self._mode == "blackhole":
                continue
            sink.write(data)
            with contextlib.suppress(OSError):
                await sink.drain()
