"""Revocation with a time: which stored bundles a revocation makes suspect, on each side.

A revocation names when trust in a signing key ended
(:attr:`~gateway.core.keys.Revocation.distrusted_from`: ``compromised_since``
when given, else the revocation time). The rule itself is pure
(:meth:`~gateway.core.keys.KeyManifest.stored_signing_key`); this shell applies
it to what the node stores:

* **The revoking side** knows what it *sent* under its own key: the bundles of
  its outbox signed by that key and made at or after the distrust time are the
  ones whose copies at the peer become suspect (:func:`revocation_impact`, shown
  by ``gateway keys revoke`` before it acts), and the ones ``gateway resend
  --suspect`` re-seals (:func:`suspect_sent`).
* **The receiving side** marks its *received* copies when the peer's manifest
  carrying the revocation is pinned (:func:`mark_peer_revocations`): each
  bundle of that sender signed by the key and received at or after the distrust
  time gets ``suspect_since`` and a ``bundle-suspect`` ledger entry; the ones
  received before stay readable, "verified while trusted" (their receipt and
  ledger entry prove when they arrived). ``gateway inbox --suspect`` lists the
  marked ones.

The times compared are each node's own records: the receiver's ``received_at``
(in its signed receipt and its ledger) and the sender's ``created_at`` of its
outbox row. Clock skew between the two nodes is bounded by the freshness
check of every envelope (``[limits] clock_skew_seconds``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.core.envelope import read_header
from gateway.core.keys import KeyManifest, Revocation, format_time
from gateway.core.ledger import EntryKind
from gateway.core.receipt import ReceiptInvalid, parse_receipt
from gateway.core.roles import SYSTEM
from gateway.errors import StorageError
from gateway.log import get_logger
from gateway.node.ledger import lock_for_append, record_event
from gateway.node.policy import load_policy
from gateway.settings import Settings
from gateway.store.models_exchange import InboxEntry, OutboxEntry, OutboxState, envelope_path

__all__ = [
    "PeerRevocation",
    "RevocationImpact",
    "mark_peer_revocations",
    "outbox_signing_key",
    "revocation_impact",
    "suspect_sent",
]

_log = get_logger("revocation")


@dataclass(frozen=True)
class RevocationImpact:
    """What revoking one of this node's keys means for the copies the peer stores.

    ``suspect``: ids of bundles this node sent signed by the key and made at
    or after ``distrusted_from``; the peer marks its copies suspect (and
    ``gateway resend --suspect`` re-seals them). ``trusted``: how many it sent
    under the key before, which stay readable at the peer. ``undelivered``:
    ids of bundles signed by the key and still queued; the peer refuses
    anything new under a revoked key, so these are never delivered as they are
    (``resend --suspect`` re-seals them too).
    """

    key_id: str
    use: str
    distrusted_from: datetime
    suspect: tuple[str, ...]
    trusted: int
    undelivered: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "use": self.use,
            "distrusted_from": self.distrusted_from,
            "suspect_at_peer": len(self.suspect),
            "suspect_bundles": list(self.suspect),
            "verified_while_trusted_at_peer": self.trusted,
            "undelivered": list(self.undelivered),
        }


def outbox_signing_key(settings: Settings, entry: OutboxEntry) -> str:
    """The key that signed an outbox bundle: the row's column, or its stored header.

    Rows queued before the column existed are read from the envelope file's
    header (bounded by the policy limits). :class:`StorageError` when the file
    is missing.
    """
    if entry.signing_key_id is not None:
        return entry.signing_key_id

    limits = load_policy(settings).limits
    path = envelope_path(settings.blob_dir, entry.envelope_sha256)
    try:
        with path.open("rb") as stream:
            header, _raw = read_header(stream, limits)
    except OSError as exc:
        raise StorageError(
            f"the envelope of sent bundle {entry.bundle_id} cannot be read: {exc.strerror}"
        ) from None
    entry.signing_key_id = header.signing_key_id
    return header.signing_key_id


def revocation_impact(
    settings: Settings,
    session: Session,
    manifest: KeyManifest,
    kid: str,
    *,
    revocation: Revocation,
) -> RevocationImpact:
    """What ``revocation`` of our key ``kid`` marks suspect at the peer (see the class)."""
    use = manifest.key(kid).use
    suspect: list[str] = []
    undelivered: list[str] = []
    trusted = 0
    if use == "sign":
        query = select(OutboxEntry).where(OutboxEntry.state != OutboxState.REPLACED)
        for entry in session.scalars(query.order_by(OutboxEntry.sequence)):
            if outbox_signing_key(settings, entry) != kid:
                continue
            if entry.state == OutboxState.QUEUED:
                undelivered.append(entry.bundle_id)
            elif revocation.distrusts(stored_by_peer_at(entry)):
                suspect.append(entry.bundle_id)
            else:
                trusted += 1
    return RevocationImpact(
        key_id=kid,
        use=use,
        distrusted_from=revocation.distrusted_from,
        suspect=tuple(suspect),
        trusted=trusted,
        undelivered=tuple(undelivered),
    )


def suspect_sent(settings: Settings, session: Session, manifest: KeyManifest) -> list[OutboxEntry]:
    """This node's sent bundles whose peer copies are suspect and not yet re-sent.

    Signed by one of our revoked signing keys, not replaced by a later
    ``resend``, and either stored by the peer at or after the moment the key is
    distrusted from (:func:`stored_by_peer_at`: the peer judges by that time),
    or still queued (the peer refuses it as it is); in sequence order.
    """
    revoked = {r.key_id: r for r in manifest.revocations}
    if not revoked:
        return []
    found: list[OutboxEntry] = []
    query = (
        select(OutboxEntry)
        .where(OutboxEntry.replaced_by.is_(None))
        .order_by(OutboxEntry.channel, OutboxEntry.sequence)
    )
    for entry in session.scalars(query):
        revocation = revoked.get(outbox_signing_key(settings, entry))
        if revocation is None:
            continue
        if entry.state == OutboxState.QUEUED or revocation.distrusts(stored_by_peer_at(entry)):
            found.append(entry)
    return found


def stored_by_peer_at(entry: OutboxEntry) -> datetime:
    """When the peer stored a sent bundle: its signed receipt's ``received_at``.

    The peer marks a bundle suspect by the time *it* stored it, so the sender
    must judge by the same time: a bundle sealed before the distrust time but
    delivered after it (queued through an outage) is suspect at the peer.
    Without a receipt that parses, ``delivered_at``, else ``created_at``
    (queued bundles are counted apart by the callers).
    """
    if entry.receipt is not None:
        try:
            return parse_receipt(entry.receipt).received_at
        except ReceiptInvalid:
            pass
    return entry.delivered_at if entry.delivered_at is not None else entry.created_at


@dataclass(frozen=True)
class PeerRevocation:
    """What pinning a peer manifest with a new revocation did to this node's inbox."""

    key_id: str
    distrusted_from: datetime
    suspect: tuple[str, ...]
    verified_while_trusted: int


def mark_peer_revocations(
    session: Session, *, before: KeyManifest | None, after: KeyManifest, now: datetime
) -> list[PeerRevocation]:
    """Mark the received bundles that the revocations new in ``after`` make suspect.

    For each signing key revoked in ``after`` but not in ``before`` (the
    manifest pinned until now): every bundle of that sender signed by the key
    and received at or after the revocation's distrust time gets
    ``suspect_since = now`` and a ``bundle-suspect`` ledger entry; a
    ``key-event`` entry (``peer-key-revoked``) counts those and the ones that
    stay readable as verified while trusted. Runs in the caller's transaction.

    Takes the ledger's append lock before it changes any inbox row, the order a
    batch commit and a retention purge lock in (ledger, then inbox rows): a row
    changed first would be flushed, and so locked, by the lock's own statement,
    and a purge holding the ledger lock and waiting for that row would deadlock
    with this transaction on PostgreSQL.
    """
    reports: list[PeerRevocation] = []
    lock_for_append(session)
    for revocation in after.revocations:
        if before is not None and before.revocation(revocation.key_id) is not None:
            continue
        if after.key(revocation.key_id).use != "sign":
            continue
        rows = session.scalars(
            select(InboxEntry)
            .where(
                InboxEntry.sender == after.node,
                InboxEntry.signing_key_id == revocation.key_id,
            )
            .order_by(InboxEntry.received_at, InboxEntry.id)
        ).all()
        suspect: list[str] = []
        trusted = 0
        for row in rows:
            if not revocation.distrusts(row.received_at):
                trusted += 1
                continue
            suspect.append(row.bundle_id)
            if row.suspect_since is None:
                row.suspect_since = now
            record_event(
                session,
                kind=EntryKind.BUNDLE_SUSPECT,
                actor=SYSTEM,
                now=now,
                bundle_id=row.bundle_id,
                body={
                    "sender": row.sender,
                    "signing_key_id": revocation.key_id,
                    "received_at": format_time(row.received_at),
                    "distrusted_from": format_time(revocation.distrusted_from),
                    "reason": revocation.reason,
                },
            )
        record_event(
            session,
            kind=EntryKind.KEY_EVENT,
            actor=SYSTEM,
            now=now,
            body={
                "event": "peer-key-revoked",
                "peer": after.node,
                "manifest_version": after.version,
                "key_id": revocation.key_id,
                "revoked_at": format_time(revocation.revoked_at),
                "compromised_since": (
                    format_time(revocation.compromised_since)
                    if revocation.compromised_since is not None
                    else None
                ),
                "reason": revocation.reason,
                "suspect": len(suspect),
                "verified_while_trusted": trusted,
            },
        )
        _log.warning(
            "peer_key_revoked",
            peer=after.node,
            key_id=revocation.key_id,
            suspect=len(suspect),
            verified_while_trusted=trusted,
        )
        reports.append(
            PeerRevocation(
                key_id=revocation.key_id,
                distrusted_from=revocation.distrusted_from,
                suspect=tuple(suspect),
                verified_while_trusted=trusted,
            )
        )
    session.flush()
    return reports
