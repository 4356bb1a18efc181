"""Foundation: the node identity row.

Revision ID: 0001_foundation
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from gateway.store.base import UTCDateTime

revision = "0001_foundation"
down_revision = None
branch_labels = ("foundation",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "node",
        sa.Column("node_id", sa.String(8), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("software_version", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("node_id", name="pk_node"),
    )


def downgrade() -> None:
    op.drop_table("node")
