"""The local API for users: officers, administrators and compliance officers.

``gateway serve`` runs it on ``[server] api_listen`` (loopback by default),
apart from the peer API. Every route lives under ``/api/v1/`` and is the same
action as a CLI command, authorized with the same action name of
:data:`gateway.core.roles.ACTIONS` and served by the same service function.

Nothing answers without a user token: the authentication middleware runs
before routing, so even an unknown path gets 401 without one (no route list
leaks to strangers). The only exceptions are the probes ``GET /livez`` and
``GET /readyz``, which say nothing but live/ready and the names of failed
checks, and ``GET /metrics`` from a loopback address without an
``Authorization`` header (see :mod:`gateway.api.probes`). The token is checked by
:func:`gateway.node.users.authenticate` (constant-time against the stored
hash); the role check of the route's action runs before the request body is
read. Refusals are 401 (no, wrong or disabled token) or 403 (the role may not).

Every answer is JSON. Errors of the :mod:`gateway.errors` tree become
``{"error": {"reason": ..., "message": ...}}`` with a status chosen by family;
an unexpected failure becomes a 500 naming only its request id, never a
traceback. One summary log line is written per request.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import structlog
from aiohttp import web

from gateway.api import (
    routes_approvals,
    routes_consent,
    routes_exchange,
    routes_keys,
    routes_ledger,
    routes_users,
)
from gateway.api.probes import METRICS_PATH, PROBE_PATHS, add_probe_routes, from_loopback
from gateway.api.routes_common import DEFAULT_MAX_BODY, ApiRoute, Call
from gateway.console import add_console, is_console_path
from gateway.core.roles import ACTIONS, Actor, authorize_role
from gateway.errors import (
    AccessDenied,
    ClientDisconnected,
    GatewayError,
    VerificationError,
    http_status_for,
)
from gateway.log import get_logger
from gateway.node.context import NodeContext
from gateway.node.runtime import Node
from gateway.node.users import authenticate
from gateway.request_context import REQUEST_ID_KEY, refusal_message

__all__ = [
    "ACTOR_KEY",
    "CONTEXT_KEY",
    "EXECUTOR_KEY",
    "NODE_KEY",
    "PROBE_ROUTES",
    "REQUEST_ID_KEY",
    "ROUTES_KEY",
    "all_routes",
    "create_api_app",
]

CONTEXT_KEY = web.AppKey("node_context", NodeContext)
NODE_KEY = web.AppKey("node", Node)
EXECUTOR_KEY = web.AppKey("executor", Executor)
ROUTES_KEY = web.AppKey("routes", tuple[ApiRoute, ...])
ACTOR_KEY = web.RequestKey("actor", Actor)

_log = get_logger("api")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_MAX_AUTHORIZATION = 512
_BEARER = "bearer "
_DB_THREADS = 4

PROBE_ROUTES: tuple[tuple[str, str], ...] = (
    ("GET", "/livez"),
    ("GET", "/readyz"),
    ("GET", METRICS_PATH),
)
"""(method, path) of the probes and metrics, registered beside :func:`all_routes`."""


def all_routes() -> tuple[ApiRoute, ...]:
    """Every route of the local API, in the order they are registered."""
    return (
        *routes_users.ROUTES,
        *routes_keys.ROUTES,
        *routes_exchange.ROUTES,
        *routes_consent.ROUTES,
        *routes_approvals.ROUTES,
        *routes_ledger.ROUTES,
    )


def _error(status: int, reason: str, message: str, **extra: Any) -> web.Response:
    body: dict[str, Any] = {"reason": reason, "message": message, **extra}
    response = web.json_response({"error": body}, status=status)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="ssw-gateway"'
    return response


def _bearer_token(request: web.Request) -> str:
    header = request.headers.get("Authorization")
    if header is None:
        raise AccessDenied(
            "no user token: send 'Authorization: Bearer <token>'", reason="access.no-token"
        )
    if len(header) > _MAX_AUTHORIZATION or not header.lower().startswith(_BEARER):
        raise AccessDenied(
            "the Authorization header must read 'Bearer <token>'", reason="access.token"
        )
    return header[len(_BEARER) :].strip()


@web.middleware
async def _request_log(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Give every request an id and write one summary line when it ends."""
    offered = request.headers.get("X-Request-Id", "")
    request_id = offered if _REQUEST_ID.fullmatch(offered) else secrets.token_hex(8)
    request[REQUEST_ID_KEY] = request_id
    started = time.monotonic()
    status: int | None = 500
    outcome: dict[str, str] = {}
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        try:
            response = await handler(request)
        except (ClientDisconnected, ConnectionError):
            # Nothing can be answered: this line says so, without a status; the
            # response is never sent (aiohttp drops it on a closed transport).
            status, outcome["reason"] = None, "client disconnected"
            response = web.Response(status=400)
            response.force_close()
        else:
            status = response.status
        finally:
            actor = request.get(ACTOR_KEY)
            route = _route_template(request)
            request.app[NODE_KEY].metrics.observe_request(
                "api", request.method, route, time.monotonic() - started
            )
            _log.info(
                "api_request",
                method=request.method,
                route=route,
                status=status,
                user=actor.name if isinstance(actor, Actor) else None,
                duration_ms=round((time.monotonic() - started) * 1000, 1),
                **outcome,
            )
    return response


async def _common_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every answer, streamed ones too, before its headers are sent."""
    request_id = request.get(REQUEST_ID_KEY)
    if request_id is not None:
        response.headers["X-Request-Id"] = request_id
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"


def _route_template(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "(no route)"


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Map every failure to a JSON error; never send a traceback."""
    try:
        return await handler(request)
    except (ClientDisconnected, ConnectionError):
        raise  # no answer can reach the client: the request log says so once
    except GatewayError as exc:
        status = http_status_for(exc)
        extra: dict[str, Any] = {}
        if isinstance(exc, VerificationError):
            extra["check"] = exc.check
        message = refusal_message(exc, request, event="api_refused")
        return _error(status, exc.reason, message, **extra)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reason = {
            404: "not-found",
            405: "method-not-allowed",
            413: "request.too-large",
        }.get(exc.status, "request")
        return _error(exc.status, reason, exc.reason)
    except Exception as exc:  # noqa: BLE001 - the last line of defence answers 500, no trace
        _log.error("api_internal_error", error_type=type(exc).__name__)
        return _error(
            500,
            "internal",
            f"internal error; quote request id {request.get(REQUEST_ID_KEY)} to the administrator",
        )


@web.middleware
async def _authenticate(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Refuse any request, to any path, that carries no valid user token.

    Exceptions: the probes (``GET /livez``, ``GET /readyz``), and ``GET /metrics``
    without an ``Authorization`` header from a loopback address.
    """
    if is_console_path(request.path):
        return await handler(request)  # the console signs in with a session of its own
    if request.method == "GET":
        if request.path in PROBE_PATHS:
            return await handler(request)
        if (
            request.path == METRICS_PATH
            and "Authorization" not in request.headers
            and from_loopback(request)
        ):
            return await handler(request)
    token = _bearer_token(request)
    node = request.app[NODE_KEY]
    executor = request.app[EXECUTOR_KEY]

    def check() -> Actor:
        with node.db.transaction() as session:
            return authenticate(session, token)

    actor = await asyncio.get_running_loop().run_in_executor(executor, check)
    request[ACTOR_KEY] = actor
    # Bound for this request only: a kept-alive connection serves the next one anew.
    with structlog.contextvars.bound_contextvars(user=actor.name):
        return await handler(request)


def _bind(route: ApiRoute) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The aiohttp handler of a route: role check first, then the route's handler."""

    async def handle(request: web.Request) -> web.StreamResponse:
        actor = request[ACTOR_KEY]
        if route.action is not None:
            if actor.role is None:
                raise AccessDenied("the node itself cannot act through the local API")
            authorize_role(actor.role, route.action)
        call = Call(
            request=request,
            ctx=request.app[CONTEXT_KEY],
            actor=actor,
            executor=request.app[EXECUTOR_KEY],
            max_body=route.max_body,
        )
        return await route.handler(call)

    return handle


def _check_routes(routes: Iterable[ApiRoute]) -> tuple[ApiRoute, ...]:
    chosen = tuple(routes)
    seen: set[tuple[str, str]] = set()
    for route in chosen:
        if not route.path.startswith("/api/v1/"):
            raise ValueError(f"route {route.path} is outside /api/v1/")
        if route.action is not None and route.action not in ACTIONS:
            raise ValueError(
                f"route {route.method} {route.path} names unknown action {route.action!r}"
            )
        if (route.method, route.path) in seen:
            raise ValueError(f"route {route.method} {route.path} is registered twice")
        seen.add((route.method, route.path))
    return chosen


def create_api_app(
    ctx: NodeContext,
    *,
    routes: Iterable[ApiRoute] | None = None,
    db_threads: int = _DB_THREADS,
) -> web.Application:
    """Build the local API application for an opened node.

    ``ctx`` holds the node, its keyring (read per request, so the routes
    that seal or open bundles use the node's current keys; a context without
    keys serves every route that needs none), policy and clock. The caller
    owns ``ctx.node`` and closes it after the app stops;
    the app owns its worker threads (opened and closed in ``cleanup_ctx``).
    """
    chosen = _check_routes(all_routes() if routes is None else routes)
    largest = max((route.max_body for route in chosen), default=DEFAULT_MAX_BODY)
    app = web.Application(
        middlewares=[_request_log, _errors, _authenticate], client_max_size=largest
    )
    node = ctx.node
    app[CONTEXT_KEY] = ctx
    app[NODE_KEY] = node
    app[ROUTES_KEY] = chosen

    async def threads(app: web.Application) -> AsyncIterator[None]:
        pool = ThreadPoolExecutor(max_workers=db_threads, thread_name_prefix="api-db")
        app[EXECUTOR_KEY] = pool
        yield
        pool.shutdown(wait=True)

    app.cleanup_ctx.append(threads)
    app.on_response_prepare.append(_common_headers)
    for route in chosen:
        app.router.add_route(route.method, route.path, _bind(route))
    add_probe_routes(app, node, ctx.keyring_source(), lambda: app[EXECUTOR_KEY])
    add_console(app, ctx, lambda: app[EXECUTOR_KEY])
    return app
