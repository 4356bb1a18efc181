"""Reading the ledger: entries in order, filtered, streamed with bounded memory."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from gateway.core.ledger import (
    EntryKind,
    LedgerEntry,
    LedgerVerificationFailed,
    StoredEntry,
    parse_entry,
)
from gateway.core.times import DateMeans, parse_user_time
from gateway.errors import InvalidInput
from gateway.store.models_ledger import LedgerEntryRow

__all__ = [
    "MAX_LIST_LIMIT",
    "STREAM_BATCH",
    "entry_of",
    "iter_entries",
    "list_entries",
    "parse_since",
    "select_entries",
    "stream_entries",
]

STREAM_BATCH = 5000
MAX_LIST_LIMIT = 100_000

EntrySelect = Select[*tuple[Any, ...]]
_ENTRY_COLUMNS = (
    LedgerEntryRow.seq,
    LedgerEntryRow.time,
    LedgerEntryRow.kind,
    LedgerEntryRow.actor_name,
    LedgerEntryRow.actor_role,
    LedgerEntryRow.bundle_id,
    LedgerEntryRow.consent_id,
    LedgerEntryRow.prev_hash,
    LedgerEntryRow.entry_hash,
    LedgerEntryRow.canonical,
)


def select_entries() -> EntrySelect:
    """Plain column rows (no ORM objects, no identity map): what streaming needs."""
    return select(*_ENTRY_COLUMNS).order_by(LedgerEntryRow.seq)


def stream_entries(session: Session, statement: EntrySelect) -> Iterator[StoredEntry]:
    """Rows in batches through a server-side cursor; memory stays bounded.

    Executed on the session's connection (Core rows, no ORM loading): the
    same transaction, a fraction of the per-row cost.
    """
    result = session.connection().execute(
        statement.execution_options(yield_per=STREAM_BATCH, stream_results=True)
    )
    for (
        seq,
        time,
        kind,
        actor_name,
        actor_role,
        bundle_id,
        consent_id,
        prev,
        entry_hash,
        canonical,
    ) in result:
        yield StoredEntry(
            seq=seq,
            time=time,
            kind=kind,
            actor_name=actor_name,
            actor_role=actor_role,
            bundle_id=bundle_id,
            consent_id=consent_id,
            prev_hash=bytes(prev),
            entry_hash=bytes(entry_hash),
            canonical=bytes(canonical),
        )


def entry_of(row: StoredEntry) -> LedgerEntry:
    """The entry as hashed; an unreadable one is refused (fail closed), never guessed at."""
    try:
        return parse_entry(row.canonical)
    except InvalidInput as exc:
        raise LedgerVerificationFailed(
            f"ledger entry {row.seq} is unreadable ({exc.message}); run 'gateway ledger verify'",
            check="entry-hash",
            seq=row.seq,
        ) from None


def iter_entries(
    session: Session,
    *,
    bundle: str | None = None,
    kind: EntryKind | str | None = None,
    since: datetime | None = None,
    limit: int | None = None,
) -> Iterator[LedgerEntry]:
    """Entries in sequence order, filtered, streamed."""
    statement = select_entries()
    if bundle is not None:
        statement = statement.where(LedgerEntryRow.bundle_id == bundle)
    if kind is not None:
        try:
            statement = statement.where(LedgerEntryRow.kind == EntryKind(kind).value)
        except ValueError:
            known = ", ".join(k.value for k in EntryKind)
            raise InvalidInput(f"unknown entry kind {kind!r}; kinds are: {known}") from None
    if since is not None:
        if since.tzinfo is None:
            raise InvalidInput("--since needs a time with a zone (e.g. 2026-11-25T00:00:00Z)")
        statement = statement.where(LedgerEntryRow.time >= since)
    if limit is not None:
        if not 0 < limit <= MAX_LIST_LIMIT:
            raise InvalidInput(f"limit must be between 1 and {MAX_LIST_LIMIT}")
        statement = statement.limit(limit)
    for row in stream_entries(session, statement):
        yield entry_of(row)


def parse_since(text: str | None, *, option: str) -> datetime | None:
    """The lower time bound of a listing in UTC; ``None`` for none.

    ``option`` is how the user gave the value (``--since`` on the command line,
    ``since`` in a query) and starts the error message. A date means its first
    instant (UTC); a time without a zone is read as UTC, the ledger's own zone.
    Raises :class:`InvalidInput` as :func:`gateway.core.times.parse_user_time`.
    """
    if text is None:
        return None
    return parse_user_time(text, option=option, dates=DateMeans.START, zone_required=False)


def list_entries(
    session: Session,
    *,
    bundle: str | None = None,
    kind: EntryKind | str | None = None,
    since: datetime | None = None,
    limit: int | None = None,
) -> list[LedgerEntry]:
    """Entries in sequence order, filtered by bundle, kind and time (from ``since``)."""
    return list(iter_entries(session, bundle=bundle, kind=kind, since=since, limit=limit))
