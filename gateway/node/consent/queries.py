"""Reading the consent state: per bundle (:func:`load_consent_states`) and as a list."""

from __future__ import annotations

import functools
import json
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import cachetools
from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.orm import Session

from gateway.core.canonical import parse_bounded_json, parse_canonical
from gateway.core.consent import (
    MAX_GRANT_BYTES,
    ConsentGrant,
    ConsentState,
    GrantTerms,
    terms_from_record,
)
from gateway.core.times import parse_stored_utc
from gateway.errors import InvalidInput, StorageError
from gateway.node.consent import uses as consent_uses
from gateway.node.consent.receive import apply_pending
from gateway.node.context import NodeContext
from gateway.store.db import Database
from gateway.store.models_consent import (
    CONSENT_GENERATION_ID,
    ConsentApplied,
    ConsentDenialRecord,
    ConsentGenerationRow,
    ConsentGrantItem,
    ConsentGrantRecord,
    ConsentRequestRecord,
    ConsentRevocationRecord,
    ConsentUse,
    Direction,
)
from gateway.store.models_exchange import InboxEntry

__all__ = [
    "ConsentStateCache",
    "check_consent_states",
    "list_consents",
    "load_consent_states",
    "state_cache",
]


_STATES_SQL = (
    "SELECT i.bundle_id, g.consent_id, g.document, g.terms, r.revoked_at,"
    " (SELECT count(*) FROM consent_use u WHERE u.consent_id = g.consent_id),"
    " (SELECT count(*) FROM inbox x WHERE x.bundle_id = g.bundle_id"
    " AND x.sender = g.granting_node AND x.suspect_since IS NOT NULL)"
    " FROM consent_grant_item i"
    " JOIN consent_grant g ON g.consent_id = i.consent_id"
    " LEFT OUTER JOIN consent_revocation r ON r.consent_id = g.consent_id"
    " WHERE g.direction = {mark} AND i.bundle_id IN ({marks})"
)
"""Every received consent naming one of the asked bundles, with what its state needs,
from the base tables: what the recorded decision reads."""
_CHECK_SQL = (
    "SELECT bundle_id, consent_id, document, terms, revoked_at, uses, suspect"
    " FROM consent_check WHERE bundle_id IN ({marks})"
)
"""The same rows from ``consent_check`` (migration ``0023_consent_check``): one indexed
range, kept by the database's triggers in the transaction of every change to the
tables :data:`_STATES_SQL` joins."""
_GENERATION_SQL = (
    f"SELECT generation FROM {ConsentGenerationRow.__tablename__} "  # noqa: S608 - constants
    f"WHERE id = {CONSENT_GENERATION_ID}"
)
"""The consent generation alone: what a check whose asked bundles are all cached reads."""
_GENERATION_CHECK_SQL = (
    "SELECT NULL, NULL, NULL, NULL, NULL, generation, NULL"  # noqa: S608 - constants
    f" FROM {ConsentGenerationRow.__tablename__} WHERE id = {CONSENT_GENERATION_ID}"
    " UNION ALL " + _CHECK_SQL
)
"""The consent generation (the row whose bundle id is NULL: ``consent_check.bundle_id``
is never NULL) and the rows of :data:`_CHECK_SQL`: one statement, so both are read at
one snapshot on both engines. What a check reads when any asked bundle is not cached."""
_NO_GENERATION_ROW = "the consent generation row is missing: run `gateway db upgrade`"
_MAX_ASK = 1000
"""Bundle ids per statement (well below both engines' parameter limits)."""


@functools.lru_cache(maxsize=64)
def _states_sql(mark: str, count: int) -> str:
    """:data:`_STATES_SQL` for ``count`` bundle ids (the same text each time: prepared once)."""
    return _STATES_SQL.format(mark=mark, marks=", ".join([mark] * count))


@functools.lru_cache(maxsize=64)
def _check_sql(mark: str, count: int) -> str:
    """:data:`_CHECK_SQL` for ``count`` bundle ids (the same text each time: prepared once)."""
    return _CHECK_SQL.format(marks=", ".join([mark] * count))


@functools.lru_cache(maxsize=64)
def _generation_check_sql(mark: str, count: int) -> str:
    """:data:`_GENERATION_CHECK_SQL` for ``count`` bundle ids (prepared once, as above)."""
    return _GENERATION_CHECK_SQL.format(marks=", ".join([mark] * count))


def _stored_time(value: Any) -> datetime | None:
    """A stored time as the driver returned it (SQLite: text; PostgreSQL: aware), in UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        moment = parse_stored_utc(value)
        if moment is None:
            raise StorageError("a stored revocation time is not a time")
        return moment
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    raise StorageError("a stored revocation time is not a time")


class ConsentStateCache:
    """Consent states of one database, valid for one value of its consent generation.

    Three levels, all guarded by one lock (the local API's worker threads
    share a node's cache):

    * the parsed grant of each consent id, with the exact stored bytes it was
      read from. Signed documents never change, so a parse is reused for as
      long as the row holds the same bytes, across generations;
    * the same for the terms read from each consent's compact record
      (:func:`terms_from_record`), kept with the exact record and document
      bytes they were read and checked from: a record or document rewritten
      in any byte is read and checked again;
    * the states naming each bundle id (grant, revocation, uses, suspect
      mark), kept only while the database's generation equals
      :attr:`generation`. The triggers of migration ``0016_consent_generation``
      raise it in the same transaction as every grant, revocation, use or
      suspect mark, by any connection or process, so a check that reads a
      new value drops them all and reads again.

    Bounded: past :data:`MAX_BUNDLES` bundles the states level starts empty
    again; the parsed grants and the checked terms are each kept in a
    least-recently-used cache bounded by the bytes of the stored documents
    (and records) they hold: :data:`MAX_GRANT_BYTES_KEPT` and
    :data:`MAX_TERMS_BYTES` (64 MiB each by default), the bytes counted, not
    the objects around them. A document may be 64 KiB
    (:data:`~gateway.core.consent.MAX_GRANT_BYTES`), so a count alone would let
    a few hundred thousand large grants hold gigabytes.
    """

    MAX_BUNDLES = 200_000
    MAX_GRANT_BYTES_KEPT = 64 << 20
    MAX_TERMS_BYTES = 64 << 20

    def __init__(
        self, *, max_grant_bytes: int | None = None, max_terms_bytes: int | None = None
    ) -> None:
        self._lock = threading.Lock()
        self.generation: int | None = None
        self._adopted_at = float("-inf")
        """When (``time.monotonic()``) the cache took :attr:`generation` as its own."""
        self._by_bundle: dict[str, tuple[ConsentState, ...]] = {}
        self._grants: cachetools.LRUCache[str, tuple[bytes, ConsentGrant]] = cachetools.LRUCache(
            max_grant_bytes or self.MAX_GRANT_BYTES_KEPT, getsizeof=_kept_grant_bytes
        )
        self._terms: cachetools.LRUCache[str, tuple[bytes, bytes, GrantTerms]] = (
            cachetools.LRUCache(
                max_terms_bytes or self.MAX_TERMS_BYTES, getsizeof=_kept_terms_bytes
            )
        )

    def states(
        self, generation: int, bundle_ids: Sequence[str], *, began: float
    ) -> dict[str, tuple[ConsentState, ...]]:
        """The cached states of those of ``bundle_ids`` known at ``generation``, read by a
        statement that began at ``began`` (``time.monotonic()``, taken before it was sent).

        A generation other than the cache's drops every kept state and becomes
        the cache's, with one exception: a lower one read by a statement that
        began before the cache took its own finds nothing and changes nothing
        (a check that began before another thread read the newer value, whose
        states it would otherwise throw away). A lower one read by a statement
        that began later means the database itself went back (a restore into
        it while the node runs): the cache starts again from it. Left: a database
        that went back and climbs to exactly the cached number before any check
        reads a lower one (docs/consent.md); the recorded decision never reads
        the cache.
        """
        with self._lock:
            if (
                self.generation is not None
                and generation < self.generation
                and began < self._adopted_at
            ):
                return {}
            if generation != self.generation:
                self._by_bundle.clear()
                self.generation = generation
                self._adopted_at = time.monotonic()
                return {}
            known = self._by_bundle
            return {b: known[b] for b in bundle_ids if b in known}

    def holds(self, bundle_ids: Sequence[str]) -> bool:
        """Whether the states of all of ``bundle_ids`` are cached (at :attr:`generation`;
        otherwise a check reads their rows with the generation: see
        ``_cached_consent_states``)."""
        with self._lock:
            known = self._by_bundle
            return all(b in known for b in bundle_ids)

    def store(self, generation: int, found: dict[str, tuple[ConsentState, ...]]) -> None:
        """Keep ``found`` (read at ``generation``) unless the generation has moved since."""
        with self._lock:
            if generation != self.generation:
                return
            if len(self._by_bundle) + len(found) > self.MAX_BUNDLES:
                self._by_bundle.clear()
            self._by_bundle.update(found)

    def grant(self, consent_id: str, document: bytes) -> ConsentGrant:
        """The grant ``document`` holds, parsed once per consent id and stored bytes.

        Raises :class:`StorageError` when the document names another consent,
        :class:`~gateway.errors.InvalidInput` when it is not a grant.
        """
        with self._lock:
            held = self._grants.get(consent_id)
        if held is not None and held[0] == document:
            return held[1]
        written = ConsentGrant.from_document(_parse_document(document))
        if written.consent_id != consent_id:
            raise StorageError(f"stored consent {consent_id} holds another consent's document")
        with self._lock:
            self._grants[consent_id] = (document, written)  # the least recently used go
        return written

    def terms(self, consent_id: str, record: Any, document: bytes) -> GrantTerms | None:
        """The terms ``record`` holds for ``document`` (:func:`terms_from_record`), checked once
        per consent id and exact stored bytes; ``None`` when the record may not be used."""
        if isinstance(record, memoryview):
            record = bytes(record)
        with self._lock:
            held = self._terms.get(consent_id)
        if held is not None and held[0] == record and held[1] == document:
            return held[2]
        terms = terms_from_record(record, consent_id=consent_id, document=document)
        if terms is not None and isinstance(record, bytes):
            with self._lock:
                self._terms[consent_id] = (record, document, terms)  # the least recently used go
        return terms


def _kept_grant_bytes(kept: tuple[bytes, ConsentGrant]) -> int:
    return len(kept[0])


def _kept_terms_bytes(kept: tuple[bytes, bytes, GrantTerms]) -> int:
    return len(kept[0]) + len(kept[1])


def _parse_document(document: bytes) -> Any:
    """A stored grant document: the canonical fast path, else the bounded parser.

    Both accept the same documents; the bounded parser names what is wrong.
    """
    try:
        return parse_canonical(document, max_bytes=MAX_GRANT_BYTES)
    except InvalidInput:
        return parse_bounded_json(document, max_bytes=MAX_GRANT_BYTES)


_CACHES: weakref.WeakKeyDictionary[Engine, ConsentStateCache] = weakref.WeakKeyDictionary()
_CACHES_LOCK = threading.Lock()


def state_cache(engine: Engine) -> ConsentStateCache:
    """The consent state cache of the database behind ``engine`` (one per engine)."""
    with _CACHES_LOCK:
        cache = _CACHES.get(engine)
        if cache is None:
            cache = _CACHES[engine] = ConsentStateCache()
        return cache


def _add_states(
    rows: Iterable[Sequence[Any]],
    cache: ConsentStateCache,
    naming: dict[str, list[ConsentState]],
    states: dict[str, ConsentState],
    *,
    stored_terms: bool,
) -> None:
    """Add each row's consent (bundle id, consent id, document, terms record, revocation
    time, uses, suspect mark) to the states naming its bundle in ``naming``; ``states``
    keeps one state per consent id across rows and chunks."""
    for bundle_id, consent_id, document, terms, revoked_at, uses, marked in rows:
        state = states.get(consent_id)
        if state is None:
            signed = bytes(document)
            grant: ConsentGrant | GrantTerms | None = (
                cache.terms(consent_id, terms, signed) if stored_terms else None
            )
            state = states[consent_id] = ConsentState(
                cache.grant(consent_id, signed) if grant is None else grant,
                _stored_time(revoked_at),
                int(uses or 0),
                bool(marked),
            )
        naming[bundle_id].append(state)


def _read_states(
    cursor: Any,
    cache: ConsentStateCache,
    bundle_ids: Sequence[str],
    mark: str,
    *,
    stored_terms: bool,
    first_rows: Sequence[Sequence[Any]] | None = None,
) -> dict[str, tuple[ConsentState, ...]]:
    """Every asked bundle id -> the received consents naming it: one statement per chunk
    of :data:`_MAX_ASK` ids, each reading at its own snapshot (or in the caller's
    transaction, when ``cursor`` is inside one).

    With ``stored_terms``, the rows come from ``consent_check`` and a
    grant's terms from its compact record where that is bound to the stored
    document (:func:`terms_from_record`); any other grant is read from its
    signed document. Without ``stored_terms``, the rows come from the base
    tables and every grant from its signed document. ``first_rows``: the
    first chunk's rows, read already (by :data:`_GENERATION_CHECK_SQL`).
    """
    naming: dict[str, list[ConsentState]] = {b: [] for b in bundle_ids}
    states: dict[str, ConsentState] = {}
    for start in range(0, len(bundle_ids), _MAX_ASK):
        if start == 0 and first_rows is not None:
            rows = first_rows
        else:
            chunk = list(bundle_ids[start : start + _MAX_ASK])
            if stored_terms:
                cursor.execute(_check_sql(mark, len(chunk)), chunk)
            else:
                cursor.execute(_states_sql(mark, len(chunk)), [Direction.RECEIVED, *chunk])
            rows = cursor.fetchall()
        _add_states(rows, cache, naming, states, stored_terms=stored_terms)
    return {b: tuple(found) for b, found in naming.items()}


def _cached_consent_states(
    cursor: Any, cache: ConsentStateCache, asked: list[str], mark: str
) -> tuple[dict[str, tuple[ConsentState, ...]], set[str]]:
    """The states of every asked bundle, and the bundles among them read just now.

    When every asked bundle is cached, the generation alone is read
    (:data:`_GENERATION_SQL`), then, only if it moved, the rows. Otherwise
    one statement reads the generation and the first chunk's rows
    (:data:`_GENERATION_CHECK_SQL`): a first check costs one statement, not
    two. What the generation says is never older than the rows kept under
    it: they are read at its snapshot or after it.
    """
    if not asked:
        return {}, set()
    began = time.monotonic()
    if cache.holds(asked):
        cursor.execute(_GENERATION_SQL)
        row = cursor.fetchone()
        if row is None:
            raise StorageError(_NO_GENERATION_ROW)
        generation = int(row[0])
        known = cache.states(generation, asked, began=began)  # empty if it moved
        missing = [b for b in asked if b not in known]
        if missing:
            found = _read_states(cursor, cache, missing, mark, stored_terms=True)
            cache.store(generation, found)
            known.update(found)
        return known, set(missing)
    first = asked[:_MAX_ASK]
    cursor.execute(_generation_check_sql(mark, len(first)), first)
    rows = cursor.fetchall()
    read: int | None = None
    for row in rows:
        if row[0] is None:
            read = int(row[5])
    if read is None:
        raise StorageError(_NO_GENERATION_ROW)
    cache.states(read, (), began=began)  # a moved generation drops what was kept under the old
    found = _read_states(
        cursor,
        cache,
        asked,
        mark,
        stored_terms=True,
        first_rows=[row for row in rows if row[0] is not None],
    )
    cache.store(read, found)
    return found, set(asked)


def _consent_states(
    driver: Any,
    cache: ConsentStateCache,
    bundle_ids: Sequence[str],
    mark: str,
    *,
    cached_states: bool,
) -> list[ConsentState]:
    asked = list(dict.fromkeys(bundle_ids))
    cursor = driver.cursor()
    try:
        if cached_states:
            known, fresh = _cached_consent_states(cursor, cache, asked, mark)
        else:
            known = _read_states(cursor, cache, asked, mark, stored_terms=False)
            fresh = set(asked)
    finally:
        cursor.close()
    # A consent met both in the cached states (read at the generation) and in rows
    # read just now: the fresh state wins (each statement reads at its own snapshot).
    by_id = {state.consent_id: state for b in asked if b not in fresh for state in known[b]}
    by_id.update((state.consent_id, state) for b in asked if b in fresh for state in known[b])
    return [by_id[consent_id] for consent_id in sorted(by_id)]


def _mark(dialect: str) -> str:
    return "%s" if dialect == "postgresql" else "?"


def load_consent_states(session: Session, bundle_ids: Sequence[str]) -> list[ConsentState]:
    """The received consents naming any of ``bundle_ids``, with revocation and uses.

    A grant whose bundle this node marked suspect (docs/keys.md, "Revocation
    with a time") comes back with ``suspect`` set, and authorises nothing.

    Read in the session's transaction, one statement on the driver's
    connection, never from the cached states: this is the decision taken
    under the ledger lock and recorded, and the session may itself have just
    applied a revocation (on PostgreSQL the generation moves only at commit).
    Grants come from the signed documents as received (the lookup columns
    only find them, and the compact terms records are not read), parsed
    once per consent id and stored bytes;
    revocations, uses and suspect marks as the transaction sees them. Sorted
    by consent id. Raises :class:`StorageError` for a document that names
    another consent.
    """
    bind = session.get_bind()
    engine = bind.engine if isinstance(bind, Connection) else bind
    driver: Any = session.connection().connection.driver_connection
    return _consent_states(
        driver, state_cache(engine), bundle_ids, _mark(engine.dialect.name), cached_states=False
    )


def check_consent_states(db: Database, bundle_ids: Sequence[str]) -> list[ConsentState]:
    """The states :func:`load_consent_states` returns, read outside any write transaction.

    For a check that records nothing (the first look before decrypting; a
    decision that is recorded is taken again under the ledger lock):
    :meth:`Database.read_connection` (no write lock, no transaction: each
    statement reads what was committed when it started), the consent generation
    read first (with the rows, in one statement, when an asked bundle is not
    cached), and the states of bundles already read at that generation
    served from :class:`ConsentStateCache`. A grant, revocation, use or suspect mark
    committed by any connection or process before the call has moved the
    generation, so it is always seen.

    The grants' terms come from their compact records (``consent_grant.terms``,
    migration ``0022_consent_terms``), written from each verified grant when
    it was stored, so a bundle read for the first time costs no parse of the
    signed document. A record that is missing or not bound to the stored
    document's exact bytes is not used: that grant is read from its document,
    as :func:`load_consent_states` reads every grant.

    The rows come from ``consent_check`` (migration ``0023_consent_check``):
    one row per (bundle, received consent) with the grant's document and
    record, revocation time, uses and suspect mark, which the database's
    triggers rewrite from the base tables in the transaction of every change
    to them; one indexed range per call instead of a join per item.
    Raises :class:`StorageError` as :func:`load_consent_states` does, and for
    a database without migrations ``0016_consent_generation`` and
    ``0023_consent_check``.
    """
    with db.read_connection() as driver:
        return _consent_states(
            driver, state_cache(db.engine), bundle_ids, _mark(db.dialect), cached_states=True
        )


def list_consents(ctx: NodeContext, *, now: datetime) -> dict[str, Any]:
    """Requests, consents and denials in both directions, with each consent's state."""
    node, keyring = ctx.node, ctx.keyring_or_none()
    if keyring is not None:
        apply_pending(ctx, now=now)
    with node.db.transaction() as session:
        requests = session.scalars(
            select(ConsentRequestRecord).order_by(ConsentRequestRecord.created_at)
        ).all()
        grants = session.scalars(
            select(ConsentGrantRecord).order_by(ConsentGrantRecord.recorded_at)
        ).all()
        revoked = {r.consent_id: r for r in session.scalars(select(ConsentRevocationRecord))}
        uses = {
            row[0]: row[1]
            for row in session.execute(
                select(ConsentUse.consent_id, func.count()).group_by(ConsentUse.consent_id)
            )
        }
        reported = consent_uses.reported_uses(session)
        uses.update({cid: total for cid, (total, _bad) in reported.items()})
        denials = {d.request_id: d for d in session.scalars(select(ConsentDenialRecord))}
        refused = session.scalars(
            select(ConsentApplied).where(ConsentApplied.outcome == "refused")
        ).all()
        suspect = set(
            session.scalars(
                select(InboxEntry.bundle_id).where(InboxEntry.suspect_since.is_not(None))
            )
        )
        consents = []
        for row in grants:
            items = sorted(
                session.scalars(
                    select(ConsentGrantItem.bundle_id).where(
                        ConsentGrantItem.consent_id == row.consent_id
                    )
                )
            )
            spent = int(uses.get(row.consent_id, 0))
            revocation = revoked.get(row.consent_id)
            if row.direction == Direction.RECEIVED and row.bundle_id in suspect:
                state = "suspect"
            elif revocation is not None:
                state = "revoked"
            elif now >= row.valid_until:
                state = "expired"
            elif row.max_uses is not None and spent >= row.max_uses:
                state = "used up"
            else:
                state = "valid"
            written = ConsentGrant.from_document(
                parse_bounded_json(bytes(row.document), max_bytes=MAX_GRANT_BYTES)
            )
            consents.append(
                {
                    "consent_id": row.consent_id,
                    "direction": row.direction,
                    "request_id": row.request_id,
                    "granting_node": row.granting_node,
                    "items": items,
                    "third_party": row.third_party,
                    "purpose": row.purpose,
                    "valid_from": row.valid_from,
                    "valid_until": row.valid_until,
                    "max_uses": row.max_uses,
                    "uses_spent": spent,
                    "use_violations": reported.get(row.consent_id, (0, 0))[1],
                    "state": state,
                    "revoked_at": None if revocation is None else revocation.revoked_at,
                    "revocation_reason": None if revocation is None else revocation.reason,
                    "granting_officer": written.granting_officer,
                    "approvers": list(written.approvers),
                }
            )
        return {
            "requests": [
                {
                    "request_id": r.request_id,
                    "direction": r.direction,
                    "items": json.loads(r.items_json),
                    "third_party": r.third_party,
                    "purpose": r.purpose,
                    "requesting_officer": r.requesting_officer,
                    "status": r.status,
                    "created_at": r.created_at,
                    "consent_id": r.consent_id,
                    "denial_reason": denials[r.request_id].reason
                    if r.request_id in denials
                    else None,
                }
                for r in requests
            ],
            "consents": consents,
            "refused_bundles": [
                {"bundle_id": a.bundle_id, "type": a.case_type, "detail": a.detail} for a in refused
            ],
        }
