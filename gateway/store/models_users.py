"""Users of a node: one role each, tokens stored only as hashes."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, Integer, LargeBinary, String, Text, false
from sqlalchemy.orm import Mapped, mapped_column

from gateway.store.base import Base, UTCDateTime

__all__ = ["UserRecord"]


class UserRecord(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    token_id: Mapped[str] = mapped_column(String(32), unique=True)
    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    created_by: Mapped[str] = mapped_column(String(64))
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    token_issued_at: Mapped[datetime] = mapped_column(UTCDateTime())
    token_issued_by: Mapped[str] = mapped_column(String(64))
    """Who issued the current token: its creator, the administrator who reissued it, or
    the user themself after ``gateway users rotate-token`` (migration 0020_token_issuer)."""
    token_holders: Mapped[str] = mapped_column(Text)
    """JSON list (sorted) of the users who could hold the current token: the user, and
    for a token an administrator issued, every holder of that administrator's token
    then (docs/consent.md, "Token custody"; migration 0021_token_custody)."""
    approver: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """An officer who may approve consent grants (docs/consent.md; migration 0019_approver)."""
