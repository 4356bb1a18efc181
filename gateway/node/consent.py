"""The consent protocol and disclosure, joining the consent core to storage, exchange and ledger.

Protocol (SPEC §7), as bundles between the nodes:

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

Received consent-* bundles are applied by :func:`apply_pending`: decrypted
with the node's keys, the grant's signature verified against the pinned peer
manifest (with the key that signed the envelope) before its document is read,
and stored with a ledger entry. Every function that depends on the consent
state applies pending bundles first, and :func:`disclose` does so inside its
deciding transaction: a revocation counts from the moment its bundle is in the
inbox.

:func:`disclose` decides and records in one transaction that also holds the
ledger's append lock (on PostgreSQL an advisory lock every ledger writer
takes, among them the receiver storing a bundle; on SQLite ``BEGIN IMMEDIATE``
serialises all writers). A revocation landing concurrently therefore either
commits before the decision (and blocks it) or after the recorded disclosure.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gateway import log
from gateway.core.canonical import canonical_bytes, parse_bounded_json
from gateway.core.cases import PROTOCOL_TYPES, validate_case
from gateway.core.consent import (
    MAX_GRANT_BYTES,
    ConsentGrant,
    ConsentState,
    Decision,
    DisclosureItem,
    SignedGrant,
    decide_disclosure,
    format_time,
    normalise_name,
    parse_time,
    sign_grant,
    validate_items,
    validate_text,
    verify_grant,
)
from gateway.core.filemac import DisclosedFile, file_mac_key, files_record
from gateway.core.keys import KeyManifest, NodeKeyring
from gateway.core.ledger import LedgerEntry
from gateway.core.policy import Policy
from gateway.core.retention import Direction as StoredDirection
from gateway.core.roles import SYSTEM, Actor
from gateway.errors import (
    AlreadyExists,
    ConsentRefused,
    GatewayError,
    InvalidInput,
    NotFound,
    PolicyRefused,
    RefusedError,
    StorageError,
    VerificationError,
)
from gateway.node import consent_use, ledger
from gateway.node.bundles import (
    PRIVATE_DIR_MODE,
    create_private_file,
    make_private_dir,
    open_to_dir,
)
from gateway.node.inbox import check_reply_matches_case
from gateway.node.retention import WrittenOutput, ensure_not_purged, record_outputs
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
    DisclosureRecord,
    RequestStatus,
)
from gateway.store.models_exchange import InboxEntry, OutboxEntry, envelope_path
from gateway.store.models_refusal import BundleRefusalRecord, RefusalDirection

__all__ = [
    "CONSENT_TYPES",
    "GRANT_ATTACHMENT",
    "DisclosureResult",
    "SentConsent",
    "apply_pending",
    "deny",
    "disclose",
    "grant",
    "list_consents",
    "load_consent_states",
    "request_consent",
    "revoke",
    "send_refusal_notices",
]

CONSENT_TYPES = ("consent-request", "consent-grant", "consent-denial", "consent-revocation")
REFUSAL_TYPE = "bundle-refusal"
APPLIED_TYPES = (*CONSENT_TYPES, REFUSAL_TYPE, consent_use.USE_TYPE)
"""Protocol bundles applied after their receipt (:func:`apply_pending`)."""
GRANT_ATTACHMENT = "consent-grant.signed.json"
MANIFEST_NAME = "disclosure.json"
_PARTIAL_PREFIX = ".ssw-disclose-"
_MAX_REASON = 20_000
_log = log.get_logger("consent")


@dataclass(frozen=True, slots=True)
class SentConsent:
    """What a consent step sent: the bundle and the ids it concerns."""

    bundle_id: str
    request_id: str
    consent_id: str | None = None
    valid_until: datetime | None = None
    max_uses: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle_id": self.bundle_id,
            "request_id": self.request_id,
            "consent_id": self.consent_id,
            "valid_until": None if self.valid_until is None else format_time(self.valid_until),
            "max_uses": self.max_uses,
        }


@dataclass(frozen=True, slots=True)
class DisclosureResult:
    """An allowed disclosure: where it went, what it relied on, how it was recorded."""

    disclosure_id: str
    kind: str
    recipient: str
    purpose: str
    consent_id: str | None
    ledger_seq: int
    ledger_hash: str
    out_dir: Path
    files: dict[str, str] = field(default_factory=dict)
    """Relative path of every file written -> its SHA-256 (hex)."""
    decision: Decision | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "disclosure_id": self.disclosure_id,
            "kind": self.kind,
            "recipient": self.recipient,
            "purpose": self.purpose,
            "consent_id": self.consent_id,
            "ledger_seq": self.ledger_seq,
            "ledger_hash": self.ledger_hash,
            "out_dir": str(self.out_dir),
            "files": dict(self.files),
            "items": [] if self.decision is None else [i.to_record() for i in self.decision.items],
        }


# -- helpers ----------------------------------------------------------------------------


def _peer_of(node_id: str) -> str:
    return "pk" if node_id == "jp" else "jp"


def _policy(node: Node) -> Policy:
    from gateway.node.policy import load_policy  # noqa: PLC0415

    return load_policy(node.settings)


def _peer_manifest(session: Session) -> KeyManifest:
    from gateway.node.keys import pinned_peer_manifest  # noqa: PLC0415

    manifest = pinned_peer_manifest(session)
    if manifest is None:
        raise RefusedError(
            "no peer is pinned: run 'gateway peer add' first", reason="peer.unpinned"
        )
    return manifest


def _internal_names(policy: Policy, node_id: str) -> list[str]:
    names: list[str] = []
    for entry in policy.internal_recipients(node_id):
        names += [entry.name, entry.display_name]
    return names


def _items_json(items: Iterable[str]) -> str:
    return canonical_bytes(sorted(items)).decode("utf-8")


def _send(
    node: Node,
    keyring: NodeKeyring,
    actor: Actor,
    case_type: str,
    case: dict[str, Any],
    attachments: Sequence[Path],
    now: datetime,
    record: Callable[[Session, str], None],
    *,
    reply_to: str | None = None,
) -> str:
    from gateway.node.outbox import send_protocol_bundle  # noqa: PLC0415

    sent = send_protocol_bundle(
        node, keyring, actor, case_type, case, attachments,
        reply_to=reply_to, now=now, in_transaction=record,
    )  # fmt: skip
    return sent.bundle_id


# -- the receiving side asks -------------------------------------------------------------


def request_consent(
    node: Node,
    keyring: NodeKeyring,
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
    items = validate_items(bundle_ids, field="bundle ids")
    validate_text(recipient, field="recipient", max_chars=200)
    validate_text(purpose, field="purpose", max_chars=_MAX_REASON)
    policy = _policy(node)
    if normalise_name(recipient) in {
        normalise_name(n) for n in _internal_names(policy, node.node_id)
    }:
        raise InvalidInput(
            f"{recipient!r} is an internal recipient of this side: no consent is needed"
        )
    peer = _peer_of(node.node_id)
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
                items_json=_items_json(items),
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

    bundle_id = _send(node, keyring, actor, "consent-request", case, [], now, record)
    return SentConsent(bundle_id=bundle_id, request_id=bundle_id)


# -- the originating side answers ---------------------------------------------------------


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


def grant(
    node: Node,
    keyring: NodeKeyring,
    actor: Actor,
    request_id: str,
    *,
    valid_until: datetime | None,
    max_uses: int | None,
    conditions: str,
    now: datetime,
) -> SentConsent:
    """Give the peer written consent for its request ``request_id``; send it signed.

    ``valid_until`` defaults to the policy's maximum validity and may not
    exceed it; ``max_uses`` may not exceed the policy's limit. Every item of
    the request must be one of this node's own bundles.
    """
    apply_pending(node, keyring, now=now)
    policy = _policy(node)
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
        row = _pending_incoming(session, request_id, lock=True)
        row.status = RequestStatus.GRANTED
        row.decided_at = now
        row.consent_id = consent_id
        _store_grant(
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
        bundle_id = _send(node, keyring, actor, "consent-grant", case, [attachment], now, record)
    return SentConsent(
        bundle_id=bundle_id,
        request_id=request_id,
        consent_id=consent_id,
        valid_until=until,
        max_uses=max_uses,
    )


def _store_grant(
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
        },
    )


def deny(
    node: Node,
    keyring: NodeKeyring,
    actor: Actor,
    request_id: str,
    *,
    reason: str,
    now: datetime,
) -> SentConsent:
    """Refuse the peer's consent request ``request_id``; the peer is told why."""
    validate_text(reason, field="reason", max_chars=_MAX_REASON)
    apply_pending(node, keyring, now=now)
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
        _store_denial(
            session,
            request_id=request_id,
            direction=Direction.ISSUED,
            reason=reason,
            officer=actor.name,
            bundle_id=bundle_id,
            now=now,
            actor=actor,
        )

    bundle_id = _send(node, keyring, actor, "consent-denial", case, [], now, record)
    return SentConsent(bundle_id=bundle_id, request_id=request_id)


def _store_denial(
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


def revoke(
    node: Node,
    keyring: NodeKeyring,
    actor: Actor,
    consent_id: str,
    *,
    reason: str,
    now: datetime,
) -> SentConsent:
    """Withdraw a consent this node granted; the peer stops using it once it arrives."""
    validate_text(reason, field="reason", max_chars=_MAX_REASON)
    with node.db.transaction() as session:
        row = session.get(ConsentGrantRecord, consent_id)
        if row is None or row.direction != Direction.ISSUED:
            raise NotFound(f"no consent {consent_id!r} granted by this node")
        if session.get(ConsentRevocationRecord, consent_id) is not None:
            raise RefusedError(f"consent {consent_id} is revoked already", reason="consent.revoked")
        request_id = row.request_id
    case = {"consent_id": consent_id, "reason": reason, "revoking_officer": actor.name}
    validate_case("consent-revocation", case)

    def record(session: Session, bundle_id: str) -> None:
        if session.get(ConsentRevocationRecord, consent_id) is not None:
            raise RefusedError(f"consent {consent_id} is revoked already", reason="consent.revoked")
        _store_revocation(
            session,
            consent_id=consent_id,
            direction=Direction.ISSUED,
            reason=reason,
            officer=actor.name,
            bundle_id=bundle_id,
            now=now,
            actor=actor,
        )

    bundle_id = _send(node, keyring, actor, "consent-revocation", case, [], now, record)
    return SentConsent(bundle_id=bundle_id, request_id=request_id, consent_id=consent_id)


def _store_revocation(
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


# -- applying what the peer sent -----------------------------------------------------------


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
    from gateway.core.envelope import AttachmentInfo, open_envelope  # noqa: PLC0415

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

    path = envelope_path(node.settings.blob_dir, entry.envelope_sha256)
    with path.open("rb") as stream:
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
) -> str:
    """Store one received consent-* bundle; return a one-line summary."""
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
                items_json=_items_json(items),
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
        _store_grant(
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
        _store_denial(
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
        _store_revocation(
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
    if kind == consent_use.USE_TYPE:
        return consent_use.apply_use_notice(session, entry, case, now)
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
            .where(
                InboxEntry.case_type.in_(APPLIED_TYPES),
                InboxEntry.sender != node_id,
                InboxEntry.bundle_id.not_in(applied.scalar_subquery()),
            )
            .order_by(InboxEntry.id)
        )
    )


def _apply_pending_in(
    session: Session, node: Node, keyring: NodeKeyring, policy: Policy, now: datetime
) -> list[str]:
    entries = _pending_entries(session, node.node_id)
    if not entries:
        return []
    peer = _peer_manifest(session)
    done: list[str] = []
    for entry in entries:
        try:
            with session.begin_nested():
                case, attachments = _open_consent_bundle(node, keyring, peer, policy, entry)
                summary = _apply_one(session, node.node_id, peer, entry, case, attachments, now)
                outcome = "applied"
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


def apply_pending(node: Node, keyring: NodeKeyring, *, now: datetime) -> list[str]:
    """Apply every received consent-* bundle not applied yet; return what happened to each."""
    policy = _policy(node)
    with node.db.transaction() as session:
        ledger.lock_for_append(session)  # the linearisation point of consent decisions
        done = _apply_pending_in(session, node, keyring, policy, now)
    try:
        send_refusal_notices(node, keyring, now=now)
    except GatewayError as exc:
        # The refusals are recorded; their notices are queued by the next call.
        _log.warning("refusal_notice_deferred", error=type(exc).__name__, reason=exc.reason)
    consent_use.notify_uses(node, keyring, now=now)
    return done


# -- refusals after delivery ------------------------------------------------------------------


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


def send_refusal_notices(node: Node, keyring: NodeKeyring, *, now: datetime) -> list[str]:
    """Queue a signed ``bundle-refusal`` notice for every refusal not yet noticed.

    Each notice is a confidential protocol bundle to the refused bundle's
    sender, its ``reply_to`` the refused bundle; it goes through the outbox
    (delivered exactly once, with a receipt). The row is marked in the same
    transaction as the queued notice, so a crash re-sends at most never and
    two concurrent callers queue one notice. Returns the notice bundle ids.
    """
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
                _send(node, keyring, SYSTEM, REFUSAL_TYPE, case, [], now, record,
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


# -- reading the consent state --------------------------------------------------------------


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
        reported = consent_use.reported_uses(session)
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


# -- disclosure --------------------------------------------------------------------------


@dataclass
class _Item:
    item: DisclosureItem
    envelope_sha256: str
    opened_at: datetime
    direction: str


def _locate(session: Session, node_id: str, bundle_ids: Sequence[str]) -> list[_Item]:
    found: dict[str, _Item] = {}
    for row in session.scalars(select(InboxEntry).where(InboxEntry.bundle_id.in_(bundle_ids))):
        found[row.bundle_id] = _Item(
            DisclosureItem(row.bundle_id, row.sender, row.marking),
            row.envelope_sha256,
            row.received_at,
            "received",
        )
    for out in session.scalars(select(OutboxEntry).where(OutboxEntry.bundle_id.in_(bundle_ids))):
        if out.bundle_id not in found:
            found[out.bundle_id] = _Item(
                DisclosureItem(out.bundle_id, node_id, out.marking),
                out.envelope_sha256,
                out.created_at,
                "sent",
            )
    missing = [b for b in bundle_ids if b not in found]
    if missing:
        raise NotFound(f"no bundle {missing[0]} in the inbox or the outbox")
    for located in found.values():
        ensure_not_purged(session, StoredDirection(located.direction), located.item.bundle_id)
    return [found[b] for b in bundle_ids]


def _decide(
    session: Session,
    node_id: str,
    policy: Policy,
    items: list[_Item],
    recipient: str,
    purpose: str,
    now: datetime,
) -> Decision:
    ids = [entry.item.bundle_id for entry in items]
    return decide_disclosure(
        [entry.item for entry in items],
        recipient,
        purpose,
        own_node=node_id,
        internal_recipients=_internal_names(policy, node_id),
        consents=load_consent_states(session, ids),
        now=now,
    )


def _record_attempt(
    session: Session,
    *,
    decision: Decision,
    actor: Actor,
    now: datetime,
    files: dict[str, Any] | None,
) -> tuple[str, LedgerEntry]:
    """``files`` is :func:`~gateway.core.filemac.files_record` of what was handed
    over: positions, sizes and keyed MACs, never names or plain hashes (the
    ledger is read by compliance officers; file names are case content)."""
    disclosure_id = str(uuid.uuid4())
    ids = [item.bundle_id for item in decision.items]
    body = decision.to_record()
    body["disclosure_id"] = disclosure_id
    if files:
        body.update(files)
    entry = ledger.record_event(
        session,
        kind=decision.entry_kind.value,
        actor=actor,
        now=now,
        bundle_id=ids[0] if len(ids) == 1 else None,
        consent_id=decision.consent_id,
        body=body,
    )
    session.add(
        DisclosureRecord(
            disclosure_id=disclosure_id,
            kind=decision.entry_kind.value,
            allowed=decision.allowed,
            recipient=decision.recipient,
            purpose=decision.purpose,
            items_json=_items_json(ids),
            decision_json=canonical_bytes(decision.to_record()).decode("utf-8"),
            consent_id=decision.consent_id,
            decided_at=now,
            actor=actor.label,
            ledger_seq=entry.seq,
            ledger_hash=entry.entry_hash.hex(),
        )
    )
    session.flush()
    if decision.consent_id is not None:
        session.add(
            ConsentUse(
                consent_id=decision.consent_id,
                disclosure_id=disclosure_id,
                used_at=now,
                actor=actor.label,
            )
        )
        session.flush()
    return disclosure_id, entry


def _refusal(decision: Decision) -> ConsentRefused:
    return ConsentRefused(
        f"disclosure to {decision.recipient!r} for {decision.purpose!r} refused: "
        f"{decision.explain()}. Nothing was written; the attempt is recorded in the ledger."
    )


def _check_out_dir(out_dir: Path) -> Path:
    target = out_dir.expanduser().absolute()
    if (target.exists() or target.is_symlink()) and (
        not target.is_dir() or target.is_symlink() or any(target.iterdir())
    ):
        raise InvalidInput(f"{target}: must not exist yet, or be an empty folder")
    if not target.parent.is_dir():
        raise InvalidInput(f"{target.parent}: the folder to write into does not exist")
    return target


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class _Staged:
    """Decrypted items waiting in ``folder`` for the decision."""

    folder: Path
    files: dict[str, str]
    """Relative path -> SHA-256 (for the package and the officer)."""
    disclosed: list[DisclosedFile]
    """The same files by position (for the ledger)."""


def _decrypt_items(
    node: Node, keyring: NodeKeyring, policy: Policy, items: list[_Item], staging: Path
) -> _Staged:
    """Decrypt every item into ``staging/<bundle id>/``: ``case.json`` and the
    attachments under ``attachments/``."""
    with node.db.transaction() as session:
        peer = _peer_manifest(session)
    files: dict[str, str] = {}
    disclosed: list[DisclosedFile] = []
    for entry in items:
        folder = staging / entry.item.bundle_id
        attachments = make_private_dir(folder / "attachments")
        opened = open_to_dir(
            envelope_path(node.settings.blob_dir, entry.envelope_sha256),
            attachments,
            keyring=keyring,
            peer_manifest=peer,
            policy=policy,
            now=entry.opened_at,
            stored_at=entry.opened_at,  # a key revoked since: trusted if stored before
        )
        check_reply_matches_case(
            opened.envelope.header.type, opened.envelope.header.reply_to, opened.envelope.case_data
        )
        if not opened.files:
            attachments.rmdir()
        with create_private_file(folder / "case.json") as out:
            out.write(canonical_bytes(opened.envelope.case_data))
            out.flush()
            os.fsync(out.fileno())
        bundle_id = entry.item.bundle_id
        case_path = folder / "case.json"
        case_sha = _sha256_file(case_path)
        files[case_path.relative_to(staging).as_posix()] = case_sha
        disclosed.append(DisclosedFile(bundle_id, "case", 0, case_path.stat().st_size, case_sha))
        for written in opened.files:
            sha = _sha256_file(written.path)
            files[written.path.relative_to(staging).as_posix()] = sha
            disclosed.append(
                DisclosedFile(bundle_id, "attachment", written.index, written.size, sha)
            )
    return _Staged(staging, files, disclosed)


def _foresee(
    node: Node,
    keyring: NodeKeyring,
    policy: Policy,
    ids: list[str],
    recipient: str,
    purpose: str,
    now: datetime,
) -> tuple[list[_Item], Decision]:
    """The first look, without the lock: is there any point in decrypting?"""
    apply_pending(node, keyring, now=now)
    with node.db.transaction() as session:
        items = _locate(session, node.node_id, ids)
        return items, _decide(session, node.node_id, policy, items, recipient, purpose, now)


def disclose(
    node: Node,
    keyring: NodeKeyring,
    actor: Actor,
    bundle_ids: Sequence[str],
    recipient: str,
    purpose: str,
    out_dir: Path,
    *,
    now: datetime,
) -> DisclosureResult:
    """Release decrypted items to ``recipient`` if the rule allows; record every attempt.

    Allowed: the items (``<bundle id>/case.json`` and attachments) and
    ``disclosure.json`` (consent id, ledger entry, SHA-256 of every file and
    the ledger's keyed MACs of them)
    appear in ``out_dir`` at once, and the consent use and the ledger entry
    (``disclosure-made`` or ``internal-share``) are committed with the
    decision. Refused: :class:`ConsentRefused` (exit code 3) names what is
    missing for each item, nothing is written to ``out_dir``, and one
    ``disclosure-blocked`` entry is committed.
    """
    ids = list(validate_items(bundle_ids, field="bundle ids"))
    validate_text(recipient, field="recipient", max_chars=500)
    validate_text(purpose, field="purpose", max_chars=_MAX_REASON)
    target = _check_out_dir(out_dir)
    policy = _policy(node)
    items, foreseen = _foresee(node, keyring, policy, ids, recipient, purpose, now)
    if not foreseen.allowed:
        # Decided again under the lock and recorded, without decrypting anything;
        # should a consent have arrived in between, it starts again with the files.
        return _decide_and_record(
            node, keyring, policy, actor, items, recipient, purpose, now, None, target
        )
    staging = Path(tempfile.mkdtemp(prefix=_PARTIAL_PREFIX, dir=target.parent))
    try:
        staging.chmod(PRIVATE_DIR_MODE)  # becomes the output folder: 0700 whatever the umask
        try:
            staged = _decrypt_items(node, keyring, policy, items, staging)
        except (InvalidInput, VerificationError):
            # A purge that committed meanwhile destroys envelopes under the reader: say so.
            with node.db.transaction() as session:
                _locate(session, node.node_id, ids)
            raise
        return _decide_and_record(
            node, keyring, policy, actor, items, recipient, purpose, now, staged, target
        )
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _decide_and_record(
    node: Node,
    keyring: NodeKeyring,
    policy: Policy,
    actor: Actor,
    items: list[_Item],
    recipient: str,
    purpose: str,
    now: datetime,
    staged: _Staged | None,
    target: Path,
) -> DisclosureResult:
    refused: Decision | None = None
    placed = False
    again = False
    try:
        with node.db.transaction() as session:
            ledger.lock_for_append(session)  # the linearisation point of consent decisions
            _apply_pending_in(session, node, keyring, policy, now)
            decision = _decide(session, node.node_id, policy, items, recipient, purpose, now)
            if not decision.allowed:
                _record_attempt(session, decision=decision, actor=actor, now=now, files=None)
                refused = decision
            elif staged is None:
                # Allowed now, though it was not a moment ago (a consent arrived):
                # commit what was applied, record nothing, start again with the files.
                again = True
            else:
                staging, files = staged.folder, staged.files
                ledger_files = files_record(
                    staged.disclosed,
                    key=file_mac_key(bytes(keyring.signing_key)),
                    key_id=keyring.signing_key_id,
                )
                disclosure_id, entry = _record_attempt(
                    session, decision=decision, actor=actor, now=now, files=ledger_files
                )
                manifest = {
                    "disclosure_id": disclosure_id,
                    "kind": decision.entry_kind.value,
                    "node": node.node_id,
                    "recipient": recipient,
                    "purpose": purpose,
                    "consent_id": decision.consent_id,
                    "actor": actor.label,
                    "time": format_time(now),
                    "ledger_seq": entry.seq,
                    "ledger_entry_hash": entry.entry_hash.hex(),
                    "items": [i.to_record() for i in decision.items],
                    "files_sha256": dict(sorted(files.items())),
                    "ledger_files": ledger_files,
                }
                with create_private_file(staging / MANIFEST_NAME) as out:
                    out.write(json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n")
                    out.flush()
                    os.fsync(out.fileno())
                if target.exists():
                    target.rmdir()  # empty, checked before; replaced by the staged folder
                staging.rename(target)
                placed = True
                # What stays on this node is tracked for the retention of decrypted
                # outputs; the package handed to the recipient is the recipient's.
                record_outputs(
                    session,
                    [
                        WrittenOutput(target / rel, rel.split("/", 1)[0], sha)
                        for rel, sha in sorted(files.items())
                    ]
                    + [WrittenOutput(target / MANIFEST_NAME, None)],
                    command="disclose",
                    actor=actor,
                    now=now,
                    folder=target,
                    disclosure_id=disclosure_id,
                )
                result = DisclosureResult(
                    disclosure_id=disclosure_id,
                    kind=decision.entry_kind.value,
                    recipient=recipient,
                    purpose=purpose,
                    consent_id=decision.consent_id,
                    ledger_seq=entry.seq,
                    ledger_hash=entry.entry_hash.hex(),
                    out_dir=target,
                    files=files,
                    decision=decision,
                )
    except BaseException:
        if placed:
            shutil.rmtree(target, ignore_errors=True)
        raise
    if again:
        ids = [i.item.bundle_id for i in items]
        return disclose(node, keyring, actor, ids, recipient, purpose, target, now=now)
    if refused is not None:
        _log.info("disclosure_blocked", recipient=recipient, items=len(items))
        raise _refusal(refused)
    _log.info("disclosure_made", kind=result.kind, consent_id=result.consent_id, items=len(items))
    consent_use.notify_uses(node, keyring, now=now)
    return result
