"""Peer transport: nonces of accepted peer requests (replay protection).

Revision ID: 0006_peer
Revises: 0001_foundation
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from gateway.store.base import UTCDateTime

revision = "0006_peer"
down_revision = "0001_foundation"
branch_labels = ("peer",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "peer_nonce",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("sender", sa.String(8), nullable=False),
        sa.Column("nonce", sa.LargeBinary(16), nullable=False),
        sa.Column("request_time", UTCDateTime(), nullable=False),
        sa.Column("seen_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_peer_nonce"),
        sa.UniqueConstraint("sender", "nonce", name="uq_peer_nonce_sender_nonce"),
    )
    op.create_index("ix_peer_nonce_request_time", "peer_nonce", ["request_time"])


def downgrade() -> None:
    op.drop_index("ix_peer_nonce_request_time", table_name="peer_nonce")
    op.drop_table("peer_nonce")
