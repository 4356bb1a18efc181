"""Builders for the hostile-input tests: a pinned pair of real nodes and its entry points.

Every class of hostile input is walked through the same doors a user or a peer
has: the ``gateway`` command (a real process), the local API (the real aiohttp
app on a loopback socket) and the peer API (the node's real peer app with its
ledger routes, on a loopback socket, spoken to by raw bytes signed with the
peer's real operational key).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy import func, select

import gateway.node.own_keys
import gateway.node.policy
from gateway.api.app import create_api_app
from gateway.core.keys import NodeKeyring
from gateway.core.peer_auth import sign_request
from gateway.node.context import NodeContext
from gateway.node.own_keys import unlock_keyring
from gateway.node.runtime import Node, utc_now
from gateway.node.users import add_user
from gateway.peer.ledger_routes import ledger_routes
from gateway.peer.server import create_node_peer_app
from tests.node_api import RunningApi
from tests.nodes import (
    GATEWAY,
    TEST_LIMITS,
    ServerThread,
    gateway_env,
    open_pinned_pair,
    run_gateway,
)

PASSPHRASE = "correct horse battery staple for hostile input"
# Importing these registers their stages of node creation (keys, policies), as the CLI does.
INIT_STAGES = (gateway.node.own_keys.__name__, gateway.node.policy.__name__)


@dataclass
class Side:
    """One opened node of the pair, with an officer, an admin and its unlocked keyring."""

    node: Node
    home: Path
    keyring: NodeKeyring
    tokens: dict[str, str]
    running: RunningApi | None = None

    def serve_api(self) -> RunningApi:
        """This node's local API on its Unix socket (started once, stopped with the pair)."""
        if self.running is None:
            self.running = RunningApi(self.node, lambda: self.keyring).start()
        return self.running

    def cli(
        self, *args: str, role: str = "officer", stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the user command ``gateway ARGS`` as a real process acting as ``role``,
        against this node running (its local API on the home's socket)."""
        self.serve_api()
        env = gateway_env(self.home, GATEWAY_TOKEN=self.tokens[role])
        env.pop("GATEWAY_PASSPHRASE", None)
        if stdin is None:
            return run_gateway(self.home, *args, env=env)
        return subprocess.run(  # noqa: PLW1510 - the caller checks the code
            [*GATEWAY, "--home", str(self.home), *args],
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def count(self, model: Any) -> int:
        with self.node.db.transaction() as session:
            return int(session.scalar(select(func.count()).select_from(model)) or 0)


@contextmanager
def pinned_pair(
    tmp_path: Path, urls: dict[str, str], environ: dict[str, str]
) -> Iterator[dict[str, Side]]:
    """jp and pk initialised, opened in this process and pinned to each other."""
    env = {**environ, "GATEWAY_PASSPHRASE": PASSPHRASE, "GATEWAY_KEYSTORE_STRENGTH": "min"}
    nodes = open_pinned_pair(tmp_path, urls, env, now=utc_now())
    sides: dict[str, Side] = {}
    try:
        for node_id, node in nodes.items():
            with node.db.transaction() as session:
                tokens = {
                    role: add_user(
                        session, role, role, created_by="host", by_host=True, now=utc_now()
                    ).token.text
                    for role in ("officer", "compliance")
                }
                tokens["admin"] = add_user(
                    session, "admin2", "admin", created_by="host", by_host=True, now=utc_now()
                ).token.text
            with node.db.transaction() as session:
                keyring = unlock_keyring(node.settings, PASSPHRASE.encode(), session)
            sides[node_id] = Side(node, tmp_path / node_id, keyring, tokens)
        yield sides
    finally:
        for side in sides.values():
            if side.running is not None:
                side.running.stop()
        for node in nodes.values():
            node.close()


# --- the local API ------------------------------------------------------------------------


@dataclass
class ApiAnswer:
    status: int
    body: Any


async def _api_call(
    base: str, method: str, path: str, token: str, data: bytes | None, content_type: str
) -> ApiAnswer:
    headers = {"Authorization": f"Bearer {token}"}
    if data is not None:
        headers["Content-Type"] = content_type
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, base + path, data=data, headers=headers) as resp,
    ):
        content = await resp.read()
        try:
            body: Any = json.loads(content) if content else None
        except ValueError:
            body = content
        return ApiAnswer(resp.status, body)


def api_call(
    side: Side,
    method: str,
    path: str,
    *,
    role: str = "officer",
    data: bytes | None = None,
    content_type: str = "application/json",
) -> ApiAnswer:
    """One request to ``side``'s local API served on a loopback socket."""

    async def main() -> ApiAnswer:
        app = create_api_app(NodeContext(side.node, lambda: side.keyring))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            return await _api_call(
                f"http://127.0.0.1:{port}", method, path, side.tokens[role], data, content_type
            )
        finally:
            await runner.cleanup()

    return asyncio.run(main())


# --- the peer API -------------------------------------------------------------------------


@asynccontextmanager
async def bare_host(app: web.Application) -> AsyncIterator[str]:
    """``app`` served on a loopback port in the running loop, as a hostile peer that
    answers whatever a test wrote; yields its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@contextmanager
def peer_server(side: Side) -> Iterator[ServerThread]:
    """``side``'s real peer application (with the ledger routes) on a loopback socket."""
    app = create_node_peer_app(
        NodeContext(side.node, side.keyring), TEST_LIMITS, extra_routes=ledger_routes(side.node.db)
    )
    with ServerThread(app) as server:
        yield server


def signed_head(sender: Side, recipient: str, path: str, body: bytes, content_type: str) -> bytes:
    """The head of a ``POST path`` signed by ``sender``'s operational key."""
    headers = sign_request(
        sender.keyring,
        method="POST",
        path=path,
        body_sha256=hashlib.sha256(body).digest(),
        recipient=recipient,
        now=utc_now(),
        nonce=os.urandom(16),
    )
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {content_type}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def post_signed(
    server: ServerThread, sender: Side, recipient: str, path: str, body: bytes, content_type: str
) -> tuple[int, Any]:
    """Send a whole signed request; (status, parsed JSON answer)."""
    data = signed_head(sender, recipient, path, body, content_type) + body
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(data)
        chunks: list[bytes] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    answer = b"".join(chunks)
    head, _, content = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        return status, json.loads(content)
    except ValueError:
        return status, content


@pytest.fixture
def pair(
    tmp_path: Path,
    migrated_database_factory: Callable[[str], str],
    clean_environ: dict[str, str],
) -> Iterator[dict[str, Side]]:
    """The pinned pair on the engine under test (import it into a test module);
    each node's database starts as a copy of the migrated template."""
    urls = {"jp": migrated_database_factory("test"), "pk": migrated_database_factory("pk")}
    with pinned_pair(tmp_path, urls, clean_environ) as sides:
        yield sides
