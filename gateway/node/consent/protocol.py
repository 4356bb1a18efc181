"""The consent protocol's own steps (SPEC §7): request, grant, deny, revoke.

* the **receiving** side asks: :func:`request_consent` sends a
  ``consent-request`` (items, third party, purpose) to the originator;
* the **originating** side answers: :func:`grant` sends a ``consent-grant``
  whose attachment ``consent-grant.signed.json`` carries the written consent
  (the canonical document and its Ed25519 signature, see
  :mod:`gateway.core.consent`); :func:`deny` sends a ``consent-denial``;
  :func:`revoke` later sends a ``consent-revocation``;
* each side's own step commits in the same transaction as the queued bundle
  and its ledger entry (``consent-requested``, ``consent-granted``,
  ``consent-denied``, ``consent-revoked``).
"""

from __future__ import annotations

import json
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.core.canonical import canonical_bytes
from gateway.core.cases import PROTOCOL_TYPES, validate_case
from gateway.core.consent import (
    ConsentGrant,
    format_time,
    normalise_name,
    sign_grant,
    validate_items,
    validate_text,
)
from gateway.core.roles import Actor
from gateway.errors import (
    InvalidInput,
    NotFound,
    PolicyRefused,
    RefusedError,
)
from gateway.node import ledger
from gateway.node.consent.common import (
    GRANT_ATTACHMENT,
    MAX_REASON,
    SentConsent,
    internal_names,
    items_json,
    peer_of,
    send_consent_bundle,
)
from gateway.node.consent.receive import apply_pending
from gateway.node.consent.records import store_denial, store_grant, store_revocation
from gateway.node.context import NodeContext
from gateway.store.models_consent import (
    ConsentGrantRecord,
    ConsentRequestRecord,
    ConsentRevocationRecord,
    Direction,
    RequestStatus,
)
from gateway.store.models_exchange import InboxEntry, OutboxEntry

__all__ = [
    "GrantTerms",
    "deny",
    "grant",
    "grant_terms",
    "request_consent",
    "revocation_terms",
    "revoke",
]


def request_consent(
    ctx: NodeContext,
    actor: Actor,
    bundle_ids: Sequence[str],
    recipient: str,
    purpose: str,
    *,
    now: datetime,
) -> SentConsent:
    """Ask the originator for written consent to pass ``bundle_ids`` to ``recipient``.

    Every item must be a bundle the peer sent us (in our inbox) and marked
    confidential, and the recipient must be a third party; otherwise no
    consent is needed and the request is refused as pointless, naming why.
    """
    node = ctx.node
    items = validate_items(bundle_ids, field="bundle ids")
    validate_text(recipient, field="recipient", max_chars=200)
    validate_text(purpose, field="purpose", max_chars=MAX_REASON)
    policy = ctx.policy
    if normalise_name(recipient) in {
        normalise_name(n) for n in internal_names(policy, node.node_id)
    }:
        raise InvalidInput(
            f"{recipient!r} is an internal recipient of this side: no consent is needed"
        )
    peer = peer_of(node.node_id)
    with node.db.transaction() as session:
        rows = {
            row.bundle_id: row
            for row in session.scalars(
                select(InboxEntry).where(InboxEntry.bundle_id.in_(items), InboxEntry.sender == peer)
            )
        }
    for bundle_id in items:
        row = rows.get(bundle_id)
        if row is None:
            raise NotFound(
                f"bundle {bundle_id} is not in the inbox: only the peer's bundles need consent"
            )
        if row.case_type in PROTOCOL_TYPES:
            raise InvalidInput(f"bundle {bundle_id} is a {row.case_type}, not case information")
        if row.marking == "public":
            raise InvalidInput(f"bundle {bundle_id} is marked public: it needs no consent")
    case = {
        "items": list(items),
        "third_party": recipient,
        "purpose": purpose,
        "requesting_officer": actor.name,
    }
    validate_case("consent-request", case)

    def record(session: Session, bundle_id: str) -> None:
        session.add(
            ConsentRequestRecord(
                request_id=bundle_id,
                direction=Direction.OUTGOING,
                requester_node=node.node_id,
                originator_node=peer,
                items_json=items_json(items),
                third_party=recipient,
                purpose=purpose,
                requesting_officer=actor.name,
                status=RequestStatus.PENDING,
                created_at=now,
                actor=actor.label,
            )
        )
        ledger.record_event(
            session,
            kind="consent-requested",
            actor=actor,
            now=now,
            bundle_id=bundle_id,
            body={
                "direction": Direction.OUTGOING,
                "request_id": bundle_id,
                "items": list(items),
                "third_party": recipient,
                "purpose": purpose,
                "to": peer,
            },
        )

    bundle_id = send_consent_bundle(ctx, actor, "consent-request", case, [], now, record)
    return SentConsent(bundle_id=bundle_id, request_id=bundle_id)


def _pending_incoming(session: Session, request_id: str, *, lock: bool) -> ConsentRequestRecord:
    query = select(ConsentRequestRecord).where(ConsentRequestRecord.request_id == request_id)
    if lock:
        query = query.with_for_update()
    row = session.scalars(query.execution_options(populate_existing=True)).first()
    if row is None or row.direction != Direction.INCOMING:
        raise NotFound(f"no consent request {request_id!r} from the peer")
    if row.status != RequestStatus.PENDING:
        raise RefusedError(
            f"consent request {request_id} was {row.status} already", reason="consent.decided"
        )
    return row


@dataclass(frozen=True, slots=True)
class GrantTerms:
    """The exact terms of a consent grant, checked against the policy and the request."""

    request_id: str
    items: tuple[str, ...]
    third_party: str
    purpose: str
    valid_until: datetime
    max_uses: int | None
    conditions: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "items": list(self.items),
            "third_party": self.third_party,
            "purpose": self.purpose,
            "valid_until": format_time(self.valid_until),
            "max_uses": self.max_uses,
            "conditions": self.conditions,
        }


def grant_terms(
    ctx: NodeContext,
    request_id: str,
    *,
    valid_until: datetime | None,
    max_uses: int | None,
    conditions: str,
    now: datetime,
) -> GrantTerms:
    """Check a grant's terms as :func:`grant` would, without granting anything.

    ``valid_until`` defaults to the policy's maximum validity and may not
    exceed it; ``max_uses`` may not exceed the policy's limit; every item of
    the request must be one of this node's own bundles. Raises
    :class:`InvalidInput`, :class:`PolicyRefused`, :class:`NotFound` or
    :class:`RefusedError` naming the first problem.
    """
    node = ctx.node
    apply_pending(ctx, now=now)
    policy = ctx.policy
    limit = now + policy.consent.max_validity
    until = limit if valid_until is None else valid_until
    if until.tzinfo is None:
        raise InvalidInput("--valid-until must carry a time zone")
    if until <= now:
        raise InvalidInput(f"--valid-until {format_time(until)} is not in the future")
    if until > limit:
        raise PolicyRefused(
            f"--valid-until {format_time(until)} is beyond the policy's maximum validity of "
            f"{policy.consent.max_validity_days} days (at most {format_time(limit)})",
            reason="policy.consent-validity",
        )
    if max_uses is not None and not 1 <= max_uses <= policy.consent.max_uses_limit:
        raise PolicyRefused(
            f"--max-uses must be from 1 to {policy.consent.max_uses_limit} (policy)",
            reason="policy.consent-uses",
        )
    if len(conditions) > 4000:
        raise InvalidInput("--conditions: at most 4000 characters")
    with node.db.transaction() as session:
        request = _pending_incoming(session, request_id, lock=False)
        items = tuple(json.loads(request.items_json))
        third_party, purpose = request.third_party, request.purpose
        own = set(
            session.scalars(select(OutboxEntry.bundle_id).where(OutboxEntry.bundle_id.in_(items)))
        )
    foreign = [b for b in items if b not in own]
    if foreign:
        raise RefusedError(
            f"consent request {request_id} names bundle {foreign[0]}, which this node did not "
            "send: only the originator can consent",
            reason="consent.not-originator",
        )
    return GrantTerms(
        request_id=request_id,
        items=tuple(sorted(items)),
        third_party=third_party,
        purpose=purpose,
        valid_until=until,
        max_uses=max_uses,
        conditions=conditions,
    )


def grant(
    ctx: NodeContext,
    actor: Actor,
    request_id: str,
    *,
    valid_until: datetime | None,
    max_uses: int | None,
    conditions: str,
    now: datetime,
    approvers: tuple[str, ...] = (),
    approved: Mapping[str, Any] | None = None,
    in_transaction: Callable[[Session, str], None] | None = None,
) -> SentConsent:
    """Give the peer written consent for its request ``request_id``; send it signed.

    The terms are checked by :func:`grant_terms`. ``approvers`` (sorted names)
    are signed into the document when the grant passed the two-person rule;
    ``approved`` is then the terms the approvers approved (a proposal's terms):
    the grant is signed only when the terms computed now are exactly those,
    else :class:`RefusedError` ``approval.terms-changed`` (nothing is sent);
    ``in_transaction(session, consent_id)`` runs first in the transaction that
    queues the grant (the approvals service records the deciding approval
    there, so the grant is sent exactly when the approval commits).
    """
    node, keyring = ctx.node, ctx.keyring
    terms = grant_terms(
        ctx,
        request_id,
        valid_until=valid_until,
        max_uses=max_uses,
        conditions=conditions,
        now=now,
    )
    if approved is not None:
        computed = terms.to_dict()
        if any(approved.get(key) != value for key, value in computed.items()):
            changed = sorted(k for k, v in computed.items() if approved.get(k) != v)
            raise RefusedError(
                f"the grant's terms now differ from the approved ones ({', '.join(changed)}): "
                "nothing was signed; propose the grant again",
                reason="approval.terms-changed",
            )
    items, until = terms.items, terms.valid_until
    third_party, purpose = terms.third_party, terms.purpose
    consent_id = str(uuid.uuid4())
    written = ConsentGrant(
        consent_id=consent_id,
        request_id=request_id,
        items=tuple(sorted(items)),
        third_party=third_party,
        purpose=purpose,
        valid_from=now,
        valid_until=until,
        max_uses=max_uses,
        conditions=conditions,
        granting_officer=actor.name,
        granting_node=node.node_id,
        key_id=keyring.signing_key_id,
        approvers=approvers,
    )
    signed = sign_grant(written, lambda message: bytes(keyring.signing_key.sign(message).signature))
    case = {
        "consent_id": consent_id,
        "request_id": request_id,
        "items": list(written.items),
        "third_party": third_party,
        "purpose": purpose,
        "valid_until": format_time(until),
        "max_uses": max_uses,
        "conditions": [conditions] if conditions.strip() else [],
        "granting_officer": actor.name,
    }
    validate_case("consent-grant", case)

    def record(session: Session, bundle_id: str) -> None:
        if in_transaction is not None:
            in_transaction(session, consent_id)
        row = _pending_incoming(session, request_id, lock=True)
        row.status = RequestStatus.GRANTED
        row.decided_at = now
        row.consent_id = consent_id
        store_grant(
            session,
            written,
            signed,
            direction=Direction.ISSUED,
            bundle_id=bundle_id,
            now=now,
            actor=actor,
        )

    with tempfile.TemporaryDirectory(prefix="ssw-consent-") as folder:
        attachment = Path(folder) / GRANT_ATTACHMENT
        attachment.write_bytes(canonical_bytes(signed.to_wire()))
        bundle_id = send_consent_bundle(
            ctx, actor, "consent-grant", case, [attachment], now, record
        )
    return SentConsent(
        bundle_id=bundle_id,
        request_id=request_id,
        consent_id=consent_id,
        valid_until=until,
        max_uses=max_uses,
    )


def deny(
    ctx: NodeContext,
    actor: Actor,
    request_id: str,
    *,
    reason: str,
    now: datetime,
) -> SentConsent:
    """Refuse the peer's consent request ``request_id``; the peer is told why."""
    node = ctx.node
    validate_text(reason, field="reason", max_chars=MAX_REASON)
    apply_pending(ctx, now=now)
    with node.db.transaction() as session:
        request = _pending_incoming(session, request_id, lock=False)
        items = list(json.loads(request.items_json))
        third_party = request.third_party
    case = {
        "request_id": request_id,
        "items": items,
        "third_party": third_party,
        "reason": reason,
        "denying_officer": actor.name,
    }
    validate_case("consent-denial", case)

    def record(session: Session, bundle_id: str) -> None:
        row = _pending_incoming(session, request_id, lock=True)
        row.status = RequestStatus.DENIED
        row.decided_at = now
        store_denial(
            session,
            request_id=request_id,
            direction=Direction.ISSUED,
            reason=reason,
            officer=actor.name,
            bundle_id=bundle_id,
            now=now,
            actor=actor,
        )

    bundle_id = send_consent_bundle(ctx, actor, "consent-denial", case, [], now, record)
    return SentConsent(bundle_id=bundle_id, request_id=request_id)


def revocation_terms(ctx: NodeContext, consent_id: str, *, reason: str) -> dict[str, str]:
    """Check that consent ``consent_id`` may be revoked for ``reason``; its terms.

    The terms (``consent_id``, ``request_id``, ``reason``) are what a
    ``consent-revoke`` proposal under the two-person rule stores. Raises
    :class:`InvalidInput` for a bad reason, :class:`NotFound` for a consent
    this node did not grant, :class:`RefusedError` (``consent.revoked``) for
    one revoked already. Writes nothing.
    """
    validate_text(reason, field="reason", max_chars=MAX_REASON)
    with ctx.node.db.transaction() as session:
        row = session.get(ConsentGrantRecord, consent_id)
        if row is None or row.direction != Direction.ISSUED:
            raise NotFound(f"no consent {consent_id!r} granted by this node")
        if session.get(ConsentRevocationRecord, consent_id) is not None:
            raise RefusedError(f"consent {consent_id} is revoked already", reason="consent.revoked")
        return {"consent_id": consent_id, "request_id": row.request_id, "reason": reason}


def revoke(
    ctx: NodeContext,
    actor: Actor,
    consent_id: str,
    *,
    reason: str,
    now: datetime,
    in_transaction: Callable[[Session, str], None] | None = None,
) -> SentConsent:
    """Withdraw a consent this node granted; the peer stops using it once it arrives.

    Checked by :func:`revocation_terms`. ``in_transaction(session, bundle_id)``
    runs first in the transaction that records the revocation and queues it
    (the approvals service records the deciding approval there, so the
    revocation is sent exactly when that approval commits).
    """
    request_id = revocation_terms(ctx, consent_id, reason=reason)["request_id"]
    case = {"consent_id": consent_id, "reason": reason, "revoking_officer": actor.name}
    validate_case("consent-revocation", case)

    def record(session: Session, bundle_id: str) -> None:
        if in_transaction is not None:
            in_transaction(session, bundle_id)
        if session.get(ConsentRevocationRecord, consent_id) is not None:
            raise RefusedError(f"consent {consent_id} is revoked already", reason="consent.revoked")
        store_revocation(
            session,
            consent_id=consent_id,
            direction=Direction.ISSUED,
            reason=reason,
            officer=actor.name,
            bundle_id=bundle_id,
            now=now,
            actor=actor,
        )

    bundle_id = send_consent_bundle(ctx, actor, "consent-revocation", case, [], now, record)
    return SentConsent(bundle_id=bundle_id, request_id=request_id, consent_id=consent_id)
