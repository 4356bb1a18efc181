"""The two-person rule: proposals and their approvals.

Revision ID: 0015_approvals
Revises: 0014_consent_use
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from gateway.store.base import UTCDateTime

revision = "0015_approvals"
down_revision = "0014_consent_use"
branch_labels = ("approvals",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "approval_proposal",
        sa.Column("proposal_id", sa.String(64), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("terms_json", sa.Text(), nullable=False),
        sa.Column("terms_hash", sa.String(64), nullable=False),
        sa.Column("needed", sa.Integer(), nullable=False),
        sa.Column("proposer", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("decided_at", UTCDateTime(), nullable=True),
        sa.Column("decided_by", sa.String(64), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("result_ref", sa.String(128), nullable=True),
        sa.PrimaryKeyConstraint("proposal_id", name="pk_approval_proposal"),
    )
    op.create_index("ix_approval_proposal_state", "approval_proposal", ["state"])
    op.create_table(
        "approval_vote",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("proposal_id", sa.String(64), nullable=False),
        sa.Column("approver", sa.String(64), nullable=False),
        sa.Column("terms_hash", sa.String(64), nullable=False),
        sa.Column("approved_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["proposal_id"],
            ["approval_proposal.proposal_id"],
            name="fk_approval_vote_proposal",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_approval_vote"),
        sa.UniqueConstraint(
            "proposal_id", "approver", name="uq_approval_vote_proposal_id_approver"
        ),
    )


def downgrade() -> None:
    op.drop_table("approval_vote")
    op.drop_index("ix_approval_proposal_state", table_name="approval_proposal")
    op.drop_table("approval_proposal")
