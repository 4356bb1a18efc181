"""Storage of the two-person rule: proposals and their approvals.

* ``approval_proposal``: one action waiting for (or done after) its approvals:
  the action, its exact terms (canonical JSON) and their SHA-256, who proposed
  it, when it expires, its state and, once executed, a reference to what it
  made (a consent id, a key id).
* ``approval_vote``: one approver's approval of one proposal, with the hash of
  the terms approved and who could hold the approver's token when they approved
  (``holders``, docs/consent.md "Token custody"); unique per (proposal,
  approver), so nobody approves twice.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from gateway.store.base import Base, UTCDateTime

__all__ = ["ApprovalProposal", "ApprovalVote"]


class ApprovalProposal(Base):
    """An action under the two-person rule."""

    __tablename__ = "approval_proposal"
    __table_args__ = (Index("ix_approval_proposal_state", "state"),)

    proposal_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    action: Mapped[str] = mapped_column(String(32))
    terms_json: Mapped[str] = mapped_column(Text)
    terms_hash: Mapped[str] = mapped_column(String(64))
    needed: Mapped[int] = mapped_column(Integer)
    proposer: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    state: Mapped[str] = mapped_column(String(16))
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    decided_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    result_ref: Mapped[str | None] = mapped_column(String(128), nullable=True)


class ApprovalVote(Base):
    """One approver's approval of one proposal's terms."""

    __tablename__ = "approval_vote"
    __table_args__ = (
        UniqueConstraint("proposal_id", "approver", name="uq_approval_vote_proposal_id_approver"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    proposal_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("approval_proposal.proposal_id", name="fk_approval_vote_proposal")
    )
    approver: Mapped[str] = mapped_column(String(64))
    terms_hash: Mapped[str] = mapped_column(String(64))
    approved_at: Mapped[datetime] = mapped_column(UTCDateTime())
    holders: Mapped[str] = mapped_column(Text)
    """JSON list of the users who could hold the approver's token when they approved
    (the approver among them; migration 0021_token_custody)."""
