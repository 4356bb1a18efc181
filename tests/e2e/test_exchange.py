"""The exchange end to end: two real ``gateway serve`` processes on loopback.

Every bundle ``send`` accepted reaches the peer's inbox exactly once, with a
receipt the sender verified, through kills, crash points, replays, tampering
and key rotation. Each test starts real processes on SQLite and on
PostgreSQL; bulk bundles are queued by calling the outbox service in this
process on the node's own database (what ``gateway send`` does, without a
process per bundle), while delivery runs in the ``serve`` processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from gateway.core.cases import CASE_TYPES, PROTOCOL_TYPES
from gateway.core.envelope import seal
from gateway.core.keys import KeyManifest, NodeKeyring
from gateway.core.receipt import parse_receipt, verify_receipt
from gateway.core.roles import Actor, Role
from gateway.node.context import NodeContext
from gateway.node.outbox import send_case
from gateway.node.own_keys import unlock_keyring
from gateway.node.peer_trust import pinned_peer_manifest
from gateway.node.policy import load_policy
from gateway.node.runtime import Node, utc_now
from gateway.peer.client import PeerClient
from gateway.settings import load_settings
from gateway.store.models_exchange import Equivocation, InboxEntry, OutboxEntry, envelope_path
from tests.conftest import create_pg_database, drop_pg_database, require_postgres
from tests.nodes import NodeHome, ServeProcess, init_pair, kill, run_gateway, stop, wait_ready

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
OFFICER = Actor(name="e2e-officer", role=Role.OFFICER)


def example(case_type: str) -> dict[str, Any]:
    return dict(json.loads((EXAMPLES / f"{case_type}.json").read_text()))


class Side:
    """One node: its home for processes, and its database and keys in this process."""

    def __init__(self, home: NodeHome) -> None:
        self.home = home
        self.settings = load_settings(home.home, environ=home.env())
        self.node = Node.open(self.settings)
        self._keyring: NodeKeyring | None = None
        self.officer = home.add_user(f"officer-{home.node_id}", "officer")
        self.serve_process: ServeProcess | None = None
        self.serve_extra: dict[str, str] = {}

    @property
    def node_id(self) -> str:
        return self.home.node_id

    def keyring(self, *, fresh: bool = False) -> NodeKeyring:
        if self._keyring is None or fresh:
            with self.node.db.transaction() as session:
                self._keyring = unlock_keyring(
                    self.settings, self.home.passphrase.encode(), session
                )
        return self._keyring

    def peer_manifest(self) -> KeyManifest:
        with self.node.db.transaction() as session:
            manifest = pinned_peer_manifest(session)
        assert manifest is not None
        return manifest

    def outbox_type(self, bundle_id: str) -> str:
        with self.node.db.transaction() as session:
            return str(
                session.scalars(
                    select(OutboxEntry.case_type).where(OutboxEntry.bundle_id == bundle_id)
                ).one()
            )

    def send(self, case_type: str = "exam-fraud", **kw: Any) -> str:
        sent = send_case(
            NodeContext(self.node, self.keyring()),
            OFFICER,
            case_type,
            kw.pop("case", None) or example(case_type),
            kw.pop("attachments", []),
            public=False,
            reply_to=None,
            now=utc_now(),
        )
        return sent.bundle_id

    def cli(self, *args: str, officer: bool = True, check: bool = True) -> Any:
        return self.home.run(*args, token=self.officer if officer else None, check=check)

    def running(self) -> bool:
        return self.serve_process is not None and self.serve_process.process.poll() is None

    def start(self, **extra: str) -> ServeProcess:
        """Start ``gateway serve`` (restarting it when it runs with other settings)."""
        if self.running() and not extra and self.serve_extra == {}:
            assert self.serve_process is not None
            return self.serve_process
        self.stop()
        self.serve_process = self.home.serve(**extra)
        self.serve_extra = dict(extra)
        wait_ready(self.serve_process)
        return self.serve_process

    def stop(self) -> None:
        if self.serve_process is not None and self.serve_process.process.poll() is None:
            stop(self.serve_process)
        self.serve_process = None

    def kill(self) -> None:
        assert self.serve_process is not None
        kill(self.serve_process)
        self.serve_process = None

    # -- what the database holds --

    def inbox_ids(self) -> list[str]:
        with self.node.db.transaction() as session:
            return list(session.scalars(select(InboxEntry.bundle_id)))

    def inbox_receipts(self) -> dict[str, bytes]:
        with self.node.db.transaction() as session:
            return dict(session.execute(select(InboxEntry.bundle_id, InboxEntry.receipt)).all())  # type: ignore[arg-type]

    def outbox_rows(self) -> list[OutboxEntry]:
        with self.node.db.transaction() as session:
            return list(session.scalars(select(OutboxEntry).order_by(OutboxEntry.sequence)))

    def queued(self, among: list[str] | None = None) -> int:
        """Bundles still queued (of ``among`` when given)."""
        with self.node.db.transaction() as session:
            query = (
                select(func.count()).select_from(OutboxEntry).where(OutboxEntry.state == "queued")
            )
            if among is not None:
                query = query.where(OutboxEntry.bundle_id.in_(among))
            return int(session.scalar(query) or 0)

    def received(self, among: list[str]) -> int:
        """How many of these bundle ids are in the inbox."""
        with self.node.db.transaction() as session:
            return int(
                session.scalar(
                    select(func.count())
                    .select_from(InboxEntry)
                    .where(InboxEntry.bundle_id.in_(among))
                )
                or 0
            )

    def envelope_file(self, bundle_id: str) -> Path:
        with self.node.db.transaction() as session:
            sha = session.scalars(
                select(OutboxEntry.envelope_sha256).where(OutboxEntry.bundle_id == bundle_id)
            ).one()
        return envelope_path(self.settings.blob_dir, sha)

    def close(self) -> None:
        self.stop()
        self.node.close()


class Pair:
    def __init__(self, jp: Side, pk: Side) -> None:
        self.jp = jp
        self.pk = pk

    def side(self, node_id: str) -> Side:
        return self.jp if node_id == "jp" else self.pk


@pytest.fixture(
    scope="module",
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    """One pair of nodes per engine for the whole module (setting up keys, users and
    pinning costs seconds of processes); each test works with the bundles it sends."""
    made: list[str] = []
    urls = None
    if request.param == "postgresql":
        require_postgres()
        made = [create_pg_database(), create_pg_database()]
        urls = {"jp": made[0], "pk": made[1]}
    homes = init_pair(tmp_path_factory.mktemp(f"pair-{request.param}"), db_urls=urls)
    sides = [Side(homes["jp"]), Side(homes["pk"])]
    try:
        yield Pair(*sides)
    finally:
        for side in sides:
            side.close()
        for url in made:
            drop_pg_database(url)


def wait_for(what: str, predicate: Callable[[], bool], *, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {what}")


def assert_exactly_once(sender: Side, receiver: Side, sent: list[str]) -> None:
    """Each sent bundle once in the receiver's inbox; each delivered with a receipt that
    verifies at the sender and is byte for byte the receipt the receiver stored."""
    received = receiver.inbox_ids()
    assert len(received) == len(set(received))
    assert set(sent) <= set(received)
    stored = receiver.inbox_receipts()
    peer = sender.peer_manifest()
    rows = {row.bundle_id: row for row in sender.outbox_rows()}
    for bundle_id in sent:
        row = rows[bundle_id]
        assert row.state == "delivered", (bundle_id, row.last_error)
        assert row.receipt is not None
        assert row.receipt == stored[bundle_id]
        verify_receipt(
            row.receipt,
            peer_manifest=peer,
            expected_bundle_id=bundle_id,
            expected_envelope_hash=row.envelope_sha256,
            expected_sender=sender.node_id,
        )


def sync(side: Side, **extra: str) -> Any:
    """``gateway sync`` as its own process; the completed process."""
    return run_gateway(side.home.home, "--json", "sync", env=side.home.env(**extra))


def post(side: Side, paths: list[Path]) -> list[Any]:
    """POST envelopes to the peer over HTTP as ``side`` (signed by its keys)."""

    async def run() -> list[Any]:
        async with PeerClient(side.settings, side.keyring()) as client:
            return await client.post_envelopes(paths)

    return asyncio.run(run())


# -- tests ------------------------------------------------------------------------------


@pytest.mark.slow
def test_cases_of_every_type_travel_both_ways_and_officers_read_them(
    pair: Pair, tmp_path: Path
) -> None:
    pair.jp.start()
    pair.pk.start()
    sent: dict[str, list[str]] = {"jp": [], "pk": []}
    for sender in (pair.jp, pair.pk):
        first = sender.cli("send", "broker-misconduct", str(EXAMPLES / "broker-misconduct.json"))
        assert first["type"] == "broker-misconduct"
        sent[sender.node_id].append(first["bundle_id"])
        sent[sender.node_id] += [
            sender.send(t)
            for t in CASE_TYPES
            if t not in PROTOCOL_TYPES and t not in ("broker-misconduct", "information-reply")
        ]
    wait_for(
        "both outboxes delivered",
        lambda: pair.jp.queued(sent["jp"]) == 0 and pair.pk.queued(sent["pk"]) == 0,
    )
    # Each side answers the other's information request (a reply must answer one received).
    for sender, asker in ((pair.jp, pair.pk), (pair.pk, pair.jp)):
        [request] = [
            b for b in sent[asker.node_id] if asker.outbox_type(b) == "information-request"
        ]
        reply = {**example("information-reply"), "request_bundle_id": request}
        sent[sender.node_id].append(sender.send("information-reply", case=reply))
    wait_for(
        "the replies delivered",
        lambda: pair.jp.queued(sent["jp"]) == 0 and pair.pk.queued(sent["pk"]) == 0,
    )
    assert_exactly_once(pair.jp, pair.pk, sent["jp"])
    assert_exactly_once(pair.pk, pair.jp, sent["pk"])
    listed = {b["bundle_id"]: b for b in pair.pk.cli("inbox", "--type", "exam-fraud")["bundles"]}
    assert {b["type"] for b in listed.values()} == {"exam-fraud"}
    assert set(sent["jp"]) & set(listed)
    outbox = {b["bundle_id"]: b for b in pair.jp.cli("outbox")["bundles"]}
    assert {outbox[b]["state"] for b in sent["jp"]} == {"delivered"}
    out = tmp_path / "read"
    shown = pair.pk.cli("show", sent["jp"][0], "--out", str(out))
    assert shown["case"]["acts"] == example("broker-misconduct")["acts"]
    assert (out / f"{sent['jp'][0]}.json").is_file()
    from gateway.node.ledger import read as ledger_read  # noqa: PLC0415

    with pair.pk.node.db.transaction() as session:
        [read] = ledger_read.list_entries(session, kind="bundle-read", bundle=sent["jp"][0])
    assert read.actor_name == "officer-pk"


def _bulk(pair: Pair, count: int) -> None:
    pair.pk.start()
    pair.jp.start()
    sent = [pair.jp.send("exam-fraud") for _ in range(count)]
    wait_for(f"{count} bundles delivered", lambda: pair.jp.queued(sent) == 0, timeout=900)
    assert_exactly_once(pair.jp, pair.pk, sent)
    [gaps] = pair.pk.cli("inbox", "--gaps")["gaps"]
    assert gaps["channel"] == "jp->pk"
    assert gaps["missing"] == []
    assert gaps["highest"] == max(row.sequence for row in pair.jp.outbox_rows())


def test_a_hundred_bundles_arrive_exactly_once_with_verified_receipts(pair: Pair) -> None:
    _bulk(pair, 100)


@pytest.mark.slow
def test_a_thousand_bundles_arrive_exactly_once_with_verified_receipts(pair: Pair) -> None:
    _bulk(pair, 1000)


@pytest.mark.slow
def test_killing_receiver_and_sender_mid_delivery_loses_and_doubles_nothing(pair: Pair) -> None:
    pair.jp.stop()
    pair.pk.start()
    # Enough that the sender is still delivering when it is killed: with several
    # requests in flight and one verified while another commits, 300 could all
    # arrive between the poll that sees delivery resume and the kill.
    sent = [pair.jp.send() for _ in range(1000)]
    pair.jp.start()
    wait_for("the receiver is in the middle", lambda: pair.pk.received(sent) >= 20)
    pair.pk.kill()
    midway = pair.pk.received(sent)
    assert midway < len(sent)
    pair.pk.start()
    # The sender is killed at the first sign that delivery resumed: on a fast machine
    # it delivers hundreds of bundles a second, so waiting for more than one (as this
    # test once did, for 20) could let it finish the rest before the kill.
    wait_for("delivery resumed", lambda: pair.pk.received(sent) > midway)
    pair.jp.kill()
    assert pair.jp.queued(sent) > 0
    pair.jp.start()
    wait_for("all delivered", lambda: pair.jp.queued(sent) == 0, timeout=300)
    assert_exactly_once(pair.jp, pair.pk, sent)


@pytest.mark.slow
@pytest.mark.parametrize(
    "point",
    [
        "after-outbox-insert",
        "after-send",
        "before-receipt-store",
        "after-batch-verify",
        "after-batch-adopt",
        "after-inbox-commit",
        "after-batch-verify:files",
        "after-batch-adopt:files",
        "after-inbox-commit:files",
    ],
)
def test_a_crash_at_any_point_loses_nothing_and_doubles_nothing(pair: Pair, point: str) -> None:
    """``:files``: the receiver keeps every envelope a file (none inline in its row)."""
    point, _, storage = point.partition(":")
    receiver_env = {"GATEWAY_DATABASE_INLINE_ENVELOPE_MAX_BYTES": "0"} if storage else {}
    pair.jp.stop()
    assert sync(pair.jp).returncode in (0, 1)  # nothing left from earlier tests
    sent = [pair.jp.send() for _ in range(5)]
    if point == "after-outbox-insert":
        # `send` is a client: the node serving it dies right after the outbox commit.
        before = {row.bundle_id for row in pair.jp.outbox_rows()}
        pair.jp.start(GATEWAY_CRASH_AT=point)
        done = run_gateway(
            pair.jp.home.home,
            "--json",
            "send",
            "exam-fraud",
            str(EXAMPLES / "exam-fraud.json"),
            env=pair.jp.home.env(token=pair.jp.officer),
        )
        assert done.returncode == 1, done.stderr  # the node died before it answered the id
        assert json.loads(done.stdout)["error"]["reason"] == "client.connection"
        assert pair.jp.serve_process is not None
        assert pair.jp.serve_process.process.wait(timeout=30) == -9
        pair.jp.serve_process = None
        [crashed] = {row.bundle_id for row in pair.jp.outbox_rows()} - before
        sent.append(crashed)  # the bundle had committed: it must still be delivered
        pair.pk.start()
    elif point in ("after-batch-verify", "after-batch-adopt", "after-inbox-commit"):
        # The receiver dies at a step of its batch: verified, files stored, committed.
        pair.pk.start(GATEWAY_CRASH_AT=point, **receiver_env)
        done = sync(pair.jp)
        assert done.returncode == 1, done.stderr  # the peer died under the request
        assert "unreachable" in done.stderr or "peer" in done.stderr
        assert pair.pk.serve_process is not None
        assert pair.pk.serve_process.process.wait(timeout=30) == -9
        # The whole batch commits in one transaction: none of it, or all of it.
        committed = len(sent) if point == "after-inbox-commit" else 0
        assert pair.pk.received(sent) == committed
        assert pair.jp.queued(sent) == len(sent)  # no receipt came back
        pair.pk.start(**receiver_env)
    else:
        pair.pk.start()
        done = sync(pair.jp, GATEWAY_CRASH_AT=point)
        assert done.returncode == -9, done.stderr
        assert pair.jp.queued(sent) == len(sent)  # no receipt was stored ...
        assert pair.pk.received(sent) == len(sent)  # ... though all arrived
    done = sync(pair.jp)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["remaining"] == 0
    assert_exactly_once(pair.jp, pair.pk, sent)
    if storage:
        store = pair.pk.home.home / "data" / "blobs" / "envelopes"
        names = [pair.jp.envelope_file(bundle_id).name for bundle_id in sent]
        assert all((store / name[:2] / name).is_file() for name in names)


def test_replayed_envelope_gets_the_identical_receipt_and_stores_nothing(pair: Pair) -> None:
    pair.jp.stop()
    pair.pk.start()
    bundle_id = pair.jp.send()
    path = pair.jp.envelope_file(bundle_id)
    [first] = post(pair.jp, [path])
    total = len(pair.pk.inbox_ids())
    [again] = post(pair.jp, [path])
    assert first.status == again.status == "accepted"
    assert first.receipt == again.receipt
    assert len(pair.pk.inbox_ids()) == total
    assert pair.pk.received([bundle_id]) == 1


def _sealed_with_pinned_id(side: Side, case: dict[str, Any], out: Path, first: bytes) -> str:
    draws = iter([first])
    with out.open("w+b") as handle:
        sealed = seal(
            handle,
            case_type="exam-fraud",
            case=case,
            keyring=side.keyring(),
            peer_manifest=side.peer_manifest(),
            policy=load_policy(side.settings),
            sequence=1,
            now=utc_now(),
            random=lambda n: next(draws, None) or os.urandom(n),
        )
    return sealed.bundle_id


def test_a_different_envelope_under_a_known_id_is_refused_as_equivocation(
    pair: Pair, tmp_path: Path
) -> None:
    pair.pk.start()
    case = example("exam-fraud")
    pinned = os.urandom(16)
    one = _sealed_with_pinned_id(pair.jp, case, tmp_path / "one", pinned)
    two = _sealed_with_pinned_id(
        pair.jp, {**case, "description": "another"}, tmp_path / "two", pinned
    )
    assert one == two
    [first] = post(pair.jp, [tmp_path / "one"])
    [second] = post(pair.jp, [tmp_path / "two"])
    assert first.status == "accepted"
    assert (second.status, second.reason) == ("refused", "equivocation")
    with pair.pk.node.db.transaction() as session:
        [record] = session.scalars(select(Equivocation).where(Equivocation.bundle_id == one)).all()
    assert record.first_envelope_sha256 == parse_receipt(first.receipt).envelope_sha256
    assert pair.pk.received([one]) == 1


def test_a_flipped_bit_in_transit_is_refused_and_the_clean_retry_succeeds(
    pair: Pair, tmp_path: Path
) -> None:
    pair.jp.stop()
    pair.pk.start()
    bundle_id = pair.jp.send()
    clean = pair.jp.envelope_file(bundle_id)
    data = bytearray(clean.read_bytes())
    data[len(data) // 2] ^= 0x04
    flipped = tmp_path / "flipped"
    flipped.write_bytes(bytes(data))
    [bad] = post(pair.jp, [flipped])
    assert bad.status == "refused"
    assert pair.pk.received([bundle_id]) == 0
    [good] = post(pair.jp, [clean])
    assert good.status == "accepted"
    assert parse_receipt(good.receipt).bundle_id == bundle_id
    assert pair.pk.received([bundle_id]) == 1


def test_a_lost_response_is_answered_on_resend_with_the_identical_receipt(pair: Pair) -> None:
    pair.jp.stop()
    pair.pk.start()
    bundle_id = pair.jp.send()
    [answer] = post(pair.jp, [pair.jp.envelope_file(bundle_id)])  # never reaches the outbox
    assert pair.jp.queued([bundle_id]) == 1
    done = sync(pair.jp)
    assert done.returncode == 0, done.stderr
    [row] = [r for r in pair.jp.outbox_rows() if r.bundle_id == bundle_id]
    assert row.receipt == answer.receipt
    assert pair.pk.received([bundle_id]) == 1


def test_a_bundle_addressed_to_another_node_is_refused_with_nothing_stored(pair: Pair) -> None:
    pair.pk.start()
    own = pair.pk.send()  # pk's envelope, addressed to jp ...
    [answer] = post(pair.jp, [pair.pk.envelope_file(own)])  # ... posted to pk
    assert (answer.status, answer.reason) == ("refused", "envelope.recipient")
    assert pair.pk.received([own]) == 0


def test_peer_unreachable_makes_sync_fail_saying_so(pair: Pair) -> None:
    pair.pk.stop()
    bundle_id = pair.jp.send()
    pair.jp.stop()
    done = sync(pair.jp)
    assert done.returncode == 1
    assert f"error: peer at 127.0.0.1:{pair.pk.home.port}: connection refused" in done.stderr
    assert pair.jp.queued([bundle_id]) == 1
    pair.pk.start()
    assert sync(pair.jp).returncode == 0
    assert_exactly_once(pair.jp, pair.pk, [bundle_id])


@pytest.mark.slow
def test_after_key_rotation_the_peer_accepts_new_keys_and_refuses_the_revoked_one(
    pair: Pair, tmp_path: Path
) -> None:
    pair.jp.stop()
    pair.pk.start()
    old_keyring = pair.jp.keyring()
    old_key = old_keyring.signing_key_id
    prepared = pair.jp.send()  # sealed with the old key, delivered after the rotation
    pair.jp.home.run("keys", "rotate")
    new_keyring = pair.jp.keyring(fresh=True)
    assert new_keyring.signing_key_id != old_key
    done = sync(pair.jp)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["manifests_sent"] == 1
    fresh = pair.jp.send()
    assert sync(pair.jp).returncode == 0
    assert_exactly_once(pair.jp, pair.pk, [prepared, fresh])
    with pair.pk.node.db.transaction() as session:
        key_of = dict(
            session.execute(
                select(InboxEntry.bundle_id, InboxEntry.signing_key_id).where(
                    InboxEntry.bundle_id.in_([prepared, fresh])
                )
            ).all()
        )
    assert key_of == {prepared: old_key, fresh: new_keyring.signing_key_id}
    # Revoke the old signing key: what it signed is refused from then on.
    stale = tmp_path / "stale"
    with stale.open("w+b") as handle:
        seal(
            handle,
            case_type="exam-fraud",
            case=example("exam-fraud"),
            keyring=old_keyring,
            peer_manifest=pair.jp.peer_manifest(),
            policy=load_policy(pair.jp.settings),
            sequence=10_000,
            now=utc_now(),
        )
    pair.jp.home.run("keys", "revoke", old_key, "--reason", "laptop lost", "--yes")
    assert sync(pair.jp).returncode == 0
    pair.jp.keyring(fresh=True)
    [answer] = post(pair.jp, [stale])
    assert (answer.status, answer.reason) == ("refused", "envelope.signing-key")
