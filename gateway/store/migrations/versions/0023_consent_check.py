"""Consent check rows: what a consent check reads, one row per (bundle, received consent).

``consent_check`` holds, for every bundle id a received grant names, exactly
what the first consent check of that bundle reads (docs/consent.md, "How a
check stays fast"): the grant's signed document and terms record (the record
is used only while bound to the document, as before), the revocation time,
the number of uses spent and whether the grant's bundle is marked suspect.
A check then reads one indexed range of one table instead of joining each
item to its grant, revocation, uses and inbox row.

The database keeps the rows itself: triggers on ``consent_grant``,
``consent_grant_item``, ``consent_revocation``, ``consent_use`` and ``inbox``
rewrite the rows they touch in the writing statement's transaction, from the
base tables (never from the row before), so no commit can leave a row that
disagrees with the tables it is read from. The decision that is recorded
still reads the base tables and the signed documents
(:func:`gateway.node.consent.queries.load_consent_states`).

On SQLite writers are serialised (``BEGIN IMMEDIATE``). On PostgreSQL
(READ COMMITTED) each trigger first takes the ledger's append lock
(``pg_advisory_xact_lock``, the key of :mod:`gateway.node.ledger`), which
every consent writer already holds or takes before it commits: a row written
from a snapshot that missed a concurrent revocation, use or suspect mark
would otherwise survive both commits.

Existing rows are filled here from the base tables; downgrade drops the
triggers, the table and the index the suspect triggers look grants up with.

Revision ID: 0023_consent_check
Revises: 0022_consent_terms
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0023_consent_check"
down_revision = "0022_consent_terms"
branch_labels = None
depends_on = None

TABLE = "consent_check"
LEDGER_LOCK_KEY = 109109981947084722
"""``gateway.node.ledger._LOCK_KEY`` as it is today (a test holds the two equal)."""
_COLUMNS = "bundle_id, consent_id, document, terms, revoked_at, uses, suspect"
_ROWS = (
    "SELECT i.bundle_id, g.consent_id, g.document, g.terms, r.revoked_at,"
    " (SELECT count(*) FROM consent_use u WHERE u.consent_id = g.consent_id),"
    " EXISTS (SELECT 1 FROM inbox x WHERE x.bundle_id = g.bundle_id"
    " AND x.sender = g.granting_node AND x.suspect_since IS NOT NULL)"
    " FROM consent_grant g JOIN consent_grant_item i ON i.consent_id = g.consent_id"
    " LEFT OUTER JOIN consent_revocation r ON r.consent_id = g.consent_id"
    " WHERE g.direction = 'received'"
)
"""Every (bundle, received consent) row as the base tables give it (the same
joins as the check read before this table, ``_STATES_SQL``)."""


def _insert(condition: str) -> str:
    return f"INSERT INTO {TABLE} ({_COLUMNS}) {_ROWS} AND {condition}"


def _revoked(consent: str) -> str:
    return (
        f"UPDATE {TABLE} SET revoked_at = (SELECT r.revoked_at FROM consent_revocation r"  # noqa: S608
        f" WHERE r.consent_id = {TABLE}.consent_id) WHERE consent_id = {consent}"
    )


def _uses(consent: str) -> str:
    return (
        f"UPDATE {TABLE} SET uses = (SELECT count(*) FROM consent_use u"  # noqa: S608
        f" WHERE u.consent_id = {TABLE}.consent_id) WHERE consent_id = {consent}"
    )


def _suspect(row: str) -> str:
    """Recompute the suspect flag of the grants that arrived in inbox row ``row`` (NEW or OLD)."""
    return (
        f"UPDATE {TABLE} SET suspect = EXISTS (SELECT 1 FROM consent_grant g"  # noqa: S608
        " JOIN inbox x ON x.bundle_id = g.bundle_id AND x.sender = g.granting_node"
        f" WHERE g.consent_id = {TABLE}.consent_id AND x.suspect_since IS NOT NULL)"
        f" WHERE consent_id IN (SELECT g.consent_id FROM consent_grant g"
        f" WHERE g.bundle_id = {row}.bundle_id AND g.granting_node = {row}.sender)"
    )


def _drop_grant(row: str) -> str:
    return f"DELETE FROM {TABLE} WHERE consent_id = {row}.consent_id"  # noqa: S608


def _drop_item(row: str) -> str:
    return (
        f"DELETE FROM {TABLE} WHERE consent_id = {row}.consent_id"  # noqa: S608
        f" AND bundle_id = {row}.bundle_id"
    )


def _add_grant(row: str) -> str:
    return _insert(f"g.consent_id = {row}.consent_id")


def _add_item(row: str) -> str:
    return _insert(f"g.consent_id = {row}.consent_id AND i.bundle_id = {row}.bundle_id")


# table -> (statements for an OLD row, statements for a NEW row); an update runs both.
_CHANGES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "consent_grant": ((_drop_grant("OLD"),), (_add_grant("NEW"),)),
    "consent_grant_item": ((_drop_item("OLD"),), (_add_item("NEW"),)),
    "consent_revocation": ((_revoked("OLD.consent_id"),), (_revoked("NEW.consent_id"),)),
    "consent_use": ((_uses("OLD.consent_id"),), (_uses("NEW.consent_id"),)),
    "inbox": ((_suspect("OLD"),), (_suspect("NEW"),)),
}
# inbox rows change often (delivery state); only these changes can move a suspect flag.
_INBOX_WHEN = {
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
_OPERATIONS = ("INSERT", "UPDATE", "DELETE")


def _sqlite_triggers() -> list[str]:
    statements = []
    for table, (old, new) in _CHANGES.items():
        for operation in _OPERATIONS:
            body = (() if operation == "INSERT" else old) + (() if operation == "DELETE" else new)
            when = ""
            if table == "inbox":
                condition = _INBOX_WHEN.get(operation, _INBOX_UPDATE_SQLITE)
                when = f" WHEN {condition}"
            statements.append(
                f"CREATE TRIGGER {table}_{operation.lower()}_{TABLE} AFTER {operation} ON {table}"
                f"{when} BEGIN {'; '.join(body)}; END"
            )
    return statements


def _postgresql_triggers() -> list[str]:
    statements = []
    for table, (old, new) in _CHANGES.items():
        function = f"{TABLE}_{table}"
        statements.append(
            f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"PERFORM pg_advisory_xact_lock({LEDGER_LOCK_KEY}); "
            f"IF TG_OP IN ('UPDATE', 'DELETE') THEN {'; '.join(old)}; END IF; "
            f"IF TG_OP IN ('INSERT', 'UPDATE') THEN {'; '.join(new)}; END IF; "
            "RETURN NULL; END $$"
        )
        if table == "inbox":
            for operation in _OPERATIONS:
                condition = _INBOX_WHEN.get(operation, _INBOX_UPDATE_POSTGRESQL)
                statements.append(
                    f"CREATE TRIGGER inbox_{operation.lower()}_{TABLE} AFTER {operation} ON inbox "
                    f"FOR EACH ROW WHEN ({condition}) EXECUTE FUNCTION {function}()"
                )
        else:
            statements.append(
                f"CREATE TRIGGER {table}_{TABLE} AFTER INSERT OR UPDATE OR DELETE ON {table} "
                f"FOR EACH ROW EXECUTE FUNCTION {function}()"
            )
    return statements


def _drop_triggers(postgresql: bool) -> list[str]:
    statements = []
    for table in _CHANGES:
        if postgresql and table != "inbox":
            names = [f"{table}_{TABLE}"]
        else:
            names = [f"{table}_{operation.lower()}_{TABLE}" for operation in _OPERATIONS]
        statements += [
            f"DROP TRIGGER {name} ON {table}" if postgresql else f"DROP TRIGGER {name}"
            for name in names
        ]
        if postgresql:
            statements.append(f"DROP FUNCTION {TABLE}_{table}()")
    return statements


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("bundle_id", sa.String(128), nullable=False),
        sa.Column("consent_id", sa.String(128), nullable=False),
        sa.Column("document", sa.LargeBinary(), nullable=False),
        sa.Column("terms", sa.LargeBinary(), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.Column("suspect", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("bundle_id", "consent_id", name=f"pk_{TABLE}"),
    )
    op.create_index(f"ix_{TABLE}_consent_id", TABLE, ["consent_id"])
    postgresql = op.get_bind().dialect.name == "postgresql"
    if postgresql:
        # An earlier migration of the same run (0022's fill) may have left deferred
        # generation triggers pending on consent_grant, which forbids indexing it:
        # they fire now, and the rest of this transaction's fire at once (the
        # generation moves all the same).
        op.execute("SET CONSTRAINTS ALL IMMEDIATE")
    op.create_index("ix_consent_grant_bundle_id", "consent_grant", ["bundle_id"])
    if postgresql:
        # No write to a table the rows are made from between the fill's snapshot and
        # the triggers (a node is stopped to upgrade, but nothing relies on it).
        op.execute(f"LOCK TABLE {', '.join(_CHANGES)} IN SHARE ROW EXCLUSIVE MODE")
    op.execute(_insert("1 = 1"))
    for statement in _postgresql_triggers() if postgresql else _sqlite_triggers():
        op.execute(statement)


def downgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    if postgresql:
        op.execute("SET CONSTRAINTS ALL IMMEDIATE")  # as in upgrade, before touching the tables
    for statement in _drop_triggers(postgresql):
        op.execute(statement)
    op.drop_index("ix_consent_grant_bundle_id", table_name="consent_grant")
    op.drop_index(f"ix_{TABLE}_consent_id", table_name=TABLE)
    op.drop_table(TABLE)
