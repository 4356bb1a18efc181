"""``gateway ledger verify``: the whole ledger checked, streaming, with bounded memory."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from json.encoder import encode_basestring
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
    format_time,
    verify_checkpoint,
)
from gateway.core.times import is_calendar_day, parse_stored_utc, stored_micro_text
from gateway.errors import GatewayError
from gateway.node.ledger.checkpoint import node_id, signed_of
from gateway.store.models_ledger import (
    LEDGER_STATE_ID,
    LedgerCheckpointRow,
    LedgerStateRow,
    WitnessedCheckpointRow,
)

__all__ = ["VerifyReport", "verify_ledger", "walk_chain"]


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


@contextmanager
def _raw_rows(session: Session) -> Iterator[Iterable[tuple[Any, ...]]]:
    """Every entry row as the driver returns it, in order, in the session's transaction.

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
        cursor.execute(_WALK_SQL)
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


def _walk(
    session: Session,
    sizes: frozenset[int],
    made_entries: dict[int, dict[str, Any]],
    progress: Callable[[int], None] | None,
) -> _Walk:
    """Check every entry's hash, link and columns on the stored bytes; fold the Merkle tree.

    The fast path compares the stored bytes with the canonical text of the
    row's own columns around the body, and parses the body once with the C
    parser (``orjson``, stricter than the standard library's); it accepts
    only what :meth:`ChainVerifier.feed` accepts. Whenever it is not sure, the row goes to
    that full check (resumed at the same place), which either names the problem
    or hands the state back.
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
    size = 0
    prev = GENESIS_PREV_HASH
    prev_hex = prev.hex()
    walk = _Walk()
    roots = walk.roots
    next_progress = _PROGRESS_EVERY
    with _raw_rows(session) as rows:
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
                    made_entries[size] = body
                pending.append(digest)
                size += 1
                prev = digest
                prev_hex = digest.hex()
                if len(pending) == room:
                    room = _fold(tree, pending)
            else:
                room = _fold(tree, pending)
                verifier = ChainVerifier.resume(tree, prev)
                problem = verifier.feed(_stored(row))
                if problem is not None:
                    walk.problem = problem
                    break
                last = verifier.last
                if last is not None and last.kind is EntryKind.CHECKPOINT_MADE:
                    made_entries[last.seq] = last.body
                tree = verifier.compact
                room = _BLOCK - tree.size % _BLOCK
                size = verifier.size
                prev = verifier.head_hash
                prev_hex = prev.hex()
            if size in sizes:
                room = _fold(tree, pending)
                roots[size] = tree.root()
            if progress is not None and size >= next_progress:
                progress(size)
                next_progress += _PROGRESS_EVERY
    _fold(tree, pending)
    walk.size = size
    walk.head_hash = prev
    walk.root_value = tree.root()
    walk.tree = tree
    if progress is not None:
        progress(size)
    return walk


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
) -> VerifyReport:
    """Check the whole ledger, streaming; the report names the first bad entry.

    Checked: every entry's hash and link to the one before (sequence without
    gaps), the columns against the hashed bytes, every checkpoint's signature
    (with ``own_keys``) and root, the entry recording each checkpoint, the
    signatures of the peer's checkpoints we witnessed (with ``peer_keys``),
    and the head state the appends keep. ``progress(n)`` is called every
    100,000 entries and at the end. Memory does not grow with the ledger.
    """
    node = node_id(session)
    sizes = frozenset(session.scalars(select(LedgerCheckpointRow.size)).all())
    made_entries: dict[int, dict[str, Any]] = {}
    report = VerifyReport()
    walk = _walk(session, sizes, made_entries, progress)
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
