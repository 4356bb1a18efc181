"""What every request of the local API and the console carries: its id, and how a
refusal is logged and told to the user (one place for both servers)."""

from __future__ import annotations

from typing import Literal

from aiohttp import web

from gateway.errors import GatewayError, http_status_for, message_for_client
from gateway.log import get_logger

__all__ = ["REQUEST_ID_KEY", "refusal_message"]

_LOGGERS = {"api": get_logger("api"), "console": get_logger("console")}

REQUEST_ID_KEY = web.RequestKey("request_id", str)
"""The id of a request (its ``X-Request-Id``), set by the local API's first middleware
for every request, the console's included."""


def refusal_message(
    exc: GatewayError,
    request: web.Request,
    *,
    event: str,
    component: Literal["api", "console"] = "api",
) -> str:
    """Log a refused request once as ``event`` and return the message its answer carries.

    The node's own faults (:func:`~gateway.errors.message_for_client`) are logged
    at warning with their detail and answered with a fixed text naming the
    request id; every other refusal is logged at info and keeps its message.
    """
    log = _LOGGERS[component]
    status = http_status_for(exc)
    if status >= 500:
        log.warning(event, reason=exc.reason, status=status, detail=exc.diagnostics())
    else:
        log.info(event, reason=exc.reason, status=status)
    return message_for_client(exc, request.get(REQUEST_ID_KEY))
