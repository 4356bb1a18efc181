"""Key manifests: the ones this node published, and the peer's pinned ones.

Private keys never enter the database: they live encrypted in the node home's
``keys/`` directory (:mod:`gateway.node.keystore`). These tables hold only
signed public manifests, exactly as signed.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from gateway.store.base import Base, UTCDateTime

__all__ = ["OwnManifestRecord", "PeerManifestRecord"]


class OwnManifestRecord(Base):
    """A key manifest this node signed; the highest version is the current one.

    ``delivered_at`` is empty until the peer has accepted it: rotation and
    revocation manifests wait here for the sync worker. The first manifest is
    handed over out of band (``gateway keys export``) and counts as delivered.
    """

    __tablename__ = "key_manifests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    node: Mapped[str] = mapped_column(String(8))
    version: Mapped[int] = mapped_column(Integer, unique=True)
    root_key_id: Mapped[str] = mapped_column(String(16))
    event: Mapped[str] = mapped_column(String(16))
    raw: Mapped[bytes] = mapped_column(LargeBinary())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    created_by: Mapped[str] = mapped_column(String(64))
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class PeerManifestRecord(Base):
    """A peer manifest accepted by this node; the latest row is the pinned one."""

    __tablename__ = "peer_manifests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    node: Mapped[str] = mapped_column(String(8))
    version: Mapped[int] = mapped_column(Integer)
    root_key_id: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(16))
    raw: Mapped[bytes] = mapped_column(LargeBinary())
    accepted_at: Mapped[datetime] = mapped_column(UTCDateTime())
    accepted_by: Mapped[str] = mapped_column(String(64))
