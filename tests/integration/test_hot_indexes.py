"""The lookups of the receive and send paths and of the consent check use indexes,
and PostgreSQL transactions start without a ping yet survive a connection the
server dropped.

Query plans are read from each engine (SQLite ``EXPLAIN QUERY PLAN``,
PostgreSQL ``EXPLAIN`` with sequential scans priced out) for the very
statements the node runs, compiled from the same SQLAlchemy expressions.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import Select, event, func, select, text

from gateway.store.db import Database, open_database
from gateway.store.models_consent import ConsentCheckRow, ConsentGrantRecord
from gateway.store.models_exchange import InboxEntry, OutboxEntry, OutboxState

NOW = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)
SHA = "ab" * 32
BUNDLE = "0b8f4f8e-2f7e-4b4e-9a53-0a1d2c3e4f50"

# Each lookup the receive or send path makes, with the index it must use.
# A unique constraint's index is named by the engine (SQLite: sqlite_autoindex_*).
HOT_QUERIES: dict[str, tuple[Select[tuple[object, ...]], tuple[str, ...]]] = {
    "replay check by envelope hash (receive)": (
        select(InboxEntry.receipt).where(InboxEntry.envelope_sha256 == SHA).limit(1),
        ("ix_inbox_envelope_sha256",),
    ),
    "bundle by sender and id (receive)": (
        select(InboxEntry).where(InboxEntry.sender == "jp", InboxEntry.bundle_id == BUNDLE),
        ("uq_inbox_sender_bundle_id", "sqlite_autoindex_inbox", "ix_inbox_bundle_id"),
    ),
    "bundle by id alone (open, show)": (
        select(InboxEntry).where(InboxEntry.bundle_id == BUNDLE),
        ("ix_inbox_bundle_id",),
    ),
    "highest sequence of a channel (receive)": (
        select(func.max(InboxEntry.sequence)).where(InboxEntry.channel == "jp-pk"),
        ("ix_inbox_channel_sequence",),
    ),
    "inbox by case type (list)": (
        select(InboxEntry)
        .where(InboxEntry.case_type == "consultation")
        .order_by(InboxEntry.received_at, InboxEntry.id),
        ("ix_inbox_case_type_received",),
    ),
    "due outbox entries (send)": (
        select(OutboxEntry.id)
        .where(OutboxEntry.state == OutboxState.QUEUED, OutboxEntry.next_attempt_at <= NOW)
        .order_by(OutboxEntry.next_attempt_at),
        ("ix_outbox_state_next_attempt",),
    ),
    "consent check rows by bundle (disclose, the first check of an ask)": (
        select(ConsentCheckRow).where(ConsentCheckRow.bundle_id.in_([BUNDLE, SHA])),
        ("pk_consent_check", "sqlite_autoindex_consent_check"),
    ),
    "received grants by their bundle (a suspect mark's trigger)": (
        select(ConsentGrantRecord.consent_id).where(
            ConsentGrantRecord.bundle_id == BUNDLE, ConsentGrantRecord.granting_node == "pk"
        ),
        ("ix_consent_grant_bundle_id",),
    ),
    "outbox by bundle id (receipt, resend)": (
        select(OutboxEntry).where(OutboxEntry.bundle_id == BUNDLE),
        ("uq_outbox_bundle_id", "sqlite_autoindex_outbox"),
    ),
}


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    db = open_database(database_url)
    db.upgrade()
    try:
        yield db
    finally:
        db.dispose()


def plan(db: Database, query: Select[tuple[object, ...]]) -> str:
    compiled = query.compile(db.engine, compile_kwargs={"literal_binds": True})
    with db.engine.connect() as connection:
        if db.is_sqlite:
            rows = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}").all()
            return "\n".join(str(row[-1]) for row in rows)
        connection.exec_driver_sql("SET enable_seqscan = off")
        rows = connection.exec_driver_sql(f"EXPLAIN {compiled}").all()
        return "\n".join(str(row[0]) for row in rows)


@pytest.mark.parametrize("name", sorted(HOT_QUERIES))
def test_hot_lookups_use_their_index(database: Database, name: str) -> None:
    query, indexes = HOT_QUERIES[name]
    shown = plan(database, query)
    assert any(index in shown for index in indexes), f"{name}: {shown}"
    assert "SCAN inbox\n" not in shown + "\n"
    assert "SCAN outbox\n" not in shown + "\n"
    assert "SCAN consent_check\n" not in shown + "\n"
    assert "SCAN consent_grant\n" not in shown + "\n"
    assert "Seq Scan" not in shown


def test_the_migration_and_the_models_name_the_same_indexes(database: Database) -> None:
    from sqlalchemy import inspect  # noqa: PLC0415

    found = inspect(database.engine)
    for table, model in (
        ("inbox", InboxEntry),
        ("outbox", OutboxEntry),
        ("consent_check", ConsentCheckRow),
        ("consent_grant", ConsentGrantRecord),
    ):
        declared = {index.name for index in model.__table__.indexes}  # type: ignore[attr-defined]
        present = {index["name"] for index in found.get_indexes(table)}
        assert declared <= present, (table, declared - present)


# --- PostgreSQL: no ping per transaction, a dropped connection replaced at start ----


@pytest.mark.postgres
def test_a_terminated_backend_is_replaced_when_the_next_transaction_starts(
    pg_database_factory: object,
) -> None:
    url = pg_database_factory()  # type: ignore[operator]
    db = open_database(url)
    try:
        statements: list[str] = []
        event.listen(
            db.engine,
            "before_cursor_execute",
            lambda _conn, _cursor, statement, *_rest: statements.append(statement),
        )
        with db.transaction() as session:
            first_pid = session.scalar(text("SELECT pg_backend_pid()"))
        assert statements == ["SELECT pg_backend_pid()"]  # nothing sent but the work itself
        with open_database(url).engine.connect() as other:
            assert other.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": first_pid})
            deadline = time.monotonic() + 10
            while other.scalar(
                text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"), {"pid": first_pid}
            ):
                assert time.monotonic() < deadline, "the backend did not end"
                # pg_stat_activity is read once per transaction: end it, so the
                # next look sees the server as it is now, not the first snapshot
                other.rollback()
                time.sleep(0.05)
        statements.clear()
        with db.transaction() as session:
            second_pid = session.scalar(text("SELECT pg_backend_pid()"))
            session.execute(text("CREATE TABLE after_drop (n integer)"))
        assert second_pid != first_pid
        assert statements == ["SELECT pg_backend_pid()", "CREATE TABLE after_drop (n integer)"]
        with db.transaction() as session:
            assert session.scalar(text("SELECT count(*) FROM after_drop")) == 0
    finally:
        db.dispose()


@pytest.mark.postgres
def test_postgres_engine_recycles_instead_of_pinging(pg_database_factory: object) -> None:
    from gateway.store.db import POSTGRES_POOL_RECYCLE_S  # noqa: PLC0415

    db = open_database(pg_database_factory())  # type: ignore[operator]
    try:
        assert db.engine.pool._pre_ping is False  # type: ignore[attr-defined]
        assert db.engine.pool._recycle == POSTGRES_POOL_RECYCLE_S  # type: ignore[attr-defined]
    finally:
        db.dispose()
