"""Consent uses travel back to the originator (SPEC §8a, docs/consent.md).

The **discloser** (holding the peer's items): every allowed disclosure that
spent a use of a consent the peer granted gets one signed ``consent-use``
notice to the peer, queued by :func:`send_use_notices` through the ordinary
outbox (sealed, receipted, delivered exactly once). The notice row and the
queued bundle commit together, keyed by the disclosure id, so a crash
between the disclosure and its notice is made good by the next call and two
callers never queue two notices.

The **originator**: a received notice is applied like the other consent
bundles (once per bundle, ``consent_applied``) by :func:`apply_use_notice`,
which judges it with :func:`gateway.core.consent_use.judge_reported_use`
and records it in ``consent_use_report`` and the ledger: ``consent-used``,
or ``consent-use-violation`` naming every term it broke (unknown consent,
other items, recipient or purpose, outside the validity, revoked, over the
limit). A second notice for the same disclosure records nothing new.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gateway import log
from gateway.core.canonical import canonical_bytes, parse_bounded_json
from gateway.core.cases import ConsentUseNotice, validate_case
from gateway.core.consent import MAX_GRANT_BYTES, Basis, ConsentGrant, format_time
from gateway.core.consent_use import ReportedUse, judge_reported_use
from gateway.core.ledger import EntryKind
from gateway.core.roles import SYSTEM
from gateway.errors import GatewayError, InvalidInput
from gateway.node import ledger
from gateway.node.context import NodeContext
from gateway.node.crash import crash_point
from gateway.node.outbox import send_protocol_bundle
from gateway.store.models_consent import (
    ConsentGrantRecord,
    ConsentRevocationRecord,
    ConsentUse,
    Direction,
    DisclosureRecord,
)
from gateway.store.models_consent_use import ConsentUseNoticeRecord, ConsentUseReport
from gateway.store.models_exchange import InboxEntry, OutboxEntry

__all__ = [
    "USE_TYPE",
    "apply_use_notice",
    "notify_uses",
    "reported_uses",
    "send_use_notices",
]

USE_TYPE = "consent-use"

_log = log.get_logger("consent_use")


class _NoticeQueuedAlready(GatewayError):
    reason = "consent-use.noticed"


# -- the discloser --------------------------------------------------------------------------


def _pending_uses(session: Session) -> list[tuple[ConsentUse, DisclosureRecord]]:
    noticed = select(ConsentUseNoticeRecord.disclosure_id)
    rows = session.execute(
        select(ConsentUse, DisclosureRecord)
        .join(DisclosureRecord, DisclosureRecord.disclosure_id == ConsentUse.disclosure_id)
        .join(ConsentGrantRecord, ConsentGrantRecord.consent_id == ConsentUse.consent_id)
        .where(
            ConsentGrantRecord.direction == Direction.RECEIVED,
            ConsentUse.disclosure_id.not_in(noticed),
        )
        .order_by(ConsentUse.id)
    ).all()
    return [(use, record) for use, record in rows]


def _use_number(session: Session, use: ConsentUse) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(ConsentUse)
            .where(ConsentUse.consent_id == use.consent_id, ConsentUse.id <= use.id)
        )
        or 0
    )


def _notice_case(use: ConsentUse, record: DisclosureRecord, number: int) -> dict[str, Any]:
    decision = json.loads(record.decision_json)
    covered = sorted(
        str(item["bundle_id"])
        for item in decision["items"]
        if item["basis"] == Basis.CONSENT.value and item["consent_id"] == use.consent_id
    )
    if not covered or record.ledger_seq is None or record.ledger_hash is None:
        raise InvalidInput(f"disclosure {record.disclosure_id} has no consent use to report")
    return {
        "consent_id": use.consent_id,
        "disclosure_id": record.disclosure_id,
        "items": covered,
        "recipient": record.recipient,
        "purpose": record.purpose,
        "used_at": format_time(record.decided_at),
        "use_number": number,
        "ledger_seq": record.ledger_seq,
        "ledger_entry_hash": record.ledger_hash,
    }


def send_use_notices(ctx: NodeContext, *, now: datetime) -> list[str]:
    """Queue a ``consent-use`` notice for every use of a received consent not noticed yet.

    Returns the notice bundle ids queued by this call. Each notice commits
    with its ``consent_use_notice`` row (the use row is locked first, so two
    concurrent callers queue one notice); a use already noticed is skipped.
    Raises what :func:`gateway.node.outbox.send_protocol_bundle` raises (no
    pinned peer, storage failure); what was queued before stays queued.
    """

    node = ctx.node
    with node.db.transaction() as session:
        pending = [
            (
                use.id,
                use.disclosure_id,
                use.consent_id,
                _notice_case(use, rec, _use_number(session, use)),
            )
            for use, rec in _pending_uses(session)
        ]
    if pending:
        crash_point("before-use-notice")  # a use recorded, its notice not yet queued
    sent: list[str] = []
    for use_id, disclosure_id, consent_id, case in pending:

        def record(
            session: Session,
            bundle_id: str,
            use_id: int = use_id,
            disclosure_id: str = disclosure_id,
            consent_id: str = consent_id,
            number: int = int(case["use_number"]),
        ) -> None:
            session.get(ConsentUse, use_id, with_for_update=True, populate_existing=True)
            if session.get(ConsentUseNoticeRecord, disclosure_id) is not None:
                raise _NoticeQueuedAlready("the consent-use notice is queued already")
            session.add(
                ConsentUseNoticeRecord(
                    disclosure_id=disclosure_id,
                    consent_id=consent_id,
                    notice_bundle_id=bundle_id,
                    use_number=number,
                    queued_at=now,
                )
            )

        try:
            queued = send_protocol_bundle(
                ctx, SYSTEM, USE_TYPE, case, [],
                reply_to=None, now=now, in_transaction=record,
            )  # fmt: skip
        except _NoticeQueuedAlready:
            continue
        sent.append(queued.bundle_id)
        _log.info("consent_use_notice_queued", consent_id=consent_id, disclosure_id=disclosure_id)
    return sent


def notify_uses(ctx: NodeContext, *, now: datetime) -> None:
    """:func:`send_use_notices`, deferring on failure: the uses are recorded, and the
    next disclosure, consent command or received bundle queues their notices."""
    try:
        send_use_notices(ctx, now=now)
    except GatewayError as exc:
        _log.warning("consent_use_notice_deferred", error=type(exc).__name__, reason=exc.reason)


# -- the originator -------------------------------------------------------------------------


def _issued_grant(session: Session, consent_id: str) -> ConsentGrant | None:
    row = session.get(ConsentGrantRecord, consent_id)
    if row is None or row.direction != Direction.ISSUED:
        return None
    return ConsentGrant.from_document(
        parse_bounded_json(bytes(row.document), max_bytes=MAX_GRANT_BYTES)
    )


def _revocation_received_at(session: Session, consent_id: str, peer: str) -> datetime | None:
    """When the peer receipted our revocation of ``consent_id`` (None: not revoked or
    not received yet)."""
    revocation = session.get(ConsentRevocationRecord, consent_id)
    if revocation is None or revocation.direction != Direction.ISSUED:
        return None
    return session.scalar(
        select(OutboxEntry.delivered_at).where(
            OutboxEntry.bundle_id == revocation.bundle_id, OutboxEntry.recipient == peer
        )
    )


def apply_use_notice(
    session: Session, entry: InboxEntry, case: dict[str, Any], now: datetime
) -> str:
    """Record one received ``consent-use`` notice; return a one-line summary.

    Called in the applying transaction of :mod:`gateway.node.consent` (which
    holds the ledger's append lock). Bad fields raise
    :class:`~gateway.core.cases.InvalidCase` (the bundle is then refused and
    the sender told); a use that breaks the consent's terms is recorded, as a
    violation.
    """
    notice = validate_case(USE_TYPE, case)
    if not isinstance(notice, ConsentUseNotice):
        raise InvalidInput("consent-use notice: unexpected case model")
    known = session.get(ConsentUseReport, (entry.sender, notice.disclosure_id))
    if known is not None:
        return f"use of consent {known.consent_id} by disclosure {notice.disclosure_id} recorded already"
    uses_before = int(
        session.scalar(
            select(func.count())
            .select_from(ConsentUseReport)
            .where(
                ConsentUseReport.consent_id == notice.consent_id,
                ConsentUseReport.sender == entry.sender,
            )
        )
        or 0
    )
    items = sorted(notice.items)
    findings = judge_reported_use(
        ReportedUse(
            consent_id=notice.consent_id,
            items=items,
            recipient=notice.recipient,
            purpose=notice.purpose,
            used_at=notice.used_at,
            use_number=notice.use_number,
        ),
        _issued_grant(session, notice.consent_id),
        uses_before=uses_before,
        revocation_received_at=_revocation_received_at(session, notice.consent_id, entry.sender),
    )
    violation = "; ".join(findings)[:500] if findings else None
    kind = EntryKind.CONSENT_USE_VIOLATION if findings else EntryKind.CONSENT_USED
    recorded = ledger.record_event(
        session,
        kind=kind,
        actor=SYSTEM,
        now=now,
        bundle_id=entry.bundle_id,
        consent_id=notice.consent_id,
        body={
            "from": entry.sender,
            "disclosure_id": notice.disclosure_id,
            "items": items,
            "recipient": notice.recipient,
            "purpose": notice.purpose,
            "used_at": format_time(notice.used_at),
            "use_number": notice.use_number,
            "peer_ledger_seq": notice.ledger_seq,
            "peer_ledger_entry_hash": notice.ledger_entry_hash,
            "violations": findings,
        },
    )
    session.add(
        ConsentUseReport(
            sender=entry.sender,
            disclosure_id=notice.disclosure_id,
            consent_id=notice.consent_id,
            items_json=canonical_bytes(items).decode("utf-8"),
            recipient=notice.recipient,
            purpose=notice.purpose,
            used_at=notice.used_at,
            use_number=notice.use_number,
            peer_ledger_seq=notice.ledger_seq,
            peer_ledger_hash=notice.ledger_entry_hash,
            notice_bundle_id=entry.bundle_id,
            violation=violation,
            recorded_at=now,
            ledger_seq=recorded.seq,
        )
    )
    session.flush()
    if findings:
        _log.warning(
            "consent_use_violation",
            consent_id=notice.consent_id,
            disclosure_id=notice.disclosure_id,
        )
        return f"use of consent {notice.consent_id} recorded as a violation: {violation}"
    return f"use {notice.use_number} of consent {notice.consent_id} recorded"


def reported_uses(
    session: Session, consent_ids: Sequence[str] | None = None
) -> dict[str, tuple[int, int]]:
    """Consent id -> (uses reported, of which violations), for consents this node granted."""
    query = select(
        ConsentUseReport.consent_id,
        func.count(),
        func.count(ConsentUseReport.violation),
    ).group_by(ConsentUseReport.consent_id)
    if consent_ids is not None:
        query = query.where(ConsentUseReport.consent_id.in_(list(consent_ids)))
    return {str(cid): (int(total), int(bad)) for cid, total, bad in session.execute(query)}
