"""Storage of refusals after delivery: bundles a node receipted and then refused.

A bundle is receipted when it is stored; a protocol bundle (consent request,
grant, denial, revocation) is applied afterwards, and may not fit (items the
receiver never sent, a request it never made). The receiver records the
refusal (``issued``) and tells the sender with a signed ``bundle-refusal``
notice; the sender records the notice (``received``) and shows it on the
refused bundle in ``outbox``. docs/protocol.md describes the exchange.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from gateway.store.base import Base, UTCDateTime

__all__ = ["BundleRefusalRecord", "RefusalDirection"]


class RefusalDirection:
    ISSUED = "issued"
    """This node refused the peer's bundle."""
    RECEIVED = "received"
    """The peer refused this node's bundle and said so."""


class BundleRefusalRecord(Base):
    """One refused bundle, in either direction."""

    __tablename__ = "bundle_refusal"
    __table_args__ = (
        UniqueConstraint("direction", "peer", "bundle_id", name="uq_bundle_refusal_bundle"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    direction: Mapped[str] = mapped_column(String(16))
    peer: Mapped[str] = mapped_column(String(8))
    """The other node: the sender of a bundle we refused, the refuser of ours."""
    bundle_id: Mapped[str] = mapped_column(String(64))
    case_type: Mapped[str] = mapped_column(String(64))
    envelope_sha256: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(String(500))
    refused_at: Mapped[datetime] = mapped_column(UTCDateTime())
    notice_bundle_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """The ``bundle-refusal`` notice: the one we queued (issued; null until queued)
    or the one that told us (received)."""
