"""Retention enforced: ``gateway purge`` and the purge pass of ``serve`` housekeeping.

The rule is :mod:`gateway.core.retention`; this module reads the rows, asks
the rule, and destroys. Both callers run the same :func:`purge`.

**Envelope bodies.** For each bundle the rule says is due, in this order:

1. one transaction records a ``bundle-purged`` ledger entry (bundle id, type,
   direction, dates, envelope SHA-256 and size, the period applied) and a
   :class:`~gateway.store.models_retention.PurgedBundle` row. From that commit
   on the bundle is purged for every reader (``show``, ``disclose``, the API);
2. the envelope file is destroyed: its header, which holds every sealed copy
   of the content key, is overwritten in place and synced, then the file is
   unlinked (:func:`~gateway.store.models_exchange.destroy_envelope_file`).
   A small received envelope kept inline in its inbox row
   (``[database] inline_envelope_max_bytes``) is removed from the row in the
   transaction of step 1 instead (SQLite overwrites the freed content with
   zeros: ``secure_delete``); no other copy of a body is kept.

Envelopes the peer sent under the same bundle id as equivocation evidence are
destroyed with it (their signed headers stay in the database as the proof).

A crash between 1 and 2 leaves a purged bundle whose file still exists; every
run first destroys such leftovers, so a rerun completes what was begun. A
failure before 1 commits changes nothing. Each bundle is thus all-or-nothing,
and running ``purge`` again is harmless. The inbox and outbox rows stay (their
signed receipts and metadata are evidence), and the ledger never loses an
entry: the chain, the checkpoints and the peer's witness stay valid.

**Decrypted outputs.** Files written by ``show --out`` and ``disclose --out``
are recorded when written (:func:`record_outputs`). When due, a file is
deleted if it still holds the bytes that were written; a file moved or
removed by someone else is recorded ``missing``; a path that now holds other
bytes (or a link) is recorded ``changed`` and left alone. One ``output-purged``
ledger entry per bundle (or disclosure) says what happened.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from gateway import log
from gateway.core.ledger import EntryKind, format_time
from gateway.core.policy import RetentionPolicy
from gateway.core.retention import (
    Direction,
    HeldBundle,
    RetentionDecision,
    decide_bundle,
    output_due_at,
)
from gateway.core.roles import SYSTEM, Actor
from gateway.errors import Gone, StorageError
from gateway.node import ledger
from gateway.node.crash import crash_point
from gateway.node.runtime import Node
from gateway.store.models_consent import ConsentApplied
from gateway.store.models_exchange import (
    Equivocation,
    InboxEntry,
    OutboxEntry,
    OutboxState,
    destroy_envelope_file,
    envelope_path,
)
from gateway.store.models_retention import DecryptedOutput, OutputState, PurgedBundle

__all__ = [
    "BundlePurged",
    "OutputOutcome",
    "PurgeReport",
    "WrittenOutput",
    "ensure_not_purged",
    "purge",
    "purged_dates",
    "purged_dates_of",
    "record_outputs",
]

_log = log.get_logger("retention")
_CHUNK = 1 << 20


class BundlePurged(Gone):
    """The bundle's envelope body was destroyed under the retention policy (HTTP 410)."""

    reason = "bundle.purged"

    def __init__(self, bundle_id: str, purged_at: datetime) -> None:
        super().__init__(
            f"bundle {bundle_id} was purged on {purged_at.strftime('%Y-%m-%d')} under the "
            f"retention policy; its ledger entries remain ('gateway ledger list --bundle "
            f"{bundle_id}')"
        )
        self.bundle_id = bundle_id
        self.purged_at = purged_at


# -- reading the purged state -----------------------------------------------------------


def ensure_not_purged(session: Session, direction: Direction, bundle_id: str) -> None:
    """Raise :class:`BundlePurged` when that bundle's body was purged."""
    row = session.scalars(
        select(PurgedBundle).where(
            PurgedBundle.direction == direction.value, PurgedBundle.bundle_id == bundle_id
        )
    ).first()
    if row is not None:
        raise BundlePurged(bundle_id, row.purged_at)


def purged_dates(
    session: Session, direction: Direction, bundle_ids: Iterable[str] | None = None
) -> dict[str, datetime]:
    """``{bundle id: purged_at}`` of the purged bundles of one direction (all, or these)."""
    query = select(PurgedBundle.bundle_id, PurgedBundle.purged_at).where(
        PurgedBundle.direction == direction.value
    )
    if bundle_ids is not None:
        ids = list(bundle_ids)
        if not ids:
            return {}
        query = query.where(PurgedBundle.bundle_id.in_(ids))
    return {str(bundle_id): when for bundle_id, when in session.execute(query)}


def purged_dates_of(node: Node, direction: Direction) -> dict[str, datetime]:
    """``{bundle id: purged_at}`` of every purged bundle of one direction (for listings)."""
    with node.db.transaction() as session:
        return purged_dates(session, direction)


# -- tracking decrypted outputs ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WrittenOutput:
    """A decrypted file just written on this node."""

    path: Path
    bundle_id: str | None
    sha256: str | None = None
    """Known already (the disclosure manifest computed it), else hashed here."""


def _hash_file(path: Path | str, *, dir_fd: int | None = None) -> tuple[str, int]:
    """SHA-256 (hex) and size of a regular file, never through a link (``dir_fd``: relative)."""
    digest = hashlib.sha256()
    size = 0
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0), dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise StorageError(f"{path}: not a regular file")
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def record_outputs(
    session: Session,
    outputs: Sequence[WrittenOutput],
    *,
    command: str,
    actor: Actor,
    now: datetime,
    folder: Path | None = None,
    disclosure_id: str | None = None,
) -> None:
    """Track decrypted files written by ``command`` in the caller's transaction.

    Paths are stored absolute. ``folder`` is a folder the command made for
    these files; it is removed once retention emptied it.
    """
    for output in outputs:
        path = output.path.absolute()
        sha, size = _hash_file(path)
        if output.sha256 is not None and output.sha256 != sha:
            raise StorageError(f"{path}: changed while it was being recorded")
        session.add(
            DecryptedOutput(
                path=str(path),
                folder=str(folder.absolute()) if folder is not None else None,
                bundle_id=output.bundle_id,
                command=command,
                disclosure_id=disclosure_id,
                sha256=sha,
                size=size,
                written_at=now,
                written_by=actor.label,
                state=OutputState.PRESENT,
            )
        )
    session.flush()


# -- purging ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutputOutcome:
    """What a purge did (or would do) with one tracked decrypted file."""

    id: int
    path: str
    bundle_id: str | None
    written_at: datetime
    outcome: str
    """``deleted``, ``missing``, ``changed``; ``due`` in a dry run."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "bundle_id": self.bundle_id,
            "written": self.written_at,
            "outcome": self.outcome,
        }


@dataclass
class PurgeReport:
    """What one purge run did, or (``dry_run``) would do."""

    now: datetime
    dry_run: bool
    policy: RetentionPolicy
    purged: list[RetentionDecision] = field(default_factory=list)
    """Bundles purged by this run (or due, in a dry run)."""
    held: list[RetentionDecision] = field(default_factory=list)
    """Bundles past their period but kept: undelivered, or a consent bundle not applied."""
    completed: list[str] = field(default_factory=list)
    """Bundles purged by an earlier, interrupted run whose envelope file this run destroyed."""
    outputs: list[OutputOutcome] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        def bundle(decision: RetentionDecision) -> dict[str, Any]:
            held = decision.bundle
            return {
                "bundle_id": held.bundle_id,
                "direction": held.direction.value,
                "type": held.case_type,
                "kept_since": held.kept_since,
                "due": decision.due_at,
                "verdict": decision.verdict.value,
                "why": decision.explain(),
            }

        return {
            "now": self.now,
            "dry_run": self.dry_run,
            "envelopes_days": self.policy.envelopes_days,
            "decrypted_output_days": self.policy.decrypted_output_days,
            "purged": [bundle(d) for d in self.purged],
            "held": [bundle(d) for d in self.held],
            "completed": list(self.completed),
            "outputs": [o.to_dict() for o in self.outputs],
        }

    def summary(self) -> str:
        verb = "would purge" if self.dry_run else "purged"
        counts: dict[str, int] = {}
        for output in self.outputs:
            counts[output.outcome] = counts.get(output.outcome, 0) + 1
        files = ", ".join(f"{n} {what}" for what, n in sorted(counts.items())) or "none"
        return (
            f"{verb} {len(self.purged)} bundle(s); {len(self.held)} past the period but kept; "
            f"decrypted outputs: {files}"
        )


def _consent_pending(session: Session) -> set[str]:
    applied = select(ConsentApplied.bundle_id).where(ConsentApplied.sender == InboxEntry.sender)
    return set(
        session.scalars(
            select(InboxEntry.bundle_id).where(
                InboxEntry.case_type.startswith("consent-"),
                InboxEntry.bundle_id.not_in(applied.scalar_subquery()),
            )
        )
    )


def _held_bundles(session: Session, retention: RetentionPolicy, now: datetime) -> list[HeldBundle]:
    """Every stored, not yet purged bundle old enough to be due (oldest first)."""
    if retention.envelopes_days is None:
        return []
    cutoff = now - timedelta(days=retention.envelopes_days)
    gone_in = select(PurgedBundle.bundle_id).where(
        PurgedBundle.direction == Direction.RECEIVED.value
    )
    gone_out = select(PurgedBundle.bundle_id).where(PurgedBundle.direction == Direction.SENT.value)
    pending = _consent_pending(session)
    held: list[HeldBundle] = []
    for row in session.scalars(
        select(InboxEntry)
        .where(InboxEntry.received_at <= cutoff, InboxEntry.bundle_id.not_in(gone_in))
        .order_by(InboxEntry.received_at, InboxEntry.id)
    ):
        held.append(
            HeldBundle(
                direction=Direction.RECEIVED,
                bundle_id=row.bundle_id,
                case_type=row.case_type,
                kept_since=row.received_at,
                awaiting_application=row.bundle_id in pending,
            )
        )
    for out in session.scalars(
        select(OutboxEntry)
        .where(OutboxEntry.created_at <= cutoff, OutboxEntry.bundle_id.not_in(gone_out))
        .order_by(OutboxEntry.created_at, OutboxEntry.id)
    ):
        held.append(
            HeldBundle(
                direction=Direction.SENT,
                bundle_id=out.bundle_id,
                case_type=out.case_type,
                kept_since=out.created_at,
                delivered=out.state == OutboxState.DELIVERED and out.receipt is not None,
            )
        )
    return held


def _evidence_of(session: Session, direction: str, bundle_id: str) -> list[str]:
    """SHA-256 of the other envelopes the peer sent under a received bundle's id
    (equivocation evidence): whole envelopes, so their bodies go with the bundle's.
    The signed headers stay in the database, and prove the equivocation alone."""
    if direction != Direction.RECEIVED.value:
        return []
    found = session.scalars(
        select(Equivocation.other_envelope_sha256).where(Equivocation.bundle_id == bundle_id)
    )
    return sorted(set(found))


def _purge_one(
    node: Node, decision: RetentionDecision, actor: Actor, now: datetime
) -> list[str] | None:
    """Record one bundle as purged (ledger entry and row, one commit); return the SHA-256
    of its envelope and of any equivocation evidence under its id, or ``None`` if it is
    not to be purged after all (purged meanwhile, or no longer eligible)."""
    held = decision.bundle
    days = _decision_days(decision)
    with node.db.transaction() as session:
        ledger.lock_for_append(session)  # serialises concurrent purges and receivers
        done = session.scalars(
            select(PurgedBundle.id).where(
                PurgedBundle.direction == held.direction.value,
                PurgedBundle.bundle_id == held.bundle_id,
            )
        ).first()
        if done is not None:
            return None
        body: dict[str, Any] = {"direction": held.direction.value, "type": held.case_type}
        if held.direction is Direction.RECEIVED:
            row = session.scalars(
                select(InboxEntry).where(InboxEntry.bundle_id == held.bundle_id)
            ).one()
            if row.bundle_id in _consent_pending(session):
                return None
            sha, size = row.envelope_sha256, row.envelope_size
            # An envelope kept inline goes in this transaction, with the purge record.
            session.execute(
                update(InboxEntry)
                .where(InboxEntry.id == row.id, InboxEntry.envelope_body.is_not(None))
                .values(envelope_body=None)
            )
            body.update(
                sender=row.sender,
                sequence=row.sequence,
                created=format_time(row.created_at),
                received=format_time(row.received_at),
            )
        else:
            out = session.scalars(
                select(OutboxEntry).where(OutboxEntry.bundle_id == held.bundle_id)
            ).one()
            if out.state != OutboxState.DELIVERED or out.receipt is None:
                return None  # never purge what the peer has not receipted
            sha, size = out.envelope_sha256, out.envelope_size
            body.update(
                recipient=out.recipient,
                sequence=out.sequence,
                created=format_time(out.created_at),
                delivered=format_time(out.delivered_at) if out.delivered_at else None,
            )
        evidence = _evidence_of(session, held.direction.value, held.bundle_id)
        body.update(envelope_sha256=sha, envelope_size=size, retention_days=days)
        if evidence:
            body["equivocation_evidence_sha256"] = evidence
        entry = ledger.record_event(
            session,
            kind=EntryKind.BUNDLE_PURGED,
            actor=actor,
            now=now,
            bundle_id=held.bundle_id,
            body=body,
        )
        session.add(
            PurgedBundle(
                direction=held.direction.value,
                bundle_id=held.bundle_id,
                case_type=held.case_type,
                envelope_sha256=sha,
                kept_since=held.kept_since,
                purged_at=now,
                retention_days=days,
                ledger_seq=entry.seq,
                actor=actor.label,
            )
        )
        session.flush()
    return [sha, *evidence]


def _decision_days(decision: RetentionDecision) -> int:
    """The period (days) a purge decision applied."""
    assert decision.due_at is not None
    return (decision.due_at - decision.bundle.kept_since).days


def _finish_interrupted(node: Node, *, dry_run: bool) -> list[str]:
    """Destroy envelope files left by a purge that committed but did not finish."""
    with node.db.transaction() as session:
        rows = [
            (
                row.bundle_id,
                [row.envelope_sha256, *_evidence_of(session, row.direction, row.bundle_id)],
            )
            for row in session.scalars(select(PurgedBundle).order_by(PurgedBundle.id))
        ]
    blob_dir = node.settings.blob_dir
    finished: list[str] = []
    for bundle_id, shas in rows:
        left = [sha for sha in shas if envelope_path(blob_dir, sha).exists()]
        if not left:
            continue
        if not dry_run:
            for sha in left:
                destroy_envelope_file(blob_dir, sha)
        finished.append(bundle_id)
    return finished


def _output_is_due(retention: RetentionPolicy, row: DecryptedOutput, now: datetime) -> bool:
    due = output_due_at(retention, row.written_at)
    return due is not None and now >= due


def _open_folder(path: Path) -> int | None:
    """A handle on the folder holding ``path`` (not followed if it is now a link), or None."""
    try:
        return os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None


def _inspect_output(row: DecryptedOutput, *, was_deleting: bool, folder: int | None) -> str:
    """``deleted``-to-be (``present``), ``missing`` or ``changed``: what the path holds now.

    Looked up through ``folder`` (from :func:`_open_folder`), the handle the
    deletion then uses: a folder swapped for a link between the check and the
    unlink cannot redirect it, and only a regular file holding exactly the
    bytes this node wrote is ever deleted.
    """
    name = Path(row.path).name
    if folder is None:
        return OutputState.DELETED if was_deleting else OutputState.MISSING
    try:
        info = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        # A file this node had begun deleting (an interrupted run) was deleted by it.
        return OutputState.DELETED if was_deleting else OutputState.MISSING
    except OSError:
        return OutputState.MISSING
    if not stat.S_ISREG(info.st_mode) or info.st_size != row.size:
        return OutputState.CHANGED
    try:
        sha, _size = _hash_file(name, dir_fd=folder)
    except (OSError, StorageError):
        return OutputState.CHANGED
    return OutputState.PRESENT if sha == row.sha256 else OutputState.CHANGED


def _remove_empty_folders(folder: Path) -> None:
    """Remove ``folder`` and the empty folders below it, bottom-up; keep anything else."""
    if folder.is_symlink() or not folder.is_dir():
        return
    for current, _dirs, _files in sorted(os.walk(folder), key=lambda t: -len(t[0])):
        try:
            Path(current).rmdir()
        except OSError:
            continue


def _purge_outputs(
    node: Node, retention: RetentionPolicy, actor: Actor, now: datetime, *, dry_run: bool
) -> list[OutputOutcome]:
    if retention.decrypted_output_days is None:
        return []
    with node.db.transaction() as session:
        rows = [
            row
            for row in session.scalars(
                select(DecryptedOutput)
                .where(DecryptedOutput.state.in_((OutputState.PRESENT, OutputState.DELETING)))
                .order_by(DecryptedOutput.written_at, DecryptedOutput.id)
            )
            if row.state == OutputState.DELETING or _output_is_due(retention, row, now)
        ]
        if dry_run:
            return [OutputOutcome(r.id, r.path, r.bundle_id, r.written_at, "due") for r in rows]
        was_deleting = {r.id for r in rows if r.state == OutputState.DELETING}
        for row in rows:
            row.state = OutputState.DELETING
    # The rows say "deleting" before any file goes: a crash now is finished by the next run.
    outcomes: list[OutputOutcome] = []
    folders: set[str] = set()
    for row in rows:
        parent = _open_folder(Path(row.path))
        try:
            found = _inspect_output(row, was_deleting=row.id in was_deleting, folder=parent)
            if found == OutputState.PRESENT and parent is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(Path(row.path).name, dir_fd=parent)
                found = OutputState.DELETED
        finally:
            if parent is not None:
                os.close(parent)
        if row.folder is not None:
            folders.add(row.folder)
        outcomes.append(OutputOutcome(row.id, row.path, row.bundle_id, row.written_at, found))
    for folder in sorted(folders, key=len, reverse=True):
        _remove_empty_folders(Path(folder))
    crash_point("before-output-record")
    # One ledger entry per disclosure package, and per bundle for what `show` wrote.
    groups: dict[tuple[str, str | None], list[tuple[DecryptedOutput, OutputOutcome]]] = {}
    for row, outcome in zip(rows, outcomes, strict=True):
        key = ("disclosure", row.disclosure_id) if row.disclosure_id else ("bundle", row.bundle_id)
        groups.setdefault(key, []).append((row, outcome))
    with node.db.transaction() as session:
        for members in groups.values():
            counts = {"deleted": 0, "missing": 0, "changed": 0}
            for row, outcome in members:
                counts[outcome.outcome] += 1
                stored = session.get(DecryptedOutput, row.id)
                assert stored is not None
                stored.state = outcome.outcome
                stored.handled_at = now
            first = members[0][0]
            bundles = sorted({r.bundle_id for r, _ in members if r.bundle_id is not None})
            ledger.record_event(
                session,
                kind=EntryKind.OUTPUT_PURGED,
                actor=actor,
                now=now,
                bundle_id=bundles[0] if len(bundles) == 1 else None,
                body={
                    "command": first.command,
                    "disclosure_id": first.disclosure_id,
                    "bundles": bundles,
                    "written": format_time(min(r.written_at for r, _ in members)),
                    "written_by": sorted({r.written_by for r, _ in members}),
                    "retention_days": retention.decrypted_output_days,
                    **counts,
                },
            )
    return outcomes


def purge(
    node: Node,
    retention: RetentionPolicy,
    *,
    now: datetime,
    actor: Actor = SYSTEM,
    dry_run: bool = False,
    progress: Callable[[str], None] | None = None,
) -> PurgeReport:
    """Enforce ``retention`` at ``now``: destroy due envelope bodies and decrypted outputs.

    ``dry_run`` changes nothing and reports what a run would do. Raises
    :class:`~gateway.errors.StorageError` when a file cannot be destroyed;
    bundles recorded before the failure stay purged, and the next run finishes
    them (see the module text).
    """
    report = PurgeReport(now=now, dry_run=dry_run, policy=retention)
    report.completed = _finish_interrupted(node, dry_run=dry_run)
    with node.db.transaction() as session:
        candidates = _held_bundles(session, retention, now)
    for held in candidates:
        decision = decide_bundle(held, retention, now=now)
        if not decision.purge:
            report.held.append(decision)
            continue
        if dry_run:
            report.purged.append(decision)
            continue
        shas = _purge_one(node, decision, actor, now)
        if shas is None:
            continue
        crash_point("after-purge-commit")
        for sha in shas:
            destroy_envelope_file(node.settings.blob_dir, sha)
        report.purged.append(decision)
        _log.info(
            "bundle_purged",
            bundle_id=held.bundle_id,
            direction=held.direction.value,
            type=held.case_type,
        )
        if progress is not None:
            progress(f"[purge] {held.direction.value} {held.bundle_id} purged")
    report.outputs = _purge_outputs(node, retention, actor, now, dry_run=dry_run)
    return report
