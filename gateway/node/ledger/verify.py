"""``gateway ledger verify``: the whole ledger checked, streaming, with bounded memory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from nacl.signing import VerifyKey
from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.core import merkle
from gateway.core.ledger import (
    ChainProblem,
    ChainVerifier,
    CheckpointInvalid,
    EntryKind,
    SigningKeyLookup,
    format_time,
    verify_checkpoint,
)
from gateway.errors import GatewayError
from gateway.node.ledger.checkpoint import node_id, signed_of
from gateway.node.ledger.read import select_entries, stream_entries
from gateway.store.models_ledger import LedgerCheckpointRow, WitnessedCheckpointRow

__all__ = ["VerifyReport", "verify_ledger"]


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
    node = node_id(session)
    sizes = frozenset(session.scalars(select(LedgerCheckpointRow.size)).all())
    verifier = ChainVerifier(root_sizes=sizes)
    made_entries: dict[int, dict[str, Any]] = {}
    report = VerifyReport()
    for row in stream_entries(session, select_entries()):
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
