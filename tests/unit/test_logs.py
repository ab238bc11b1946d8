"""ingest.logs: formats, context fields, and secrets never in the output."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from ingest.logs import configure_logging, log_context, redact


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield stream
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://app:s3cret@db:5432/x", "postgresql://app:***@db:5432/x"),
        ("mqtt://u:p%40ss@broker", "mqtt://u:***@broker"),
        ("postgresql://app@db/x?password=s3cret&sslmode=require", "password=***&sslmode"),
        ("host=db password='a b c' user=app", "password=*** user=app"),
        ("PASSWORD = hunter2", "PASSWORD = ***"),
        ("postgresql://app@db/x", "postgresql://app@db/x"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    out = redact(text)
    assert expected in out
    for secret in ("s3cret", "p%40ss", "a b c", "hunter2"):
        assert secret not in out


def test_json_lines_carry_context_and_extras_and_hide_secrets(captured: io.StringIO) -> None:
    configure_logging("DEBUG", "auto", stream=captured)  # a StringIO is not a terminal: JSON
    log = logging.getLogger("ingest.test")
    with log_context(batch=7):
        log.warning(
            "write to %s failed",
            "postgresql://app:s3cret@db/x",
            extra={"device_id": "dev-1", "dsn": "postgresql://app:s3cret@db/x"},
        )
    log.info("after")
    first, second = (json.loads(line) for line in captured.getvalue().splitlines())
    assert first["batch"] == 7 and first["device_id"] == "dev-1" and first["level"] == "warning"
    assert "s3cret" not in captured.getvalue()
    assert "batch" not in second


def test_text_format_is_key_value(captured: io.StringIO) -> None:
    configure_logging("INFO", "text", stream=captured)
    logging.getLogger("ingest.test").info("stats", extra={"received": 5, "note": "two words"})
    line = captured.getvalue().strip()
    assert line.endswith('ingest.test: stats received=5 note="two words"')


def test_level(captured: io.StringIO) -> None:
    configure_logging("WARNING", "json", stream=captured)
    logging.getLogger("ingest.test").info("hidden")
    assert captured.getvalue() == ""


def test_exceptions_are_redacted(captured: io.StringIO) -> None:
    configure_logging("INFO", "json", stream=captured)
    try:
        raise ValueError("cannot reach postgresql://app:s3cret@db/x")
    except ValueError:
        logging.getLogger("ingest.test").exception("boom")
    assert "s3cret" not in captured.getvalue()
    assert "app:***@db" in json.loads(captured.getvalue())["exc"]
