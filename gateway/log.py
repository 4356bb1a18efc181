"""Structured logging: JSON lines when not on a terminal, readable on one.

Every line carries the node id (bound once through contextvars by
:func:`configure`). A redaction processor drops the value of any field whose
name says it holds a secret, so a careless ``log.info(..., passphrase=...)``
still never writes one.

structlog, and the standard library's ``logging``, are imported when the
first logger is asked for (or at :func:`configure` when structlog is loaded
already, or for a service): a command that logs nothing never pays for them
(docs/performance.md).
"""

from __future__ import annotations

import sys
from collections.abc import MutableMapping
from typing import Any, Literal, TextIO

__all__ = [
    "REDACTED",
    "announce",
    "configure",
    "get_logger",
    "is_json",
    "is_service",
    "redact_secrets",
]

REDACTED = "[redacted]"
_SECRET_WORDS = ("passphrase", "password", "secret", "private", "token", "seed", "content_key")
_state: dict[str, Any] = {
    "json": False,
    "stream": None,
    "service": False,
    "pending": None,
    "handler": None,
}
_NOTSET, _INFO, _WARNING = 0, 20, 30
_LEVELS = {"debug": 10, "info": _INFO, "warning": _WARNING, "error": 40}
"""The numeric levels of the standard library's ``logging`` (``logging.DEBUG`` ...),
written out so that configuring the log does not import it."""


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
    service: bool = False,
) -> None:
    """Configure structlog for this process and bind the node id to every line.

    ``service`` is for long-running commands (``gateway serve``) whose log
    stream is their whole output: the standard library's loggers (aiohttp,
    asyncio, warnings) are rendered by the same processors at warning level
    and above, and :func:`announce` and the CLI's error report write log
    lines, so with JSON every line of the stream is one JSON object.
    """
    out = stream if stream is not None else sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    _state["json"] = use_json
    _state["stream"] = out
    _state["service"] = service
    _state["pending"] = (node, level, out, use_json, service)
    if service or "structlog" in sys.modules:
        _structlog()


def _structlog() -> Any:
    """The structlog module, configured as the last :func:`configure` asked."""
    import structlog  # noqa: PLC0415 - loaded on first use, see the module docstring

    pending = _state["pending"]
    if pending is None:
        return structlog
    _state["pending"] = None
    node, level, out, use_json, service = pending
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=True)
        if use_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            # The node id on every line, whatever thread logs it: worker threads
            # of an executor do not inherit the context variables bound here.
            *([_NodeField(node)] if node is not None else []),
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, _INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    if node is not None:
        structlog.contextvars.bind_contextvars(node=node)
    if service:
        _route_standard_logging(out, renderer)
    return structlog


class _NodeField:
    """A structlog processor setting ``node`` on every event (unless it names one)."""

    def __init__(self, node: str) -> None:
        self.node = node

    def __call__(
        self, _logger: Any, _method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event.setdefault("node", self.node)
        return event


def _route_standard_logging(out: TextIO, renderer: Any) -> None:
    import logging  # noqa: PLC0415 - see the module docstring

    import structlog  # noqa: PLC0415 - see the module docstring

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    root = logging.getLogger()
    # The one handler this module puts on the root logger, replaced on reconfigure.
    if _state["handler"] is not None:
        root.removeHandler(_state["handler"])
    handler = logging.StreamHandler(out)
    _state["handler"] = handler
    handler.setFormatter(formatter)
    # Libraries' own chatter below warning is theirs, not the node's.
    handler.setLevel(_WARNING)
    root.addHandler(handler)
    if root.level > _WARNING or root.level == _NOTSET:
        root.setLevel(_WARNING)
    logging.captureWarnings(True)


def is_service() -> bool:
    """True when configured for a long-running command (see :func:`configure`)."""
    return bool(_state["service"])


def get_logger(name: str) -> Any:
    """A structlog logger naming its component."""
    return _structlog().get_logger(component=name)


def is_json() -> bool:
    """True when the last :func:`configure` chose JSON lines."""
    return bool(_state["json"])


def announce(logger: Any, event: str, message: str, **fields: Any) -> None:
    """A milestone of a long-running command (start, restart, stop).

    When the log is JSON, one JSON line at level info carrying ``event``,
    ``message`` and ``fields``, like every other line; on a terminal, the
    readable ``message`` alone on the log stream. ``message`` is a sentence
    for people (``serving jp on https://0.0.0.0:8701 ...``), never a secret.
    Written whatever the configured level: an operator always sees a start
    and a stop.
    """
    stream = _state["stream"] if _state["stream"] is not None else sys.stderr
    if is_json():
        structlog = _structlog()
        config = structlog.get_config()
        unfiltered = structlog.wrap_logger(
            structlog.PrintLogger(file=stream),
            processors=config["processors"],
            wrapper_class=structlog.make_filtering_bound_logger(_NOTSET),
        )
        context = getattr(logger, "_context", {})
        unfiltered.bind(**context).info(event, message=message, **fields)
        return
    print(message, file=stream, flush=True)
