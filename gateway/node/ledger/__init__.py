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
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, func, select, text
from sqlalchemy.orm import Session

from gateway.core import merkle
from gateway.core.ledger import GENESIS_PREV_HASH, EntryKind, LedgerEntry, make_entry
from gateway.core.roles import Actor
from gateway.errors import StorageError
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


def lock_for_append(session: Session) -> None:
    """Serialise appends: an advisory lock on PostgreSQL; SQLite's BEGIN IMMEDIATE suffices."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})


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
    size, head_hash, compact = int(row[0]), bytes(row[1]), bytes(row[2])
    try:
        compact_range = merkle.CompactRange.restore(size, compact)
    except ValueError as exc:
        raise StorageError(
            f"the ledger head state is malformed ({exc}); run 'gateway ledger verify'"
        ) from None
    if len(head_hash) != merkle.HASH_SIZE:
        raise StorageError("the ledger head state is malformed; run 'gateway ledger verify'")
    return Head(size, head_hash, compact_range)


def _check_head_against_entries(session: Session, head: Head) -> None:
    """One indexed look-up: the last entry is the one the head state names."""
    last = (
        session.connection()
        .execute(
            select(LedgerEntryRow.seq, LedgerEntryRow.entry_hash)
            .order_by(LedgerEntryRow.seq.desc())
            .limit(1)
        )
        .first()
    )
    stored = (-1, GENESIS_PREV_HASH) if last is None else (int(last[0]), bytes(last[1]))
    if stored[0] != head.size - 1 or not hmac.compare_digest(stored[1], head.head_hash):
        raise StorageError(
            f"the ledger head state names {head.size} entries but the entries end at "
            f"{stored[0] + 1}; refusing to append. Run 'gateway ledger verify'"
        )


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


def append_entries(session: Session, events: Sequence[Event]) -> list[LedgerEntry]:
    """Append ``events`` in order, in the caller's transaction; they commit or roll back with it.

    The head is read once, every entry is built and validated before anything
    is written (one bad event raises :class:`gateway.errors.InvalidInput` and
    writes nothing), the rows go in with one Core ``executemany`` and the head
    state is updated once. Returns the entries with their sequence numbers.

    A body holds metadata only (ids, hashes, recipient names, purposes,
    reasons), never decrypted case content: compliance officers read it.
    """
    if not events:
        return []
    session.flush()  # the caller's pending rows first, as an ORM add would
    lock_for_append(session)
    head = read_head(session)
    _check_head_against_entries(session, head)
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
    connection = session.connection()
    connection.execute(
        _ENTRY_TABLE.insert(),
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
    connection.execute(
        _STATE_TABLE.update()
        .where(_STATE_TABLE.c.id == LEDGER_STATE_ID)
        .values(size=compact.size, head_hash=prev_hash, compact=compact.to_bytes())
    )
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
