"""Consent generation: one counter moved by every change a consent check reads.

``consent_generation`` (one row) holds a number that the database itself
raises, in the writing transaction, whenever a row of ``consent_grant``,
``consent_grant_item``, ``consent_revocation`` or ``consent_use`` is inserted,
updated or deleted, and whenever an ``inbox`` row's suspect mark, bundle id
or sender changes (a grant from a bundle marked suspect authorises nothing).
A consent check reads it first and serves states it cached only while it is
unchanged (:mod:`gateway.node.consent.queries`), so a revocation committed by
any connection or process is seen by the very next check.

On SQLite the triggers run at once (writers are serialised by ``BEGIN
IMMEDIATE``). On PostgreSQL they are deferred constraint triggers: the row is
updated at commit, when the writer already holds every other lock it takes,
so two writers never wait on each other through the counter.

Revision ID: 0016_consent_generation
Revises: 0014_consent_use, 0007_consent, 0009_revocation
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016_consent_generation"
# After the consent tables (0007, 0014) and the inbox's suspect mark (0009), which
# the triggers watch: a merge point rather than ``depends_on``, so that the heads the
# database records stay the heads of the scripts (``Database.pending_revisions``).
down_revision = ("0014_consent_use", "0007_consent", "0009_revocation")
branch_labels = ("consent_generation",)
depends_on = None

TABLE = "consent_generation"
ROW_ID = 1
CONSENT_TABLES = ("consent_grant", "consent_grant_item", "consent_revocation", "consent_use")
_BUMP = f"UPDATE {TABLE} SET generation = generation + 1 WHERE id = {ROW_ID}"  # noqa: S608
_INBOX_CHANGES = {
    # operation -> the condition under which an inbox row can change a consent's state
    "INSERT": "NEW.suspect_since IS NOT NULL",
    "DELETE": "OLD.suspect_since IS NOT NULL",
}
_INBOX_UPDATE_SQLITE = (
    "OLD.suspect_since IS NOT NEW.suspect_since OR OLD.bundle_id IS NOT NEW.bundle_id "
    "OR OLD.sender IS NOT NEW.sender"
)
_INBOX_UPDATE_POSTGRESQL = (
    "OLD.suspect_since IS DISTINCT FROM NEW.suspect_since "
    "OR OLD.bundle_id IS DISTINCT FROM NEW.bundle_id OR OLD.sender IS DISTINCT FROM NEW.sender"
)


def _sqlite_triggers() -> list[str]:
    statements = []
    for table in CONSENT_TABLES:
        for operation in ("INSERT", "UPDATE", "DELETE"):
            name = f"{table}_{operation.lower()}_generation"
            statements.append(
                f"CREATE TRIGGER {name} AFTER {operation} ON {table} BEGIN {_BUMP}; END"
            )
    for operation, condition in _INBOX_CHANGES.items():
        statements.append(
            f"CREATE TRIGGER inbox_{operation.lower()}_generation AFTER {operation} ON inbox "
            f"WHEN {condition} BEGIN {_BUMP}; END"
        )
    statements.append(
        "CREATE TRIGGER inbox_update_generation AFTER UPDATE ON inbox "
        f"WHEN {_INBOX_UPDATE_SQLITE} BEGIN {_BUMP}; END"
    )
    return statements


def _postgresql_triggers() -> list[str]:
    statements = [
        "CREATE FUNCTION consent_generation_bump() RETURNS trigger LANGUAGE plpgsql AS $$ "
        f"BEGIN {_BUMP}; RETURN NULL; END $$"
    ]
    for table in CONSENT_TABLES:
        statements.append(
            f"CREATE CONSTRAINT TRIGGER {table}_generation AFTER INSERT OR UPDATE OR DELETE "
            f"ON {table} DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
            "EXECUTE FUNCTION consent_generation_bump()"
        )
    for operation, condition in _INBOX_CHANGES.items():
        statements.append(
            f"CREATE CONSTRAINT TRIGGER inbox_{operation.lower()}_generation AFTER {operation} "
            f"ON inbox DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN ({condition}) "
            "EXECUTE FUNCTION consent_generation_bump()"
        )
    statements.append(
        "CREATE CONSTRAINT TRIGGER inbox_update_generation AFTER UPDATE ON inbox "
        f"DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN ({_INBOX_UPDATE_POSTGRESQL}) "
        "EXECUTE FUNCTION consent_generation_bump()"
    )
    return statements


def _trigger_names() -> list[tuple[str, str]]:
    if op.get_bind().dialect.name == "postgresql":
        names = [(f"{table}_generation", table) for table in CONSENT_TABLES]
    else:
        names = [
            (f"{table}_{operation}_generation", table)
            for table in CONSENT_TABLES
            for operation in ("insert", "update", "delete")
        ]
    return names + [
        (f"inbox_{operation}_generation", "inbox") for operation in ("insert", "delete", "update")
    ]


def upgrade() -> None:
    table = op.create_table(
        TABLE,
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=f"pk_{TABLE}"),
    )
    op.bulk_insert(table, [{"id": ROW_ID, "generation": 0}])
    postgresql = op.get_bind().dialect.name == "postgresql"
    for statement in _postgresql_triggers() if postgresql else _sqlite_triggers():
        op.execute(statement)


def downgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    for name, table in _trigger_names():
        op.execute(f"DROP TRIGGER {name} ON {table}" if postgresql else f"DROP TRIGGER {name}")
    if postgresql:
        op.execute("DROP FUNCTION consent_generation_bump()")
    op.drop_table(TABLE)
