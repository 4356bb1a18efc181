"""The ledger service. This module is its append seam; the rest sits beside it.

* here: :func:`record_event` and :func:`append_entries` append in the
  caller's transaction, :func:`lock_for_append` serialises appenders,
  :func:`ledger_size` and :func:`read_head` read the head state;
* :mod:`.group`: the group-commit appender for independent concurrent appends;
* :mod:`.read`: listing and streaming entries;
* :mod:`.checkpoint`: signing checkpoints (incrementally) and Merkle proofs;
* :mod:`.verify`: ``ledger verify``;
* :mod:`.export`: CSV and JSON Lines export;
* :mod:`.witness`: keeping the peer's checkpoints and auditing the peer.

Appends are serialised: on SQLite every transaction is ``BEGIN IMMEDIATE``
(one writer at a time); on PostgreSQL :func:`lock_for_append` takes a
transaction-scoped advisory lock, so the head is read and written under it.
The primary key on ``seq`` and the unique entry hash are the last guard: two
appends that raced past both would collide and one would roll back.

Each append also updates the one ``ledger_state`` row (size, last hash and
the RFC 9162 compact range) in the same transaction, so the ledger's root is
an O(log n) fold at any time (docs/ledger.md, "Incremental Merkle state").

**One lock and one head read per transaction.** The first append (or
:func:`lock_for_append`) in a transaction takes the lock and reads the head;
the transaction then remembers both (in ``session.info``), so further appends
in it cost only their writes (a received batch appends all its entries with one
:func:`append_entries` call).
What is remembered belongs to the innermost transaction it was made in and
holds there and in the savepoints below it; once that savepoint ends (its
appends may have rolled back) the next append locks and reads again. On
PostgreSQL the lock and the head read go out in one pipeline (one round trip,
with the ``BEGIN``), and an append's rows and its head state are written by
one statement: a multi-row ``INSERT`` from arrays inside a CTE beside the
``UPDATE`` of ``ledger_state``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, func, select, text
from sqlalchemy.orm import Session, SessionTransaction

from gateway.core import merkle
from gateway.core.ledger import (
    GENESIS_PREV_HASH,
    EntryKind,
    LedgerEntry,
    format_time,
    make_entry,
)
from gateway.core.roles import Actor
from gateway.errors import StorageError
from gateway.node.crash import crash_point
from gateway.store.models_ledger import LEDGER_STATE_ID, LedgerEntryRow, LedgerStateRow

__all__ = [
    "Event",
    "Head",
    "append_entries",
    "ledger_size",
    "lock_for_append",
    "read_head",
    "record_event",
]

_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"ssw-gateway/ledger-append").digest()[:8], "big", signed=True
)
_ENTRY_TABLE = cast(Table, LedgerEntryRow.__table__)
_STATE_TABLE = cast(Table, LedgerStateRow.__table__)

# Statements of the append path, built once (both engines accept this SQL).
_PG_LOCK_SQL = f"SELECT pg_advisory_xact_lock({_LOCK_KEY})"
_HEAD_AND_LAST_SQL = (
    "SELECT s.size, s.head_hash, s.compact, "  # noqa: S608 - constants only
    "(SELECT e.seq FROM ledger_entry e ORDER BY e.seq DESC LIMIT 1), "
    "(SELECT e.entry_hash FROM ledger_entry e ORDER BY e.seq DESC LIMIT 1) "
    f"FROM ledger_state s WHERE s.id = {LEDGER_STATE_ID}"
)
"""The head state and the last entry, in one statement (one snapshot)."""
_INSERT_ENTRIES = _ENTRY_TABLE.insert()
_UPDATE_STATE = (
    _STATE_TABLE.update()
    .where(_STATE_TABLE.c.id == LEDGER_STATE_ID)
    .values(
        size=bindparam("new_size"),
        head_hash=bindparam("new_head_hash"),
        compact=bindparam("new_compact"),
    )
)
_PG_APPEND = text(
    "WITH appended AS ("  # noqa: S608 - constants only
    " INSERT INTO ledger_entry (seq, time, kind, actor_name, actor_role, bundle_id,"
    " consent_id, prev_hash, entry_hash, canonical)"
    " SELECT r.seq, r.time, r.kind, r.actor_name, r.actor_role, r.bundle_id, r.consent_id,"
    " decode(r.prev_hash, 'hex'), decode(r.entry_hash, 'hex'), decode(r.canonical, 'hex')"
    " FROM json_to_recordset(CAST(:rows AS JSON)) AS r(seq BIGINT, time TIMESTAMPTZ,"
    " kind VARCHAR, actor_name VARCHAR, actor_role VARCHAR, bundle_id VARCHAR,"
    " consent_id VARCHAR, prev_hash TEXT, entry_hash TEXT, canonical TEXT)"
    " ORDER BY r.seq)"
    " UPDATE ledger_state SET size = :new_size, head_hash = :new_head_hash,"
    f" compact = :new_compact WHERE id = {LEDGER_STATE_ID}"
)
"""PostgreSQL: a batch's rows and the head state in one statement, one round trip.

The rows travel as one JSON array (bytes as hex, times as the entry's own
UTC text): a single parameter the driver passes as it is, and a statement
text that never changes, so the server keeps it prepared.
"""

_JSON_ROWS = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))
_SCOPE_KEY = "gateway.ledger.append_scope"


@dataclass(frozen=True, slots=True)
class Event:
    """One entry to append, before it has a sequence number (see :func:`make_entry`)."""

    kind: EntryKind | str
    actor: Actor
    now: datetime
    bundle_id: str | None = None
    consent_id: str | None = None
    body: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Head:
    """The ledger head as ``ledger_state`` records it."""

    size: int
    """Number of entries, which is the next sequence number."""
    head_hash: bytes
    """Entry hash of entry ``size - 1`` (32 zero bytes for an empty ledger)."""
    compact: merkle.CompactRange
    """RFC 9162 compact range over all ``size`` entries."""

    def root(self) -> bytes:
        return self.compact.root()


@dataclass(frozen=True, slots=True)
class _AppendScope:
    """What a transaction knows while it holds the append lock."""

    transaction: SessionTransaction
    """The innermost transaction (or savepoint) this was learnt in."""
    head: Head | None
    """The head after this transaction's last append (None: not read yet)."""


def _innermost(session: Session) -> SessionTransaction | None:
    return session.get_nested_transaction() or session.get_transaction()


def _scope(session: Session) -> _AppendScope | None:
    """The remembered lock and head, if they hold in the current (sub)transaction."""
    scope = cast(_AppendScope | None, session.info.get(_SCOPE_KEY))
    if scope is None:
        return None
    current = _innermost(session)
    while current is not None:
        if current is scope.transaction:
            return scope if current.is_active else None
        current = current.parent
    return None


def _remember(session: Session, head: Head | None) -> None:
    transaction = _innermost(session)
    if transaction is not None:
        session.info[_SCOPE_KEY] = _AppendScope(transaction, head)


def _is_postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def lock_for_append(session: Session) -> None:
    """Serialise appends: an advisory lock on PostgreSQL; SQLite's BEGIN IMMEDIATE suffices.

    Taken once per transaction: a second call (or an append) in the same
    transaction sends nothing. The lock is released when the transaction ends.
    """
    if _scope(session) is not None:
        return
    if _is_postgresql(session):
        session.execute(text(_PG_LOCK_SQL))
    _remember(session, None)


def _rebuild_head(session: Session) -> Head:
    """The head recomputed from every entry (streamed): for a state row that is missing."""
    compact = merkle.CompactRange()
    head_hash = GENESIS_PREV_HASH
    result = session.connection().execute(
        select(LedgerEntryRow.entry_hash)
        .order_by(LedgerEntryRow.seq)
        .execution_options(yield_per=20_000, stream_results=True)
    )
    for (value,) in result:
        head_hash = bytes(value)
        compact.append_leaf_hash(merkle.leaf_hash(head_hash))
    return Head(compact.size, head_hash, compact)


def _head_from_state(size: int, head_hash: bytes, compact: bytes) -> Head:
    try:
        compact_range = merkle.CompactRange.restore(size, compact)
    except ValueError as exc:
        raise StorageError(
            f"the ledger head state is malformed ({exc}); run 'gateway ledger verify'"
        ) from None
    if len(head_hash) != merkle.HASH_SIZE:
        raise StorageError("the ledger head state is malformed; run 'gateway ledger verify'")
    return Head(size, head_hash, compact_range)


def read_head(session: Session) -> Head:
    """The head state (size, last hash, compact range), checked for shape.

    Raises :class:`StorageError` when the stored state is malformed or names
    another last entry than the entries do (someone wrote entries around the
    service): ``gateway ledger verify`` names what is wrong.
    """
    row = (
        session.connection()
        .execute(
            select(_STATE_TABLE.c.size, _STATE_TABLE.c.head_hash, _STATE_TABLE.c.compact).where(
                _STATE_TABLE.c.id == LEDGER_STATE_ID
            )
        )
        .first()
    )
    if row is None:
        head = _rebuild_head(session)
        session.connection().execute(
            _STATE_TABLE.insert(),
            {
                "id": LEDGER_STATE_ID,
                "size": head.size,
                "head_hash": head.head_hash,
                "compact": head.compact.to_bytes(),
            },
        )
        return head
    return _head_from_state(int(row[0]), bytes(row[1]), bytes(row[2]))


def _check_last_entry(head: Head, last_seq: Any, last_hash: Any) -> None:
    """The last entry is the one the head state names."""
    stored = (-1, GENESIS_PREV_HASH) if last_seq is None else (int(last_seq), bytes(last_hash))
    if stored[0] != head.size - 1 or not hmac.compare_digest(stored[1], head.head_hash):
        raise StorageError(
            f"the ledger head state names {head.size} entries but the entries end at "
            f"{stored[0] + 1}; refusing to append. Run 'gateway ledger verify'"
        )


def _lock_and_read_head(session: Session) -> Head:
    """Take the append lock (unless held) and read the head, checked against the last entry.

    On PostgreSQL the lock and the read are one pipeline: the read is a
    statement of its own, so in READ COMMITTED its snapshot is taken after
    the lock was granted and it sees every append committed before.
    """
    locked = _scope(session) is not None
    if _is_postgresql(session):
        row = _pg_lock_and_read(session, lock=not locked)
    else:
        row = session.connection().exec_driver_sql(_HEAD_AND_LAST_SQL).first()
    if row is None:  # no state row (a database from before it): rebuild it once
        head = read_head(session)
        last = (
            session.connection()
            .execute(
                select(LedgerEntryRow.seq, LedgerEntryRow.entry_hash)
                .order_by(LedgerEntryRow.seq.desc())
                .limit(1)
            )
            .first()
        )
        _check_last_entry(head, *(last if last is not None else (None, None)))
        return head
    head = _head_from_state(int(row[0]), bytes(row[1]), bytes(row[2]))
    _check_last_entry(head, row[3], row[4])
    return head


def _pg_lock_and_read(session: Session, *, lock: bool) -> Any:
    """PostgreSQL: ``BEGIN`` (when due), the advisory lock and the head read in one round trip."""
    import psycopg  # noqa: PLC0415 - only PostgreSQL nodes need the driver here

    driver = session.connection().connection.driver_connection
    if driver is None:
        raise StorageError("the database connection is closed; nothing was appended")
    try:
        with driver.pipeline():
            if lock:
                driver.execute(_PG_LOCK_SQL)
            cursor = driver.execute(_HEAD_AND_LAST_SQL)
        return cursor.fetchone()
    except psycopg.Error as exc:
        raise StorageError(
            f"database unavailable or locked while reading the ledger head: {type(exc).__name__}"
        ) from exc


def ledger_size(session: Session) -> int:
    """The number of entries (the next sequence number), from the head state."""
    row = (
        session.connection()
        .execute(select(_STATE_TABLE.c.size).where(_STATE_TABLE.c.id == LEDGER_STATE_ID))
        .first()
    )
    if row is not None:
        return int(row[0])
    last = session.connection().execute(select(func.max(LedgerEntryRow.seq))).scalar()
    return 0 if last is None else int(last) + 1


def _write(session: Session, entries: Sequence[LedgerEntry], compact: merkle.CompactRange) -> None:
    """Insert ``entries`` and set the head state after them: one multi-row write each."""
    state = {
        "new_size": compact.size,
        "new_head_hash": entries[-1].entry_hash,
        "new_compact": compact.to_bytes(),
    }
    connection = session.connection()
    if _is_postgresql(session):
        rows = [
            {
                "seq": entry.seq,
                "time": format_time(entry.time),
                "kind": entry.kind.value,
                "actor_name": entry.actor_name,
                "actor_role": entry.actor_role,
                "bundle_id": entry.bundle_id,
                "consent_id": entry.consent_id,
                "prev_hash": entry.prev_hash.hex(),
                "entry_hash": entry.entry_hash.hex(),
                "canonical": entry.canonical.hex(),
            }
            for entry in entries
        ]
        connection.execute(_PG_APPEND, {"rows": _JSON_ROWS.encode(rows), **state})
        return
    connection.execute(
        _INSERT_ENTRIES,
        [
            {
                "seq": entry.seq,
                "time": entry.time,
                "kind": entry.kind.value,
                "actor_name": entry.actor_name,
                "actor_role": entry.actor_role,
                "bundle_id": entry.bundle_id,
                "consent_id": entry.consent_id,
                "prev_hash": entry.prev_hash,
                "entry_hash": entry.entry_hash,
                "canonical": entry.canonical,
            }
            for entry in entries
        ],
    )
    connection.execute(_UPDATE_STATE, state)


def append_entries(session: Session, events: Sequence[Event]) -> list[LedgerEntry]:
    """Append ``events`` in order, in the caller's transaction; they commit or roll back with it.

    The lock is taken and the head read once per transaction (see the module
    notes), every entry is built and validated before anything is written
    (one bad event raises :class:`gateway.errors.InvalidInput` and writes
    nothing), the rows go in with one multi-row write and the head state is
    updated once. Returns the entries with their sequence numbers.

    Raises :class:`StorageError` when the head state is malformed or does not
    name the last entry (``gateway ledger verify`` says more).

    A body holds metadata only (ids, hashes, recipient names, purposes,
    reasons), never decrypted case content: compliance officers read it.
    """
    if not events:
        return []
    session.flush()  # the caller's pending rows first, as an ORM add would
    scope = _scope(session)
    head = scope.head if scope is not None and scope.head is not None else None
    if head is None:
        head = _lock_and_read_head(session)
    crash_point("ledger-append-after-head")
    compact = head.compact.copy()
    prev_hash = head.head_hash
    entries: list[LedgerEntry] = []
    for offset, event in enumerate(events):
        entry = make_entry(
            seq=head.size + offset,
            now=event.now,
            kind=event.kind,
            actor=event.actor,
            prev_hash=prev_hash,
            bundle_id=event.bundle_id,
            consent_id=event.consent_id,
            body=event.body,
        )
        entries.append(entry)
        compact.append_leaf_hash(merkle.leaf_hash(entry.entry_hash))
        prev_hash = entry.entry_hash
    _write(session, entries, compact)
    crash_point("ledger-append-after-write")
    _remember(session, Head(compact.size, prev_hash, compact))
    return entries


def record_event(
    session: Session,
    *,
    kind: EntryKind | str,
    actor: Actor,
    now: datetime,
    bundle_id: str | None = None,
    consent_id: str | None = None,
    body: dict[str, Any] | None = None,
) -> LedgerEntry:
    """Append one entry in the caller's transaction; it commits or rolls back with it.

    ``body`` holds metadata only (ids, hashes, recipient names, purposes,
    reasons), never decrypted case content: compliance officers read it.
    Several entries in one transaction: :func:`append_entries`.
    """
    event = Event(kind, actor, now, bundle_id, consent_id, body)
    return append_entries(session, [event])[0]
