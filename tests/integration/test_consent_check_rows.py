"""The consent check rows (migration 0023): kept by the database, equal to the base tables.

A consent check reads ``consent_check``, one row per (bundle, received consent)
with the grant's document and terms record, revocation time, uses and suspect
mark; triggers write it in the transaction of every change to the tables it is
derived from. These tests, on both engines, change those tables at random
through every kind of write (insert, update, delete; grants, items,
revocations, uses, inbox rows) and check after each that the rows are exactly
what the base tables give; that the migration fills the rows of an existing
database and goes down and up again; and, on PostgreSQL, that a revocation
committed while a grant is being stored is not lost.
"""

from __future__ import annotations

import importlib.util
import random
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from sqlalchemy import delete, insert, select, text, update

from gateway.core.consent import terms_record
from gateway.node import ledger
from gateway.node.consent.queries import (
    _stored_time,
    check_consent_states,
    load_consent_states,
)
from gateway.store.db import Database, open_database
from gateway.store.models_consent import (
    ConsentCheckRow,
    ConsentGrantItem,
    ConsentGrantRecord,
    ConsentRevocationRecord,
    ConsentUse,
    DisclosureRecord,
)
from gateway.store.models_exchange import InboxEntry
from tests.consent_store import node_database, signed_grant

T0 = datetime(2026, 11, 25, tzinfo=UTC)
MIGRATION = Path(__file__).parents[2] / "gateway/store/migrations/versions/0023_consent_check.py"

# What the check's rows must be: every (bundle, received consent) pair from the base tables.
EXPECTED_SQL = (
    "SELECT i.bundle_id, g.consent_id, g.document, g.terms, r.revoked_at,"
    " (SELECT count(*) FROM consent_use u WHERE u.consent_id = g.consent_id),"
    " (SELECT count(*) FROM inbox x WHERE x.bundle_id = g.bundle_id"
    " AND x.sender = g.granting_node AND x.suspect_since IS NOT NULL)"
    " FROM consent_grant_item i JOIN consent_grant g ON g.consent_id = i.consent_id"
    " LEFT OUTER JOIN consent_revocation r ON r.consent_id = g.consent_id"
    " WHERE g.direction = 'received'"
)
STORED_SQL = (
    "SELECT bundle_id, consent_id, document, terms, revoked_at, uses, suspect FROM consent_check"
)


def _migration() -> ModuleType:
    spec = importlib.util.spec_from_file_location("migration_0023", MIGRATION)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    with node_database(database_url, created_at=T0) as database:
        yield database


def _time(value: Any) -> datetime | None:
    """A stored time as the check reads it (SQLite: text; PostgreSQL: aware)."""
    return _stored_time(value)


def rows(db: Database, sql: str) -> set[tuple[object, ...]]:
    """(bundle, consent, document, terms, revoked at, uses, suspect) as comparable values."""
    with db.engine.connect() as connection:
        found = connection.exec_driver_sql(sql).all()
    return {
        (b, c, bytes(d), None if t is None else bytes(t), _time(r), int(u), bool(s))
        for b, c, d, t, r, u, s in found
    }


def assert_rows_match(db: Database) -> set[tuple[object, ...]]:
    expected = rows(db, EXPECTED_SQL)
    assert rows(db, STORED_SQL) == expected
    return expected


def grant_row(
    consent_id: str, items: tuple[str, ...], *, direction: str = "received", purpose: str = "visa"
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    written, signed = signed_grant(
        consent_id, items, valid_from=T0, third_party="Embassy of Example", purpose=purpose
    )
    row = {
        "consent_id": consent_id, "request_id": written.request_id, "direction": direction,
        "granting_node": "pk", "key_id": "k-test", "document": signed.document,
        "signature": signed.signature, "third_party": written.third_party,
        "purpose": written.purpose, "valid_from": T0, "valid_until": written.valid_until,
        "max_uses": None, "bundle_id": f"gb-{consent_id}", "recorded_at": T0, "actor": "system",
        "terms": terms_record(written, signed.document),
    }  # fmt: skip
    return row, [{"consent_id": consent_id, "bundle_id": b} for b in written.items]


def inbox_row(bundle_id: str, *, suspect: bool, sender: str = "pk") -> dict[str, Any]:
    return {
        "sender": sender, "bundle_id": bundle_id, "channel": "consent",
        "sequence": random.randrange(1, 10**9), "case_type": "consent-grant",
        "marking": "confidential", "reply_to": None, "signing_key_id": "k-test",
        "created_at": T0, "received_at": T0, "envelope_sha256": uuid.uuid4().hex * 2,
        "envelope_size": 1, "receipt": b"r", "suspect_since": T0 if suspect else None,
    }  # fmt: skip


class World:
    """Random writes of every kind to the tables the check rows are derived from."""

    def __init__(self, db: Database, rng: random.Random) -> None:
        self.db, self.rng = db, rng
        self.bundles = [f"b-{n}" for n in range(12)]
        self.grants: list[str] = []
        self.uses: list[int] = []
        self.inbox: list[tuple[str, str]] = []

    def step(self) -> str:
        kind = self.rng.choice(
            [
                "grant", "grant", "item", "drop item", "move item", "replace document",
                "direction", "drop grant", "revoke", "unrevoke", "re-revoke", "use", "unuse",
                "move use", "inbox", "mark", "unmark", "rekey inbox", "drop inbox",
            ]
        )  # fmt: skip
        if kind != "grant" and not self.grants:
            kind = "grant"
        with self.db.transaction() as session:
            getattr(self, "_" + kind.replace(" ", "_").replace("-", "_"))(session)
        return kind

    def _pick(self) -> str:
        return self.rng.choice(self.grants)

    def _grant(self, session: Any) -> None:
        consent_id = str(uuid.uuid4())
        row, items = grant_row(
            consent_id,
            tuple(self.rng.sample(self.bundles, self.rng.randint(1, 3))),
            direction=self.rng.choice(("received", "received", "issued")),
        )
        session.execute(insert(ConsentGrantRecord), [row])
        session.execute(insert(ConsentGrantItem), items)
        self.grants.append(consent_id)

    def _item(self, session: Any) -> None:
        session.execute(
            text(
                "INSERT INTO consent_grant_item (consent_id, bundle_id) VALUES (:c, :b) "
                "ON CONFLICT DO NOTHING"
            ),
            {"c": self._pick(), "b": self.rng.choice(self.bundles)},
        )

    def _drop_item(self, session: Any) -> None:
        consent_id = self._pick()
        session.execute(
            delete(ConsentGrantItem).where(
                ConsentGrantItem.consent_id == consent_id,
                ConsentGrantItem.bundle_id == self.rng.choice(self.bundles),
            )
        )

    def _move_item(self, session: Any) -> None:
        session.execute(
            text(
                "UPDATE consent_grant_item SET bundle_id = :new WHERE consent_id = :c "
                "AND bundle_id = (SELECT min(bundle_id) FROM consent_grant_item WHERE "
                "consent_id = :c) AND NOT EXISTS (SELECT 1 FROM consent_grant_item "
                "WHERE consent_id = :c AND bundle_id = :new)"
            ),
            {"c": self._pick(), "new": f"b-moved-{self.rng.randrange(4)}"},
        )

    def _replace_document(self, session: Any) -> None:
        consent_id = self._pick()
        row, _items = grant_row(consent_id, ("b-0",), purpose="broker investigation")
        values = {"document": row["document"]}
        if self.rng.random() < 0.5:
            values["terms"] = row["terms"]
        session.execute(
            update(ConsentGrantRecord)
            .where(ConsentGrantRecord.consent_id == consent_id)
            .values(**values)
        )

    def _direction(self, session: Any) -> None:
        session.execute(
            update(ConsentGrantRecord)
            .where(ConsentGrantRecord.consent_id == self._pick())
            .values(direction=self.rng.choice(("received", "issued")))
        )

    def _drop_grant(self, session: Any) -> None:
        consent_id = self._pick()
        session.execute(delete(ConsentUse).where(ConsentUse.consent_id == consent_id))
        session.execute(delete(ConsentGrantItem).where(ConsentGrantItem.consent_id == consent_id))
        session.execute(
            delete(ConsentGrantRecord).where(ConsentGrantRecord.consent_id == consent_id)
        )
        self.grants.remove(consent_id)

    def _revoke(self, session: Any) -> None:
        session.execute(
            text(
                "INSERT INTO consent_revocation (consent_id, direction, reason, "
                "revoking_officer, revoked_at, bundle_id, actor) VALUES (:c, 'received', 'r', "
                "'bilal', :t, 'rb', 'system') ON CONFLICT DO NOTHING"
            ),
            {"c": self._pick(), "t": T0 + timedelta(hours=self.rng.randrange(48))},
        )

    def _unrevoke(self, session: Any) -> None:
        session.execute(
            delete(ConsentRevocationRecord).where(
                ConsentRevocationRecord.consent_id == self._pick()
            )
        )

    def _re_revoke(self, session: Any) -> None:
        session.execute(
            update(ConsentRevocationRecord)
            .where(ConsentRevocationRecord.consent_id == self._pick())
            .values(revoked_at=T0 + timedelta(days=3))
        )

    def _use(self, session: Any) -> None:
        disclosure_id = str(uuid.uuid4())
        consent_id = self._pick()
        session.add(
            DisclosureRecord(
                disclosure_id=disclosure_id, kind="disclosure-made", allowed=True,
                recipient="r", purpose="p", items_json="[]", decision_json="{}",
                consent_id=consent_id, decided_at=T0, actor="o", ledger_seq=None,
                ledger_hash=None,
            )
        )  # fmt: skip
        session.flush()
        use = ConsentUse(consent_id=consent_id, disclosure_id=disclosure_id, used_at=T0, actor="o")
        session.add(use)
        session.flush()
        self.uses.append(use.id)

    def _unuse(self, session: Any) -> None:
        if self.uses:
            use_id = self.uses.pop(self.rng.randrange(len(self.uses)))
            session.execute(delete(ConsentUse).where(ConsentUse.id == use_id))

    def _move_use(self, session: Any) -> None:
        if self.uses:
            session.execute(
                update(ConsentUse)
                .where(ConsentUse.id == self.rng.choice(self.uses))
                .values(consent_id=self._pick())
            )

    def _inbox(self, session: Any) -> None:
        key = (self.rng.choice(("pk", "jp")), f"gb-{self._pick()}")
        if key not in self.inbox:
            session.execute(
                insert(InboxEntry),
                [inbox_row(key[1], sender=key[0], suspect=self.rng.random() < 0.5)],
            )
            self.inbox.append(key)

    def _mark(self, session: Any, value: datetime | None = T0) -> None:
        if self.inbox:
            sender, bundle_id = self.rng.choice(self.inbox)
            session.execute(
                update(InboxEntry)
                .where(InboxEntry.sender == sender, InboxEntry.bundle_id == bundle_id)
                .values(suspect_since=value)
            )

    def _unmark(self, session: Any) -> None:
        self._mark(session, None)

    def _rekey_inbox(self, session: Any) -> None:
        if self.inbox:
            index = self.rng.randrange(len(self.inbox))
            sender, bundle_id = self.inbox[index]
            new = (sender, f"gb-{self._pick()}")
            if new not in self.inbox:
                session.execute(
                    update(InboxEntry)
                    .where(InboxEntry.sender == sender, InboxEntry.bundle_id == bundle_id)
                    .values(bundle_id=new[1])
                )
                self.inbox[index] = new

    def _drop_inbox(self, session: Any) -> None:
        if self.inbox:
            sender, bundle_id = self.inbox.pop(self.rng.randrange(len(self.inbox)))
            session.execute(
                delete(InboxEntry).where(
                    InboxEntry.sender == sender, InboxEntry.bundle_id == bundle_id
                )
            )


def test_every_write_leaves_the_rows_the_base_tables_give(db: Database) -> None:
    """Differential: 250 random writes of every kind; after each, stored == derived."""
    world = World(db, random.Random(20261130))
    kinds: set[str] = set()
    found: set[tuple[object, ...]] = set()
    for _ in range(250):
        kinds.add(world.step())
        found |= assert_rows_match(db)
    assert len(kinds) == 18  # every kind of write ran
    # and the rows went through every state the check reads
    assert any(r[4] is not None for r in found)
    assert any(r[5] > 0 for r in found)
    assert any(r[6] for r in found)


def test_the_check_reads_the_rows_and_the_recorded_decision_the_base_tables(
    db: Database,
) -> None:
    world = World(db, random.Random(7))
    for _ in range(40):
        world.step()
    asked = world.bundles
    with db.transaction() as session:
        recorded = load_consent_states(session, asked)
    checked = check_consent_states(db, asked)
    assert [(s.consent_id, s.revoked_at, s.uses_spent, s.suspect) for s in checked] == [
        (s.consent_id, s.revoked_at, s.uses_spent, s.suspect) for s in recorded
    ]
    assert recorded
    # Rows taken away behind the triggers' back: the check sees no consent (and so
    # allows nothing); the recorded decision still reads the grants.
    with db.engine.begin() as connection:
        connection.execute(delete(ConsentCheckRow))
    with db.engine.begin() as connection:  # a new generation: the cached states go
        connection.execute(text("UPDATE consent_generation SET generation = generation + 1"))
    assert check_consent_states(db, asked) == []
    with db.transaction() as session:
        assert len(load_consent_states(session, asked)) == len(recorded)


def test_the_migration_fills_the_rows_and_goes_down_and_up(database_url: str) -> None:
    from alembic import command  # noqa: PLC0415

    with node_database(database_url, created_at=T0) as db:
        command.downgrade(db.alembic_config(), "0022_consent_terms")
        world = World(db, random.Random(3))
        for _ in range(60):
            world.step()
        with db.engine.connect() as connection:
            before = connection.exec_driver_sql(EXPECTED_SQL).all()
        assert before
        command.upgrade(db.alembic_config(), "heads")
        assert not db.pending_revisions()
        filled = assert_rows_match(db)
        assert len(filled) == len(before)
        for _ in range(20):
            world.step()
            assert_rows_match(db)
        command.downgrade(db.alembic_config(), "0022_consent_terms")
        for _ in range(20):
            world.step()  # no triggers left behind that name a dropped table
        command.upgrade(db.alembic_config(), "heads")
        assert_rows_match(db)


def test_the_triggers_take_the_ledger_lock_of_today() -> None:
    assert _migration().LEDGER_LOCK_KEY == ledger._LOCK_KEY


def test_every_trigger_is_in_place_at_the_head(database_url: str, db: Database) -> None:
    """A later migration that rebuilt one of the five tables (SQLite rebuilds a table
    to alter it) would drop its triggers, and the rows would go stale unnoticed; on
    PostgreSQL every trigger function takes today's ledger lock."""
    migration = _migration()
    postgresql = database_url.startswith("postgresql")
    expected = {
        statement.split()[2]
        for statement in (
            migration._postgresql_triggers() if postgresql else migration._sqlite_triggers()
        )
        if statement.startswith("CREATE TRIGGER")
    }
    assert len(expected) == (4 + 3 if postgresql else 15)  # 3 on inbox, by operation
    with db.transaction() as session:
        if postgresql:
            present = set(
                session.scalars(text("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal"))
            )
            bodies = list(
                session.scalars(
                    text(
                        "SELECT pg_get_functiondef(p.oid) FROM pg_proc p"
                        " WHERE p.proname LIKE 'consent_check_%'"
                    )
                )
            )
            assert len(bodies) == len(migration._CHANGES)
            assert all(f"pg_advisory_xact_lock({ledger._LOCK_KEY})" in body for body in bodies)
        else:
            present = set(
                session.scalars(text("SELECT name FROM sqlite_master WHERE type = 'trigger'"))
            )
    assert expected <= present, expected - present


@pytest.mark.postgres
@pytest.mark.parametrize("engine_name", ["postgresql"])  # SQLite serialises its writers
def test_a_revocation_committed_while_a_grant_is_stored_is_kept(
    database_url: str, db: Database
) -> None:
    """PostgreSQL, READ COMMITTED: the revocation's trigger waits for the grant's
    transaction (the ledger lock) and then sees its rows; without the lock the grant's
    rows, written from a snapshot without the revocation, would stay unrevoked."""
    consent_id = str(uuid.uuid4())
    row, items = grant_row(consent_id, ("b-1",))
    other = open_database(database_url)
    done = threading.Event()
    failure: list[BaseException] = []

    def revoke() -> None:
        try:
            with other.engine.begin() as connection:
                connection.execute(
                    insert(ConsentRevocationRecord),
                    [
                        {
                            "consent_id": consent_id, "direction": "received", "reason": "r",
                            "revoking_officer": "bilal", "revoked_at": T0, "bundle_id": "rb",
                            "actor": "system",
                        }
                    ],
                )  # fmt: skip
        except BaseException as exc:
            failure.append(exc)
        finally:
            done.set()

    try:
        with db.engine.begin() as connection:
            connection.execute(insert(ConsentGrantRecord), [row])
            connection.execute(insert(ConsentGrantItem), items)
            worker = threading.Thread(target=revoke)
            worker.start()
            # Held by the grant's transaction: seen as the revocation waiting for a lock
            # (polled; a timed wait meant to run out does not end under a shifted clock).
            deadline = time.monotonic() + 30
            while not _waiting_for_a_lock(db) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _waiting_for_a_lock(db), "the revocation never waited for the grant"
            assert not done.is_set()
        worker.join(30)
        assert done.is_set()
        assert not failure
        with db.engine.connect() as connection:
            stored = connection.execute(
                select(ConsentCheckRow.revoked_at).where(ConsentCheckRow.consent_id == consent_id)
            ).all()
        assert [r[0] for r in stored] == [T0]
        assert_rows_match(db)
    finally:
        other.dispose()


def _waiting_for_a_lock(db: Database) -> bool:
    """Whether another session of this database waits for a lock (PostgreSQL)."""
    with db.engine.connect() as connection:
        return bool(
            connection.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock'"
                )
            )
        )
