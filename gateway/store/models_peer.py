"""Peer transport storage: the nonces of accepted peer requests.

A nonce is recorded once its request's signature verified; the unique
constraint on (sender, nonce) makes "insert if absent" atomic on SQLite and
PostgreSQL alike, so a replayed request is refused even across restarts and
even when two copies race. A nonce needs keeping only while its request's time
is inside the skew window; older rows are pruned.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Executable, Index, LargeBinary, String, UniqueConstraint, delete
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Mapped, Session, mapped_column

from gateway.store.base import Base, UTCDateTime

__all__ = ["PeerNonce", "prune_nonces", "remember_nonce"]


class PeerNonce(Base):
    """One accepted peer request's nonce, kept while a replay could still verify."""

    __tablename__ = "peer_nonce"
    __table_args__ = (
        UniqueConstraint("sender", "nonce", name="uq_peer_nonce_sender_nonce"),
        Index("ix_peer_nonce_request_time", "request_time"),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    sender: Mapped[str] = mapped_column(String(8))
    nonce: Mapped[bytes] = mapped_column(LargeBinary(16))
    request_time: Mapped[datetime] = mapped_column(UTCDateTime())
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime())


def remember_nonce(
    session: Session, sender: str, nonce: bytes, *, request_time: datetime, now: datetime
) -> bool:
    """Record a nonce; True when it was new, False when it had been seen (a replay)."""
    values = {"sender": sender, "nonce": nonce, "request_time": request_time, "seen_at": now}
    dialect = session.get_bind().dialect.name
    statement: Executable
    if dialect == "postgresql":
        statement = (
            pg_insert(PeerNonce).values(**values).on_conflict_do_nothing().returning(PeerNonce.id)
        )
    elif dialect == "sqlite":
        statement = (
            sqlite_insert(PeerNonce)
            .values(**values)
            .on_conflict_do_nothing()
            .returning(PeerNonce.id)
        )
    else:
        raise RuntimeError(f"no atomic insert-if-absent for database engine {dialect}")
    return session.execute(statement).first() is not None


def prune_nonces(session: Session, *, older_than: datetime) -> int:
    """Delete nonces of requests timed before ``older_than``; return how many."""
    result = session.execute(delete(PeerNonce).where(PeerNonce.request_time < older_than))
    return int(result.rowcount)  # type: ignore[attr-defined]
