"""The consent generation and the cached consent states (migration 0016).

A consent check (:func:`check_consent_states`) serves states cached under the
database's consent generation; the database raises the generation in the
transaction of every grant, revocation, use or suspect mark. These tests
write through other connections and another process, on both engines, and
check that the very next check sees it, and that the cache never answers for
a generation other than the one it was filled at.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text, update

from gateway.core.consent import (
    DisclosureItem,
    Missing,
    consent_problem,
    decide_disclosure,
)
from gateway.errors import StorageError
from gateway.node.consent import queries as consent_queries
from gateway.node.consent.queries import (
    ConsentStateCache,
    check_consent_states,
    load_consent_states,
    state_cache,
)
from gateway.store.db import Database, open_database
from gateway.store.models import NodeRecord
from gateway.store.models_consent import (
    CONSENT_GENERATION_ID,
    ConsentGenerationRow,
    ConsentGrantItem,
    ConsentGrantRecord,
    ConsentRevocationRecord,
    ConsentUse,
    DisclosureRecord,
)
from gateway.store.models_exchange import InboxEntry
from tests.consent_store import node_database, signed_grant

T0 = datetime(2026, 11, 25, tzinfo=UTC)
NOW = T0 + timedelta(days=1)
RECIPIENT = "Embassy of Example"
PURPOSE = "visa screening"


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    with node_database(database_url, created_at=T0) as database:
        yield database


def add_grant(db: Database, bundle_id: str, *, max_uses: int | None = None) -> str:
    """A received grant from pk naming ``bundle_id``; returns its consent id."""
    written, signed = signed_grant(
        str(uuid.uuid4()),
        (bundle_id,),
        valid_from=T0,
        third_party=RECIPIENT,
        purpose=PURPOSE,
        max_uses=max_uses,
    )
    with db.transaction() as session:
        session.add(
            ConsentGrantRecord(
                consent_id=written.consent_id,
                request_id=written.request_id,
                direction="received",
                granting_node="pk",
                key_id="k-test",
                document=signed.document,
                signature=signed.signature,
                third_party=RECIPIENT,
                purpose=PURPOSE,
                valid_from=written.valid_from,
                valid_until=written.valid_until,
                max_uses=max_uses,
                bundle_id=str(uuid.uuid4()),
                recorded_at=T0,
                actor="system",
            )
        )
        session.flush()
        session.add(ConsentGrantItem(consent_id=written.consent_id, bundle_id=bundle_id))
    return written.consent_id


def generation(db: Database) -> int:
    with db.transaction() as session:
        return int(
            session.scalar(
                select(ConsentGenerationRow.generation).where(
                    ConsentGenerationRow.id == CONSENT_GENERATION_ID
                )
            )
            or 0
        )


def decide(db: Database, bundle_id: str) -> tuple[bool, list[Missing | None]]:
    states = check_consent_states(db, [bundle_id])
    decision = decide_disclosure(
        [DisclosureItem(bundle_id, "pk", "confidential")],
        RECIPIENT,
        PURPOSE,
        own_node="jp",
        internal_recipients=(),
        consents=states,
        now=NOW,
    )
    problems = [consent_problem(s, recipient=RECIPIENT, purpose=PURPOSE, now=NOW) for s in states]
    return decision.allowed, problems


REVOKE_IN_ANOTHER_PROCESS = textwrap.dedent(
    """
    import sys
    from datetime import UTC, datetime
    from gateway.store.db import open_database
    from gateway.store.models_consent import ConsentRevocationRecord
    db = open_database(sys.argv[1])
    with db.transaction() as session:
        session.add(ConsentRevocationRecord(
            consent_id=sys.argv[2], direction="received", reason="withdrawn",
            revoking_officer="bilal", revoked_at=datetime(2026, 11, 25, 12, tzinfo=UTC),
            bundle_id="revocation-bundle", actor="system"))
    db.dispose()
    """
)


def test_a_revocation_committed_by_another_process_refuses_the_very_next_check(
    db: Database,
) -> None:
    bundle = str(uuid.uuid4())
    consent_id = add_grant(db, bundle)
    assert decide(db, bundle) == (True, [None])
    assert decide(db, bundle) == (True, [None])  # served from the cache now
    before = generation(db)
    subprocess.run(
        [sys.executable, "-c", REVOKE_IN_ANOTHER_PROCESS, db.url, consent_id],
        check=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=120,
    )
    assert generation(db) > before
    assert decide(db, bundle) == (False, [Missing.REVOKED])
    (state,) = check_consent_states(db, [bundle])
    assert state.revoked_at == datetime(2026, 11, 25, 12, tzinfo=UTC)


def test_a_use_or_a_suspect_mark_from_another_connection_is_seen_by_the_next_check(
    db: Database, database_url: str
) -> None:
    bundle = str(uuid.uuid4())
    consent_id = add_grant(db, bundle, max_uses=1)
    assert decide(db, bundle) == (True, [None])
    other = open_database(database_url)  # its own engine and connections
    try:
        with other.transaction() as session:
            session.add(
                DisclosureRecord(
                    disclosure_id="d-1", kind="disclosure-made", allowed=True,
                    recipient=RECIPIENT, purpose=PURPOSE, items_json="[]", decision_json="{}",
                    consent_id=consent_id, decided_at=NOW, actor="officer",
                    ledger_seq=None, ledger_hash=None,
                )
            )  # fmt: skip
            session.flush()
            session.add(
                ConsentUse(consent_id=consent_id, disclosure_id="d-1", used_at=NOW, actor="o")
            )
        assert decide(db, bundle) == (False, [Missing.USES_SPENT])

        second = str(uuid.uuid4())
        add_grant(other, second)
        assert decide(db, second) == (True, [None])
        with db.transaction() as session:
            grant_bundle = session.scalar(
                select(ConsentGrantRecord.bundle_id)
                .join(ConsentGrantItem)
                .where(ConsentGrantItem.bundle_id == second)
            )
        with other.transaction() as session:
            session.add(
                InboxEntry(
                    sender="pk", bundle_id=grant_bundle, channel="consent", sequence=1,
                    case_type="consent-grant", marking="confidential", reply_to=None,
                    signing_key_id="k-test", created_at=T0, received_at=T0,
                    envelope_sha256="ab" * 32, envelope_size=1, receipt=b"r",
                    suspect_since=T0,
                )
            )  # fmt: skip
        assert decide(db, second) == (False, [Missing.SUSPECT])
    finally:
        other.dispose()


def test_the_generation_moves_only_with_what_a_check_reads(db: Database) -> None:
    start = generation(db)
    bundle = str(uuid.uuid4())
    add_grant(db, bundle)
    after_grant = generation(db)
    assert after_grant > start
    with db.transaction() as session:
        session.add(NodeRecord(node_id="xx", created_at=T0, software_version="test"))
    assert generation(db) == after_grant  # other tables do not move it
    with db.transaction() as session:
        session.execute(
            update(ConsentGrantRecord)
            .where(ConsentGrantRecord.consent_id.in_(select(ConsentGrantItem.consent_id)))
            .values(actor="someone else")
        )
    assert generation(db) > after_grant


def test_a_revocation_applied_in_the_deciding_transaction_is_seen_by_it(db: Database) -> None:
    """The recorded decision reads its own transaction, never the cached states."""
    bundle = str(uuid.uuid4())
    consent_id = add_grant(db, bundle)
    assert decide(db, bundle) == (True, [None])  # cached now
    with db.transaction() as session:
        session.add(
            ConsentRevocationRecord(
                consent_id=consent_id, direction="received", reason="withdrawn",
                revoking_officer="bilal", revoked_at=T0, bundle_id="r", actor="system",
            )
        )  # fmt: skip
        session.flush()
        (state,) = load_consent_states(session, [bundle])
        assert state.revoked_at == T0
        session.rollback()
    assert decide(db, bundle) == (True, [None])  # rolled back: still granted


def test_the_cache_never_serves_states_after_the_generation_moved(db: Database) -> None:
    bundle = str(uuid.uuid4())
    add_grant(db, bundle)
    cache = state_cache(db.engine)
    (first,) = check_consent_states(db, [bundle])
    held = cache.generation
    assert held == generation(db)
    assert cache.states(held, [bundle], began=time.monotonic()) == {bundle: (first,)}
    (again,) = check_consent_states(db, [bundle])
    assert again is first  # the same generation: the cached state itself

    # Move the generation by hand, as a writer elsewhere would: the next check reads again.
    with db.transaction() as session:
        session.execute(
            text("UPDATE consent_generation SET generation = generation + 1 WHERE id = 1")
        )
    (fresh,) = check_consent_states(db, [bundle])
    assert fresh is not first
    assert fresh == first  # nothing else changed
    assert cache.generation == held + 1
    # The same grant document is not parsed again across generations.
    assert fresh.grant is first.grant


def test_states_read_at_an_old_generation_are_not_kept_after_it_moved() -> None:
    cache = ConsentStateCache()
    assert cache.states(5, ["b"], began=time.monotonic()) == {}
    cache.store(5, {"b": ()})
    assert cache.states(5, ["b"], began=time.monotonic()) == {"b": ()}
    assert cache.states(6, ["b"], began=time.monotonic()) == {}  # moved: everything dropped
    cache.store(5, {"b": ()})  # a reader that started before the move
    assert cache.states(6, ["b"], began=time.monotonic()) == {}


def test_a_late_check_at_an_older_generation_does_not_take_the_cache_back() -> None:
    """Thread B's statement began before thread A read generation 7 and cached; B then
    asks at 6: B finds nothing, and A's states stay."""
    cache = ConsentStateCache()
    began_b = time.monotonic()
    cache.states(7, (), began=time.monotonic())  # thread A
    cache.store(7, {"b": ()})
    assert cache.states(6, ["b"], began=began_b) == {}
    cache.store(6, {"b": (), "c": ()})  # B's rows, read at 6, are not kept
    assert cache.generation == 7
    assert cache.states(7, ["b", "c"], began=time.monotonic()) == {"b": ()}


def test_a_database_that_went_back_is_never_served_states_kept_under_a_reused_number() -> None:
    """A restore into the running node's database: a statement that began after the
    cache took 100 reads 50, so the database went back; when its number climbs to 100
    again, nothing kept under the old 100 is served."""
    cache = ConsentStateCache()
    cache.states(100, (), began=time.monotonic())
    cache.store(100, {"bundle-x": ()})
    assert cache.states(50, ["bundle-x"], began=time.monotonic()) == {}
    assert cache.generation == 50
    assert cache.states(100, ["bundle-x"], began=time.monotonic()) == {}


def test_a_stored_document_naming_another_consent_is_refused(db: Database) -> None:
    bundle = str(uuid.uuid4())
    consent_id = add_grant(db, bundle)
    other_bundle = str(uuid.uuid4())
    other_id = add_grant(db, other_bundle)
    with db.transaction() as session:
        document = session.scalar(
            select(ConsentGrantRecord.document).where(ConsentGrantRecord.consent_id == other_id)
        )
        session.execute(
            update(ConsentGrantRecord)
            .where(ConsentGrantRecord.consent_id == consent_id)
            .values(document=document)
        )
    with pytest.raises(StorageError, match="another consent's document"):
        check_consent_states(db, [bundle])


def test_a_check_reads_the_generation_and_any_uncached_rows_in_one_statement(
    tmp_path: Path,
) -> None:
    """First check of a bundle: one statement (generation and rows at one snapshot);
    a check served from the cache: one (the generation); after the generation moved:
    two (the generation, then the rows). Counted on SQLite's read connection."""
    with node_database(f"sqlite:///{tmp_path / 'node.sqlite3'}", created_at=T0) as db:
        first = add_grant(db, "b-1")
        statements: list[str] = []
        reader = db._sqlite_reader()
        reader.set_trace_callback(statements.append)
        try:
            (state,) = check_consent_states(db, ["b-1"])
            assert state.consent_id == first
            assert len(statements) == 1, statements
            assert "UNION ALL" in statements[0]
            assert state_cache(db.engine).generation == generation(db)

            statements.clear()
            assert check_consent_states(db, ["b-1"]) == [state]
            assert len(statements) == 1, statements
            assert "UNION ALL" not in statements[0]

            second = add_grant(db, "b-1")  # moves the generation
            statements.clear()
            moved = check_consent_states(db, ["b-1"])
            assert sorted(s.consent_id for s in moved) == sorted([first, second])
            assert len(statements) == 2, statements

            # A bundle not cached beside a cached one: one statement reads both again.
            add_grant(db, "b-2")
            check_consent_states(db, ["b-1"])
            statements.clear()
            both = check_consent_states(db, ["b-1", "b-2"])
            assert len(both) == 3
            assert len(statements) == 1, statements
        finally:
            reader.set_trace_callback(None)


def test_an_empty_ask_reads_nothing_on_a_new_cache(db: Database) -> None:
    """No bundle asked, before any check filled the cache: no rows, no statement with an
    empty IN list (which PostgreSQL refuses)."""
    add_grant(db, "b-1")
    assert state_cache(db.engine).generation is None
    assert check_consent_states(db, []) == []
    (state,) = check_consent_states(db, ["b-1"])
    assert check_consent_states(db, []) == []
    assert check_consent_states(db, ["b-1"]) == [state]


def test_an_ask_past_one_statement_reads_every_chunk(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks of ``_MAX_ASK`` ids: the first read with the generation, the others after
    it; every bundle's consents come back, as the recorded decision reads them, when
    nothing is cached, when part is, and after the generation moved."""
    monkeypatch.setattr(consent_queries, "_MAX_ASK", 2)
    bundles = [f"b-{n}" for n in range(5)]
    first, last = add_grant(db, "b-0"), add_grant(db, "b-4")
    both = add_grant(db, "b-2")

    def recorded(asked: list[str]) -> list[str]:
        with db.transaction() as session:
            return [s.consent_id for s in load_consent_states(session, asked)]

    checked = [s.consent_id for s in check_consent_states(db, bundles)]
    assert checked == sorted([first, last, both]) == recorded(bundles)
    assert [s.consent_id for s in check_consent_states(db, ["b-4", "b-9"])] == [last]
    assert [s.consent_id for s in check_consent_states(db, bundles)] == recorded(bundles)
    moved = add_grant(db, "b-3")
    checked = [s.consent_id for s in check_consent_states(db, bundles)]
    assert checked == sorted([first, last, both, moved]) == recorded(bundles)
