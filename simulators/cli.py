"""``simulate``: the command line of the device simulator (also ``python -m simulators``).

Exit status: 0 when every message was published (QoS 1: acknowledged by the broker), 1 when
some failed or the broker could not be reached, 2 for invalid arguments (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import orjson

from simulators._config import (
    DEFAULT_MQTT_URL,
    DEFAULT_TOPIC,
    SimulatorConfig,
    check_topic_template,
    parse_mqtt_url,
)
from simulators._errors import ConfigError, ConnectError
from simulators._report import Progress, progress_line
from simulators._runner import run

PROG = "simulate"

DESCRIPTION = """\
Simulate a fleet of MQTT sensor devices for iot-ingest.

Each device (dev-00001, dev-00002, ...) publishes JSON telemetry to its topic at --rate
messages per second, phases spread evenly over the fleet and scheduled against absolute time,
so the fleet's rate is devices x rate and does not drift. A message is

  {"ts": <epoch ms>, "seq": <n>, "temperature": .., "humidity": .., "battery": .., "rssi": ..,
   "fw": "1.2.3"}

or, with --samples-per-message K, a JSON array of K such samples. Every sample has the device's
next seq and a timestamp no other sample of that device has, so a run can be reconciled against
the database. Values are realistic and seeded: the same --seed gives the same values.

At the end a report goes to stdout (text, or one JSON object with --report json): published,
failed, seconds, achieved rate against the target, injected faults by kind. A one-line progress
display goes to stderr when it is a terminal (not with --quiet).
"""

EPILOG = """\
examples:
  simulate --devices 1000 --rate 0.2 --duration 600          steady fleet, 200 msg/s
  simulate --devices 100 --rate 100 --count 50 --qos 0       burst: 5,000 messages in 0.5 s
  simulate --devices 50 --rate 2 --duration 60 \\
           --bad-ratio 0.02 --duplicate-ratio 0.05 --late-ratio 0.01   fault mix
  simulate --devices 10 --count 5 --report json | jq .published

exit status: 0 all published, 1 some failed (or broker unreachable), 2 invalid arguments.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One clear line, no usage block: scripts and people both read it.
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--mqtt-url",
        metavar="URL",
        help="broker, mqtt://[user:pass@]host[:port] or mqtts://... "
        f"(default: $INGEST_MQTT_URL, else {DEFAULT_MQTT_URL})",
    )
    p.add_argument("--devices", type=int, default=10, metavar="N", help="fleet size (default 10)")
    p.add_argument(
        "--rate",
        type=float,
        default=1.0,
        metavar="R",
        help="messages per second per device; fractions allowed, 0.1 = one every 10 s (default 1)",
    )
    until = p.add_mutually_exclusive_group()
    until.add_argument("--count", type=int, metavar="M", help="messages per device, then stop")
    until.add_argument(
        "--duration", type=float, metavar="S", help="seconds to run (default: until Ctrl-C)"
    )
    p.add_argument(
        "--qos",
        type=int,
        choices=(0, 1),
        default=1,
        help="1: published means acknowledged by the broker (PUBACK); 0: handed to the socket "
        "(default 1)",
    )
    p.add_argument(
        "--topic",
        metavar="TEMPLATE",
        help="topic template, {device_id} is one level "
        f"(default: $INGEST_TOPIC, else {DEFAULT_TOPIC})",
    )
    p.add_argument(
        "--seed", type=int, metavar="S", help="seed of the values and faults (default: random)"
    )
    p.add_argument(
        "--samples-per-message",
        type=int,
        default=1,
        metavar="K",
        help="samples per message; K > 1 sends a JSON array (default 1)",
    )
    p.add_argument(
        "--bad-ratio",
        type=float,
        default=0.0,
        metavar="F",
        help="share of messages that are malformed: not JSON, truncated JSON, invalid UTF-8, "
        "no numeric field, unreadable ts (default 0)",
    )
    p.add_argument(
        "--duplicate-ratio",
        type=float,
        default=0.0,
        metavar="F",
        help="share of messages published twice (default 0)",
    )
    p.add_argument(
        "--late-ratio",
        type=float,
        default=0.0,
        metavar="F",
        help="share of samples with a timestamp 2-15 minutes in the past (default 0)",
    )
    p.add_argument(
        "--connections",
        type=int,
        metavar="C",
        help="MQTT connections the fleet is spread over (default: min(devices, 4 x processes))",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="P",
        help="processes the fleet is spread over, for more than one core can carry (default 1)",
    )
    p.add_argument(
        "--report", choices=("text", "json"), default="text", help="report format (default text)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    return p


def config_from_args(args: argparse.Namespace, env: dict[str, str]) -> SimulatorConfig:
    """The configuration of a command line; raises :class:`ConfigError`."""
    url = args.mqtt_url
    if url is None:
        url = env.get("INGEST_MQTT_URL") or DEFAULT_MQTT_URL
        parse_mqtt_url(url, setting="INGEST_MQTT_URL")
    topic = args.topic
    if topic is None:
        topic = env.get("INGEST_TOPIC") or DEFAULT_TOPIC
        check_topic_template(topic, setting="INGEST_TOPIC")
    return SimulatorConfig(
        mqtt_url=url,
        devices=args.devices,
        rate=args.rate,
        count=args.count,
        duration=args.duration,
        qos=args.qos,
        topic=topic,
        seed=args.seed,
        samples_per_message=args.samples_per_message,
        bad_ratio=args.bad_ratio,
        duplicate_ratio=args.duplicate_ratio,
        late_ratio=args.late_ratio,
        connections=args.connections,
        processes=args.processes,
    )


class _ProgressLine:
    """Rewrites one line of stderr (a terminal) in place."""

    def __init__(self) -> None:
        self.shown = False

    def __call__(self, progress: Progress) -> None:
        sys.stderr.write("\r" + progress_line(progress) + "\x1b[K")
        sys.stderr.flush()
        self.shown = True

    def finish(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args, dict(os.environ))
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    line = _ProgressLine() if sys.stderr.isatty() and not args.quiet else None
    try:
        report = run(config, progress=line)
    except ConnectError as exc:
        if line is not None:
            line.finish()
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    if line is not None:
        line.finish()
    if args.report == "json":
        sys.stdout.write(orjson.dumps(report.to_json()).decode() + "\n")
    else:
        sys.stdout.write(report.to_text() + "\n")
    sys.stdout.flush()
    return report.exit_status
