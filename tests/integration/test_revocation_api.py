"""Revocation with a time through the local API, on SQLite and PostgreSQL.

Tokyo sent a bundle that Islamabad received; Tokyo then revokes its signing
key "compromised since" an hour before. Islamabad's API lists the bundle as
suspect, refuses to show it (422, check ``suspect``) unless the officer
accepts it (recorded), and links the bundle Tokyo re-sends through its own
API. Times derive from the real clock, as the keys do.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text, update

from gateway.core.roles import Actor, Role
from gateway.node import ledger, own_keys, peer_trust
from gateway.node.context import NodeContext
from gateway.node.inbox import receive_envelope
from gateway.node.ledger.read import list_entries
from gateway.node.outbox import send_case
from gateway.node.resend import resend_bundles
from gateway.node.runtime import next_whole_second, utc_now
from gateway.store.models_exchange import InboxEntry, OutboxEntry, OutboxState, envelope_path
from tests.integration.test_api import (
    EXAMPLES,
    PASSPHRASE,
    ApiNode,
    Client,
    exchange_pair,
    run_api,
)

ADMIN = Actor(name="admin", role=Role.ADMIN)
OFFICER = Actor(name="officer", role=Role.OFFICER)


@pytest.fixture
def exchanged(
    tmp_path: Path,
    database_url: str,
    pg_database_factory: Callable[[], str],
    clean_environ: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[ApiNode, ApiNode, str]]:
    yield from exchange_pair(
        tmp_path, database_url, pg_database_factory, clean_environ, monkeypatch
    )


def receipted(sender: ApiNode, receiver: ApiNode, bundle_id: str) -> None:
    """Store the receiver's receipt at the sender, as sync does when it comes back."""
    with receiver.node.db.transaction() as session:
        receipt = session.scalars(
            select(InboxEntry.receipt).where(InboxEntry.bundle_id == bundle_id)
        ).one()
    with sender.node.db.transaction() as session:
        row = session.scalars(select(OutboxEntry).where(OutboxEntry.bundle_id == bundle_id)).one()
        row.state, row.receipt, row.delivered_at = OutboxState.DELIVERED, receipt, utc_now()


def deliver(sender: ApiNode, receiver: ApiNode, bundle_id: str) -> None:
    with sender.node.db.transaction() as session:
        sha = session.scalars(
            select(OutboxEntry.envelope_sha256).where(OutboxEntry.bundle_id == bundle_id)
        ).one()
    path = envelope_path(sender.node.settings.blob_dir, sha)
    receive_envelope(NodeContext(receiver.node, receiver.keyring()), path, now=utc_now())


def test_suspect_bundles_are_listed_refused_accepted_and_replaced_through_the_api(
    exchanged: tuple[ApiNode, ApiNode, str],
) -> None:
    jp, pk, bundle_id = exchanged
    receipted(jp, pk, bundle_id)
    old_key = jp.keyring().signing_key_id
    with jp.node.db.transaction() as session:
        # A row from before the signing-key column: the key is read from its header.
        row = session.scalars(select(OutboxEntry).where(OutboxEntry.bundle_id == bundle_id)).one()
        row.signing_key_id = None
    with jp.node.db.transaction() as session:
        change = own_keys.revoke_key(
            jp.node.settings,
            session,
            PASSPHRASE.encode(),
            old_key,
            "laptop lost",
            now=utc_now(),
            actor=ADMIN,
            compromised_since=utc_now() - timedelta(hours=1),
        )
    assert change.impact is not None
    assert change.impact.suspect == (bundle_id,)
    jp.unlocked.clear()
    with pk.node.db.transaction() as session:
        peer_trust.apply_peer_manifest(session, change.manifest.raw, node="jp", now=utc_now())
    officer = pk.tokens["officer"]
    replaced: dict[str, str] = {}

    async def on_pk(client: Client) -> None:
        listed = await client.call("GET", "/api/v1/inbox?suspect=true", token=officer)
        assert listed.status == 200, listed.body
        assert [(b["bundle_id"], b["suspect"]) for b in listed.body["bundles"]] == [
            (bundle_id, True)
        ]
        refused = await client.call("GET", f"/api/v1/bundles/{bundle_id}", token=officer)
        assert (refused.status, refused.reason) == (422, "envelope.suspect"), refused.body
        bad = await client.call(
            "GET", f"/api/v1/bundles/{bundle_id}?accept_suspect=yes", token=officer
        )
        assert (bad.status, bad.reason) == (422, "invalid-input"), bad.body
        shown = await client.call(
            "GET", f"/api/v1/bundles/{bundle_id}?accept_suspect=true", token=officer
        )
        assert shown.status == 200, shown.body
        assert shown.body["trust"] == "suspect-accepted"
        ledger = await client.call(
            "GET", f"/api/v1/ledger?bundle={bundle_id}", token=pk.tokens["compliance"]
        )
        recorded = [(e["kind"], e["actor"]) for e in ledger.body]
        assert ("bundle-suspect", "system") in recorded
        assert ("suspect-accepted", "officer") in recorded
        assert recorded.index(("suspect-accepted", "officer")) < recorded.index(
            ("bundle-read", "officer")
        )

    run_api(pk, on_pk)

    async def on_jp(client: Client) -> None:
        token = jp.tokens["officer"]
        for body in ({}, {"bundle_ids": [bundle_id], "suspect": True}, {"suspect": "yes"}):
            answer = await client.call("POST", "/api/v1/resend", token=token, body=body)
            assert (answer.status, answer.reason) == (422, "invalid-input"), (body, answer.body)
        done = await client.call("POST", "/api/v1/resend", token=token, body={"suspect": True})
        assert done.status == 201, done.body
        [resent] = done.body["resent"]
        assert resent["replaces"] == bundle_id
        replaced[bundle_id] = resent["bundle_id"]
        again = await client.call(
            "POST", "/api/v1/resend", token=token, body={"bundle_ids": [bundle_id]}
        )
        assert (again.status, again.reason) == (409, "exists"), again.body
        nothing = await client.call("POST", "/api/v1/resend", token=token, body={"suspect": True})
        assert (nothing.status, nothing.body["resent"]) == (200, [])

    run_api(jp, on_jp)
    deliver(jp, pk, replaced[bundle_id])

    async def linked(client: Client) -> None:
        listed = await client.call("GET", "/api/v1/inbox", token=officer)
        rows = {b["bundle_id"]: b for b in listed.body["bundles"]}
        assert rows[bundle_id]["replaced_by"] == replaced[bundle_id]
        assert rows[replaced[bundle_id]]["replaces"] == bundle_id
        assert rows[replaced[bundle_id]]["suspect"] is False
        shown = await client.call("GET", f"/api/v1/bundles/{replaced[bundle_id]}", token=officer)
        assert (shown.status, shown.body["trust"]) == (200, "valid")
        assert shown.body["replaces"] == bundle_id

    run_api(pk, linked)
    with jp.node.db.transaction() as session:
        [resent_entry] = list_entries(session, kind="bundle-resent")
    assert resent_entry.bundle_id == bundle_id
    assert resent_entry.body["replaced_by"] == replaced[bundle_id]
    assert resent_entry.body["original_signing_key_id"] == old_key


def test_a_bundle_still_queued_under_a_revoked_key_is_resent_and_no_longer_sent(
    exchanged: tuple[ApiNode, ApiNode, str],
) -> None:
    jp, pk, delivered = exchanged
    old_key = jp.keyring().signing_key_id
    receipted(jp, pk, delivered)
    queued = send_case(
        NodeContext(jp.node, jp.keyring()),
        OFFICER,
        "exam-fraud",
        json.loads((EXAMPLES / "exam-fraud.json").read_text()),
        [],
        public=False,
        reply_to=None,
        now=utc_now(),
    ).bundle_id
    # Revoked without a compromise time: what pk holds stays trusted, but the
    # queued bundle would be refused as it is. Revocation times are whole seconds
    # (a bundle stored in the second of the revocation counts as after it): start
    # the revocation in a later second than everything stored so far.
    next_whole_second()
    with jp.node.db.transaction() as session:
        change = own_keys.revoke_key(
            jp.node.settings,
            session,
            PASSPHRASE.encode(),
            old_key,
            "retired and revoked",
            now=utc_now(),
            actor=ADMIN,
        )
    assert change.impact is not None
    assert (change.impact.suspect, change.impact.trusted) == ((), 1)
    assert change.impact.undelivered == (queued,)
    jp.unlocked.clear()
    report = resend_bundles(
        NodeContext(jp.node, jp.keyring()), OFFICER, [], suspect=True, now=utc_now()
    )
    [resent] = report.resent
    assert resent.original == queued
    with jp.node.db.transaction() as session:
        rows = {r.bundle_id: r for r in session.scalars(select(OutboxEntry))}
    assert rows[queued].state == OutboxState.REPLACED
    assert rows[queued].replaced_by == resent.bundle_id
    assert rows[resent.bundle_id].state == OutboxState.QUEUED
    assert rows[delivered].replaced_by is None  # delivered before the revocation: left alone
    with pk.node.db.transaction() as session:
        peer_trust.apply_peer_manifest(session, change.manifest.raw, node="jp", now=utc_now())
    deliver(jp, pk, resent.bundle_id)
    with pk.node.db.transaction() as session:
        received = {r.bundle_id: r for r in session.scalars(select(InboxEntry))}
    assert queued not in received
    assert received[resent.bundle_id].replaces == queued  # named, though never seen here
    assert received[delivered].suspect_since is None


def test_a_bundle_sealed_before_the_compromise_but_stored_after_it_is_suspect_on_both_sides(
    exchanged: tuple[ApiNode, ApiNode, str],
) -> None:
    """Queued through an outage: sealed while the key was trusted, stored by the peer
    after the compromise time. The peer judges by when it stored the bundle; the
    sender's impact report and ``resend --suspect`` must judge by the same time."""
    from gateway.node.revocation import suspect_sent  # noqa: PLC0415

    jp, pk, early = exchanged
    receipted(jp, pk, early)
    old_key = jp.keyring().signing_key_id
    late = send_case(
        NodeContext(jp.node, jp.keyring()),
        OFFICER,
        "exam-fraud",
        json.loads((EXAMPLES / "exam-fraud.json").read_text()),
        [],
        public=False,
        reply_to=None,
        now=utc_now(),
    ).bundle_id
    next_whole_second()
    compromised_since = utc_now().replace(microsecond=0)
    next_whole_second()
    deliver(jp, pk, late)  # the outage ends: the peer stores it now
    receipted(jp, pk, late)
    with jp.node.db.transaction() as session:
        change = own_keys.revoke_key(
            jp.node.settings,
            session,
            PASSPHRASE.encode(),
            old_key,
            "laptop lost",
            now=utc_now(),
            actor=ADMIN,
            compromised_since=compromised_since,
        )
    assert change.impact is not None
    assert change.impact.suspect == (late,)
    assert change.impact.trusted >= 1  # the early bundle, stored before the compromise
    with jp.node.db.transaction() as session:
        assert [e.bundle_id for e in suspect_sent(jp.node.settings, session, change.manifest)] == [
            late
        ]
    with pk.node.db.transaction() as session:
        peer_trust.apply_peer_manifest(session, change.manifest.raw, node="jp", now=utc_now())
    with pk.node.db.transaction() as session:
        marked = {
            row.bundle_id: row.suspect_since is not None
            for row in session.scalars(select(InboxEntry).where(InboxEntry.sender == "jp"))
        }
    assert marked[late] is True
    assert marked[early] is False


def test_a_batch_verified_before_a_revocation_is_pinned_is_not_stored_after_it(
    exchanged: tuple[ApiNode, ApiNode, str],
) -> None:
    """The server verifies a request while earlier ones commit. A manifest revoking
    the signing key pinned in between makes the prepared batch outdated: nothing of
    it is stored, and the resend is judged against the new manifest."""
    from gateway.errors import VerificationError  # noqa: PLC0415
    from gateway.node.inbox import BatchOutdated, commit_batch, prepare_batch  # noqa: PLC0415

    jp, pk, delivered = exchanged
    receipted(jp, pk, delivered)
    old_key = jp.keyring().signing_key_id
    bundle = send_case(
        NodeContext(jp.node, jp.keyring()), OFFICER, "exam-fraud",
        json.loads((EXAMPLES / "exam-fraud.json").read_text()), [],
        public=False, reply_to=None, now=utc_now(),
    ).bundle_id  # fmt: skip
    with jp.node.db.transaction() as session:
        sha = session.scalars(
            select(OutboxEntry.envelope_sha256).where(OutboxEntry.bundle_id == bundle)
        ).one()
    path = envelope_path(jp.node.settings.blob_dir, sha)
    ctx = NodeContext(pk.node, pk.keyring())
    prepared = prepare_batch(ctx, [path], now=utc_now())
    with jp.node.db.transaction() as session:
        change = own_keys.revoke_key(
            jp.node.settings, session, PASSPHRASE.encode(), old_key, "laptop lost",
            now=utc_now(), actor=ADMIN, compromised_since=utc_now() - timedelta(hours=1),
        )  # fmt: skip
    with pk.node.db.transaction() as session:
        peer_trust.apply_peer_manifest(session, change.manifest.raw, node="jp", now=utc_now())
    with pytest.raises(BatchOutdated):
        commit_batch(ctx, prepared, now=utc_now())
    with pk.node.db.transaction() as session:
        stored = set(session.scalars(select(InboxEntry.bundle_id)))
    assert bundle not in stored
    assert delivered in stored
    [again] = commit_batch(ctx, prepare_batch(ctx, [path], now=utc_now()), now=utc_now())
    assert isinstance(again.error, VerificationError)


@pytest.mark.postgres
@pytest.mark.parametrize("engine_name", ["postgresql"])  # SQLite serialises its writers
def test_a_pin_marking_suspects_waits_for_the_ledger_before_it_locks_an_inbox_row(
    exchanged: tuple[ApiNode, ApiNode, str],
) -> None:
    """A purge holds the ledger lock and then changes inbox rows; a pin that marks
    those rows suspect must take the ledger lock before it touches them, or the two
    transactions deadlock (PostgreSQL then aborts one of them)."""
    jp, pk, bundle_id = exchanged
    receipted(jp, pk, bundle_id)
    with jp.node.db.transaction() as session:
        change = own_keys.revoke_key(
            jp.node.settings, session, PASSPHRASE.encode(), jp.keyring().signing_key_id,
            "laptop lost", now=utc_now(), actor=ADMIN,
            compromised_since=utc_now() - timedelta(hours=1),
        )  # fmt: skip
    failures: list[BaseException] = []

    def pin() -> None:
        try:
            with pk.node.db.transaction() as session:
                peer_trust.apply_peer_manifest(
                    session, change.manifest.raw, node="jp", now=utc_now()
                )
        except BaseException as exc:
            failures.append(exc)

    pinning = threading.Thread(target=pin)
    with pk.node.db.transaction() as purge:
        ledger.lock_for_append(purge)
        pinning.start()
        deadline = time.monotonic() + 30
        while not _waits_for_an_advisory_lock(pk) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _waits_for_an_advisory_lock(pk), "the pin never waited for the ledger lock"
        purge.execute(text("SET LOCAL lock_timeout = '5s'"))
        purge.execute(
            update(InboxEntry)
            .where(InboxEntry.bundle_id == bundle_id)
            .values(envelope_body=InboxEntry.envelope_body)
        )  # the row is free: the pin has not locked it
    pinning.join(timeout=60)
    assert not pinning.is_alive()
    assert failures == []
    with pk.node.db.transaction() as session:
        row = session.scalars(select(InboxEntry).where(InboxEntry.bundle_id == bundle_id)).one()
    assert row.suspect_since is not None


def _waits_for_an_advisory_lock(node: ApiNode) -> bool:
    with node.node.db.transaction() as session:
        return bool(
            session.scalar(
                text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    " AND database = (SELECT oid FROM pg_database"
                    " WHERE datname = current_database())"
                )
            )
        )
