"""Attacks found in a security review, each reproduced and shown refused.

Every test is named after the attack it replays.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.core.keys import (
    KeyNotUsable,
    ManifestKey,
    ManifestRejected,
    Revocation,
    key_id,
    parse_manifest,
    verify_manifest,
)
from gateway.core.peer_auth import (
    KeyLookup,
    PeerAuthFailed,
    parse_signed_request,
    verify_request,
)
from gateway.errors import VerificationError
from gateway.node.runtime import utc_now
from gateway.peer.client import PeerClient, PeerRefused
from gateway.peer.server import database_nonce_recorder
from gateway.settings import Settings
from tests.nodes import KeyTable, RawSigner, make_services, migrated_database, start_test_server
from tests.unit.test_keys import T0, YEAR, Builder, seeded_signing
from tests.unit.test_peer_auth import headers_for, lookup

# -- replayed peer request ------------------------------------------------------------------


def test_replayed_peer_request_at_the_edge_of_the_window_is_refused(database_url: str) -> None:
    """A captured request replayed as its time leaves the skew window.

    The verifier judges the request time against the clock it read when the
    headers arrived; the nonce store reads its clock a moment later and first
    forgets every nonce older than the window. Between the two readings the
    original's nonce is forgotten and the replay recorded as new, unless the
    store refuses a request time it can no longer vouch for.
    """
    skew = timedelta(minutes=5)
    db = migrated_database(database_url)
    try:
        sent = utc_now().replace(microsecond=0)
        headers = headers_for(now=sent, body=b"envelope")
        request = parse_signed_request(headers)
        first = database_nonce_recorder(db, skew=skew, clock=lambda: sent)
        verify_request(
            request,
            method="POST",
            path="/v1/envelopes",
            recipient="pk",
            expected_sender="jp",
            now=sent,
            lookup_key=lookup,
            remember_nonce=first,
        )
        # The replay: its headers are checked at the very edge of the window,
        # its nonce is recorded a little later (a database round trip, a thread hop).
        checked_at = sent + skew
        recorded_at = checked_at + timedelta(milliseconds=5)
        later = database_nonce_recorder(db, skew=skew, clock=lambda: recorded_at)
        with pytest.raises(PeerAuthFailed) as caught:
            verify_request(
                request,
                method="POST",
                path="/v1/envelopes",
                recipient="pk",
                expected_sender="jp",
                now=checked_at,
                lookup_key=lookup,
                remember_nonce=later,
            )
        assert caught.value.reason == "auth.replay"
    finally:
        db.dispose()


def test_nonce_store_still_admits_a_fresh_request_after_pruning(database_url: str) -> None:
    skew = timedelta(minutes=5)
    db = migrated_database(database_url)
    try:
        now = utc_now()
        remember = database_nonce_recorder(db, skew=skew, clock=lambda: now)
        assert remember("jp", hashlib.sha256(b"a").digest()[:16], now - skew) is True
        assert remember("jp", hashlib.sha256(b"b").digest()[:16], now + skew) is True
    finally:
        db.dispose()


# -- a revoked key brought back ---------------------------------------------------------------


def _revoking_then_unrevoking() -> tuple[bytes, bytes, str]:
    builder = Builder()
    revoked = key_id(bytes(builder.sign.verify_key))
    spare = seeded_signing(12)
    keys = [
        *builder.keys(),
        ManifestKey(
            key_id(bytes(spare.verify_key)), "sign", bytes(spare.verify_key), T0, T0 + YEAR
        ),
    ]
    at = T0 + timedelta(days=10)
    v2 = builder.manifest(
        2, issued=at, keys=keys, revocations=[Revocation(revoked, at, "key compromised")]
    )
    v3 = builder.manifest(3, issued=at + timedelta(days=1), keys=keys, revocations=[])
    return v2, v3, revoked


def test_manifest_that_unrevokes_a_revoked_signing_key_is_refused() -> None:
    """Revocation is for good (SPEC §4): a later manifest may not list the key as usable again."""
    v2, v3, revoked = _revoking_then_unrevoking()
    now = T0 + timedelta(days=12)
    pinned = parse_manifest(v2)
    with pytest.raises(KeyNotUsable):
        pinned.signing_key(revoked, at=now)
    with pytest.raises(ManifestRejected) as caught:
        verify_manifest(v3, node="jp", pinned=pinned, expected_fingerprint=None, now=now)
    assert caught.value.check == "manifest-revocation"


def test_manifest_that_keeps_a_revocation_or_drops_the_key_passes() -> None:
    v2, _, revoked = _revoking_then_unrevoking()
    builder = Builder()
    pinned = parse_manifest(v2)
    now = T0 + timedelta(days=12)
    kept = builder.manifest(
        3, issued=now, keys=list(pinned.keys), revocations=list(pinned.revocations)
    )
    assert verify_manifest(kept, node="jp", pinned=pinned, expected_fingerprint=None, now=now)
    dropped_keys = [k for k in pinned.keys if k.key_id != revoked]
    dropped = builder.manifest(4, issued=now, keys=dropped_keys, revocations=[])
    assert verify_manifest(dropped, node="jp", pinned=pinned, expected_fingerprint=None, now=now)


def test_a_revoked_key_dropped_and_then_listed_again_is_refused() -> None:
    """v2 revokes K, v3 drops K (allowed), v4 lists K again unrevoked: K would be usable
    again and what was marked suspect would open as valid. A key new to the pinned
    manifest must be new: its window may not open before the pinned version's issue."""
    v2, v3_relisting, revoked = _revoking_then_unrevoking()
    builder = Builder()
    now = T0 + timedelta(days=12)
    with_revocation = parse_manifest(v2)
    dropped = builder.manifest(
        3,
        issued=now,
        keys=[k for k in with_revocation.keys if k.key_id != revoked],
        revocations=[],
    )
    pinned = verify_manifest(
        dropped, node="jp", pinned=with_revocation, expected_fingerprint=None, now=now
    )
    assert revoked not in {k.key_id for k in pinned.keys}
    back = builder.manifest(
        4,
        issued=now + timedelta(hours=1),
        keys=list(parse_manifest(v3_relisting).keys),
        revocations=[],
    )
    with pytest.raises(ManifestRejected) as caught:
        verify_manifest(back, node="jp", pinned=pinned, expected_fingerprint=None, now=now)
    assert caught.value.check == "manifest-revocation"
    assert revoked in str(caught.value)


# -- manifest route before authentication -----------------------------------------------------


class _CountingPreview:
    """Verifies nothing and counts how often the server asked it to (each call is work
    done, and a body read, for a caller who has not authenticated)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, raw: bytes, *, now: datetime) -> KeyLookup:
        self.calls += 1
        raise VerificationError("manifest not signed by the pinned key", reason="manifest.x")


def _post_manifest(tmp_path: Path, url: str, signer: RawSigner, clock: Any) -> PeerRefused:
    settings = Settings.model_validate(
        {"home": tmp_path / "jp", "node": {"id": "jp"}, "server": {"peer_url": url}}
    )

    async def post() -> None:
        async with PeerClient(settings, signer, clock=clock) as client:
            await client.post_manifest(b'{"keys": {}}')

    with pytest.raises(PeerRefused) as caught:
        asyncio.run(post())
    return caught.value


@pytest.mark.parametrize(
    ("case", "signer", "offset"),
    [
        ("claims to be this node", RawSigner.make("pk", "pk-op-9"), timedelta(0)),
        ("out of the time window", RawSigner.make("jp", "jp-op-9"), timedelta(hours=3)),
    ],
)
def test_stranger_posting_a_manifest_gets_401_before_the_body_is_read(
    tmp_path: Path, case: str, signer: RawSigner, offset: timedelta
) -> None:
    """The manifest route finishes authentication after reading the body only for the
    pinned peer's fresh request signed by a key the pinned manifest does not list yet;
    a request from another sender, or out of the time window, is refused at once."""
    db = migrated_database(f"sqlite:///{tmp_path / 'pk.sqlite3'}")
    preview = _CountingPreview()
    applied: list[bytes] = []

    def apply(raw: bytes, *, now: datetime) -> None:
        applied.append(raw)

    services, _ = make_services(
        tmp_path,
        db,
        keys=KeyTable({}),
        receiver=RawSigner.make("pk", "pk-op-1"),
        apply_manifest=apply,
        preview_manifest=preview,
    )
    try:
        with start_test_server(services) as server:
            refusal = _post_manifest(tmp_path, server.url, signer, lambda: utc_now() - offset)
        assert (refusal.status, refusal.reason) == (
            401,
            "auth.unknown-key" if not offset else "auth.stale",
        ), case
        assert preview.calls == 0
        assert applied == []
    finally:
        db.dispose()


# -- rewritten peer history pushed as a larger checkpoint ------------------------------------


def test_peer_rewrites_witnessed_history_then_pushes_a_larger_checkpoint(
    tmp_path: Path,
) -> None:
    from gateway.core.ledger import EntryKind, WitnessMismatch  # noqa: PLC0415
    from gateway.core.roles import Actor, Role  # noqa: PLC0415
    from gateway.node import ledger  # noqa: PLC0415
    from gateway.node.ledger import checkpoint as ledger_checkpoint  # noqa: PLC0415
    from gateway.node.ledger import witness as ledger_witness  # noqa: PLC0415
    from tests.integration.test_ledger import RawKeys, open_node_db  # noqa: PLC0415
    from tests.integration.test_ledger import RawSigner as LedgerSigner  # noqa: PLC0415

    t0 = datetime(2026, 11, 25, 21, 0, tzinfo=UTC)
    officer = Actor(name="aiko", role=Role.OFFICER)
    pk = LedgerSigner(b"p" * 32)

    def build(name: str, bodies: list[Any]) -> Any:
        database = open_node_db(f"sqlite:///{tmp_path / name}.sqlite3", name[:2])
        with database.transaction() as session:
            for i, body in enumerate(bodies):
                ledger.record_event(
                    session,
                    kind=EntryKind.BUNDLE_READ,
                    actor=officer,
                    now=t0 + timedelta(seconds=i),
                    bundle_id="b-1",
                    body=body,
                )
        return database

    witness = open_node_db(f"sqlite:///{tmp_path / 'jp'}.sqlite3", "jp")
    honest = build("pk-honest", [{"n": i} for i in range(4)])
    # The peer's administrator rebuilds the ledger with entry 2 changed, and one entry more.
    forged = build("pk-forged", [{"n": 0}, {"n": 1}, {"n": "hidden"}, {"n": 3}, {"n": 4}])
    try:
        with honest.transaction() as session:
            first = ledger_checkpoint.make_checkpoint(session, pk, t0)
        with forged.transaction() as session:
            bigger = ledger_checkpoint.make_checkpoint(session, pk, t0 + timedelta(hours=1))
        with witness.transaction() as session:
            ledger_witness.store_peer_checkpoint(
                session, first.to_wire(), RawKeys(pk), peer_node="pk", now=t0
            )
        # Pushed without a proof, the larger tree is not taken as a witness.
        with (
            pytest.raises(ledger_witness.ConsistencyProofRequired) as required,
            witness.transaction() as session,
        ):
            ledger_witness.store_peer_checkpoint(
                session, bigger.to_wire(), RawKeys(pk), peer_node="pk", now=t0
            )
        assert required.value.witnessed_size == first.checkpoint.size
        # With the only proof the forger can make (from its own rebuilt tree), it is caught.
        with forged.transaction() as session:
            forged_proof = ledger_checkpoint.consistency_proof(
                session, first.checkpoint.size, bigger.checkpoint.size
            )
        with pytest.raises(WitnessMismatch), witness.transaction() as session:
            ledger_witness.store_peer_checkpoint(
                session, bigger.to_wire(), RawKeys(pk), peer_node="pk", now=t0, proof=forged_proof
            )

        def answer(first_size: int) -> ledger_witness.PeerAnswer:
            with forged.transaction() as session:
                latest = ledger_checkpoint.latest_checkpoint(session)
                assert latest is not None
                proof = ledger_checkpoint.consistency_proof(
                    session, first_size, latest.checkpoint.size
                )
            return ledger_witness.PeerAnswer(checkpoint=latest.to_wire(), proof=proof)

        with pytest.raises(WitnessMismatch):
            ledger_witness.audit_peer(
                witness, RawKeys(pk), peer_node="pk", fetch=answer, now=lambda: t0
            )
        with witness.transaction() as session:
            assert ledger_witness.last_witnessed(session, "pk") == first.checkpoint
    finally:
        for database in (witness, honest, forged):
            database.dispose()
