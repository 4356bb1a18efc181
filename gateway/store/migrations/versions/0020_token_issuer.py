"""Who issued each user's current token (docs/consent.md, "Approvals": under k > 1 an
approval counts only when the approver's token was issued by the approver themself).

``users.token_issued_by`` names the user that issued the token in use: the
administrator who added the user or reissued the token (``gateway users add``,
``gateway users new-token``), or the user themself after ``gateway users
rotate-token``. Existing rows take ``created_by``: a token no one rotated since
is the one its creator issued.

Revision ID: 0020_token_issuer
Revises: 0019_approver
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0020_token_issuer"
down_revision = "0019_approver"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("token_issued_by", sa.String(64), nullable=True))
    op.execute("UPDATE users SET token_issued_by = created_by")
    with op.batch_alter_table("users") as batch:
        batch.alter_column("token_issued_by", existing_type=sa.String(64), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_column("token_issued_by")
