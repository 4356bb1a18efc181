"""What every local API route is built from: the route record and the call object.

A route names its method, its path, the action of :data:`gateway.core.roles.ACTIONS`
it performs (``None`` only for routes any authenticated user may call, such as
``whoami``) and its handler. Handlers never authorize on their own: the app
checks the action before a handler runs and before the request body is read.
Handlers call the same service functions the CLI calls and hold no logic of
their own beyond turning JSON into arguments and results into JSON.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from sqlalchemy.orm import Session

from gateway.core.canonical import parse_bounded_json
from gateway.core.jsonable import to_jsonable
from gateway.core.keys import NodeKeyring
from gateway.core.roles import Actor
from gateway.errors import ClientDisconnected, InvalidInput, PolicyRefused
from gateway.node.context import NodeContext
from gateway.node.runtime import Node

__all__ = [
    "BODY_TIMEOUT_SECONDS",
    "DEFAULT_MAX_BODY",
    "ApiRoute",
    "Call",
    "Handler",
    "KeyringProvider",
    "json_response",
    "optional_str",
    "refuse_unknown_fields",
    "require_str",
]

T = TypeVar("T")

DEFAULT_MAX_BODY = 64 * 1024
"""Largest JSON body a route accepts unless it says otherwise (bytes)."""

BODY_TIMEOUT_SECONDS = 60.0
"""A request body must arrive whole within this time (a stalled client is refused)."""

KeyringProvider = Callable[[], NodeKeyring]
"""Gives the node's unlocked keyring (private keys) to routes that seal or open
bundles; ``gateway serve`` unlocks it once at start with the node passphrase."""


@dataclass(frozen=True)
class Call:
    """One authorized request, as a handler sees it."""

    request: web.Request
    ctx: NodeContext
    actor: Actor
    executor: Executor
    max_body: int

    @property
    def node(self) -> Node:
        return self.ctx.node

    @property
    def keyring_provider(self) -> KeyringProvider:
        """Reads the node's current keyring (``ctx.keyring``) when called."""
        return self.ctx.keyring_source()

    async def run(self, work: Callable[[], T]) -> T:
        """Run blocking work (database, files, crypto) off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, work)

    async def in_transaction(self, work: Callable[[Session], T]) -> T:
        """Run ``work`` in one database transaction (commit, or roll back on error)."""

        def unit() -> T:
            with self.node.db.transaction() as session:
                return work(session)

        return await self.run(unit)

    async def json_body(self) -> dict[str, Any]:
        """The request body as a JSON object, bounded in size and depth.

        An empty body counts as ``{}``; any other body must be declared as
        ``application/json``.
        """
        length = self.request.content_length
        if length is not None and length > self.max_body:
            raise PolicyRefused(
                f"request body of {length} bytes exceeds the limit of {self.max_body}",
                reason="request.too-large",
            )
        chunks: list[bytes] = []
        total = 0
        try:
            async with asyncio.timeout(BODY_TIMEOUT_SECONDS):
                while chunk := await self.request.content.read(64 * 1024):
                    total += len(chunk)
                    if total > self.max_body:
                        raise PolicyRefused(
                            f"request body exceeds the limit of {self.max_body} bytes",
                            reason="request.too-large",
                        )
                    chunks.append(chunk)
        except TimeoutError:
            raise PolicyRefused(
                f"request body not complete within {BODY_TIMEOUT_SECONDS:g} s",
                reason="request.timeout",
            ) from None
        except ConnectionError:  # aiohttp's "Connection lost": the client hung up mid-body
            raise ClientDisconnected("client disconnected before the body was complete") from None
        data = b"".join(chunks)
        if not data.strip():
            return {}
        if self.request.content_type != "application/json":
            raise InvalidInput(
                f"request body must be application/json, not {self.request.content_type}",
                reason="request.content-type",
            )
        try:
            value = parse_bounded_json(data, max_bytes=self.max_body)
        except InvalidInput as exc:
            raise InvalidInput(exc.message, reason="request.json") from None
        if not isinstance(value, dict):
            raise InvalidInput("request body must be a JSON object", reason="request.json")
        return value

    def query(self, name: str) -> str | None:
        values = self.request.query.getall(name, [])
        if len(values) > 1:
            raise InvalidInput(f"query parameter {name!r} is given more than once")
        return values[0] if values else None

    def path(self, name: str) -> str:
        return self.request.match_info[name]


Handler = Callable[[Call], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class ApiRoute:
    """One route of the local API and the action it is authorized as."""

    method: str
    path: str
    action: str | None
    handler: Handler
    summary: str
    max_body: int = DEFAULT_MAX_BODY
    tags: tuple[str, ...] = field(default_factory=tuple)


def json_response(data: Any, *, status: int = 200) -> web.Response:
    """A JSON answer in the same shape the CLI prints with ``--json``."""
    return web.json_response(to_jsonable(data), status=status)


def require_str(body: Mapping[str, Any], name: str, *, max_length: int = 4096) -> str:
    """A required string member of a JSON body; a clear error names it otherwise."""
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"field {name!r} is required and must be a non-empty string")
    if len(value) > max_length:
        raise InvalidInput(f"field {name!r} is longer than {max_length} characters")
    return value


def optional_str(body: Mapping[str, Any], name: str, *, max_length: int = 4096) -> str | None:
    """An optional string member of a JSON body."""
    if body.get(name) is None:
        return None
    return require_str(body, name, max_length=max_length)


def refuse_unknown_fields(body: Mapping[str, Any], allowed: set[str]) -> None:
    """Refuse members a route does not know, so a typo is never silently ignored."""
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidInput(
            f"unknown field(s) {', '.join(map(repr, unknown))}; expected {', '.join(sorted(allowed)) or 'none'}"
        )
