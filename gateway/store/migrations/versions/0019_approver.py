"""The approver capability of officers (docs/consent.md, "Approvals": consent grants are approved by
k officers who hold the approver capability).

``users.approver`` is false for every existing and new user unless an
administrator gives it (``gateway users add NAME --role officer --approver``,
``gateway users approver NAME on``).

Revision ID: 0019_approver
Revises: 0002_users
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0019_approver"
# On the users branch (each area of the schema is its own branch from 0001): the
# column belongs to the table 0002 made, and the heads stay one per area.
down_revision = "0002_users"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(
            sa.Column("approver", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_column("approver")
