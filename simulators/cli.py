"""``simulate``: the command line of the device simulator (also ``python -m simulators``).

Exit status: 0 when every message was published (QoS 1: acknowledged by the broker), 1 when
some failed or the broker could not be reached, 2 for invalid arguments (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import NoReturn

import orjson

from ingest.urls import redact_urls_in
from simulators._config import (
    DEFAULT_DEVICES_PER_NODE,
    DEFAULT_GROUP_ID,
    DEFAULT_MQTT_URL,
    DEFAULT_SENML_TOPIC,
    DEFAULT_TOPIC,
    DEFAULT_VALUE_TOPIC,
    FORMATS,
    SimulatorConfig,
    parse_tags,
)
from simulators._errors import ConfigError, ConnectError
from simulators._report import Progress, progress_line
from simulators._runner import run

PROG = "simulate"
#: The topic template of each --format when neither --topic nor $INGEST_TOPIC gives one.
_DEFAULT_TOPICS = {
    "json": DEFAULT_TOPIC,
    "value": DEFAULT_VALUE_TOPIC,
    "senml": DEFAULT_SENML_TOPIC,
    "sparkplug": DEFAULT_TOPIC,  # unused: a Sparkplug fleet's topics are spBv1.0/<group>/...
}

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
        # One clear line, no usage block: scripts and people both read it. argparse quotes
        # stray arguments, which may be a URL with a password: those are redacted.
        message = redact_urls_in(message)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_fleet_flags(p)
    _add_route_flags(p)
    _add_fault_flags(p)
    _add_scale_flags(p)
    _add_connection_flags(p)
    p.add_argument(
        "--report", choices=("text", "json"), default="text", help="report format (default text)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    return p


def _add_fleet_flags(p: argparse.ArgumentParser) -> None:
    """Where the fleet publishes, how big it is, how fast and for how long."""
    p.add_argument(
        "--mqtt-url",
        metavar="URL",
        action="append",
        help="broker, mqtt://[user:pass@]host[:port] or mqtts://...; repeated (or separated by "
        "commas): the devices are dealt over the brokers, device i to broker i mod K "
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
        help="topic template, {device_id} is one level; {metric} one too with --format value; "
        "other {name} levels are filled from --tags "
        f"(default: $INGEST_TOPIC, else {DEFAULT_TOPIC}; with --format value "
        f"{DEFAULT_VALUE_TOPIC}, with --format senml {DEFAULT_SENML_TOPIC})",
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


def _add_route_flags(p: argparse.ArgumentParser) -> None:
    """What the daemon's routes take: the payload format, tag levels, device numbering."""
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="json",
        help="json: a JSON message per sample; value: one topic per metric, seq included, each "
        '{"ts": ..., "value": ...}; senml: one RFC 8428 SenML pack per message; sparkplug: '
        "Sparkplug B edge nodes of --devices-per-node "
        "devices each (one connection per node, its NDEATH the will): NBIRTH and DBIRTHs on "
        "connect, a DDATA by alias per message, DDEATHs and NDEATH on exit, births again on an "
        "NCMD Node Control/Rebirth (default json)",
    )
    p.add_argument(
        "--group-id",
        default=DEFAULT_GROUP_ID,
        metavar="ID",
        help="--format sparkplug: the Sparkplug group id; devices are named "
        f"<group>/<node>/<device> as the daemon stores them (default {DEFAULT_GROUP_ID})",
    )
    p.add_argument(
        "--devices-per-node",
        type=int,
        default=DEFAULT_DEVICES_PER_NODE,
        metavar="K",
        help="--format sparkplug: devices per edge node, node-0001 holding the first K "
        f"(default {DEFAULT_DEVICES_PER_NODE})",
    )
    p.add_argument(
        "--senml-cbor",
        action="store_true",
        help="with --format senml: the packs in CBOR (RFC 8428 section 6) instead of JSON",
    )
    p.add_argument(
        "--first-device",
        type=int,
        default=1,
        metavar="N",
        help="number of the first device, dev-<N> (default 1): fleets run side by side keep apart",
    )
    p.add_argument(
        "--tags",
        nargs="+",
        action="extend",
        metavar="NAME=V1,V2",
        help="values of the template's {NAME} levels (--tags site=a,b line=1,2): devices are "
        "spread over the combinations",
    )


def _add_fault_flags(p: argparse.ArgumentParser) -> None:
    """The shares of messages that misbehave (see README, Faults)."""
    p.add_argument(
        "--bad-ratio",
        type=float,
        default=0.0,
        metavar="F",
        help="share of messages that are malformed: not JSON, truncated JSON, invalid UTF-8, "
        "no numeric field, unreadable ts; with --format sparkplug, a draw that makes the edge "
        "node send data by aliases before their births, until it is asked to rebirth "
        "(default 0)",
    )
    p.add_argument(
        "--hostile-ratio",
        type=float,
        default=0.0,
        metavar="F",
        help="share of messages from a hostile device: over 1 MiB, over 10,000 readings, "
        "year 9999 or 1999 timestamps, control characters in names (dead letters), or "
        "values of +-1e308 (stored) (default 0)",
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


def _add_scale_flags(p: argparse.ArgumentParser) -> None:
    """How the fleet is spread over connections and processes."""
    p.add_argument(
        "--connections",
        type=int,
        metavar="C",
        help="MQTT connections the fleet is spread over, at least one per broker (default: "
        "min(devices, 4 x processes))",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="P",
        help="processes the fleet is spread over, for more than one core can carry (default 1)",
    )


#: Flags whose default is the daemon's environment variable of the same meaning.
ENV_DEFAULTS = {
    "mqtt_url": "INGEST_MQTT_URL",
    "topic": "INGEST_TOPIC",
    "username": "INGEST_MQTT_USERNAME",
    "password_file": "INGEST_MQTT_PASSWORD_FILE",
    "ca_file": "INGEST_MQTT_CA_FILE",
    "cert_file": "INGEST_MQTT_CERT_FILE",
    "key_file": "INGEST_MQTT_KEY_FILE",
}


def _add_connection_flags(p: argparse.ArgumentParser) -> None:
    """Credentials and TLS: the daemon's settings of the same names, so a TLS fleet with
    credentials can be simulated. No flag takes a password itself (``ps`` would show it)."""
    p.add_argument(
        "--username", metavar="NAME", help="broker user name (default: $INGEST_MQTT_USERNAME, "
        "else the URL's); wins over the URL's user info",
    )  # fmt: skip
    p.add_argument(
        "--password-file", metavar="FILE", help="file holding the broker password, one trailing "
        "newline stripped (default: $INGEST_MQTT_PASSWORD_FILE, or $INGEST_MQTT_PASSWORD, "
        "else the URL's)",
    )  # fmt: skip
    p.add_argument(
        "--ca-file", metavar="FILE", help="mqtts: PEM bundle that verifies the broker's "
        "certificate, instead of the system's trust store (default: $INGEST_MQTT_CA_FILE)",
    )  # fmt: skip
    p.add_argument(
        "--cert-file", metavar="FILE", help="mqtts: client certificate (PEM) for mutual TLS; "
        "may hold the key too (default: $INGEST_MQTT_CERT_FILE)",
    )  # fmt: skip
    p.add_argument(
        "--key-file", metavar="FILE", help="mqtts: the client certificate's unencrypted key "
        "(PEM) (default: $INGEST_MQTT_KEY_FILE)",
    )  # fmt: skip


def _with_env_defaults(args: argparse.Namespace, env: Mapping[str, str]) -> dict[str, str]:
    """Fill the flags left out from the environment (empty variables count as unset); return
    which flag got its value from which variable, so errors name what the user set."""
    origin: dict[str, str] = {}
    for name, var in ENV_DEFAULTS.items():
        if getattr(args, name) is None and env.get(var):
            setattr(args, name, env[var])
            origin["--" + name.replace("_", "-")] = var
    return origin


def _password(
    args: argparse.Namespace, env: Mapping[str, str], origin: Mapping[str, str]
) -> str | None:
    if args.password_file is None:
        return env.get("INGEST_MQTT_PASSWORD") or None
    if "--password-file" in origin and env.get("INGEST_MQTT_PASSWORD"):
        raise ConfigError(
            "INGEST_MQTT_PASSWORD_FILE", "not allowed with INGEST_MQTT_PASSWORD (choose one)"
        )
    try:
        with open(args.password_file, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(
            "--password-file", f"cannot read {args.password_file}: {reason}"
        ) from None
    return text.removesuffix("\n").removesuffix("\r")


def config_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> SimulatorConfig:
    """The configuration of a command line; raises :class:`ConfigError` naming the flag, or
    the environment variable that gave the value."""
    origin = _with_env_defaults(args, env)
    if args.format != "json" and origin.pop("--topic", None):
        args.topic = None  # the daemon's INGEST_TOPIC is a json route's template
    try:
        return _config(args, _password(args, env, origin))
    except ConfigError as exc:
        if exc.setting in origin:
            raise ConfigError(origin[exc.setting], exc.message) from None
        raise


def _config(args: argparse.Namespace, password: str | None) -> SimulatorConfig:
    return SimulatorConfig(
        mqtt_url=_urls(args.mqtt_url),
        username=args.username,
        password=password,
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
        devices=args.devices,
        rate=args.rate,
        count=args.count,
        duration=args.duration,
        qos=args.qos,
        topic=args.topic or _DEFAULT_TOPICS[args.format],
        format=args.format,
        senml_cbor=args.senml_cbor,
        tags=parse_tags(args.tags),
        first_device=args.first_device,
        seed=args.seed,
        samples_per_message=args.samples_per_message,
        bad_ratio=args.bad_ratio,
        hostile_ratio=args.hostile_ratio,
        duplicate_ratio=args.duplicate_ratio,
        late_ratio=args.late_ratio,
        connections=args.connections,
        processes=args.processes,
        group_id=args.group_id,
        devices_per_node=args.devices_per_node,
    )


def _urls(given: list[str] | str | None) -> str:
    """``--mqtt-url`` repeated, or ``$INGEST_MQTT_URL``: one comma-separated list."""
    if isinstance(given, list):
        return ",".join(given)
    return given or DEFAULT_MQTT_URL


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
