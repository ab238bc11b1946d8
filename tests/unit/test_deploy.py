"""The deployment files, checked without Docker: docker-compose.yml, the Dockerfile, the broker
config, ACL and setup script the stack runs with, the database's init script, and the Grafana
provisioning and dashboard.

Docker is not available where the tests run, so these read the files and check what a typo
would break silently: wiring between services (names, ports, credentials, mount paths), that
the stack is locked down (nothing published beyond loopback, no default password, TLS, logins
and ACL), the broker settings the delivery guarantee depends on, and dashboard SQL against the
table contract. The setup script itself runs here when openssl and mosquitto_passwd exist.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import subprocess
import tomllib
from dataclasses import fields
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from ingest.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROJECT_BROKER_CONF = ROOT / "config" / "mosquitto.conf"
DEPLOY_BROKER_CONF = ROOT / "deploy" / "mosquitto" / "mosquitto.conf"
BROKER_ACL = ROOT / "deploy" / "mosquitto" / "acl"
SETUP_SCRIPT = ROOT / "deploy" / "setup" / "setup.sh"
ENV_EXAMPLE = ROOT / "deploy" / "env.example"
GRAFANA = ROOT / "deploy" / "grafana"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "postgres.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "dashboards.yml"
DASHBOARD = GRAFANA / "dashboards" / "iot-ingest.json"
POSTGRES_INITDB = ROOT / "deploy" / "postgres" / "initdb"

# The names the daemon reads: those its settings document (README "Configuration"), plus the
# libpq variables asyncpg reads as libpq does.
DOCUMENTED_ENV = frozenset(str(f.metadata["env"]) for f in fields(Settings))
LIBPQ_ENV = frozenset({"PGUSER", "PGPASSWORD"})
# Variables docker-compose.yml takes from the operator's environment: all required, no default.
COMPOSE_VARIABLES = frozenset(
    {
        "POSTGRES_PASSWORD",
        "INGEST_DB_PASSWORD",
        "GRAFANA_DB_PASSWORD",
        "GRAFANA_ADMIN_PASSWORD",
        "MQTT_INGEST_PASSWORD",
        "MQTT_DEVICE_PASSWORD",
    }
)
ONE_SHOT = frozenset({"setup", "migrate"})
SHUTDOWN_TIMEOUT_S = 30.0
METRICS_PORT = 9600
MQTT_PLAIN, MQTT_TLS = 1883, 8883

# README "Database schema" (docs/design.md, Public contract): what panels may use. Grafana
# reads as an ingest_reader login, which may not read dead_letters (payloads a device sent):
# its panels count dead letters through dead_letters_summary.
SCHEMA: dict[str, frozenset[str]] = {
    "readings": frozenset({"device_id", "metric", "ts", "value"}),
    "dead_letters_summary": frozenset(
        {"id", "received_at", "topic", "error", "reason", "payload_size"}
    ),
    "text_readings": frozenset({"device_id", "metric", "ts", "value"}),
    "devices": frozenset(
        {"device_id", "first_seen", "last_seen", "last_ts", "tags", "status", "status_at"}
    ),
    "latest_readings": frozenset({"device_id", "metric", "ts", "value"}),
    "latest_text": frozenset({"device_id", "metric", "ts", "value"}),
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


_INTERPOLATION = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")


def _interpolate(value: str) -> str:
    """What compose makes of `value` with every variable set: `<NAME>` stands for the value of
    variable NAME, so two places that must agree can be compared."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        assert name in COMPOSE_VARIABLES, f"unexpected variable in {value!r}"
        assert match.group(2) == ":?", f"{match.group(0)}: must be required (${{{name}:?...}})"
        return f"<{name}>"

    return _INTERPOLATION.sub(replace, value)


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): _interpolate(str(v)) for k, v in env.items()}


def _ports(service: dict[str, Any]) -> list[tuple[str | None, int, int]]:
    """(host ip, host port, container port) of each short-syntax port: `[ip:]host:container`."""
    out = []
    for spec in service.get("ports", []):
        parts = str(spec).split("/")[0].split(":")
        assert len(parts) in (2, 3), f"{spec}: give the host port (and the address)"
        ip = parts[0] if len(parts) == 3 else None
        out.append((ip, int(parts[-2]), int(parts[-1])))
    return out


def _published_ports(service: dict[str, Any]) -> set[int]:
    return {container for _, _, container in _ports(service)}


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each short-syntax volume entry."""
    return [(v.split(":")[0], v.split(":")[1]) for v in service.get("volumes", [])]


def _mount_of(service: dict[str, Any], path: str) -> str:
    """The source mounted at the directory holding `path` in the container."""
    for source, target in _mounts(service):
        if PurePosixPath(path).parent == PurePosixPath(target) or path == target:
            return source
    raise AssertionError(f"nothing mounted for {path}")


def _duration_s(text: str) -> float:
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _broker_lines(path: Path) -> list[tuple[str, str]]:
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out.append((key, value.strip()))
    return out


def _broker_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for key, value in _broker_lines(path):
        settings.setdefault(key, []).append(value)
    return settings


def _acl() -> dict[str, list[str]]:
    """user -> its `topic` rules; rules before any `user` line would apply to everyone."""
    rules: dict[str, list[str]] = {}
    user = None
    for key, value in _broker_lines(BROKER_ACL):
        assert key in ("user", "topic"), f"acl: {key} {value} (no patterns: each login named)"
        if key == "user":
            user = value
            rules.setdefault(user, [])
        else:
            assert user is not None, f"acl: `topic {value}` applies to anonymous clients"
            rules[user].append(value)
    return rules


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
    assert set(services) == {
        "setup", "mosquitto", "postgres", "migrate", "ingest", "simulator", "grafana",
    }  # fmt: skip
    assert services["mosquitto"]["image"] == "eclipse-mosquitto:2"
    assert services["postgres"]["image"] == "postgres:16"
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    for name in ("migrate", "ingest", "simulator"):
        assert services[name]["build"] == ".", name
        assert services[name]["image"] == services["ingest"]["image"]
    assert services["setup"]["build"] == "./deploy/setup"
    setup_dockerfile = (ROOT / "deploy" / "setup" / "Dockerfile").read_text()
    assert "FROM eclipse-mosquitto:2" in setup_dockerfile and "openssl" in setup_dockerfile
    assert "setup.sh" in setup_dockerfile


def test_published_ports(services: dict[str, dict[str, Any]]) -> None:
    assert _published_ports(services["mosquitto"]) == {MQTT_TLS}  # plaintext stays inside
    assert _published_ports(services["postgres"]) == {5432}
    assert _published_ports(services["ingest"]) == {METRICS_PORT}
    assert _published_ports(services["grafana"]) == {3000}
    for name in ("setup", "migrate", "simulator"):
        assert not _published_ports(services[name]), name


def test_every_published_port_is_on_loopback(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for ip, _, container in _ports(service):
            assert ip == "127.0.0.1", f"{name}: port {container} published on {ip or 'every'}"
        assert "network_mode" not in service, name  # host networking would bypass all this


def test_data_lives_in_named_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    declared = set(compose["volumes"])
    expected = {
        ("mosquitto", "mosquitto-data"): "/mosquitto/data",
        ("mosquitto", "mosquitto-auth"): "/mosquitto/auth",
        ("mosquitto", "tls-mosquitto"): "/mosquitto/tls",
        ("setup", "mosquitto-auth"): "/mosquitto-auth",
        ("setup", "tls-ca-private"): "/pki/ca-private",
        ("setup", "tls-ca"): "/pki/ca",
        ("setup", "tls-mosquitto"): "/pki/mosquitto",
        ("setup", "tls-postgres"): "/pki/postgres",
        ("postgres", "postgres-data"): "/var/lib/postgresql/data",
        ("postgres", "tls-postgres"): "/tls",
        ("migrate", "tls-ca"): "/tls",
        ("ingest", "tls-ca"): "/tls",
        ("grafana", "grafana-data"): "/var/lib/grafana",
        ("grafana", "tls-ca"): "/etc/grafana/tls",
    }
    used = set()
    for name, service in services.items():
        for entry in service.get("volumes", []):
            source, target = entry.split(":")[:2]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: bind mount of missing {source}"
                assert entry.endswith(":ro"), f"{name}: {source} must be read-only"
                continue
            assert source in declared, f"{name}: volume {source} is not declared"
            assert expected.get((name, source)) == target, f"{name}: {source} at {target}"
            # Only the setup service writes keys and passwords; only the data volumes are
            # written by their own service.
            writable = name == "setup" or source.endswith("-data")
            assert entry.endswith(":ro") != writable, f"{name}: {entry}"
            used.add((name, source))
    assert used == set(expected)
    assert {volume for _, volume in expected} == declared


def test_the_ca_key_never_leaves_setup(services: dict[str, dict[str, Any]]) -> None:
    holders = {n for n, s in services.items() for src, _ in _mounts(s) if src == "tls-ca-private"}
    assert holders == {"setup"}
    for server in ("mosquitto", "postgres"):
        holders = {
            n for n, s in services.items() for src, _ in _mounts(s) if src == f"tls-{server}"
        }
        assert holders == {"setup", server}, f"{server}'s key is mounted elsewhere"


def test_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    for name in ("mosquitto", "postgres", "ingest", "grafana"):
        check = services[name]["healthcheck"]
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        for key in ("interval", "timeout"):
            _duration_s(check[key])
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    # `$$` is compose's escape for a literal `$`: a bare `$SYS` would be interpolated away.
    broker_check = " ".join(services["mosquitto"]["healthcheck"]["test"])
    assert "'$$SYS/broker/uptime'" in broker_check
    assert "-u health" in broker_check and "$$(cat /mosquitto/auth/health.pw)" in broker_check
    assert f"-p {MQTT_PLAIN}" in broker_check
    ingest_check = " ".join(services["ingest"]["healthcheck"]["test"])
    assert f"http://127.0.0.1:{METRICS_PORT}/healthz" in ingest_check
    assert _environment(services["ingest"])["INGEST_METRICS_PORT"] == str(METRICS_PORT)
    # The image's HEALTHCHECK asks the daemon's /healthz, which these do not serve.
    for name in ("simulator", "migrate"):
        assert services[name]["healthcheck"] == {"disable": True}, name


def test_depends_on(services: dict[str, dict[str, Any]]) -> None:
    assert services["ingest"]["depends_on"] == {
        "mosquitto": {"condition": "service_healthy"},
        "postgres": {"condition": "service_healthy"},
        "migrate": {"condition": "service_completed_successfully"},
    }
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for server in ("mosquitto", "postgres"):
        assert services[server]["depends_on"] == {
            "setup": {"condition": "service_completed_successfully"}
        }
    assert services["simulator"]["depends_on"] == {"mosquitto": {"condition": "service_healthy"}}
    for name, service in services.items():
        for dependency, spec in service.get("depends_on", {}).items():
            if dependency in ONE_SHOT:
                assert spec["condition"] == "service_completed_successfully", (name, dependency)
                assert services[dependency]["restart"] == "no", dependency
            else:
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
    assert services["migrate"]["command"] == ["migrate"]


def test_simulator_is_behind_a_profile(services: dict[str, dict[str, Any]]) -> None:
    simulator = services["simulator"]
    assert simulator["profiles"] == ["simulator"]
    assert simulator["entrypoint"] == ["simulate"]
    command = simulator["command"]
    url = urlsplit(_interpolate(command[command.index("--mqtt-url") + 1]))
    # The compose network's plaintext listener, as the devices' login.
    assert (url.scheme, url.hostname, url.port) == ("mqtt", "mosquitto", MQTT_PLAIN)
    assert (url.username, url.password) == ("devices", "<MQTT_DEVICE_PASSWORD>")
    assert command[command.index("--qos") + 1] == "1"
    others = {name for name, service in services.items() if "profiles" in service}
    assert others == {"simulator"}, "the other services must start with a plain `up`"


def test_environment_names_are_documented(services: dict[str, dict[str, Any]]) -> None:
    for name in ("migrate", "ingest", "simulator"):
        used = {key for key in _environment(services[name]) if key.startswith(("INGEST_", "PG"))}
        unknown = used - DOCUMENTED_ENV - LIBPQ_ENV
        assert not unknown, f"{name}: undocumented {sorted(unknown)}"


def test_no_default_passwords() -> None:
    """Every variable is required (`${NAME:?message}`): `up` fails with the message instead of
    starting with a password anyone can read here."""
    text = COMPOSE.read_text()
    found = set(re.findall(r"\$\{(\w+)", text))
    assert found == COMPOSE_VARIABLES
    for match in re.finditer(r"\$\{(\w+)([^}]*)\}", text):
        assert match.group(2).startswith(":?"), f"{match.group(0)}: must be required"
    assert not re.search(r"(?i)password[\w\"']*:\s*['\"]?(?!\$\{)\w", text), "a literal password"
    example = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if "=" in line[:40] and not line.startswith("#")
    )
    assert set(example) == COMPOSE_VARIABLES and not any(example.values())
    for path in ROOT.joinpath("deploy").rglob("*"):
        if path.is_file() and path.suffix in ("", ".sh", ".yml", ".conf", ".example"):
            assert "admin/admin" not in path.read_text(errors="replace"), path


def test_grafana_admin_password_is_required(services: dict[str, dict[str, Any]]) -> None:
    env = _environment(services["grafana"])
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == "<GRAFANA_ADMIN_PASSWORD>"
    assert env["GF_USERS_ALLOW_SIGN_UP"] == "false"


def test_ingest_points_at_the_other_services(services: dict[str, dict[str, Any]]) -> None:
    ingest = services["ingest"]
    env = _environment(ingest)
    pg = _environment(services["postgres"])
    dsn = urlsplit(env["INGEST_DATABASE_URL"])
    assert dsn.scheme == "postgresql"
    assert (dsn.hostname, dsn.port) == ("postgres", 5432)
    assert dsn.username is None and dsn.password is None  # PGUSER / PGPASSWORD, as libpq
    assert dsn.path == "/" + pg["POSTGRES_DB"]
    query = {k: v[0] for k, v in parse_qs(dsn.query).items()}
    assert query["sslmode"] == "verify-full"
    assert _mount_of(ingest, query["sslrootcert"]) == "tls-ca"
    # Not the owner of the tables: a login that is a member of ingest_writer.
    assert env["PGUSER"] == "ingest_daemon" != pg["POSTGRES_USER"]
    assert env["PGPASSWORD"] == pg["INGEST_DB_PASSWORD"] == "<INGEST_DB_PASSWORD>"
    assert env["INGEST_MIGRATE"] == "false"
    migrate = _environment(services["migrate"])
    assert migrate["INGEST_DATABASE_URL"] == env["INGEST_DATABASE_URL"]
    assert migrate["PGUSER"] == pg["POSTGRES_USER"]
    assert migrate["PGPASSWORD"] == pg["POSTGRES_PASSWORD"]

    mqtt = urlsplit(env["INGEST_MQTT_URL"])
    assert (mqtt.scheme, mqtt.hostname, mqtt.port) == ("mqtts", "mosquitto", MQTT_TLS)
    assert mqtt.username is None and mqtt.password is None
    assert env["INGEST_MQTT_USERNAME"] == "ingest"
    assert env["INGEST_MQTT_PASSWORD"] == "<MQTT_INGEST_PASSWORD>"
    assert _mount_of(ingest, env["INGEST_MQTT_CA_FILE"]) == "tls-ca"
    setup = _environment(services["setup"])
    assert setup["MQTT_INGEST_PASSWORD"] == env["INGEST_MQTT_PASSWORD"]
    assert env["INGEST_METRICS_HOST"] == "0.0.0.0"  # inside; published on loopback only


def test_postgres_speaks_tls_only(services: dict[str, dict[str, Any]]) -> None:
    postgres = services["postgres"]
    options = dict(item.split("=", 1) for item in postgres["command"] if "=" in item)
    assert postgres["command"][0] == "postgres"
    assert options["ssl"] == "on"
    for key in ("ssl_cert_file", "ssl_key_file"):
        assert _mount_of(postgres, options[key]) == "tls-postgres"
    initdb = "".join(p.read_text() for p in sorted(POSTGRES_INITDB.iterdir()))
    assert "hostssl" in initdb and "pg_hba.conf" in initdb


def test_database_logins_are_members_of_the_least_privilege_roles() -> None:
    initdb = " ".join("".join(p.read_text() for p in sorted(POSTGRES_INITDB.iterdir())).split())
    assert "CREATE ROLE ingest_daemon LOGIN" in initdb
    assert re.search(r"CREATE ROLE ingest_daemon LOGIN [^;]* IN ROLE ingest_writer;", initdb)
    assert re.search(r"CREATE ROLE grafana_reader LOGIN [^;]* IN ROLE ingest_reader;", initdb)
    assert "ALTER ROLE grafana_reader SET default_transaction_read_only = on" in initdb
    # Nothing granted directly: the privileges are those `ingest migrate` gives the roles.
    assert not re.search(r"(?i)\bGRANT\s+\w+(\s*,\s*\w+)*\s+ON\b", initdb)
    for variable in ("INGEST_DB_PASSWORD", "GRAFANA_DB_PASSWORD"):
        assert f"${{{variable}:?" in initdb, f"{variable}: must be required"
    assert "SUPERUSER" not in initdb and "CREATEROLE" not in initdb


# --------------------------------------------------------------------------- broker config


def test_compose_broker_runs_the_project_config(services: dict[str, dict[str, Any]]) -> None:
    """The container file adds only what the container needs, and the lock-down, and includes
    the project's file unchanged, so both brokers (compose, and tests/benchmarks) run the same
    delivery settings."""
    project = _broker_settings(PROJECT_BROKER_CONF)
    deploy = _broker_settings(DEPLOY_BROKER_CONF)
    assert set(deploy) <= {
        "listener", "persistence_location", "log_dest", "include_dir", "cafile", "certfile",
        "keyfile", "tls_version", "allow_anonymous", "password_file", "acl_file",
    }  # fmt: skip
    assert set(project) & set(deploy) <= {"allow_anonymous"}, "overrides a project setting"
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


def test_compose_broker_requires_logins_and_tls(services: dict[str, dict[str, Any]]) -> None:
    lines = _broker_lines(DEPLOY_BROKER_CONF)
    keys = [key for key, _ in lines]
    # Later lines win: the lock-down must come after the project's `allow_anonymous true`.
    assert ("allow_anonymous", "false") in lines
    assert keys.index("allow_anonymous") > keys.index("include_dir")
    assert _broker_settings(DEPLOY_BROKER_CONF)["listener"] == [str(MQTT_PLAIN), str(MQTT_TLS)]
    tls_block = keys[keys.index("listener", keys.index("listener") + 1) :]
    for key in ("cafile", "certfile", "keyfile", "tls_version"):
        assert key in tls_block, f"{key} must follow `listener {MQTT_TLS}`"
    settings = _broker_settings(DEPLOY_BROKER_CONF)
    mosquitto = services["mosquitto"]
    for key in ("cafile", "certfile", "keyfile"):
        assert _mount_of(mosquitto, settings[key][0]) == "tls-mosquitto", key
    assert _mount_of(mosquitto, settings["password_file"][0]) == "mosquitto-auth"
    (acl_file,) = settings["acl_file"]
    assert dict((t, s) for s, t in _mounts(mosquitto))[acl_file] == "./deploy/mosquitto/acl"


def test_acl_devices_publish_only_under_devices_and_only_the_daemon_reads() -> None:
    acl = _acl()
    assert acl == {
        "ingest": ["read devices/#"],
        "devices": ["write devices/#"],
        "health": ["read $SYS/broker/uptime"],
    }
    setup = SETUP_SCRIPT.read_text()
    for user in acl:  # every login the setup script makes has its rules, and no other login
        assert f'mosquitto_passwd -b "$new" {user} ' in setup, user
    assert len(re.findall(r"mosquitto_passwd -b", setup)) == len(acl)


# --------------------------------------------------------------------------- setup script


def _run_setup(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    dirs = {
        "CA_PRIVATE": tmp_path / "ca-private",
        "CA_PUBLIC": tmp_path / "ca",
        "MOSQUITTO_TLS": tmp_path / "mosquitto",
        "POSTGRES_TLS": tmp_path / "postgres",
        "MOSQUITTO_AUTH": tmp_path / "auth",
    }
    return subprocess.run(
        ["sh", str(SETUP_SCRIPT)],
        env={"PATH": os.environ["PATH"], **{k: str(v) for k, v in dirs.items()}, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


needs_tools = pytest.mark.skipif(
    not (shutil.which("openssl") and shutil.which("mosquitto_passwd")),
    reason="openssl and mosquitto_passwd are needed to run deploy/setup/setup.sh",
)


@needs_tools
def test_setup_makes_certificates_that_verify_the_servers_names(tmp_path: Path) -> None:
    done = _run_setup(tmp_path, MQTT_INGEST_PASSWORD="pw-ingest", MQTT_DEVICE_PASSWORD="pw-dev")
    assert done.returncode == 0, done.stderr
    ca = tmp_path / "ca" / "ca.crt"
    context = ssl.create_default_context(cafile=str(ca))
    for server, names in (("mosquitto", ["mosquitto", "localhost"]), ("postgres", ["postgres"])):
        cert = tmp_path / server / "server.crt"
        assert (tmp_path / server / "ca.crt").read_bytes() == ca.read_bytes()
        assert (tmp_path / server / "server.key").stat().st_mode & 0o077 == 0
        text = subprocess.run(
            ["openssl", "x509", "-in", str(cert), "-noout", "-ext", "subjectAltName"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        for name in names:
            assert f"DNS:{name}" in text, (server, name)
        verified = subprocess.run(
            ["openssl", "verify", "-CAfile", str(ca), "-x509_strict", str(cert)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert verified.returncode == 0, verified.stdout + verified.stderr
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert (tmp_path / "ca-private" / "ca.key").exists()
    assert not (tmp_path / "ca" / "ca.key").exists()
    passwd = (tmp_path / "auth" / "passwd").read_text()
    assert [line.split(":")[0] for line in passwd.splitlines()] == ["ingest", "devices", "health"]
    assert "pw-ingest" not in passwd and "pw-dev" not in passwd  # hashed
    # A second run keeps the certificates and rewrites the passwords.
    before = (tmp_path / "mosquitto" / "server.crt").read_bytes()
    again = _run_setup(tmp_path, MQTT_INGEST_PASSWORD="new", MQTT_DEVICE_PASSWORD="pw-dev")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "mosquitto" / "server.crt").read_bytes() == before
    assert (tmp_path / "auth" / "passwd").read_text() != passwd


@needs_tools
def test_setup_refuses_to_run_without_passwords(tmp_path: Path) -> None:
    done = _run_setup(tmp_path, MQTT_INGEST_PASSWORD="x")
    assert done.returncode != 0
    assert "MQTT_DEVICE_PASSWORD" in done.stderr
    assert not (tmp_path / "auth" / "passwd").exists()


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
    # The daemon binds loopback unless told otherwise; in a container that would be unreachable.
    env = " ".join(rest for keyword, rest in instructions if keyword == "ENV").split()
    assert "INGEST_METRICS_HOST=0.0.0.0" in env
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
    # The read-only login from the initdb script; its password reaches both containers.
    assert datasource["user"] == "grafana_reader"
    initdb = "".join(p.read_text() for p in sorted(POSTGRES_INITDB.iterdir()))
    assert "CREATE ROLE grafana_reader LOGIN" in initdb and "GRAFANA_DB_PASSWORD" in initdb
    assert datasource["secureJsonData"]["password"] == "${GRAFANA_DB_PASSWORD}"
    passwords = {_environment(services[s])["GRAFANA_DB_PASSWORD"] for s in ("postgres", "grafana")}
    assert passwords == {"<GRAFANA_DB_PASSWORD>"}
    # TLS with the certificate and the host name verified, against the stack's CA.
    tls = datasource["jsonData"]
    assert tls["sslmode"] == "verify-full"
    assert tls["tlsConfigurationMethod"] == "file-path"
    assert _mount_of(services["grafana"], tls["sslRootCertFile"]) == "tls-ca"


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
