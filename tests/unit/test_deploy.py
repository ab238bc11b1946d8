"""The deployment files, checked without Docker: docker-compose.yml, the Dockerfile, the broker
config the stack runs with, and the Grafana provisioning and dashboard.

Docker is not available where the tests run, so these read the files and check what a typo
would break silently: wiring between services (names, ports, credentials, mount paths), the
broker settings the delivery guarantee depends on, and dashboard SQL against the table contract.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROJECT_BROKER_CONF = ROOT / "config" / "mosquitto.conf"
DEPLOY_BROKER_CONF = ROOT / "deploy" / "mosquitto" / "mosquitto.conf"
GRAFANA = ROOT / "deploy" / "grafana"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "postgres.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "dashboards.yml"
DASHBOARD = GRAFANA / "dashboards" / "iot-ingest.json"
POSTGRES_INITDB = ROOT / "deploy" / "postgres" / "initdb"

# README "Configuration" (docs/design.md, Public contract): the names the daemon reads.
DOCUMENTED_ENV = frozenset(
    {
        "INGEST_DATABASE_URL",
        "INGEST_MQTT_URL",
        "INGEST_TOPIC",
        "INGEST_CLIENT_ID",
        "INGEST_SHARE_GROUP",
        "INGEST_METRICS_PORT",
        "INGEST_LOG_FORMAT",
        "INGEST_LOG_LEVEL",
    }
)
# Variables docker-compose.yml takes from the operator's environment (all have defaults).
COMPOSE_VARIABLES = frozenset(
    {"POSTGRES_PASSWORD", "GRAFANA_DB_PASSWORD", "GRAFANA_ADMIN_PASSWORD"}
)
SHUTDOWN_TIMEOUT_S = 30.0
METRICS_PORT = 9600

# README "Database schema" (docs/design.md, Public contract): what panels may use.
SCHEMA: dict[str, frozenset[str]] = {
    "readings": frozenset({"device_id", "metric", "ts", "value"}),
    "dead_letters": frozenset({"id", "received_at", "topic", "payload", "error", "reason"}),
    "devices": frozenset({"device_id", "first_seen", "last_seen", "last_ts"}),
    "latest_readings": frozenset({"device_id", "metric", "ts", "value"}),
    "readings_1m": frozenset({"device_id", "metric", "bucket", "n", "sum", "min", "max"}),
    "readings_fleet_1m": frozenset({"metric", "bucket", "n", "sum", "min", "max"}),
}
# Words the panel queries may use besides table and column names: a deliberately short list,
# so that a misspelt column fails here instead of in a browser.
SQL_WORDS = frozenset(
    {
        *("select", "from", "where", "and", "or", "not", "as", "in", "is", "null", "between"),
        *("group", "by", "order", "asc", "desc", "limit", "distinct", "interval", "now"),
        *("count", "sum", "min", "max", "avg", "coalesce", "nullif"),
        *("double", "precision", "bigint"),
    }
)
GRAFANA_MACROS = frozenset({"timeFilter", "timeGroupAlias"})

# --------------------------------------------------------------------------- helpers


def _load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path}: not a mapping"
    return data


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


_INTERPOLATION = re.compile(r"\$\$|\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)")


def _interpolate(value: str) -> str:
    """What compose makes of `value` with none of its variables set: the defaults."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        assert match.group(1) in COMPOSE_VARIABLES, f"unexpected variable in {value!r}"
        assert match.group(2) is not None, f"{match.group(0)} has no default"
        return match.group(2)

    return _INTERPOLATION.sub(replace, value)


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): _interpolate(str(v)) for k, v in env.items()}


def _published_ports(service: dict[str, Any]) -> set[int]:
    """Container ports of the short syntax: `[ip:][host:]container[/proto]`."""
    return {int(str(p).split("/")[0].rsplit(":", 1)[-1]) for p in service.get("ports", [])}


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each short-syntax volume entry."""
    return [(v.split(":")[0], v.split(":")[1]) for v in service.get("volumes", [])]


def _duration_s(text: str) -> float:
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _broker_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            settings.setdefault(key, []).append(value.strip())
    return settings


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _check_sql(sql: str, variables: set[str]) -> list[str]:
    """Problems with a panel query: unknown tables, columns, macros or dashboard variables."""
    problems: list[str] = []
    identifiers: set[str] = set()
    aliases: set[str] = set()

    def macro(match: re.Match[str]) -> str:
        if match.group(1) not in GRAFANA_MACROS:
            problems.append(f"unknown macro $__{match.group(1)}")
        identifiers.add(match.group(2).split(",")[0].strip().lower())
        if match.group(1) == "timeGroupAlias":
            aliases.add("time")
        return " "

    def variable(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            problems.append(f"unknown variable ${name}")
        return " "

    def alias(match: re.Match[str]) -> str:
        aliases.add(match.group(1).strip('"').lower())
        return " "

    text = re.sub(r"\$__(\w+)\(([^()]*)\)", macro, sql)
    text = re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", variable, text)
    text = re.sub(r"'(?:[^']|'')*'", " ", text)
    text = re.sub(r"\bAS\s+(\"[^\"]*\"|\w+)", alias, text, flags=re.IGNORECASE)
    text = re.sub(r'"(\w+)"', r"\1", text)
    if '"' in text:
        problems.append("quoted identifier that is not an alias")
    tables = {t.lower() for t in re.findall(r"\b(?:FROM|JOIN)\s+(\w+)", text, re.IGNORECASE)}
    if not tables:
        problems.append("no table")
    if unknown_tables := tables - SCHEMA.keys():
        problems.append(f"unknown tables {sorted(unknown_tables)}")
    columns = set().union(*(SCHEMA.get(t, frozenset()) for t in tables))
    identifiers |= {w.lower() for w in re.findall(r"\b[A-Za-z_]\w*", text)}
    if unknown := identifiers - SQL_WORDS - tables - aliases - columns:
        problems.append(f"unknown names {sorted(unknown)} (tables: {sorted(tables)})")
    return problems


# --------------------------------------------------------------------------- docker compose


def test_services_and_images(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {"mosquitto", "postgres", "ingest", "simulator", "grafana"}
    assert services["mosquitto"]["image"] == "eclipse-mosquitto:2"
    assert services["postgres"]["image"] == "postgres:16"
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    for name in ("ingest", "simulator"):
        assert services[name]["build"] == ".", name
    assert services["simulator"]["image"] == services["ingest"]["image"]


def test_published_ports(services: dict[str, dict[str, Any]]) -> None:
    assert _published_ports(services["mosquitto"]) == {1883}
    assert _published_ports(services["postgres"]) == {5432}
    assert _published_ports(services["ingest"]) == {METRICS_PORT}
    assert _published_ports(services["grafana"]) == {3000}


def test_data_lives_in_named_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    declared = set(compose["volumes"])
    expected = {
        "mosquitto": "/mosquitto/data",
        "postgres": "/var/lib/postgresql/data",
        "grafana": "/var/lib/grafana",
    }
    used: set[str] = set()
    for name, service in services.items():
        for source, target in _mounts(service):
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: bind mount of missing {source}"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
                assert expected.get(name) == target, f"{name}: {source} mounted at {target}"
    for name, target in expected.items():
        assert any(t == target and not s.startswith(".") for s, t in _mounts(services[name])), name
    assert used == declared


def test_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    for name in ("mosquitto", "postgres", "ingest", "grafana"):
        check = services[name]["healthcheck"]
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        for key in ("interval", "timeout"):
            _duration_s(check[key])
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    # `$$` is compose's escape for a literal `$`: a bare `$SYS` would be interpolated away.
    assert "$$SYS/broker/uptime" in services["mosquitto"]["healthcheck"]["test"]
    ingest_check = " ".join(services["ingest"]["healthcheck"]["test"])
    assert f"http://127.0.0.1:{METRICS_PORT}/healthz" in ingest_check
    assert _environment(services["ingest"])["INGEST_METRICS_PORT"] == str(METRICS_PORT)
    # The image's HEALTHCHECK asks the daemon's /healthz, which the simulator does not serve.
    assert services["simulator"]["healthcheck"] == {"disable": True}


def test_depends_on_healthy_services(services: dict[str, dict[str, Any]]) -> None:
    assert services["ingest"]["depends_on"] == {
        "mosquitto": {"condition": "service_healthy"},
        "postgres": {"condition": "service_healthy"},
    }
    assert services["simulator"]["depends_on"] == {"mosquitto": {"condition": "service_healthy"}}
    for name, service in services.items():
        for dependency, spec in service.get("depends_on", {}).items():
            assert spec["condition"] == "service_healthy", (name, dependency)
            assert "healthcheck" in services[dependency], (name, dependency)


def test_ingest_lifecycle(services: dict[str, dict[str, Any]]) -> None:
    ingest = services["ingest"]
    assert ingest["restart"] == "unless-stopped"
    # SIGKILL must not cut a drain short: give more than the daemon's shutdown timeout.
    assert _duration_s(ingest["stop_grace_period"]) > SHUTDOWN_TIMEOUT_S
    assert "entrypoint" not in ingest and "command" not in ingest  # the image's `ingest run`
    # The default ingest-<hostname> changes whenever the container is recreated.
    assert _environment(ingest)["INGEST_CLIENT_ID"]


def test_simulator_is_behind_a_profile(services: dict[str, dict[str, Any]]) -> None:
    simulator = services["simulator"]
    assert simulator["profiles"] == ["simulator"]
    assert simulator["entrypoint"] == ["simulate"]
    command = simulator["command"]
    mqtt_url = command[command.index("--mqtt-url") + 1]
    assert mqtt_url == _environment(services["ingest"])["INGEST_MQTT_URL"]
    assert command[command.index("--qos") + 1] == "1"
    others = {name for name, service in services.items() if "profiles" in service}
    assert others == {"simulator"}, "the other services must start with a plain `up`"


def test_environment_names_are_documented(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        used = {key for key in _environment(service) if key.startswith("INGEST_")}
        assert used <= DOCUMENTED_ENV, f"{name}: undocumented {sorted(used - DOCUMENTED_ENV)}"


def test_compose_variables_have_defaults() -> None:
    found = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text()))
    assert found <= COMPOSE_VARIABLES
    for match in re.finditer(r"\$\{(\w+)([^}]*)\}", COMPOSE.read_text()):
        assert match.group(2).startswith(":-"), f"{match.group(0)}: `up` must work without it"


def test_ingest_points_at_the_other_services(services: dict[str, dict[str, Any]]) -> None:
    env = _environment(services["ingest"])
    pg = _environment(services["postgres"])
    dsn = urlsplit(env["INGEST_DATABASE_URL"])
    assert dsn.scheme == "postgresql"
    assert (dsn.hostname, dsn.port) == ("postgres", 5432)
    assert dsn.username == pg["POSTGRES_USER"]
    assert dsn.password == pg["POSTGRES_PASSWORD"]
    assert dsn.path == "/" + pg["POSTGRES_DB"]
    mqtt = urlsplit(env["INGEST_MQTT_URL"])
    assert (mqtt.scheme, mqtt.hostname, mqtt.port) == ("mqtt", "mosquitto", 1883)
    assert _broker_settings(DEPLOY_BROKER_CONF)["listener"] == ["1883"]


# --------------------------------------------------------------------------- broker config


def test_compose_broker_runs_the_project_config(services: dict[str, dict[str, Any]]) -> None:
    """The container file adds only what the container needs and includes the project's file
    unchanged, so both brokers (compose, and tests/benchmarks) run the same settings."""
    project = _broker_settings(PROJECT_BROKER_CONF)
    deploy = _broker_settings(DEPLOY_BROKER_CONF)
    assert set(deploy) <= {"listener", "persistence_location", "log_dest", "include_dir"}
    assert not set(project) & set(deploy), "the container file overrides a project setting"
    for key in ("max_inflight_messages", "max_queued_messages", "persistence"):
        assert key in project, key
    assert project["persistence"] == ["true"]

    mounts = dict((target, source) for source, target in _mounts(services["mosquitto"]))
    assert mounts["/mosquitto/config/mosquitto.conf"] == "./deploy/mosquitto/mosquitto.conf"
    (include_dir,) = deploy["include_dir"]
    included = [
        source
        for target, source in mounts.items()
        if PurePosixPath(target).parent == PurePosixPath(include_dir) and target.endswith(".conf")
    ]
    assert included == ["./config/mosquitto.conf"]
    # Persistence is only as durable as the directory it writes to.
    (location,) = deploy["persistence_location"]
    assert mounts[location.rstrip("/")] == "mosquitto-data"


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile() -> None:
    instructions = _dockerfile_instructions()
    froms = [rest.split()[0] for keyword, rest in instructions if keyword == "FROM"]
    assert froms and all(image == "python:3.11-slim" for image in froms)
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    installs = [rest for keyword, rest in instructions if "pip install" in rest]
    assert installs and all(not re.search(r"install \S*\[", rest) for rest in installs)
    (healthcheck,) = [rest for keyword, rest in instructions if keyword == "HEALTHCHECK"]
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert command[0] == "python" and "/healthz" in command[-1] and "urllib" in command[-1]
    assert ("EXPOSE", str(METRICS_PORT)) in instructions
    assert ("ENTRYPOINT", '["ingest"]') in instructions
    assert ("CMD", '["run"]') in instructions


def test_docker_build_context_has_what_the_wheel_needs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    build = project["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = {project["project"]["readme"], *build["packages"], *build.get("force-include", {})}
    copied: set[str] = set()
    for keyword, rest in _dockerfile_instructions():
        if keyword == "COPY" and "--from" not in rest:
            copied.update(s.rstrip("/") for s in rest.split()[:-1])
    assert needed <= copied, f"not copied into the image: {sorted(needed - copied)}"
    allowed = {
        line.removeprefix("!").rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.startswith("!")
    }
    assert copied <= allowed, f".dockerignore hides {sorted(copied - allowed)}"


# --------------------------------------------------------------------------- Grafana


@pytest.fixture(scope="module")
def datasource() -> dict[str, Any]:
    config = _load_yaml(DATASOURCES)
    assert config["apiVersion"] == 1
    (source,) = config["datasources"]
    assert isinstance(source, dict)
    return source


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def test_datasource_reaches_the_database(
    datasource: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    assert datasource["type"] in ("grafana-postgresql-datasource", "postgres")
    assert datasource["uid"]
    assert datasource["url"] == "postgres:5432"
    assert datasource["jsonData"]["database"] == _environment(services["postgres"])["POSTGRES_DB"]
    # Read-only role from the initdb script; its password reaches both containers.
    assert datasource["user"] == "grafana_reader"
    initdb = "".join(p.read_text() for p in sorted(POSTGRES_INITDB.iterdir()))
    assert "CREATE ROLE grafana_reader" in initdb and "GRAFANA_DB_PASSWORD" in initdb
    assert datasource["secureJsonData"]["password"] == "${GRAFANA_DB_PASSWORD}"
    passwords = {_environment(services[s])["GRAFANA_DB_PASSWORD"] for s in ("postgres", "grafana")}
    assert len(passwords) == 1


def test_provisioning_is_mounted(services: dict[str, dict[str, Any]]) -> None:
    mounts = dict(_mounts(services["grafana"]))
    for kind in ("datasources", "dashboards"):
        source = f"./deploy/grafana/provisioning/{kind}"
        assert mounts[source] == f"/etc/grafana/provisioning/{kind}"
    config = _load_yaml(DASHBOARD_PROVIDERS)
    assert config["apiVersion"] == 1
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    home = _environment(services["grafana"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/" + DASHBOARD.name


def test_dashboard_structure(dashboard: dict[str, Any], datasource: dict[str, Any]) -> None:
    assert dashboard["uid"] and dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    refs = [panel["datasource"] for panel in panels]
    refs += [target["datasource"] for panel in panels for target in panel["targets"]]
    refs += [variable["datasource"] for variable in dashboard["templating"]["list"]]
    assert {ref["uid"] for ref in refs} == {datasource["uid"]}
    assert {ref["type"] for ref in refs} == {datasource["type"]}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["rawQuery"] is True and target["rawSql"].strip(), panel["title"]
            if panel["type"] == "timeseries":
                assert target["format"] == "time_series", panel["title"]
                assert "$__timeFilter(" in target["rawSql"], panel["title"]


def test_dashboard_has_the_panels_the_issue_asks_for(dashboard: dict[str, Any]) -> None:
    sql = {
        panel["title"]: " ".join(t["rawSql"] for t in panel["targets"])
        for panel in dashboard["panels"]
    }
    fleet = [t for t, q in sql.items() if "FROM devices" in q and "last_seen" in q]
    throughput = [t for t, q in sql.items() if "FROM readings_fleet_1m" in q and "sum(n)" in q]
    latest = [t for t, q in sql.items() if "FROM latest_readings" in q]
    one_device = [t for t, q in sql.items() if "${device" in q and "FROM readings_1m" in q]
    assert fleet and throughput and latest and one_device
    for title in one_device:
        assert '"sum" / n' in sql[title], "per-bucket average is sum / n"
    (variable,) = dashboard["templating"]["list"]
    assert variable["name"] == "device" and variable["type"] == "query"
    assert variable["query"] == "SELECT device_id FROM devices ORDER BY 1"


def test_dashboard_sql_uses_only_known_tables_and_columns(dashboard: dict[str, Any]) -> None:
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    queries = {f"variable {v['name']}": v["query"] for v in dashboard["templating"]["list"]}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            queries[f"panel {panel['id']} {target['refId']}"] = target["rawSql"]
    problems = {where: p for where, sql in queries.items() if (p := _check_sql(sql, variables))}
    assert not problems


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT count(*) FROM device",  # table
        "SELECT lastseen FROM devices",  # column
        "SELECT bucket FROM readings_1m WHERE $__timeFilter(ts)",  # macro column of another table
        "SELECT ts FROM readings WHERE device_id = ${dev:sqlstring}",  # variable
        "SELECT $__timeGroup(ts, '1m') FROM readings",  # macro
    ],
)
def test_sql_check_catches_mistakes(sql: str) -> None:
    assert _check_sql(sql, {"device"})
