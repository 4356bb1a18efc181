"""``gateway ledger verify``: the whole ledger checked, streaming, with bounded memory."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import multiprocessing
import os
import re
import sqlite3
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any

import orjson
from nacl.signing import VerifyKey
from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.core import merkle
from gateway.core.domain import Purpose
from gateway.core.ledger import (
    GENESIS_PREV_HASH,
    ChainProblem,
    ChainVerifier,
    CheckpointInvalid,
    EntryKind,
    SigningKeyLookup,
    StoredEntry,
    broken_link,
    format_time,
    verify_checkpoint,
)
from gateway.core.times import is_calendar_day, parse_stored_utc, stored_micro_text
from gateway.errors import GatewayError
from gateway.node.ledger.checkpoint import node_id, signed_of
from gateway.store.db import SQLITE_BUSY_TIMEOUT_MS
from gateway.store.models_ledger import (
    LEDGER_STATE_ID,
    LedgerCheckpointRow,
    LedgerStateRow,
    WitnessedCheckpointRow,
)

__all__ = ["PARALLEL", "Parallelism", "VerifyReport", "verify_ledger", "walk_chain"]


@dataclass
class VerifyReport:
    """What ``ledger verify`` found. ``problem`` is the first thing wrong, if any."""

    entries: int = 0
    root: bytes = merkle.EMPTY_ROOT
    checkpoints: int = 0
    witnessed: int = 0
    problem: ChainProblem | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None

    def raise_for_problem(self) -> None:
        if self.problem is not None:
            raise self.problem.error()

    def to_dict(self) -> dict[str, Any]:
        return {
            "intact": self.ok,
            "entries": self.entries,
            "root": self.root.hex(),
            "checkpoints": self.checkpoints,
            "witnessed": self.witnessed,
            "problem": None
            if self.problem is None
            else {
                "seq": self.problem.seq,
                "check": self.problem.check,
                "message": self.problem.message,
            },
            "notes": self.notes,
        }


class _TrustedUntil:
    """A key lookup that also accepts a signing key distrusted only *after* ``moment``.

    A manifest refuses a revoked key at every time, because a thief could
    backdate what they sign. A checkpoint we stored before the revocation
    (our own, signed then; or the peer's, received then) was made while the
    key was trusted, so it still counts; each such use is noted in the report.
    """

    def __init__(self, keys: SigningKeyLookup, moment: datetime, notes: list[str]) -> None:
        self._keys = keys
        self._moment = moment
        self._notes = notes

    def signing_key(self, key_id: str, *, at: datetime) -> VerifyKey:
        try:
            return self._keys.signing_key(key_id, at=at)
        except GatewayError:
            revocation = getattr(self._keys, "revocation", None)
            listed = getattr(self._keys, "key", None)
            if revocation is None or listed is None:
                raise
            revoked = revocation(key_id)
            if revoked is None or revoked.distrusts(self._moment):
                raise
            entry = listed(key_id)
            if entry.use != "sign" or not entry.valid_at(at):
                raise
            self._notes.append(
                f"a checkpoint of {format_time(at)} is signed by key {key_id}, revoked later "
                f"(distrusted from {format_time(revoked.distrusted_from)}); it was stored "
                "while the key was trusted"
            )
            return VerifyKey(bytes(entry.public))


def _checkpoint_problems(
    session: Session,
    verifier: _Walk,
    made_entries: dict[int, dict[str, Any]],
    own_keys: SigningKeyLookup | None,
    node: str,
    notes: list[str],
) -> list[ChainProblem]:
    problems: list[ChainProblem] = []
    rows = session.scalars(select(LedgerCheckpointRow).order_by(LedgerCheckpointRow.size)).all()
    sizes = set()
    previous_size = 0
    for row in rows:
        sizes.add(row.size)
        last = row.size - 1
        try:
            signed = signed_of(row)
            if own_keys is not None:
                verify_checkpoint(signed, _TrustedUntil(own_keys, row.time, notes), node=node)
            checkpoint = signed.checkpoint
            if (checkpoint.size, checkpoint.root, checkpoint.key_id) != (
                row.size,
                bytes(row.root),
                row.key_id,
            ):
                raise CheckpointInvalid("stored columns differ from the signed checkpoint body")
        except CheckpointInvalid as exc:
            problems.append(
                ChainProblem(last, "checkpoint", f"checkpoint of size {row.size}: {exc.message}")
            )
            continue
        root = verifier.roots.get(row.size)
        if root is None:
            problems.append(
                ChainProblem(
                    last,
                    "checkpoint",
                    f"checkpoint of size {row.size} covers entries the ledger does not have",
                )
            )
        elif root != checkpoint.root:
            problems.append(
                ChainProblem(
                    previous_size,
                    "checkpoint",
                    f"entries {previous_size}..{last} were rewritten: their root is not the "
                    f"one signed in the checkpoint of size {row.size}",
                )
            )
        made = made_entries.get(row.size)
        if made is None and root is not None and row.size < verifier.size:
            problems.append(
                ChainProblem(
                    row.size,
                    "checkpoint",
                    f"entry {row.size} should record the checkpoint of size {row.size} but "
                    "does not",
                )
            )
        elif made is not None and made.get("root") != checkpoint.root.hex():
            problems.append(
                ChainProblem(
                    row.size,
                    "checkpoint",
                    f"entry {row.size} records another root than the checkpoint of size {row.size}",
                )
            )
        previous_size = row.size
    if verifier.problem is None and verifier.size in sizes and verifier.size not in made_entries:
        # The entry recording the newest checkpoint must exist: deleting it is tampering.
        problems.append(
            ChainProblem(
                verifier.size,
                "checkpoint",
                f"entry {verifier.size} recording the checkpoint of size {verifier.size} is "
                "missing",
            )
        )
    for seq, made_body in sorted(made_entries.items()):
        if seq not in sizes or made_body.get("size") != seq:
            problems.append(
                ChainProblem(
                    seq,
                    "checkpoint",
                    f"entry {seq} records a checkpoint of size {made_body.get('size')} that is "
                    "not in the checkpoint table",
                )
            )
    return problems


def _witness_problems(
    session: Session, peer_keys: SigningKeyLookup, peer_node: str, notes: list[str]
) -> tuple[int, list[ChainProblem]]:
    rows = session.scalars(
        select(WitnessedCheckpointRow)
        .where(WitnessedCheckpointRow.node == peer_node)
        .order_by(WitnessedCheckpointRow.size)
    ).all()
    problems: list[ChainProblem] = []
    for row in rows:
        try:
            signed = signed_of(row)
            keys = _TrustedUntil(peer_keys, row.received_at, notes)
            checkpoint = verify_checkpoint(signed, keys, node=peer_node)
            if (checkpoint.size, checkpoint.root) != (row.size, bytes(row.root)):
                raise CheckpointInvalid("stored columns differ from the signed checkpoint")
        except CheckpointInvalid as exc:
            problems.append(
                ChainProblem(
                    None,
                    "witness",
                    f"witnessed checkpoint of {peer_node} at size {row.size}: {exc.message}",
                )
            )
    return len(rows), problems


_WALK_SQL = (
    "SELECT seq, time, kind, actor_name, actor_role, bundle_id, consent_id, prev_hash, "
    "entry_hash, canonical FROM ledger_entry ORDER BY seq"
)
_WALK_BATCH = 5000
_PROGRESS_EVERY = 100_000
_ENTRY_PREFIX = Purpose.LEDGER_ENTRY + b"\x00"
_FIELDS = frozenset(
    {"v", "seq", "time", "kind", "actor", "bundle_id", "consent_id", "body", "prev_hash"}
)
_ACTOR_FIELDS = frozenset({"name", "role"})
_KNOWN_KINDS = frozenset(kind.value for kind in EntryKind)
_MADE = EntryKind.CHECKPOINT_MADE.value
_MAX_ENTRY_BYTES = 24 * 1024


_TIME_OF_DAY = re.compile(r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]\.[0-9]{6}")
"""``HH:MM:SS.ffffff`` of SQLite's stored time text (what ``datetime`` accepts there)."""

_BLOCK = 1024
"""Leaves folded at once where the tree is aligned (a perfect subtree of 2**10)."""


def _fold(tree: merkle.CompactRange, pending: list[bytes]) -> int:
    """Add the entry hashes in ``pending`` to ``tree`` as leaves, empty it; return the room left.

    A full aligned block is hashed level by level in list comprehensions and
    appended as one perfect subtree (the same root as leaf by leaf, less
    interpreter work); anything else goes leaf by leaf. The room is the
    number of leaves to the next aligned block boundary.
    """
    if len(pending) == _BLOCK and tree.size % _BLOCK == 0:
        sha256 = hashlib.sha256
        level = [sha256(b"\x00" + digest).digest() for digest in pending]
        while len(level) > 1:
            pairs = iter(level)
            level = [
                sha256(b"\x01" + left + right).digest()
                for left, right in zip(pairs, pairs, strict=False)
            ]
        tree.append_subtree(level[0], _BLOCK)
    else:
        for digest in pending:
            tree.append_leaf_hash(merkle.leaf_hash(digest))
    pending.clear()
    return _BLOCK - tree.size % _BLOCK


@dataclass
class _Walk:
    """What the walk over the entries established (the shape checkpoint checks read)."""

    size: int = 0
    root_value: bytes = merkle.EMPTY_ROOT
    head_hash: bytes = GENESIS_PREV_HASH
    roots: dict[int, bytes] = field(default_factory=dict)
    problem: ChainProblem | None = None
    tree: merkle.CompactRange = field(default_factory=merkle.CompactRange)

    def root(self) -> bytes:
        return self.root_value


@dataclass
class _Span:
    """What a walk over the entries from ``start`` on established, up to ``size`` (excluded).

    ``first_prev`` is the hash the first entry was taken to follow, ``tree``
    the compact range over the span's entries alone, ``marks`` that range
    (copied) at each checkpoint size reached, ``made`` the bodies of the
    entries recording a checkpoint, ``problem`` the first problem (the span
    ends before it).
    """

    start: int
    first_prev: bytes
    size: int
    head_hash: bytes
    tree: merkle.CompactRange
    marks: dict[int, merkle.CompactRange]
    made: dict[int, dict[str, Any]]
    problem: ChainProblem | None = None


@contextmanager
def _raw_rows(
    session: Session, start: int | None = None, end: int | None = None
) -> Iterator[Iterable[tuple[Any, ...]]]:
    """Every entry row (or those of ``start..end-1``) as the driver returns it, in order.

    In the session's transaction.

    A plain DB-API cursor, no result processing: on PostgreSQL a named
    (server-side) cursor fetching :data:`_WALK_BATCH` rows at a time; on SQLite
    the cursor steps through the table itself. Memory stays bounded.
    """
    dbapi: Any = session.connection().connection.driver_connection
    if session.get_bind().dialect.name == "postgresql":
        cursor = dbapi.cursor(name="ledger_verify_walk")
        cursor.itersize = _WALK_BATCH
    else:
        cursor = dbapi.cursor()
        cursor.arraysize = _WALK_BATCH
    try:
        if start is None or end is None:
            cursor.execute(_WALK_SQL)
        else:
            mark = "%s" if session.get_bind().dialect.name == "postgresql" else "?"
            cursor.execute(_CHUNK_SQL.format(mark=mark), (start, end))
        yield cursor
    finally:
        cursor.close()


def _time_text(moment: Any) -> str:
    """A stored time as ``YYYY-MM-DD HH:MM:SS.ffffff`` (UTC), however the driver gave it."""
    if isinstance(moment, datetime):
        if moment.tzinfo is not None:
            moment = moment.astimezone(UTC).replace(tzinfo=None)
        return str(moment.isoformat(" ", "microseconds"))
    return moment if isinstance(moment, str) else ""


def _utc(raw: Any) -> Any:
    """The stored time as an aware UTC datetime (or as stored, when it is not one)."""
    if isinstance(raw, str):
        parsed = parse_stored_utc(raw)
        return raw if parsed is None else parsed
    if isinstance(raw, datetime):
        return raw.replace(tzinfo=UTC) if raw.tzinfo is None else raw.astimezone(UTC)
    return raw


def _stored(row: tuple[Any, ...]) -> StoredEntry:
    seq, moment, kind, name, role, bundle, consent, prev, entry_hash, canonical = row
    return StoredEntry(
        seq=seq,
        time=_utc(moment),
        kind=kind,
        actor_name=name,
        actor_role=role,
        bundle_id=bundle,
        consent_id=consent,
        prev_hash=bytes(prev),
        entry_hash=bytes(entry_hash),
        canonical=bytes(canonical),
    )


def _placeholder(size: int) -> merkle.CompactRange:
    """A compact range of ``size`` leaves with unknown (zero) hashes.

    For a :class:`ChainVerifier` that checks one entry (its sequence number
    must be ``size``); the span keeps the real tree itself.
    """
    return merkle.CompactRange.restore(size, bytes(merkle.HASH_SIZE * size.bit_count()))


def _check_rows(
    rows: Iterable[tuple[Any, ...]],
    start: int,
    prev: bytes,
    sizes: frozenset[int],
    progress: Callable[[int], None] | None,
) -> _Span:
    """Check the entries ``rows`` (from entry ``start`` on, following ``prev``); fold their tree.

    Every entry's hash, link and columns are checked on the stored bytes. The
    fast path compares the stored bytes with the canonical text of the row's
    own columns around the body, and parses the body once with the C parser
    (``orjson``, stricter than the standard library's); it accepts only what
    :meth:`ChainVerifier.feed` accepts. Whenever it is not sure, the row goes to
    that full check, which either names the problem or passes the entry.

    The tree is over these entries alone: when ``start`` is a multiple of a
    power of two no smaller than the number of rows, its subtrees are exactly
    the ledger's (what the parallel walk joins).
    """
    sha256 = hashlib.sha256
    loads = orjson.loads
    quote = encode_basestring
    time_of_day = _TIME_OF_DAY.fullmatch
    heads: dict[tuple[str, str | None], str] = {}
    days: dict[str, bool] = {}
    tree = merkle.CompactRange()
    pending: list[bytes] = []
    room = _BLOCK
    size = start
    prev_hex = prev.hex()
    span = _Span(start, prev, start, prev, tree, {}, {})
    marks = span.marks
    made = span.made
    next_progress = (start // _PROGRESS_EVERY + 1) * _PROGRESS_EVERY
    for row in rows:
        ok = False
        seq, moment, kind, name, role, bundle, consent, prev_raw, hash_raw, canonical = row
        digest = sha256(_ENTRY_PREFIX + canonical).digest()
        if digest == hash_raw and prev_raw == prev and len(canonical) <= _MAX_ENTRY_BYTES:
            try:
                # The wire time of the stored one: SQLite's text form checked here
                # (each calendar day once), anything else by the general function.
                if (
                    type(moment) is str
                    and len(moment) == 26
                    and moment[10] == " "
                    and time_of_day(moment, 11)
                ):
                    day = moment[:10]
                    known_day = days.get(day)
                    if known_day is None:
                        known_day = days[day] = is_calendar_day(day)
                    wire_time = f"{day}T{moment[11:]}Z" if known_day else None
                else:
                    wire_time = stored_micro_text(_time_text(moment))
                if kind in _KNOWN_KINDS and wire_time is not None:
                    # The entry must be, byte for byte, the canonical form of the
                    # row's columns around a body that is one JSON object.
                    text = canonical.decode()
                    head = heads.get((name, role))
                    if head is None:
                        head = heads[(name, role)] = (
                            f'{{"actor":{{"name":{quote(name)},"role":'
                            f'{"null" if role is None else quote(role)}}},"body":'
                        )
                    tail = (
                        f',"bundle_id":{"null" if bundle is None else quote(bundle)}'
                        f',"consent_id":{"null" if consent is None else quote(consent)}'
                        f',"kind":"{kind}","prev_hash":"{prev_hex}","seq":{size}'
                        f',"time":"{wire_time}","v":1}}'
                    )
                    if seq == size and text.startswith(head) and text.endswith(tail):
                        # One parse of the body, by the C parser; a body it refuses
                        # goes to the full check, which names the problem.
                        body = loads(text[len(head) : len(text) - len(tail)])
                        ok = type(body) is dict
            except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
                ok = False
        if ok:
            if kind == _MADE:
                made[size] = body
            pending.append(digest)
            size += 1
            prev = digest
            prev_hex = digest.hex()
            if len(pending) == room:
                room = _fold(tree, pending)
        else:
            room = _fold(tree, pending)
            verifier = ChainVerifier.resume(_placeholder(size), prev)
            problem = verifier.feed(_stored(row))
            entry = verifier.last
            if problem is not None or entry is None:
                span.problem = problem
                break
            if entry.kind is EntryKind.CHECKPOINT_MADE:
                made[size] = entry.body
            tree.append_leaf_hash(entry.leaf_hash)
            room = _BLOCK - tree.size % _BLOCK
            size += 1
            prev = entry.entry_hash
            prev_hex = prev.hex()
        if size in sizes:
            room = _fold(tree, pending)
            marks[size] = tree.copy()
        if progress is not None and size >= next_progress:
            progress(size)
            next_progress += _PROGRESS_EVERY
    _fold(tree, pending)
    span.size = size
    span.head_hash = prev
    return span


def _walk(
    session: Session,
    sizes: frozenset[int],
    made_entries: dict[int, dict[str, Any]],
    progress: Callable[[int], None] | None,
) -> _Walk:
    """The serial walk: every entry checked in order, in the session's transaction."""
    with _raw_rows(session) as rows:
        span = _check_rows(rows, 0, GENESIS_PREV_HASH, sizes, progress)
    made_entries.update(span.made)
    if progress is not None:
        progress(span.size)
    return _Walk(
        size=span.size,
        root_value=span.tree.root(),
        head_hash=span.head_hash,
        roots={size: mark.root() for size, mark in span.marks.items()},
        problem=span.problem,
        tree=span.tree,
    )


# --- the parallel walk --------------------------------------------------------


@dataclass(frozen=True)
class Parallelism:
    """How ``ledger verify`` spreads a large ledger over worker processes.

    ``chunk`` (a power of two) entries per task, ``workers`` processes in
    all (the verifying process among them, so ``workers - 1`` are started);
    a ledger of fewer than ``minimum`` entries (or ``workers`` below two) is
    walked serially, where starting the processes would cost more than they
    save. With ``spare_cores_only``, no more processes than the cores the
    1-minute load average leaves free, plus this one: on a machine whose
    cores are busy a worker gains no wall time and costs its start.
    """

    workers: int
    chunk: int = 1 << 16
    minimum: int = 1 << 18
    spare_cores_only: bool = False

    def __post_init__(self) -> None:
        if self.chunk < 1 or self.chunk & (self.chunk - 1):
            raise ValueError(f"a chunk of {self.chunk} entries is not a power of two")


def _usable_cores() -> int:
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def _spare_cores() -> int:
    """Usable cores the 1-minute load average leaves free, counting this process's own."""
    return _usable_cores() - int(os.getloadavg()[0]) + 1


PARALLEL = Parallelism(workers=min(_usable_cores(), 8), spare_cores_only=True)
"""The default: as many processes as usable cores (at most 8), the verifying one among them,
as far as the load leaves cores free."""

_CHUNK_SQL = (
    "SELECT seq, time, kind, actor_name, actor_role, bundle_id, consent_id, prev_hash, "
    "entry_hash, canonical FROM ledger_entry WHERE seq >= {mark} AND seq < {mark} ORDER BY seq"
)
_SNAPSHOT_ID = re.compile(r"[0-9A-F]{1,16}(?:-[0-9A-F]{1,16}){1,2}")

Source = tuple[str, str, str | None]
"""Where a worker reads: ``("sqlite", file, None)`` or ``("postgresql", conninfo, snapshot)``."""

_WORKER_CONNECTIONS: dict[Source, Any] = {}
"""A worker process's open connection per source (one process verifies many chunks)."""


def _source(session: Session) -> Source | None:
    """Where worker processes can read what this session's transaction sees, if anywhere.

    SQLite: the database file (the ledger is append-only, so the entries below
    the size counted here are the same for every reader). PostgreSQL: the
    server and this transaction's snapshot, exported for the workers to share.
    An in-memory database or a savepoint gives ``None``: the walk stays serial.
    """
    bind = session.get_bind()
    url = bind.engine.url
    if bind.dialect.name == "sqlite":
        database = url.database
        if not database or database == ":memory:" or database.startswith("file:"):
            return None
        return ("sqlite", str(Path(database).resolve()), None)
    if bind.dialect.name != "postgresql" or session.in_nested_transaction():
        return None
    snapshot = session.connection().exec_driver_sql("SELECT pg_export_snapshot()").scalar_one()
    if not isinstance(snapshot, str) or not _SNAPSHOT_ID.fullmatch(snapshot):
        return None
    conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
    return ("postgresql", conninfo, snapshot)


def _chunk_rows_sqlite(path: str, start: int, end: int, sizes: frozenset[int]) -> _Span:
    connection = _WORKER_CONNECTIONS.get(("sqlite", path, None))
    if connection is None:
        connection = sqlite3.connect(
            f"file:{urllib.parse.quote(path)}?mode=ro",
            uri=True,
            timeout=SQLITE_BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
        )
        _WORKER_CONNECTIONS[("sqlite", path, None)] = connection
    connection.execute("BEGIN")
    try:
        cursor = connection.execute(_CHUNK_SQL.format(mark="?"), (start, end))
        cursor.arraysize = _WALK_BATCH
        return _span_of(cursor, start, sizes)
    finally:
        connection.rollback()


def _chunk_rows_postgresql(
    conninfo: str, snapshot: str, start: int, end: int, sizes: frozenset[int]
) -> _Span:
    import psycopg  # noqa: PLC0415 - only a worker on PostgreSQL needs the driver here
    from psycopg import sql  # noqa: PLC0415

    key: Source = ("postgresql", conninfo, snapshot)
    connection = _WORKER_CONNECTIONS.get(key)
    if connection is None:
        connection = psycopg.connect(conninfo, connect_timeout=10)
        connection.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        connection.read_only = True
        _WORKER_CONNECTIONS[key] = connection
    try:
        # The first statement of the transaction: it then sees what the parent's does.
        connection.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        with connection.cursor(name="ledger_verify_chunk") as cursor:
            cursor.itersize = _WALK_BATCH
            cursor.execute(_CHUNK_SQL.format(mark="%s"), (start, end))
            return _span_of(cursor, start, sizes)
    finally:
        connection.rollback()


def _span_of(rows: Iterable[tuple[Any, ...]], start: int, sizes: frozenset[int]) -> _Span:
    """The span of a chunk, taking its first entry to follow what it names (the parent checks)."""
    iterator = iter(rows)
    first = next(iterator, None)
    if first is None:
        return _Span(start, b"", start, b"", merkle.CompactRange(), {}, {})
    prev = first[7] if isinstance(first[7], bytes) else bytes(merkle.HASH_SIZE)
    return _check_rows(itertools.chain((first,), iterator), start, prev, sizes, None)


def _check_chunk(source: Source, start: int, end: int, sizes: frozenset[int]) -> _Span | None:
    """In a worker process: the span of entries ``start..end-1``; ``None`` if unreadable."""
    engine, location, snapshot = source
    if engine == "sqlite":
        try:
            return _chunk_rows_sqlite(location, start, end, sizes)
        except sqlite3.Error:
            return None
    import psycopg  # noqa: PLC0415

    try:
        return _chunk_rows_postgresql(location, snapshot or "", start, end, sizes)
    except psycopg.Error:
        return None


def _joined(tree: merkle.CompactRange, span_tree: merkle.CompactRange) -> merkle.CompactRange:
    """``tree`` followed by the leaves of ``span_tree`` (aligned: its subtrees fit as they are)."""
    joined = tree.copy()
    nodes = span_tree.to_bytes()
    bits = [
        bit for bit in range(span_tree.size.bit_length() - 1, -1, -1) if span_tree.size >> bit & 1
    ]
    for index, bit in enumerate(bits):
        joined.append_subtree(
            nodes[index * merkle.HASH_SIZE : (index + 1) * merkle.HASH_SIZE], 1 << bit
        )
    return joined


def _walk_parallel(
    session: Session,
    sizes: frozenset[int],
    made_entries: dict[int, dict[str, Any]],
    progress: Callable[[int], None] | None,
    parallel: Parallelism,
) -> _Walk | None:
    """The walk spread over worker processes; ``None`` when the serial walk must do it.

    The entries are cut into aligned chunks of ``parallel.chunk`` (a power of
    two), each checked by a worker as the serial walk would, taking its first
    entry to follow the hash that entry names. Here the chunks are joined in
    order: each first entry must follow the last one before it (the serial
    walk's link check), and the chunks' Merkle subtrees fold into the
    ledger's tree and the roots at checkpoint sizes. The first problem in
    ledger order is the serial walk's: the checks of an entry other than its
    link do not depend on the entry before it. Anything unusual (sequence
    numbers not exactly ``0..n-1``, a worker that cannot read, or reads less
    than counted here) leaves it to the serial walk, which names it.
    """
    workers = parallel.workers
    if parallel.spare_cores_only:
        workers = min(workers, _spare_cores())
    if workers < 2:
        return None
    count, lowest, highest = (
        session.connection()
        .exec_driver_sql("SELECT count(*), min(seq), max(seq) FROM ledger_entry")
        .one()
    )
    if count < max(parallel.minimum, 2) or count <= parallel.chunk:
        return None
    if (lowest, highest) != (0, count - 1):
        return None
    source = _source(session)
    if source is None:
        return None
    chunk = parallel.chunk
    ranges = [(start, min(start + chunk, count)) for start in range(0, count, chunk)]
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(min(workers, len(ranges)) - 1, context) as pool:
            # The workers take the chunks from the end, this process from the start:
            # a chunk no worker has taken yet is checked here, in this transaction.
            futures = {
                start: pool.submit(_check_chunk, source, start, end, _sizes_in(sizes, start, end))
                for start, end in reversed(ranges)
            }

            def span_of(start: int, end: int) -> _Span | None:
                if futures[start].cancel():
                    with _raw_rows(session, start, end) as rows:
                        return _span_of(rows, start, _sizes_in(sizes, start, end))
                return futures[start].result()

            try:
                return _join(span_of, ranges, made_entries, progress)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    except BrokenProcessPool:
        return None


def _sizes_in(sizes: frozenset[int], start: int, end: int) -> frozenset[int]:
    return frozenset(size for size in sizes if start < size <= end)


def _join(
    span_of: Callable[[int, int], _Span | None],
    ranges: list[tuple[int, int]],
    made_entries: dict[int, dict[str, Any]],
    progress: Callable[[int], None] | None,
) -> _Walk | None:
    """The chunks' spans joined in order into the walk over the whole ledger (see above)."""
    tree = merkle.CompactRange()
    head = GENESIS_PREV_HASH
    roots: dict[int, bytes] = {}
    made: dict[int, dict[str, Any]] = {}
    problem: ChainProblem | None = None
    next_progress = _PROGRESS_EVERY
    for start, end in ranges:
        span = span_of(start, end)
        if span is None or (span.problem is None and span.size != end):
            return None  # the worker could not read, or saw fewer entries than counted here
        if (span.problem is None or span.problem.seq != start) and not hmac.compare_digest(
            span.first_prev, head
        ):
            problem = broken_link(start)
            break
        for size, mark in span.marks.items():
            roots[size] = _joined(tree, mark).root()
        made.update(span.made)
        tree = _joined(tree, span.tree)
        head = span.head_hash
        if span.problem is not None:
            problem = span.problem
            break
        while progress is not None and tree.size >= next_progress:
            progress(next_progress)
            next_progress += _PROGRESS_EVERY
    while progress is not None and tree.size >= next_progress:
        progress(next_progress)
        next_progress += _PROGRESS_EVERY
    made_entries.update(made)
    if progress is not None:
        progress(tree.size)
    return _Walk(
        size=tree.size,
        root_value=tree.root(),
        head_hash=head,
        roots=roots,
        problem=problem,
        tree=tree,
    )


def walk_chain(session: Session) -> tuple[ChainProblem | None, ChainVerifier]:
    """The fast walk over every entry: its first problem, and a verifier positioned after it.

    For a checkpoint with no checkpoint before it to start from (see
    :func:`gateway.node.ledger.checkpoint.make_checkpoint`).
    """
    walk = _walk(session, frozenset(), {}, None)
    return walk.problem, ChainVerifier.resume(walk.tree, walk.head_hash)


def _head_problem(session: Session, walk: _Walk) -> ChainProblem | None:
    """The head state the appends keep must name what the walk found."""
    table = LedgerStateRow.__table__
    row = (
        session.connection()
        .execute(
            select(table.c.size, table.c.head_hash, table.c.compact).where(
                table.c.id == LEDGER_STATE_ID
            )
        )
        .first()
    )
    if row is None:
        return None  # made again from the entries at the next append
    size, head_hash, compact = int(row[0]), bytes(row[1]), bytes(row[2])
    try:
        root = merkle.CompactRange.restore(size, compact).root()
    except ValueError:
        root = b""
    if (size, head_hash, root) == (walk.size, walk.head_hash, walk.root()):
        return None
    return ChainProblem(
        min(size, walk.size),
        "chain",
        f"the ledger head state names {size} entries and another last entry or root than "
        f"the {walk.size} entries stored: entries were removed or added around the service",
    )


def verify_ledger(
    session: Session,
    *,
    own_keys: SigningKeyLookup | None = None,
    peer_keys: SigningKeyLookup | None = None,
    peer_node: str | None = None,
    progress: Callable[[int], None] | None = None,
    parallel: Parallelism = PARALLEL,
) -> VerifyReport:
    """Check the whole ledger, streaming; the report names the first bad entry.

    Checked: every entry's hash and link to the one before (sequence without
    gaps), the columns against the hashed bytes, every checkpoint's signature
    (with ``own_keys``) and root, the entry recording each checkpoint, the
    signatures of the peer's checkpoints we witnessed (with ``peer_keys``),
    and the head state the appends keep. ``progress(n)`` is called every
    100,000 entries and at the end. Memory does not grow with the ledger.

    A ledger of at least ``parallel.minimum`` entries is walked by worker
    processes, chunk by chunk (:func:`_walk_parallel`); the report is the
    one the serial walk gives.
    """
    node = node_id(session)
    sizes = frozenset(session.scalars(select(LedgerCheckpointRow.size)).all())
    made_entries: dict[int, dict[str, Any]] = {}
    report = VerifyReport()
    passed = 0

    def parallel_progress(entries: int) -> None:
        nonlocal passed
        passed = max(passed, entries)
        if progress is not None:
            progress(entries)

    def serial_progress(entries: int) -> None:
        # After a parallel walk gave up part-way: no count twice.
        if progress is not None and entries > passed:
            progress(entries)

    walk = _walk_parallel(session, sizes, made_entries, parallel_progress, parallel)
    if walk is None:
        walk = _walk(session, sizes, made_entries, serial_progress if progress else None)
    report.entries = walk.size
    report.root = walk.root()
    report.checkpoints = len(sizes)
    problems: list[ChainProblem] = []
    if walk.problem is not None:
        problems.append(walk.problem)
    problems.extend(_checkpoint_problems(session, walk, made_entries, own_keys, node, report.notes))
    if own_keys is None:
        report.notes.append("checkpoint signatures not checked: no key manifest given")
    if peer_keys is not None and peer_node is not None:
        report.witnessed, witness = _witness_problems(session, peer_keys, peer_node, report.notes)
        problems.extend(witness)
    if problems:
        # The chain problem (if any) comes first: it names the exact entry.
        chain = [p for p in problems if p.check in ("chain", "entry-hash")]
        report.problem = (
            chain[0]
            if chain
            else min(problems, key=lambda p: (p.seq is None, p.seq if p.seq is not None else 0))
        )
    elif walk.problem is None:
        # Only when all else is intact: a head state out of step names no entry as
        # precisely as the checks above.
        report.problem = _head_problem(session, walk)
    return report
