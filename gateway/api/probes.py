"""Probes and metrics of the local API: ``/livez``, ``/readyz`` and ``/metrics``.

They sit outside ``/api/v1/`` because they are for machines, not users:

- ``GET /livez``: the process serves requests. No authentication, always
  ``200 {"status": "live"}`` while the event loop turns; nothing is checked.
- ``GET /readyz``: the node can work (see :mod:`gateway.node.health`). No
  authentication; ``200`` with ``"status": "ready"`` or ``503`` with
  ``"not-ready"`` and the names of the failed checks. The answer names checks
  only: no version, no node id, no cause (the server log has the cause).
- ``GET /metrics``: Prometheus text exposition of the node's registry. It
  answers a request carrying a valid user token of any role, or a request
  without an ``Authorization`` header that comes from a loopback address (a
  scraper on the same host). A token that is present but not valid is 401,
  never a fall-back to the loopback rule.

The checks run in the app's worker threads and are bounded by
:data:`PROBE_TIMEOUT_SECONDS`: a database that hangs makes ``/readyz``
answer not-ready in time rather than hang the prober. Only one readiness
run is in flight at a time; concurrent probes share its result.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from gateway.core.keys import NodeKeyring
from gateway.node.health import READY_CHECKS, NodeStateCollector, Readiness, check_readiness
from gateway.node.runtime import Node

__all__ = [
    "LIVEZ_PATH",
    "METRICS_PATH",
    "PROBE_PATHS",
    "PROBE_TIMEOUT_SECONDS",
    "READYZ_PATH",
    "add_probe_routes",
    "from_loopback",
]

LIVEZ_PATH: Final = "/livez"
READYZ_PATH: Final = "/readyz"
METRICS_PATH: Final = "/metrics"
PROBE_PATHS: Final = frozenset({LIVEZ_PATH, READYZ_PATH})
"""Paths answered without any authentication."""
PROBE_TIMEOUT_SECONDS: Final = 5.0

KeyringSource = Callable[[], NodeKeyring]


def from_loopback(request: web.Request) -> bool:
    """True when the request's TCP peer is a loopback address (127.0.0.0/8, ::1)."""
    remote = request.remote
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class _ReadinessRunner:
    """One readiness run at a time; probes arriving meanwhile share its result."""

    def __init__(self, node: Node, keyring: KeyringSource | None) -> None:
        self._node = node
        self._keyring = keyring
        self._running: asyncio.Future[Readiness] | None = None

    async def run(self, executor: Executor) -> Readiness:
        if self._running is None or self._running.done():
            loop = asyncio.get_running_loop()
            self._running = asyncio.ensure_future(
                loop.run_in_executor(executor, check_readiness, self._node, self._keyring)
            )
        try:
            return await asyncio.wait_for(asyncio.shield(self._running), PROBE_TIMEOUT_SECONDS)
        except TimeoutError:
            # The checks still run in their thread; this probe answers now.
            return Readiness(checks=dict.fromkeys(READY_CHECKS, "timeout"))


def add_probe_routes(
    app: web.Application,
    node: Node,
    keyring: KeyringSource | None,
    executor: Callable[[], Executor],
) -> None:
    """Register the probes and ``/metrics`` on the local API app.

    ``executor`` gives the app's worker pool (made when the app starts).
    Registers the node's scrape-time collector once per node.
    """
    node.metrics.add_state_collector(lambda: NodeStateCollector(node))
    readiness = _ReadinessRunner(node, keyring)

    async def livez(_request: web.Request) -> web.Response:
        return web.json_response({"status": "live"})

    async def readyz(_request: web.Request) -> web.Response:
        result = await readiness.run(executor())
        return web.json_response(result.to_json(), status=200 if result.ready else 503)

    async def metrics(_request: web.Request) -> web.Response:
        # The collector reads the database: off the event loop, like every query.
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(executor(), generate_latest, node.metrics.registry)
        response = web.Response(body=body)
        response.headers["Content-Type"] = CONTENT_TYPE_PLAIN_0_0_4
        return response

    handlers: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {
        LIVEZ_PATH: livez,
        READYZ_PATH: readyz,
        METRICS_PATH: metrics,
    }
    for path, handler in handlers.items():
        app.router.add_get(path, handler, allow_head=False)
