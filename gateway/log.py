"""Structured logging: JSON lines when not on a terminal, readable on one.

Every line carries the node id (bound once through contextvars by
:func:`configure`). A redaction processor drops the value of any field whose
name says it holds a secret, so a careless ``log.info(..., passphrase=...)``
still never writes one.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Literal, TextIO

import structlog

__all__ = ["REDACTED", "configure", "get_logger", "redact_secrets"]

REDACTED = "[redacted]"
_SECRET_WORDS = ("passphrase", "password", "secret", "private", "token", "seed", "content_key")
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Replace the value of every field whose name names a secret."""
    for key in list(event_dict):
        lowered = key.lower()
        if lowered in ("token_id", "key_id", "private_key_id"):
            continue
        if any(word in lowered for word in _SECRET_WORDS):
            event_dict[key] = REDACTED
    return event_dict


def configure(
    *,
    node: str | None = None,
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    stream: TextIO | None = None,
) -> None:
    """Configure structlog for this process and bind the node id to every line."""
    out = stream if stream is not None else sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=True)
        if use_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    if node is not None:
        structlog.contextvars.bind_contextvars(node=node)


def get_logger(name: str) -> Any:
    """A structlog logger naming its component."""
    return structlog.get_logger(component=name)
