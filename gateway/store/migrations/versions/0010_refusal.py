"""Refusals after delivery: bundles receipted, then refused, in both directions.

Revision ID: 0010_refusal
Revises: 0001_foundation
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from gateway.store.base import UTCDateTime

revision = "0010_refusal"
down_revision = "0001_foundation"
branch_labels = ("refusal",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bundle_refusal",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("direction", sa.String(16), nullable=False),
        sa.Column("peer", sa.String(8), nullable=False),
        sa.Column("bundle_id", sa.String(64), nullable=False),
        sa.Column("case_type", sa.String(64), nullable=False),
        sa.Column("envelope_sha256", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("detail", sa.String(500), nullable=False),
        sa.Column("refused_at", UTCDateTime(), nullable=False),
        sa.Column("notice_bundle_id", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_bundle_refusal"),
        sa.UniqueConstraint("direction", "peer", "bundle_id", name="uq_bundle_refusal_bundle"),
    )


def downgrade() -> None:
    op.drop_table("bundle_refusal")
