"""Storage on both engines: migrations from empty, and all-or-nothing transactions."""

from __future__ import annotations

import contextlib
import json
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import func, inspect, select, text

from gateway.errors import StorageError
from gateway.store.db import open_database
from gateway.store.models import NodeRecord


def test_migrations_run_up_from_empty(database_url: str) -> None:
    db = open_database(database_url)
    try:
        assert db.current_revisions() == ()
        assert db.pending_revisions()
        applied = db.upgrade()
        assert "0001_foundation" in applied
        assert not db.pending_revisions()
        assert "node" in inspect(db.engine).get_table_names()
        assert db.upgrade() == []  # a second run has nothing to do
    finally:
        db.dispose()


def test_a_failing_transaction_leaves_no_row(database_url: str) -> None:
    db = open_database(database_url)
    try:
        db.upgrade()
        now = datetime(2026, 1, 1, tzinfo=UTC)

        def write_then_crash() -> None:
            with db.transaction() as session:
                session.add(NodeRecord(node_id="jp", created_at=now, software_version="t"))
                session.flush()  # the row reached the database inside the transaction ...
                raise RuntimeError("crash before commit")

        with pytest.raises(RuntimeError):
            write_then_crash()
        with db.transaction() as session:  # ... and is gone after the rollback
            assert session.scalar(select(func.count()).select_from(NodeRecord)) == 0
    finally:
        db.dispose()


def test_times_come_back_aware_and_in_utc(database_url: str) -> None:
    db = open_database(database_url)
    try:
        db.upgrade()
        tokyo = timezone(timedelta(hours=9))
        with db.transaction() as session:
            session.add(
                NodeRecord(
                    node_id="pk",
                    created_at=datetime(2026, 1, 1, 9, tzinfo=tokyo),
                    software_version="t",
                )
            )
        with db.transaction() as session:
            stored = session.scalars(select(NodeRecord)).one().created_at
        assert stored == datetime(2026, 1, 1, 0, tzinfo=UTC)
        assert stored.tzinfo is not None
    finally:
        db.dispose()


def test_naive_times_are_refused(database_url: str) -> None:
    db = open_database(database_url)
    try:
        db.upgrade()
        naive = datetime(2026, 1, 1)

        def write_naive() -> None:
            with db.transaction() as session:
                session.add(NodeRecord(node_id="jp", created_at=naive, software_version="t"))
                session.flush()

        with pytest.raises(Exception, match="naive datetime"):
            write_naive()
    finally:
        db.dispose()


def test_the_read_connection_writes_nothing_and_each_statement_sees_what_was_committed(
    database_url: str,
) -> None:
    db = open_database(database_url)
    try:
        db.upgrade()
        now = datetime(2026, 1, 1, tzinfo=UTC)
        count = "SELECT count(*) FROM node"
        with db.read_connection() as reader:
            cursor = reader.cursor()
            cursor.execute(count)
            assert cursor.fetchone()[0] == 0
            # A commit made between two statements of one read is seen by the second.
            with db.transaction() as session:
                session.add(NodeRecord(node_id="jp", created_at=now, software_version="t"))
            cursor.execute(count)
            assert cursor.fetchone()[0] == 1
            cursor.close()
        insert = (
            "INSERT INTO node (node_id, created_at, software_version) VALUES ('pk', {}, 't')"
        ).format("'2026-01-01 00:00:00.000000'" if db.is_sqlite else "now()")

        def write_through_the_reader() -> None:
            with db.read_connection() as reader:
                reader.cursor().execute(insert)

        # SQLite's query_only and PostgreSQL's default_transaction_read_only refuse it ...
        with pytest.raises(StorageError, match="readonly" if db.is_sqlite else "read-only"):
            write_through_the_reader()
        with db.read_connection() as reader:
            assert not (reader.in_transaction if db.is_sqlite else reader.info.transaction_status)
            cursor = reader.cursor()
            cursor.execute("SELECT node_id FROM node")
            assert [row[0] for row in cursor.fetchall()] == ["jp"]  # ... and nothing was kept
            cursor.close()
    finally:
        db.dispose()


def test_the_read_connection_is_kept_and_replaced_when_the_server_closed_it(
    database_url: str,
) -> None:
    """The read connection is kept across calls (SQLite: one per thread; PostgreSQL: a
    pool of its own); on PostgreSQL one the server terminated is replaced before use,
    and a read that failed on one is a StorageError after which the next read works."""
    db = open_database(database_url)
    try:
        db.upgrade()
        with db.read_connection() as reader:
            first = reader
        with db.read_connection() as reader:
            assert reader is first
        if db.is_sqlite:
            others: list[object] = []

            def read_in_another_thread() -> None:
                with db.read_connection() as reader:
                    others.append(reader)

            worker = threading.Thread(target=read_in_another_thread)
            worker.start()
            worker.join()
            assert len(others) == 1
            assert others[0] is not first
            return
        assert first.autocommit
        terminate = text("SELECT pg_terminate_backend(:pid, 5000)")  # waits for its exit

        # Terminated while idle in the pool: seen at checkout, replaced before use.
        with db.transaction() as session:
            assert session.scalar(terminate, {"pid": first.info.backend_pid})
        with db.read_connection() as reader:
            assert reader is not first
            assert reader.execute("SELECT count(*) FROM node").fetchone() == (0,)
            second = reader

        # Terminated while in use: the read fails as a StorageError; the next gets another.
        def read_through_a_terminated_backend() -> None:
            with db.read_connection() as reader:
                assert reader is second
                with db.transaction() as session:
                    assert session.scalar(terminate, {"pid": reader.info.backend_pid})
                reader.execute("SELECT 1")

        with pytest.raises(StorageError, match="database unavailable"):
            read_through_a_terminated_backend()
        with db.read_connection() as reader:
            assert reader is not second
            assert reader.execute("SELECT 1").fetchone() == (1,)
    finally:
        db.dispose()


def test_the_postgresql_read_connection_keeps_the_connection_parameters(
    pg_database_factory: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read pool connects as the main pool does: options from ``PGOPTIONS`` (a
    statement timeout here) still apply, and ``target_session_attrs=read-write`` (a
    replicated server's primary) still finds the server writable; its transactions
    are read-only all the same."""
    monkeypatch.setenv("PGOPTIONS", "-c statement_timeout=4321")
    database_url = pg_database_factory()
    url = database_url + ("&" if "?" in database_url else "?") + "target_session_attrs=read-write"
    db = open_database(url)
    try:
        db.upgrade()
        with db.read_connection() as reader:
            assert reader.execute("SHOW statement_timeout").fetchone() == ("4321ms",)
            assert reader.execute("SHOW transaction_read_only").fetchone() == ("on",)
        with pytest.raises(StorageError, match="read-only"), db.read_connection() as reader:
            reader.execute("CREATE TABLE read_pool_probe (x int)")
        with db.transaction() as session:
            assert session.scalar(text("SHOW transaction_read_only")) == "off"
            assert session.scalar(text("SHOW statement_timeout")) == "4321ms"
    finally:
        db.dispose()


def test_a_read_connection_that_cannot_be_opened_is_a_storage_error(database_url: str) -> None:
    """A database that does not exist: the read connection's failure to connect is a
    StorageError naming the cause, as every other database failure is."""
    if database_url.startswith("postgresql"):
        base, _, _name = database_url.rpartition("/")
        url = f"{base}/ssw_no_such_database_{uuid.uuid4().hex[:8]}"
        match = "does not exist"
    else:
        url = "sqlite:////nonexistent-directory/node.sqlite3"
        match = "unable to open"
    db = open_database(url)
    try:
        with pytest.raises(StorageError, match=match), db.read_connection():
            pass
        with pytest.raises(StorageError, match=match), db.transaction() as session:
            session.execute(text("SELECT 1"))
        with pytest.raises(StorageError, match=match):
            db.probe()
    finally:
        db.dispose()


@pytest.mark.postgres
def test_a_url_option_the_driver_refuses_is_a_storage_error_on_every_way_in(
    pg_database_factory: Callable[[], str],
) -> None:
    """The driver refuses the option when it connects (a ProgrammingError, not an
    OperationalError): a StorageError naming the option, from a transaction, a read
    connection and the readiness probe alike."""
    db = open_database(f"{pg_database_factory()}?no_such_option=1")
    try:
        with pytest.raises(StorageError, match="no_such_option"), db.transaction() as session:
            session.execute(text("SELECT 1"))  # what every real transaction does first
        with pytest.raises(StorageError, match="no_such_option"), db.read_connection():
            pass
        with pytest.raises(StorageError, match="no_such_option"):
            db.probe()
    finally:
        db.dispose()


def test_a_pool_with_no_free_connection_is_a_storage_error_and_recovers(
    database_url: str,
) -> None:
    """Every connection of the pool held (a node overloaded): a transaction waits the
    pool's timeout, then fails as ``StorageError`` (``storage.busy``, a 503 that
    names the cause) rather than an unexpected error; once one connection is given
    back, transactions run again."""
    from sqlalchemy.exc import TimeoutError as PoolTimeout  # noqa: PLC0415

    # No timed wait: under a shifted test clock (libfaketime) the pool's wait never ends.
    db = open_database(database_url, pool_timeout=0)
    held = []
    try:
        while True:
            try:
                held.append(db.engine.connect())
            except PoolTimeout:
                break
            assert len(held) < 100, "the pool never ran out"
        with pytest.raises(StorageError) as caught, db.transaction() as session:
            session.execute(text("SELECT 1"))
        assert caught.value.reason == "storage.busy"
        assert caught.value.http_status == 503
        assert "became free for this work within 0 s" in caught.value.message
        held.pop().close()
        with db.transaction() as session:
            assert session.execute(text("SELECT 1")).scalar() == 1
        if not db.is_sqlite:  # the consent check's read pool runs out the same way
            with contextlib.ExitStack() as reads:

                def hold_reads() -> None:
                    for _ in range(100):
                        reads.enter_context(db.read_connection())

                with pytest.raises(StorageError) as caught:
                    hold_reads()
                assert caught.value.reason == "storage.busy"
            with db.read_connection() as driver:
                assert driver.execute("SELECT 1").fetchone() == (1,)
    finally:
        for connection in held:
            connection.close()
        db.dispose()


def test_sqlite_runs_in_wal_with_full_sync_and_foreign_keys(tmp_path: object) -> None:
    db = open_database(f"sqlite:///{tmp_path}/x.sqlite3")
    try:
        with db.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        db.dispose()


def test_token_issuer_migration_names_each_existing_tokens_creator(database_url: str) -> None:
    """0020_token_issuer: a token nobody rotated since is the one its creator issued, so
    existing users' approvals under k > 1 wait for their own rotate-token."""
    from alembic import command  # noqa: PLC0415
    from sqlalchemy import text  # noqa: PLC0415

    db = open_database(database_url)
    try:
        db.upgrade()
        command.downgrade(db.alembic_config(), "0020_token_issuer-1")
        now = datetime(2026, 1, 1, tzinfo=UTC)
        with db.engine.begin() as connection:
            for index, (name, by) in enumerate((("admin", "init"), ("asma", "admin"))):
                connection.execute(
                    text(
                        "INSERT INTO users (name, role, token_id, token_hash, created_at, "
                        "created_by, token_issued_at, approver) VALUES (:name, 'officer', "
                        ":token_id, :digest, :now, :by, :now, false)"
                    ),
                    {
                        "name": name,
                        "token_id": f"{index:016x}",
                        "digest": bytes(32),
                        "now": now,
                        "by": by,
                    },
                )
        command.upgrade(db.alembic_config(), "heads")
        with db.engine.connect() as connection:
            rows = connection.execute(text("SELECT name, token_issued_by FROM users")).all()
        assert dict(rows) == {"admin": "init", "asma": "admin"}
    finally:
        db.dispose()


def test_token_custody_migration_gives_every_token_its_possible_holders(
    database_url: str,
) -> None:
    """0021_token_custody: existing users' tokens are held by their creator and issuer,
    and by whoever could hold those users' tokens, repeated to the end; a rotation
    does not take a token out of its issuer's hands. ``init`` is the host operator.
    Existing approvals take their approver's holders."""
    from alembic import command  # noqa: PLC0415
    from sqlalchemy import text  # noqa: PLC0415

    db = open_database(database_url)
    try:
        db.upgrade()
        command.downgrade(db.alembic_config(), "0020_token_issuer")  # 0021 merges two branches
        now = datetime(2026, 1, 1, tzinfo=UTC)
        people = (
            ("admin", "init", "admin"),  # rotated its init token
            ("boss", "admin", "boss"),  # added by admin, rotated
            ("asma", "boss", "asma"),  # added by boss, rotated
            ("bilal", "admin", "init"),  # impossible issuer kept as found
        )
        with db.engine.begin() as connection:
            _insert_users_at_0020(connection, people, now)
            connection.execute(
                text(
                    "INSERT INTO approval_proposal (proposal_id, action, terms_json, terms_hash, "
                    "needed, proposer, created_at, expires_at, state) VALUES ('p1', "
                    "'consent-grant', '{}', :h, 2, 'asma', :now, :now, 'pending')"
                ),
                {"h": "0" * 64, "now": now},
            )
            connection.execute(
                text(
                    "INSERT INTO approval_vote (proposal_id, approver, terms_hash, approved_at) "
                    "VALUES ('p1', 'asma', :h, :now)"
                ),
                {"h": "0" * 64, "now": now},
            )
        command.upgrade(db.alembic_config(), "heads")
        with db.engine.connect() as connection:
            rows = connection.execute(text("SELECT name, token_holders FROM users")).all()
            (vote,) = connection.execute(text("SELECT holders FROM approval_vote")).all()
        held = {name: json.loads(value) for name, value in rows}
        assert held == {
            "admin": ["admin"],
            "boss": ["admin", "boss"],
            "asma": ["admin", "asma", "boss"],
            "bilal": ["admin", "bilal"],
        }
        assert json.loads(vote[0]) == ["admin", "asma", "boss"]
    finally:
        db.dispose()


def test_token_custody_migration_keeps_a_reissuer_the_user_rotated_away_from(
    database_url: str,
) -> None:
    """0021_token_custody reads the ledger's token-reissued entries: eve reissued olga's
    token and rotated it before olga did (so token_issued_by names olga); eve stays a
    holder, and eve's own officer pat never counts beside olga."""
    from alembic import command  # noqa: PLC0415
    from sqlalchemy import text  # noqa: PLC0415

    from gateway.core.roles import Actor, Role  # noqa: PLC0415
    from gateway.node import ledger  # noqa: PLC0415

    db = open_database(database_url)
    try:
        db.upgrade()
        command.downgrade(db.alembic_config(), "0020_token_issuer")  # 0021 merges branches
        now = datetime(2026, 1, 1, tzinfo=UTC)
        people = (
            ("eve", "init", "init"),
            ("bob", "init", "init"),
            ("olga", "bob", "olga"),  # reissued by eve, then rotated
            ("pat", "eve", "eve"),
        )
        with db.engine.begin() as connection:
            _insert_users_at_0020(connection, people, now)
        with db.transaction() as session:
            ledger.record_event(
                session,
                kind="token-reissued",
                actor=Actor(name="eve", role=Role.ADMIN),
                now=now,
                body={"user": "olga", "by": "eve"},
            )
        command.upgrade(db.alembic_config(), "heads")
        with db.engine.connect() as connection:
            rows = connection.execute(text("SELECT name, token_holders FROM users")).all()
        held = {name: json.loads(value) for name, value in rows}
        assert held["olga"] == ["bob", "eve", "olga"]
        assert held["pat"] == ["eve", "pat"]
        assert set(held["olga"]) & set(held["pat"]) == {"eve"}
    finally:
        db.dispose()


def test_a_user_or_approval_written_without_its_token_holders_is_refused(
    database_url: str,
) -> None:
    """After 0021_token_custody no default stands in for the holders: a writer that
    forgets them fails, instead of the row reading as "held by the user alone"."""
    from sqlalchemy import text  # noqa: PLC0415
    from sqlalchemy.exc import IntegrityError  # noqa: PLC0415

    db = open_database(database_url)
    try:
        db.upgrade()
        now = datetime(2026, 1, 1, tzinfo=UTC)
        with pytest.raises(IntegrityError), db.engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO users (name, role, token_id, token_hash, created_at, "
                    "created_by, token_issued_at, token_issued_by, approver) VALUES ('x', "
                    "'officer', '0000000000000001', :digest, :now, 'init', :now, 'init', false)"
                ),
                {"digest": bytes(32), "now": now},
            )
    finally:
        db.dispose()


def _insert_users_at_0020(connection: Any, people: Any, now: datetime) -> None:
    """Users rows as schema 0020 had them: (name, created_by, token_issued_by) each."""
    from sqlalchemy import text  # noqa: PLC0415

    for index, (name, by, issued) in enumerate(people):
        connection.execute(
            text(
                "INSERT INTO users (name, role, token_id, token_hash, created_at, "
                "created_by, token_issued_at, token_issued_by, approver) VALUES "
                "(:name, 'officer', :token_id, :digest, :now, :by, :now, :issued, false)"
            ),
            {
                "name": name,
                "token_id": f"{index:016x}",
                "digest": bytes(32),
                "now": now,
                "by": by,
                "issued": issued,
            },
        )
