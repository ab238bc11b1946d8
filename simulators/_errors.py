"""Errors raised by the simulator.

One root, so callers can catch the simulator's errors in one place::

    SimulatorError
    ├── ConfigError       a flag or environment variable is invalid (exit status 2)
    └── ConnectError      the broker cannot be reached or refuses us at start (exit status 1)

Failures while running (a message not acknowledged, a broker restart) are not exceptions:
they are counted in the report and make the exit status 1.
"""

from __future__ import annotations


class SimulatorError(Exception):
    """Root of every error raised by the simulator."""


class ConfigError(SimulatorError):
    """An invalid setting. ``setting`` names it (``--rate``, ``INGEST_MQTT_URL``, ...)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message


class ConnectError(SimulatorError):
    """The broker could not be reached (or refused the connection) before the run started."""

    def __init__(self, url: str, message: str) -> None:
        super().__init__(f"cannot connect to {url}: {message}")
        self.url = url
        self.message = message
