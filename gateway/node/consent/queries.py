"""Reading the consent state: per bundle (:func:`load_consent_states`) and as a list."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gateway.core.canonical import parse_bounded_json
from gateway.core.consent import (
    MAX_GRANT_BYTES,
    ConsentGrant,
    ConsentState,
)
from gateway.core.keys import NodeKeyring
from gateway.errors import StorageError
from gateway.node.consent import uses as consent_uses
from gateway.node.consent.receive import apply_pending
from gateway.node.runtime import Node
from gateway.store.models_consent import (
    ConsentApplied,
    ConsentDenialRecord,
    ConsentGrantItem,
    ConsentGrantRecord,
    ConsentRequestRecord,
    ConsentRevocationRecord,
    ConsentUse,
    Direction,
)
from gateway.store.models_exchange import InboxEntry

__all__ = [
    "list_consents",
    "load_consent_states",
]


def load_consent_states(session: Session, bundle_ids: Sequence[str]) -> list[ConsentState]:
    """The received consents naming any of ``bundle_ids``, with revocation and uses.

    A grant whose bundle this node marked suspect (docs/keys.md, "Revocation
    with a time") comes back with ``suspect`` set, and authorises nothing.

    One query: read from the signed documents as received (the lookup columns
    only find them); revocations and uses as committed at the time of the call.
    """
    naming = (
        select(ConsentGrantItem.consent_id)
        .where(ConsentGrantItem.bundle_id.in_(bundle_ids))
        .scalar_subquery()
    )
    spent = (
        select(func.count())
        .select_from(ConsentUse)
        .where(ConsentUse.consent_id == ConsentGrantRecord.consent_id)
        .scalar_subquery()
    )
    suspect = (
        select(func.count())
        .select_from(InboxEntry)
        .where(
            InboxEntry.bundle_id == ConsentGrantRecord.bundle_id,
            InboxEntry.sender == ConsentGrantRecord.granting_node,
            InboxEntry.suspect_since.is_not(None),
        )
        .scalar_subquery()
    )
    rows = session.execute(
        select(
            ConsentGrantRecord.consent_id,
            ConsentGrantRecord.document,
            ConsentRevocationRecord.revoked_at,
            spent,
            suspect,
        )
        .outerjoin(
            ConsentRevocationRecord,
            ConsentRevocationRecord.consent_id == ConsentGrantRecord.consent_id,
        )
        .where(
            ConsentGrantRecord.consent_id.in_(naming),
            ConsentGrantRecord.direction == Direction.RECEIVED,
        )
        .order_by(ConsentGrantRecord.consent_id)
    ).all()
    states: list[ConsentState] = []
    for consent_id, document, revoked_at, uses, marked in rows:
        written = ConsentGrant.from_document(
            parse_bounded_json(bytes(document), max_bytes=MAX_GRANT_BYTES)
        )
        if written.consent_id != consent_id:
            raise StorageError(f"stored consent {consent_id} holds another consent's document")
        states.append(
            ConsentState(
                written,
                revoked_at=revoked_at,
                uses_spent=int(uses or 0),
                suspect=bool(marked),
            )
        )
    return states


def list_consents(node: Node, keyring: NodeKeyring | None, *, now: datetime) -> dict[str, Any]:
    """Requests, consents and denials in both directions, with each consent's state."""
    if keyring is not None:
        apply_pending(node, keyring, now=now)
    with node.db.transaction() as session:
        requests = session.scalars(
            select(ConsentRequestRecord).order_by(ConsentRequestRecord.created_at)
        ).all()
        grants = session.scalars(
            select(ConsentGrantRecord).order_by(ConsentGrantRecord.recorded_at)
        ).all()
        revoked = {r.consent_id: r for r in session.scalars(select(ConsentRevocationRecord))}
        uses = {
            row[0]: row[1]
            for row in session.execute(
                select(ConsentUse.consent_id, func.count()).group_by(ConsentUse.consent_id)
            )
        }
        reported = consent_uses.reported_uses(session)
        uses.update({cid: total for cid, (total, _bad) in reported.items()})
        denials = {d.request_id: d for d in session.scalars(select(ConsentDenialRecord))}
        refused = session.scalars(
            select(ConsentApplied).where(ConsentApplied.outcome == "refused")
        ).all()
        suspect = set(
            session.scalars(
                select(InboxEntry.bundle_id).where(InboxEntry.suspect_since.is_not(None))
            )
        )
        consents = []
        for row in grants:
            items = sorted(
                session.scalars(
                    select(ConsentGrantItem.bundle_id).where(
                        ConsentGrantItem.consent_id == row.consent_id
                    )
                )
            )
            spent = int(uses.get(row.consent_id, 0))
            revocation = revoked.get(row.consent_id)
            if row.direction == Direction.RECEIVED and row.bundle_id in suspect:
                state = "suspect"
            elif revocation is not None:
                state = "revoked"
            elif now >= row.valid_until:
                state = "expired"
            elif row.max_uses is not None and spent >= row.max_uses:
                state = "used up"
            else:
                state = "valid"
            written = ConsentGrant.from_document(
                parse_bounded_json(bytes(row.document), max_bytes=MAX_GRANT_BYTES)
            )
            consents.append(
                {
                    "consent_id": row.consent_id,
                    "direction": row.direction,
                    "request_id": row.request_id,
                    "granting_node": row.granting_node,
                    "items": items,
                    "third_party": row.third_party,
                    "purpose": row.purpose,
                    "valid_from": row.valid_from,
                    "valid_until": row.valid_until,
                    "max_uses": row.max_uses,
                    "uses_spent": spent,
                    "use_violations": reported.get(row.consent_id, (0, 0))[1],
                    "state": state,
                    "revoked_at": None if revocation is None else revocation.revoked_at,
                    "revocation_reason": None if revocation is None else revocation.reason,
                    "granting_officer": written.granting_officer,
                    "approvers": list(written.approvers),
                }
            )
        return {
            "requests": [
                {
                    "request_id": r.request_id,
                    "direction": r.direction,
                    "items": json.loads(r.items_json),
                    "third_party": r.third_party,
                    "purpose": r.purpose,
                    "requesting_officer": r.requesting_officer,
                    "status": r.status,
                    "created_at": r.created_at,
                    "consent_id": r.consent_id,
                    "denial_reason": denials[r.request_id].reason
                    if r.request_id in denials
                    else None,
                }
                for r in requests
            ],
            "consents": consents,
            "refused_bundles": [
                {"bundle_id": a.bundle_id, "type": a.case_type, "detail": a.detail} for a in refused
            ],
        }
