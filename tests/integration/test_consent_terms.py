"""The compact terms record of a grant (migration 0022) and the consent check that reads it.

A consent check reads each grant's terms from ``consent_grant.terms`` instead of
parsing the signed document; the recorded decision parses the document. These
tests check, on both engines, that the two give the same decisions, that a
record that is missing, damaged or bound to other bytes is never used (the
document decides), and that the migration fills the record of existing rows.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, text, update

from gateway.core.consent import (
    MAX_GRANT_BYTES,
    ConsentGrant,
    DisclosureItem,
    GrantTerms,
    decide_disclosure,
    sign_grant,
    terms_from_record,
    terms_record,
)
from gateway.core.roles import SYSTEM
from gateway.errors import InvalidInput
from gateway.node.consent.queries import (
    ConsentStateCache,
    check_consent_states,
    load_consent_states,
)
from gateway.node.consent.records import store_grant
from gateway.store.db import Database
from gateway.store.models_consent import (
    ConsentGrantItem,
    ConsentGrantRecord,
    ConsentRevocationRecord,
)
from tests.consent_store import GRANT_KEY, node_database

T0 = datetime(2026, 11, 25, tzinfo=UTC)
NOW = T0 + timedelta(days=3)
RECIPIENTS = ("Embassy of Example", "  embassy OF  example ", "Press Agency")
PURPOSES = ("visa screening", "Visa Screening", "broker investigation")
KEY = GRANT_KEY


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    with node_database(database_url, created_at=T0) as database:
        yield database


def written_grant(
    items: tuple[str, ...],
    *,
    third_party: str = RECIPIENTS[0],
    purpose: str = PURPOSES[0],
    days: int = 30,
    max_uses: int | None = None,
    start: datetime = T0,
) -> ConsentGrant:
    return ConsentGrant(
        consent_id=str(uuid.uuid4()),
        request_id=str(uuid.uuid4()),
        items=tuple(sorted(items)),
        third_party=third_party,
        purpose=purpose,
        valid_from=start,
        valid_until=start + timedelta(days=days, microseconds=123),
        max_uses=max_uses,
        conditions="",
        granting_officer="bilal",
        granting_node="pk",
        key_id="k-test",
    )


def store(db: Database, written: ConsentGrant) -> None:
    """The grant as a received bundle stores it (``store_grant``: row, items, record, entry)."""
    signed = sign_grant(written, lambda message: KEY.sign(message).signature)
    with db.transaction() as session:
        store_grant(
            session,
            written,
            signed,
            direction="received",
            bundle_id=str(uuid.uuid4()),
            now=T0,
            actor=SYSTEM,
        )


def decide(
    states: list, bundle_ids: list[str], recipient: str, purpose: str, now: datetime = NOW
) -> dict[str, object]:
    return decide_disclosure(
        [DisclosureItem(b, "pk", "confidential") for b in bundle_ids],
        recipient,
        purpose,
        own_node="jp",
        internal_recipients=(),
        consents=states,
        now=now,
    ).to_record()


def recorded_decision(db: Database, bundle_ids: list[str], recipient: str, purpose: str) -> dict:
    """The decision as it is taken under the lock: from the signed documents."""
    with db.transaction() as session:
        states = load_consent_states(session, bundle_ids)
        assert all(isinstance(s.grant, ConsentGrant) for s in states)
        return decide(states, bundle_ids, recipient, purpose)


def set_terms(db: Database, consent_id: str, record: bytes | None) -> None:
    with db.transaction() as session:
        session.execute(
            update(ConsentGrantRecord)
            .where(ConsentGrantRecord.consent_id == consent_id)
            .values(terms=record)
        )


def test_a_stored_grant_carries_a_record_bound_to_its_document(db: Database) -> None:
    written = written_grant(("b-1", "b-2"), max_uses=3)
    store(db, written)
    with db.transaction() as session:
        row = session.get(ConsentGrantRecord, written.consent_id)
        assert row is not None
        assert row.terms is not None
        document, record = bytes(row.document), bytes(row.terms)
    terms = terms_from_record(record, consent_id=written.consent_id, document=document)
    assert terms == written.terms()
    assert (
        terms_from_record(record, consent_id=written.consent_id, document=document + b" ") is None
    )
    assert terms_from_record(record, consent_id="another", document=document) is None


def test_the_check_reads_the_records_and_decides_as_the_documents_do(db: Database) -> None:
    """Differential: random grants, asks, recipients, purposes, revocations and times."""
    rng = random.Random(20261130)
    bundles = [f"b-{n}" for n in range(24)]
    for _ in range(40):
        written = written_grant(
            tuple(rng.sample(bundles, rng.randint(1, 3))),
            third_party=rng.choice(RECIPIENTS[::2]),
            purpose=rng.choice(PURPOSES[::2]),
            days=rng.randint(1, 10),
            max_uses=rng.choice((None, 1, 2)),
            start=T0 + timedelta(days=rng.randint(0, 4)),
        )
        store(db, written)
        if rng.random() < 0.2:
            with db.transaction() as session:
                session.add(
                    ConsentRevocationRecord(
                        consent_id=written.consent_id, direction="received", reason="r",
                        revoking_officer="bilal", revoked_at=T0, bundle_id=str(uuid.uuid4()),
                        actor="system",
                    )
                )  # fmt: skip
    for _ in range(150):
        asked = rng.sample(bundles, rng.randint(1, 3))
        recipient, purpose = rng.choice(RECIPIENTS), rng.choice(PURPOSES)
        checked = check_consent_states(db, asked)
        assert all(isinstance(s.grant, GrantTerms) for s in checked)
        assert decide(checked, asked, recipient, purpose) == recorded_decision(
            db, asked, recipient, purpose
        )
    for moment in (T0 - timedelta(seconds=1), NOW, T0 + timedelta(days=9), T0 + timedelta(days=20)):
        checked = check_consent_states(db, bundles)
        with db.transaction() as session:
            loaded = load_consent_states(session, bundles)
        assert decide(checked, bundles[:1], RECIPIENTS[0], PURPOSES[0], moment) == decide(
            loaded, bundles[:1], RECIPIENTS[0], PURPOSES[0], moment
        )


@pytest.mark.parametrize(
    "damage",
    ["missing", "garbage", "another grant's", "wrong version", "bad time", "bool uses"],
)
def test_a_record_that_is_missing_or_not_bound_to_the_document_is_not_used(
    db: Database, damage: str
) -> None:
    """The document decides: a grant for the Embassy, whatever its record says."""
    written = written_grant(("b-1",))
    other = written_grant(("b-9",), third_party="Press Agency")
    store(db, written)
    store(db, other)
    with db.transaction() as session:
        mine = session.get(ConsentGrantRecord, written.consent_id)
        theirs = session.get(ConsentGrantRecord, other.consent_id)
        assert mine is not None
        assert theirs is not None
        assert mine.terms is not None
        record = bytes(mine.terms)
        records = {
            "missing": None,
            "garbage": b"\xff{not json",
            "another grant's": bytes(theirs.terms or b""),
            "wrong version": record.replace(b"[1,", b"[2,", 1),
            "bad time": record.replace(b"+00:00", b"+09:00", 1),
            "bool uses": record.replace(b",null]", b",true]"),
        }
    (before,) = check_consent_states(db, ["b-1"])
    assert isinstance(before.grant, GrantTerms)  # the record, now kept by the cache
    set_terms(db, written.consent_id, records[damage])
    (state,) = check_consent_states(db, ["b-1"])
    assert isinstance(state.grant, ConsentGrant)  # read from the document
    assert state.grant == written
    for recipient, allowed in ((RECIPIENTS[0], True), ("Press Agency", False)):
        checked = decide([state], ["b-1"], recipient, PURPOSES[0])
        assert checked["allowed"] is allowed
        assert checked == recorded_decision(db, ["b-1"], recipient, PURPOSES[0])


def test_a_replaced_document_is_read_not_its_old_record(db: Database) -> None:
    """The record of the old bytes no longer matches: the new document is parsed."""
    written = written_grant(("b-1",))
    store(db, written)
    (before,) = check_consent_states(db, ["b-1"])  # the record's terms, now kept by the cache
    assert before.grant == written.terms()
    replacement = written_grant(("b-1",), third_party="Press Agency")
    replacement = ConsentGrant(**{**_fields(replacement), "consent_id": written.consent_id})
    signed = sign_grant(replacement, lambda message: KEY.sign(message).signature)
    with db.transaction() as session:
        session.execute(
            update(ConsentGrantRecord)
            .where(ConsentGrantRecord.consent_id == written.consent_id)
            .values(document=signed.document)
        )
    (state,) = check_consent_states(db, ["b-1"])
    assert state.grant == replacement
    assert decide([state], ["b-1"], "Press Agency", PURPOSES[0])["allowed"] is True
    assert decide([state], ["b-1"], RECIPIENTS[0], PURPOSES[0])["allowed"] is False


def test_a_record_the_document_does_not_bear_out_is_never_written() -> None:
    written = written_grant(("b-1",))
    other = written_grant(("b-1",), third_party="Press Agency")
    assert terms_record(written, other.document_bytes()) is None
    assert terms_record(written, written.document_bytes()) is not None


def _fields(grant: ConsentGrant) -> dict[str, object]:
    return {name: getattr(grant, name) for name in ConsentGrant.__dataclass_fields__}


def test_the_migration_fills_the_records_of_existing_grants(database_url: str) -> None:
    """0022_consent_terms: each existing grant gets the record of its own document; a row
    whose document does not read as its grant gets none (and is then parsed, and refused)."""
    from alembic import command  # noqa: PLC0415

    with node_database(database_url, created_at=T0) as db:
        command.downgrade(db.alembic_config(), "0016_consent_generation")
        grants = [written_grant((f"b-{n}",), max_uses=n or None) for n in range(3)]
        with db.engine.begin() as connection:
            for n, written in enumerate(grants):
                signed = sign_grant(written, lambda message: KEY.sign(message).signature)
                document = signed.document if n < 2 else b'{"type": "consent-grant"}'
                connection.execute(
                    text(
                        "INSERT INTO consent_grant (consent_id, request_id, direction, "
                        "granting_node, key_id, document, signature, third_party, purpose, "
                        "valid_from, valid_until, max_uses, bundle_id, recorded_at, actor) "
                        "VALUES (:c, :r, 'received', 'pk', 'k-test', :d, :s, :t, :p, :f, :u, "
                        ":m, :b, :f, 'system')"
                    ),
                    {
                        "c": written.consent_id, "r": written.request_id, "d": document,
                        "s": signed.signature, "t": written.third_party, "p": written.purpose,
                        "f": written.valid_from, "u": written.valid_until,
                        "m": written.max_uses, "b": str(uuid.uuid4()),
                    },
                )  # fmt: skip
                connection.execute(
                    text("INSERT INTO consent_grant_item (consent_id, bundle_id) VALUES (:c, :b)"),
                    {"c": written.consent_id, "b": f"b-{n}"},
                )
        command.upgrade(db.alembic_config(), "heads")
        assert not db.pending_revisions()
        with db.transaction() as session:
            rows = dict(
                session.execute(
                    select(ConsentGrantRecord.consent_id, ConsentGrantRecord.terms)
                ).all()
            )
        for n, written in enumerate(grants[:2]):
            record = rows[written.consent_id]
            assert record is not None
            assert (
                terms_from_record(
                    record, consent_id=written.consent_id, document=written.document_bytes()
                )
                == written.terms()
            )
            (state,) = check_consent_states(db, [f"b-{n}"])
            assert state.grant == written.terms()
        assert rows[grants[2].consent_id] is None
        with pytest.raises(InvalidInput, match="consent grant"):
            check_consent_states(db, ["b-2"])
        command.downgrade(db.alembic_config(), "0016_consent_generation")
        with db.transaction() as session:
            assert session.scalar(select(ConsentGrantItem.bundle_id).limit(1)) is not None
        command.upgrade(db.alembic_config(), "heads")


def test_a_record_of_any_shape_gives_terms_or_none_and_never_raises() -> None:
    written = written_grant(("b-1", "b-2"), max_uses=2)
    document = written.document_bytes()
    record = terms_record(written, document)
    assert record is not None
    good = json.loads(record)
    assert terms_from_record(memoryview(record), consent_id=written.consent_id, document=document)
    assert terms_from_record(record.decode(), consent_id=written.consent_id, document=document)

    def with_field(index: int, value: object) -> bytes:
        changed = list(good)
        changed[index] = value
        return json.dumps(changed).encode()

    shapes: list[object] = [
        None,
        123,
        b"",
        b"[]",
        b"{}",
        b"[" * 5000,
        json.dumps(good[:9]).encode(),
        json.dumps([*good, None]).encode(),
        b" " * (MAX_GRANT_BYTES + 1) + record,
        with_field(0, True),
        with_field(1, "\u00e9" * 64),
        with_field(1, None),
        with_field(3, "xx"),
        with_field(4, "b-1"),
        with_field(4, []),
        with_field(4, ["b-1", 2]),
        with_field(5, ""),
        with_field(6, ["visa"]),
        with_field(7, "2026-11-25T00:00:00Z"),
        with_field(7, good[8]),
        with_field(8, "9999-99-99T00:00:00.000000+00:00"),
        with_field(9, 0),
        with_field(9, 1.5),
    ]
    for shape in shapes:
        assert terms_from_record(shape, consent_id=written.consent_id, document=document) is None


def test_the_cache_keeps_checked_terms_only_for_the_exact_bytes_they_came_from() -> None:
    written = written_grant(("b-1", "b-2"))
    signed = sign_grant(written, lambda message: KEY.sign(message).signature)
    record = terms_record(written, signed.document)
    assert record is not None
    # Bounded by the bytes it keeps: room for two entries of this size.
    cache = ConsentStateCache(max_terms_bytes=2 * (len(record) + len(signed.document)))
    first = cache.terms(written.consent_id, record, signed.document)
    assert first == written.terms()
    assert cache.terms(written.consent_id, bytes(record), bytes(signed.document)) is first
    assert cache.terms(written.consent_id, memoryview(record), signed.document) is first
    # One byte of either differs: checked again, and refused.
    assert cache.terms(written.consent_id, record, signed.document + b" ") is None
    assert (
        cache.terms(written.consent_id, record.replace(b"[1,", b"[2,", 1), signed.document) is None
    )
    assert cache.terms("another", record, signed.document) is None
    # The least recently used entry goes first to make room.
    later = []
    for items in (("b-3",), ("b-4",)):
        grant = written_grant(items)
        grant_signed = sign_grant(grant, lambda message: KEY.sign(message).signature)
        grant_record = terms_record(grant, grant_signed.document)
        assert grant_record is not None
        kept = cache.terms(grant.consent_id, grant_record, grant_signed.document)
        assert kept == grant.terms()
        later.append((grant.consent_id, grant_record, grant_signed.document, kept))
    assert cache.terms(written.consent_id, record, signed.document) is not first  # dropped
    newest = later[-1]
    assert cache.terms(*newest[:3]) is newest[3]  # the newest stayed


def test_parsed_grants_are_kept_within_a_bound_of_their_documents_bytes() -> None:
    """The parsed-grant level counts the bytes of the documents it keeps, not the
    entries: a few large grants cannot make that level hold more than its bound."""
    grants = [written_grant((f"b-{n}",)) for n in range(3)]
    signed = [sign_grant(one, lambda message: KEY.sign(message).signature) for one in grants]
    ids = [one.consent_id for one in grants]
    largest = max(len(one.document) for one in signed)
    cache = ConsentStateCache(max_grant_bytes=2 * largest)
    first = cache.grant(ids[0], signed[0].document)
    assert cache.grant(ids[0], signed[0].document) is first  # kept
    for consent_id, one in zip(ids[1:], signed[1:], strict=True):
        cache.grant(consent_id, one.document)
    again = cache.grant(ids[0], signed[0].document)
    assert again == first
    assert again is not first  # parsed again: it had to go to keep within the bound
    # Least recently used first out: the grant just asked for stays, the older goes.
    second = cache.grant(ids[1], signed[1].document)
    assert cache.grant(ids[0], signed[0].document) is again
    cache.grant(ids[2], signed[2].document)
    assert cache.grant(ids[0], signed[0].document) is again
    assert cache.grant(ids[1], signed[1].document) is not second
