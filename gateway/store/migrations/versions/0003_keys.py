"""Keys: published key manifests and pinned peer manifests.

Revision ID: 0003_keys
Revises: 0001_foundation
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from gateway.store.base import UTCDateTime

revision = "0003_keys"
down_revision = "0001_foundation"
branch_labels = ("keys",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "key_manifests",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("node", sa.String(8), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("root_key_id", sa.String(16), nullable=False),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.Column("delivered_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_key_manifests"),
        sa.UniqueConstraint("version", name="uq_key_manifests_version"),
        sa.CheckConstraint("version >= 1", name="ck_key_manifests_version"),
        sa.CheckConstraint(
            "event IN ('init', 'rotate', 'revoke', 'rotate-root')", name="ck_key_manifests_event"
        ),
    )
    op.create_table(
        "peer_manifests",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("node", sa.String(8), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("root_key_id", sa.String(16), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("accepted_at", UTCDateTime(), nullable=False),
        sa.Column("accepted_by", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_peer_manifests"),
        sa.CheckConstraint("version >= 1", name="ck_peer_manifests_version"),
        sa.CheckConstraint(
            "source IN ('pinned', 're-pinned', 'update')", name="ck_peer_manifests_source"
        ),
    )


def downgrade() -> None:
    op.drop_table("peer_manifests")
    op.drop_table("key_manifests")
