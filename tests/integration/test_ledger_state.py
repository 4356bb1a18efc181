"""The incremental Merkle state on SQLite and PostgreSQL: kept, checked, backfilled.

A checkpoint after new entries starts from the previous checkpoint's stored
compact range (checked against its signed root) and the head state the
appends keep; each is checked, and the migration builds both for a ledger
that existed before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from alembic import command
from sqlalchemy import text

from gateway.core import merkle
from gateway.core.ledger import LedgerVerificationFailed
from gateway.node import ledger
from gateway.node.ledger import checkpoint as ledger_checkpoint
from gateway.node.ledger import read as ledger_read
from gateway.node.ledger import verify as ledger_verify
from gateway.node.ledger import witness as ledger_witness
from gateway.store.db import Database
from tests.integration.test_ledger import T0, RawKeys, RawSigner, fill, open_node_db

SIGNER = RawSigner(b"s" * 32)


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = open_node_db(database_url, "jp")
    yield database
    database.dispose()


def _state(db: Database) -> tuple[int, bytes, bytes]:
    with db.transaction() as session:
        head = ledger.read_head(session)
    return head.size, head.head_hash, head.root()


def _entries_root(db: Database) -> tuple[int, bytes, bytes]:
    with db.transaction() as session:
        entries = ledger_read.list_entries(session)
    return (
        len(entries),
        entries[-1].entry_hash if entries else bytes(32),
        merkle.root_from_leaf_hashes(e.leaf_hash for e in entries),
    )


def _checkpoint(db: Database, minutes: int) -> int:
    with db.transaction() as session:
        signed = ledger_checkpoint.make_checkpoint(session, SIGNER, T0 + timedelta(minutes=minutes))
    return signed.checkpoint.size


def _tamper(db: Database, *statements: str) -> None:
    """As the database owner would: the append-only triggers off, then the change."""
    tables = ("ledger_entry", "ledger_checkpoint", "ledger_checkpoint_state")
    with db.engine.begin() as connection:
        for table in tables:
            if db.dialect == "postgresql":
                connection.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER USER"))
            else:
                connection.execute(text(f"DROP TRIGGER IF EXISTS {table}_no_update"))
                connection.execute(text(f"DROP TRIGGER IF EXISTS {table}_no_delete"))
        for statement in statements:
            connection.execute(text(statement))


def test_head_state_follows_every_append_and_checkpoint(db: Database) -> None:
    assert _state(db) == (0, bytes(32), merkle.EMPTY_ROOT)
    fill(db, 7)
    assert _state(db) == _entries_root(db)
    assert _checkpoint(db, 1) == 7
    fill(db, 5, start=100)
    assert _checkpoint(db, 2) == 13
    assert _state(db) == _entries_root(db)
    with db.transaction() as session:
        report = ledger_verify.verify_ledger(session, own_keys=RawKeys(SIGNER))
    assert report.ok, report.problem
    assert report.root == _entries_root(db)[2]


def test_idle_witnessing_is_not_growth(db: Database, database_url: str) -> None:
    """Two nodes must not trade checkpoints forever: received checkpoints are not growth."""
    fill(db, 3)
    size = _checkpoint(db, 1)
    with db.transaction() as session:
        assert not ledger_checkpoint.grew_since(session, size)
        signed = ledger_checkpoint.latest_checkpoint(session)
        assert signed is not None
        # The peer's checkpoint arriving (our own key stands in for the peer's here).
        ledger_witness.store_peer_checkpoint(
            session, signed.to_wire(), RawKeys(SIGNER), peer_node="jp", now=T0
        )
    with db.transaction() as session:
        assert ledger.ledger_size(session) == size + 2  # checkpoint-made, checkpoint-received
        assert not ledger_checkpoint.grew_since(session, size)
    fill(db, 1, start=50)
    with db.transaction() as session:
        assert ledger_checkpoint.grew_since(session, size)


def test_checkpoint_refuses_a_stored_state_that_does_not_fold_to_the_signed_root(
    db: Database,
) -> None:
    fill(db, 6)
    _checkpoint(db, 1)
    fill(db, 2, start=10)
    _tamper(db)
    with db.engine.begin() as connection:
        connection.execute(
            text("UPDATE ledger_checkpoint_state SET compact = :c WHERE size = 6"),
            {"c": b"\x07" * 64},
        )
    with pytest.raises(LedgerVerificationFailed, match="not the signed root"):
        _checkpoint(db, 2)


def test_checkpoint_refuses_a_head_state_out_of_step_with_the_entries(db: Database) -> None:
    fill(db, 4)
    _checkpoint(db, 1)
    fill(db, 3, start=10)
    _tamper(db, "DELETE FROM ledger_entry WHERE seq = 7")
    with pytest.raises(LedgerVerificationFailed, match="head state"):
        _checkpoint(db, 2)
    with db.transaction() as session:
        report = ledger_verify.verify_ledger(session, own_keys=RawKeys(SIGNER))
    assert report.problem is not None
    assert report.problem.check == "chain"
    assert "head state" in report.problem.message


def test_appends_refuse_entries_written_around_the_service(db: Database) -> None:
    fill(db, 3)
    _tamper(db, "DELETE FROM ledger_entry WHERE seq = 2")
    with pytest.raises(Exception, match="head state"):
        fill(db, 1, start=9)


def test_proofs_stream_subtrees_and_match_the_in_memory_ones(db: Database) -> None:
    fill(db, 21)
    with db.transaction() as session:
        leaves = [e.leaf_hash for e in ledger_read.list_entries(session)]
        for old in (1, 4, 7, 16, 21):
            assert ledger_checkpoint.consistency_proof(session, old, 21) == (
                merkle.consistency_proof(old, leaves)
            )
        for index in (0, 5, 20):
            assert ledger_checkpoint.inclusion_proof(session, index, 21) == (
                merkle.inclusion_proof(index, leaves)
            )


def test_migration_backfills_the_state_of_an_existing_ledger(db: Database) -> None:
    fill(db, 9)
    _checkpoint(db, 1)
    fill(db, 4, start=20)
    _checkpoint(db, 2)
    before = _state(db)
    with db.transaction() as session:
        stored = dict(
            session.execute(text("SELECT size, compact FROM ledger_checkpoint_state")).all()
        )
    command.downgrade(db.alembic_config(), "0012_ledger_state-1")
    command.upgrade(db.alembic_config(), "heads")
    assert _state(db) == before
    with db.transaction() as session:
        again = dict(
            session.execute(text("SELECT size, compact FROM ledger_checkpoint_state")).all()
        )
    assert {k: bytes(v) for k, v in again.items()} == {k: bytes(v) for k, v in stored.items()}
    fill(db, 2, start=40)
    assert _checkpoint(db, 3) == _state(db)[0] - 1


def test_verify_takes_every_well_formed_entry_whatever_its_characters(db: Database) -> None:
    """Names, ids and bodies with non-ASCII and escaped characters verify like any other."""
    from gateway.core.roles import Actor, Role  # noqa: PLC0415

    with db.transaction() as session:
        for index, name in enumerate(("Ñoño", 'quo"te\\', "\u2028line", "日本")):
            ledger.record_event(
                session,
                kind="consent-granted",
                actor=Actor(name, Role.OFFICER),
                now=T0 + timedelta(microseconds=index),
                consent_id=f"c-{index}",
                bundle_id=None if index % 2 else "b/1+2=3",
                body={"reason": f"{name}\n\t\x01", "n": [index, None, True]},
            )
    with db.transaction() as session:
        report = ledger_verify.verify_ledger(session)
    assert report.ok, report.problem
    assert report.entries == 4
    assert report.root == _entries_root(db)[2]


@pytest.mark.parametrize("meanwhile", ["an append", "a checkpoint"])
def test_verify_sees_one_moment_while_the_node_appends(db: Database, meanwhile: str) -> None:
    """The running node appends (or checkpoints) after the verify's walk and before it
    reads the head state and the checkpoints: the verify in a snapshot transaction
    (as `ledger verify` and the console run it) is intact on both engines. On
    PostgreSQL a READ COMMITTED transaction would read the newer head state or
    checkpoint beside the older walk and report entries added around the service."""
    fill(db, 5)
    _checkpoint(db, 10)
    fill(db, 3, start=6)
    done: list[int] = []

    def the_node_writes(entries: int) -> None:
        if done:
            return
        done.append(entries)
        if meanwhile == "an append":
            fill(db, 1, start=100)
        else:
            _checkpoint(db, 20)

    def verify(**options: bool) -> ledger_verify.VerifyReport:
        done.clear()
        with db.transaction(**options) as session:
            return ledger_verify.verify_ledger(
                session, own_keys=RawKeys(SIGNER), progress=the_node_writes
            )

    report = verify(snapshot=True)
    assert done, "the walk reported its progress"
    assert report.ok, report.problem
    if db.dialect == "postgresql" and meanwhile == "an append":
        assert not verify().ok  # the same moment, read committed: a false alarm
    with db.transaction(snapshot=True) as session:  # and the ledger is intact
        assert ledger_verify.verify_ledger(session, own_keys=RawKeys(SIGNER)).ok
