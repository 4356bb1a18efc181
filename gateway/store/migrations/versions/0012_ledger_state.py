"""Ledger head state and per-checkpoint Merkle state, backfilled from the entries.

``ledger_state`` (one row) keeps the number of entries, the last entry hash
and the RFC 9162 compact range over all entries, updated by every append in
its own transaction; ``ledger_checkpoint_state`` keeps the compact range at
each checkpoint's size (append-only, like the checkpoints), so a checkpoint
costs O(new entries + log n). The backfill streams existing entries once.

Revision ID: 0012_ledger_state
Revises: 0005_ledger
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from gateway.core import merkle

revision = "0012_ledger_state"
down_revision = "0005_ledger"
branch_labels = ("ledger_state",)
depends_on = None

STATE_ID = 1
APPEND_ONLY = "ledger_checkpoint_state"


def _append_only_triggers() -> list[str]:
    table = APPEND_ONLY
    if op.get_bind().dialect.name == "postgresql":
        # ledger_refuse_change() is created by 0005_ledger.
        return [
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change()",
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change()",
        ]
    return [
        f"CREATE TRIGGER {table}_no_update BEFORE UPDATE ON {table} "
        f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: UPDATE refused'); END",
        f"CREATE TRIGGER {table}_no_delete BEFORE DELETE ON {table} "
        f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: DELETE refused'); END",
    ]


def upgrade() -> None:
    state = op.create_table(
        "ledger_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("head_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("compact", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_ledger_state"),
    )
    checkpoint_state = op.create_table(
        APPEND_ONLY,
        sa.Column("size", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("compact", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("size", name="pk_ledger_checkpoint_state"),
    )
    for statement in _append_only_triggers():
        op.execute(statement)
    # Backfill: one streamed pass over the entries, keeping the compact range at
    # every checkpoint size on the way. Entries are taken as stored; a ledger that
    # was tampered with before the upgrade is found by 'gateway ledger verify'.
    connection = op.get_bind()
    sizes = {
        int(size) for (size,) in connection.execute(sa.text("SELECT size FROM ledger_checkpoint"))
    }
    compact = merkle.CompactRange()
    head_hash = bytes(32)
    at_checkpoints: list[dict[str, object]] = []
    if 0 in sizes:
        at_checkpoints.append({"size": 0, "compact": b""})
    result = connection.execute(
        sa.text("SELECT entry_hash FROM ledger_entry ORDER BY seq").execution_options(
            stream_results=True, yield_per=20_000
        )
    )
    for (value,) in result:
        head_hash = bytes(value)
        compact.append_leaf_hash(merkle.leaf_hash(head_hash))
        if compact.size in sizes:
            at_checkpoints.append({"size": compact.size, "compact": compact.to_bytes()})
    op.bulk_insert(
        state,
        [
            {
                "id": STATE_ID,
                "size": compact.size,
                "head_hash": head_hash,
                "compact": compact.to_bytes(),
            }
        ],
    )
    if at_checkpoints:
        op.bulk_insert(checkpoint_state, at_checkpoints)


def downgrade() -> None:
    op.drop_table(APPEND_ONLY)
    op.drop_table("ledger_state")
