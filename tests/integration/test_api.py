"""The local API over a real loopback socket, on SQLite and PostgreSQL.

Authentication before routing, the error mapping, bounded bodies, request ids,
one log line per request, and user management through the same service
functions the CLI uses.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from structlog.testing import capture_logs

import gateway.node.own_keys
import gateway.node.policy
from gateway import log
from gateway.api import routes_common
from gateway.api.app import all_routes, create_api_app
from gateway.api.routes_common import ApiRoute, Call
from gateway.core.keys import NodeKeyring
from gateway.core.roles import Actor, Role
from gateway.core.tokens import parse_token
from gateway.errors import (
    AccessDenied,
    AlreadyExists,
    ConfigError,
    ConsentRefused,
    GatewayError,
    InvalidInput,
    NotFound,
    PolicyRefused,
    RefusedError,
    StorageError,
    TransportError,
    VerificationError,
    http_status_for,
)
from gateway.node import own_keys, peer_trust
from gateway.node.context import NodeContext
from gateway.node.inbox import read_bundle, receive_envelope
from gateway.node.ledger import checkpoint as ledger_checkpoint
from gateway.node.ledger import export as ledger_export
from gateway.node.ledger import witness as ledger_witness
from gateway.node.own_keys import unlock_keyring
from gateway.node.runtime import Node, utc_now
from gateway.node.setup import init_node
from gateway.node.users import add_user, disable_user
from gateway.settings import load_settings
from gateway.store.models_exchange import envelope_path
from gateway.store.models_users import UserRecord
from tests.conftest import _pg_admin, create_pg_database, drop_pg_database
from tests.node_api import running_api
from tests.nodes import free_port, gateway_env, start_serve, stop, wait_ready

PASSPHRASE = "correct horse battery staple for tests"
# Importing these registers their stages of node creation (keys, policies),
# exactly as the CLI does.
INIT_STAGES = (gateway.node.own_keys.__name__, gateway.node.policy.__name__)


@dataclass
class ApiNode:
    """A node home with one user of each role (and a disabled one), opened."""

    home: Path
    node: Node
    environ: dict[str, str]
    tokens: dict[str, str]
    unlocked: list[NodeKeyring] = field(default_factory=list)

    def keyring(self) -> NodeKeyring:
        """The node's unlocked keyring, as ``gateway serve`` provides it (unlocked once)."""
        if not self.unlocked:
            with self.node.db.transaction() as session:
                self.unlocked.append(
                    unlock_keyring(self.node.settings, PASSPHRASE.encode(), session)
                )
        return self.unlocked[0]


def make_node(
    tmp_path: Path, database_url: str, environ: dict[str, str], node_id: str = "jp"
) -> ApiNode:
    env = {**environ, "GATEWAY_PASSPHRASE": PASSPHRASE, "GATEWAY_KEYSTORE_STRENGTH": "min"}
    home = tmp_path / node_id
    result = init_node(home, node_id, now=utc_now(), db_url=database_url, environ=env)
    node = Node.open(load_settings(home, environ=env))
    tokens = {"admin": result.admin_token}
    with node.db.transaction() as session:
        for name, role in (("officer", "officer"), ("compliance", "compliance")):
            tokens[name] = add_user(
                session, name, role, created_by="host", by_host=True, now=utc_now()
            ).token.text
        tokens["disabled"] = add_user(
            session, "gone", "officer", created_by="host", by_host=True, now=utc_now()
        ).token.text
        disable_user(session, "gone", now=utc_now(), by=Actor(name="test", role=Role.ADMIN))
    return ApiNode(home=home, node=node, environ=env, tokens=tokens)


@pytest.fixture
def api_node(
    tmp_path: Path,
    database_url: str,
    clean_environ: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[ApiNode]:
    monkeypatch.setenv("GATEWAY_PASSPHRASE", PASSPHRASE)
    made = make_node(tmp_path, database_url, clean_environ)
    try:
        yield made
    finally:
        made.node.close()


@pytest.fixture
def sqlite_api_node(
    tmp_path: Path, clean_environ: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[ApiNode]:
    """For tests of the HTTP plumbing, which does not depend on the engine."""
    monkeypatch.setenv("GATEWAY_PASSPHRASE", PASSPHRASE)
    made = make_node(tmp_path, f"sqlite:///{tmp_path / 'api.sqlite3'}", clean_environ)
    try:
        yield made
    finally:
        made.node.close()


def no_keyring() -> NodeKeyring:
    raise AssertionError("these routes must not touch the keyring")


@asynccontextmanager
async def serve_api(app: web.Application) -> AsyncIterator[str]:
    """Run ``app`` on a free loopback port; yield its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@dataclass
class Answer:
    status: int
    body: Any
    headers: CIMultiDict[str]
    content: bytes

    @property
    def reason(self) -> str | None:
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            return str(self.body["error"]["reason"])
        return None


class Client:
    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        body: Any = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        data: bytes | None = raw
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        async with self.session.request(method, self.base + path, data=data, headers=sent) as resp:
            content = await resp.read()
            try:
                parsed: Any = json.loads(content) if content else None
            except ValueError:
                parsed = content
            return Answer(resp.status, parsed, CIMultiDict(resp.headers), content)


def run_api(
    made: ApiNode,
    scenario: Callable[[Client], Awaitable[None]],
    *,
    routes: tuple[ApiRoute, ...] | None = None,
    keyring: Callable[[], NodeKeyring] | None = None,
) -> None:
    """Serve the node's API on loopback and run ``scenario`` against it."""

    async def main() -> None:
        app = create_api_app(NodeContext(made.node, keyring or made.keyring), routes=routes)
        async with serve_api(app) as base, aiohttp.ClientSession() as session:
            await scenario(Client(session, base))

    asyncio.run(main())


def user_count(made: ApiNode) -> int:
    with made.node.db.transaction() as session:
        return int(session.scalar(select(func.count()).select_from(UserRecord)) or 0)


# --- authentication -------------------------------------------------------------


def test_whoami_names_the_owner_of_each_token(sqlite_api_node: ApiNode) -> None:
    async def scenario(client: Client) -> None:
        for name in ("admin", "officer", "compliance"):
            answer = await client.call("GET", "/api/v1/whoami", token=sqlite_api_node.tokens[name])
            assert answer.status == 200
            assert answer.body == {"name": name, "role": name, "node": "jp"}

    run_api(sqlite_api_node, scenario)


BAD_AUTHORIZATION = [
    (None, "access.no-token"),
    ("Basic YWRtaW46YWRtaW4=", "access.token"),
    ("Bearer", "access.token"),
    ("Bearer nonsense", "access.token"),
    ("Bearer ssw_0000000000000000_" + "A" * 43, "access.token"),
    ("Bearer " + "x" * 5000, "access.token"),
]
PATHS_TRIED_WITHOUT_TOKEN = [
    ("GET", "/api/v1/whoami"),
    ("GET", "/api/v1/users"),
    ("POST", "/api/v1/users"),
    ("GET", "/api/v1/no-such-route"),
    ("DELETE", "/"),
]


def test_missing_or_bad_token_gets_401_on_known_and_unknown_paths(sqlite_api_node: ApiNode) -> None:
    checked: list[tuple[str | None, str]] = []

    async def scenario(client: Client) -> None:
        for header, reason in BAD_AUTHORIZATION:
            headers = {} if header is None else {"Authorization": header}
            for method, path in PATHS_TRIED_WITHOUT_TOKEN:
                answer = await client.call(method, path, headers=headers)
                assert (answer.status, answer.reason) == (401, reason), (header, method, path)
                assert answer.headers["WWW-Authenticate"].startswith("Bearer")
                checked.append((header, path))

    run_api(sqlite_api_node, scenario)
    assert len(checked) == len(BAD_AUTHORIZATION) * len(PATHS_TRIED_WITHOUT_TOKEN)


def test_wrong_secret_for_a_known_token_id_is_refused(sqlite_api_node: ApiNode) -> None:
    real = sqlite_api_node.tokens["admin"]
    forged = real[:-1] + ("A" if real[-1] != "A" else "B")

    async def scenario(client: Client) -> None:
        answer = await client.call("GET", "/api/v1/whoami", token=forged)
        assert (answer.status, answer.reason) == (401, "access.token")

    run_api(sqlite_api_node, scenario)


def test_disabled_user_is_refused_with_401(sqlite_api_node: ApiNode) -> None:
    async def scenario(client: Client) -> None:
        answer = await client.call(
            "GET", "/api/v1/whoami", token=sqlite_api_node.tokens["disabled"]
        )
        assert (answer.status, answer.reason) == (401, "access.disabled")

    run_api(sqlite_api_node, scenario)


def test_unknown_route_with_valid_token_is_a_json_404(sqlite_api_node: ApiNode) -> None:
    async def scenario(client: Client) -> None:
        answer = await client.call(
            "GET", "/api/v1/nothing", token=sqlite_api_node.tokens["officer"]
        )
        assert (answer.status, answer.reason) == (404, "not-found")
        answer = await client.call("DELETE", "/api/v1/users", token=sqlite_api_node.tokens["admin"])
        assert (answer.status, answer.reason) == (405, "method-not-allowed")

    run_api(sqlite_api_node, scenario)


# --- users through the API --------------------------------------------------------


def test_admin_manages_users_and_tokens_through_the_api(api_node: ApiNode) -> None:
    admin = api_node.tokens["admin"]

    async def scenario(client: Client) -> None:
        added = await client.call(
            "POST", "/api/v1/users", token=admin, body={"name": "tanaka", "role": "officer"}
        )
        assert added.status == 201
        assert added.body["name"] == "tanaka"
        first = added.body["token"]
        me = await client.call("GET", "/api/v1/whoami", token=first)
        assert me.body["role"] == "officer"

        listed = await client.call("GET", "/api/v1/users", token=admin)
        assert listed.status == 200
        assert {u["name"] for u in listed.body} == {
            "admin",
            "officer",
            "compliance",
            "gone",
            "tanaka",
        }
        assert admin not in json.dumps(listed.body)
        assert first not in json.dumps(listed.body)

        renewed = await client.call("POST", "/api/v1/users/tanaka/token", token=admin)
        assert renewed.status == 200
        second = renewed.body["token"]
        assert (await client.call("GET", "/api/v1/whoami", token=first)).status == 401
        assert (await client.call("GET", "/api/v1/whoami", token=second)).status == 200

        disabled = await client.call("POST", "/api/v1/users/tanaka/disable", token=admin)
        assert disabled.body == {"name": "tanaka", "disabled": True}
        refused = await client.call("GET", "/api/v1/whoami", token=second)
        assert (refused.status, refused.reason) == (401, "access.disabled")

    run_api(api_node, scenario)


BAD_USER_BODIES: list[tuple[str, bytes, str, int, str]] = [
    (
        "truncated-json",
        b'{"name": "sato", "role": "officer"',
        "application/json",
        400,
        "request.json",
    ),
    ("not-an-object", b'["sato", "officer"]', "application/json", 400, "request.json"),
    (
        "duplicate-key",
        b'{"name": "a", "name": "b", "role": "officer"}',
        "application/json",
        400,
        "request.json",
    ),
    ("too-deep", b"[" * 100 + b"]" * 100, "application/json", 400, "request.json"),
    (
        "wrong-content-type",
        b'{"name": "sato", "role": "officer"}',
        "text/plain",
        415,
        "request.content-type",
    ),
    ("unknown-role", b'{"name": "sato", "role": "king"}', "application/json", 422, "invalid-input"),
    ("bad-name", b'{"name": "Sato!", "role": "officer"}', "application/json", 422, "invalid-input"),
    ("missing-field", b'{"name": "sato"}', "application/json", 422, "invalid-input"),
    (
        "unknown-field",
        b'{"name": "sato", "role": "officer", "x": 1}',
        "application/json",
        422,
        "invalid-input",
    ),
    ("existing-user", b'{"name": "officer", "role": "officer"}', "application/json", 409, "exists"),
    (
        "body-too-large",
        b'{"name": "sato", "role": "officer", "pad": "' + b"x" * 70_000 + b'"}',
        "application/json",
        413,
        "request.too-large",
    ),
]


def test_bad_user_input_is_refused_by_family_and_nothing_is_written(api_node: ApiNode) -> None:
    before = user_count(api_node)
    checked: list[str] = []

    async def scenario(client: Client) -> None:
        for case, raw, content_type, status, reason in BAD_USER_BODIES:
            answer = await client.call(
                "POST",
                "/api/v1/users",
                token=api_node.tokens["admin"],
                raw=raw,
                headers={"Content-Type": content_type},
            )
            assert (answer.status, answer.reason) == (status, reason), case
            assert answer.body["error"]["message"], case
            checked.append(case)

    run_api(api_node, scenario)
    assert checked == [case[0] for case in BAD_USER_BODIES]
    assert user_count(api_node) == before


def test_disabling_an_unknown_user_is_a_404(sqlite_api_node: ApiNode) -> None:
    async def scenario(client: Client) -> None:
        answer = await client.call(
            "POST", "/api/v1/users/nobody/disable", token=sqlite_api_node.tokens["admin"]
        )
        assert (answer.status, answer.reason) == (404, "not-found")
        assert "nobody" in answer.body["error"]["message"]

    run_api(sqlite_api_node, scenario)


def test_officer_cannot_add_a_user_and_nothing_is_written(sqlite_api_node: ApiNode) -> None:
    before = user_count(sqlite_api_node)

    async def scenario(client: Client) -> None:
        answer = await client.call(
            "POST",
            "/api/v1/users",
            token=sqlite_api_node.tokens["officer"],
            body={"name": "mallory", "role": "admin"},
        )
        assert (answer.status, answer.reason) == (403, "access.role")
        assert "needs the admin role" in answer.body["error"]["message"]

    run_api(sqlite_api_node, scenario)
    assert user_count(sqlite_api_node) == before


# --- plumbing: request ids, logs, internal errors -----------------------------------


def test_request_id_is_echoed_when_sane_and_made_otherwise(sqlite_api_node: ApiNode) -> None:
    async def scenario(client: Client) -> None:
        token = sqlite_api_node.tokens["officer"]
        given = await client.call(
            "GET", "/api/v1/whoami", token=token, headers={"X-Request-Id": "abc-123"}
        )
        assert given.headers["X-Request-Id"] == "abc-123"
        odd = await client.call(
            "GET", "/api/v1/whoami", token=token, headers={"X-Request-Id": "a b\tc;<script>"}
        )
        made = odd.headers["X-Request-Id"]
        assert made != "a b\tc;<script>"
        assert len(made) == 16
        int(made, 16)
        refused = await client.call("GET", "/api/v1/whoami")
        assert len(refused.headers["X-Request-Id"]) == 16
        assert refused.headers["Cache-Control"] == "no-store"

    run_api(sqlite_api_node, scenario)


def test_one_summary_log_line_per_request_and_no_token_in_logs(sqlite_api_node: ApiNode) -> None:
    admin = sqlite_api_node.tokens["admin"]

    async def scenario(client: Client) -> None:
        await client.call("GET", "/api/v1/whoami", token=admin)
        await client.call("GET", "/api/v1/users", token=sqlite_api_node.tokens["officer"])
        created = await client.call(
            "POST", "/api/v1/users", token=admin, body={"name": "sato", "role": "officer"}
        )
        await client.call("GET", "/api/v1/whoami", token=created.body["token"])
        await client.call("GET", "/api/v1/whoami", token="ssw_" + "0" * 16 + "_" + "B" * 43)

    # Earlier commands in this process may have raised the level to warning.
    log.configure(level="info")
    with capture_logs() as logs:
        run_api(sqlite_api_node, scenario)
    summaries = [entry for entry in logs if entry["event"] == "api_request"]
    assert [(s["method"], s["route"], s["status"], s["user"]) for s in summaries] == [
        ("GET", "/api/v1/whoami", 200, "admin"),
        ("GET", "/api/v1/users", 403, "officer"),
        ("POST", "/api/v1/users", 201, "admin"),
        ("GET", "/api/v1/whoami", 200, "sato"),
        ("GET", "/api/v1/whoami", 401, None),
    ]
    text = repr(logs)
    assert parse_token(admin)[1] not in text
    assert "B" * 43 not in text


def test_unexpected_failure_answers_500_without_traceback_or_detail(
    sqlite_api_node: ApiNode,
) -> None:
    async def explode(_call: Call) -> web.StreamResponse:
        raise RuntimeError("secret detail /srv/gw/keys/op.key")

    routes = (*all_routes(), ApiRoute("GET", "/api/v1/explode", None, explode, "fails"))

    async def scenario(client: Client) -> None:
        answer = await client.call(
            "GET", "/api/v1/explode", token=sqlite_api_node.tokens["officer"]
        )
        assert (answer.status, answer.reason) == (500, "internal")
        text = json.dumps(answer.body)
        assert "Traceback" not in text
        assert "secret detail" not in text
        assert answer.headers["X-Request-Id"] in answer.body["error"]["message"]

    run_api(sqlite_api_node, scenario, routes=routes)


def test_routes_must_name_known_actions_and_stay_under_api_v1(sqlite_api_node: ApiNode) -> None:
    async def handler(_call: Call) -> web.StreamResponse:
        return web.json_response({})

    with pytest.raises(ValueError, match="unknown action"):
        create_api_app(
            NodeContext(sqlite_api_node.node, no_keyring),
            routes=[ApiRoute("GET", "/api/v1/x", "x.y", handler, "")],
        )
    with pytest.raises(ValueError, match="outside /api/v1/"):
        create_api_app(
            NodeContext(sqlite_api_node.node, no_keyring),
            routes=[ApiRoute("GET", "/v1/x", None, handler, "")],
        )
    with pytest.raises(ValueError, match="twice"):
        create_api_app(
            NodeContext(sqlite_api_node.node, no_keyring), routes=[*all_routes(), all_routes()[0]]
        )


# --- keys, peer and ledger through the API -----------------------------------------------


def test_admin_sees_the_same_manifest_as_the_key_service(api_node: ApiNode) -> None:
    with api_node.node.db.transaction() as session:
        manifest = own_keys.own_manifest(session)

    async def scenario(client: Client) -> None:
        answer = await client.call("GET", "/api/v1/keys", token=api_node.tokens["admin"])
        assert answer.status == 200
        assert answer.body["root_fingerprint"] == manifest.root_fingerprint
        assert answer.body["version"] == manifest.version
        assert answer.body["node"] == "jp"
        nobody = await client.call("GET", "/api/v1/peer", token=api_node.tokens["admin"])
        assert nobody.body == {"pinned": None}

    run_api(api_node, scenario)


def test_peer_is_pinned_only_with_its_true_fingerprint(
    api_node: ApiNode, tmp_path: Path, clean_environ: dict[str, str]
) -> None:
    env = {**clean_environ, "GATEWAY_PASSPHRASE": PASSPHRASE, "GATEWAY_KEYSTORE_STRENGTH": "min"}
    pk_home = tmp_path / "pk"
    init_node(pk_home, "pk", now=utc_now(), environ=env)
    exported = tmp_path / "pk-manifest.json"
    with Node.open(load_settings(pk_home, environ=env)) as pk, pk.db.transaction() as session:
        pk_manifest = own_keys.export_manifest(session, exported)
    encoded = base64.b64encode(exported.read_bytes()).decode()
    admin = api_node.tokens["admin"]
    wrong = "-".join(["AAAA"] * 8)

    async def scenario(client: Client) -> None:
        refused = await client.call(
            "POST",
            "/api/v1/peer",
            token=admin,
            body={"manifest_base64": encoded, "fingerprint": wrong},
        )
        assert refused.status == 422
        assert (await client.call("GET", "/api/v1/peer", token=admin)).body == {"pinned": None}
        garbled = await client.call(
            "POST",
            "/api/v1/peer",
            token=admin,
            body={"manifest_base64": "not base64!", "fingerprint": wrong},
        )
        assert (garbled.status, garbled.reason) == (422, "invalid-input")
        pinned = await client.call(
            "POST",
            "/api/v1/peer",
            token=admin,
            body={"manifest_base64": encoded, "fingerprint": pk_manifest.root_fingerprint},
        )
        assert pinned.status == 201, pinned.body
        assert pinned.body["node"] == "pk"
        shown = await client.call("GET", "/api/v1/peer", token=admin)
        assert shown.body["pinned"]["root_fingerprint"] == pk_manifest.root_fingerprint

    run_api(api_node, scenario)


def test_compliance_lists_verifies_and_exports_the_ledger(api_node: ApiNode) -> None:
    expected: dict[str, bytes] = {}
    for fmt in ("csv", "jsonl"):
        out = io.BytesIO()
        with api_node.node.db.transaction() as session:
            ledger_export.export(session, fmt, out)
        expected[fmt] = out.getvalue()
    token = api_node.tokens["compliance"]

    async def scenario(client: Client) -> None:
        listed = await client.call("GET", "/api/v1/ledger", token=token)
        assert listed.status == 200
        assert listed.body, "init records the key creation in the ledger"
        assert [e["seq"] for e in listed.body] == sorted(e["seq"] for e in listed.body)
        one = await client.call("GET", "/api/v1/ledger?limit=1", token=token)
        assert len(one.body) == 1
        verified = await client.call("POST", "/api/v1/ledger/verify", token=token)
        assert verified.status == 200
        assert verified.body["intact"] is True
        assert verified.body["entries"] == len(listed.body)
        for fmt, media in (("csv", "text/csv"), ("jsonl", "application/x-ndjson")):
            exported = await client.call("GET", f"/api/v1/ledger/export?format={fmt}", token=token)
            assert exported.status == 200
            assert exported.headers["Content-Type"].startswith(media)
            assert exported.headers["X-Entry-Count"] == str(len(listed.body))
            assert exported.headers["Cache-Control"] == "no-store"
            assert len(exported.headers["X-Request-Id"]) == 16
            assert exported.content == expected[fmt]
        for query, reason in (
            ("/api/v1/ledger/export?format=xml", "invalid-input"),
            ("/api/v1/ledger/export", "invalid-input"),
            ("/api/v1/ledger?limit=0", "invalid-input"),
            ("/api/v1/ledger?since=yesterday", "invalid-input"),
            ("/api/v1/ledger?kind=no-such-kind", "invalid-input"),
            ("/api/v1/ledger?limit=1&limit=2", "invalid-input"),
        ):
            bad = await client.call("GET", query, token=token)
            assert (bad.status, bad.reason) == (422, reason), query

    run_api(api_node, scenario)


# --- two pinned nodes and a bundle sent through the API ----------------------------------

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
PLANTED = "PLANTED-CASE-TEXT-7Q4Z"
PLANTED_ATTACHMENT = "PLANTED-ATTACHMENT-TEXT-K2M9"


def test_verify_streams_progress_lines_then_the_report_or_the_first_bad_entry(
    api_node: ApiNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy import text  # noqa: PLC0415

    from gateway.node.ledger import verify as ledger_verify_module  # noqa: PLC0415
    from tests.attacks.test_ledger_tampering import tamper  # noqa: PLC0415

    # A progress line at every entry, so a small ledger shows them.
    monkeypatch.setattr(ledger_verify_module, "_PROGRESS_EVERY", 1)
    token = api_node.tokens["compliance"]
    ndjson = {"Accept": "application/x-ndjson"}

    def lines(answer: Answer) -> list[dict[str, Any]]:
        assert answer.headers["Content-Type"].startswith("application/x-ndjson")
        assert answer.content.endswith(b"\n")
        return [json.loads(line) for line in answer.content.splitlines()]

    async def intact(client: Client) -> None:
        plain = await client.call("POST", "/api/v1/ledger/verify", token=token)
        assert plain.status == 200
        assert plain.headers["Content-Type"].startswith("application/json")
        streamed = await client.call("POST", "/api/v1/ledger/verify", token=token, headers=ndjson)
        assert streamed.status == 200
        got = lines(streamed)
        entries = plain.body["entries"]
        assert entries >= 1
        assert got[0] == {"progress": {"entries": 0, "total": entries}}
        steps = [line["progress"]["entries"] for line in got[1:-1]]
        assert steps == sorted(steps)
        assert 1 in steps
        assert steps[-1] == entries
        assert got[-1] == {"result": plain.body}
        # No token: refused before any line, as a plain 401.
        refused = await client.call("POST", "/api/v1/ledger/verify", headers=ndjson)
        assert refused.status == 401

    run_api(api_node, intact)
    tamper(
        api_node.node.db,
        lambda connection: connection.execute(
            text("UPDATE ledger_entry SET actor_name = 'mallory' WHERE seq = 0")
        ),
    )

    async def broken(client: Client) -> None:
        plain = await client.call("POST", "/api/v1/ledger/verify", token=token)
        assert plain.status == 422
        streamed = await client.call("POST", "/api/v1/ledger/verify", token=token, headers=ndjson)
        assert streamed.status == 200
        got = lines(streamed)
        assert "progress" in got[0]
        assert "result" not in got[-1]
        error = got[-1]["error"]
        assert error["status"] == 422
        assert error == {**plain.body["error"], "status": 422}
        assert error["check"]

    run_api(api_node, broken)


def test_a_storage_fault_in_a_streamed_verify_is_told_as_the_plain_answer_tells_it(
    sqlite_api_node: ApiNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last line of a streamed answer holds what the plain answer's body holds: for
    a storage fault the fixed text with the request id, the detail in the log."""
    from gateway.api import routes_ledger  # noqa: PLC0415

    detail = 'connection to server at "db.internal", port 6543 failed'

    def failing(*_args: Any, **_kwargs: Any) -> Any:
        raise StorageError(detail)

    monkeypatch.setattr(routes_ledger, "verify_ledger_with_keys", failing)
    token = sqlite_api_node.tokens["compliance"]
    answers: dict[str, Answer] = {}

    async def scenario(client: Client) -> None:
        for name, accept in (("plain", "application/json"), ("streamed", "application/x-ndjson")):
            answers[name] = await client.call(
                "POST",
                "/api/v1/ledger/verify",
                token=token,
                headers={"Accept": accept, "X-Request-Id": f"verify-{name}"},
            )

    log.configure(level="info")
    with capture_logs() as logs:
        run_api(sqlite_api_node, scenario)
    plain, streamed = answers["plain"], answers["streamed"]
    assert (plain.status, plain.reason) == (503, "storage")
    last = json.loads(streamed.content.splitlines()[-1])["error"]
    assert (last["status"], last["reason"]) == (503, "storage")
    for answer, request_id in ((plain, "verify-plain"), (streamed, "verify-streamed")):
        assert "db.internal" not in answer.content.decode()
        assert request_id in answer.content.decode()
    refused = [e for e in logs if e["event"] == "api_refused"]
    assert [e["detail"] for e in refused] == [detail, detail]


@pytest.fixture
def exchanged(
    tmp_path: Path,
    database_url: str,
    pg_database_factory: Callable[[], str],
    clean_environ: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[ApiNode, ApiNode, str]]:
    """jp and pk pinned to each other; a jp officer sent a case through the API and
    pk received it. Yields (jp, pk, bundle id)."""
    yield from exchange_pair(
        tmp_path, database_url, pg_database_factory, clean_environ, monkeypatch
    )


def exchange_pair(
    tmp_path: Path,
    database_url: str,
    pg_database_factory: Callable[[], str],
    clean_environ: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[ApiNode, ApiNode, str]]:
    """The body of the ``exchanged`` fixture, for other modules' fixtures."""
    monkeypatch.setenv("GATEWAY_PASSPHRASE", PASSPHRASE)
    monkeypatch.setenv("GATEWAY_KEYSTORE_STRENGTH", "min")
    second = (
        f"sqlite:///{tmp_path / 'pk.sqlite3'}"
        if database_url.startswith("sqlite")
        else pg_database_factory()
    )
    jp = make_node(tmp_path, database_url, clean_environ, "jp")
    pk = make_node(tmp_path, second, clean_environ, "pk")
    try:
        manifests = {}
        for side in (jp, pk):
            with side.node.db.transaction() as session:
                manifests[side.node.node_id] = own_keys.own_manifest(session)
        admin = Actor(name="admin", role=Role.ADMIN)
        for side, peer in ((jp, "pk"), (pk, "jp")):
            with side.node.db.transaction() as session:
                peer_trust.pin_peer(
                    session,
                    manifests[peer].raw,
                    node=peer,
                    expected_fingerprint=manifests[peer].root_fingerprint,
                    now=utc_now(),
                    actor=admin,
                )
        case = json.loads((EXAMPLES / "broker-misconduct.json").read_text())
        case["summary"] = f"{case['summary']} {PLANTED}"
        attachment = base64.b64encode(f"statement: {PLANTED_ATTACHMENT}\n".encode()).decode()
        sent: dict[str, Any] = {}

        async def send(client: Client) -> None:
            answer = await client.call(
                "POST",
                "/api/v1/bundles",
                token=jp.tokens["officer"],
                body={
                    "type": "broker-misconduct",
                    "case": case,
                    "attachments": [{"name": "statement.txt", "content_base64": attachment}],
                },
            )
            assert answer.status == 201, answer.body
            sent.update(answer.body)

        run_api(jp, send)
        envelope = envelope_path(jp.node.settings.blob_dir, sent["envelope_sha256"])
        receive_envelope(NodeContext(pk.node, pk.keyring()), envelope, now=utc_now())
        # User commands are clients of the running nodes: serve both local APIs.
        with running_api(jp.node, jp.keyring), running_api(pk.node, pk.keyring):
            yield jp, pk, str(sent["bundle_id"])
    finally:
        jp.node.close()
        pk.node.close()


def test_the_outbox_route_shows_attempts_last_error_and_next_attempt_of_a_failed_pass(
    exchanged: tuple[ApiNode, ApiNode, str],
) -> None:
    from gateway.node.outbox import deliver_once  # noqa: PLC0415
    from gateway.peer.client import PeerClient, PeerUnreachable  # noqa: PLC0415

    jp, _pk, bundle_id = exchanged
    port = free_port()

    async def failing_pass() -> None:
        url = f"http://127.0.0.1:{port}"
        async with PeerClient(jp.node.settings, jp.keyring(), peer_url=url) as client:
            await deliver_once(NodeContext(jp.node, jp.keyring()), client)

    with pytest.raises(PeerUnreachable) as caught:
        asyncio.run(failing_pass())
    seen: dict[str, Any] = {}

    async def scenario(client: Client) -> None:
        answer = await client.call("GET", "/api/v1/outbox?state=queued", token=jp.tokens["officer"])
        assert answer.status == 200, answer.body
        seen.update(answer.body)

    run_api(jp, scenario)
    (row,) = seen["bundles"]
    assert row["bundle_id"] == bundle_id
    assert row["attempts"] == 1
    assert row["last_error"] == caught.value.message
    assert f"peer at 127.0.0.1:{port}: connection refused" in row["last_error"]
    assert row["next_attempt"] > row["created"]


def test_disclosure_through_the_api_follows_the_consent_ledger(
    exchanged: tuple[ApiNode, ApiNode, str],
) -> None:
    _jp, pk, bundle_id = exchanged
    officer = pk.tokens["officer"]

    async def scenario(client: Client) -> None:
        blocked = await client.call(
            "POST",
            "/api/v1/disclosures",
            token=officer,
            body={"bundle_ids": [bundle_id], "recipient": "Daily News", "purpose": "a story"},
        )
        assert (blocked.status, blocked.reason) == (403, "consent"), blocked.body
        assert bundle_id in blocked.body["error"]["message"]
        assert PLANTED not in json.dumps(blocked.body)

        internal = await client.call(
            "POST",
            "/api/v1/disclosures",
            token=officer,
            body={"bundle_ids": [bundle_id], "recipient": "beoe", "purpose": "inquiry"},
        )
        assert internal.status == 201, internal.body
        released = b"".join(
            base64.b64decode(f["content_base64"]) for f in internal.body["contents"]
        )
        assert PLANTED.encode() in released
        assert PLANTED_ATTACHMENT.encode() in released
        for item in internal.body["contents"]:
            content = base64.b64decode(item["content_base64"])
            assert hashlib.sha256(content).hexdigest() == item["sha256"]

        asked = await client.call(
            "POST",
            "/api/v1/consents/requests",
            token=officer,
            body={"bundle_ids": [bundle_id], "recipient": "Daily News", "purpose": "a story"},
        )
        assert asked.status == 201, asked.body
        listing = await client.call("GET", "/api/v1/consents", token=officer)
        assert [r["request_id"] for r in listing.body["requests"]] == [asked.body["request_id"]]

        kinds = await client.call(
            "GET", f"/api/v1/ledger?bundle={bundle_id}", token=pk.tokens["compliance"]
        )
        recorded = [(e["kind"], e["actor"]) for e in kinds.body]
        assert ("disclosure-blocked", "officer") in recorded
        assert ("internal-share", "officer") in recorded

    run_api(pk, scenario)


# --- the API as `gateway serve` runs it ------------------------------------------------------


def test_gateway_serve_answers_the_local_api_on_its_own_port(sqlite_api_node: ApiNode) -> None:
    peer_port, api_port = free_port(), free_port()
    env = gateway_env(
        sqlite_api_node.home,
        GATEWAY_PASSPHRASE=PASSPHRASE,
        GATEWAY_SERVER_LISTEN=f"127.0.0.1:{peer_port}",
        GATEWAY_SERVER_API_LISTEN=f"127.0.0.1:{api_port}",
    )
    serve = start_serve(sqlite_api_node.home, env=env)
    try:
        ready = wait_ready(serve)
        assert f"127.0.0.1:{api_port}" in ready

        async def scenario() -> None:
            base = f"http://127.0.0.1:{api_port}"
            async with aiohttp.ClientSession() as session:
                client = Client(session, base)
                me = await client.call(
                    "GET", "/api/v1/whoami", token=sqlite_api_node.tokens["officer"]
                )
                assert me.body == {"name": "officer", "role": "officer", "node": "jp"}
                assert (await client.call("GET", "/api/v1/whoami")).status == 401
                # The peer port serves the peer protocol, not the user API.
                peer = Client(session, f"http://127.0.0.1:{peer_port}")
                wrong_door = await peer.call(
                    "GET", "/api/v1/whoami", token=sqlite_api_node.tokens["officer"]
                )
                assert wrong_door.status in (401, 404)

        asyncio.run(scenario())
    finally:
        assert stop(serve) == 0, serve.stderr_text()
    assert parse_token(sqlite_api_node.tokens["officer"])[1] not in serve.stderr_text()


ERROR_STATUSES: list[tuple[GatewayError, int]] = [
    (AccessDenied("x", reason="access.no-token"), 401),
    (AccessDenied("x", reason="access.token"), 401),
    (AccessDenied("x", reason="access.disabled"), 401),
    (AccessDenied("x", reason="access.role"), 403),
    (AccessDenied("x", reason="access.unknown-action"), 403),
    (ConsentRefused("x"), 403),
    (InvalidInput("x", reason="request.json"), 400),
    (InvalidInput("x", reason="request.content-type"), 415),
    (InvalidInput("x"), 422),
    (NotFound("x"), 404),
    (AlreadyExists("x"), 409),
    (RefusedError("x"), 409),
    (PolicyRefused("x", reason="request.too-large"), 413),
    (PolicyRefused("x", reason="policy.attachment-size"), 413),
    (PolicyRefused("x", reason="policy.case-size"), 413),
    (PolicyRefused("x", reason="policy.rate"), 429),
    (PolicyRefused("x", reason="request.timeout"), 408),
    (PolicyRefused("x"), 422),
    (VerificationError("x", check="signature"), 422),
    (TransportError("x"), 502),
    (StorageError("x"), 503),
    (ConfigError("x"), 500),
    (GatewayError("x"), 500),
]


def test_each_error_family_maps_to_its_status() -> None:
    got = [(type(exc).__name__, exc.reason, http_status_for(exc)) for exc, _ in ERROR_STATUSES]
    want = [(type(exc).__name__, exc.reason, status) for exc, status in ERROR_STATUSES]
    assert got == want


def test_both_servers_answer_the_same_status_for_the_same_error(
    sqlite_api_node: ApiNode, tmp_path: Path
) -> None:
    """The peer server and the local API take their status from the one registry."""
    from gateway.peer.server import MANIFEST_CONTENT_TYPE, MANIFESTS_PATH  # noqa: PLC0415
    from tests.integration.test_peer_server import JP, PK, signed_head  # noqa: PLC0415
    from tests.nodes import (  # noqa: PLC0415
        KeyTable,
        make_services,
        migrated_database,
        raw_exchange,
        start_test_server,
        status_of,
    )

    errors = [exc for exc, _ in ERROR_STATUSES]
    raised: list[GatewayError] = []

    async def fail(_call: Call) -> web.StreamResponse:
        raise raised[-1]

    def apply(_raw: bytes, *, now: object) -> None:
        raise raised[-1]

    api_statuses: list[int] = []

    async def scenario(client: Client) -> None:
        for exc in errors:
            raised.append(exc)
            answer = await client.call(
                "GET", "/api/v1/fail", token=sqlite_api_node.tokens["officer"]
            )
            api_statuses.append(answer.status)

    routes = (*all_routes(), ApiRoute("GET", "/api/v1/fail", None, fail, "fails"))
    run_api(sqlite_api_node, scenario, routes=routes)

    db = migrated_database(f"sqlite:///{tmp_path / 'peer.sqlite3'}")
    peer_statuses: list[int] = []
    try:
        services, _store = make_services(
            tmp_path,
            db,
            keys=KeyTable({"jp-op-1": JP.public_key}),
            receiver=PK,
            apply_manifest=apply,
        )
        with start_test_server(services) as server:
            for exc in errors:
                raised.append(exc)
                body = b"{}"
                head = signed_head(
                    JP, body, path=MANIFESTS_PATH, content_type=MANIFEST_CONTENT_TYPE
                )
                response, _closed = raw_exchange(server.port, head.encode() + body)
                peer_statuses.append(status_of(response))
    finally:
        db.dispose()
    want = [http_status_for(exc) for exc in errors]
    assert api_statuses == want
    assert peer_statuses == want


def test_compliance_audits_the_peer_through_the_api_over_a_real_peer_server(
    exchanged: tuple[ApiNode, ApiNode, str],
) -> None:
    jp, pk, bundle_id = exchanged
    from gateway.peer.ledger_routes import ledger_routes  # noqa: PLC0415
    from gateway.peer.server import create_node_peer_app, limits_from_policy  # noqa: PLC0415

    # jp witnesses a checkpoint of pk's ledger, then pk's ledger grows and is signed again.
    with pk.node.db.transaction() as session:
        witnessed = ledger_checkpoint.make_checkpoint(session, pk.keyring(), utc_now())
    with jp.node.db.transaction() as session:
        pinned = peer_trust.pinned_peer_manifest(session)
        assert pinned is not None
        ledger_witness.store_peer_checkpoint(
            session, witnessed.to_wire(), pinned, peer_node="pk", now=utc_now()
        )
    read_bundle(
        NodeContext(pk.node, pk.keyring()),
        Actor("officer", Role.OFFICER),
        bundle_id,
        out_dir=None,
        now=utc_now(),
    )
    with pk.node.db.transaction() as session:
        grown = ledger_checkpoint.make_checkpoint(session, pk.keyring(), utc_now())
    assert grown.checkpoint.size > witnessed.checkpoint.size

    limits = limits_from_policy(gateway.node.policy.load_policy(pk.node.settings).limits)
    answers: list[Answer] = []

    async def main() -> None:
        peer_app = create_node_peer_app(
            NodeContext(pk.node, pk.keyring()), limits, extra_routes=ledger_routes(pk.node.db)
        )
        async with serve_api(peer_app) as pk_url:
            settings = load_settings(
                jp.home, environ=jp.environ, overrides={"server": {"peer_url": pk_url}}
            )
            with Node.open(settings) as jp_node:
                app = create_api_app(NodeContext(jp_node, jp.keyring))
                async with serve_api(app) as base, aiohttp.ClientSession() as session:
                    client = Client(session, base)
                    answers.append(
                        await client.call(
                            "POST", "/api/v1/ledger/audit-peer", token=jp.tokens["compliance"]
                        )
                    )

    asyncio.run(main())
    audit = answers[0]
    assert audit.status == 200, audit.body
    assert audit.body["consistent"] is True
    assert audit.body["witnessed_size"] == witnessed.checkpoint.size
    assert audit.body["current_size"] == grown.checkpoint.size


def test_a_stalled_body_is_refused_and_writes_nothing(
    sqlite_api_node: ApiNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(routes_common, "BODY_TIMEOUT_SECONDS", 0.5)
    before = user_count(sqlite_api_node)
    replies: list[bytes] = []

    async def main() -> None:
        app = create_api_app(NodeContext(sqlite_api_node.node, no_keyring))
        async with serve_api(app) as base:
            port = int(base.rsplit(":", 1)[1])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            head = (
                "POST /api/v1/users HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {sqlite_api_node.tokens['admin']}\r\n"
                "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            )
            writer.write(head.encode() + b'{"name": "sato", ')
            await writer.drain()
            replies.append(await reader.readuntil(b"\r\n\r\n"))
            # Closed for real before the server stops: a half-closed connection keeps
            # the server reading the rest of the body for its lingering time (10 s).
            writer.close()
            await writer.wait_closed()

    asyncio.run(main())
    assert replies[0].startswith(b"HTTP/1.1 408")
    assert user_count(sqlite_api_node) == before


def test_the_nodes_own_faults_answer_a_fixed_text_and_log_the_cause(
    sqlite_api_node: ApiNode,
) -> None:
    """A storage or configuration fault's message (driver text, paths of the home)
    goes to the log line of its request id; the answer names the reason and that id.
    A request's own fault and a peer's keep their message."""
    detail = 'connection to server at "db.internal", port 6543 failed: /srv/gw/home'

    def raising(error: GatewayError) -> Callable[[Call], Awaitable[web.StreamResponse]]:
        async def handler(_call: Call) -> web.StreamResponse:
            raise error

        return handler

    routes = (
        *all_routes(),
        ApiRoute("GET", "/api/v1/test-storage", None, raising(StorageError(detail)), "fails"),
        ApiRoute("GET", "/api/v1/test-config", None, raising(ConfigError(detail)), "fails"),
        ApiRoute("GET", "/api/v1/test-peer", None, raising(TransportError("peer down")), "fails"),
        ApiRoute("GET", "/api/v1/test-input", None, raising(InvalidInput("bad field")), "fails"),
    )
    seen: dict[str, Answer] = {}

    async def scenario(client: Client) -> None:
        for name in ("storage", "config", "peer", "input"):
            seen[name] = await client.call(
                "GET", f"/api/v1/test-{name}", token=sqlite_api_node.tokens["officer"]
            )

    log.configure(level="info")
    with capture_logs() as logs:
        run_api(sqlite_api_node, scenario, routes=routes)
    for name, status in (("storage", 503), ("config", 500)):
        answer = seen[name]
        request_id = answer.headers["X-Request-Id"]
        assert (answer.status, answer.reason) == (status, name)
        assert "db.internal" not in answer.content.decode()
        assert "/srv/gw" not in answer.content.decode()
        assert request_id in answer.body["error"]["message"]
        refused = [e for e in logs if e["event"] == "api_refused" and e["reason"] == name]
        assert [e["detail"] for e in refused] == [detail]
    assert seen["peer"].body["error"]["message"] == "peer down"
    assert seen["input"].body["error"]["message"] == "bad field"


@pytest.mark.postgres
def test_a_database_that_went_away_is_a_503_that_does_not_name_the_server(
    tmp_path: Path, clean_environ: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real fault: the node's PostgreSQL database disappears under it. libpq's
    text (server address, port, database name) reaches the log, not the answer."""
    monkeypatch.setenv("GATEWAY_PASSPHRASE", PASSPHRASE)
    url = create_pg_database()
    name = str(make_url(url).database)
    made = make_node(tmp_path, url, clean_environ)
    answers: list[Answer] = []

    async def scenario(client: Client) -> None:
        # A fixed request id: a random one could hold the digits looked for below.
        answers.append(
            await client.call(
                "GET",
                "/api/v1/whoami",
                token=made.tokens["officer"],
                headers={"X-Request-Id": "went-away-1"},
            )
        )

    try:
        _pg_admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = :name AND pid <> pg_backend_pid()",
            name=name,
        )
        _pg_admin(f'ALTER DATABASE "{name}" RENAME TO "{name}_gone"')
        try:
            log.configure(level="info")
            with capture_logs() as logs:
                run_api(made, scenario)
        finally:
            _pg_admin(f'ALTER DATABASE "{name}_gone" RENAME TO "{name}"')
    finally:
        made.node.close()
        drop_pg_database(url)
    (answer,) = answers
    assert (answer.status, answer.reason) == (503, "storage")
    for told in ("5432", "127.0.0.1", name):
        assert told not in answer.content.decode()
    assert "went-away-1" in answer.body["error"]["message"]
    (refused,) = [e for e in logs if e["event"] == "api_refused"]
    assert name in refused["detail"]
