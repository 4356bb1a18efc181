"""Storage of retention: purged bundles and the decrypted copies written on this node.

* :class:`PurgedBundle`: one row per bundle whose envelope body was destroyed
  under the retention policy. The inbox or outbox row stays (its metadata and
  signed receipt are evidence, like the ledger); this row says the body is
  gone, since when, and which ledger entry records it.
* :class:`DecryptedOutput`: one row per file that ``show --out`` or
  ``disclose --out`` wrote, so that retention can delete it when it is due.
  ``state`` walks ``present`` -> ``deleting`` -> ``deleted`` (or ``missing``
  when the file was moved or removed by someone else, or ``changed`` when the
  path now holds other bytes, which are then left alone).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from gateway.store.base import Base, UTCDateTime

__all__ = ["DecryptedOutput", "OutputState", "PurgedBundle"]


class PurgedBundle(Base):
    """A bundle whose envelope body (and so every sealed copy of its content key) is gone."""

    __tablename__ = "retention_purged"
    __table_args__ = (
        UniqueConstraint("direction", "bundle_id", name="uq_retention_purged_direction_bundle"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    direction: Mapped[str] = mapped_column(String(16))
    bundle_id: Mapped[str] = mapped_column(String(64))
    case_type: Mapped[str] = mapped_column(String(64))
    envelope_sha256: Mapped[str] = mapped_column(String(64))
    kept_since: Mapped[datetime] = mapped_column(UTCDateTime())
    purged_at: Mapped[datetime] = mapped_column(UTCDateTime())
    retention_days: Mapped[int] = mapped_column(Integer)
    ledger_seq: Mapped[int] = mapped_column(BigInteger)
    actor: Mapped[str] = mapped_column(String(160))


class OutputState:
    PRESENT = "present"
    DELETING = "deleting"
    DELETED = "deleted"
    MISSING = "missing"
    CHANGED = "changed"


class DecryptedOutput(Base):
    """A decrypted file written on this node by ``show --out`` or ``disclose --out``."""

    __tablename__ = "decrypted_output"
    __table_args__ = (Index("ix_decrypted_output_state_written", "state", "written_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    path: Mapped[str] = mapped_column(String(4096))
    folder: Mapped[str | None] = mapped_column(String(4096), nullable=True)
    """The folder the command made for its files (``disclose --out``), removed once empty."""
    bundle_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """``None`` for a file about several bundles (a disclosure's ``disclosure.json``)."""
    command: Mapped[str] = mapped_column(String(16))
    disclosure_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    written_at: Mapped[datetime] = mapped_column(UTCDateTime())
    written_by: Mapped[str] = mapped_column(String(160))
    state: Mapped[str] = mapped_column(String(16), default=OutputState.PRESENT)
    handled_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
