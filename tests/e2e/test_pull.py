"""Pull mode end to end: Islamabad pulls, Tokyo hosts, two real ``gateway serve`` processes.

pk runs with ``[server] peer_mode = "pull"`` and opens no peer listener; jp
runs with ``peer_delivery = "hold"`` and never posts to pk. Everything still
travels both ways exactly once with verified receipts: every case type,
the consent protocol, key rotations on each side, checkpoints witnessed both
ways; through kills and crash points of either process. Each test runs on
SQLite and on PostgreSQL (module-scoped pairs, as in ``test_exchange``).
"""

from __future__ import annotations

import json
import socket
import tomllib
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from gateway.core.cases import CASE_TYPES, PROTOCOL_TYPES
from gateway.node.ledger import witness as ledger_witness
from gateway.node.own_keys import own_manifest, verify_ledger_with_keys
from gateway.node.peer_trust import pinned_peer_manifest
from gateway.node.runtime import utc_now
from tests.conftest import create_pg_database, drop_pg_database, require_postgres
from tests.e2e.test_exchange import Pair, Side, assert_exactly_once, example, wait_for
from tests.nodes import init_pair, run_gateway
from tests.policies import set_approvals

# The module's pair of nodes is made once (init, keys, pinning: minutes on a loaded
# machine), charged to the first test that runs; slow runs set their own.
pytestmark = pytest.mark.timeout(900)

EMBASSY = "Embassy of Example"
PURPOSE = "visa screening of the broker's workers"


def set_server(home: Path, **values: Any) -> None:
    """Write ``[server]`` settings into a node's gateway.toml."""
    path = home / "gateway.toml"
    data = tomllib.loads(path.read_text())
    data.setdefault("server", {}).update(values)
    path.write_text(tomli_w.dumps(data))


def make_pull_pair(root: Path, urls: dict[str, str] | None) -> Pair:
    """jp hosts (holds for pk), pk pulls; checkpoints every second, short long polls."""
    homes = init_pair(root, db_urls=urls)
    for home in homes.values():
        # these tests are about pulling: one officer grants consent (k = 1)
        set_approvals(home.home / "policies", "consent-grant", 1)
    set_server(homes["jp"].home, peer_delivery="hold", checkpoint_interval_seconds=1.0)
    set_server(
        homes["pk"].home,
        peer_mode="pull",
        pull_wait_seconds=2.0,
        checkpoint_interval_seconds=1.0,
    )
    return Pair(Side(homes["jp"]), Side(homes["pk"]))


@pytest.fixture(
    scope="module",
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    made: list[str] = []
    urls = None
    if request.param == "postgresql":
        require_postgres()
        made = [create_pg_database(), create_pg_database()]
        urls = {"jp": made[0], "pk": made[1]}
    opened = make_pull_pair(tmp_path_factory.mktemp(f"pull-{request.param}"), urls)
    try:
        yield opened
    finally:
        opened.jp.close()
        opened.pk.close()
        for url in made:
            drop_pg_database(url)


def both_delivered(pair: Pair, sent: dict[str, list[str]]) -> bool:
    return pair.jp.queued(sent["jp"]) == 0 and pair.pk.queued(sent["pk"]) == 0


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def witnessed(side: Side, peer: str) -> int:
    with side.node.db.transaction() as session:
        latest = ledger_witness.last_witnessed(session, peer)
    return latest.size if latest is not None else 0


def bulk(pair: Pair, count: int) -> None:
    # Queued before the processes start: on a loaded machine this process's
    # writes would otherwise wait on theirs beyond SQLite's busy timeout.
    pair.jp.stop()
    pair.pk.stop()
    sent = {
        "jp": [pair.jp.send("exam-fraud") for _ in range(count)],
        "pk": [pair.pk.send("exam-fraud") for _ in range(count)],
    }
    pair.jp.start()
    pair.pk.start()
    wait_for(f"{count} bundles each way", lambda: both_delivered(pair, sent), timeout=900)
    assert_exactly_once(pair.jp, pair.pk, sent["jp"])
    assert_exactly_once(pair.pk, pair.jp, sent["pk"])
    for side, channel in ((pair.pk, "jp->pk"), (pair.jp, "pk->jp")):
        gaps = {g["channel"]: g for g in side.cli("inbox", "--gaps")["gaps"]}
        assert gaps[channel]["missing"] == []


# -- tests ------------------------------------------------------------------------------


def test_every_case_type_travels_both_ways_with_no_listener_on_the_puller(pair: Pair) -> None:
    pair.jp.start()
    serving = pair.pk.start()
    assert not listening(pair.pk.home.port)  # pk opened no peer listener
    sentence = next(line for line in serving.stderr_lines if "serving pk" in line)
    assert "no peer listener, pulling from" in sentence
    sent: dict[str, list[str]] = {"jp": [], "pk": []}
    for sender in (pair.jp, pair.pk):
        sent[sender.node_id] += [
            sender.send(t)
            for t in CASE_TYPES
            if t not in PROTOCOL_TYPES and t != "information-reply"
        ]
    wait_for("both outboxes delivered", lambda: both_delivered(pair, sent))
    for sender, asker in ((pair.jp, pair.pk), (pair.pk, pair.jp)):
        [request] = [
            b for b in sent[asker.node_id] if asker.outbox_type(b) == "information-request"
        ]
        reply = {**example("information-reply"), "request_bundle_id": request}
        sent[sender.node_id].append(sender.send("information-reply", case=reply))
    wait_for("the replies delivered", lambda: both_delivered(pair, sent))
    assert_exactly_once(pair.jp, pair.pk, sent["jp"])
    assert_exactly_once(pair.pk, pair.jp, sent["pk"])
    # The host's log shows the pulls and the receipts; it never posted to pk.
    jp_log = pair.jp.serve_process.stderr_text() if pair.jp.serve_process else ""
    assert "/v1/pull/receipts" in jp_log
    assert "delivery_failed" not in jp_log


def test_checkpoints_are_witnessed_both_ways(pair: Pair) -> None:
    pair.jp.start()
    pair.pk.start()
    before = {"jp": witnessed(pair.jp, "pk"), "pk": witnessed(pair.pk, "jp")}
    sent = {"jp": [pair.jp.send()], "pk": [pair.pk.send()]}
    wait_for("delivered", lambda: both_delivered(pair, sent))
    wait_for(
        "jp witnesses a newer checkpoint of pk", lambda: witnessed(pair.jp, "pk") > before["jp"]
    )
    wait_for(
        "pk witnesses a newer checkpoint of jp", lambda: witnessed(pair.pk, "jp") > before["pk"]
    )
    first = witnessed(pair.pk, "jp")
    sent = {"jp": [pair.jp.send()], "pk": []}
    wait_for("delivered", lambda: both_delivered(pair, sent))
    # A larger checkpoint is witnessed only with a consistency proof from the last one.
    wait_for("pk witnesses a larger, proven checkpoint", lambda: witnessed(pair.pk, "jp") > first)
    # Each side's ledger verifies, witnesses of the other's checkpoints included.
    for side in (pair.jp, pair.pk):
        with side.node.db.transaction(snapshot=True) as session:  # both nodes run on
            report = verify_ledger_with_keys(session, node_id=side.node_id)
        assert report.ok, report.problem
        assert report.witnessed >= 1
        assert report.checkpoints >= 1


def test_twenty_bundles_each_way_arrive_exactly_once(pair: Pair) -> None:
    bulk(pair, 20)


@pytest.mark.slow
@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_a_thousand_bundles_each_way_arrive_exactly_once(pair: Pair) -> None:
    bulk(pair, 1000)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_consent_request_grant_use_and_revocation_through_pulls(pair: Pair, tmp_path: Path) -> None:
    pair.jp.start()
    pair.pk.start()
    case_id = pair.jp.send("broker-misconduct")
    wait_for("the case arrived at pk", lambda: pair.pk.received([case_id]) == 1)
    asked = pair.pk.cli("consent", "request", case_id, "--recipient", EMBASSY, "--purpose", PURPOSE)
    request_id = asked["request_id"]
    wait_for(
        "the request reached jp",
        lambda: any(
            r["request_id"] == request_id for r in pair.jp.cli("consent", "list")["requests"]
        ),
    )
    last_day = (utc_now() + timedelta(days=30)).date().isoformat()
    granted = pair.jp.cli("consent", "grant", request_id, "--valid-until", last_day)
    consent_id = granted["consent_id"]

    def state_at_pk() -> str | None:
        for entry in pair.pk.cli("consent", "list")["consents"]:
            if entry.get("consent_id") == consent_id:
                return str(entry.get("state"))
        return None

    wait_for("the grant reached pk", lambda: state_at_pk() == "valid")
    out = tmp_path / "embassy"
    pair.pk.cli(
        "disclose", case_id, "--recipient", EMBASSY, "--purpose", PURPOSE, "--out", str(out)
    )
    assert any(out.rglob("*"))
    pair.jp.cli("consent", "revoke", consent_id, "--reason", "screening finished")
    wait_for("the revocation reached pk", lambda: state_at_pk() == "revoked")
    again = tmp_path / "embassy-again"
    refused = pair.pk.cli(
        "disclose",
        case_id,
        "--recipient",
        EMBASSY,
        "--purpose",
        PURPOSE,
        "--out",
        str(again),
        check=False,
    )
    assert refused is None or refused.get("ok") is not True
    assert not again.exists() or not any(again.rglob("*"))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_key_rotation_on_each_side_reaches_the_other(pair: Pair) -> None:
    pair.jp.start()
    pair.pk.start()
    for rotating, other in ((pair.jp, pair.pk), (pair.pk, pair.jp)):
        with rotating.node.db.transaction() as session:
            version = own_manifest(session).version
        rotating.home.run("keys", "rotate")

        def pinned_at_other(other: Side = other) -> int:
            with other.node.db.transaction() as session:
                manifest = pinned_peer_manifest(session)
            return manifest.version if manifest is not None else 0

        wait_for(
            f"{other.node_id} pins {rotating.node_id}'s new keys",
            lambda version=version: pinned_at_other() > version,  # type: ignore[misc]
        )
        rotating.keyring(fresh=True)
        sent = {rotating.node_id: [rotating.send()], other.node_id: [other.send()]}
        wait_for("delivered after the rotation", lambda sent=sent: both_delivered(pair, sent))  # type: ignore[misc]
        assert_exactly_once(rotating, other, sent[rotating.node_id])
        assert_exactly_once(other, rotating, sent[other.node_id])


def ping(side: Side, **env: str) -> tuple[int, Any, str]:
    done = run_gateway(side.home.home, "--json", "peer", "ping", env=side.home.env(**env))
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else None, done.stderr


def test_ping_passes_for_a_puller_and_its_host(pair: Pair) -> None:
    pair.jp.start()
    code, report, err = ping(pair.pk)
    assert code == 0, err
    [mode] = [s for s in report["steps"] if s["name"] == "mode"]
    assert mode["status"] == "ok"
    assert "pk pulls from jp" in mode["detail"]


def test_ping_fails_for_a_puller_facing_a_host_that_pushes(pair: Pair) -> None:
    pair.jp.start(GATEWAY_SERVER_PEER_DELIVERY="push")
    try:
        code, report, _err = ping(pair.pk)
        assert code != 0
        [mode] = [s for s in report["steps"] if s["name"] == "mode"]
        assert mode["status"] == "fail"
        assert mode["reason"] == "config.peer-mode"
        assert 'peer_delivery = "hold" on jp' in mode["detail"]
        # The host says so in its own log too.
        assert pair.jp.serve_process is not None
        wait_for(
            "the host logs the mismatch",
            lambda: "peer_mode_mismatch" in pair.jp.serve_process.stderr_text(),  # type: ignore[union-attr]
            timeout=10,
        )
    finally:
        pair.jp.stop()


def test_ping_fails_for_two_pullers_naming_the_setting(pair: Pair) -> None:
    pair.jp.stop()
    pair.pk.start()
    code, report, _err = ping(
        pair.jp, GATEWAY_SERVER_PEER_MODE="pull", GATEWAY_SERVER_PEER_DELIVERY="push"
    )
    assert code != 0
    [connect] = [s for s in report["steps"] if s["name"] == "connect"]
    assert connect["status"] == "fail"
    assert 'peer_mode = "pull"' in connect["detail"]
    assert 'peer_delivery = "hold" there' in connect["detail"]


# -- kills and crash points ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_killing_puller_and_host_mid_pull_loses_and_doubles_nothing(pair: Pair) -> None:
    pair.pk.stop()
    pair.jp.start()
    sent = {"jp": [pair.jp.send() for _ in range(200)], "pk": [pair.pk.send() for _ in range(20)]}
    pair.pk.start()
    wait_for("the puller is in the middle", lambda: pair.pk.received(sent["jp"]) >= 20)
    pair.pk.kill()
    midway = pair.pk.received(sent["jp"])
    assert midway < len(sent["jp"])
    pair.pk.start()
    # Killed at the first sign that pulling resumed (see the same test in
    # test_exchange.py: waiting for more could let the pull finish before the kill).
    wait_for("pulling resumed", lambda: pair.pk.received(sent["jp"]) > midway)
    pair.jp.kill()
    assert pair.jp.queued(sent["jp"]) > 0
    pair.jp.start()
    wait_for("all delivered", lambda: both_delivered(pair, sent), timeout=600)
    assert_exactly_once(pair.jp, pair.pk, sent["jp"])
    assert_exactly_once(pair.pk, pair.jp, sent["pk"])


def crashed(side: Side, point: str) -> None:
    """Start ``serve`` with a crash point and wait for it to die there (SIGKILL)."""
    side.stop()
    process = side.home.serve(GATEWAY_CRASH_AT=point)
    assert process.process.wait(timeout=120) == -9, process.stderr_text()


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("point", ["after-pull-answer", "after-pull-store"])
def test_a_puller_crash_loses_nothing_and_the_same_receipt_comes_again(
    pair: Pair, point: str
) -> None:
    pair.pk.stop()
    pair.jp.start()
    sent = [pair.jp.send() for _ in range(5)]
    crashed(pair.pk, point)
    assert pair.jp.queued(sent) == len(sent)  # no receipt reached the host
    if point == "after-pull-answer":
        assert pair.pk.received(sent) == 0  # the answer was lost with the process
        before: dict[str, bytes] = {}
    else:
        assert pair.pk.received(sent) == len(sent)  # stored and receipted; receipts lost
        before = {b: r for b, r in pair.pk.inbox_receipts().items() if b in sent}
    pair.pk.start()
    wait_for("delivered after the restart", lambda: pair.jp.queued(sent) == 0)
    assert_exactly_once(pair.jp, pair.pk, sent)
    after = pair.pk.inbox_receipts()
    for bundle_id, receipt in before.items():
        assert after[bundle_id] == receipt  # the identical receipt bytes on redelivery


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("point", ["after-send", "before-receipt-store"])
def test_a_host_crash_with_the_receipts_in_hand_loses_nothing(pair: Pair, point: str) -> None:
    pair.jp.stop()
    pair.pk.start()
    sent = [pair.jp.send() for _ in range(5)]
    crashed(pair.jp, point)  # the puller pulled, stored and posted its receipts
    wait_for("the puller stored them", lambda: pair.pk.received(sent) == len(sent))
    assert pair.jp.queued(sent) == len(sent)  # the host died before storing a receipt
    before = {b: r for b, r in pair.pk.inbox_receipts().items() if b in sent}
    pair.jp.start()
    wait_for("delivered after the restart", lambda: pair.jp.queued(sent) == 0)
    assert_exactly_once(pair.jp, pair.pk, sent)
    after = pair.pk.inbox_receipts()
    assert {b: after[b] for b in sent} == before
