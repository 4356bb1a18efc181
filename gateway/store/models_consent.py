"""Storage of the consent protocol: requests, grants, denials, revocations, uses.

Both directions live in the same tables, told apart by ``direction``:

* ``outgoing`` requests are the ones this node sent (it holds the peer's items
  and wants to pass them on); ``incoming`` requests came from the peer.
* ``issued`` grants, denials and revocations are this node's own decisions on
  the peer's requests; ``received`` ones came from the peer and are what
  :func:`gateway.core.consent.decide_disclosure` consults.

A grant keeps its signed document and signature exactly as signed (or as
received); the other columns are copies for lookup and are never trusted
over the signed bytes. ``terms`` is the one copy a consent check reads in
place of the document, and only while it is bound to the document's exact
bytes (:func:`gateway.core.consent.terms_from_record`). Revocations carry no foreign key: a revocation that
arrives before its grant is kept, and the grant is revoked the moment it is
stored. Every disclosure attempt leaves a row in ``consent_disclosure``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
)
from sqlalchemy.orm import Mapped, mapped_column

from gateway.store.base import Base, UTCDateTime

__all__ = [
    "CONSENT_GENERATION_ID",
    "ConsentApplied",
    "ConsentCheckRow",
    "ConsentDenialRecord",
    "ConsentGenerationRow",
    "ConsentGrantItem",
    "ConsentGrantRecord",
    "ConsentRequestRecord",
    "ConsentRevocationRecord",
    "ConsentUse",
    "Direction",
    "DisclosureRecord",
    "RequestStatus",
]


class Direction:
    OUTGOING = "outgoing"
    INCOMING = "incoming"
    ISSUED = "issued"
    RECEIVED = "received"


class RequestStatus:
    PENDING = "pending"
    GRANTED = "granted"
    DENIED = "denied"


class ConsentRequestRecord(Base):
    """A consent request; its id is the id of the ``consent-request`` bundle."""

    __tablename__ = "consent_request"

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    direction: Mapped[str] = mapped_column(String(16))
    requester_node: Mapped[str] = mapped_column(String(8))
    originator_node: Mapped[str] = mapped_column(String(8))
    items_json: Mapped[str] = mapped_column(Text)
    third_party: Mapped[str] = mapped_column(String(200))
    purpose: Mapped[str] = mapped_column(Text)
    requesting_officer: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default=RequestStatus.PENDING)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    consent_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    actor: Mapped[str] = mapped_column(String(160))


class ConsentGrantRecord(Base):
    """A written consent: the signed document and signature, plus lookup copies."""

    __tablename__ = "consent_grant"
    __table_args__ = (
        Index("ix_consent_grant_request_id", "request_id"),
        # 0023_consent_check: the grants a suspect mark on their bundle touches
        Index("ix_consent_grant_bundle_id", "bundle_id"),
    )

    consent_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128))
    direction: Mapped[str] = mapped_column(String(16))
    granting_node: Mapped[str] = mapped_column(String(8))
    key_id: Mapped[str] = mapped_column(String(128))
    document: Mapped[bytes] = mapped_column(LargeBinary)
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    third_party: Mapped[str] = mapped_column(String(500))
    purpose: Mapped[str] = mapped_column(Text)
    valid_from: Mapped[datetime] = mapped_column(UTCDateTime())
    valid_until: Mapped[datetime] = mapped_column(UTCDateTime())
    max_uses: Mapped[int | None] = mapped_column(Integer, nullable=True)
    bundle_id: Mapped[str] = mapped_column(String(64))
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(160))
    terms: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, default=None)
    """The terms the disclosure rule reads, as :func:`gateway.core.consent.terms_record`
    wrote them from the verified grant, bound to ``document`` by its digest
    (migration ``0022_consent_terms``). Only spares a consent check the parse
    of the document: a missing or unbound record means the document is read."""


class ConsentGrantItem(Base):
    """One bundle a grant covers (indexed by bundle, for the disclosure check)."""

    __tablename__ = "consent_grant_item"
    __table_args__ = (Index("ix_consent_grant_item_bundle_id", "bundle_id"),)

    consent_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("consent_grant.consent_id"), primary_key=True
    )
    bundle_id: Mapped[str] = mapped_column(String(128), primary_key=True)


class ConsentDenialRecord(Base):
    """The originator's refusal of a request."""

    __tablename__ = "consent_denial"

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    direction: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    denying_officer: Mapped[str] = mapped_column(String(200))
    denied_at: Mapped[datetime] = mapped_column(UTCDateTime())
    bundle_id: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(160))


class ConsentRevocationRecord(Base):
    """The withdrawal of a consent; effective from the moment it is stored."""

    __tablename__ = "consent_revocation"

    consent_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    direction: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    revoking_officer: Mapped[str] = mapped_column(String(200))
    revoked_at: Mapped[datetime] = mapped_column(UTCDateTime())
    bundle_id: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(160))


class DisclosureRecord(Base):
    """One disclosure attempt, allowed or blocked, and what it relied on."""

    __tablename__ = "consent_disclosure"
    __table_args__ = (Index("ix_consent_disclosure_decided_at", "decided_at"),)

    disclosure_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    allowed: Mapped[bool] = mapped_column(Boolean)
    recipient: Mapped[str] = mapped_column(String(500))
    purpose: Mapped[str] = mapped_column(Text)
    items_json: Mapped[str] = mapped_column(Text)
    decision_json: Mapped[str] = mapped_column(Text)
    consent_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    decided_at: Mapped[datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(160))
    ledger_seq: Mapped[int | None] = mapped_column(Integer, nullable=True)
    ledger_hash: Mapped[str | None] = mapped_column(String(128), nullable=True)


class ConsentUse(Base):
    """One use of a received consent, spent by one allowed disclosure."""

    __tablename__ = "consent_use"
    __table_args__ = (Index("ix_consent_use_consent_id", "consent_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    consent_id: Mapped[str] = mapped_column(String(128), ForeignKey("consent_grant.consent_id"))
    disclosure_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("consent_disclosure.disclosure_id"), unique=True
    )
    used_at: Mapped[datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(160))


class ConsentApplied(Base):
    """A received consent-* bundle that was processed, and how it ended."""

    __tablename__ = "consent_applied"

    sender: Mapped[str] = mapped_column(String(8), primary_key=True)
    bundle_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    case_type: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str] = mapped_column(String(500))
    applied_at: Mapped[datetime] = mapped_column(UTCDateTime())


CONSENT_GENERATION_ID = 1
"""The one row of ``consent_generation``."""


class ConsentGenerationRow(Base):
    """A counter the database raises with every change a consent check reads.

    Migration ``0016_consent_generation`` installs the triggers that move it in
    the writing transaction (grants, grant items, revocations, uses; an inbox
    row's suspect mark). Checks cache consent states under its value.
    """

    __tablename__ = "consent_generation"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    generation: Mapped[int] = mapped_column(BigInteger)


class ConsentCheckRow(Base):
    """What a consent check reads of one received consent naming one bundle.

    Migration ``0023_consent_check`` installs the triggers that keep these
    rows in the writing transaction of every grant, grant item, revocation,
    use and suspect mark, from the base tables: a copy for the check that
    records nothing, never written by the application. ``document`` and
    ``terms`` are the grant's own (the record is used only while bound to the
    document); ``uses`` counts ``consent_use`` rows; ``suspect`` is set while
    the grant's bundle is marked suspect in the inbox.
    """

    __tablename__ = "consent_check"
    __table_args__ = (Index("ix_consent_check_consent_id", "consent_id"),)

    bundle_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    consent_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    document: Mapped[bytes] = mapped_column(LargeBinary)
    terms: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    uses: Mapped[int] = mapped_column(Integer)
    suspect: Mapped[bool] = mapped_column(Boolean)
