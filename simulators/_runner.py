"""Running the fleet: one process (its connections on one event loop), or several processes
started with ``multiprocessing`` (spawn) whose results are merged into one report.

Start: every process connects all its connections first, then the runs start together at a
common wall-clock instant, so the schedule of the whole fleet stays evenly spread.

Stop: the first SIGINT/SIGTERM stops scheduling and waits (at most ``ack_timeout``) for
outstanding acknowledgements; the second stops waiting. Children ignore SIGINT (a Ctrl-C in a
terminal reaches the whole process group): the parent relays stop and force through events.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import queue
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized, SynchronizedArray
from typing import Any

from simulators._config import SimulatorConfig
from simulators._errors import ConnectError
from simulators._payloads import Device, FaultRatios
from simulators._publisher import Publisher, Stats
from simulators._report import (
    PER_DEVICE_LIMIT,
    BrokerCounts,
    ProcessResult,
    Progress,
    Report,
    build_report,
)
from simulators._schedule import Schedule, deal, process_connections, process_devices
from simulators._senml import encoder
from simulators._sparkplug import fleet as sparkplug_fleet

ProgressCallback = Callable[[Progress], None]

#: Seconds between progress updates.
PROGRESS_PERIOD = 1.0
#: How far ahead of "all connected" the common start is set (lets every process see it).
START_MARGIN = 0.2
_POLL = 0.02


@dataclass(slots=True)
class Control:
    """How a process's run is steered: ``stop`` and ``force`` events, ``start()`` (called
    once connected; returns the common start in epoch seconds, or ``None`` to give up), and
    ``report(stats)``, called periodically with the live counters.
    """

    stop: asyncio.Event
    force: asyncio.Event
    start: Callable[[], Awaitable[float | None]]
    report: Callable[[Stats], None] | None = None


def schedule_of(config: SimulatorConfig) -> Schedule:
    return Schedule(config.devices, config.rate, config.count, config.duration)


async def run_process(config: SimulatorConfig, part: int, control: Control) -> ProcessResult:
    """Simulate process ``part``'s share of the fleet."""
    stats = Stats()
    devices, publishers = _fleet(config, part, stats)
    result = ProcessResult(failures={}, connections=len(publishers))
    if not await _connect_all(publishers, control, config.connect_timeout):
        result.finished = time.time()
        return result
    start_wall = await control.start()
    if start_wall is None:
        for p in publishers:
            p.abort()
        result.finished = time.time()
        return result
    start = asyncio.get_running_loop().time() + (start_wall - time.time())
    for d in devices:
        d.start(int(start_wall * 1000.0))
    settled = await _run_all(publishers, control, stats, start, start_wall * 1000.0)
    _fill(config, result, stats, devices, keep_devices=config.devices <= PER_DEVICE_LIMIT)
    result.finished = start_wall + (max(settled) - start)
    return result


def _fleet(
    config: SimulatorConfig, part: int, stats: Stats
) -> tuple[list[Device], list[Publisher]]:
    """Process ``part``'s devices, and its publishers (one per connection) sharing them: with
    several brokers, each broker's devices on connections of their own."""
    schedule = schedule_of(config)
    if config.format == "sparkplug":
        return sparkplug_fleet(config, part, stats, schedule)
    faults = FaultRatios(
        config.bad_ratio, config.duplicate_ratio, config.late_ratio, config.hostile_ratio
    )
    devices = [
        Device(
            i,
            seed=config.seed_value,
            topic_template=config.topic_of(i),
            name=config.device_name(i),
            rate=config.rate,
            samples_per_message=config.samples_per_message,
            faults=faults,
            encode=encoder(config.format, config.senml_cbor),
        )
        for i in process_devices(config.devices, config.processes, part)
    ]
    connections = process_connections(
        config.connection_count, config.processes, part, config.devices
    )
    several = len(config.brokers) > 1
    publishers = [
        Publisher(
            name=f"p{part}b{k}c{c}" if several else f"p{part}c{c}",
            url=config.brokers[k],
            devices=group,
            schedule=schedule,
            qos=config.qos,
            stats=stats,
            keepalive=config.keepalive,
            inflight_window=config.inflight_window,
            ack_timeout=config.ack_timeout,
        )
        for k, groups in enumerate(_by_broker(config, devices, connections))
        for c, group in enumerate(groups)
    ]
    return devices, publishers


def _by_broker(
    config: SimulatorConfig, devices: list[Device], connections: int
) -> list[list[list[Device]]]:
    """For each broker, its devices dealt over its share of the process's ``connections``
    (at least one per broker with devices, at most one per device)."""
    brokers = len(config.brokers)
    out = []
    for k in range(brokers):
        mine = [d for d in devices if config.broker_of(d.index) == k]
        share = connections // brokers + (1 if k < connections % brokers else 0)
        out.append(deal(mine, max(1, min(share, len(mine)))) if mine else [])
    return out


async def _connect_all(publishers: list[Publisher], control: Control, within: float) -> bool:
    """Connect every publisher; False when stopped meanwhile. Raises the first
    :class:`ConnectError` (or a bug) after dropping whatever did connect."""
    connecting = [
        asyncio.create_task(p.connect(within), name=f"simulate[{p.name}:connect]")
        for p in publishers
    ]
    stopped = asyncio.ensure_future(control.stop.wait())
    waiting: set[asyncio.Future[Any]] = {*connecting, stopped}
    while not stopped.done() and not all(t.done() for t in connecting):
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        waiting = {f for f in waiting if not f.done()}
    stopped.cancel()
    for t in connecting:
        t.cancel()  # interrupted while connecting (no-op for those done)
    await asyncio.gather(*connecting, return_exceptions=True)
    errors = [e for t in connecting if not t.cancelled() and (e := t.exception()) is not None]
    if not errors and not any(t.cancelled() for t in connecting):
        return True
    for p in publishers:
        p.abort()
    for e in errors:
        if not isinstance(e, ConnectError):
            raise e
    if errors:
        raise errors[0]
    return False


async def _run_all(
    publishers: list[Publisher], control: Control, stats: Stats, start: float, start_ms: float
) -> list[float]:
    """Run every publisher from ``start`` (loop time), steered by ``control``; returns when
    each settled its last message."""

    async def steer() -> None:
        await control.stop.wait()
        for p in publishers:
            p.stop()
        await control.force.wait()
        for p in publishers:
            p.force()

    async def report_progress(report: Callable[[Stats], None]) -> None:
        while True:
            await asyncio.sleep(PROGRESS_PERIOD / 2)
            report(stats)

    helpers = [asyncio.create_task(steer(), name="simulate[steer]")]
    if control.report is not None:
        progress = report_progress(control.report)
        helpers.append(asyncio.create_task(progress, name="simulate[progress]"))
    try:
        async with asyncio.TaskGroup() as group:  # a bug in one cancels the others
            runs = [
                group.create_task(p.run(start, start_ms), name=f"simulate[{p.name}]")
                for p in publishers
            ]
        settled = [r.result() for r in runs]
    finally:
        for h in helpers:
            h.cancel()
        for h in helpers:
            with contextlib.suppress(asyncio.CancelledError):
                await h
    if control.report is not None:
        control.report(stats)
    return settled


def _per_broker(config: SimulatorConfig, devices: list[Device]) -> dict[str, BrokerCounts]:
    """(devices, messages, published, failed) of each broker's devices."""
    counts = {b.name(): [0, 0, 0, 0] for b in config.brokers}
    for d in devices:
        c = counts[config.brokers[config.broker_of(d.index)].name()]
        c[0] += 1
        c[1] += d.messages
        c[2] += d.published
        c[3] += d.failed
    return {name: (c[0], c[1], c[2], c[3]) for name, c in counts.items()}


def _fill(
    config: SimulatorConfig,
    result: ProcessResult,
    stats: Stats,
    devices: list[Device],
    *,
    keep_devices: bool,
) -> None:
    result.messages = stats.messages
    result.duplicates = stats.duplicates
    result.published = stats.published
    result.published_duplicates = stats.published_duplicates
    result.failed = stats.failed
    result.samples = stats.samples
    result.late = stats.late
    result.extreme = sum(d.extreme for d in devices)
    result.bad = dict(stats.bad)
    result.failures = dict(stats.failures)
    result.reconnects = stats.reconnects
    result.connect_failures = stats.connect_failures
    result.max_lag = stats.max_lag
    result.brokers = _per_broker(config, devices) if len(config.brokers) > 1 else {}
    result.sparkplug = dict(stats.sparkplug)
    result.nodes = {node: list(counts) for node, counts in stats.nodes.items()}
    if keep_devices:
        result.devices = {
            d.device_id: (d.messages, d.published, d.failed, d.seq, d.bad, d.duplicates, d.late)
            for d in devices
        }
        result.kinds = {d.device_id: (d.extreme, dict(d.kinds)) for d in devices}


# -- one process -------------------------------------------------------------------------------


async def _single(
    config: SimulatorConfig,
    stop: asyncio.Event,
    force: asyncio.Event,
    progress: Callable[[Progress], Awaitable[None]] | None,
) -> tuple[list[ProcessResult], float]:
    started: list[float] = []
    shown: set[asyncio.Future[None]] = set()

    async def start() -> float | None:
        if stop.is_set():
            return None
        started.append(time.time() + 0.01)
        return started[0]

    def report(stats: Stats) -> None:
        if progress is None or not started:
            return
        snapshot = Progress(
            time.time() - started[0],
            stats.published,
            stats.failed,
            stats.messages,
            stats.lag,
            config.target_rate,
        )
        shown.difference_update([f for f in shown if f.done()])
        shown.add(asyncio.ensure_future(progress(snapshot)))

    try:
        result = await run_process(
            config, 0, Control(stop, force, start, report if progress is not None else None)
        )
    finally:
        if shown:
            await asyncio.wait(shown)
    return [result], (started[0] if started else time.time())


# -- several processes -------------------------------------------------------------------------

_FIELDS = 5  # published, failed, messages, lag, alive


def _child_main(
    config: SimulatorConfig,
    part: int,
    events: tuple[Any, Any, Any],
    start_at: Synchronized[float],
    counters: SynchronizedArray[float],
    results: multiprocessing.Queue[tuple[str, int, Any]],
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        result = asyncio.run(_child(config, part, events, start_at, counters, results))
        results.put(("result", part, result))
    except ConnectError as exc:
        results.put(("connect", part, (exc.url, exc.message)))
    except BaseException as exc:  # reported by the parent, which exits 1
        traceback.print_exc(file=sys.stderr)
        results.put(("error", part, f"process {part}: {exc!r}"))


async def _child(
    config: SimulatorConfig,
    part: int,
    events: tuple[Any, Any, Any],
    start_at: Synchronized[float],
    counters: SynchronizedArray[float],
    results: multiprocessing.Queue[tuple[str, int, Any]],
) -> ProcessResult:
    stop_event, force_event, start_event = events
    stop, force = asyncio.Event(), asyncio.Event()

    async def relay() -> None:
        while not force.is_set():
            if stop_event.is_set():
                stop.set()
            if force_event.is_set():
                force.set()
            await asyncio.sleep(0.05)

    async def start() -> float | None:
        results.put(("ready", part, None))
        while not start_event.is_set():
            if stop_event.is_set():
                return None
            await asyncio.sleep(0.005)
        return float(start_at.value)

    def report(stats: Stats) -> None:
        base = part * _FIELDS
        counters[base] = stats.published
        counters[base + 1] = stats.failed
        counters[base + 2] = stats.messages
        counters[base + 3] = stats.lag

    relay_task = asyncio.create_task(relay(), name="simulate[relay]")
    try:
        return await run_process(config, part, Control(stop, force, start, report))
    finally:
        relay_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await relay_task


class _Children:
    """The processes of a multi-process run, their shared events and counters, and what
    they have reported so far (ready, results, errors)."""

    def __init__(self, config: SimulatorConfig) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.n = n = config.processes
        self.stop, self.force, self.start = ctx.Event(), ctx.Event(), ctx.Event()
        self.start_at = ctx.Value("d", 0.0)
        self.counters = ctx.Array("d", n * _FIELDS, lock=False)
        self.results: multiprocessing.Queue[tuple[str, int, Any]] = ctx.Queue()
        self.processes = [
            ctx.Process(
                target=_child_main,
                args=(
                    config,
                    part,
                    (self.stop, self.force, self.start),
                    self.start_at,
                    self.counters,
                    self.results,
                ),
                name=f"simulate-{part}",
                daemon=True,
            )
            for part in range(n)
        ]
        self.ready: set[int] = set()
        self.connect_errors: list[ConnectError] = []
        self.done: dict[int, ProcessResult] = {}
        self.errors: dict[int, str] = {}
        self.started: float | None = None

    def spawn(self) -> None:
        # Children inherit the blocked mask through exec and ignore SIGINT before unblocking
        # it: a Ctrl-C during their start-up cannot kill them half-way.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            for proc in self.processes:
                proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    @property
    def settled(self) -> bool:
        return len(self.done) + len(self.errors) >= self.n

    def take(self, kind: str, part: int, payload: Any) -> None:
        """One message from a child."""
        if kind == "ready":
            self.ready.add(part)
        elif kind == "result":
            self.done[part] = payload
        elif kind == "connect":
            self.connect_errors.append(ConnectError(*payload))
            self.errors[part] = str(self.connect_errors[-1])
        else:
            self.errors[part] = str(payload)

    def check(self, stop: asyncio.Event, force: asyncio.Event) -> None:
        """Between messages: notice dead children, relay stop and force, start the run once
        every child is ready."""
        for part, proc in enumerate(self.processes):
            if (
                proc.exitcode is not None
                and part not in self.done
                and part not in self.errors
                and self.results.empty()
            ):
                self.errors[part] = f"process {part} exited with status {proc.exitcode}"
        if stop.is_set():
            self.stop.set()
        if force.is_set():
            self.force.set()
        if self.errors and self.started is None:
            self.stop.set()  # a process could not connect: call the others off
        if self.started is None and len(self.ready) == self.n and not stop.is_set():
            self.started = time.time() + START_MARGIN
            self.start_at.value = self.started
            self.start.set()

    def progress(self, target_rate: float) -> Progress:
        assert self.started is not None
        c, fields = self.counters, range(self.n)
        return Progress(
            time.time() - self.started,
            int(sum(c[p * _FIELDS] for p in fields)),
            int(sum(c[p * _FIELDS + 1] for p in fields)),
            int(sum(c[p * _FIELDS + 2] for p in fields)),
            max(c[p * _FIELDS + 3] for p in fields),
            target_rate,
        )

    async def reap(self, force: asyncio.Event) -> None:
        self.stop.set()
        if force.is_set():
            self.force.set()
        for proc in self.processes:
            await asyncio.to_thread(proc.join, 5.0)
            if proc.is_alive():
                proc.kill()
                await asyncio.to_thread(proc.join, 1.0)

    def outcome(self) -> tuple[list[ProcessResult], float]:
        if self.connect_errors and self.started is None:
            raise self.connect_errors[0]
        out = [self.done[p] for p in sorted(self.done)]
        if self.errors:
            failed = [self.errors[p] for p in sorted(self.errors)]
            out.append(ProcessResult(failures={}, errors=failed))
        return out, (self.started if self.started is not None else time.time())


async def _multi(
    config: SimulatorConfig,
    stop: asyncio.Event,
    force: asyncio.Event,
    progress: Callable[[Progress], Awaitable[None]] | None,
) -> tuple[list[ProcessResult], float]:
    children = _Children(config)
    children.spawn()
    last_progress = time.monotonic()
    try:
        while not children.settled:
            try:
                children.take(*children.results.get_nowait())
                continue
            except queue.Empty:
                pass
            children.check(stop, force)
            if progress is not None and children.started is not None:
                now = time.monotonic()
                if now - last_progress >= PROGRESS_PERIOD:
                    last_progress = now
                    await progress(children.progress(config.target_rate))
            await asyncio.sleep(_POLL)
    finally:
        await children.reap(force)
    return children.outcome()


# -- the public entry points -------------------------------------------------------------------


async def simulate(
    config: SimulatorConfig,
    *,
    stop: asyncio.Event | None = None,
    force: asyncio.Event | None = None,
    progress: Callable[[Progress], Awaitable[None]] | None = None,
) -> Report:
    """Run the simulation described by ``config`` and return its report.

    Setting ``stop`` ends the schedule early (outstanding acknowledgements are still awaited,
    at most ``config.ack_timeout``); setting ``force`` too stops waiting. Raises
    :class:`ConnectError` when the broker cannot be reached at start.
    """
    stop = stop or asyncio.Event()
    force = force or asyncio.Event()
    stopped: list[float] = []

    async def note_stop() -> None:
        await stop.wait()
        stopped.append(time.time())

    watcher = asyncio.create_task(note_stop(), name="simulate[stop]")
    try:
        runner = _single if config.processes == 1 else _multi
        results, started = await runner(config, stop, force, progress)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    return build_report(
        config,
        results,
        started=started,
        stopped=stopped[0] if stopped else None,
        nominal=schedule_of(config).nominal_seconds,
        scheduled=schedule_of(config).total_slots,
    )


def run(config: SimulatorConfig, *, progress: ProgressCallback | None = None) -> Report:
    """:func:`simulate` in a new event loop, stopped by SIGINT/SIGTERM (the second forces).
    ``progress`` is called about once a second, in a worker thread.
    """

    async def main() -> Report:
        loop = asyncio.get_running_loop()
        stop, force = asyncio.Event(), asyncio.Event()

        def on_signal() -> None:
            (force if stop.is_set() else stop).set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        show = None
        if progress is not None:
            callback = progress

            async def show(p: Progress) -> None:
                await asyncio.to_thread(callback, p)

        try:
            return await simulate(config, stop=stop, force=force, progress=show)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    return asyncio.run(main())
