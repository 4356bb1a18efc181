"""Witnessing between the nodes: keeping the peer's checkpoints, auditing the peer.

Every function takes the caller's session and works inside the caller's
transaction, except :func:`audit_peer`, which talks to the peer and so opens
its own short transactions around the network call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.core.ledger import (
    Checkpoint,
    EntryKind,
    SigningKeyLookup,
    WitnessMismatch,
    audit_peer_answer,
    format_time,
    parse_signed_checkpoint,
    verify_checkpoint,
)
from gateway.core.roles import SYSTEM, Actor
from gateway.errors import RefusedError
from gateway.node.ledger import record_event
from gateway.node.ledger.checkpoint import consistency_proof, signed_of
from gateway.store.db import Database
from gateway.store.models_ledger import WitnessedCheckpointRow

__all__ = [
    "AuditResult",
    "ConsistencyProofRequired",
    "PeerAnswer",
    "audit_peer",
    "consistency_prover",
    "last_witnessed",
    "store_peer_checkpoint",
]


class ConsistencyProofRequired(RefusedError):
    """A larger peer checkpoint came without a proof that it extends our witness."""

    reason = "ledger.proof-required"

    def __init__(self, message: str, *, witnessed_size: int) -> None:
        super().__init__(message)
        self.witnessed_size = witnessed_size


def last_witnessed(session: Session, peer_node: str) -> Checkpoint | None:
    """The largest checkpoint of ``peer_node`` we hold as its witness."""
    row = session.scalars(
        select(WitnessedCheckpointRow)
        .where(WitnessedCheckpointRow.node == peer_node)
        .order_by(WitnessedCheckpointRow.size.desc())
        .limit(1)
    ).first()
    return None if row is None else signed_of(row).checkpoint


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
