"""Signing checkpoints incrementally, and the Merkle proofs between them.

A checkpoint after ``k`` new entries costs O(k + log n): it starts from the
compact range stored with the previous checkpoint (checked to fold to that
checkpoint's *signed* root), checks the ``k`` entries since (hash, link,
columns) and compares the result with the head state the appends keep.
Entries the previous checkpoint covers are not re-read: they are bound by
its signed root (and the peer's witness of it), and ``gateway ledger verify``
walks them all. See docs/ledger.md, "Incremental Merkle state".

Proofs compute each subtree hash they need by streaming that range of stored
entry hashes: O(log n) memory, whatever the ledger's size.
"""

from __future__ import annotations

import hmac
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.core import ledger as core
from gateway.core import merkle
from gateway.core.ledger import (
    ChainVerifier,
    CheckpointSigner,
    EntryKind,
    LedgerVerificationFailed,
    SignedCheckpoint,
    load_signed_checkpoint,
    sign_checkpoint,
)
from gateway.core.roles import SYSTEM, Actor
from gateway.errors import InvalidInput, NotFound, StorageError
from gateway.node.ledger import lock_for_append, read_head, record_event
from gateway.node.ledger.read import STREAM_BATCH, select_entries, stream_entries
from gateway.store.models import NodeRecord
from gateway.store.models_ledger import (
    LedgerCheckpointRow,
    LedgerCheckpointStateRow,
    LedgerEntryRow,
    WitnessedCheckpointRow,
)

__all__ = [
    "BOOKKEEPING_KINDS",
    "checkpoint_at",
    "consistency_proof",
    "grew_since",
    "inclusion_proof",
    "latest_checkpoint",
    "make_checkpoint",
    "node_id",
    "signed_of",
]

BOOKKEEPING_KINDS = (EntryKind.CHECKPOINT_MADE.value, EntryKind.CHECKPOINT_RECEIVED.value)
"""Entries that only record witnessing: publishing a checkpoint over them alone would
make two idle nodes answer each other's checkpoints forever."""


def signed_of(row: LedgerCheckpointRow | WitnessedCheckpointRow) -> SignedCheckpoint:
    """A stored checkpoint as signed: parsed from the kept body bytes."""
    return load_signed_checkpoint(bytes(row.body), bytes(row.signature))


def latest_checkpoint(session: Session) -> SignedCheckpoint | None:
    """The newest checkpoint this node signed, or ``None``."""
    row = session.scalars(
        select(LedgerCheckpointRow).order_by(LedgerCheckpointRow.size.desc()).limit(1)
    ).first()
    return None if row is None else signed_of(row)


def checkpoint_at(session: Session, size: int) -> SignedCheckpoint:
    """Our signed checkpoint of exactly ``size`` entries."""
    row = session.get(LedgerCheckpointRow, size)
    if row is None:
        raise NotFound(f"no checkpoint of size {size} was published")
    return signed_of(row)


def node_id(session: Session) -> str:
    """This node's id (``jp`` or ``pk``); :class:`StorageError` unless exactly one is named."""
    owners = session.scalars(select(NodeRecord.node_id)).all()
    if len(owners) != 1:
        raise StorageError("the database does not name exactly one node")
    return owners[0]


def grew_since(session: Session, size: int) -> bool:
    """Whether an entry other than witnessing bookkeeping was appended at ``seq >= size``.

    ``checkpoint-made`` and ``checkpoint-received`` entries alone are not growth
    worth a checkpoint (see :data:`BOOKKEEPING_KINDS`). A range scan on the
    primary key from ``size``: O(k) for k entries since.
    """
    found = session.connection().execute(
        select(LedgerEntryRow.seq)
        .where(LedgerEntryRow.seq >= size, LedgerEntryRow.kind.not_in(BOOKKEEPING_KINDS))
        .limit(1)
    )
    return found.first() is not None


def _refuse(size: int, why: str) -> LedgerVerificationFailed:
    return LedgerVerificationFailed(
        f"the ledger no longer matches our checkpoint of size {size} ({why}); "
        "refusing to sign over it. Run 'gateway ledger verify'",
        check="checkpoint",
        seq=max(size - 1, 0),
    )


def _entry_hash_at(session: Session, seq: int) -> bytes | None:
    value = (
        session.connection()
        .execute(select(LedgerEntryRow.entry_hash).where(LedgerEntryRow.seq == seq))
        .scalar()
    )
    return None if value is None else bytes(value)


def _resume_after(session: Session, previous: SignedCheckpoint) -> ChainVerifier:
    """A verifier positioned after the previous checkpoint, anchored on its signed root."""
    size = previous.checkpoint.size
    row = session.get(LedgerCheckpointRow, size)
    if row is None or (bytes(row.root), row.size) != (previous.checkpoint.root, size):
        raise _refuse(size, "its stored columns differ from its signed body")
    if size == 0:
        return ChainVerifier()
    stored = session.get(LedgerCheckpointStateRow, size)
    if stored is None:
        compact = merkle.CompactRange()
        for (value,) in session.connection().execute(
            select(LedgerEntryRow.entry_hash)
            .where(LedgerEntryRow.seq < size)
            .order_by(LedgerEntryRow.seq)
            .execution_options(yield_per=STREAM_BATCH * 4, stream_results=True)
        ):
            compact.append_leaf_hash(merkle.leaf_hash(bytes(value)))
        if compact.size != size:
            raise _refuse(size, "entries it covers are gone")
    else:
        try:
            compact = merkle.CompactRange.restore(size, bytes(stored.compact))
        except ValueError:
            raise _refuse(size, "its stored Merkle state is malformed") from None
    if not hmac.compare_digest(compact.root(), previous.checkpoint.root):
        raise _refuse(size, "the entries' root is not the signed root")
    last_hash = _entry_hash_at(session, size - 1)
    if last_hash is None:
        raise _refuse(size, f"entry {size - 1} is gone")
    return ChainVerifier.resume(compact, last_hash)


def make_checkpoint(
    session: Session, keyring: CheckpointSigner, now: datetime, *, actor: Actor = SYSTEM
) -> SignedCheckpoint:
    """Sign a checkpoint of the whole ledger as it stands, and record that we did.

    Incremental: the entries since the previous checkpoint are checked (hash,
    link, columns) on top of that checkpoint's stored compact range, which
    must fold to its signed root; the result must agree with the head state.
    So nothing is signed over a tampered range or a state that disagrees with
    the entries (:class:`LedgerVerificationFailed`). When nothing happened
    since the last checkpoint (its own ``checkpoint-made`` entry aside) that
    checkpoint is returned and nothing new is signed; a ledger *smaller* than
    the last checkpoint is refused.
    """
    lock_for_append(session)
    node = node_id(session)
    previous = latest_checkpoint(session)
    head = read_head(session)
    if previous is not None and head.size < previous.checkpoint.size:
        raise LedgerVerificationFailed(
            f"the ledger has {head.size} entries, fewer than the {previous.checkpoint.size} "
            "already published",
            check="checkpoint",
            seq=head.size,
        )
    if previous is None:
        # The first checkpoint walks the whole ledger once, the way verify does.
        from gateway.node.ledger.verify import walk_chain  # noqa: PLC0415 - verify imports this

        problem, verifier = walk_chain(session)
        if problem is not None:
            raise problem.error()
    else:
        verifier = _resume_after(session, previous)
    start = verifier.size
    statement = select_entries().where(LedgerEntryRow.seq >= start)
    for row in stream_entries(session, statement):
        problem = verifier.feed(row)
        if problem is not None:
            raise problem.error()
    if (
        verifier.size != head.size
        or not hmac.compare_digest(verifier.head_hash, head.head_hash)
        or not hmac.compare_digest(verifier.root(), head.root())
    ):
        raise LedgerVerificationFailed(
            f"the ledger head state ({head.size} entries) disagrees with the {verifier.size} "
            "entries stored; refusing to sign. Run 'gateway ledger verify'",
            check="chain",
            seq=min(verifier.size, head.size),
        )
    if previous is not None:
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
    session.add(LedgerCheckpointStateRow(size=checkpoint.size, compact=verifier.compact.to_bytes()))
    record_event(
        session,
        kind=EntryKind.CHECKPOINT_MADE,
        actor=actor,
        now=now,
        body={"size": checkpoint.size, "root": checkpoint.root.hex(), "key_id": checkpoint.key_id},
    )
    return signed


# --- proofs ---------------------------------------------------------------


def _subtree_root_reader(session: Session) -> merkle.SubtreeRoot:
    """MTH of a range of stored entries, streamed in order: O(log n) memory."""

    def subtree_root(start: int, end: int) -> bytes:
        compact = merkle.CompactRange()
        result = session.connection().execute(
            select(LedgerEntryRow.entry_hash)
            .where(LedgerEntryRow.seq >= start, LedgerEntryRow.seq < end)
            .order_by(LedgerEntryRow.seq)
            .execution_options(yield_per=STREAM_BATCH * 4, stream_results=True)
        )
        for (value,) in result:
            compact.append_leaf_hash(merkle.leaf_hash(bytes(value)))
        if compact.size != end - start:
            raise NotFound(
                f"entries {start}..{end - 1} are not all in the ledger; run 'gateway ledger verify'"
            )
        return compact.root()

    return subtree_root


def _check_size(session: Session, size: int) -> None:
    have = read_head(session).size
    if size > have:
        raise NotFound(f"the ledger has {have} entries, not {size}")


def consistency_proof(session: Session, old_size: int, new_size: int) -> list[bytes]:
    """RFC 9162 proof that our first ``old_size`` entries are a prefix of ``new_size``.

    Each subtree hash is computed by streaming its range of stored entry
    hashes (disjoint ranges, at most ``new_size`` rows read in all).
    """
    if not 0 < old_size <= new_size:
        raise InvalidInput(f"no consistency proof from size {old_size} to size {new_size}")
    _check_size(session, new_size)
    return merkle.consistency_proof_from(old_size, new_size, _subtree_root_reader(session))


def inclusion_proof(session: Session, seq: int, size: int) -> list[bytes]:
    """RFC 9162 proof that entry ``seq`` is in the tree of the first ``size`` entries."""
    if not 0 <= seq < size:
        raise InvalidInput(f"entry {seq} is not in a tree of {size} entries")
    _check_size(session, size)
    return merkle.inclusion_proof_from(seq, size, _subtree_root_reader(session))
