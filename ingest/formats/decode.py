"""The decode stage's entry point; the JSON format lives in ``ingest.formats.json``."""

from __future__ import annotations

from ingest.formats.json import REASONS, Limits, TopicTemplate, decode

__all__ = ["REASONS", "Limits", "TopicTemplate", "decode"]
