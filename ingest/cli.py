"""``ingest``: the command line (``run``, ``migrate``; operator tools come with their issues).

Configuration errors exit with status 2 and one line naming the bad setting, no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import MISSING, fields
from typing import Any

from ingest._version import __version__
from ingest.errors import ConfigError, IngestError
from ingest.logs import configure_logging
from ingest.settings import Settings, load_settings

__all__ = ["main"]

EXIT_CONFIG = 2

_HELP: dict[str, str] = {
    "database_url": "PostgreSQL DSN postgresql://user:pass@host:port/db (default: libpq PG* env)",
    "mqtt_url": "broker URL mqtt://[user:pass@]host[:port] or mqtts://...",
    "mqtt_protocol": "MQTT protocol version: 3.1.1 (default, ~2x faster here) or 5",
    "topic": "topic template; {device_id} (and optionally {metric}) name one level",
    "client_id": "MQTT client id; stable, it names the persistent session",
    "share_group": "subscribe as $share/<group>/<filter> (several instances share the load)",
    "mqtt_keepalive": "MQTT keepalive in seconds (how fast a dead broker link is noticed)",
    "mqtt_inflight": "unacknowledged messages the broker may have in flight to us "
    "(v5 Receive Maximum; should match the broker's max_inflight_messages)",
    "mqtt_session_expiry": "v5: seconds the broker keeps the session while we are away",
    "channel_capacity": "messages buffered between source and batcher (backpressure bound)",
    "batch_max_rows": "rows per database transaction at most",
    "batch_max_delay": "seconds a batch may wait for more messages before it is written",
    "db_pool_size": "database connections; up to this many batches are written at once",
    "db_connect_timeout": "seconds to wait for a database connection",
    "db_write_timeout": "seconds one batch write may take before its connection is "
    "considered dead (a blackholed server sends no reset)",
    "retry_max_delay": "longest backoff between retries, seconds",
    "shutdown_timeout": "seconds to drain on SIGTERM/SIGINT before giving up (exit 1)",
    "stats_interval": "seconds between stats log lines",
    "metrics_port": "port for /metrics, /healthz, /readyz (0 disables)",
    "metrics_host": "address the metrics server listens on",
    "ready_max_lag": "receive-to-commit lag in seconds above which /readyz reports not ready",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "log_format": "auto (text on a terminal, JSON lines otherwise), json or text",
    "migrate": "apply pending migrations at start",
    "workers": "worker processes sharing one subscription (client ids <client_id>-<i>, "
    "shared group INGEST_SHARE_GROUP or the client id); the parent supervises them",
    "worker_id": "set by the supervisor for each worker (its metrics' worker label)",
    # Dashboard database (ingest/db/partitions.py, ingest/db/dashboard.py)
    "retention": "how long raw readings are kept, e.g. 30d, 12w, 36h (whole daily partitions "
    "are dropped; default: forever)",
    "rollup_retention": "how long the one-minute rollups (readings_1m) are kept, at least "
    "the retention (monthly partitions; default: forever)",
    "partition_days_ahead": "days of readings partitions created ahead of time",
    "dashboard_interval": "seconds between two folds of new batches into the dashboard "
    "tables (how far dashboards lag behind)",
}


def _add_settings_flags(parser: argparse.ArgumentParser, only: set[str] | None = None) -> None:
    for f in fields(Settings):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        env = f.metadata["env"]
        default = f.default if f.default is not MISSING else "(computed)"
        help_text = f"{_HELP.get(f.name, '')} [env {env}; default {default}]"
        if str(f.type) == "bool":
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                help=help_text,
            )  # fmt: skip
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar="VALUE", help=help_text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ingest",
        description="MQTT -> PostgreSQL sensor ingestion: at-least-once from the broker, "
        "exactly-once rows in the database.",
        epilog="Settings: flags override INGEST_* environment variables, which override the "
        "--config TOML file. Exit status: 0 clean, 1 failure or shutdown timeout, 2 bad "
        "configuration.",
    )
    parser.add_argument("--version", action="version", version=f"iot-ingest {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the ingestion daemon",
        description="Run the daemon: migrate, subscribe, batch, write, acknowledge after "
        "commit. SIGTERM/SIGINT drain; a second SIGINT forces.",
    )
    run.add_argument("--config", metavar="FILE", help="TOML file with settings ([ingest] table)")
    _add_settings_flags(run)

    migrate = sub.add_parser(
        "migrate",
        help="apply pending database migrations and exit",
        description="Apply pending migrations in order, each in a transaction, under an "
        "advisory lock (safe when several instances start at once).",
    )
    migrate.add_argument("--config", metavar="FILE", help="TOML file with settings")
    _add_settings_flags(migrate, only={"database_url", "log_level", "log_format"})

    # Operator tools (issue 4): each module adds its subcommand and sets args.handler.
    from ingest.tools import audit, replay

    audit.register(sub, _add_settings_flags)
    replay.register(sub, _add_settings_flags)

    from ingest.tools import demo  # issue 7: embedded servers + daemon + simulated fleet

    demo.register(sub)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    names = {f.name for f in fields(Settings)}
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if k in names}
    return load_settings(overrides=overrides, config_file=args.config)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":  # starts its own servers: no settings to load
        from ingest.tools.demo import run_demo

        return run_demo(args)
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"ingest: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log_level, settings.log_format)
    log = logging.getLogger("ingest")
    if args.command == "run":
        from ingest.runtime.daemon import run_daemon
        from ingest.runtime.supervisor import run_supervisor

        try:
            return run_supervisor(settings) if settings.workers > 1 else run_daemon(settings)
        except ConfigError as exc:
            print(f"ingest: configuration error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        except KeyboardInterrupt:
            return 1
    if args.command == "migrate":
        import anyio

        from ingest.db.migrate import migrate_dsn

        try:
            applied = anyio.run(migrate_dsn, settings.database_url)
        except (IngestError, OSError) as exc:
            log.error("migration failed: %s", exc)
            return 1
        except Exception as exc:
            log.error("migration failed: %s: %s", type(exc).__name__, exc)
            return 1
        log.info("migrations applied: %s", ", ".join(applied) if applied else "none pending")
        return 0
    handler = getattr(args, "handler", None)  # operator tools: ingest/tools/audit.py, replay.py
    if handler is not None:
        return int(handler(args, settings))
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
