"""What one device message may cost the decoder (docs/design.md, Limits).

A payload over ``max_payload_bytes`` never reaches a decoder (the source keeps its start as a
``too_large`` dead letter), so these are the limits left to decoding: how many readings one
message may carry, the window a sample's time must fall in, and the length of a text value.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final

from ingest.errors import ConfigError

if TYPE_CHECKING:
    from ingest.settings import Settings

__all__ = ["DEFAULT_LIMITS", "Limits"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Per-message limits; the defaults are the settings' defaults.

    - ``max_readings_per_message``: more readings (or, in an array, more samples) in one
      message make it a dead letter ``too_many_readings``.
    - ``max_ts_ahead`` / ``min_ts``: a sample dated after its arrival plus ``max_ts_ahead``, or
      before ``min_ts``, makes the message a dead letter ``ts_out_of_range``.
    - ``max_text_bytes``: a longer text value is skipped and counted (formats with text).
    """

    max_readings_per_message: int = 10000
    max_ts_ahead: timedelta = timedelta(days=1)
    min_ts: datetime = datetime(2000, 1, 1, tzinfo=UTC)
    max_text_bytes: int = 1024

    def __post_init__(self) -> None:
        if self.max_readings_per_message < 1:
            raise ConfigError("INGEST_MAX_READINGS_PER_MESSAGE", "must be at least 1")
        if self.max_ts_ahead < timedelta(0):
            raise ConfigError("INGEST_MAX_TS_AHEAD", "must not be negative")
        if self.min_ts.tzinfo is None:
            raise ConfigError("INGEST_MIN_TS", "must carry a time zone")
        if self.max_text_bytes < 1:
            raise ConfigError("INGEST_MAX_TEXT_BYTES", "must be at least 1")

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_readings_per_message=settings.max_readings_per_message,
            max_ts_ahead=settings.max_ts_ahead,
            min_ts=settings.min_ts,
            max_text_bytes=settings.max_text_bytes,
        )

    def latest(self, received_at: datetime) -> datetime:
        """The latest time a sample received at ``received_at`` may carry."""
        try:
            return received_at + self.max_ts_ahead
        except OverflowError:  # a window reaching past year 9999 leaves only the calendar's end
            return datetime.max.replace(tzinfo=UTC)


DEFAULT_LIMITS: Final = Limits()
