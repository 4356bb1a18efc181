"""Revocation with a time: suspect marks and resend links on the inbox and outbox.

Revision ID: 0009_revocation
Revises: 0004_exchange (the feature's own line, off the exchange tables it alters)
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from gateway.store.base import UTCDateTime

revision = "0009_revocation"
down_revision = "0004_exchange"
branch_labels = ("revocation",)
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("inbox") as batch:
        batch.add_column(sa.Column("suspect_since", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("replaces", sa.String(64), nullable=True))
        batch.add_column(sa.Column("replaced_by", sa.String(64), nullable=True))
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("signing_key_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("replaces", sa.String(64), nullable=True))
        batch.add_column(sa.Column("replaced_by", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("replaced_by")
        batch.drop_column("replaces")
        batch.drop_column("signing_key_id")
    with op.batch_alter_table("inbox") as batch:
        batch.drop_column("replaced_by")
        batch.drop_column("replaces")
        batch.drop_column("suspect_since")
