"""Onward disclosure under the consent rule (MOC item 3): decide, record, decrypt.

:func:`disclose` decides and records in one transaction that also holds the
ledger's append lock (on PostgreSQL an advisory lock every ledger writer
takes, among them the receiver storing a bundle; on SQLite ``BEGIN IMMEDIATE``
serialises all writers). A revocation landing concurrently therefore either
commits before the decision (and blocks it) or after the recorded disclosure;
pending received consent bundles are applied inside that same transaction.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, undefer

from gateway import log
from gateway.core.canonical import canonical_bytes
from gateway.core.consent import (
    Decision,
    DisclosureItem,
    decide_disclosure,
    format_time,
    validate_items,
    validate_text,
)
from gateway.core.filemac import DisclosedFile, file_mac_key, files_record
from gateway.core.keys import NodeKeyring
from gateway.core.ledger import LedgerEntry
from gateway.core.policy import Policy
from gateway.core.retention import Direction as StoredDirection
from gateway.core.roles import Actor
from gateway.errors import (
    ConsentRefused,
    InvalidInput,
    NotFound,
    StorageError,
    VerificationError,
)
from gateway.files import (
    PRIVATE_DIR_MODE,
    create_private_file,
    empty_folder_mode,
    make_private_folders,
    sync_file,
    sync_folder,
    sync_tree,
    take_back,
)
from gateway.node import ledger
from gateway.node.bundles import open_to_dir
from gateway.node.consent import uses as consent_uses
from gateway.node.consent.common import (
    MAX_REASON,
    internal_names,
    items_json,
    peer_manifest,
)
from gateway.node.consent.queries import check_consent_states, load_consent_states
from gateway.node.consent.receive import (
    apply_pending,
    apply_pending_in,
    refuse_to_decide_with,
)
from gateway.node.context import NodeContext
from gateway.node.inbox import check_reply_matches_case
from gateway.node.retention import WrittenOutput, ensure_not_purged, record_outputs
from gateway.node.runtime import Node
from gateway.store.models_consent import (
    ConsentUse,
    DisclosureRecord,
)
from gateway.store.models_exchange import InboxEntry, OutboxEntry, envelope_path

__all__ = [
    "MANIFEST_NAME",
    "DisclosureResult",
    "disclose",
]

_log = log.get_logger("consent")
MANIFEST_NAME = "disclosure.json"
_PARTIAL_PREFIX = ".ssw-disclose-"


@dataclass(frozen=True, slots=True)
class DisclosureResult:
    """An allowed disclosure: where it went, what it relied on, how it was recorded."""

    disclosure_id: str
    kind: str
    recipient: str
    purpose: str
    consent_id: str | None
    ledger_seq: int
    ledger_hash: str
    out_dir: Path
    files: dict[str, str] = field(default_factory=dict)
    """Relative path of every file written -> its SHA-256 (hex)."""
    decision: Decision | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "disclosure_id": self.disclosure_id,
            "kind": self.kind,
            "recipient": self.recipient,
            "purpose": self.purpose,
            "consent_id": self.consent_id,
            "ledger_seq": self.ledger_seq,
            "ledger_hash": self.ledger_hash,
            "out_dir": str(self.out_dir),
            "files": dict(self.files),
            "items": [] if self.decision is None else [i.to_record() for i in self.decision.items],
        }


@dataclass
class _Item:
    item: DisclosureItem
    envelope_sha256: str
    opened_at: datetime
    direction: str
    body: bytes | None = None
    """The envelope itself when its inbox row holds it inline."""


def _locate(session: Session, node_id: str, bundle_ids: Sequence[str]) -> list[_Item]:
    found: dict[str, _Item] = {}
    for row in session.scalars(
        select(InboxEntry)
        .options(undefer(InboxEntry.envelope_body))
        .where(InboxEntry.bundle_id.in_(bundle_ids))
    ):
        found[row.bundle_id] = _Item(
            DisclosureItem(row.bundle_id, row.sender, row.marking),
            row.envelope_sha256,
            row.received_at,
            "received",
            row.envelope_body,
        )
    for out in session.scalars(select(OutboxEntry).where(OutboxEntry.bundle_id.in_(bundle_ids))):
        if out.bundle_id not in found:
            found[out.bundle_id] = _Item(
                DisclosureItem(out.bundle_id, node_id, out.marking),
                out.envelope_sha256,
                out.created_at,
                "sent",
            )
    missing = [b for b in bundle_ids if b not in found]
    if missing:
        raise NotFound(f"no bundle {missing[0]} in the inbox or the outbox")
    for located in found.values():
        ensure_not_purged(session, StoredDirection(located.direction), located.item.bundle_id)
    return [found[b] for b in bundle_ids]


def _decide(
    session: Session | None,
    node: Node,
    policy: Policy,
    items: list[_Item],
    recipient: str,
    purpose: str,
    now: datetime,
) -> Decision:
    """The rule on the consents as ``session`` sees them, or (``None``) as a read check does.

    Only the decision taken in the locked transaction is recorded; the read
    check (:func:`check_consent_states`: no lock, cached states) is the first
    look that spares decrypting when it would be refused anyway.
    """
    ids = [entry.item.bundle_id for entry in items]
    consents = (
        check_consent_states(node.db, ids) if session is None else load_consent_states(session, ids)
    )
    return decide_disclosure(
        [entry.item for entry in items],
        recipient,
        purpose,
        own_node=node.node_id,
        internal_recipients=internal_names(policy, node.node_id),
        consents=consents,
        now=now,
    )


def _record_attempt(
    session: Session,
    *,
    decision: Decision,
    actor: Actor,
    now: datetime,
    files: dict[str, Any] | None,
) -> tuple[str, LedgerEntry]:
    """``files`` is :func:`~gateway.core.filemac.files_record` of what was handed
    over: positions, sizes and keyed MACs, never names or plain hashes (the
    ledger is read by compliance officers; file names are case content)."""
    disclosure_id = str(uuid.uuid4())
    ids = [item.bundle_id for item in decision.items]
    body = decision.to_record()
    body["disclosure_id"] = disclosure_id
    if files:
        body.update(files)
    entry = ledger.record_event(
        session,
        kind=decision.entry_kind.value,
        actor=actor,
        now=now,
        bundle_id=ids[0] if len(ids) == 1 else None,
        consent_id=decision.consent_id,
        body=body,
    )
    session.add(
        DisclosureRecord(
            disclosure_id=disclosure_id,
            kind=decision.entry_kind.value,
            allowed=decision.allowed,
            recipient=decision.recipient,
            purpose=decision.purpose,
            items_json=items_json(ids),
            decision_json=canonical_bytes(decision.to_record()).decode("utf-8"),
            consent_id=decision.consent_id,
            decided_at=now,
            actor=actor.label,
            ledger_seq=entry.seq,
            ledger_hash=entry.entry_hash.hex(),
        )
    )
    session.flush()
    if decision.consent_id is not None:
        session.add(
            ConsentUse(
                consent_id=decision.consent_id,
                disclosure_id=disclosure_id,
                used_at=now,
                actor=actor.label,
            )
        )
        session.flush()
    return disclosure_id, entry


def _refusal(decision: Decision) -> ConsentRefused:
    return ConsentRefused(
        f"disclosure to {decision.recipient!r} for {decision.purpose!r} refused: "
        f"{decision.explain()}. Nothing was written; the attempt is recorded in the ledger."
    )


def _check_out_dir(out_dir: Path) -> Path:
    target = out_dir.expanduser().absolute()
    if (target.exists() or target.is_symlink()) and (
        not target.is_dir() or target.is_symlink() or any(target.iterdir())
    ):
        raise InvalidInput(f"{target}: must not exist yet, or be an empty folder")
    if not target.parent.is_dir():
        raise InvalidInput(f"{target.parent}: the folder to write into does not exist")
    return target


def _package_not_written(target: Path, exc: OSError) -> StorageError:
    return StorageError(
        f"cannot write the package into {target}: {exc.strerror or exc}; nothing was "
        "disclosed or recorded"
    )


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class _Staged:
    """Decrypted items waiting in ``folder`` for the decision."""

    folder: Path
    files: dict[str, str]
    """Relative path -> SHA-256 (for the package and the officer)."""
    disclosed: list[DisclosedFile]
    """The same files by position (for the ledger)."""


def _decrypt_items(
    node: Node,
    keyring: NodeKeyring,
    policy: Policy,
    items: list[_Item],
    staging: Path,
    *,
    durable: bool,
) -> _Staged:
    """Decrypt every item into ``staging/<bundle id>/``: ``case.json`` and the
    attachments under ``attachments/``; with ``durable`` (a package that stays on
    disk), each item's folder synced whole, before the decision takes the lock."""
    with node.db.transaction() as session:
        peer = peer_manifest(session)
    files: dict[str, str] = {}
    disclosed: list[DisclosedFile] = []
    for entry in items:
        folder = staging / entry.item.bundle_id
        attachments = folder / "attachments"
        make_private_folders(attachments, sync=False)  # synced below with the item's folder
        opened = open_to_dir(
            envelope_path(node.settings.blob_dir, entry.envelope_sha256),
            attachments,
            body=entry.body,
            keyring=keyring,
            peer_manifest=peer,
            policy=policy,
            now=entry.opened_at,
            stored_at=entry.opened_at,  # a key revoked since: trusted if stored before
        )
        check_reply_matches_case(
            opened.envelope.header.type, opened.envelope.header.reply_to, opened.envelope.case_data
        )
        if not opened.files:
            attachments.rmdir()
        with create_private_file(folder / "case.json") as out:
            out.write(canonical_bytes(opened.envelope.case_data))
            sync_file(out)
        bundle_id = entry.item.bundle_id
        case_path = folder / "case.json"
        case_sha = _sha256_file(case_path)
        files[case_path.relative_to(staging).as_posix()] = case_sha
        disclosed.append(DisclosedFile(bundle_id, "case", 0, case_path.stat().st_size, case_sha))
        for written in opened.files:
            sha = _sha256_file(written.path)
            files[written.path.relative_to(staging).as_posix()] = sha
            disclosed.append(
                DisclosedFile(bundle_id, "attachment", written.index, written.size, sha)
            )
        if durable:
            sync_tree(folder)
    return _Staged(staging, files, disclosed)


def _foresee(
    ctx: NodeContext,
    policy: Policy,
    ids: list[str],
    recipient: str,
    purpose: str,
    now: datetime,
) -> tuple[list[_Item], Decision]:
    """The first look, without the lock: is there any point in decrypting?"""
    node = ctx.node
    deferred: list[str] = []
    apply_pending(ctx, now=now, deferred=deferred)
    refuse_to_decide_with(deferred)
    with node.db.transaction(read_only=True) as session:  # writes nothing: no write lock
        items = _locate(session, node.node_id, ids)
    return items, _decide(None, node, policy, items, recipient, purpose, now)


def disclose(
    ctx: NodeContext,
    actor: Actor,
    bundle_ids: Sequence[str],
    recipient: str,
    purpose: str,
    out_dir: Path,
    *,
    now: datetime,
    deliver: Callable[[Path, DisclosureResult], None] | None = None,
) -> DisclosureResult:
    """Release decrypted items to ``recipient`` if the rule allows; record every attempt.

    Allowed: the items (``<bundle id>/case.json`` and attachments) and
    ``disclosure.json`` (consent id, ledger entry, SHA-256 of every file and
    the ledger's keyed MACs of them)
    appear in ``out_dir`` at once, and the consent use and the ledger entry
    (``disclosure-made`` or ``internal-share``) are committed with the
    decision. Refused: :class:`ConsentRefused` (exit code 3) names what is
    missing for each item, nothing is written to ``out_dir``, and one
    ``disclosure-blocked`` entry is committed.

    ``deliver`` (the local API's streamed disclosure) receives the staged
    folder and the result instead of the folder being moved to ``out_dir``; it
    runs inside the transaction that records the disclosure, so the
    ``disclosure-made`` entry and the consent use are committed only if it
    returns (a delivery cut off mid-way records nothing), and nothing stays on
    the node afterwards.
    """
    _require_keys = ctx.keyring  # raises ``keys.locked`` before anything is read
    ids = list(validate_items(bundle_ids, field="bundle ids"))
    validate_text(recipient, field="recipient", max_chars=500)
    validate_text(purpose, field="purpose", max_chars=MAX_REASON)
    target = _check_out_dir(out_dir)
    policy = ctx.policy
    items, foreseen = _foresee(ctx, policy, ids, recipient, purpose, now)
    if not foreseen.allowed:
        # Decided again under the lock and recorded, without decrypting anything;
        # should a consent have arrived in between, it starts again with the files.
        return _decide_and_record(
            ctx, policy, actor, items, recipient, purpose, now, None, target, deliver
        )
    return _stage_and_record(ctx, policy, actor, items, recipient, purpose, now, target, deliver)


def _stage_and_record(
    ctx: NodeContext,
    policy: Policy,
    actor: Actor,
    items: list[_Item],
    recipient: str,
    purpose: str,
    now: datetime,
    target: Path,
    deliver: Callable[[Path, DisclosureResult], None] | None,
) -> DisclosureResult:
    """Decrypt ``items`` into a private staging folder, then decide under the lock and record."""
    node, keyring = ctx.node, ctx.keyring
    ids = [entry.item.bundle_id for entry in items]
    staging = Path(tempfile.mkdtemp(prefix=_PARTIAL_PREFIX, dir=target.parent))
    try:
        staging.chmod(PRIVATE_DIR_MODE)  # becomes the output folder: 0700 whatever the umask
        try:
            staged = _decrypt_items(node, keyring, policy, items, staging, durable=deliver is None)
        except (InvalidInput, VerificationError):
            # A purge that committed meanwhile destroys envelopes under the reader: say so.
            with node.db.transaction() as session:
                _locate(session, node.node_id, ids)
            raise
        except OSError as exc:  # the disk under the staging folder: nothing is recorded
            raise _package_not_written(target, exc) from None
        return _decide_and_record(
            ctx, policy, actor, items, recipient, purpose, now, staged, target, deliver
        )
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _decide_and_record(
    ctx: NodeContext,
    policy: Policy,
    actor: Actor,
    items: list[_Item],
    recipient: str,
    purpose: str,
    now: datetime,
    staged: _Staged | None,
    target: Path,
    deliver: Callable[[Path, DisclosureResult], None] | None = None,
) -> DisclosureResult:
    node, keyring = ctx.node, ctx.keyring
    refused: Decision | None = None
    placed = removed = False
    empty_mode = empty_folder_mode(target)
    again = False
    try:
        with node.db.transaction() as session:
            ledger.lock_for_append(session)  # the linearisation point of consent decisions
            deferred: list[str] = []
            apply_pending_in(session, node, keyring, policy, now, deferred=deferred)
            refuse_to_decide_with(deferred)  # nothing recorded: the transaction rolls back
            decision = _decide(session, node, policy, items, recipient, purpose, now)
            if not decision.allowed:
                _record_attempt(session, decision=decision, actor=actor, now=now, files=None)
                refused = decision
            elif staged is None:
                # Allowed now, though it was not a moment ago (a consent arrived):
                # commit what was applied, record nothing, start again with the files.
                again = True
            else:
                staging, files = staged.folder, staged.files
                ledger_files = files_record(
                    staged.disclosed,
                    key=file_mac_key(bytes(keyring.signing_key)),
                    key_id=keyring.signing_key_id,
                )
                disclosure_id, entry = _record_attempt(
                    session, decision=decision, actor=actor, now=now, files=ledger_files
                )
                manifest = {
                    "disclosure_id": disclosure_id,
                    "kind": decision.entry_kind.value,
                    "node": node.node_id,
                    "recipient": recipient,
                    "purpose": purpose,
                    "consent_id": decision.consent_id,
                    "actor": actor.label,
                    "time": format_time(now),
                    "ledger_seq": entry.seq,
                    "ledger_entry_hash": entry.entry_hash.hex(),
                    "items": [i.to_record() for i in decision.items],
                    "files_sha256": dict(sorted(files.items())),
                    "ledger_files": ledger_files,
                }
                with create_private_file(staging / MANIFEST_NAME) as out:
                    out.write(json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n")
                    sync_file(out)
                if deliver is not None:
                    result = DisclosureResult(
                        disclosure_id=disclosure_id,
                        kind=decision.entry_kind.value,
                        recipient=recipient,
                        purpose=purpose,
                        consent_id=decision.consent_id,
                        ledger_seq=entry.seq,
                        ledger_hash=entry.entry_hash.hex(),
                        out_dir=staging,
                        files=files,
                        decision=decision,
                    )
                    # Recorded only if the whole package reached the caller.
                    deliver(staging, result)
                else:
                    # Every name in the package durable before it is given its own (the
                    # items' folders were synced before the lock), and that one before
                    # the disclosure is recorded.
                    try:
                        sync_folder(staging)
                        if empty_mode is not None:
                            target.rmdir()  # empty, checked before; put back on a failure
                            removed = True
                        staging.rename(target)
                        placed = True
                        sync_folder(target.parent)
                    except OSError as exc:
                        raise _package_not_written(target, exc) from None
                    # What stays on this node is tracked for the retention of decrypted
                    # outputs; the package handed to the recipient is the recipient's.
                    record_outputs(
                        session,
                        [
                            WrittenOutput(target / rel, rel.split("/", 1)[0], sha)
                            for rel, sha in sorted(files.items())
                        ]
                        + [WrittenOutput(target / MANIFEST_NAME, None)],
                        command="disclose",
                        actor=actor,
                        now=now,
                        folder=target,
                        disclosure_id=disclosure_id,
                    )
                    result = DisclosureResult(
                        disclosure_id=disclosure_id,
                        kind=decision.entry_kind.value,
                        recipient=recipient,
                        purpose=purpose,
                        consent_id=decision.consent_id,
                        ledger_seq=entry.seq,
                        ledger_hash=entry.entry_hash.hex(),
                        out_dir=target,
                        files=files,
                        decision=decision,
                    )
    except BaseException:
        if placed or removed:  # the package, and the empty folder it was to replace
            take_back(target, placed=placed, empty_mode=empty_mode)
        raise
    if again:
        # Straight to the files: the locked decision allowed it, and the first look
        # (which may read other copies of the grants' terms) is not asked again.
        return _stage_and_record(
            ctx, policy, actor, items, recipient, purpose, now, target, deliver
        )
    if refused is not None:
        _log.info("disclosure_blocked", recipient=recipient, items=len(items))
        raise _refusal(refused)
    _log.info("disclosure_made", kind=result.kind, consent_id=result.consent_id, items=len(items))
    consent_uses.notify_uses(ctx, now=now)
    return result
