"""Applying received consent documents and bundle refusals.

Received consent-* bundles are applied by :func:`apply_pending`: decrypted
with the node's keys, the grant's signature verified against the pinned peer
manifest (with the key that signed the envelope) before its document is read,
and stored with a ledger entry. A bundle that does not verify or does not fit
is kept as received, marked refused, never used, and the sender is told with a
``bundle-refusal`` notice (:func:`send_refusal_notices`). Every function that
depends on the consent state applies pending bundles first: a revocation counts
from the moment its bundle is in the inbox.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session, undefer

from gateway import log
from gateway.core.canonical import parse_bounded_json
from gateway.core.cases import PROTOCOL_TYPES, validate_case
from gateway.core.consent import (
    MAX_GRANT_BYTES,
    ConsentGrant,
    SignedGrant,
    parse_time,
    validate_items,
    verify_grant,
)
from gateway.core.envelope import AttachmentInfo, open_envelope
from gateway.core.keys import KeyManifest, NodeKeyring
from gateway.core.policy import Policy
from gateway.core.roles import SYSTEM
from gateway.errors import (
    AlreadyExists,
    GatewayError,
    InvalidInput,
    RefusedError,
    StorageError,
    message_for_client,
)
from gateway.node import ledger
from gateway.node.consent import uses as consent_uses
from gateway.node.consent.common import (
    APPLIED_TYPES,
    GRANT_ATTACHMENT,
    REFUSAL_TYPE,
    items_json,
    peer_manifest,
    send_consent_bundle,
)
from gateway.node.consent.records import store_denial, store_grant, store_revocation
from gateway.node.context import NodeContext
from gateway.node.runtime import Node
from gateway.store.models_consent import (
    ConsentApplied,
    ConsentDenialRecord,
    ConsentGrantRecord,
    ConsentRequestRecord,
    ConsentRevocationRecord,
    Direction,
    RequestStatus,
)
from gateway.store.models_exchange import InboxEntry, OutboxEntry, open_stored_envelope
from gateway.store.models_refusal import BundleRefusalRecord, RefusalDirection

__all__ = [
    "apply_pending",
    "apply_pending_in",
    "refuse_to_decide_with",
    "send_refusal_notices",
]

_log = log.get_logger("consent")


class _BoundedSink(io.BytesIO):
    def __init__(self, limit: int) -> None:
        super().__init__()
        self._limit = limit

    def write(self, data: Any) -> int:
        if self.tell() + len(data) > self._limit:
            raise InvalidInput("consent attachment exceeds its size limit")
        return super().write(data)


def _open_consent_bundle(
    node: Node,
    keyring: NodeKeyring,
    peer: KeyManifest,
    policy: Policy,
    entry: InboxEntry,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    sinks: dict[str, _BoundedSink] = {}

    def sink_factory(info: AttachmentInfo) -> BinaryIO:
        if info.name != GRANT_ATTACHMENT or info.name in sinks:
            # The name is the sender's content: the refusal (sent back, shown) names the position.
            raise InvalidInput(f"unexpected attachment #{info.index} in a {entry.case_type}")
        if info.size > 2 * MAX_GRANT_BYTES:
            raise InvalidInput("consent grant attachment is too large")
        sink = _BoundedSink(2 * MAX_GRANT_BYTES)
        sinks[info.name] = sink
        return sink

    with open_stored_envelope(
        node.settings.blob_dir, entry.envelope_sha256, entry.envelope_body
    ) as stream:
        opened = open_envelope(
            stream,
            keyring=keyring,
            peer_manifest=peer,
            policy=policy,
            now=entry.received_at,
            sink_factory=sink_factory,
            stored_at=entry.received_at,  # a key revoked since: verified while trusted
        )
    if opened.header.type != entry.case_type or opened.header.bundle_id != entry.bundle_id:
        raise InvalidInput("the stored envelope does not match its inbox row")
    return dict(opened.case_data), {name: sink.getvalue() for name, sink in sinks.items()}


def _apply_one(
    session: Session,
    node_id: str,
    peer: KeyManifest,
    entry: InboxEntry,
    case: dict[str, Any],
    attachments: dict[str, bytes],
    now: datetime,
    policy: Policy,
) -> str:
    """Store one received consent-* bundle; return a one-line summary.

    A consent grant must name at least as many approvers as the agreed policy's
    ``[approvals.consent-grant] k`` (both nodes load the same policy; a grant
    without ``approvers`` was given by its granting officer alone, one person):
    otherwise :class:`RefusedError` ``consent.too-few-approvers`` (MOC item 3,
    docs/consent.md "Approvals"), and the grant is never used.
    """
    kind = entry.case_type
    if kind == "consent-request":
        if session.get(ConsentRequestRecord, entry.bundle_id) is not None:
            raise AlreadyExists(f"consent request {entry.bundle_id} is recorded already")
        items = validate_items(case["items"])
        ours = {
            row.bundle_id: row.case_type
            for row in session.scalars(
                select(OutboxEntry).where(
                    OutboxEntry.bundle_id.in_(items), OutboxEntry.recipient == entry.sender
                )
            )
        }
        for item in items:
            if ours.get(item) is None or ours[item] in PROTOCOL_TYPES:
                raise RefusedError(
                    f"consent request {entry.bundle_id} names bundle {item}, which this node "
                    f"never sent to {entry.sender} as a case: only the originator can consent",
                    reason="consent.items-not-sent",
                )
        session.add(
            ConsentRequestRecord(
                request_id=entry.bundle_id,
                direction=Direction.INCOMING,
                requester_node=entry.sender,
                originator_node=node_id,
                items_json=items_json(items),
                third_party=case["third_party"],
                purpose=case["purpose"],
                requesting_officer=case["requesting_officer"],
                status=RequestStatus.PENDING,
                created_at=now,
                actor=SYSTEM.label,
            )
        )
        ledger.record_event(
            session,
            kind="consent-requested",
            actor=SYSTEM,
            now=now,
            bundle_id=entry.bundle_id,
            body={
                "direction": Direction.INCOMING,
                "request_id": entry.bundle_id,
                "items": list(items),
                "third_party": case["third_party"],
                "purpose": case["purpose"],
                "requesting_officer": case["requesting_officer"],
                "from": entry.sender,
            },
        )
        return f"request {entry.bundle_id} recorded"
    if kind == "consent-grant":
        raw = attachments.get(GRANT_ATTACHMENT)
        if raw is None:
            raise InvalidInput(f"consent grant carries no {GRANT_ATTACHMENT}")
        signed = SignedGrant.from_wire(parse_bounded_json(raw, max_bytes=2 * MAX_GRANT_BYTES))
        key, _trust = peer.stored_signing_key(
            entry.signing_key_id, at=entry.created_at, stored_at=entry.received_at
        )
        written = verify_grant(
            signed,
            public_key=bytes(key),
            key_id=entry.signing_key_id,
            granting_node=entry.sender,
        )
        _check_grant_matches_case(written, case)
        needed = policy.approval_rule("consent-grant").k
        named = len(written.approvers) or 1
        if named < needed:
            raise RefusedError(
                f"consent grant {written.consent_id} names {named} approver(s) where the agreed "
                f"policy asks {needed} ([approvals.consent-grant] k): refused and never used",
                reason="consent.too-few-approvers",
            )
        request = session.get(ConsentRequestRecord, written.request_id)
        if request is None or request.direction != Direction.OUTGOING:
            raise RefusedError(
                f"grant answers request {written.request_id}, which this node never made",
                reason="consent.unknown-request",
            )
        asked = set(json.loads(request.items_json))
        if not set(written.items) <= asked:
            raise InvalidInput("grant names items the request did not ask about")
        if request.status == RequestStatus.PENDING:
            request.status = RequestStatus.GRANTED
            request.decided_at = now
            request.consent_id = written.consent_id
        store_grant(
            session,
            written,
            signed,
            direction=Direction.RECEIVED,
            bundle_id=entry.bundle_id,
            now=now,
            actor=SYSTEM,
        )
        return f"consent {written.consent_id} recorded"
    if kind == "consent-denial":
        request_id = case["request_id"]
        request = session.get(ConsentRequestRecord, request_id)
        if request is None or request.direction != Direction.OUTGOING:
            raise RefusedError(
                f"denial answers request {request_id}, which this node never made",
                reason="consent.unknown-request",
            )
        if session.get(ConsentDenialRecord, request_id) is not None:
            raise AlreadyExists(f"denial of request {request_id} is recorded already")
        if request.status == RequestStatus.PENDING:
            request.status = RequestStatus.DENIED
            request.decided_at = now
        store_denial(
            session,
            request_id=request_id,
            direction=Direction.RECEIVED,
            reason=case["reason"],
            officer=case["denying_officer"],
            bundle_id=entry.bundle_id,
            now=now,
            actor=SYSTEM,
        )
        return f"denial of request {request_id} recorded"
    if kind == "consent-revocation":
        consent_id = case["consent_id"]
        existing = session.get(ConsentGrantRecord, consent_id)
        if existing is not None and existing.direction != Direction.RECEIVED:
            raise InvalidInput(
                f"revocation names consent {consent_id}, which the peer did not grant"
            )
        if session.get(ConsentRevocationRecord, consent_id) is not None:
            return f"consent {consent_id} was revoked already"
        # Kept even when the grant has not arrived (yet): it is revoked on arrival.
        store_revocation(
            session,
            consent_id=consent_id,
            direction=Direction.RECEIVED,
            reason=case["reason"],
            officer=case["revoking_officer"],
            bundle_id=entry.bundle_id,
            now=now,
            actor=SYSTEM,
        )
        return f"consent {consent_id} revoked"
    if kind == REFUSAL_TYPE:
        return _apply_refusal_notice(session, entry, case, now)
    if kind == consent_uses.USE_TYPE:
        return consent_uses.apply_use_notice(session, entry, case, now)
    raise InvalidInput(f"{kind} is not a protocol bundle")


def _check_grant_matches_case(written: ConsentGrant, case: dict[str, Any]) -> None:
    """The readable case fields must say what the signed document says."""
    expected = {
        "consent_id": written.consent_id,
        "request_id": written.request_id,
        "items": sorted(written.items),
        "third_party": written.third_party,
        "purpose": written.purpose,
        "max_uses": written.max_uses,
        "granting_officer": written.granting_officer,
    }
    for name, value in expected.items():
        got = sorted(case[name]) if name == "items" else case.get(name)
        if got != value:
            raise InvalidInput(f"consent grant: case field {name} differs from the signed document")
    until = parse_time(case["valid_until"], field="consent grant: case field valid_until")
    if until != written.valid_until:
        raise InvalidInput("consent grant: case field valid_until differs from the signed document")


def _pending_entries(session: Session, node_id: str) -> list[InboxEntry]:
    applied = select(ConsentApplied.bundle_id).where(ConsentApplied.sender == InboxEntry.sender)
    return list(
        session.scalars(
            select(InboxEntry)
            .options(undefer(InboxEntry.envelope_body))
            .where(
                InboxEntry.case_type.in_(APPLIED_TYPES),
                InboxEntry.sender != node_id,
                InboxEntry.bundle_id.not_in(applied.scalar_subquery()),
            )
            .order_by(InboxEntry.id)
        )
    )


def apply_pending_in(
    session: Session,
    node: Node,
    keyring: NodeKeyring,
    policy: Policy,
    now: datetime,
    *,
    deferred: list[str] | None = None,
) -> list[str]:
    entries = _pending_entries(session, node.node_id)
    if not entries:
        return []
    peer = peer_manifest(session)
    done: list[str] = []
    for entry in entries:
        try:
            with session.begin_nested():
                case, attachments = _open_consent_bundle(node, keyring, peer, policy, entry)
                summary = _apply_one(
                    session, node.node_id, peer, entry, case, attachments, now, policy
                )
                outcome = "applied"
        except StorageError as exc:
            # The node's own fault (its database or blob store), not the bundle's: the
            # bundle stays pending, untouched, and the next pass tries it again; the
            # peer is told nothing (docs/consent.md, "A fault of ours refuses nothing").
            _log.error(
                "consent_bundle_deferred",
                bundle_id=entry.bundle_id,
                type=entry.case_type,
                reason=exc.reason,
                detail=exc.diagnostics(),
            )
            done.append(f"{entry.bundle_id}: deferred: {message_for_client(exc, None)}")
            if deferred is not None:
                deferred.append(entry.bundle_id)
            continue
        except (GatewayError, KeyError, TypeError, ValueError) as exc:
            # Fail closed: a bundle that does not verify or does not fit is
            # kept in the inbox as received, marked refused, and never used;
            # the sender is told (a refusal notice, queued once this commits).
            summary = f"refused: {exc}" if isinstance(exc, GatewayError) else "refused: malformed"
            outcome = "refused"
            _record_issued_refusal(session, entry, exc, now)
            _log.warning(
                "consent_bundle_refused",
                bundle_id=entry.bundle_id,
                type=entry.case_type,
                error=type(exc).__name__,
            )
        session.add(
            ConsentApplied(
                sender=entry.sender,
                bundle_id=entry.bundle_id,
                case_type=entry.case_type,
                outcome=outcome,
                detail=summary[:500],
                applied_at=now,
            )
        )
        session.flush()
        done.append(f"{entry.bundle_id}: {summary}")
    return done


def apply_pending(
    ctx: NodeContext, *, now: datetime, deferred: list[str] | None = None
) -> list[str]:
    """Apply every received consent-* bundle not applied yet; return what happened to each.

    ``deferred`` gets the bundle ids that a storage fault of ours kept pending
    (:func:`apply_pending_in`); what else was applied is committed.
    """
    node, keyring = ctx.node, ctx.keyring
    policy = ctx.policy
    with node.db.transaction() as session:
        ledger.lock_for_append(session)  # the linearisation point of consent decisions
        done = apply_pending_in(session, node, keyring, policy, now, deferred=deferred)
    try:
        send_refusal_notices(ctx, now=now)
    except GatewayError as exc:
        # The refusals are recorded; their notices are queued by the next call.
        _log.warning("refusal_notice_deferred", error=type(exc).__name__, reason=exc.reason)
    consent_uses.notify_uses(ctx, now=now)
    return done


def refuse_to_decide_with(deferred: Sequence[str]) -> None:
    """Raise :class:`StorageError` when received consent bundles are still pending after
    a storage fault of ours (``deferred``, from :func:`apply_pending_in`).

    Any of them may be a revocation, a use or a suspect mark that the decision
    must see first (docs/consent.md, "Limits": a revocation in the inbox blocks
    the next disclosure), so no disclosure is decided until they are applied.
    """
    if deferred:
        raise StorageError(
            f"{len(deferred)} received consent bundle(s) could not be applied (a storage "
            "fault of this node; its cause is in the node's log): no disclosure is decided "
            "until they are. Try again once the node's storage answers",
            reason="consent.bundle-deferred",
        )


def _record_issued_refusal(
    session: Session, entry: InboxEntry, exc: Exception, now: datetime
) -> None:
    """Record that we refused ``entry`` (a receipted protocol bundle); the notice
    to its sender is queued by :func:`send_refusal_notices`. A refused refusal
    notice is recorded in ``consent_applied`` only: no notice answers a notice."""
    if entry.case_type == REFUSAL_TYPE:
        return
    if isinstance(exc, GatewayError):
        reason, detail = exc.reason, exc.message
    else:
        reason, detail = "malformed", f"{entry.case_type} does not have the fields it needs"
    refusal = BundleRefusalRecord(
        direction=RefusalDirection.ISSUED,
        peer=entry.sender,
        bundle_id=entry.bundle_id,
        case_type=entry.case_type,
        envelope_sha256=entry.envelope_sha256,
        reason=reason[:64],
        detail=detail[:500],
        refused_at=now,
        notice_bundle_id=None,
    )
    session.add(refusal)
    ledger.record_event(
        session,
        kind="bundle-refused",
        actor=SYSTEM,
        now=now,
        bundle_id=entry.bundle_id,
        body={
            "direction": RefusalDirection.ISSUED,
            "sender": entry.sender,
            "type": entry.case_type,
            "envelope_sha256": entry.envelope_sha256,
            "reason": refusal.reason,
        },
    )


class _NoticeQueuedAlready(GatewayError):
    reason = "refusal.noticed"


def send_refusal_notices(ctx: NodeContext, *, now: datetime) -> list[str]:
    """Queue a signed ``bundle-refusal`` notice for every refusal not yet noticed.

    Each notice is a confidential protocol bundle to the refused bundle's
    sender, its ``reply_to`` the refused bundle; it goes through the outbox
    (delivered exactly once, with a receipt). The row is marked in the same
    transaction as the queued notice, so a crash re-sends at most never and
    two concurrent callers queue one notice. Returns the notice bundle ids.
    """
    node = ctx.node
    with node.db.transaction() as session:
        pending = list(
            session.scalars(
                select(BundleRefusalRecord)
                .where(
                    BundleRefusalRecord.direction == RefusalDirection.ISSUED,
                    BundleRefusalRecord.notice_bundle_id.is_(None),
                )
                .order_by(BundleRefusalRecord.id)
            )
        )
    sent: list[str] = []
    for refusal in pending:
        row_id = refusal.id
        case = {
            "refused_bundle_id": refusal.bundle_id,
            "envelope_sha256": refusal.envelope_sha256,
            "reason": refusal.reason,
            "detail": refusal.detail,
        }

        def record(session: Session, bundle_id: str, row_id: int = row_id) -> None:
            row = session.get(
                BundleRefusalRecord, row_id, with_for_update=True, populate_existing=True
            )
            if row is None or row.notice_bundle_id is not None:
                raise _NoticeQueuedAlready("the refusal notice is queued already")
            row.notice_bundle_id = bundle_id

        try:
            sent.append(
                send_consent_bundle(ctx, SYSTEM, REFUSAL_TYPE, case, [], now, record,
                      reply_to=refusal.bundle_id)
            )  # fmt: skip
        except _NoticeQueuedAlready:
            continue
        _log.info("refusal_notice_queued", bundle_id=refusal.bundle_id, reason=refusal.reason)
    return sent


def _apply_refusal_notice(
    session: Session, entry: InboxEntry, case: dict[str, Any], now: datetime
) -> str:
    """Record the peer's notice that it refused one of our bundles."""
    refused = str(case["refused_bundle_id"])
    if entry.reply_to != refused:
        raise InvalidInput("refusal notice: reply_to differs from refused_bundle_id")
    ours = session.scalars(
        select(OutboxEntry).where(
            OutboxEntry.bundle_id == refused, OutboxEntry.recipient == entry.sender
        )
    ).first()
    if ours is None or ours.envelope_sha256 != case["envelope_sha256"]:
        raise InvalidInput(
            f"refusal notice names bundle {refused} with an envelope this node did not send"
        )
    known = session.scalars(
        select(BundleRefusalRecord).where(
            BundleRefusalRecord.direction == RefusalDirection.RECEIVED,
            BundleRefusalRecord.peer == entry.sender,
            BundleRefusalRecord.bundle_id == refused,
        )
    ).first()
    if known is not None:
        return f"refusal of {refused} was recorded already"
    validate_case(REFUSAL_TYPE, case)
    session.add(
        BundleRefusalRecord(
            direction=RefusalDirection.RECEIVED,
            peer=entry.sender,
            bundle_id=refused,
            case_type=ours.case_type,
            envelope_sha256=ours.envelope_sha256,
            reason=str(case["reason"]),
            detail=str(case["detail"]),
            refused_at=entry.created_at,
            notice_bundle_id=entry.bundle_id,
        )
    )
    ledger.record_event(
        session,
        kind="bundle-refused",
        actor=SYSTEM,
        now=now,
        bundle_id=refused,
        body={
            "direction": RefusalDirection.RECEIVED,
            "by": entry.sender,
            "type": ours.case_type,
            "envelope_sha256": ours.envelope_sha256,
            "reason": str(case["reason"]),
            "notice_bundle_id": entry.bundle_id,
        },
    )
    return f"refusal of {refused} recorded"
