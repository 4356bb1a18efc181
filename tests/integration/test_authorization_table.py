"""Every command and every local API route, tried with every identity.

The identities are one user of each role, no token, a wrong token and a
disabled user's token. For each (command or route, identity) the test asserts
exactly what the role table (:data:`gateway.core.roles.ACTIONS`) says:

- an allowed role gets past authorization: the command may still fail on the
  placeholder arguments the table gives it, but never with an ``access.*``
  reason;
- a role that is not allowed is refused with ``access.role`` ("needs the X
  role"), exit code 1 or HTTP 403;
- no token, a wrong token and a disabled user are refused with
  ``access.no-token``, ``access.token`` and ``access.disabled``, exit code 1 or
  HTTP 401;
- every refusal leaves the database (every row of every table) and the node
  home's files exactly as they were.

The commands are found by walking the click tree, and each command's action is
read from its own source (the ``app.actor("...")`` call), so a new command is
checked without editing this file; one that neither names an action nor is a
host operation fails the test. The number of cases checked is asserted, so the
table cannot pass by checking nothing.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import importlib
import inspect
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import click
import pytest
from click.testing import CliRunner
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import text

from gateway.api.app import ROUTES_KEY, create_api_app
from gateway.cli.main import cli
from gateway.core.roles import ACTIONS, Role
from gateway.node.context import NodeContext
from tests.conftest import create_pg_database, drop_pg_database
from tests.integration.test_api import (
    PASSPHRASE,
    PLANTED,
    PLANTED_ATTACHMENT,
    ApiNode,
    Client,
    exchange_pair,
    make_node,
    no_keyring,
    run_api,
    serve_api,
)
from tests.node_api import running_api

ROTATE_TOKEN = "/api/v1/me/token"
"""The route every user calls to replace their own token (``gateway users rotate-token``)."""

HOST_COMMANDS = {
    ("init",),
    ("serve",),
    ("sync",),
    ("purge",),
    ("backup",),
    ("restore",),
    ("db", "upgrade"),
    ("db", "status"),
    ("ledger", "checkpoint"),
    ("demo",),
    ("peer", "ping"),
    ("doctor",),
    ("users", "enrol"),
}
"""Operations on the host itself: they need the node home and its passphrase,
not a user token (see gateway.core.roles)."""

KEY_CEREMONIES = {"keys.export", "keys.rotate", "keys.rotate-root", "keys.revoke"}
"""CLI-only actions: they need the root key or the passphrase (docs/users.md)."""

IDENTITIES = ("admin", "officer", "compliance", "none", "wrong", "disabled")
WRONG_TOKEN = "ssw_0123456789abcdef_" + "Q" * 43
PLACEHOLDER = "nobody-x"
_ACTOR_CALL = re.compile(r"""\.(?:actor|client)\(\s*["']([a-z0-9.-]+)["']""")
"""``app.actor("x")`` (a host command that acts as a user) or ``app.client("x")`` (a
user command: a client of the running node, which authorizes it as ``x``)."""


# --- the commands --------------------------------------------------------------------


def leaf_commands(
    group: click.Group, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name in sorted(group.commands):
        command = group.commands[name]
        path = (*prefix, name)
        if isinstance(command, click.Group):
            yield from leaf_commands(command, path)
        else:
            yield path, command


def action_of(command: click.Command) -> str | None:
    """The action a command authorizes, read from its source; None if it names none."""
    assert command.callback is not None
    source = inspect.getsource(inspect.unwrap(command.callback))
    runner = getattr(command, "runner", None)
    if runner is not None:  # the body lives in a click-free module (gateway.cli.fast)
        module, _sep, name = runner.partition(":")
        source += inspect.getsource(getattr(importlib.import_module(module), name))
    found = set(_ACTOR_CALL.findall(source))
    assert len(found) <= 1, f"{command.name} authorizes as several actions: {found}"
    return found.pop() if found else None


def placeholder_args(
    command: click.Command, scratch: Path, text_value: str = PLACEHOLDER
) -> list[str]:
    """Arguments that get a command past click's parsing: every argument and
    required option gets a placeholder of its type (files that exist when the
    type demands it)."""
    args: list[str] = []
    for param in command.params:
        if param.expose_value is False:
            continue
        if isinstance(param, click.Option) and not param.required:
            continue
        value = placeholder_value(param, scratch, text_value)
        if isinstance(param, click.Option):
            args += [param.opts[0], value]
        else:
            args.append(value)
    return args


def placeholder_value(param: click.Parameter, scratch: Path, text_value: str) -> str:
    kind = param.type
    if isinstance(kind, click.Choice):
        return str(kind.choices[0])
    if isinstance(kind, click.Path):
        if kind.exists:
            if kind.file_okay:
                made = scratch / f"{param.name}.json"
                made.write_text('{"placeholder": true}\n')
                return str(made)
            folder = scratch / f"{param.name}-dir"
            folder.mkdir(exist_ok=True)
            return str(folder)
        return str(scratch / f"out-{param.name}")
    if isinstance(kind, click.File):
        made = scratch / f"{param.name}.json"
        made.write_text('{"placeholder": true}\n')
        return str(made)
    if isinstance(kind, (click.types.IntParamType, click.types.FloatParamType)):
        return "1"
    if isinstance(kind, click.DateTime):
        return "2030-01-01"
    if kind.name == "proposal-id":  # parsed as a UUID before anything is sent
        return "00000000-0000-4000-8000-000000000000"
    return text_value


# --- what a refusal must leave alone ------------------------------------------------


def snapshot(made: ApiNode) -> dict[str, Any]:
    """Every row of every table, and every file of the home but the SQLite file."""
    tables: dict[str, list[str]] = {}
    with made.node.db.engine.connect() as connection:
        for name in sorted(sa_inspect(connection).get_table_names()):
            rows = connection.execute(text(f'SELECT * FROM "{name}"')).all()
            tables[name] = sorted(repr(tuple(row)) for row in rows)
    files = {}
    for path in sorted(made.home.rglob("*")):
        if path.is_file() and ".sqlite3" not in path.name:
            files[str(path.relative_to(made.home))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"tables": tables, "files": files}


# --- expectations ---------------------------------------------------------------------


@dataclass
class Outcome:
    refused: bool
    reason: str | None
    detail: str


def expected_reason(identity: str, action: str | None) -> str | None:
    """The access reason an identity must be refused with, or None if allowed."""
    if identity == "none":
        return "access.no-token"
    if identity == "wrong":
        return "access.token"
    if identity == "disabled":
        return "access.disabled"
    if action is None:
        return None
    return None if Role(identity) in ACTIONS[action] else "access.role"


def token_for(made: ApiNode, identity: str) -> str | None:
    if identity == "none":
        return None
    if identity == "wrong":
        return WRONG_TOKEN
    return made.tokens[identity]


def _node_fixture(
    tmp_path: Path,
    database_url: str,
    clean_environ: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[ApiNode, str]]:
    monkeypatch.setenv("GATEWAY_PASSPHRASE", PASSPHRASE)
    monkeypatch.setenv("GATEWAY_KEYSTORE_STRENGTH", "min")
    made = make_node(tmp_path, database_url, clean_environ)
    try:
        # User commands are clients of the running node: serve its local API.
        with running_api(made.node, made.keyring):
            yield made, database_url
    finally:
        made.node.close()


@pytest.fixture
def table_node(
    tmp_path: Path,
    database_url: str,
    clean_environ: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[ApiNode, str]]:
    yield from _node_fixture(tmp_path, database_url, clean_environ, monkeypatch)


@pytest.fixture
def cli_table_node(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    clean_environ: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[ApiNode, str]]:
    """Like ``table_node``; the CLI table runs a process' worth of work per case, so
    its PostgreSQL run (about 20 s) is marked slow."""
    if request.param == "sqlite":
        yield from _node_fixture(
            tmp_path, f"sqlite:///{tmp_path / 'table.sqlite3'}", clean_environ, monkeypatch
        )
        return
    url = create_pg_database()
    try:
        yield from _node_fixture(tmp_path, url, clean_environ, monkeypatch)
    finally:
        drop_pg_database(url)


# --- the CLI --------------------------------------------------------------------------


def cli_commands() -> list[tuple[tuple[str, ...], click.Command, str]]:
    """(path, command, action) of every command that acts as a user."""
    found = []
    unclassified = []
    cli.load_all()
    for path, command in leaf_commands(cli):
        action = action_of(command)
        if path in HOST_COMMANDS:
            assert action is None, f"host command {' '.join(path)} asks for a user token"
            continue
        if action is None:
            unclassified.append(" ".join(path))
            continue
        assert action in ACTIONS, f"{' '.join(path)} authorizes as unknown action {action!r}"
        found.append((path, command, action))
    assert not unclassified, (
        f"commands that name no action and are no host operation: {unclassified}"
    )
    return found


def run_cli(made: ApiNode, identity: str, path: tuple[str, ...], args: list[str]) -> Outcome:
    token = token_for(made, identity)
    env: dict[str, str | None] = {
        "GATEWAY_TOKEN": token,
        "GATEWAY_PASSPHRASE": PASSPHRASE,
        "GATEWAY_HOME": str(made.home),
    }
    result = CliRunner().invoke(cli, [*path, *args, "--json"], env=env, catch_exceptions=False)
    if result.exit_code == 0:
        if path == ("users", "rotate-token"):
            # the user replaced their own token: the old one no longer works
            made.tokens[identity] = json.loads(result.stdout)["token"]
        return Outcome(refused=False, reason=None, detail="")
    reason = None
    for line in result.stdout.splitlines():
        if line.startswith('{"error"'):
            reason = json.loads(line)["error"]["reason"]
    return Outcome(
        refused=reason is not None and reason.startswith("access."),
        reason=reason,
        detail=f"exit {result.exit_code}: {result.stderr.strip()}",
    )


@pytest.mark.parametrize(
    "cli_table_node",
    ["sqlite", pytest.param("postgresql", marks=[pytest.mark.slow, pytest.mark.postgres])],
    indirect=True,
)
def test_every_command_with_every_identity(
    cli_table_node: tuple[ApiNode, str], tmp_path: Path
) -> None:
    made, _url = cli_table_node
    commands = cli_commands()
    assert len(commands) >= 4
    checked = 0
    for path, command, action in commands:
        scratch = tmp_path / "args" / "-".join(path)
        scratch.mkdir(parents=True)
        args = placeholder_args(command, scratch)
        state = snapshot(made)
        for identity in IDENTITIES:
            wanted = expected_reason(identity, action)
            outcome = run_cli(made, identity, path, args)
            where = f"gateway {' '.join(path)} as {identity}: {outcome.detail}"
            if wanted is None:
                assert not outcome.refused, where
            else:
                assert outcome.reason == wanted, where
                assert outcome.detail.startswith("exit 1:"), where
                if wanted == "access.role":
                    needed = " or ".join(sorted(r.value for r in ACTIONS[action]))
                    assert f"needs the {needed} role" in outcome.detail, where
                if wanted in ("access.no-token", "access.token"):
                    assert "token" in outcome.detail, where
                assert snapshot(made) == state, f"{where}: state changed"
            if wanted is None:
                state = snapshot(made)  # an allowed command may change things
            checked += 1
    assert checked == len(commands) * len(IDENTITIES)
    # the approver capability is given by administrators alone (docs/consent.md)
    assert (("users", "approver"), "users.approver") in {(p, a) for p, _c, a in commands}
    assert (("users", "rotate-token"), "users.rotate-token") in {(p, a) for p, _c, a in commands}
    assert ACTIONS["users.rotate-token"] == frozenset(Role)


# --- the local API ----------------------------------------------------------------------


def test_every_api_route_with_every_identity(table_node: tuple[ApiNode, str]) -> None:
    made, _url = table_node
    checked: list[tuple[str, str, str]] = []

    async def scenario() -> int:
        app = create_api_app(NodeContext(made.node, made.keyring))
        routes = app[ROUTES_KEY]
        async with serve_api(app) as base, aiohttp.ClientSession() as session:
            client = Client(session, base)
            for route in routes:
                url = re.sub(r"{[^}]+}", PLACEHOLDER, route.path)
                state = await asyncio.to_thread(snapshot, made)
                for identity in IDENTITIES:
                    wanted = expected_reason(identity, route.action)
                    body: dict[str, Any] | None = {} if route.method == "POST" else None
                    answer = await client.call(
                        route.method, url, token=token_for(made, identity), body=body
                    )
                    where = (
                        f"{route.method} {route.path} as {identity}: {answer.status} {answer.body}"
                    )
                    if wanted is None:
                        assert not (answer.reason or "").startswith("access."), where
                        assert answer.status not in (401, 403) or answer.reason == "consent", where
                        if route.path == ROTATE_TOKEN and answer.status == 200:
                            # the user replaced their own token: the old one no longer works
                            made.tokens[identity] = answer.body["token"]
                        state = await asyncio.to_thread(snapshot, made)
                    else:
                        assert answer.reason == wanted, where
                        assert answer.status == (403 if wanted == "access.role" else 401), where
                        after = await asyncio.to_thread(snapshot, made)
                        assert after == state, f"{where}: state changed"
                    checked.append((route.method, route.path, identity))
        return len(routes)

    route_count = asyncio.run(scenario())
    assert route_count >= 5
    # the approver capability is given by administrators alone (docs/consent.md)
    assert ("POST", "/api/v1/users/{name}/approver", "officer") in checked
    # every role replaces its own token
    assert {(m, p, i) for m, p, i in checked if p == ROTATE_TOKEN} == {
        ("POST", ROTATE_TOKEN, identity) for identity in IDENTITIES
    }
    assert len(checked) == route_count * len(IDENTITIES)
    assert len(set(checked)) == len(checked)


def test_actions_of_cli_and_api_are_all_in_the_role_table(table_node: tuple[ApiNode, str]) -> None:
    made, _url = table_node
    cli_actions = {action for _path, _command, action in cli_commands()}
    api_actions = {r.action for r in create_api_app(NodeContext(made.node, no_keyring))[ROUTES_KEY]}
    assert cli_actions <= set(ACTIONS)
    assert api_actions - {None} <= set(ACTIONS)
    # Every action the API offers is also a CLI command, so both are tried above.
    assert api_actions - {None} <= cli_actions
    # And every user action of the CLI is in the API, except the key ceremonies that
    # need the root key or the passphrase, which the serving process never holds.
    assert cli_actions - api_actions == KEY_CEREMONIES
    # Only whoami is open to every authenticated user, whatever the role.
    routes = create_api_app(NodeContext(made.node, no_keyring))[ROUTES_KEY]
    assert [r.path for r in routes if r.action is None] == ["/api/v1/whoami"]


# --- compliance sees metadata, never case content ----------------------------------------


def assert_no_content(where: str, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    for planted in (PLANTED, PLANTED_ATTACHMENT):
        assert planted.encode() not in data, f"{where} revealed case content"
        assert base64.b64encode(planted.encode()) not in data, f"{where} revealed case content"


@pytest.fixture
def exchanged(
    tmp_path: Path,
    database_url: str,
    pg_database_factory: Callable[[], str],
    clean_environ: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[ApiNode, ApiNode, str]]:
    """jp sent a case with planted text through the API; pk received it."""
    yield from exchange_pair(
        tmp_path, database_url, pg_database_factory, clean_environ, monkeypatch
    )


def test_compliance_gets_no_case_content_from_any_command_or_route(
    exchanged: tuple[ApiNode, ApiNode, str], tmp_path: Path
) -> None:
    jp, pk, bundle_id = exchanged
    tried: list[str] = []
    for side in (pk, jp):
        # Every command, as the compliance officer, aimed at the real bundle.
        for path, command, _action in cli_commands():
            scratch = tmp_path / "compliance" / side.node.node_id / "-".join(path)
            scratch.mkdir(parents=True)
            args = placeholder_args(command, scratch, bundle_id)
            result = CliRunner().invoke(
                cli,
                [*path, *args, "--json"],
                env={
                    "GATEWAY_TOKEN": side.tokens["compliance"],
                    "GATEWAY_PASSPHRASE": PASSPHRASE,
                    "GATEWAY_HOME": str(side.home),
                },
                catch_exceptions=False,
            )
            where = f"{side.node.node_id}: gateway {' '.join(path)} {' '.join(args)}"
            assert_no_content(where, result.stdout + result.stderr)
            if path == ("users", "rotate-token") and result.exit_code == 0:
                # the compliance officer replaced their own token; keep using the new one
                side.tokens["compliance"] = json.loads(result.stdout)["token"]
            for made in scratch.rglob("*"):
                if made.is_file():
                    assert_no_content(f"{where} (file {made.name})", made.read_bytes())
            tried.append(where)

        # Every route, as the compliance officer, aimed at the real bundle.
        async def routes(client: Client, side: ApiNode = side) -> None:
            for route in create_api_app(NodeContext(side.node, side.keyring))[ROUTES_KEY]:
                url = re.sub(r"{[^}]+}", bundle_id, route.path)
                queries = [""]
                if route.method == "GET":
                    queries = ["", f"?bundle={bundle_id}", "?attachments=true", "?format=jsonl"]
                for query in queries:
                    answer = await client.call(
                        route.method,
                        url + query,
                        token=side.tokens["compliance"],
                        body={} if route.method == "POST" else None,
                    )
                    where = f"{side.node.node_id}: {route.method} {url}{query}"
                    assert_no_content(where, answer.content)
                    if route.path == ROTATE_TOKEN and answer.status == 200:
                        side.tokens["compliance"] = answer.body["token"]
                    tried.append(where)

        run_api(side, routes)

    # The compliance officer did get the metadata: the ledger names the bundle.
    listed: list[Any] = []

    async def metadata(client: Client) -> None:
        answer = await client.call(
            "GET", f"/api/v1/ledger?bundle={bundle_id}", token=pk.tokens["compliance"]
        )
        assert answer.status == 200
        listed.extend(answer.body)

    run_api(pk, metadata)
    assert {entry["kind"] for entry in listed} >= {"bundle-received"}

    # Positive control: the same bundle does reveal the planted text to an officer,
    # so the checks above looked where the content would have been.
    shown: dict[str, Any] = {}

    async def officer_reads(client: Client) -> None:
        answer = await client.call(
            "GET", f"/api/v1/bundles/{bundle_id}?attachments=true", token=pk.tokens["officer"]
        )
        assert answer.status == 200, answer.body
        shown.update(answer.body)

    run_api(pk, officer_reads)
    assert PLANTED in shown["case"]["summary"]
    assert base64.b64decode(shown["attachments"][0]["content_base64"]).endswith(
        f"{PLANTED_ATTACHMENT}\n".encode()
    )
    assert len(tried) >= 2 * len(cli_commands())


# --- the peer API refuses everything unsigned but health ------------------------------------


def test_every_peer_route_but_health_refuses_an_unsigned_request(
    table_node: tuple[ApiNode, str],
) -> None:
    made, _url = table_node
    from gateway.node.policy import load_policy  # noqa: PLC0415
    from gateway.peer.server import HEALTH_PATH, create_node_peer_app, limits_from_policy  # noqa: PLC0415
    from gateway.service.root import peer_routes  # noqa: PLC0415

    limits = limits_from_policy(load_policy(made.node.settings).limits)
    checked: list[tuple[str, str]] = []

    async def scenario() -> None:
        app = create_node_peer_app(
            NodeContext(made.node, made.keyring()), limits, extra_routes=peer_routes(made.node)
        )
        routes = [
            (route.method, route.resource.canonical)
            for route in app.router.routes()
            if route.resource is not None and route.method != "HEAD"
        ]
        async with serve_api(app) as base, aiohttp.ClientSession() as session:
            client = Client(session, base)
            for method, path in routes:
                url = re.sub(r"{[^}]+}", PLACEHOLDER, path)
                answer = await client.call(method, url, raw=b"{}" if method == "POST" else None)
                if path == HEALTH_PATH:
                    assert answer.status == 200
                    assert answer.body == {"status": "ok"}
                else:
                    assert answer.status == 401, f"{method} {path}: {answer.status}"
                checked.append((method, path))
            unknown = await client.call("GET", "/v1/no-such-route")
            assert unknown.status in (401, 404)

    asyncio.run(scenario())
    assert ("GET", "/v1/health") in checked
    assert ("POST", "/v1/envelopes") in checked
    assert len(checked) >= 4
