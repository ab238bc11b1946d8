"""iot-ingest: MQTT -> PostgreSQL sensor ingestion with exactly-once rows."""

from ingest._version import __version__

__all__ = ["__version__"]
