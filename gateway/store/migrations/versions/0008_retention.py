"""Retention: purged bundles and tracked decrypted outputs.

Revision ID: 0008_retention
Revises: 0001_foundation
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from gateway.store.base import UTCDateTime

revision = "0008_retention"
down_revision = "0001_foundation"
branch_labels = ("retention",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "retention_purged",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("direction", sa.String(16), nullable=False),
        sa.Column("bundle_id", sa.String(64), nullable=False),
        sa.Column("case_type", sa.String(64), nullable=False),
        sa.Column("envelope_sha256", sa.String(64), nullable=False),
        sa.Column("kept_since", UTCDateTime(), nullable=False),
        sa.Column("purged_at", UTCDateTime(), nullable=False),
        sa.Column("retention_days", sa.Integer(), nullable=False),
        sa.Column("ledger_seq", sa.BigInteger(), nullable=False),
        sa.Column("actor", sa.String(160), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_retention_purged"),
        sa.UniqueConstraint("direction", "bundle_id", name="uq_retention_purged_direction_bundle"),
    )
    op.create_table(
        "decrypted_output",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("path", sa.String(4096), nullable=False),
        sa.Column("folder", sa.String(4096), nullable=True),
        sa.Column("bundle_id", sa.String(64), nullable=True),
        sa.Column("command", sa.String(16), nullable=False),
        sa.Column("disclosure_id", sa.String(64), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("written_at", UTCDateTime(), nullable=False),
        sa.Column("written_by", sa.String(160), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("handled_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_decrypted_output"),
    )
    op.create_index(
        "ix_decrypted_output_state_written", "decrypted_output", ["state", "written_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_decrypted_output_state_written", table_name="decrypted_output")
    op.drop_table("decrypted_output")
    op.drop_table("retention_purged")
