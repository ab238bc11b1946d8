"""Simulator settings: a frozen, keyword-only dataclass validated at construction.

Every check raises :class:`ConfigError` naming the flag, so the command line can print one
clear line and exit with status 2.
"""

from __future__ import annotations

import itertools
import math
import re
import secrets
from dataclasses import dataclass, field, replace

from ingest.urls import MqttEndpoint, UrlError, split_mqtt_urls
from ingest.urls import parse_mqtt_url as _parse_url
from simulators._errors import ConfigError
from simulators._mqtt import tls_context

DEFAULT_MQTT_URL = "mqtt://localhost:1883"
DEFAULT_TOPIC = "devices/{device_id}/telemetry"
#: The topic of the ``value`` format: one topic per metric (the seq too, so that an audit can
#: reconcile the fleet).
DEFAULT_VALUE_TOPIC = "devices/{device_id}/{metric}"
#: The topic of the ``senml`` format: a pack per message (the pack names the device too).
DEFAULT_SENML_TOPIC = "devices/{device_id}/senml"
DEVICE_PLACEHOLDER = "{device_id}"
METRIC_PLACEHOLDER = "{metric}"
#: Payload formats the simulator speaks (the daemon's route formats).
FORMATS = ("json", "value", "senml", "sparkplug")
#: ``--format sparkplug``: the group of the fleet's edge nodes, and devices per edge node.
DEFAULT_GROUP_ID = "sim"
DEFAULT_DEVICES_PER_NODE = 10
_TAG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

#: Tags of topic levels: (name, values), devices spread over the combinations.
Tags = tuple[tuple[str, tuple[str, ...]], ...]

#: Connections per process when ``--connections`` is not given: a few sockets carry
#: thousands of devices; more only help when one socket's round trips limit QoS 1.
CONNECTIONS_PER_PROCESS = 4

MAX_DEVICES = 10_000_000
MAX_RATE = 1_000_000.0
MAX_SAMPLES = 10_000
MAX_PROCESSES = 256


#: The broker the fleet publishes to: host, port, TLS, credentials and TLS files. The type and
#: its parser are the daemon's (ingest/urls.py), so a URL one accepts the other accepts too.
MqttUrl = MqttEndpoint


def parse_mqtt_url(value: str, *, setting: str = "--mqtt-url") -> MqttEndpoint:
    """Parse and validate a broker URL; ``setting`` names the flag or variable in errors."""
    try:
        return _parse_url(value)
    except UrlError as exc:  # its message never quotes the URL (it may hold a password)
        raise ConfigError(setting, str(exc)) from None


def parse_tags(items: list[str] | None) -> Tags:
    """``["site=a,b", "line=1,2"]`` -> ``(("site", ("a", "b")), ("line", ("1", "2")))``."""
    out: list[tuple[str, tuple[str, ...]]] = []
    for item in items or ():
        name, sep, values = item.partition("=")
        parts = tuple(values.split(","))
        if not sep or not _TAG_NAME.match(name) or not all(parts):
            raise ConfigError("--tags", f"expected NAME=VALUE[,VALUE...], got {item!r}")
        if any(name == n for n, _ in out) or name in ("device_id", "metric"):
            raise ConfigError("--tags", f"{name!r} given twice or reserved")
        if any(c in v for v in parts for c in "/+#\0"):
            raise ConfigError("--tags", f"{item!r}: a value must be one topic level")
        out.append((name, parts))
    return tuple(out)


def check_topic_template(
    template: str, *, setting: str = "--topic", fmt: str = "json", tags: Tags = ()
) -> str:
    """Validate a topic template: ``{device_id}`` names exactly one whole topic level,
    ``{metric}`` one too with ``--format value`` (and only then), and every other placeholder
    is a tag given by ``--tags`` (and every tag is in the template)."""
    levels = template.split("/")
    if levels.count(DEVICE_PLACEHOLDER) != 1:
        raise ConfigError(
            setting, f"{DEVICE_PLACEHOLDER} must name exactly one whole topic level in {template!r}"
        )
    wanted = 1 if fmt == "value" else 0
    if levels.count(METRIC_PLACEHOLDER) != wanted:
        raise ConfigError(
            setting, f"{METRIC_PLACEHOLDER} must name one whole level with --format value, and"
            f" appear only then (template {template!r}, format {fmt})",
        )  # fmt: skip
    named = {lv[1:-1] for lv in levels if lv.startswith("{") and lv.endswith("}")}
    named -= {"device_id", "metric"}
    given = {name for name, _ in tags}
    if named != given:
        missing = sorted(named - given) or sorted(given - named)
        raise ConfigError(
            "--tags", f"the levels {{name}} of {template!r} and --tags differ on {missing[0]!r}"
        )
    rest = "/".join(
        lv for lv in levels if not (lv.startswith("{") and lv.endswith("}") and lv[1:-1] in
        named | {"device_id", "metric"})
    )  # fmt: skip
    for bad in ("{", "}", "+", "#", "\0"):
        if bad in rest:
            raise ConfigError(setting, f"{bad!r} is not allowed in a topic template ({template!r})")
    if len(template.encode()) > 60_000:
        raise ConfigError(setting, "topic template too long")
    return template


def device_id(index: int) -> str:
    """The id of device ``index`` (0-based): ``dev-00001``, ... more digits past 99,999."""
    return f"dev-{index + 1:05d}"


def node_name(node: int) -> str:
    """The edge node id of Sparkplug node ``node`` (0-based): ``node-0001``, ..."""
    return f"node-{node + 1:04d}"


def _positive_int(setting: str, value: int, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise ConfigError(setting, f"must be an integer from 1 to {maximum:,} (got {value!r})")


def _finite(setting: str, value: float, low: float, high: float, *, open_low: bool) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and value <= high
    if not ok:
        bound = f"above {low:g}" if open_low else f"from {low:g}"
        raise ConfigError(setting, f"must be a number {bound} to {high:g} (got {value!r})")


@dataclass(frozen=True, kw_only=True, slots=True)
class SimulatorConfig:
    """What to simulate. Flags of the same name on the command line (``--samples-per-message``
    is ``samples_per_message``). ``connections`` defaults to ``min(devices, 4 x processes)``
    and ``seed`` to a random one (it is reported, so a run can be repeated).
    """

    #: One broker URL, or several separated by commas (``--mqtt-url`` repeated): device ``i``
    #: (0-based) publishes to broker ``i mod K``.
    mqtt_url: str = DEFAULT_MQTT_URL
    devices: int = 10
    rate: float = 1.0
    count: int | None = None
    duration: float | None = None
    qos: int = 1
    topic: str = DEFAULT_TOPIC
    #: ``json`` (a message per sample), ``value`` (a topic per metric, seq included) or
    #: ``senml`` (a SenML pack per message).
    format: str = "json"
    #: ``--format senml``: the packs in CBOR (RFC 8428 section 6) instead of JSON.
    senml_cbor: bool = False
    #: Topic levels named in ``topic`` (``{site}``), filled per device from these values.
    tags: Tags = ()
    #: The number of the first device (``dev-<first_device>``): fleets started side by side
    #: against one daemon keep apart.
    first_device: int = 1
    seed: int | None = None
    samples_per_message: int = 1
    bad_ratio: float = 0.0
    duplicate_ratio: float = 0.0
    late_ratio: float = 0.0
    #: Share of messages drawn from the hostile kinds (``_faults.HOSTILE_KINDS``).
    hostile_ratio: float = 0.0
    connections: int | None = None
    processes: int = 1
    #: ``--format sparkplug``: the Sparkplug group id, and how many devices an edge node has
    #: (each edge node is one connection: ``connections`` is the number of nodes).
    group_id: str = DEFAULT_GROUP_ID
    devices_per_node: int = DEFAULT_DEVICES_PER_NODE
    #: Bounded wait for outstanding acknowledgements (QoS 1) once the schedule is done.
    ack_timeout: float = 10.0
    #: How long the first connection of each socket may take (retries included).
    connect_timeout: float = 10.0
    #: Unacknowledged QoS 1 messages per connection.
    inflight_window: int = 1000
    #: MQTT keep-alive; a connection that owes us an answer for this long is dropped.
    keepalive: int = 30
    #: Broker credentials (they win over the URL's user info) and, for mqtts://, the CA that
    #: verifies the broker and our certificate and key for mutual TLS.
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    #: The brokers of ``mqtt_url``, in order; ``broker`` is the first.
    brokers: tuple[MqttUrl, ...] = field(init=False, repr=False, compare=False)
    broker: MqttUrl = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "brokers", self._brokers())
        object.__setattr__(self, "broker", self.brokers[0])
        _positive_int("--devices", self.devices, MAX_DEVICES)
        _finite("--rate", self.rate, 0.0, MAX_RATE, open_low=True)
        if self.count is not None and self.duration is not None:
            raise ConfigError("--count", "not allowed with --duration (choose one)")
        if self.count is not None:
            _positive_int("--count", self.count, 10**12)
        if self.duration is not None:
            _finite("--duration", self.duration, 0.0, 10.0**9, open_low=True)
        if self.qos not in (0, 1) or isinstance(self.qos, bool):
            raise ConfigError("--qos", f"must be 0 or 1 (got {self.qos!r})")
        _positive_int("--first-device", self.first_device, MAX_DEVICES)
        if self.format not in FORMATS:
            raise ConfigError("--format", f"must be one of {', '.join(FORMATS)}")
        if self.format == "sparkplug":
            self._check_sparkplug()
        else:
            check_topic_template(self.topic, fmt=self.format, tags=self.tags)
        if self.format == "value" and (
            self.samples_per_message > 1 or self.bad_ratio or self.hostile_ratio
        ):
            raise ConfigError(
                "--format", "value sends one sample per topic: no --samples-per-message above"
                " 1, --bad-ratio or --hostile-ratio",
            )  # fmt: skip
        if self.format == "senml" and (self.bad_ratio or self.hostile_ratio):
            raise ConfigError(
                "--format", "senml sends valid packs only: no --bad-ratio or --hostile-ratio"
            )
        if self.senml_cbor and self.format != "senml":
            raise ConfigError("--senml-cbor", "only with --format senml")
        if self.seed is None:
            object.__setattr__(self, "seed", secrets.randbits(32))
        elif isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError("--seed", f"must be a non-negative integer (got {self.seed!r})")
        _positive_int("--samples-per-message", self.samples_per_message, MAX_SAMPLES)
        for name, ratio in (
            ("--bad-ratio", self.bad_ratio),
            ("--duplicate-ratio", self.duplicate_ratio),
            ("--late-ratio", self.late_ratio),
            ("--hostile-ratio", self.hostile_ratio),
        ):
            _finite(name, ratio, 0.0, 1.0, open_low=False)
        _positive_int("--processes", self.processes, MAX_PROCESSES)
        if self.processes > self.devices:
            raise ConfigError(
                "--processes",
                f"{self.processes} processes for {self.devices} devices: "
                "every process needs at least one device",
            )
        if self.format == "sparkplug":
            pass  # one connection per edge node (_check_sparkplug)
        elif self.connections is None:
            object.__setattr__(
                self, "connections", min(self.devices, CONNECTIONS_PER_PROCESS * self.processes)
            )
        else:
            _positive_int("--connections", self.connections, self.devices)
            if self.connections < self.processes:
                raise ConfigError(
                    "--connections",
                    f"{self.connections} connections for {self.processes} processes: "
                    "every process needs at least one connection",
                )
        _finite("ack_timeout", self.ack_timeout, 0.0, 3600.0, open_low=False)
        _finite("connect_timeout", self.connect_timeout, 0.0, 3600.0, open_low=True)
        _positive_int("inflight_window", self.inflight_window, 65_000)
        _positive_int("keepalive", self.keepalive, 65_535)

    def _check_sparkplug(self) -> None:
        """The Sparkplug namespace fixes the topics; a node is a connection (its will)."""
        group = self.group_id
        if (
            not group
            or len(group) > 64
            or any(c in group for c in "/+#")
            or not group.isprintable()
        ):
            raise ConfigError(
                "--group-id", f"must be one topic level of printable characters (got {group!r})"
            )
        if self.topic not in (DEFAULT_TOPIC, self.sparkplug_topic) or self.tags:
            raise ConfigError(
                "--format", "sparkplug topics are spBv1.0/<group>/...: no --topic or --tags"
            )
        if self.samples_per_message > 1 or self.hostile_ratio:
            raise ConfigError(
                "--format", "sparkplug sends one sample per DDATA: no --samples-per-message above"
                " 1 or --hostile-ratio",
            )  # fmt: skip
        if len(self.brokers) > 1:
            raise ConfigError("--mqtt-url", "--format sparkplug takes one broker")
        _positive_int("--devices-per-node", self.devices_per_node, 10_000)
        nodes = self.nodes
        object.__setattr__(self, "topic", self.sparkplug_topic)
        if self.connections is not None and self.connections != nodes:
            raise ConfigError(
                "--connections", f"with --format sparkplug each of the {nodes} edge nodes has its"
                " own connection (set --devices-per-node instead)",
            )  # fmt: skip
        object.__setattr__(self, "connections", nodes)
        if self.processes > nodes:
            raise ConfigError(
                "--processes", f"{self.processes} processes for {nodes} edge nodes: every "
                "process needs at least one node",
            )  # fmt: skip

    @property
    def sparkplug_topic(self) -> str:
        """What a Sparkplug fleet publishes under (the report's ``topic``)."""
        return f"spBv1.0/{self.group_id}/#"

    @property
    def nodes(self) -> int:
        """Edge nodes of a Sparkplug fleet."""
        return -(-self.devices // self.devices_per_node)

    def _brokers(self) -> tuple[MqttEndpoint, ...]:
        """Each URL's endpoint with the credentials and TLS files; a broker given twice is
        an error (its devices would be counted against the other)."""
        try:
            urls = split_mqtt_urls(self.mqtt_url)
        except UrlError as exc:
            raise ConfigError("--mqtt-url", str(exc)) from None
        out: dict[str, MqttEndpoint] = {}
        for url in urls:
            endpoint = self._broker(url)
            if endpoint.name() in out:
                raise ConfigError("--mqtt-url", f"{endpoint.name()} is given twice")
            out[endpoint.name()] = endpoint
        return tuple(out.values())

    def _broker(self, text: str) -> MqttEndpoint:
        """The URL's endpoint with the credentials and TLS files; files are checked here so
        that an unreadable one is a configuration error before anything connects."""
        url = parse_mqtt_url(text)
        if self.username == "":
            raise ConfigError("--username", "must not be empty (leave it out instead)")
        username = url.username if self.username is None else self.username
        password = url.password if self.password is None else self.password
        if password is not None and username is None:
            raise ConfigError("--password-file", "needs a user name (--username or the URL's)")
        if self.key_file is not None and self.cert_file is None:
            raise ConfigError("--key-file", "needs --cert-file too")
        for flag, path in (
            ("--ca-file", self.ca_file),
            ("--cert-file", self.cert_file),
            ("--key-file", self.key_file),
        ):
            if path == "":
                raise ConfigError(flag, "must not be empty (leave it out instead)")
            if path is not None and not url.tls:
                # TLS files beside a plaintext URL: the operator expects TLS, never fall back.
                raise ConfigError(flag, "is set but the broker URL is plaintext (use mqtts://)")
        if url.tls:
            tls_context(self.ca_file, self.cert_file, self.key_file)
        return replace(
            url,
            username=username,
            password=password,
            ca_file=self.ca_file,
            cert_file=self.cert_file,
            key_file=self.key_file,
        )

    @property
    def target_rate(self) -> float:
        """Messages per second the whole fleet should publish (duplicates not included)."""
        return self.devices * self.rate

    @property
    def seed_value(self) -> int:
        assert self.seed is not None  # resolved in __post_init__
        return self.seed

    @property
    def connection_count(self) -> int:
        assert self.connections is not None  # resolved in __post_init__
        return self.connections

    def topic_of(self, index: int) -> str:
        """Device ``index``'s topic template: its id and its combination of ``tags`` filled
        in (devices take the combinations in turn); ``{metric}`` is left for the publisher."""
        topic = self.topic.replace(DEVICE_PLACEHOLDER, self.device_name(index))
        if not self.tags:
            return topic
        combos = list(itertools.product(*(values for _, values in self.tags)))
        for (name, _), value in zip(self.tags, combos[index % len(combos)], strict=True):
            topic = topic.replace(f"{{{name}}}", value)
        return topic

    def broker_of(self, index: int) -> int:
        """The broker (its position in ``brokers``) device ``index`` (0-based) publishes to."""
        return index % len(self.brokers)

    def device_name(self, index: int) -> str:
        """The id of device ``index`` (0-based) of this fleet; with ``--format sparkplug`` the
        daemon's, ``<group>/<node>/<device>``."""
        name = device_id(index + self.first_device - 1)
        if self.format == "sparkplug":
            return f"{self.group_id}/{node_name(index // self.devices_per_node)}/{name}"
        return name
