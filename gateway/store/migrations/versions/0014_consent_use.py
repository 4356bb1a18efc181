"""Consent uses travelling back: notices sent (discloser), uses reported (originator).

Revision ID: 0014_consent_use
Revises: 0001_foundation
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from gateway.store.base import UTCDateTime

revision = "0014_consent_use"
down_revision = "0001_foundation"
branch_labels = ("consent_use",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "consent_use_notice",
        sa.Column("disclosure_id", sa.String(64), nullable=False),
        sa.Column("consent_id", sa.String(128), nullable=False),
        sa.Column("notice_bundle_id", sa.String(64), nullable=False),
        sa.Column("use_number", sa.Integer(), nullable=False),
        sa.Column("queued_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("disclosure_id", name="pk_consent_use_notice"),
        sa.UniqueConstraint("notice_bundle_id", name="uq_consent_use_notice_notice_bundle_id"),
    )
    op.create_table(
        "consent_use_report",
        sa.Column("sender", sa.String(8), nullable=False),
        sa.Column("disclosure_id", sa.String(64), nullable=False),
        sa.Column("consent_id", sa.String(128), nullable=False),
        sa.Column("items_json", sa.Text(), nullable=False),
        sa.Column("recipient", sa.String(500), nullable=False),
        sa.Column("purpose", sa.Text(), nullable=False),
        sa.Column("used_at", UTCDateTime(), nullable=False),
        sa.Column("use_number", sa.Integer(), nullable=False),
        sa.Column("peer_ledger_seq", sa.Integer(), nullable=False),
        sa.Column("peer_ledger_hash", sa.String(64), nullable=False),
        sa.Column("notice_bundle_id", sa.String(64), nullable=False),
        sa.Column("violation", sa.String(500), nullable=True),
        sa.Column("recorded_at", UTCDateTime(), nullable=False),
        sa.Column("ledger_seq", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("sender", "disclosure_id", name="pk_consent_use_report"),
    )
    op.create_index("ix_consent_use_report_consent_id", "consent_use_report", ["consent_id"])


def downgrade() -> None:
    op.drop_index("ix_consent_use_report_consent_id", table_name="consent_use_report")
    op.drop_table("consent_use_report")
    op.drop_table("consent_use_notice")
