"""Ledger storage: the entry chain, our signed checkpoints, the peer's witnessed ones.

All three tables are append-only. The migration installs triggers that make
the database itself refuse UPDATE and DELETE (and, on PostgreSQL, TRUNCATE)
on them, so not even a bug in the application can rewrite history; an
attacker with the owner's rights who drops the triggers is caught by
``gateway ledger verify`` and by the peer's witness.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Index, Integer, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from gateway.store.base import Base, UTCDateTime

__all__ = [
    "APPEND_ONLY_TABLES",
    "LEDGER_STATE_ID",
    "LedgerCheckpointRow",
    "LedgerCheckpointStateRow",
    "LedgerEntryRow",
    "LedgerStateRow",
    "WitnessedCheckpointRow",
]

APPEND_ONLY_TABLES = (
    "ledger_entry",
    "ledger_checkpoint",
    "ledger_witnessed",
    "ledger_checkpoint_state",
)
LEDGER_STATE_ID = 1
"""The one row of ``ledger_state``."""


class LedgerEntryRow(Base):
    """One ledger entry: the canonical bytes that were hashed, and query columns.

    The columns beside ``canonical`` exist for listing and filtering; every
    verification checks them against the hashed bytes.
    """

    __tablename__ = "ledger_entry"
    __table_args__ = (
        UniqueConstraint("entry_hash", name="uq_ledger_entry_entry_hash"),
        Index("ix_ledger_entry_bundle_id", "bundle_id"),
        Index("ix_ledger_entry_consent_id", "consent_id"),
        Index("ix_ledger_entry_kind_seq", "kind", "seq"),
        Index("ix_ledger_entry_time", "time"),
    )

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    time: Mapped[datetime] = mapped_column(UTCDateTime())
    kind: Mapped[str] = mapped_column(String(32))
    actor_name: Mapped[str] = mapped_column(String(128))
    actor_role: Mapped[str | None] = mapped_column(String(16))
    bundle_id: Mapped[str | None] = mapped_column(String(128))
    consent_id: Mapped[str | None] = mapped_column(String(128))
    prev_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    entry_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    canonical: Mapped[bytes] = mapped_column(LargeBinary())


class LedgerCheckpointRow(Base):
    """A checkpoint this node signed and published: one per ledger size."""

    __tablename__ = "ledger_checkpoint"

    size: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    root: Mapped[bytes] = mapped_column(LargeBinary(32))
    time: Mapped[datetime] = mapped_column(UTCDateTime())
    key_id: Mapped[str] = mapped_column(String(128))
    body: Mapped[bytes] = mapped_column(LargeBinary())
    signature: Mapped[bytes] = mapped_column(LargeBinary(64))


class WitnessedCheckpointRow(Base):
    """A checkpoint the peer signed and sent us: we keep it as its witness."""

    __tablename__ = "ledger_witnessed"
    __table_args__ = (UniqueConstraint("node", "size", name="uq_ledger_witnessed_node"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    node: Mapped[str] = mapped_column(String(8))
    size: Mapped[int] = mapped_column(BigInteger)
    root: Mapped[bytes] = mapped_column(LargeBinary(32))
    time: Mapped[datetime] = mapped_column(UTCDateTime())
    key_id: Mapped[str] = mapped_column(String(128))
    body: Mapped[bytes] = mapped_column(LargeBinary())
    signature: Mapped[bytes] = mapped_column(LargeBinary(64))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())


class LedgerStateRow(Base):
    """The ledger head, kept in step with every append (migration ``0012_ledger_state``).

    One row (``id`` = 1): the number of entries, the hash of the last one and
    the RFC 9162 compact range over all of them (one 32-byte subtree hash per
    set bit of ``size``, largest subtree first). An append reads and writes
    it in the appending transaction, so the root of the whole ledger is an
    O(log n) fold and never a re-walk. It is a cache of what the entries
    say, not a source of truth: ``ledger verify`` and ``ledger checkpoint``
    check it against the entries.
    """

    __tablename__ = "ledger_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    size: Mapped[int] = mapped_column(BigInteger)
    head_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    compact: Mapped[bytes] = mapped_column(LargeBinary())


class LedgerCheckpointStateRow(Base):
    """The compact range at each checkpoint's size (append-only, like the checkpoints).

    A checkpoint after ``k`` new entries starts from the compact range of the
    previous checkpoint, checks that it folds to that checkpoint's *signed*
    root, and feeds the ``k`` entries since: O(k + log n) instead of a re-walk.
    """

    __tablename__ = "ledger_checkpoint_state"

    size: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    compact: Mapped[bytes] = mapped_column(LargeBinary())
