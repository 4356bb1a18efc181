"""Storage of consent uses travelling back to the originator (SPEC §8a).

Two sides of one notice:

* ``consent_use_notice`` (the **discloser**): one row per disclosure made
  under a consent the peer granted, written in the same transaction as the
  queued ``consent-use`` bundle; its primary key makes the notice
  exactly-once however often :func:`gateway.node.consent.uses.send_use_notices`
  runs or crashes.
* ``consent_use_report`` (the **originator**): one row per use the peer
  reported, keyed by the peer's disclosure id (a duplicate delivery records
  nothing new), with ``violation`` naming why the use was not authorised
  (unknown consent, revoked, over the limit, ...) or ``None``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from gateway.store.base import Base, UTCDateTime

__all__ = ["ConsentUseNoticeRecord", "ConsentUseReport"]


class ConsentUseNoticeRecord(Base):
    """A ``consent-use`` notice this node queued for one of its disclosures."""

    __tablename__ = "consent_use_notice"

    disclosure_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    consent_id: Mapped[str] = mapped_column(String(128))
    notice_bundle_id: Mapped[str] = mapped_column(String(64), unique=True)
    use_number: Mapped[int] = mapped_column(Integer)
    queued_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ConsentUseReport(Base):
    """A use of one of our consents, as the peer reported it."""

    __tablename__ = "consent_use_report"
    __table_args__ = (Index("ix_consent_use_report_consent_id", "consent_id"),)

    sender: Mapped[str] = mapped_column(String(8), primary_key=True)
    disclosure_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    consent_id: Mapped[str] = mapped_column(String(128))
    items_json: Mapped[str] = mapped_column(Text)
    recipient: Mapped[str] = mapped_column(String(500))
    purpose: Mapped[str] = mapped_column(Text)
    used_at: Mapped[datetime] = mapped_column(UTCDateTime())
    use_number: Mapped[int] = mapped_column(Integer)
    peer_ledger_seq: Mapped[int] = mapped_column(Integer)
    peer_ledger_hash: Mapped[str] = mapped_column(String(64))
    notice_bundle_id: Mapped[str] = mapped_column(String(64))
    violation: Mapped[str | None] = mapped_column(String(500), nullable=True)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ledger_seq: Mapped[int | None] = mapped_column(Integer, nullable=True)
