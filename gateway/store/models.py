"""Typed declarative models of the foundation.

Each feature keeps its tables in its own module under ``gateway/store`` and its
own Alembic migration branch; :mod:`gateway.store.db` imports them all so that
``Base.metadata`` is complete.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from gateway.store.base import Base, UTCDateTime

__all__ = ["NodeRecord"]


class NodeRecord(Base):
    """The single row that says which node this database belongs to.

    Opening a database that belongs to another node is refused, so a
    misconfigured URL can never mix Tokyo's and Islamabad's records.
    """

    __tablename__ = "node"

    node_id: Mapped[str] = mapped_column(String(8), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    software_version: Mapped[str] = mapped_column(String(32))
