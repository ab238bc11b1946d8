"""Routes: which topics a daemon takes, and in which payload format (docs/design.md, "Routes
and payload formats").

A route binds a topic template to a format. Templates are compiled once, at start-up; matching
a topic is a split and a few index look-ups, no regular expression:

- ``{name}`` matches one topic level; ``device_id`` names the device, ``metric`` the metric and
  any other name becomes a device tag (``{site}`` -> ``site=<level>``);
- a final ``{metric...}`` takes the rest of the topic, its levels joined with dots
  (``shellies/{device_id}/{metric...}`` on ``shellies/sh1/relay/0/power`` -> ``relay.0.power``);
- plain levels match literally; MQTT wildcards (``+``, a final ``#``) only in routes whose
  format names devices itself (``FormatSpec.names_devices``).

A table that cannot work (no device id, a placeholder cut in a level, an unknown format or
option) is a ``ConfigError`` naming the route, raised at start-up (exit 2).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol

from ingest.errors import ConfigError, DecodeError
from ingest.model import Decoded
from ingest.model import build as _build

if TYPE_CHECKING:
    from ingest.formats.limits import Limits
    from ingest.settings import Settings

__all__ = [
    "FormatSpec",
    "FormatState",
    "FormatTopics",
    "Match",
    "Route",
    "RouteTable",
    "Template",
    "parse_routes",
]

_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_REST: Final = "{metric...}"
_QOS: Final = (0, 1, 2)
_ROUTE_KEYS: Final = frozenset({"topic", "format", "qos", "tags"})


class Match(NamedTuple):
    """What a topic says: the device id (None where the format names devices itself), the
    metric (None without a ``{metric}`` level) and the tags of its named levels."""

    device_id: str | None
    metric: str | None
    tags: dict[str, str] | None


#: A format's decoder: (match, payload, receive time, route, limits) -> what to store.
Decoder = Callable[[Match, bytes, datetime, "Route", "Limits"], "Decoded | DecodeError"]


class FormatSpec(NamedTuple):
    """One payload format in the dispatch table (``ingest.formats.decode.FORMATS``)."""

    decode: Decoder
    #: Reads the route's ``[routes.<format>]`` table (``where`` names the route in errors).
    options: Callable[[Mapping[str, Any], str], Any]
    #: The payload names its devices (SenML, Sparkplug): no ``{device_id}`` needed, and MQTT
    #: wildcards allowed in the template.
    names_devices: bool = False
    #: The format's own topic matcher and subscription filters, from the route's template
    #: (``where`` names the route in errors); None: the template's.
    topics: Callable[[Template, str], FormatTopics] | None = None
    #: A route's state (Sparkplug's alias tables), made once per route table from the
    #: settings (None: the defaults) and handed to the decoder as ``route.state``.
    state: Callable[[Settings | None], FormatState] | None = None


class FormatTopics(NamedTuple):
    """A format's own topics: a matcher (it may put in ``Match.metric`` what its topic says
    beyond the device id, Sparkplug its message type) and ``(filter, shared)`` pairs: a filter
    not shared is subscribed without ``$share/<group>/``, so every worker gets its messages."""

    match: Callable[[str], Match | None]
    filters: tuple[tuple[str, bool], ...]


class FormatState(Protocol):
    """What the source asks of a route's state: messages it wants published (topic, payload,
    QoS 0), and a count of how that went."""

    def take_requests(self, now: float) -> list[tuple[str, bytes]]: ...

    def requests_sent(self, sent: int, failed: int) -> None: ...


class Template:
    """A compiled topic template; ``filter`` is its subscription filter."""

    __slots__ = (
        "_device",
        "_levels",
        "_literals",
        "_metric",
        "_rest",
        "_tags",
        "filter",
        "match",
        "text",
    )

    #: ``Match`` of a topic, or None: the general matcher, or a lean one for the common shape
    #: (fixed length, a device level, no other named level), chosen once here.
    match: Callable[[str], Match | None]

    def __init__(self, text: str, *, where: str, wildcards: bool = False) -> None:
        levels = _check_text(text, where)
        self.text = text
        self._levels = len(levels)
        self._rest = levels[-1] == _REST or levels[-1] == "#"
        literals: list[tuple[int, str]] = []
        named: dict[str, int] = {}
        parts: list[str] = []
        for i, level in enumerate(levels):
            parts.append(_compile_level(level, i, levels, named, literals, where, wildcards))
        if "metric" in named and _REST in levels:
            raise ConfigError(where, f"{text!r}: both {{metric}} and {{metric...}}")
        self.filter = "/".join(parts)
        self._literals = tuple(literals)
        self._device = named.pop("device_id", -1)
        self._metric = named.pop("metric", len(levels) - 1 if levels[-1] == _REST else -1)
        self._tags = tuple(named.items())
        simple = not self._rest and not self._tags and self._device >= 0
        self.match = self._match_device if simple else self._match_any

    @property
    def names_device(self) -> bool:
        return self._device >= 0

    def _match_device(self, topic: str) -> Match | None:
        parts = topic.split("/")
        if len(parts) != self._levels:
            return None
        for i, literal in self._literals:
            if parts[i] != literal:
                return None
        m = self._metric
        return _build(Match, (parts[self._device], parts[m] if m >= 0 else None, None))

    def _match_any(self, topic: str) -> Match | None:
        parts = topic.split("/")
        n = self._levels
        if len(parts) != n and not (self._rest and len(parts) >= n):
            return None
        for i, literal in self._literals:
            if parts[i] != literal:
                return None
        d = self._device
        m = self._metric
        if m < 0:
            metric = None
        elif self._rest and m == n - 1:
            metric = ".".join(parts[m:])
        else:
            metric = parts[m]
        tags = {name: parts[i] for name, i in self._tags} if self._tags else None
        return _build(Match, (parts[d] if d >= 0 else None, metric, tags))

    def __repr__(self) -> str:
        return f"Template({self.text!r})"


def _check_text(text: str, where: str) -> list[str]:
    if not text:
        raise ConfigError(where, "topic: must not be empty")
    if "\x00" in text:
        raise ConfigError(where, f"{text!r}: holds a NUL character")
    if text.startswith("$share/"):
        raise ConfigError(where, f"{text!r}: set INGEST_SHARE_GROUP instead of $share/")
    return text.split("/")


def _compile_level(
    level: str,
    i: int,
    levels: list[str],
    named: dict[str, int],
    literals: list[tuple[int, str]],
    where: str,
    wildcards: bool,
) -> str:
    """The filter level for one template level; records literals and named levels."""
    text = "/".join(levels)
    last = i == len(levels) - 1
    if level in ("+", "#"):
        if not wildcards:
            raise ConfigError(
                where, f"{text!r}: MQTT wildcards only where the format names devices itself;"
                " name the level with a placeholder ({device_id}, {site}, ...)",
            )  # fmt: skip
        if level == "#" and not last:
            raise ConfigError(where, f"{text!r}: # only as the last level")
        return level
    if "{" not in level and "}" not in level:
        if "+" in level or "#" in level:
            raise ConfigError(where, f"{text!r}: a wildcard must be a whole level: {level!r}")
        literals.append((i, level))
        return level
    if level == _REST:
        if not last:
            raise ConfigError(where, f"{text!r}: {{metric...}} only as the last level")
        return "#"
    name = level[1:-1]
    if not (level.startswith("{") and level.endswith("}") and _NAME.match(name)):
        raise ConfigError(
            where, f"{text!r}: a placeholder must be a whole level named like {{site}}, not"
            f" {level!r}",
        )  # fmt: skip
    if name in named:
        raise ConfigError(where, f"{text!r}: {{{name}}} appears more than once")
    named[name] = i
    return "+"


class Route:
    """One route: a compiled template, its format's decoder and options, its static tags."""

    __slots__ = (
        "checked_names",
        "decode",
        "filters",
        "format",
        "match",
        "name",
        "options",
        "qos",
        "state",
        "tags",
        "template",
    )

    # Metric names of this route already checked (length, control characters): devices send
    # the same few names over and over. Bounded by the decoders (cleared when full).
    checked_names: set[str]

    def __init__(
        self,
        name: str,
        template: Template,
        fmt: str,
        spec: FormatSpec,
        *,
        qos: int = 1,
        tags: Mapping[str, str] | None = None,
        options: Any = None,
        settings: Settings | None = None,
    ) -> None:
        self.name = name
        self.template = template
        self.format = fmt
        self.decode = spec.decode
        self.qos = qos
        self.tags = dict(tags) if tags else None
        self.options = options
        self.checked_names = set()
        #: (filter, shared) pairs and the topic matcher: the template's, or the format's own.
        self.filters: tuple[tuple[str, bool], ...] = ((template.filter, True),)
        self.match: Callable[[str], Match | None] = template.match
        if spec.topics is not None:
            self.match, self.filters = spec.topics(template, name)
        self.state: Any = spec.state(settings) if spec.state is not None else None

    def device_tags(self, match: Match) -> dict[str, str] | None:
        """The route's static tags with the topic's named levels over them, or None. A new
        dict each time (the decoders add tag fields to it)."""
        if self.tags is None:
            return dict(match.tags) if match.tags else None
        return {**self.tags, **match.tags} if match.tags else dict(self.tags)

    def __repr__(self) -> str:
        return f"Route({self.name}, {self.template.text!r}, {self.format})"


class RouteTable:
    """The routes in order: a message goes to the first whose template matches its topic."""

    __slots__ = ("matchers", "routes", "states")

    def __init__(self, routes: Sequence[Route]) -> None:
        if not routes:
            raise ConfigError("routes", "at least one route is needed")
        self.routes = tuple(routes)
        #: (bound match method, route) in order: what the dispatch runs per message.
        self.matchers = tuple((r.match, r) for r in self.routes)
        #: The routes' states, for the source (messages they want published, statistics).
        self.states: tuple[FormatState, ...] = tuple(
            r.state for r in self.routes if r.state is not None
        )

    def route(self, topic: str) -> tuple[Route, Match] | None:
        for route in self.routes:
            match = route.match(topic)
            if match is not None:
                return route, match
        return None

    def subscriptions(self, share_group: str | None = None) -> list[tuple[str, int]]:
        """(filter, qos) for every distinct filter, in route order (the highest QoS of the
        routes sharing a filter), prefixed with ``$share/<group>/`` when a group is set (but
        for the filters a format keeps unshared)."""
        prefix = f"$share/{share_group}/" if share_group else ""
        qos: dict[str, int] = {}
        for route in self.routes:
            for f, shared in route.filters:
                f = prefix + f if shared else f
                qos[f] = max(qos.get(f, 0), route.qos)
        return list(qos.items())

    @property
    def filters(self) -> str:
        """The filters, comma-separated (for log lines)."""
        return ", ".join(f for f, _ in self.subscriptions())


def parse_routes(
    raw: Any, formats: Mapping[str, FormatSpec], settings: Settings | None = None
) -> RouteTable:
    """A table from ``[[routes]]`` as TOML (or JSON) gives it: a list of tables. ``settings``
    size the routes' states (None: the defaults)."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError("routes", "must be a non-empty array of tables ([[routes]])")
    return RouteTable([_route(i, entry, formats, settings) for i, entry in enumerate(raw, 1)])


def _route(
    i: int, entry: Any, formats: Mapping[str, FormatSpec], settings: Settings | None
) -> Route:
    where = f"routes[{i}]"
    if not isinstance(entry, dict):
        raise ConfigError(where, "must be a table")
    topic = entry.get("topic")
    if not isinstance(topic, str):
        raise ConfigError(where, "topic: must be a string (the topic template)")
    where = f"routes[{i}] ({topic!r})"
    fmt = entry.get("format", "json")
    if fmt not in formats:
        raise ConfigError(where, f"format {fmt!r} is not one of {', '.join(formats)}")
    spec = formats[fmt]
    unknown = set(entry) - _ROUTE_KEYS - {fmt}
    if unknown:
        raise ConfigError(where, f"unknown key {sorted(unknown)[0]!r}")
    template = Template(topic, where=where, wildcards=spec.names_devices)
    if not spec.names_devices and not template.names_device:
        raise ConfigError(where, f"{topic!r}: no {{device_id}} level")
    qos = entry.get("qos", 1)
    if type(qos) is not int or qos not in _QOS:
        raise ConfigError(where, f"qos must be 0, 1 or 2, got {qos!r}")
    tags = entry.get("tags") or {}
    if not isinstance(tags, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
    ):
        raise ConfigError(where, "tags must be a table of strings")
    table = entry.get(fmt, {})
    if not isinstance(table, dict):
        raise ConfigError(where, f"[routes.{fmt}] must be a table")
    options = spec.options(table, where)
    return Route(where, template, fmt, spec, qos=qos, tags=tags, options=options, settings=settings)
