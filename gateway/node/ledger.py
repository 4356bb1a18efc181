"""The ledger service: append entries, sign checkpoints, verify, export, witness.

Every function takes the caller's session and works inside the caller's
transaction, except :func:`audit_peer`, which talks to the peer and so opens
its own short transactions around the network call.

Appends are serialised: on SQLite every transaction is ``BEGIN IMMEDIATE``
(one writer at a time); on PostgreSQL :func:`record_event` first takes a
transaction-scoped advisory lock, so the next sequence number is read and
written under it. The primary key on ``seq`` and the unique entry hash are
the last guard: two appends that raced past both would collide and one would
roll back.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, BinaryIO, Literal

from nacl.signing import VerifyKey
from sqlalchemy import Select, select, text
from sqlalchemy.orm import Session

from gateway.core import ledger as core
from gateway.core import merkle
from gateway.core.ledger import (
    ChainProblem,
    ChainVerifier,
    Checkpoint,
    CheckpointInvalid,
    CheckpointSigner,
    EntryKind,
    LedgerEntry,
    LedgerVerificationFailed,
    SignedCheckpoint,
    SigningKeyLookup,
    StoredEntry,
    WitnessMismatch,
    audit_peer_answer,
    format_time,
    load_signed_checkpoint,
    make_entry,
    parse_entry,
    parse_signed_checkpoint,
    sign_checkpoint,
    verify_checkpoint,
)
from gateway.core.roles import SYSTEM, Actor
from gateway.core.times import DateMeans, parse_user_time
from gateway.errors import GatewayError, InvalidInput, NotFound, RefusedError, StorageError
from gateway.store.db import Database
from gateway.store.models import NodeRecord
from gateway.store.models_ledger import LedgerCheckpointRow, LedgerEntryRow, WitnessedCheckpointRow

__all__ = [
    "AuditResult",
    "ConsistencyProofRequired",
    "ExportFormat",
    "PeerAnswer",
    "VerifyReport",
    "audit_peer",
    "checkpoint_at",
    "consistency_proof",
    "consistency_prover",
    "export",
    "inclusion_proof",
    "last_witnessed",
    "latest_checkpoint",
    "ledger_size",
    "list_entries",
    "lock_for_append",
    "make_checkpoint",
    "parse_since",
    "record_event",
    "store_peer_checkpoint",
    "verify_ledger",
]

ExportFormat = Literal["csv", "jsonl"]

_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"ssw-gateway/ledger-append").digest()[:8], "big", signed=True
)
_STREAM_BATCH = 5000
MAX_LIST_LIMIT = 100_000


class ConsistencyProofRequired(RefusedError):
    """A larger peer checkpoint came without a proof that it extends our witness."""

    reason = "ledger.proof-required"

    def __init__(self, message: str, *, witnessed_size: int) -> None:
        super().__init__(message)
        self.witnessed_size = witnessed_size


def lock_for_append(session: Session) -> None:
    """Serialise appends: an advisory lock on PostgreSQL; SQLite's BEGIN IMMEDIATE suffices."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})


def _head(session: Session) -> tuple[int, bytes]:
    """(next sequence number, hash of the last entry) of the ledger."""
    row = session.execute(
        select(LedgerEntryRow.seq, LedgerEntryRow.entry_hash)
        .order_by(LedgerEntryRow.seq.desc())
        .limit(1)
    ).first()
    if row is None:
        return 0, bytes(32)
    return int(row.seq) + 1, bytes(row.entry_hash)


def ledger_size(session: Session) -> int:
    """The number of entries (the next sequence number)."""
    return _head(session)[0]


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
    """
    lock_for_append(session)
    seq, prev_hash = _head(session)
    entry = make_entry(
        seq=seq,
        now=now,
        kind=kind,
        actor=actor,
        prev_hash=prev_hash,
        bundle_id=bundle_id,
        consent_id=consent_id,
        body=body,
    )
    session.add(LedgerEntryRow(**dataclasses.asdict(entry.as_stored())))
    session.flush()
    return entry


# --- reading -------------------------------------------------------------


_EntrySelect = Select[*tuple[Any, ...]]
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


def _select_entries() -> _EntrySelect:
    """Plain column rows (no ORM objects, no identity map): what streaming needs."""
    return select(*_ENTRY_COLUMNS).order_by(LedgerEntryRow.seq)


def _stream(session: Session, statement: _EntrySelect) -> Iterator[StoredEntry]:
    """Rows in batches through a server-side cursor; memory stays bounded.

    Executed on the session's connection (Core rows, no ORM loading): the
    same transaction, a fraction of the per-row cost.
    """
    result = session.connection().execute(
        statement.execution_options(yield_per=_STREAM_BATCH, stream_results=True)
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


def _entry_of(row: StoredEntry) -> LedgerEntry:
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
    statement = _select_entries()
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
    for row in _stream(session, statement):
        yield _entry_of(row)


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


# --- checkpoints ----------------------------------------------------------


def _signed_of(row: LedgerCheckpointRow | WitnessedCheckpointRow) -> SignedCheckpoint:
    """A stored checkpoint as signed: parsed from the kept body bytes."""
    return load_signed_checkpoint(bytes(row.body), bytes(row.signature))


def latest_checkpoint(session: Session) -> SignedCheckpoint | None:
    """The newest checkpoint this node signed, or ``None``."""
    row = session.scalars(
        select(LedgerCheckpointRow).order_by(LedgerCheckpointRow.size.desc()).limit(1)
    ).first()
    return None if row is None else _signed_of(row)


def checkpoint_at(session: Session, size: int) -> SignedCheckpoint:
    """Our signed checkpoint of exactly ``size`` entries."""
    row = session.get(LedgerCheckpointRow, size)
    if row is None:
        raise NotFound(f"no checkpoint of size {size} was published")
    return _signed_of(row)


def _node_id(session: Session) -> str:
    owners = session.scalars(select(NodeRecord.node_id)).all()
    if len(owners) != 1:
        raise StorageError("the database does not name exactly one node")
    return owners[0]


def make_checkpoint(
    session: Session, keyring: CheckpointSigner, now: datetime, *, actor: Actor = SYSTEM
) -> SignedCheckpoint:
    """Sign a checkpoint of the whole ledger as it stands, and record that we did.

    The chain is verified first and the roots of earlier checkpoints are
    recomputed, so a tampered ledger is never signed over. When nothing
    happened since the last checkpoint (its own ``checkpoint-made`` entry
    aside) that checkpoint is returned and nothing new is signed; a ledger
    *smaller* than the last checkpoint is refused.
    """
    lock_for_append(session)
    node = _node_id(session)
    previous = latest_checkpoint(session)
    sizes = frozenset(session.scalars(select(LedgerCheckpointRow.size)).all())
    verifier = ChainVerifier(root_sizes=sizes)
    for row in _stream(session, _select_entries()):
        problem = verifier.feed(row)
        if problem is not None:
            raise problem.error()
    for size in sorted(sizes):
        root = verifier.roots.get(size)
        signed = checkpoint_at(session, size)
        if root is None or root != signed.checkpoint.root:
            raise LedgerVerificationFailed(
                f"the ledger no longer matches our checkpoint of size {size}; "
                "refusing to sign over it",
                check="checkpoint",
                seq=size - 1,
            )
    if previous is not None:
        if verifier.size < previous.checkpoint.size:
            raise LedgerVerificationFailed(
                f"the ledger has {verifier.size} entries, fewer than the {previous.checkpoint.size} "
                "already published",
                check="checkpoint",
                seq=verifier.size,
            )
        only_its_own_record = (
            verifier.size == previous.checkpoint.size + 1
            and verifier.last is not None
            and verifier.last.kind is EntryKind.CHECKPOINT_MADE
        )
        if verifier.size == previous.checkpoint.size or only_its_own_record:
            return previous
    checkpoint = core.make_checkpoint(
        node=node,
        size=verifier.size,
        root=verifier.root(),
        now=now,
        key_id=keyring.signing_key_id,
    )
    signed = sign_checkpoint(checkpoint, keyring)
    session.add(
        LedgerCheckpointRow(
            size=checkpoint.size,
            root=checkpoint.root,
            time=checkpoint.time,
            key_id=checkpoint.key_id,
            body=signed.body,
            signature=signed.signature,
        )
    )
    record_event(
        session,
        kind=EntryKind.CHECKPOINT_MADE,
        actor=actor,
        now=now,
        body={"size": checkpoint.size, "root": checkpoint.root.hex(), "key_id": checkpoint.key_id},
    )
    return signed


# --- proofs ---------------------------------------------------------------


def _leaf_hashes(session: Session, size: int) -> list[bytes]:
    result = session.execute(
        select(LedgerEntryRow.entry_hash)
        .where(LedgerEntryRow.seq < size)
        .order_by(LedgerEntryRow.seq)
        .execution_options(yield_per=_STREAM_BATCH * 4, stream_results=True)
    )
    hashes = [merkle.leaf_hash(bytes(value)) for value in result.scalars()]
    if len(hashes) != size:
        raise NotFound(f"the ledger has {len(hashes)} entries, not {size}")
    return hashes


def consistency_proof(session: Session, old_size: int, new_size: int) -> list[bytes]:
    """RFC 9162 proof that our first ``old_size`` entries are a prefix of ``new_size``."""
    if not 0 < old_size <= new_size:
        raise InvalidInput(f"no consistency proof from size {old_size} to size {new_size}")
    return merkle.consistency_proof(old_size, _leaf_hashes(session, new_size))


def inclusion_proof(session: Session, seq: int, size: int) -> list[bytes]:
    """RFC 9162 proof that entry ``seq`` is in the tree of the first ``size`` entries."""
    if not 0 <= seq < size:
        raise InvalidInput(f"entry {seq} is not in a tree of {size} entries")
    return merkle.inclusion_proof(seq, _leaf_hashes(session, size))


# --- verification ---------------------------------------------------------


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
    verifier: ChainVerifier,
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
            signed = _signed_of(row)
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
            signed = _signed_of(row)
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
    (with ``own_keys``) and root, the entry recording each checkpoint, and
    the signatures of the peer's checkpoints we witnessed (with ``peer_keys``).
    """
    node = _node_id(session)
    sizes = frozenset(session.scalars(select(LedgerCheckpointRow.size)).all())
    verifier = ChainVerifier(root_sizes=sizes)
    made_entries: dict[int, dict[str, Any]] = {}
    report = VerifyReport()
    for row in _stream(session, _select_entries()):
        if verifier.feed(row) is not None:
            break
        last = verifier.last
        if last is not None and last.kind is EntryKind.CHECKPOINT_MADE:
            made_entries[last.seq] = last.body
        if progress is not None and verifier.size % 100_000 == 0:
            progress(verifier.size)
    report.entries = verifier.size
    report.root = verifier.root()
    report.checkpoints = len(sizes)
    problems: list[ChainProblem] = []
    if verifier.problem is not None:
        problems.append(verifier.problem)
    problems.extend(
        _checkpoint_problems(session, verifier, made_entries, own_keys, node, report.notes)
    )
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
    return report


# --- export ---------------------------------------------------------------

_CSV_FIELDS = (
    "seq",
    "time",
    "kind",
    "actor",
    "role",
    "bundle_id",
    "consent_id",
    "body",
    "prev_hash",
    "entry_hash",
)


def _csv_safe(value: object) -> str:
    """A cell that no spreadsheet will run as a formula."""
    if value is None:
        return ""
    text_value = str(value)
    if text_value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + text_value
    return text_value


def export(session: Session, fmt: ExportFormat, out: BinaryIO) -> int:
    """Write every entry to ``out`` as CSV or JSON Lines, streaming; return the count.

    JSON Lines carry the hashed canonical bytes too (``entry``), so anyone can
    recompute the chain from the export alone.
    """
    if fmt not in ("csv", "jsonl"):
        raise InvalidInput(f"export format must be csv or jsonl, not {fmt!r}")
    count = 0
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow(_CSV_FIELDS)
        for entry in iter_entries(session):
            data = entry.to_dict()
            data["body"] = json.dumps(entry.body, sort_keys=True, ensure_ascii=False)
            writer.writerow([_csv_safe(data[name]) for name in _CSV_FIELDS])
            count += 1
            if buffer.tell() > 1 << 16:
                out.write(buffer.getvalue().encode("utf-8"))
                buffer.seek(0)
                buffer.truncate()
        out.write(buffer.getvalue().encode("utf-8"))
        return count
    for entry in iter_entries(session):
        line = entry.to_dict()
        line["entry"] = entry.canonical.decode("utf-8", errors="replace")
        out.write(json.dumps(line, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n")
        count += 1
    return count


# --- witnessing -----------------------------------------------------------


def last_witnessed(session: Session, peer_node: str) -> Checkpoint | None:
    """The largest checkpoint of ``peer_node`` we hold as its witness."""
    row = session.scalars(
        select(WitnessedCheckpointRow)
        .where(WitnessedCheckpointRow.node == peer_node)
        .order_by(WitnessedCheckpointRow.size.desc())
        .limit(1)
    ).first()
    return None if row is None else _signed_of(row).checkpoint


def store_peer_checkpoint(
    session: Session,
    raw: bytes,
    peer_keys: SigningKeyLookup,
    *,
    peer_node: str,
    now: datetime,
    proof: list[bytes] | None = None,
) -> Checkpoint:
    """Verify a checkpoint the peer signed and keep it as its witness.

    Refused: a bad signature or wrong node (:class:`CheckpointInvalid`); a
    checkpoint older than the newest one witnessed (:class:`RefusedError`); a
    larger one without a consistency proof from the newest one witnessed
    (:class:`ConsistencyProofRequired`, which names that size); another root
    for a size already witnessed, or a tree the proof does not show to extend
    the newest one witnessed
    (:class:`WitnessMismatch`: the caller records the equivocation in its
    own transaction, as this one rolls back). The same checkpoint again is
    accepted and changes nothing.
    """
    signed = parse_signed_checkpoint(raw)
    checkpoint = verify_checkpoint(signed, peer_keys, node=peer_node)
    same_size = session.scalars(
        select(WitnessedCheckpointRow).where(
            WitnessedCheckpointRow.node == peer_node,
            WitnessedCheckpointRow.size == checkpoint.size,
        )
    ).first()
    if same_size is not None:
        if bytes(same_size.root) == checkpoint.root:
            return checkpoint
        raise WitnessMismatch(
            f"{peer_node} signed two different roots for size {checkpoint.size}: equivocation"
        )
    newest = last_witnessed(session, peer_node)
    if newest is not None:
        if proof is not None:
            audit_peer_answer(newest, checkpoint, proof)
        if checkpoint.size < newest.size:
            raise RefusedError(
                f"checkpoint of size {checkpoint.size} is older than the {newest.size} witnessed",
                reason="ledger.stale-checkpoint",
            )
        if proof is None:
            # Every witnessed checkpoint is proven to extend the one before it, so the
            # witness is one consistent history: a larger tree without that proof could
            # be a rewritten ledger that merely grew.
            raise ConsistencyProofRequired(
                f"a checkpoint of size {checkpoint.size} needs a consistency proof from "
                f"the size {newest.size} witnessed",
                witnessed_size=newest.size,
            )
    session.add(
        WitnessedCheckpointRow(
            node=peer_node,
            size=checkpoint.size,
            root=checkpoint.root,
            time=checkpoint.time,
            key_id=checkpoint.key_id,
            body=signed.body,
            signature=signed.signature,
            received_at=now,
        )
    )
    record_event(
        session,
        kind=EntryKind.CHECKPOINT_RECEIVED,
        actor=SYSTEM,
        now=now,
        body={
            "node": peer_node,
            "size": checkpoint.size,
            "root": checkpoint.root.hex(),
            "key_id": checkpoint.key_id,
        },
    )
    return checkpoint


@dataclass(frozen=True)
class PeerAnswer:
    """The peer's answer to a consistency question: its signed checkpoint and the proof."""

    checkpoint: bytes
    proof: list[bytes]


@dataclass(frozen=True)
class AuditResult:
    """What ``audit-peer`` established."""

    peer: str
    witnessed_size: int | None
    current_size: int | None
    consistent: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
            "witnessed_size": self.witnessed_size,
            "current_size": self.current_size,
            "consistent": self.consistent,
            "message": self.message,
        }


def consistency_prover(db: Database) -> Callable[[int, int], list[bytes]]:
    """A function giving our consistency proof between two sizes, each in its own read."""

    def prove(first: int, second: int) -> list[bytes]:
        with db.transaction() as session:
            return consistency_proof(session, first, second)

    return prove


def audit_peer(
    db: Database,
    peer_keys: SigningKeyLookup,
    *,
    peer_node: str,
    fetch: Callable[[int], PeerAnswer],
    now: Callable[[], datetime],
    actor: Actor = SYSTEM,
) -> AuditResult:
    """Ask the peer to prove its ledger extends the newest checkpoint we witnessed.

    ``fetch(first)`` asks the peer (outside any transaction) for its newest
    signed checkpoint and the consistency proof from size ``first``. A peer
    whose history was rewritten is recorded as an ``equivocation`` entry in
    our ledger and reported with :class:`WitnessMismatch` (exit code 4).
    """
    with db.transaction() as session:
        witnessed = last_witnessed(session, peer_node)
    if witnessed is None:
        return AuditResult(
            peer_node, None, None, consistent=True, message="nothing witnessed yet to audit"
        )
    answer = fetch(witnessed.size)
    try:
        with db.transaction() as session:
            current = store_peer_checkpoint(
                session,
                answer.checkpoint,
                peer_keys,
                peer_node=peer_node,
                now=now(),
                proof=answer.proof,
            )
    except WitnessMismatch as exc:
        with db.transaction() as session:
            record_event(
                session,
                kind=EntryKind.EQUIVOCATION,
                actor=actor,
                now=now(),
                body={
                    "node": peer_node,
                    "witnessed_size": witnessed.size,
                    "witnessed_root": witnessed.root.hex(),
                    "problem": exc.message[:500],
                },
            )
        raise
    return AuditResult(
        peer_node,
        witnessed.size,
        current.size,
        consistent=True,
        message=(
            f"{peer_node}'s ledger of {current.size} entries extends the {witnessed.size} "
            f"witnessed at {format_time(witnessed.time)}"
        ),
    )
