"""Small received envelopes kept inline in their inbox row.

Revision ID: 0018_inline_envelopes
Revises: 0014_consent_use (depends on 0004_exchange, which made ``inbox``)
Create Date: 2026-11-30

``inbox.envelope_body`` holds the bytes of an envelope no larger than
``[database] inline_envelope_max_bytes`` (docs/operations.md); NULL means the
envelope is a file in the envelope store, named by ``envelope_sha256``, as
every row made before this revision is. A purge sets it back to NULL in the
transaction that records the purge.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018_inline_envelopes"
down_revision = "0014_consent_use"
branch_labels = ("inline_envelopes",)
depends_on = ("0004_exchange",)


def upgrade() -> None:
    with op.batch_alter_table("inbox") as batch:
        batch.add_column(sa.Column("envelope_body", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("inbox") as batch:
        batch.drop_column("envelope_body")
