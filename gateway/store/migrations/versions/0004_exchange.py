"""Exchange: outbox, inbox, sequence counters, gaps, equivocations.

Revision ID: 0004_exchange
Revises: 0001_foundation
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from gateway.store.base import UTCDateTime

revision = "0004_exchange"
down_revision = "0001_foundation"
branch_labels = ("exchange",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "exchange_sequence",
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("last_sequence", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("channel", name="pk_exchange_sequence"),
    )
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("bundle_id", sa.String(64), nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("recipient", sa.String(8), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("case_type", sa.String(64), nullable=False),
        sa.Column("marking", sa.String(32), nullable=False),
        sa.Column("reply_to", sa.String(64), nullable=True),
        sa.Column("envelope_sha256", sa.String(64), nullable=False),
        sa.Column("envelope_size", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=False),
        sa.Column("last_error", sa.String(300), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("delivered_at", UTCDateTime(), nullable=True),
        sa.Column("receipt", sa.LargeBinary(), nullable=True),
        sa.Column("actor", sa.String(160), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
        sa.UniqueConstraint("bundle_id", name="uq_outbox_bundle_id"),
        sa.UniqueConstraint("channel", "sequence", name="uq_outbox_channel_sequence"),
    )
    op.create_index("ix_outbox_state_channel_sequence", "outbox", ["state", "channel", "sequence"])
    op.create_table(
        "inbox",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("sender", sa.String(8), nullable=False),
        sa.Column("bundle_id", sa.String(64), nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("case_type", sa.String(64), nullable=False),
        sa.Column("marking", sa.String(32), nullable=False),
        sa.Column("reply_to", sa.String(64), nullable=True),
        sa.Column("signing_key_id", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.Column("envelope_sha256", sa.String(64), nullable=False),
        sa.Column("envelope_size", sa.BigInteger(), nullable=False),
        sa.Column("receipt", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_inbox"),
        sa.UniqueConstraint("sender", "bundle_id", name="uq_inbox_sender_bundle_id"),
    )
    op.create_index("ix_inbox_channel_sequence", "inbox", ["channel", "sequence"])
    op.create_table(
        "inbox_gap",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("first_missing", sa.BigInteger(), nullable=False),
        sa.Column("last_missing", sa.BigInteger(), nullable=False),
        sa.Column("noticed_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_inbox_gap"),
    )
    op.create_index("ix_inbox_gap_channel_first", "inbox_gap", ["channel", "first_missing"])
    op.create_table(
        "equivocation",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("sender", sa.String(8), nullable=False),
        sa.Column("bundle_id", sa.String(64), nullable=False),
        sa.Column("first_envelope_sha256", sa.String(64), nullable=False),
        sa.Column("other_envelope_sha256", sa.String(64), nullable=False),
        sa.Column("other_header", sa.LargeBinary(), nullable=False),
        sa.Column("detected_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_equivocation"),
        sa.UniqueConstraint(
            "sender", "bundle_id", "other_envelope_sha256", name="uq_equivocation_evidence"
        ),
    )


def downgrade() -> None:
    op.drop_table("equivocation")
    op.drop_index("ix_inbox_gap_channel_first", table_name="inbox_gap")
    op.drop_table("inbox_gap")
    op.drop_index("ix_inbox_channel_sequence", table_name="inbox")
    op.drop_table("inbox")
    op.drop_index("ix_outbox_state_channel_sequence", table_name="outbox")
    op.drop_table("outbox")
    op.drop_table("exchange_sequence")
