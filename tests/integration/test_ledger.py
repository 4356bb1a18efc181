"""The ledger service on SQLite and PostgreSQL: appends, checkpoints, proofs, export, witness."""

from __future__ import annotations

import csv
import io
import itertools
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from gateway.core import merkle
from gateway.core.domain import tagged
from gateway.core.ledger import (
    CheckpointInvalid,
    EntryKind,
    WitnessMismatch,
    parse_entry,
    verify_chain,
)
from gateway.core.roles import Actor, Role
from gateway.errors import InvalidInput, RefusedError, StorageError
from gateway.node import ledger
from gateway.node.ledger import checkpoint as ledger_checkpoint
from gateway.node.ledger import export as ledger_export
from gateway.node.ledger import read as ledger_read
from gateway.node.ledger import verify as ledger_verify
from gateway.node.ledger import witness as ledger_witness
from gateway.store.db import Database, open_database
from gateway.store.models import NodeRecord

T0 = datetime(2026, 11, 25, 21, 0, tzinfo=UTC)
OFFICER = Actor(name="aiko", role=Role.OFFICER)


class RawSigner:
    """A signing key standing in for the node keyring (same sign/key-id contract)."""

    def __init__(self, seed: bytes) -> None:
        self.key = nacl.signing.SigningKey(seed)
        self.signing_key_id = f"key-{seed[:4].hex()}"

    def sign(self, purpose: bytes, payload: bytes) -> bytes:
        return bytes(self.key.sign(tagged(purpose, payload)).signature)


class RawKeys:
    """A key lookup standing in for the key manifest: one signing key."""

    def __init__(self, signer: RawSigner) -> None:
        self.signer = signer

    def signing_key(self, key_id: str, *, at: datetime) -> nacl.signing.VerifyKey:
        if key_id != self.signer.signing_key_id:
            raise InvalidInput(f"unknown key {key_id}")
        return self.signer.key.verify_key


def open_node_db(url: str, node: str) -> Database:
    db = open_database(url)
    db.upgrade()
    with db.transaction() as session:
        session.add(NodeRecord(node_id=node, created_at=T0, software_version="test"))
    return db


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = open_node_db(database_url, "jp")
    yield database
    database.dispose()


def fill(db: Database, count: int, *, start: int = 0, at: datetime | None = None) -> None:
    """Append read entries ``start`` .. ``start + count - 1``, one second apart from
    ``at`` (default: the pinned ``T0`` + ``start`` seconds)."""
    base = at if at is not None else T0 + timedelta(seconds=start)
    with db.transaction() as session:
        for i in range(start, start + count):
            ledger.record_event(
                session,
                kind=EntryKind.BUNDLE_READ,
                actor=OFFICER,
                now=base + timedelta(seconds=i - start),
                bundle_id=f"b-{i % 3}",
                body={"n": i},
            )


def test_entries_are_appended_in_sequence_and_chained(db: Database) -> None:
    fill(db, 5)
    with db.transaction() as session:
        entries = ledger_read.list_entries(session)
    assert [e.seq for e in entries] == [0, 1, 2, 3, 4]
    assert entries[0].prev_hash == bytes(32)
    for before, after in itertools.pairwise(entries):
        assert after.prev_hash == before.entry_hash
    assert entries[3].actor_name == "aiko"
    assert entries[3].actor_role == "officer"
    assert entries[3].time == T0 + timedelta(seconds=3)


def _append_then_fail(db: Database) -> None:
    with db.transaction() as session:
        ledger.record_event(session, kind="bundle-sent", actor=OFFICER, now=T0, bundle_id="x")
        raise RuntimeError("the send failed after the entry was written")


def test_entry_rolls_back_with_the_callers_transaction(db: Database) -> None:
    with pytest.raises(RuntimeError):
        _append_then_fail(db)
    with db.transaction() as session:
        assert ledger_read.list_entries(session) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "made-up"}, "unknown ledger entry kind"),
        ({"kind": "bundle-read", "bundle_id": "has space"}, "bundle_id"),
        ({"kind": "bundle-read", "body": {"x": "y" * 20000}}, "exceeds"),
    ],
    ids=["unknown-kind", "bad-bundle-id", "oversized-body"],
)
def test_bad_event_is_refused_and_nothing_written(
    db: Database, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidInput, match=message), db.transaction() as session:
        ledger.record_event(session, actor=OFFICER, now=T0, **kwargs)  # type: ignore[arg-type]
    with db.transaction() as session:
        assert ledger.ledger_size(session) == 0


def test_list_filters_by_bundle_kind_time_and_limit(db: Database) -> None:
    fill(db, 9)
    with db.transaction() as session:
        ledger.record_event(session, kind="consent-granted", actor=OFFICER, now=T0, consent_id="c1")
        by_bundle = ledger_read.list_entries(session, bundle="b-1")
        by_kind = ledger_read.list_entries(session, kind="consent-granted")
        since = ledger_read.list_entries(session, since=T0 + timedelta(seconds=7))
        limited = ledger_read.list_entries(session, limit=2)
        with pytest.raises(InvalidInput, match="unknown entry kind"):
            ledger_read.list_entries(session, kind="nonsense")
    assert [e.seq for e in by_bundle] == [1, 4, 7]
    assert [e.consent_id for e in by_kind] == ["c1"]
    assert [e.seq for e in since] == [7, 8]
    assert [e.seq for e in limited] == [0, 1]


def test_concurrent_appends_never_share_a_sequence_number(db: Database) -> None:
    errors: list[BaseException] = []

    def worker(offset: int) -> None:
        try:
            for i in range(10):
                with db.transaction() as session:
                    ledger.record_event(
                        session,
                        kind="bundle-read",
                        actor=OFFICER,
                        now=T0,
                        body={"w": offset, "i": i},
                    )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with db.transaction() as session:
        report = ledger_verify.verify_ledger(session)
        assert report.ok, report.problem
        assert report.entries == 40


def test_database_refuses_update_delete_truncate(db: Database) -> None:
    fill(db, 3)
    signer = RawSigner(b"j" * 32)
    with db.transaction() as session:
        signed = ledger_checkpoint.make_checkpoint(session, signer, T0)
        # Witness our own checkpoint as if it came from a peer, to have a row there too.
        ledger_witness.store_peer_checkpoint(
            session, signed.to_wire(), RawKeys(signer), peer_node="jp", now=T0
        )
    for statement in (
        "UPDATE ledger_entry SET kind = 'bundle-sent' WHERE seq = 1",
        "DELETE FROM ledger_entry WHERE seq = 2",
        "UPDATE ledger_checkpoint SET size = 0",
        "DELETE FROM ledger_checkpoint",
        "UPDATE ledger_witnessed SET size = 1",
        "DELETE FROM ledger_witnessed",
    ):
        with (
            pytest.raises((DBAPIError, StorageError), match="append-only"),
            db.transaction() as session,
        ):
            session.execute(text(statement))
    if db.dialect == "postgresql":
        with pytest.raises(DBAPIError, match="append-only"), db.transaction() as session:
            session.execute(text("TRUNCATE ledger_entry"))
    with db.transaction() as session:
        report = ledger_verify.verify_ledger(session, own_keys=RawKeys(signer))
    assert report.ok, report.problem
    assert report.entries == 5


def test_checkpoint_signs_the_root_of_all_entries_and_is_recorded(db: Database) -> None:
    signer = RawSigner(b"j" * 32)
    fill(db, 6)
    with db.transaction() as session:
        signed = ledger_checkpoint.make_checkpoint(session, signer, T0 + timedelta(hours=1))
    with db.transaction() as session:
        entries = ledger_read.list_entries(session)
        report = ledger_verify.verify_ledger(session, own_keys=RawKeys(signer))
    checkpoint = signed.checkpoint
    assert (checkpoint.node, checkpoint.size) == ("jp", 6)
    assert checkpoint.root == merkle.root_from_leaf_hashes(e.leaf_hash for e in entries[:6])
    assert entries[6].kind is EntryKind.CHECKPOINT_MADE
    assert entries[6].body["root"] == checkpoint.root.hex()
    assert report.ok, report.problem
    assert report.checkpoints == 1


def test_checkpoint_of_unchanged_ledger_is_the_same_one(db: Database) -> None:
    signer = RawSigner(b"j" * 32)
    fill(db, 2)
    with db.transaction() as session:
        first = ledger_checkpoint.make_checkpoint(session, signer, T0)
    with db.transaction() as session:
        # Only the checkpoint-made entry was added since: nothing new to sign.
        second = ledger_checkpoint.make_checkpoint(session, signer, T0 + timedelta(minutes=1))
        assert ledger.ledger_size(session) == 3
    assert second == first
    fill(db, 1, start=10)
    with db.transaction() as session:
        third = ledger_checkpoint.make_checkpoint(session, signer, T0 + timedelta(minutes=2))
        assert ledger_checkpoint.latest_checkpoint(session) == third
    assert third.checkpoint.size == 4


def test_checkpoint_refused_over_a_tampered_ledger(db: Database) -> None:
    fill(db, 4)
    _without_triggers(db, "UPDATE ledger_entry SET actor_name = 'mallory' WHERE seq = 2")
    with pytest.raises(Exception, match="entry 2") as info, db.transaction() as session:
        ledger_checkpoint.make_checkpoint(session, RawSigner(b"j" * 32), T0)
    assert getattr(info.value, "check", None) == "entry-hash"
    with db.transaction() as session:
        assert ledger_checkpoint.latest_checkpoint(session) is None


def test_proofs_from_the_database_verify_against_checkpoints(db: Database) -> None:
    signer = RawSigner(b"j" * 32)
    fill(db, 5)
    with db.transaction() as session:
        old = ledger_checkpoint.make_checkpoint(session, signer, T0).checkpoint
    fill(db, 12, start=5)
    with db.transaction() as session:
        new = ledger_checkpoint.make_checkpoint(session, signer, T0 + timedelta(hours=1)).checkpoint
        proof = ledger_checkpoint.consistency_proof(session, old.size, new.size)
        entries = ledger_read.list_entries(session)
        path = ledger_checkpoint.inclusion_proof(session, 3, new.size)
    merkle.verify_consistency(old.size, new.size, old.root, new.root, proof)
    merkle.verify_inclusion(3, new.size, entries[3].leaf_hash, path, new.root)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_export_holds_every_entry_and_can_be_reverified(db: Database, fmt: str) -> None:
    fill(db, 4)
    with db.transaction() as session:
        ledger.record_event(
            session, kind="disclosure-blocked", actor=Actor("=cmd|calc", Role.OFFICER), now=T0
        )
        out = io.BytesIO()
        count = ledger_export.export(session, fmt, out)  # type: ignore[arg-type]
    assert count == 5
    data = out.getvalue().decode("utf-8")
    if fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(data)))
        assert [row["seq"] for row in rows] == ["0", "1", "2", "3", "4"]
        assert rows[4]["actor"] == "'=cmd|calc"  # no spreadsheet formula
        assert json.loads(rows[1]["body"]) == {"n": 1}
    else:
        lines = [json.loads(line) for line in data.splitlines()]
        assert len(lines) == 5
        # The export alone lets anyone recompute the chain.
        parsed = [parse_entry(line["entry"].encode()) for line in lines]
        assert [p.entry_hash.hex() for p in parsed] == [line["entry_hash"] for line in lines]
        for before, after in itertools.pairwise(parsed):
            assert after.prev_hash == before.entry_hash


def test_export_refuses_unknown_format(db: Database) -> None:
    with pytest.raises(InvalidInput, match="csv or jsonl"), db.transaction() as session:
        ledger_export.export(session, "xml", io.BytesIO())  # type: ignore[arg-type]


def _without_triggers(db: Database, *statements: str) -> None:
    """Tamper as the database owner would: switch the append-only triggers off first."""
    with db.engine.begin() as connection:
        if db.dialect == "postgresql":
            connection.execute(text("ALTER TABLE ledger_entry DISABLE TRIGGER USER"))
            connection.execute(text("ALTER TABLE ledger_checkpoint DISABLE TRIGGER USER"))
            connection.execute(text("ALTER TABLE ledger_witnessed DISABLE TRIGGER USER"))
            connection.execute(text("ALTER TABLE ledger_checkpoint_state DISABLE TRIGGER USER"))
        else:
            for name in ("update", "delete"):
                for table in (
                    "ledger_entry",
                    "ledger_checkpoint",
                    "ledger_witnessed",
                    "ledger_checkpoint_state",
                ):
                    connection.execute(text(f"DROP TRIGGER IF EXISTS {table}_no_{name}"))
        for statement in statements:
            connection.execute(text(statement))


# --- witnessing between two nodes ------------------------------------------


def _second_url(engine_name: str, tmp_path: object, factory: object, name: str) -> str:
    if engine_name == "sqlite":
        return f"sqlite:///{tmp_path}/{name}.sqlite3"
    return str(factory())  # type: ignore[operator]


@pytest.fixture
def peer_db(engine_name: str, tmp_path: object, pg_database_factory: object) -> Iterator[Database]:
    database = open_node_db(_second_url(engine_name, tmp_path, pg_database_factory, "peer"), "pk")
    yield database
    database.dispose()


def _answer(peer: Database, first: int) -> ledger_witness.PeerAnswer:
    with peer.transaction() as session:
        latest = ledger_checkpoint.latest_checkpoint(session)
        assert latest is not None
        proof = (
            ledger_checkpoint.consistency_proof(session, first, latest.checkpoint.size)
            if first <= latest.checkpoint.size
            else []
        )
    return ledger_witness.PeerAnswer(checkpoint=latest.to_wire(), proof=proof)


def test_witnessed_peer_checkpoint_is_stored_once_and_recorded(
    db: Database, peer_db: Database
) -> None:
    pk = RawSigner(b"p" * 32)
    fill(peer_db, 3)
    with peer_db.transaction() as session:
        signed = ledger_checkpoint.make_checkpoint(session, pk, T0)
    for _ in range(2):
        with db.transaction() as session:
            stored = ledger_witness.store_peer_checkpoint(
                session, signed.to_wire(), RawKeys(pk), peer_node="pk", now=T0
            )
    assert stored == signed.checkpoint
    with db.transaction() as session:
        received = ledger_read.list_entries(session, kind="checkpoint-received")
        assert ledger_witness.last_witnessed(session, "pk") == signed.checkpoint
        assert ledger_verify.verify_ledger(session, peer_keys=RawKeys(pk), peer_node="pk").ok
    assert len(received) == 1
    assert received[0].body["size"] == 3


@pytest.mark.parametrize("case", ["wrong-key", "wrong-node", "flipped-signature"])
def test_bad_peer_checkpoint_is_refused(db: Database, peer_db: Database, case: str) -> None:
    pk = RawSigner(b"p" * 32)
    fill(peer_db, 2)
    with peer_db.transaction() as session:
        signed = ledger_checkpoint.make_checkpoint(session, pk, T0)
    raw = signed.to_wire()
    keys = RawKeys(pk)
    node = "pk"
    if case == "wrong-key":
        keys = RawKeys(RawSigner(b"q" * 32))
    elif case == "wrong-node":
        node = "jp"
    else:
        doc = json.loads(raw)
        sig = bytearray(signed.signature)
        sig[5] ^= 1
        import base64  # noqa: PLC0415

        doc["signature"] = base64.b64encode(bytes(sig)).decode()
        raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(CheckpointInvalid), db.transaction() as session:
        ledger_witness.store_peer_checkpoint(session, raw, keys, peer_node=node, now=T0)
    with db.transaction() as session:
        assert ledger_witness.last_witnessed(session, "pk") is None


def test_audit_passes_when_peer_history_only_grew(db: Database, peer_db: Database) -> None:
    pk = RawSigner(b"p" * 32)
    fill(peer_db, 3)
    with peer_db.transaction() as session:
        first = ledger_checkpoint.make_checkpoint(session, pk, T0)
    with db.transaction() as session:
        ledger_witness.store_peer_checkpoint(
            session, first.to_wire(), RawKeys(pk), peer_node="pk", now=T0
        )
    fill(peer_db, 20, start=100)
    with peer_db.transaction() as session:
        ledger_checkpoint.make_checkpoint(session, pk, T0 + timedelta(hours=1))
    result = ledger_witness.audit_peer(
        db, RawKeys(pk), peer_node="pk", fetch=lambda n: _answer(peer_db, n), now=lambda: T0
    )
    assert result.consistent
    assert (result.witnessed_size, result.current_size) == (3, 24)
    with db.transaction() as session:
        latest = ledger_witness.last_witnessed(session, "pk")
        assert latest is not None
        assert latest.size == 24


def test_audit_catches_peer_that_rewrote_witnessed_history(
    db: Database, peer_db: Database, engine_name: str, tmp_path: object, pg_database_factory: object
) -> None:
    """The peer's administrator rebuilds its ledger from scratch with one entry changed."""
    pk = RawSigner(b"p" * 32)
    fill(peer_db, 4)
    with peer_db.transaction() as session:
        honest = ledger_checkpoint.make_checkpoint(session, pk, T0)
    with db.transaction() as session:
        ledger_witness.store_peer_checkpoint(
            session, honest.to_wire(), RawKeys(pk), peer_node="pk", now=T0
        )
    # A rebuilt ledger: same key, same length, entry 2 says something else; then it grows.
    rewritten = open_node_db(
        _second_url(engine_name, tmp_path, pg_database_factory, "rewritten"), "pk"
    )
    try:
        with rewritten.transaction() as session:
            for i in range(4):
                body = {"n": i} if i != 2 else {"n": "hidden"}
                ledger.record_event(
                    session,
                    kind="bundle-read",
                    actor=OFFICER,
                    now=T0 + timedelta(seconds=i),
                    bundle_id=f"b-{i % 3}",
                    body=body,
                )
            ledger_checkpoint.make_checkpoint(session, pk, T0)
        fill(rewritten, 5, start=10)
        with rewritten.transaction() as session:
            ledger_checkpoint.make_checkpoint(session, pk, T0 + timedelta(hours=1))
            # The forger's own ledger verifies: only the witness can tell.
            assert ledger_verify.verify_ledger(session, own_keys=RawKeys(pk)).ok
        with pytest.raises(WitnessMismatch, match="rewritten") as info:
            ledger_witness.audit_peer(
                db,
                RawKeys(pk),
                peer_node="pk",
                fetch=lambda n: _answer(rewritten, n),
                now=lambda: T0,
            )
        assert info.value.exit_code == 4
    finally:
        rewritten.dispose()
    with db.transaction() as session:
        equivocations = ledger_read.list_entries(session, kind="equivocation")
        assert ledger_witness.last_witnessed(session, "pk") == honest.checkpoint
    assert len(equivocations) == 1
    assert equivocations[0].body["witnessed_size"] == 4


def test_audit_catches_peer_whose_ledger_shrank(db: Database, peer_db: Database) -> None:
    pk = RawSigner(b"p" * 32)
    fill(peer_db, 2)
    with peer_db.transaction() as session:
        small = ledger_checkpoint.make_checkpoint(session, pk, T0)
    fill(peer_db, 4, start=2)
    with peer_db.transaction() as session:
        big = ledger_checkpoint.make_checkpoint(session, pk, T0)
    with db.transaction() as session:
        ledger_witness.store_peer_checkpoint(
            session, big.to_wire(), RawKeys(pk), peer_node="pk", now=T0
        )
    answer = ledger_witness.PeerAnswer(checkpoint=small.to_wire(), proof=[])
    with pytest.raises(WitnessMismatch, match="shrank"):
        ledger_witness.audit_peer(
            db, RawKeys(pk), peer_node="pk", fetch=lambda _n: answer, now=lambda: T0
        )


def test_stale_peer_checkpoint_is_refused(db: Database, peer_db: Database) -> None:
    pk = RawSigner(b"p" * 32)
    fill(peer_db, 2)
    with peer_db.transaction() as session:
        small = ledger_checkpoint.make_checkpoint(session, pk, T0)
    fill(peer_db, 2, start=2)
    with peer_db.transaction() as session:
        big = ledger_checkpoint.make_checkpoint(session, pk, T0)
    with db.transaction() as session:
        ledger_witness.store_peer_checkpoint(
            session, big.to_wire(), RawKeys(pk), peer_node="pk", now=T0
        )
    with pytest.raises(RefusedError, match="older"), db.transaction() as session:
        ledger_witness.store_peer_checkpoint(
            session, small.to_wire(), RawKeys(pk), peer_node="pk", now=T0
        )


def test_chain_of_stored_rows_verifies_in_core(db: Database) -> None:
    fill(db, 3)
    with db.transaction() as session:
        rows = list(ledger_read.stream_entries(session, ledger_read.select_entries()))
    assert verify_chain(rows) is None


# --- end to end over HTTP: two real nodes serving each other ---------------------


@pytest.mark.slow
def test_audit_over_http_catches_a_peer_that_rewrote_history(tmp_path: Path) -> None:
    """pk's checkpoints are witnessed by jp over HTTP; pk's administrator then rebuilds
    pk's ledger with the real signing key; jp's ``ledger audit-peer`` exits 4."""
    from gateway.node.own_keys import own_manifest  # noqa: PLC0415
    from gateway.settings import load_settings  # noqa: PLC0415
    from tests.nodes import init_pair, stop, wait_ready  # noqa: PLC0415

    nodes = init_pair(tmp_path)
    jp, pk = nodes["jp"], nodes["pk"]
    # The nodes' keys, rows and commands live at the real time: so do the entries and the
    # checkpoint this test writes beside them (a pinned clock would fall outside the keys'
    # validity once the calendar moved on).
    kenji = jp.add_user("kenji", "compliance")
    pk_db = open_database(load_settings(pk.home, environ=pk.env()).database_url)
    serving = [jp.serve(), pk.serve()]
    try:
        for serve in serving:
            wait_ready(serve)
        fill(pk_db, 4, start=0, at=datetime.now(UTC))
        first = pk.run("ledger", "checkpoint", "--send")
        assert first["sent"] is True
        fill(pk_db, 3, start=50, at=datetime.now(UTC))
        pk.run("ledger", "checkpoint")
        grown = jp.run("ledger", "audit-peer", token=kenji)
        assert grown["consistent"] is True
        assert grown["witnessed_size"] == first["size"]
        # The rewrite: triggers off, history replaced, re-signed with pk's own key.
        keyring = pk.keyring()
        _without_triggers(
            pk_db,
            "DELETE FROM ledger_checkpoint",
            "DELETE FROM ledger_checkpoint_state",
            "DELETE FROM ledger_entry",
            "DELETE FROM ledger_state",
        )
        fill(pk_db, 12, start=1000, at=datetime.now(UTC))
        with pk_db.transaction() as session:
            ledger_checkpoint.make_checkpoint(session, keyring, datetime.now(UTC))
            assert ledger_verify.verify_ledger(session, own_keys=own_manifest(session)).ok
        done = run_gateway_json(jp, kenji, "ledger", "audit-peer")
        assert done.returncode == 4, done.stderr
        # Named as a rewrite, a shrink, or (when serve's timed publisher had already
        # given jp a checkpoint of the same size) two different roots for one size.
        assert any(word in done.stderr for word in ("rewritten", "shrank", "equivocation"))
        equivocations = jp.run("ledger", "list", "--kind", "equivocation", token=kenji)
        # The audit records one, under the compliance officer's name; pk's timed
        # publisher may have offered its new checkpoint meanwhile, which jp's
        # witness route records as a second one (by the system).
        assert [e["actor"] for e in equivocations].count("kenji") == 1
        assert all(e["body"]["node"] == "pk" for e in equivocations)
        assert jp.run("ledger", "verify", token=kenji)["intact"] is True
    finally:
        for serve in serving:
            stop(serve)
        pk_db.dispose()


def run_gateway_json(node: Any, token: str, *args: str) -> Any:
    from tests.nodes import run_gateway  # noqa: PLC0415

    return run_gateway(node.home, "--json", *args, env=node.env(token=token))
