"""Storing consent documents: a grant, a denial, a revocation, with their ledger entries.

Shared by both sides: this node's own step (:mod:`gateway.node.consent.protocol`)
and a document received from the peer (:mod:`gateway.node.consent.receive`) are
stored the same way.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

from sqlalchemy.orm import Session

from gateway.core.consent import (
    ConsentGrant,
    SignedGrant,
    format_time,
    terms_record,
)
from gateway.core.roles import Actor
from gateway.errors import AlreadyExists
from gateway.node import ledger
from gateway.store.models_consent import (
    ConsentDenialRecord,
    ConsentGrantItem,
    ConsentGrantRecord,
    ConsentRevocationRecord,
)

__all__ = [
    "store_denial",
    "store_grant",
    "store_revocation",
]


def store_grant(
    session: Session,
    written: ConsentGrant,
    signed: SignedGrant,
    *,
    direction: str,
    bundle_id: str,
    now: datetime,
    actor: Actor,
) -> None:
    if session.get(ConsentGrantRecord, written.consent_id) is not None:
        raise AlreadyExists(f"consent {written.consent_id} is recorded already")
    session.add(
        ConsentGrantRecord(
            consent_id=written.consent_id,
            request_id=written.request_id,
            direction=direction,
            granting_node=written.granting_node,
            key_id=written.key_id,
            document=signed.document,
            signature=signed.signature,
            third_party=written.third_party,
            purpose=written.purpose,
            valid_from=written.valid_from,
            valid_until=written.valid_until,
            max_uses=written.max_uses,
            bundle_id=bundle_id,
            recorded_at=now,
            actor=actor.label,
            terms=terms_record(written, signed.document),
        )
    )
    session.flush()
    for item in written.items:
        session.add(ConsentGrantItem(consent_id=written.consent_id, bundle_id=item))
    ledger.record_event(
        session,
        kind="consent-granted",
        actor=actor,
        now=now,
        bundle_id=bundle_id,
        consent_id=written.consent_id,
        body={
            "direction": direction,
            "request_id": written.request_id,
            "items": list(written.items),
            "third_party": written.third_party,
            "purpose": written.purpose,
            "valid_from": format_time(written.valid_from),
            "valid_until": format_time(written.valid_until),
            "max_uses": written.max_uses,
            "granting_officer": written.granting_officer,
            "granting_node": written.granting_node,
            "key_id": written.key_id,
            "document_sha256": hashlib.sha256(signed.document).hexdigest(),
            **({"approvers": list(written.approvers)} if written.approvers else {}),
        },
    )


def store_denial(
    session: Session,
    *,
    request_id: str,
    direction: str,
    reason: str,
    officer: str,
    bundle_id: str,
    now: datetime,
    actor: Actor,
) -> None:
    session.add(
        ConsentDenialRecord(
            request_id=request_id,
            direction=direction,
            reason=reason,
            denying_officer=officer,
            denied_at=now,
            bundle_id=bundle_id,
            actor=actor.label,
        )
    )
    ledger.record_event(
        session,
        kind="consent-denied",
        actor=actor,
        now=now,
        bundle_id=bundle_id,
        body={
            "direction": direction,
            "request_id": request_id,
            "denying_officer": officer,
            "reason": reason,
        },
    )


def store_revocation(
    session: Session,
    *,
    consent_id: str,
    direction: str,
    reason: str,
    officer: str,
    bundle_id: str,
    now: datetime,
    actor: Actor,
) -> None:
    session.add(
        ConsentRevocationRecord(
            consent_id=consent_id,
            direction=direction,
            reason=reason,
            revoking_officer=officer,
            revoked_at=now,
            bundle_id=bundle_id,
            actor=actor.label,
        )
    )
    ledger.record_event(
        session,
        kind="consent-revoked",
        actor=actor,
        now=now,
        bundle_id=bundle_id,
        consent_id=consent_id,
        body={
            "direction": direction,
            "revoking_officer": officer,
            "reason": reason,
        },
    )
