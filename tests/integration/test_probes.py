"""The local API's probes and metrics, on a real socket, on both engines.

- ``/livez`` and ``/readyz`` answer without a token and say nothing but
  live/ready and the names of failed checks;
- ``/readyz`` turns not-ready when the database stops answering (SQLite: the
  file is moved away; PostgreSQL: the database refuses connections and the
  node's are terminated; the shared server keeps running) or the policy
  stops loading or the keys are not held, and ready again once repaired;
- ``/metrics`` answers a valid token of any role or a loopback request
  without one, refuses a bad token, and never names a raw path or a case.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from gateway.api.app import create_api_app
from gateway.core.keys import NodeKeyring
from gateway.errors import GatewayError
from gateway.node.context import NodeContext
from tests.conftest import PG_ADMIN_URL
from tests.integration.test_api import ApiNode, Client, make_node, serve_api

ROLES = ("admin", "officer", "compliance")
READY_KEYS = {"status", "checks", "failed", "peer", "outbox_queued"}


@pytest.fixture
def probed(
    tmp_path: Path,
    database_url: str,
    clean_environ: dict[str, str],
) -> Iterator[ApiNode]:
    made = make_node(tmp_path, database_url, clean_environ)
    try:
        yield made
    finally:
        made.node.close()


def _get(base: str, path: str, *, token: str | None = None) -> tuple[int, Any, str]:
    import aiohttp  # noqa: PLC0415

    async def go() -> tuple[int, Any, str]:
        async with aiohttp.ClientSession() as session:
            answer = await Client(session, base).call("GET", path, token=token)
            return answer.status, answer.body, answer.headers.get("Content-Type", "")

    return asyncio.run(go())


@contextmanager
def running(made: ApiNode, keyring: Callable[[], NodeKeyring] | None = None) -> Iterator[str]:
    """The node's local API app on a loopback port, in a background event loop."""
    import threading  # noqa: PLC0415

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    app = create_api_app(NodeContext(made.node, keyring or made.keyring))
    context = serve_api(app)
    base = asyncio.run_coroutine_threadsafe(context.__aenter__(), loop).result(30)
    try:
        yield base
    finally:
        asyncio.run_coroutine_threadsafe(context.__aexit__(None, None, None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# ------------------------------------------------------------------ liveness and readiness


def test_probes_answer_without_a_token_and_reveal_only_their_status(probed: ApiNode) -> None:
    with running(probed) as base:
        live = _get(base, "/livez")
        ready = _get(base, "/readyz")
        # Anything else still needs a token.
        assert _get(base, "/api/v1/whoami")[0] == 401
    assert live[:2] == (200, {"status": "live"})
    status, body, _ = ready
    assert status == 200, body
    assert set(body) == READY_KEYS
    assert body["status"] == "ready"
    assert body["checks"] == {"database": "ok", "keyring": "ok", "policy": "ok"}
    assert body["failed"] == []
    assert body["peer"] == "unknown"
    assert body["outbox_queued"] == 0
    # No version, node id, URL or path in the answer.
    flat = json.dumps(body)
    for secretish in ("jp", "0.1", "sqlite", "postgres", str(probed.home)):
        assert secretish not in flat


@contextmanager
def database_stopped(made: ApiNode, engine_name: str) -> Iterator[None]:
    """Make the node's database stop answering, and bring it back afterwards.

    SQLite: the file is moved away (the process runs as root in CI, so a mode
    change would not stop it reading). PostgreSQL: the node's database refuses
    new connections and the node's open ones are terminated; the server itself,
    shared with other tests, keeps running.
    """
    url = make_url(made.node.db.url)
    if engine_name == "sqlite":
        path = Path(str(url.database))
        aside = path.with_name(path.name + ".aside")
        path.rename(aside)
        try:
            yield
        finally:
            aside.rename(path)
        return
    name = url.database
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
        try:
            yield
        finally:
            with admin.connect() as connection:
                connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
    finally:
        admin.dispose()


def test_readyz_turns_not_ready_when_the_database_stops_answering_and_ready_after(
    probed: ApiNode, engine_name: str
) -> None:
    with running(probed) as base:
        assert _get(base, "/readyz")[0] == 200
        with database_stopped(probed, engine_name):
            status, body, _ = _get(base, "/readyz")
            # Liveness does not depend on the database.
            assert _get(base, "/livez")[0] == 200
        again, body_after, _ = _get(base, "/readyz")
    assert status == 503, body
    assert body["status"] == "not-ready"
    assert body["failed"] == ["database"]
    assert body["checks"]["database"] == "failed"
    assert body["outbox_queued"] is None
    assert (again, body_after["status"]) == (200, "ready"), body_after


@contextmanager
def broken_policy(made: ApiNode) -> Iterator[None]:
    policy = made.node.settings.policy_dir / "policy.toml"
    kept = policy.read_bytes()
    policy.write_text("this is = not [valid toml\n", encoding="utf-8")
    try:
        yield
    finally:
        policy.write_bytes(kept)


def _no_keys() -> NodeKeyring:
    raise GatewayError("the keystore is locked", reason="keys.locked")


@pytest.mark.parametrize("failing", ["policy", "keyring"])
def test_readyz_names_the_failed_check_for_policy_and_keys(
    tmp_path: Path, clean_environ: dict[str, str], failing: str
) -> None:
    made = make_node(tmp_path, f"sqlite:///{tmp_path / 'r.sqlite3'}", clean_environ)
    try:
        if failing == "keyring":
            with running(made, _no_keys) as base:
                status, body, _ = _get(base, "/readyz")
            assert (status, body["failed"]) == (503, ["keyring"])
            return
        with running(made) as base:
            with broken_policy(made):
                status, body, _ = _get(base, "/readyz")
            after = _get(base, "/readyz")[0]
        assert (status, body["failed"]) == (503, ["policy"])
        assert body["checks"] == {"database": "ok", "keyring": "ok", "policy": "failed"}
        assert after == 200
    finally:
        made.node.close()


# ------------------------------------------------------------------ metrics


def _families(exposition: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(exposition)}


def test_metrics_answer_any_role_and_loopback_and_refuse_a_bad_token(probed: ApiNode) -> None:
    with running(probed) as base:
        by_role = {role: _get(base, "/metrics", token=probed.tokens[role]) for role in ROLES}
        loopback = _get(base, "/metrics")
        bad = _get(base, "/metrics", token="ssw_0000000000000000_" + "A" * 43)
        disabled = _get(base, "/metrics", token=probed.tokens["disabled"])
    for role, (status, _body, content_type) in by_role.items():
        assert status == 200, role
        assert content_type.startswith("text/plain"), role
    assert loopback[0] == 200
    assert bad[0] == 401
    assert disabled[0] == 401


def _non_loopback_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_metrics_without_a_token_are_refused_off_loopback(probed: ApiNode) -> None:
    from aiohttp import web  # noqa: PLC0415

    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address to connect from")

    async def scenario() -> tuple[int, int]:
        import aiohttp  # noqa: PLC0415

        app = create_api_app(NodeContext(probed.node, probed.keyring))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, address, 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with aiohttp.ClientSession() as session:
                client = Client(session, f"http://{address}:{port}")
                anonymous = await client.call("GET", "/metrics")
                with_token = await client.call("GET", "/metrics", token=probed.tokens["officer"])
                return anonymous.status, with_token.status
        finally:
            await runner.cleanup()

    assert asyncio.run(scenario()) == (401, 200)


def test_metrics_parse_and_name_route_templates_never_raw_paths(probed: ApiNode) -> None:
    missing = "b-" + "9" * 30
    with running(probed) as base:
        assert _get(base, f"/api/v1/bundles/{missing}", token=probed.tokens["officer"])[0] == 404
        _get(base, f"/no/such/{missing}", token=probed.tokens["officer"])
        _get(base, "/api/v1/whoami", token=probed.tokens["officer"])
        status, exposition, _ = _get(base, "/metrics")
    assert status == 200
    text_body = exposition.decode() if isinstance(exposition, bytes) else str(exposition)
    families = _families(text_body)
    routes = {
        sample.labels["route"]
        for sample in families["ssw_gateway_http_request_duration_seconds"].samples
        if sample.labels.get("listener") == "api"
    }
    assert {"/api/v1/whoami", "/api/v1/bundles/{bundle_id}", "(unmatched)"} <= routes
    assert missing not in text_body
    assert "officer" not in text_body
    # The database-backed families are there, read at scrape time.
    up = families["ssw_gateway_database_up"].samples[0].value
    assert up == 1
    queued = families["ssw_gateway_outbox_queued"].samples
    assert [(s.labels["channel"], s.value) for s in queued] == [("jp->pk", 0)]
    versions = {
        s.labels["side"]: s.value for s in families["ssw_gateway_key_manifest_version"].samples
    }
    assert versions["own"] >= 1
    days = {
        (s.labels["side"], s.labels["use"]): s.value
        for s in families["ssw_gateway_key_expiry_days"].samples
    }
    assert days[("own", "sign")] > 30
    assert days[("own", "manifest")] > 30
    decisions = {
        s.labels["outcome"]: s.value
        for s in families["ssw_gateway_consent_decisions"].samples
        if s.name.endswith("_total")
    }
    assert decisions == {"blocked": 0, "internal": 0, "made": 0}
    assert families["ssw_gateway_ledger_entries"].samples[0].value >= 1


def test_metrics_of_two_nodes_in_one_process_stay_apart(
    tmp_path: Path, clean_environ: dict[str, str]
) -> None:
    first = make_node(tmp_path / "a", f"sqlite:///{tmp_path / 'a.sqlite3'}", clean_environ)
    second = make_node(tmp_path / "b", f"sqlite:///{tmp_path / 'b.sqlite3'}", clean_environ, "pk")
    try:
        first.node.metrics.envelope_refused("envelope.signature")
        first.node.metrics.envelope_refused("a reason with spaces and <html>")
        with running(first) as base_a, running(second) as base_b:
            a = _families(_get(base_a, "/metrics")[1].decode())
            b = _families(_get(base_b, "/metrics")[1].decode())
    finally:
        first.node.close()
        second.node.close()

    def refused(families: dict[str, Any]) -> dict[str, float]:
        return {
            s.labels["check"]: s.value
            for s in families["ssw_gateway_envelopes_refused"].samples
            if s.name.endswith("_total")
        }

    assert refused(a) == {"envelope.signature": 1, "other": 1}
    assert refused(b) == {}
    assert [s.labels["channel"] for s in b["ssw_gateway_outbox_queued"].samples] == ["pk->jp"]
