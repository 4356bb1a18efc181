"""Disclosure accounting, both ways (SPEC §8, ``gateway ledger account``).

For a compliance officer answering "what happened to this information":

* **held**: each item of the peer's information this node holds (a case in
  its inbox): when it arrived, who read it, every internal share and
  disclosure (allowed or blocked) that named it with the consent it relied
  on, and the consents the peer granted for it;
* **ours**: each item of ours the peer holds (a case in our outbox to it):
  the requests the peer made about it, the consents we granted, denied and
  revoked, and every use the peer reported back (``consent-use`` notices),
  violations flagged.

Every row carries ``seq``/``*_seq`` fields: the sequence numbers of the
ledger entries that prove it, so each line of the account can be checked
against the tamper-evident ledger (``gateway ledger verify``). Metadata only:
ids, types, times, names of actors, recipients and purposes; never case
content nor attachment names.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.core.cases import PROTOCOL_TYPES
from gateway.core.consent import format_time
from gateway.core.ledger import LedgerEntry
from gateway.errors import InvalidInput, NotFound
from gateway.node.ledger import read as ledger_read
from gateway.store.models_consent import (
    ConsentDenialRecord,
    ConsentGrantItem,
    ConsentGrantRecord,
    ConsentRequestRecord,
    ConsentRevocationRecord,
    Direction,
    DisclosureRecord,
)
from gateway.store.models_consent_use import ConsentUseReport
from gateway.store.models_exchange import InboxEntry, OutboxEntry

__all__ = ["ACCOUNT_FORMATS", "account"]

ACCOUNT_FORMATS = ("text", "json", "csv")
"""One row per event of the account (``account_csv``), in this column order."""


def _peer_of(node_id: str) -> str:
    return "pk" if node_id == "jp" else "jp"


def _t(value: datetime | None) -> str | None:
    return None if value is None else format_time(value)


class _Index:
    """The ledger read once: entries by (kind, bundle id) and (kind, consent id)."""

    def __init__(self, entries: Iterable[LedgerEntry]) -> None:
        self.by_bundle: dict[tuple[str, str], list[LedgerEntry]] = defaultdict(list)
        self.by_consent: dict[tuple[str, str], list[LedgerEntry]] = defaultdict(list)
        for entry in entries:
            kind = str(entry.kind)
            if entry.bundle_id is not None:
                self.by_bundle[(kind, entry.bundle_id)].append(entry)
            if entry.consent_id is not None:
                self.by_consent[(kind, entry.consent_id)].append(entry)

    def seq(
        self, kind: str, *, bundle: str | None = None, consent: str | None = None
    ) -> int | None:
        found = (
            self.by_bundle.get((kind, bundle), [])
            if bundle is not None
            else self.by_consent.get((kind, consent or ""), [])
        )
        return found[0].seq if found else None


def _consent_row(
    grant: ConsentGrantRecord,
    revocation: ConsentRevocationRecord | None,
    index: _Index,
) -> dict[str, Any]:
    return {
        "consent_id": grant.consent_id,
        "request_id": grant.request_id,
        "third_party": grant.third_party,
        "purpose": grant.purpose,
        "valid_from": _t(grant.valid_from),
        "valid_until": _t(grant.valid_until),
        "max_uses": grant.max_uses,
        "granted_at": _t(grant.recorded_at),
        "granted_seq": index.seq("consent-granted", consent=grant.consent_id),
        "revoked_at": None if revocation is None else _t(revocation.revoked_at),
        "revocation_reason": None if revocation is None else revocation.reason,
        "revoked_seq": None
        if revocation is None
        else index.seq("consent-revoked", consent=grant.consent_id),
    }


def account(session: Session, node_id: str, *, bundle: str | None = None) -> dict[str, Any]:
    """The account of both directions, optionally of one bundle only.

    Returns ``{"node", "peer", "held": [...], "ours": [...]}`` (shapes in the
    module doc and docs/compliance.md). Raises :class:`NotFound` when
    ``bundle`` names no case this node holds from the peer or sent to it.
    """
    if bundle is not None and not bundle.strip():
        raise InvalidInput("--bundle: give a bundle id")
    peer = _peer_of(node_id)
    index = _Index(ledger_read.iter_entries(session))
    inbox = select(InboxEntry).where(
        InboxEntry.sender == peer, InboxEntry.case_type.not_in(PROTOCOL_TYPES)
    )
    outbox = select(OutboxEntry).where(
        OutboxEntry.recipient == peer, OutboxEntry.case_type.not_in(PROTOCOL_TYPES)
    )
    if bundle is not None:
        inbox = inbox.where(InboxEntry.bundle_id == bundle)
        outbox = outbox.where(OutboxEntry.bundle_id == bundle)
    held_rows = list(session.scalars(inbox.order_by(InboxEntry.id)))
    our_rows = list(session.scalars(outbox.order_by(OutboxEntry.id)))
    if bundle is not None and not held_rows and not our_rows:
        raise NotFound(f"no case {bundle} held from {peer} or sent to {peer}")

    revocations = {r.consent_id: r for r in session.scalars(select(ConsentRevocationRecord))}
    grants = {g.consent_id: g for g in session.scalars(select(ConsentGrantRecord))}
    items_of: dict[str, list[str]] = defaultdict(list)
    for item in session.scalars(select(ConsentGrantItem)):
        items_of[item.bundle_id].append(item.consent_id)
    disclosures: dict[str, list[DisclosureRecord]] = defaultdict(list)
    for record in session.scalars(select(DisclosureRecord).order_by(DisclosureRecord.decided_at)):
        for item_id in json.loads(record.items_json):
            disclosures[item_id].append(record)

    held: list[dict[str, Any]] = []
    for row in held_rows:
        reads = [
            {"time": _t(e.time), "actor": e.actor_name, "role": e.actor_role, "seq": e.seq}
            for e in index.by_bundle.get(("bundle-read", row.bundle_id), [])
        ]
        shares = [
            {
                "disclosure_id": d.disclosure_id,
                "kind": d.kind,
                "allowed": d.allowed,
                "time": _t(d.decided_at),
                "actor": d.actor,
                "recipient": d.recipient,
                "purpose": d.purpose,
                "consent_id": d.consent_id,
                "consent_granted_seq": None
                if d.consent_id is None
                else index.seq("consent-granted", consent=d.consent_id),
                "seq": d.ledger_seq,
            }
            for d in disclosures.get(row.bundle_id, [])
        ]
        consents = [
            _consent_row(grants[cid], revocations.get(cid), index)
            for cid in sorted(items_of.get(row.bundle_id, []))
            if grants[cid].direction == Direction.RECEIVED
        ]
        held.append(
            {
                "bundle_id": row.bundle_id,
                "type": row.case_type,
                "marking": row.marking,
                "received_at": _t(row.received_at),
                "received_seq": index.seq("bundle-received", bundle=row.bundle_id),
                "reads": reads,
                "shares": shares,
                "consents": consents,
            }
        )

    requests: dict[str, list[ConsentRequestRecord]] = defaultdict(list)
    for request in session.scalars(
        select(ConsentRequestRecord)
        .where(ConsentRequestRecord.direction == Direction.INCOMING)
        .order_by(ConsentRequestRecord.created_at)
    ):
        for item_id in json.loads(request.items_json):
            requests[item_id].append(request)
    denials = {d.request_id: d for d in session.scalars(select(ConsentDenialRecord))}
    uses: dict[str, list[ConsentUseReport]] = defaultdict(list)
    for report in session.scalars(select(ConsentUseReport).order_by(ConsentUseReport.used_at)):
        uses[report.consent_id].append(report)

    ours: list[dict[str, Any]] = []
    for out in our_rows:
        asked = []
        for request in requests.get(out.bundle_id, []):
            denial = denials.get(request.request_id)
            asked.append(
                {
                    "request_id": request.request_id,
                    "third_party": request.third_party,
                    "purpose": request.purpose,
                    "requesting_officer": request.requesting_officer,
                    "status": request.status,
                    "requested_at": _t(request.created_at),
                    "requested_seq": index.seq("consent-requested", bundle=request.request_id),
                    "consent_id": request.consent_id,
                    "denied_at": None if denial is None else _t(denial.denied_at),
                    "denial_reason": None if denial is None else denial.reason,
                    "denied_seq": None
                    if denial is None
                    else index.seq("consent-denied", bundle=denial.bundle_id),
                }
            )
        granted = []
        for cid in sorted(items_of.get(out.bundle_id, [])):
            grant = grants[cid]
            if grant.direction != Direction.ISSUED:
                continue
            row_out = _consent_row(grant, revocations.get(cid), index)
            row_out["uses"] = [
                {
                    "disclosure_id": u.disclosure_id,
                    "used_at": _t(u.used_at),
                    "recipient": u.recipient,
                    "purpose": u.purpose,
                    "use_number": u.use_number,
                    "violation": u.violation,
                    "seq": u.ledger_seq,
                    "peer_ledger_seq": u.peer_ledger_seq,
                }
                for u in uses.get(cid, [])
                if out.bundle_id in json.loads(u.items_json)
            ]
            granted.append(row_out)
        ours.append(
            {
                "bundle_id": out.bundle_id,
                "type": out.case_type,
                "marking": out.marking,
                "sent_at": _t(out.created_at),
                "delivered_at": _t(out.delivered_at),
                "sent_seq": index.seq("bundle-sent", bundle=out.bundle_id),
                "requests": asked,
                "consents": granted,
            }
        )
    return {"node": node_id, "peer": peer, "held": held, "ours": ours}
