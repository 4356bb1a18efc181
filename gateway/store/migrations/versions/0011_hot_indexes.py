"""Indexes for the lookups on the receive and send paths.

Without them each received bundle scanned the whole inbox twice (the replay
check by envelope hash; the lookups by bundle id alone), and the outbox's due
queue scanned by state without its next-attempt time.

Revision ID: 0011_hot_indexes
Revises: 0009_revocation (its own line, off the exchange tables it indexes,
as 0009 is: after the revocation columns, whose SQLite table rebuild would
otherwise run after these indexes)
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

revision = "0011_hot_indexes"
down_revision = "0009_revocation"
branch_labels = ("hot_indexes",)
depends_on = None

INDEXES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("ix_inbox_envelope_sha256", "inbox", ("envelope_sha256",)),
    ("ix_inbox_bundle_id", "inbox", ("bundle_id",)),
    ("ix_inbox_case_type_received", "inbox", ("case_type", "received_at", "id")),
    ("ix_outbox_state_next_attempt", "outbox", ("state", "next_attempt_at")),
)
"""(name, table, columns); the same indexes are declared on the models."""


def upgrade() -> None:
    for name, table, columns in INDEXES:
        op.create_index(name, table, list(columns))


def downgrade() -> None:
    for name, table, _ in reversed(INDEXES):
        op.drop_index(name, table_name=table)
