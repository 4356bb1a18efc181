"""Log lines: JSON whenever the format is JSON, milestones included; secrets redacted."""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Iterator

import pytest
import structlog

from gateway import log


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    log._state.update(json=False, stream=None, service=False)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error"])
def test_milestones_are_json_lines_at_every_level(level: str) -> None:
    stream = io.StringIO()
    log.configure(node="jp", level=level, fmt="json", stream=stream, service=True)
    logger = log.get_logger("serve")
    log.announce(logger, "serving", "serving jp on https://127.0.0.1:8701", tls=True)
    log.announce(logger, "stopped", "stopped jp")
    records = _lines(stream)
    assert [(r["event"], r["message"], r["node"], r["level"]) for r in records] == [
        ("serving", "serving jp on https://127.0.0.1:8701", "jp", "info"),
        ("stopped", "stopped jp", "jp", "info"),
    ]
    assert records[0]["tls"] is True
    assert records[0]["component"] == "serve"


def test_milestones_on_a_terminal_format_are_plain_sentences() -> None:
    stream = io.StringIO()
    log.configure(node="jp", fmt="console", stream=stream, service=True)
    log.announce(log.get_logger("serve"), "stopped", "stopped jp", token="s3cret")
    assert stream.getvalue() == "stopped jp\n"


def test_a_service_renders_library_logs_and_warnings_as_json_without_secrets() -> None:
    stream = io.StringIO()
    log.configure(node="pk", fmt="json", stream=stream, service=True)
    logging.getLogger("aiohttp.server").error("Error handling request", exc_info=ValueError("x"))
    logging.getLogger("alembic.runtime.migration").info("Context impl SQLiteImpl.")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)
    log.get_logger("serve").warning("odd", passphrase="hunter2")
    records = _lines(stream)
    assert [r.get("logger") for r in records[:2]] == ["aiohttp.server", "py.warnings"]
    assert all(r["node"] == "pk" for r in records)
    assert "ValueError" in str(records[0]["exception"])
    assert records[2]["passphrase"] == log.REDACTED
    assert "hunter2" not in stream.getvalue()
    assert "SQLiteImpl" not in stream.getvalue()
