"""``ingest``: the command line (``run``, ``migrate``; operator tools come with their issues).

Configuration errors exit with status 2 and one line naming the bad setting, no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import Any, NoReturn

from ingest._version import __version__
from ingest.errors import ConfigError, IngestError, describe_root
from ingest.logs import configure_logging
from ingest.settings import Settings, load_settings
from ingest.settings import help_text as settings_help
from ingest.urls import redact_urls_in

__all__ = ["main"]

EXIT_CONFIG = 2


class _Parser(argparse.ArgumentParser):
    """Subcommands' parsers are of this class too (argparse builds them from the parent's)."""

    def error(self, message: str) -> NoReturn:
        # argparse quotes stray arguments, which may be a URL with a password.
        self.print_usage(sys.stderr)
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {redact_urls_in(message)}\n")


def _add_settings_flags(parser: argparse.ArgumentParser, only: set[str] | None = None) -> None:
    """One flag per setting, grouped and described as the settings' metadata says."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(Settings):
        if (only is not None and f.name not in only) or f.metadata["secret"]:
            continue  # a secret on the command line is visible to every user through ps
        group_name = str(f.metadata["group"])
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(f"settings: {group_name.lower()}")
        flag = "--" + f.name.replace("_", "-")
        help_text = settings_help(f).replace("%", "%%")
        if str(f.type) == "bool":
            groups[group_name].add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                help=help_text,
            )  # fmt: skip
        else:
            groups[group_name].add_argument(
                flag, dest=f.name, default=None, metavar="VALUE", help=help_text
            )


def _parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = _Parser(
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

    # Operator tools: each module adds its own subcommand and handler; their options live there.
    from ingest.tools import audit, replay

    audit.register(sub, _add_settings_flags)
    replay.register(sub, _add_settings_flags)

    from ingest.tools import sessions  # the MQTT sessions the daemons opened; retiring them

    sessions.register(sub, _add_settings_flags)

    from ingest.tools import demo  # a first try with nothing installed: embedded servers, fleet

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
            brokers = settings.broker_settings()  # one Settings per broker
            if settings.workers > 1 or len(brokers) > 1:
                return run_supervisor(settings)
            return run_daemon(brokers[0])
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
            log.error("migration failed: %s", describe_root(exc))
            return 1
        except Exception as exc:
            log.error("migration failed: %s", describe_root(exc))
            return 1
        log.info("migrations applied: %s", ", ".join(applied) if applied else "none pending")
        return 0
    handler = getattr(args, "handler", None)  # operator tools: ingest/tools/audit/, replay.py
    if handler is not None:
        return int(handler(args, settings))
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
