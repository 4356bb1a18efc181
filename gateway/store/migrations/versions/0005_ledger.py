"""Ledger: append-only entry chain, own checkpoints, witnessed peer checkpoints.

The database itself refuses UPDATE and DELETE on the three tables (and
TRUNCATE on PostgreSQL) through triggers created here.

Revision ID: 0005_ledger
Revises: 0001_foundation
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from gateway.store.base import UTCDateTime

revision = "0005_ledger"
down_revision = "0001_foundation"
branch_labels = ("ledger",)
depends_on = None

TABLES = ("ledger_entry", "ledger_checkpoint", "ledger_witnessed")

PG_FUNCTION = """
CREATE FUNCTION ledger_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger table % is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$
"""


def _append_only_triggers(table: str) -> list[str]:
    if op.get_bind().dialect.name == "postgresql":
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
    op.create_table(
        "ledger_entry",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("time", UTCDateTime(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("actor_name", sa.String(128), nullable=False),
        sa.Column("actor_role", sa.String(16), nullable=True),
        sa.Column("bundle_id", sa.String(128), nullable=True),
        sa.Column("consent_id", sa.String(128), nullable=True),
        sa.Column("prev_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("entry_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("canonical", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_ledger_entry"),
        sa.UniqueConstraint("entry_hash", name="uq_ledger_entry_entry_hash"),
    )
    op.create_index("ix_ledger_entry_bundle_id", "ledger_entry", ["bundle_id"])
    op.create_index("ix_ledger_entry_consent_id", "ledger_entry", ["consent_id"])
    op.create_index("ix_ledger_entry_kind_seq", "ledger_entry", ["kind", "seq"])
    op.create_index("ix_ledger_entry_time", "ledger_entry", ["time"])
    op.create_table(
        "ledger_checkpoint",
        sa.Column("size", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("root", sa.LargeBinary(32), nullable=False),
        sa.Column("time", UTCDateTime(), nullable=False),
        sa.Column("key_id", sa.String(128), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("signature", sa.LargeBinary(64), nullable=False),
        sa.PrimaryKeyConstraint("size", name="pk_ledger_checkpoint"),
    )
    op.create_table(
        "ledger_witnessed",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("node", sa.String(8), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("root", sa.LargeBinary(32), nullable=False),
        sa.Column("time", UTCDateTime(), nullable=False),
        sa.Column("key_id", sa.String(128), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("signature", sa.LargeBinary(64), nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_ledger_witnessed"),
        sa.UniqueConstraint("node", "size", name="uq_ledger_witnessed_node"),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_FUNCTION)
    for table in TABLES:
        for statement in _append_only_triggers(table):
            op.execute(statement)


def downgrade() -> None:
    # Dropping a table drops its triggers with it.
    for table in reversed(TABLES):
        op.drop_table(table)
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION ledger_refuse_change()")
