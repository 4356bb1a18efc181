"""``gateway peer ping``: the link test, over real sockets against a real peer server.

The peer is a node opened in this process serving its real peer application
(``create_node_peer_app``) on a loopback socket, plain or with mutual TLS from
the test PKI. The clock of the pinging side is a parameter: a skewed clock
signs the request and is measured against.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from gateway.cli.main import cli
from gateway.core.keys import NodeKeyring
from gateway.core.roles import Actor, Role
from gateway.node import own_keys, peer_trust
from gateway.node.context import NodeContext
from gateway.node.outbox import send_case
from gateway.node.own_keys import unlock_keyring
from gateway.node.runtime import Node
from gateway.node.setup import init_node
from gateway.peer.ping import PingReport, ping_peer
from gateway.peer.server import create_node_peer_app
from gateway.settings import ServerSettings, Settings, load_settings
from gateway.tls import server_ssl_context
from tests.nodes import REPO, TEST_LIMITS, ServerThread, free_port
from tests.pki import Authority, Issued

PASSPHRASE = "correct horse battery staple"
ADMIN = Actor(name="admin", role=Role.ADMIN)


@dataclass
class Side:
    node: Node
    keyring: NodeKeyring


def _open(root: Path, node_id: str, url: str, env: dict[str, str], now: datetime) -> Side:
    init_node(root / node_id, node_id, now=now, db_url=url, environ=env)
    node = Node.open(load_settings(root / node_id, environ=env))
    with node.db.transaction() as session:
        keyring = unlock_keyring(node.settings, PASSPHRASE.encode(), session, now=now)
    return Side(node, keyring)


def _pin(at: Side, of: Side, now: datetime) -> None:
    with of.node.db.transaction() as session:
        manifest = own_keys.own_manifest(session)
    with at.node.db.transaction() as session:
        peer_trust.pin_peer(
            session,
            manifest.raw,
            node=of.node.node_id,
            expected_fingerprint=manifest.root_fingerprint,
            now=now,
            actor=ADMIN,
        )


@pytest.fixture
def make_pair(
    tmp_path: Path, database_url: str, clean_environ: dict[str, str]
) -> Iterator[Callable[..., tuple[Side, Side]]]:
    """jp on the engine under test, pk on SQLite; pins as asked."""
    env = {**clean_environ, "GATEWAY_PASSPHRASE": PASSPHRASE, "GATEWAY_KEYSTORE_STRENGTH": "min"}
    opened: list[Side] = []

    def make(*, jp_pins_pk: bool = True, pk_pins_jp: bool = True) -> tuple[Side, Side]:
        now = datetime.now(UTC)
        jp = _open(tmp_path, "jp", database_url, env, now)
        pk = _open(tmp_path, "pk", f"sqlite:///{tmp_path / 'pk.sqlite3'}", env, now)
        opened.extend([jp, pk])
        if jp_pins_pk:
            _pin(jp, pk, now)
        if pk_pins_jp:
            _pin(pk, jp, now)
        return jp, pk

    yield make
    for side in opened:
        side.node.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("pki")
    ca = Authority(folder, "pair")
    rogue = Authority(folder, "rogue")
    return {
        "ca": ca,
        "rogue": rogue,
        "pk": ca.issue("pk", server=True, client=True),
        "jp": ca.issue("jp", server=True, client=True),
    }


def _serve(pk: Side, tls: ServerSettings | None = None) -> ServerThread:
    app = create_node_peer_app(NodeContext(pk.node, pk.keyring), TEST_LIMITS)
    context = server_ssl_context(tls, host="127.0.0.1") if tls is not None else None
    return ServerThread(app, TEST_LIMITS, ssl_context=context)


def _with(side: Side, url: str, **server: Any) -> Settings:
    settings = side.node.settings
    return settings.model_copy(
        update={"server": settings.server.model_copy(update={"peer_url": url, **server})}
    )


def _ping(
    side: Side, settings: Settings, clock: Callable[[], datetime] | None = None
) -> PingReport:
    limits = aiohttp.ClientTimeout(total=None, connect=5, sock_connect=5, sock_read=10)
    return asyncio.run(
        ping_peer(
            NodeContext(side.node, side.keyring),
            settings=settings,
            clock=clock or (lambda: datetime.now(UTC)),
            limits=limits,
        )
    )


def _statuses(report: PingReport) -> dict[str, str]:
    return {step.name: step.status for step in report.steps}


def test_a_healthy_pair_answers_every_step(make_pair: Callable[..., tuple[Side, Side]]) -> None:
    jp, pk = make_pair()
    with _serve(pk) as running:
        report = _ping(jp, _with(jp, running.url))
    assert report.ok, report.to_dict()
    assert _statuses(report) == {
        "pinned": "ok",
        "connect": "ok",
        "signed-request": "ok",
        "clock": "ok",
        "manifest": "ok",
        "mode": "ok",
    }
    assert report.round_trip_ms is not None
    assert report.round_trip_ms >= 0
    assert report.clock_skew_seconds is not None
    assert abs(report.clock_skew_seconds) < 5
    assert report.skew_window_seconds == 300
    assert (report.our_manifest_version, report.peer_pinned_manifest_version) == (1, 1)


def test_a_healthy_pair_over_mutual_tls(
    make_pair: Callable[..., tuple[Side, Side]], pki: dict[str, Any]
) -> None:
    jp, pk = make_pair()
    served = ServerSettings(tls_cert=pki["pk"].cert, tls_key=pki["pk"].key, tls_ca=pki["ca"].path)
    ours: Issued = pki["jp"]
    with _serve(pk, served) as running:
        settings = _with(
            jp, running.url, tls_cert=ours.cert, tls_key=ours.key, tls_ca=pki["ca"].path
        )
        report = _ping(jp, settings)
    assert report.ok, report.to_dict()
    connect = next(step for step in report.steps if step.name == "connect")
    assert connect.detail.startswith(f"TLS to {running.url}")


def test_peer_down_fails_at_connect_naming_the_cause(
    make_pair: Callable[..., tuple[Side, Side]],
) -> None:
    jp, _pk = make_pair()
    port = free_port()
    report = _ping(jp, _with(jp, f"http://127.0.0.1:{port}"))
    assert not report.ok
    failure = report.failure
    assert failure is not None
    assert (failure.name, failure.reason) == ("connect", "transport.refused")
    assert f"nothing listens on 127.0.0.1:{port}" in failure.detail
    assert report.round_trip_ms is None


def test_wrong_ca_fails_at_connect_with_unknown_issuer(
    make_pair: Callable[..., tuple[Side, Side]], pki: dict[str, Any]
) -> None:
    jp, pk = make_pair()
    served = ServerSettings(tls_cert=pki["pk"].cert, tls_key=pki["pk"].key, tls_ca=pki["ca"].path)
    with _serve(pk, served) as running:
        settings = _with(
            jp,
            running.url,
            tls_cert=pki["jp"].cert,
            tls_key=pki["jp"].key,
            tls_ca=pki["rogue"].path,
        )
        report = _ping(jp, settings)
    failure = report.failure
    assert failure is not None
    assert (failure.name, failure.reason) == ("connect", "transport.tls.unknown-issuer")
    assert "unknown issuer" in failure.detail


@pytest.mark.parametrize(
    ("ahead", "ok", "clock", "failed_at"),
    [
        (timedelta(seconds=120), True, "warn", None),  # beyond a quarter of 300 s, within it
        (timedelta(seconds=-120), True, "warn", None),
        (timedelta(minutes=10), False, "fail", "signed-request"),  # outside the window
    ],
)
def test_clock_skew_is_measured_and_judged_against_the_policy_window(
    make_pair: Callable[..., tuple[Side, Side]],
    ahead: timedelta,
    ok: bool,
    clock: str,
    failed_at: str | None,
) -> None:
    jp, pk = make_pair()
    with _serve(pk) as running:
        report = _ping(jp, _with(jp, running.url), clock=lambda: datetime.now(UTC) + ahead)
    assert report.ok is ok, report.to_dict()
    assert _statuses(report)["clock"] == clock
    assert report.clock_skew_seconds is not None
    # Our clock is ahead by `ahead`: the peer's is behind by as much (to the second).
    assert abs(report.clock_skew_seconds + ahead.total_seconds()) < 2.5
    failure = report.failure
    if failed_at is None:
        assert failure is None
    else:
        assert failure is not None
        assert (failure.name, failure.reason) == (failed_at, "auth.stale")
        assert "time window" in failure.detail


def test_a_peer_that_has_not_pinned_us_refuses_the_signed_request(
    make_pair: Callable[..., tuple[Side, Side]],
) -> None:
    jp, pk = make_pair(pk_pins_jp=False)
    with _serve(pk) as running:
        report = _ping(jp, _with(jp, running.url))
    failure = report.failure
    assert failure is not None
    assert (failure.name, failure.reason) == ("signed-request", "auth.unknown-key")
    assert "has not pinned our manifest" in failure.detail
    assert _statuses(report)["connect"] == "ok"


def test_a_peer_we_have_not_pinned_fails_the_ping_though_the_link_works(
    make_pair: Callable[..., tuple[Side, Side]],
) -> None:
    jp, pk = make_pair(jp_pins_pk=False)
    with _serve(pk) as running:
        report = _ping(jp, _with(jp, running.url))
    assert not report.ok
    assert _statuses(report) == {
        "pinned": "fail",
        "connect": "ok",
        "signed-request": "ok",
        "clock": "ok",
        "manifest": "ok",
        "mode": "ok",
    }
    failure = report.failure
    assert failure is not None
    assert failure.reason == "config.peer"
    assert "gateway peer add" in failure.detail


def _cli_ping(side: Side, url: str, *extra: str) -> Any:
    env = {
        "GATEWAY_HOME": str(side.node.settings.home),
        "GATEWAY_PASSPHRASE": PASSPHRASE,
        "GATEWAY_SERVER_PEER_URL": url,
    }
    if side.node.settings.database.url is not None:
        env["GATEWAY_DATABASE_URL"] = side.node.settings.database.url
    return CliRunner().invoke(cli, [*extra, "peer", "ping"], env=env)


def test_the_command_exits_0_on_a_working_link_and_1_naming_the_failure(
    make_pair: Callable[..., tuple[Side, Side]],
) -> None:
    jp, pk = make_pair()
    with _serve(pk) as running:
        good = _cli_ping(jp, running.url)
        as_json = _cli_ping(jp, running.url, "--json")
    assert good.exit_code == 0, good.output
    assert good.stdout.splitlines()[-1] == "link ok"
    assert "signed-request" in good.stdout
    assert as_json.exit_code == 0
    assert '"ok": true' in as_json.stdout

    down = _cli_ping(jp, f"http://127.0.0.1:{free_port()}")
    assert down.exit_code == 1
    assert "link FAILED at connect: transport.refused" in down.stdout
    assert "error: peer ping failed at connect: peer at 127.0.0.1:" in down.stderr
    assert "connection refused" in down.stderr


def test_sync_names_the_cause_and_debug_shows_the_chained_exception(
    make_pair: Callable[..., tuple[Side, Side]],
) -> None:
    jp, _pk = make_pair()
    case = json.loads((REPO / "docs" / "examples" / "exam-fraud.json").read_text())
    officer = Actor(name="tanaka", role=Role.OFFICER)
    send_case(
        NodeContext(jp.node, jp.keyring),
        officer,
        "exam-fraud",
        case,
        [],
        public=False,
        reply_to=None,
        now=datetime.now(UTC),
    )
    port = free_port()
    env = {
        "GATEWAY_HOME": str(jp.node.settings.home),
        "GATEWAY_PASSPHRASE": PASSPHRASE,
        "GATEWAY_SERVER_PEER_URL": f"http://127.0.0.1:{port}",
    }
    if jp.node.settings.database.url is not None:
        env["GATEWAY_DATABASE_URL"] = jp.node.settings.database.url
    plain = CliRunner().invoke(cli, ["sync"], env=env)
    debug = CliRunner().invoke(cli, ["--debug", "sync"], env=env)
    for done in (plain, debug):
        assert done.exit_code == 1
        assert f"error: peer at 127.0.0.1:{port}: connection refused" in done.stderr
    assert "Traceback" not in plain.stderr
    # --debug prints the cause the message was made from, not only the class name.
    assert "ConnectionRefusedError" in debug.stderr
    assert "The above exception was the direct cause" in debug.stderr


def test_after_a_rotation_the_ping_reports_the_manifest_waiting_for_delivery(
    make_pair: Callable[..., tuple[Side, Side]],
) -> None:
    jp, pk = make_pair()
    with jp.node.db.transaction() as session:
        own_keys.rotate_keys(
            jp.node.settings, session, PASSPHRASE.encode(), now=datetime.now(UTC), actor=ADMIN
        )
    with jp.node.db.transaction() as session:
        rotated = unlock_keyring(jp.node.settings, PASSPHRASE.encode(), session)
    with _serve(pk) as running:
        # Signed with the old key, still valid during the overlap: the peer answers
        # that it holds version 1 of our manifest, ours is 2.
        before = _ping(jp, _with(jp, running.url))
        # Signed with the new key, which only the undelivered manifest lists.
        after = _ping(Side(jp.node, rotated), _with(jp, running.url))
    assert before.ok, before.to_dict()
    manifest = next(step for step in before.steps if step.name == "manifest")
    assert (manifest.status, manifest.reason) == ("warn", "manifest.behind")
    assert "version 1, ours is 2" in manifest.detail
    assert (before.our_manifest_version, before.peer_pinned_manifest_version) == (2, 1)
    failure = after.failure
    assert failure is not None
    assert (failure.name, failure.reason) == ("signed-request", "auth.unknown-key")
    assert "our manifest version 2 waits for delivery" in failure.detail
