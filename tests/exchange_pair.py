"""Two real nodes opened in this process, for tests that walk every entry point.

jp and pk, each with its own database (the ``database_url`` engine), keys
and pinned peer, one officer and one compliance officer each. Everything
runs at the real time (the CLI reads the clock), so nothing mixes a pinned
clock with keys or tokens made now. A bundle travels the way the peer
server moves it: the sender's stored envelope is handed to the receiver's
peer services (verify, store, receipt, then apply protocol bundles).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from click.testing import CliRunner, Result
from sqlalchemy import select

from gateway.api.app import create_api_app
from gateway.cli.main import cli
from gateway.core.keys import NodeKeyring
from gateway.core.roles import Actor, Role
from gateway.node.context import NodeContext
from gateway.node.own_keys import unlock_keyring
from gateway.node.runtime import Node, utc_now
from gateway.node.users import add_user
from gateway.peer.server import node_services
from gateway.store.models_exchange import OutboxEntry, envelope_path
from tests.node_api import RunningApi
from tests.nodes import open_pinned_pair
from tests.policies import set_approvals

__all__ = [
    "EXAMPLES",
    "PASSPHRASE",
    "ApiAnswer",
    "Pair",
    "Side",
    "example",
    "open_pair",
    "second_url",
]

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
PASSPHRASE = "correct horse battery staple"


def example(case_type: str) -> dict[str, Any]:
    """The documented example case of ``case_type`` (``docs/examples``)."""
    return dict(json.loads((EXAMPLES / f"{case_type}.json").read_text()))


@dataclass
class ApiAnswer:
    status: int
    body: Any
    text: str


@dataclass
class Side:
    """One opened node with an officer and a compliance officer."""

    node: Node
    keyring: NodeKeyring
    officer: Actor
    compliance: Actor
    tokens: dict[str, str] = field(default_factory=dict)
    running: RunningApi | None = None

    @property
    def home(self) -> Path:
        return self.node.settings.home

    def serve_api(self) -> RunningApi:
        """This node's local API on its Unix socket (started once, stopped with the pair)."""
        if self.running is None:
            self.running = RunningApi(self.node, lambda: self.keyring).start()
        return self.running

    def env(self, role: str = "officer") -> dict[str, str]:
        """The environment of a CLI user of this node acting with ``role``'s token:
        the home (for its socket) and the token; never the passphrase."""
        return {"GATEWAY_HOME": str(self.home), "GATEWAY_TOKEN": self.tokens[role]}

    def host_env(self) -> dict[str, str]:
        """The environment of a host operation on this node (the passphrase, no token)."""
        return {"GATEWAY_HOME": str(self.home), "GATEWAY_PASSPHRASE": PASSPHRASE}

    def cli(self, *args: str, role: str = "officer") -> Result:
        """Run the user command ``gateway ARGS`` in this process as the user of ``role``,
        against this node running (its local API on the home's socket)."""
        self.serve_api()
        return CliRunner().invoke(cli, list(args), env=self.env(role), catch_exceptions=False)

    def api(self, calls: list[tuple[str, str, Any]], *, role: str = "officer") -> list[ApiAnswer]:
        """Serve this node's local API on loopback and make ``calls`` (method, path, body)."""
        answers: list[ApiAnswer] = []

        async def main() -> None:
            app = create_api_app(NodeContext(self.node, lambda: self.keyring))
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            base = f"http://127.0.0.1:{runner.addresses[0][1]}"
            headers = {"Authorization": f"Bearer {self.tokens[role]}"}
            try:
                async with aiohttp.ClientSession() as session:
                    for method, path, body in calls:
                        async with session.request(
                            method, base + path, json=body, headers=headers
                        ) as resp:
                            raw = await resp.read()
                            text = raw.decode("utf-8", errors="replace")
                            try:
                                parsed: Any = json.loads(raw) if raw else None
                            except ValueError:
                                parsed = None
                            answers.append(ApiAnswer(resp.status, parsed, text))
            finally:
                await runner.cleanup()

        asyncio.run(main())
        return answers

    def envelope_of(self, bundle_id: str) -> Path:
        """The stored envelope of a bundle this node sent."""
        with self.node.db.transaction() as session:
            sha = session.scalars(
                select(OutboxEntry.envelope_sha256).where(OutboxEntry.bundle_id == bundle_id)
            ).one()
        return envelope_path(self.node.settings.blob_dir, sha)

    def receive_from(self, sender: Side, bundle_id: str) -> bytes:
        """What the peer server does with one posted envelope: verify, store,
        receipt, then apply protocol bundles. Returns the receipt."""
        services = node_services(NodeContext(self.node, self.keyring), skew=timedelta(minutes=5))
        return services.receive_envelope(sender.envelope_of(bundle_id), now=utc_now())


@dataclass
class Pair:
    jp: Side
    pk: Side


@contextmanager
def open_pair(root: Path, urls: dict[str, str], environ: dict[str, str]) -> Iterator[Pair]:
    """Open jp and pk under ``root`` on ``urls`` (one database each), pinned to each other."""
    env = {**environ, "GATEWAY_PASSPHRASE": PASSPHRASE, "GATEWAY_KEYSTORE_STRENGTH": "min"}
    now = utc_now()
    nodes = open_pinned_pair(root, urls, env, now=now)
    sides: dict[str, Side] = {}
    names = {"jp": ("tanaka", "sato"), "pk": ("bilal", "ayesha")}
    for node_id, node in nodes.items():
        officer, auditor = names[node_id]
        # These pairs serve tests of other things: one officer grants consent (k = 1),
        # on both nodes, which load the same policy (a grant naming fewer approvers than
        # the receiver's policy asks is refused); test_approvals.py tests the rule.
        set_approvals(node.settings.policy_dir, "consent-grant", 1)
        with node.db.transaction() as session:
            keyring = unlock_keyring(node.settings, PASSPHRASE.encode(), session, now=now)
            tokens = {
                "officer": add_user(
                    session, officer, "officer", created_by="admin", now=now
                ).token.text,
                "compliance": add_user(
                    session, auditor, "compliance", created_by="admin", now=now
                ).token.text,
            }
        sides[node_id] = Side(
            node,
            keyring,
            Actor(name=officer, role=Role.OFFICER),
            Actor(name=auditor, role=Role.COMPLIANCE),
            tokens,
        )
    try:
        yield Pair(jp=sides["jp"], pk=sides["pk"])
    finally:
        for side in sides.values():
            if side.running is not None:
                side.running.stop()
        for node in nodes.values():
            node.close()


def second_url(tmp_path: Path, database_url: str, make_pg: Callable[[], str]) -> str:
    """A second database on the same engine as ``database_url``."""
    if database_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path / 'pk.sqlite3'}"
    return make_pg()


@pytest.fixture
def pair(
    tmp_path: Path,
    migrated_database_factory: Callable[[str], str],
    clean_environ: dict[str, str],
) -> Iterator[Pair]:
    """The pinned pair on the engine under test (import it into a test module).

    Each node's database starts as a copy of the migrated template
    (``migrated_database_factory``), so ``init`` finds the schema in place."""
    urls = {"jp": migrated_database_factory("test"), "pk": migrated_database_factory("pk")}
    with open_pair(tmp_path, urls, clean_environ) as opened:
        yield opened
