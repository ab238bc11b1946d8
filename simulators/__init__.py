"""Device simulator for iot-ingest: fleets of MQTT devices at exact rates, with injected faults
and an auditable report. The command line is :func:`simulators.cli.main` (``simulate``,
``python -m simulators``); :func:`run` and :func:`simulate` are the same from Python.
"""

from simulators._config import SimulatorConfig
from simulators._errors import ConfigError, ConnectError, SimulatorError
from simulators._faults import BAD_KINDS
from simulators._report import Progress, Report
from simulators._runner import run, simulate

__all__ = [
    "BAD_KINDS",
    "ConfigError",
    "ConnectError",
    "Progress",
    "Report",
    "SimulatorConfig",
    "SimulatorError",
    "run",
    "simulate",
]
