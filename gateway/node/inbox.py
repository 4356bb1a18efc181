"""The inbox: accept the peer's envelopes exactly once and answer with signed receipts.

:func:`receive_envelope` is what the peer server calls for each envelope (in a
worker thread). Everything is checked before anything is stored; then one
transaction decides:

* the same envelope again (same SHA-256) answers the receipt stored the first
  time, byte for byte, and stores nothing new (a lost response is recovered
  by resending);
* a *different* envelope under a bundle id already received is refused
  (:class:`EquivocationRefused`, reason ``equivocation``) and kept as evidence
  with a ledger entry;
* a new envelope is stored as received (still encrypted), gaps in the
  channel's sequence numbers are recorded, a ``bundle-received`` ledger entry
  is written and a receipt is signed and stored; all in one commit.

An envelope that fails verification leaves no trace in the inbox, so the
clean retry of the same bundle succeeds.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, Final, Protocol, cast

from sqlalchemy import Table, delete, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, undefer

from gateway import log
from gateway.core.canonical import canonical_bytes
from gateway.core.cases import PROTOCOL_TYPES, REPLY_TARGETS
from gateway.core.envelope import (
    AttachmentInfo,
    EnvelopeHeader,
    KnownCiphertext,
    check_content_key,
    open_envelope,
    verify_envelope,
)
from gateway.core.keys import KeyManifest, NodeKeyring, StoredTrust
from gateway.core.policy import Policy
from gateway.core.receipt import Checkpoint, ReceiptSigner, issue_receipt
from gateway.core.retention import Direction
from gateway.core.roles import SYSTEM, Actor
from gateway.core.times import Precision, format_utc
from gateway.errors import (
    GatewayError,
    InvalidInput,
    NotFound,
    RefusedError,
    StorageError,
    VerificationError,
)
from gateway.files import create_private_file, sync_file, sync_folder
from gateway.node import ledger
from gateway.node.bundles import safe_output_path
from gateway.node.consent.receive import apply_pending
from gateway.node.context import NodeContext
from gateway.node.crash import crash_point
from gateway.node.ledger.checkpoint import latest_checkpoint
from gateway.node.outbox import check_reply_target
from gateway.node.peer_trust import (
    pinned_manifest_id,
    pinned_peer_manifest,
    require_pinned_peer,
)
from gateway.node.retention import WrittenOutput, ensure_not_purged, record_outputs
from gateway.node.runtime import Node
from gateway.node.verify_pool import VerifyPool, VerifyResult
from gateway.store.models_exchange import (
    Equivocation,
    InboxEntry,
    OutboxEntry,
    SequenceGap,
    adopt_envelope_file,
    adopt_envelope_files,
    open_stored_envelope,
)

__all__ = [
    "ChannelGaps",
    "EnvelopeFacts",
    "EquivocationRefused",
    "ReadBundle",
    "ReceiveOutcome",
    "SpooledEnvelope",
    "WrongRecipient",
    "channel_name",
    "check_reply_matches_case",
    "describe_inbox_entry",
    "inbox_entry",
    "ledger_checkpoint",
    "list_gaps",
    "list_inbox",
    "read_bundle",
    "receive_batch",
    "receive_envelope",
]

_CHUNK = 1 << 20
_log = log.get_logger("inbox")


class EquivocationRefused(RefusedError):
    """The peer sent a different envelope under a bundle id it had already used."""

    reason = "equivocation"


class WrongRecipient(VerificationError):
    """The envelope is addressed to another node."""

    reason = "envelope.recipient"
    check = "recipient"


@dataclass(frozen=True, slots=True)
class EnvelopeFacts:
    """What the inbox keeps from a verified envelope header."""

    bundle_id: str
    sender: str
    recipient: str
    sequence: int
    case_type: str
    created_at: datetime
    marking: str
    reply_to: str | None
    signing_key_id: str
    header: bytes
    replaces: str | None = None


class InboxSigner(ReceiptSigner, Protocol):
    """The keyring as the inbox needs it: a node id and a signing key."""

    @property
    def node(self) -> str: ...


def channel_name(sender: str, recipient: str) -> str:
    """The name of the one-way channel from ``sender`` to ``recipient``."""
    return f"{sender}->{recipient}"


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _record_gap(session: Session, channel: str, sequence: int, now: datetime) -> None:
    """Keep the channel's missing sequence numbers as ranges, before inserting ``sequence``."""
    highest = session.scalar(
        select(func.max(InboxEntry.sequence)).where(InboxEntry.channel == channel)
    )
    top = int(highest or 0)
    if sequence > top + 1:
        session.add(
            SequenceGap(
                channel=channel, first_missing=top + 1, last_missing=sequence - 1, noticed_at=now
            )
        )
        return
    if sequence > top:
        return
    gap = session.scalars(
        select(SequenceGap)
        .where(
            SequenceGap.channel == channel,
            SequenceGap.first_missing <= sequence,
            SequenceGap.last_missing >= sequence,
        )
        .with_for_update()
    ).first()
    if gap is None:
        return
    first, last = gap.first_missing, gap.last_missing
    session.execute(delete(SequenceGap).where(SequenceGap.id == gap.id))
    if first < sequence:
        session.add(
            SequenceGap(
                channel=channel, first_missing=first, last_missing=sequence - 1, noticed_at=now
            )
        )
    if sequence < last:
        session.add(
            SequenceGap(
                channel=channel, first_missing=sequence + 1, last_missing=last, noticed_at=now
            )
        )


def ledger_checkpoint(session: Session) -> Checkpoint | None:
    """This node's newest signed ledger checkpoint, as a receipt names it."""

    latest = latest_checkpoint(session)
    if latest is None:
        return None
    return Checkpoint(size=latest.checkpoint.size, root=latest.checkpoint.root.hex())


def _replaced_entry(session: Session, facts: EnvelopeFacts) -> InboxEntry | None:
    """The received bundle a re-sent one names in its signed ``replaces`` field.

    Linked only when it came from the same sender, is of the same type and is
    not replaced already; otherwise the new bundle is kept as it is (its header
    still names what it meant to replace) and the mismatch is logged.
    """
    if facts.replaces is None:
        return None
    original = session.scalars(
        select(InboxEntry)
        .where(InboxEntry.sender == facts.sender, InboxEntry.bundle_id == facts.replaces)
        .with_for_update()
    ).first()
    if original is None or original.case_type != facts.case_type or original.replaced_by:
        _log.warning(
            "replacement_not_linked",
            sender=facts.sender,
            bundle_id=facts.bundle_id,
            replaces=facts.replaces,
            known=original is not None,
        )
        return None
    return original


def _record_equivocation(
    session: Session,
    existing: InboxEntry | _FreshRow,
    facts: EnvelopeFacts,
    sha: str,
    now: datetime,
    events: list[ledger.Event],
) -> Equivocation:
    """Keep the conflicting envelope's header as evidence (once per envelope hash) and
    add its ``equivocation`` ledger entry to ``events``, which the caller appends."""
    known = session.scalars(
        select(Equivocation).where(
            Equivocation.sender == facts.sender,
            Equivocation.bundle_id == facts.bundle_id,
            Equivocation.other_envelope_sha256 == sha,
        )
    ).first()
    if known is not None:
        return known
    record = Equivocation(
        sender=facts.sender,
        bundle_id=facts.bundle_id,
        first_envelope_sha256=existing.envelope_sha256,
        other_envelope_sha256=sha,
        other_header=facts.header,
        detected_at=now,
    )
    session.add(record)
    events.append(
        ledger.Event(
            kind="equivocation",
            actor=SYSTEM,
            now=now,
            bundle_id=facts.bundle_id,
            body={
                "sender": facts.sender,
                "first_envelope_sha256": existing.envelope_sha256,
                "other_envelope_sha256": sha,
            },
        )
    )
    session.flush()
    return record


# -- listing -------------------------------------------------------------------------


def list_inbox(
    node: Node, *, case_type: str | None = None, suspect: bool = False
) -> list[InboxEntry]:
    """Received bundles, oldest first, optionally of one type; with ``suspect``,
    only those marked suspect (their signing key was distrusted before they came)."""
    with node.db.transaction() as session:
        query = select(InboxEntry).order_by(InboxEntry.received_at, InboxEntry.id)
        if case_type is not None:
            query = query.where(InboxEntry.case_type == case_type)
        if suspect:
            query = query.where(InboxEntry.suspect_since.is_not(None))
        return list(session.scalars(query))


def describe_inbox_entry(entry: InboxEntry, purged_at: datetime | None = None) -> dict[str, Any]:
    """One row of ``gateway inbox`` and ``GET /api/v1/inbox`` (metadata only).

    ``purged`` is the time the envelope body was destroyed under the retention
    policy, or ``None`` while it is held; ``suspect_since``: when the bundle was
    marked suspect (None if it is not); ``replaces`` / ``replaced_by``: the re-sent
    bundle links (``gateway resend``).
    """
    return {
        "bundle_id": entry.bundle_id,
        "type": entry.case_type,
        "sender": entry.sender,
        "sequence": entry.sequence,
        "created": entry.created_at,
        "received": entry.received_at,
        "marking": entry.marking,
        "reply_to": entry.reply_to,
        "purged": purged_at,
        "signing_key_id": entry.signing_key_id,
        "suspect": entry.suspect_since is not None,
        "suspect_since": entry.suspect_since,
        "replaces": entry.replaces,
        "replaced_by": entry.replaced_by,
    }


@dataclass(frozen=True, slots=True)
class ChannelGaps:
    channel: str
    highest: int
    missing: Sequence[tuple[int, int]]

    def to_dict(self) -> dict[str, Any]:
        """One channel of ``gateway inbox --gaps`` and ``GET /api/v1/inbox?gaps=true``."""
        return {
            "channel": self.channel,
            "highest": self.highest,
            "missing": [{"first": a, "last": b} for a, b in self.missing],
        }


def list_gaps(node: Node) -> list[ChannelGaps]:
    """Per incoming channel: the highest sequence seen and the missing ranges."""
    with node.db.transaction() as session:
        highest = {
            str(channel): int(top)
            for channel, top in session.execute(
                select(InboxEntry.channel, func.max(InboxEntry.sequence)).group_by(
                    InboxEntry.channel
                )
            )
        }
        gaps = session.scalars(
            select(SequenceGap).order_by(SequenceGap.channel, SequenceGap.first_missing)
        ).all()
    result: list[ChannelGaps] = []
    for channel in sorted(highest):
        missing = [(g.first_missing, g.last_missing) for g in gaps if g.channel == channel]
        result.append(ChannelGaps(channel=channel, highest=int(highest[channel]), missing=missing))
    return result


def inbox_entry(node: Node, bundle_id: str) -> InboxEntry:
    """The received bundle with this id, or :class:`NotFound`."""
    with node.db.transaction() as session:
        entry = session.scalars(select(InboxEntry).where(InboxEntry.bundle_id == bundle_id)).first()
    if entry is None:
        raise NotFound(f"no received bundle with id {bundle_id!r}")
    return entry


# -- the node's own receiving and reading ---------------------------------------------


def _pinned_peer_manifest(node: Node) -> KeyManifest:

    with node.db.transaction() as session:
        return require_pinned_peer(session, needed_for="nothing can be received")


def _facts(header: EnvelopeHeader) -> EnvelopeFacts:
    return EnvelopeFacts(
        bundle_id=header.bundle_id,
        sender=header.sender,
        recipient=header.recipient,
        sequence=header.sequence,
        case_type=header.type,
        created_at=header.created_at,
        marking=header.marking,
        reply_to=header.reply_to,
        signing_key_id=header.signing_key_id,
        header=header.raw,
        replaces=header.replaces,
    )


def receive_envelope(ctx: NodeContext, path: Path, *, now: datetime) -> bytes:
    """Check, store and receipt one envelope the peer posted; return the receipt.

    A batch of one (:func:`receive_batch`, without applying consent bundles:
    the caller does, with :func:`gateway.node.consent.apply_pending`). Every
    check of :func:`~gateway.core.envelope.verify_envelope` runs before
    anything is stored; a refusal raises its
    :class:`~gateway.errors.VerificationError` (or
    :class:`EquivocationRefused`) and leaves no trace of the bundle id.
    """
    [outcome] = receive_batch(ctx, [path], now=now, dispatch=False)
    if outcome.error is not None:
        raise outcome.error
    assert outcome.receipt is not None
    return outcome.receipt


@dataclass(frozen=True, slots=True)
class ReadBundle:
    """A bundle decrypted for an officer, and where its parts were written."""

    bundle_id: str
    sender: str
    recipient: str
    case_type: str
    marking: str
    created_at: datetime
    sequence: int
    reply_to: str | None
    case: dict[str, Any]
    written: list[Path]
    trust: str = "valid"
    """``valid``, ``verified-while-trusted`` (its key was revoked after it was stored)
    or ``suspect-accepted`` (opened with ``accept_suspect``)."""
    replaces: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The bundle as ``gateway show`` and ``GET /api/v1/bundles/{id}`` answer it.

        ``written`` is left out: the paths are the caller's own folder, and
        only the CLI names them.
        """
        return {
            "bundle_id": self.bundle_id,
            "type": self.case_type,
            "sender": self.sender,
            "recipient": self.recipient,
            "sequence": self.sequence,
            "created": self.created_at,
            "marking": self.marking,
            "reply_to": self.reply_to,
            "trust": self.trust,
            "replaces": self.replaces,
            "case": self.case,
        }


def _output_not_written(folder: Path | None, exc: OSError) -> StorageError:
    return StorageError(
        f"cannot write into {folder}: {exc.strerror or exc}; nothing was kept or recorded"
    )


def read_bundle(
    ctx: NodeContext,
    actor: Actor,
    bundle_id: str,
    *,
    out_dir: Path | None,
    now: datetime,
    track_outputs: bool = True,
    accept_suspect: bool = False,
) -> ReadBundle:
    """Decrypt a received (or our own sent) bundle for ``actor``; log the read.

    The envelope is verified again from the store before a byte is
    decrypted, its signing key judged at the time this node stored it: a key
    revoked since still counts if it was trusted then (``trust`` is
    ``verified-while-trusted``); one distrusted before raises
    :class:`~gateway.core.envelope.EnvelopeSuspect` unless ``accept_suspect``,
    and the acceptance is recorded in the ledger (``suspect-accepted``, naming
    the officer) before anything is shown. With ``out_dir``, the case (``<bundle id>.json``) and each
    attachment (sanitised name, never overwriting) are written there; files
    appear only once everything has decrypted and verified. The read is
    recorded in the ledger (``bundle-read``, naming the officer) in the same
    step; if that fails, nothing is shown and written files are removed.

    Files written are tracked for the retention of decrypted outputs
    (:func:`gateway.node.retention.record_outputs`) unless ``track_outputs``
    is false (a caller that removes its own temporary folder at once). A
    purged bundle raises :class:`~gateway.node.retention.BundlePurged`.
    """

    node, keyring = ctx.node, ctx.keyring
    with node.db.transaction() as session:
        received = session.scalars(
            select(InboxEntry)
            .where(InboxEntry.bundle_id == bundle_id)
            .options(undefer(InboxEntry.envelope_body))
        ).first()
        sent = None
        if received is None:
            sent = session.scalars(
                select(OutboxEntry).where(OutboxEntry.bundle_id == bundle_id)
            ).first()
        inline: bytes | None = None
        if received is not None:
            sha, opened_at, direction = received.envelope_sha256, received.received_at, "received"
            inline = received.envelope_body
        elif sent is not None:
            sha, opened_at, direction = sent.envelope_sha256, sent.created_at, "sent"
        else:
            raise NotFound(f"no bundle with id {bundle_id!r} in the inbox or the outbox")
        ensure_not_purged(session, Direction(direction), bundle_id)
    if out_dir is not None and not out_dir.is_dir():
        raise InvalidInput(f"{out_dir}: the output folder does not exist or is not a folder")
    policy = ctx.policy
    peer = _pinned_peer_manifest(node)
    temps: list[tuple[Path, AttachmentInfo]] = []
    handles: list[BinaryIO] = []

    def sink(info: AttachmentInfo) -> BinaryIO:
        assert out_dir is not None
        tmp = out_dir / f".partial-{secrets.token_hex(8)}"
        handle = create_private_file(tmp)
        temps.append((tmp, info))
        handles.append(handle)
        return handle

    written: list[Path] = []
    try:
        try:
            with open_stored_envelope(node.settings.blob_dir, sha, inline) as stream:
                opened = open_envelope(
                    stream,
                    keyring=keyring,
                    peer_manifest=peer,
                    policy=policy,
                    now=opened_at,
                    sink_factory=sink if out_dir is not None else None,
                    stored_at=opened_at,
                    accept_suspect=accept_suspect,
                )
            if track_outputs:  # files that stay: synced before they are named
                try:
                    for handle in handles:
                        sync_file(handle)
                except OSError as exc:
                    raise _output_not_written(out_dir, exc) from None
        except (FileNotFoundError, VerificationError):
            # A purge that committed while this read began destroys the file under it:
            # say so, rather than "missing" or "tampered".
            with node.db.transaction() as session:
                ensure_not_purged(session, Direction(direction), bundle_id)
            raise
        finally:
            for handle in handles:
                handle.close()
        header = opened.header
        check_reply_matches_case(header.type, header.reply_to, opened.case_data)
        if out_dir is not None:
            case_path = safe_output_path(out_dir, f"{header.bundle_id}.json")
            with create_private_file(case_path) as out:
                written.append(case_path)  # removed with the rest if anything fails
                out.write(canonical_bytes(opened.case_data))
                if track_outputs:
                    try:
                        sync_file(out)
                    except OSError as exc:
                        raise _output_not_written(out_dir, exc) from None
            for tmp, info in temps:
                target = safe_output_path(out_dir, info.name)
                tmp.rename(target)
                written.append(target)
            temps.clear()
            if track_outputs:
                try:
                    sync_folder(out_dir)
                except OSError as exc:
                    raise _output_not_written(out_dir, exc) from None
        with node.db.transaction() as session:
            if opened.trust == StoredTrust.SUSPECT_ACCEPTED:
                _record_read(
                    session,
                    kind="suspect-accepted",
                    actor=actor,
                    now=now,
                    bundle_id=header.bundle_id,
                    body={
                        "direction": direction,
                        "sender": header.sender,
                        "signing_key_id": header.signing_key_id,
                        "stored_at": format_utc(opened_at, Precision.SECONDS),
                    },
                )
            _record_read(
                session,
                actor=actor,
                now=now,
                bundle_id=header.bundle_id,
                body={
                    "direction": direction,
                    "sender": header.sender,
                    "type": header.type,
                    "attachments": header.attachment_count,
                    "written_to_disk": bool(written),
                    "trust": opened.trust.value,
                },
            )
            if written and track_outputs:
                record_outputs(
                    session,
                    [WrittenOutput(p, header.bundle_id) for p in written],
                    command="show",
                    actor=actor,
                    now=now,
                )
    except BaseException:
        for tmp, _info in temps:
            tmp.unlink(missing_ok=True)
        for done in written:
            done.unlink(missing_ok=True)
        raise
    return ReadBundle(
        bundle_id=header.bundle_id,
        sender=header.sender,
        recipient=header.recipient,
        case_type=header.type,
        marking=header.marking,
        created_at=header.created_at,
        sequence=header.sequence,
        reply_to=header.reply_to,
        case=opened.case_data,
        written=written,
        trust=opened.trust.value,
        replaces=header.replaces,
    )


def check_reply_matches_case(case_type: str, reply_to: str | None, case: dict[str, Any]) -> None:
    """One source of truth: a reply's signed ``reply_to`` is its case's ``request_bundle_id``.

    ``send`` makes them equal; a bundle whose two differ (a faulty or hostile
    sender) is refused before anything is shown or written
    (:class:`~gateway.errors.VerificationError`, check ``reply_to``).
    """

    if case_type in REPLY_TARGETS and case.get("request_bundle_id") != reply_to:
        raise VerificationError(
            f"{case_type}: the case answers another request than its signed reply_to "
            f"{reply_to}; ask the sender to send the reply again",
            check="reply_to",
            reason="envelope.reply-to",
        )


def _record_read(
    session: Session,
    *,
    actor: Actor,
    now: datetime,
    bundle_id: str,
    body: dict[str, object],
    kind: str = "bundle-read",
) -> None:

    ledger.record_event(session, kind=kind, actor=actor, now=now, bundle_id=bundle_id, body=body)


# -- receiving a batch ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpooledEnvelope:
    """One received envelope file, with the SHA-256 (hex) and size taken while it
    was spooled; either may be ``None`` and is then computed from the file.

    ``ciphertext``: the hash of its ciphertext section, taken while it was
    spooled (verification then reads only the header and signature);
    ``synced``: its data was flushed to disk when it was spooled."""

    path: Path
    sha256: str | None = None
    size: int | None = None
    ciphertext: KnownCiphertext | None = None
    synced: bool = False
    body: bytes | None = None
    """The envelope's bytes, when the spool kept a small envelope in memory: then
    no file exists at ``path`` (it is written there only if the envelope has to
    become a file of the store), and ``sha256`` and ``size`` must be given."""


@dataclass(frozen=True, slots=True)
class ReceiveOutcome:
    """The answer for one envelope of a batch: a receipt, or why it was refused.

    ``error`` is a :class:`~gateway.errors.VerificationError`,
    :class:`~gateway.errors.RefusedError` (for example
    :class:`EquivocationRefused`) or :class:`~gateway.errors.InvalidInput`;
    ``replayed`` is true when the receipt was stored before (identical bytes).
    """

    receipt: bytes | None = None
    error: GatewayError | None = None
    replayed: bool = False


@dataclass
class _Accepted:
    index: int
    sha: str
    size: int
    facts: EnvelopeFacts
    path: Path
    body: bytes | None = None
    """The envelope's bytes when it is kept inline in its row (small enough)."""


@dataclass
class _ChannelGaps:
    """One channel's gap ranges, loaded once per batch and written back once."""

    top: int
    stored: dict[int, tuple[int, int]]
    ranges: list[tuple[int, int, datetime]]

    def receive(self, sequence: int, now: datetime) -> None:
        if sequence > self.top + 1:
            self.ranges.append((self.top + 1, sequence - 1, now))
        if sequence > self.top:
            self.top = sequence
            return
        for position, (first, last, _noticed) in enumerate(self.ranges):
            if first <= sequence <= last:
                pieces = []
                if first < sequence:
                    pieces.append((first, sequence - 1, now))
                if sequence < last:
                    pieces.append((sequence + 1, last, now))
                self.ranges[position : position + 1] = pieces
                return


def _load_gaps(session: Session, channel: str) -> _ChannelGaps:
    highest = session.scalar(
        select(func.max(InboxEntry.sequence)).where(InboxEntry.channel == channel)
    )
    rows = session.scalars(
        select(SequenceGap)
        .where(SequenceGap.channel == channel)
        .order_by(SequenceGap.first_missing)
        .with_for_update()
    ).all()
    return _ChannelGaps(
        top=int(highest or 0),
        stored={row.id: (row.first_missing, row.last_missing) for row in rows},
        ranges=[(row.first_missing, row.last_missing, row.noticed_at) for row in rows],
    )


def _write_gaps(session: Session, channel: str, gaps: _ChannelGaps) -> None:
    kept = {(first, last) for first, last, _ in gaps.ranges}
    gone = [row_id for row_id, span in gaps.stored.items() if span not in kept]
    if gone:
        session.execute(delete(SequenceGap).where(SequenceGap.id.in_(gone)))
    present = set(gaps.stored.values())
    session.add_all(
        SequenceGap(channel=channel, first_missing=first, last_missing=last, noticed_at=noticed)
        for first, last, noticed in gaps.ranges
        if (first, last) not in present
    )


def _spooled(item: SpooledEnvelope | Path) -> SpooledEnvelope:
    if isinstance(item, Path):
        item = SpooledEnvelope(item)
    if item.body is not None:
        if item.sha256 is None or item.size != len(item.body):
            raise ValueError("an envelope spooled in memory needs its SHA-256 and size")
        return item
    if item.sha256 is None or item.size is None:
        sha, size = _hash_file(item.path)
        return replace(item, sha256=sha, size=size)
    return item


def write_spooled_envelope(path: Path, body: bytes) -> None:
    """Write an envelope the spool kept in memory (:attr:`SpooledEnvelope.body`) to its
    spool path, a new 0600 file, for a handler that needs it as a file."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
        handle.write(body)


@dataclass
class PreparedBatch:
    """A batch of envelopes checked and their files stored, not yet recorded:
    what :func:`prepare_batch` hands to :func:`commit_batch`.

    Nothing of it is visible to anyone before the commit: its files are in the
    envelope store under their hashes, which no row names yet."""

    outcomes: list[ReceiveOutcome | None]
    accepted: list[_Accepted]
    copies: dict[int, int]
    manifest_id: int | None = None
    """The pinned peer manifest the envelopes were verified against (its row id)."""
    verified_at: datetime | None = None
    """The time the envelopes were verified at."""


class BatchOutdated(StorageError):
    """A prepared batch no longer stands: the peer's pinned manifest changed (a key may
    have been revoked) or too long passed since it was verified. Nothing of it is
    recorded; the sender sends it again and it is verified afresh."""

    reason = "receive.batch-outdated"


PREPARED_BATCH_MAX_AGE: Final = timedelta(seconds=60)
"""How long a prepared batch may wait for its commit before it is verified again."""


def receive_batch(
    ctx: NodeContext,
    envelopes: Sequence[SpooledEnvelope | Path],
    *,
    now: datetime,
    dispatch: bool = True,
    verify_pool: VerifyPool | None = None,
) -> list[ReceiveOutcome]:
    """Check, store and receipt the envelopes of one request; one outcome each, in order.

    What the peer server's ``POST /v1/envelopes`` runs for each request (as
    its two halves, :func:`prepare_batch` then :func:`commit_batch`, so that
    one request is verified while the one before it commits), and what any
    other way of receiving must call:

    1. one short read: receipts already stored for these SHA-256s (replays
       are answered with the stored receipt, byte for byte, before any
       re-verification), the pinned peer manifest; the policy is read once;
    2. every other envelope is verified completely (everything but decryption,
       :func:`~gateway.core.envelope.verify_envelope`); a refusal stores
       nothing of it;
    3. the verified files enter the envelope store, synced
       (:func:`~gateway.store.models_exchange.adopt_envelope_files`), except
       envelopes of at most ``[database] inline_envelope_max_bytes``: those are
       verified from memory and kept in their inbox row, with no file, link or
       fsync of their own;
    4. ONE transaction for the batch: the ledger lock taken once, reply
       targets, idempotency on (sender, bundle id, envelope hash),
       equivocation evidence, signed receipts (naming the latest checkpoint,
       read once), gap ranges (read and written once per channel), the inbox
       rows in one multi-row insert, and the batch's ``bundle-received`` and
       ``equivocation`` ledger entries, in the order of the envelopes, in one
       :func:`gateway.node.ledger.append_entries` call (one head read, one
       write);
    5. received consent bundles and refusal notices are applied
       (:func:`gateway.node.consent.apply_pending`), once for the batch and
       only when the batch brought one; the receipts stand whatever happens
       there (it runs again before the next consent decision).

    Steps 1 to 3 are :func:`prepare_batch`, 4 and 5 :func:`commit_batch`.
    A crash between any two steps loses nothing and doubles nothing: before
    the commit nothing names the stored files (the sender resends, the same
    bytes are verified again); after it, a resend is a replay. Crash points:
    ``after-batch-verify``, ``after-batch-adopt``, ``after-inbox-commit``.

    ``verify_pool``: the serving node's :class:`~gateway.node.verify_pool.VerifyPool`;
    step 2 runs its public checks there when the batch is large enough for
    it (``[server] verify_pool_min_envelopes``), with the same answers as without.

    Raises :class:`~gateway.errors.StorageError` when the database or the
    envelope store fails, or a verification worker died
    (:class:`~gateway.node.verify_pool.VerifyWorkerFailed`): nothing of the
    batch is stored; every envelope may be retried. Source of the rules: docs/sync.md, SPEC §6 and §9.
    """
    prepared = prepare_batch(ctx, envelopes, now=now, verify_pool=verify_pool)
    return commit_batch(ctx, prepared, now=now, dispatch=dispatch)


def prepare_batch(
    ctx: NodeContext,
    envelopes: Sequence[SpooledEnvelope | Path],
    *,
    now: datetime,
    verify_pool: VerifyPool | None = None,
) -> PreparedBatch:
    """Steps 1 to 3 of :func:`receive_batch`: replays, verification at ``now``, the
    verified files synced into the envelope store. Records nothing.

    Safe to run while an earlier batch of the same peer commits: a bundle that
    batch stores is found again under the ledger lock by :func:`commit_batch`
    (a replay there, or equivocation), so the order of the commits alone
    decides. Raises as :func:`receive_batch`; nothing is recorded then.
    """

    node, keyring = ctx.node, ctx.keyring
    items = [_spooled(item) for item in envelopes]
    outcomes: list[ReceiveOutcome | None] = [None] * len(items)
    if not items:
        return PreparedBatch(outcomes, [], {})
    policy = ctx.policy
    inline_max = node.settings.database.inline_envelope_max_bytes
    shas = sorted({item.sha256 for item in items if item.sha256 is not None})
    with node.db.transaction() as session:
        replays = {
            str(sha): bytes(receipt)
            for sha, receipt in session.execute(
                select(InboxEntry.envelope_sha256, InboxEntry.receipt).where(
                    InboxEntry.envelope_sha256.in_(shas)
                )
            )
        }
        peer = pinned_peer_manifest(session)
        manifest_id = pinned_manifest_id(session)
    first_of: dict[str, int] = {}
    copies: dict[int, int] = {}
    pending: list[tuple[int, SpooledEnvelope]] = []
    for index, item in enumerate(items):
        sha = item.sha256
        assert sha is not None
        assert item.size is not None
        if sha in replays:
            _log.info("envelope_replayed", envelope_sha256=sha)
            outcomes[index] = ReceiveOutcome(receipt=replays[sha], replayed=True)
            continue
        if sha in first_of:
            copies[index] = first_of[sha]  # the same bytes twice in one batch: one answer
            continue
        first_of[sha] = index
        if peer is None:
            outcomes[index] = ReceiveOutcome(
                error=RefusedError(
                    "no peer is pinned: nothing can be received", reason="peer.unpinned"
                )
            )
            continue
        if item.body is not None and item.size > inline_max:
            # Kept in memory by the spool but too large to live in its row: a file.
            write_spooled_envelope(item.path, item.body)
            pending.append((index, replace(item, body=None)))
            continue
        pending.append((index, item))
    # The files' data syncs run while the envelopes are verified (disk beside CPU);
    # storing them below then finds nothing left to write.
    # Envelopes kept inline are never files of the store: nothing of theirs to sync.
    syncing = [
        _SYNC_POOL.submit(_sync_spooled, item.path)
        for _, item in pending
        if item.size is not None and item.size > inline_max and not item.synced
    ]
    accepted: list[_Accepted] = []
    if peer is not None and pending:
        accepted = _verify_pending(
            node, keyring, policy, pending, outcomes, peer, inline_max, now, verify_pool
        )
    accepted = _check_replies(node, accepted, outcomes)
    for future in syncing:
        future.result()
    crash_point("after-batch-verify")
    files = [(a.path, a.sha) for a in accepted if a.body is None]
    if files:
        adopt_envelope_files(node.settings.blob_dir, files)
    crash_point("after-batch-adopt")
    return PreparedBatch(outcomes, accepted, copies, manifest_id, now)


def commit_batch(
    ctx: NodeContext, prepared: PreparedBatch, *, now: datetime, dispatch: bool = True
) -> list[ReceiveOutcome]:
    """Steps 4 and 5 of :func:`receive_batch`: record a prepared batch in one
    transaction (receipts and ledger entries dated ``now``); one outcome per
    envelope, in order. Batches of one peer must commit in the order they
    were sent. Raises as :func:`receive_batch`; nothing is recorded then."""

    node, keyring = ctx.node, ctx.keyring
    outcomes = list(prepared.outcomes)
    if prepared.verified_at is not None and now - prepared.verified_at > PREPARED_BATCH_MAX_AGE:
        raise BatchOutdated(
            f"the batch waited more than {PREPARED_BATCH_MAX_AGE.seconds} s for its turn "
            "after it was verified; send it again"
        )
    stored: list[_Accepted] = []
    for attempt in range(2):
        try:
            stored = _commit_batch(
                node, keyring, prepared.accepted, outcomes, now=now,
                manifest_id=prepared.manifest_id,
            )  # fmt: skip
            break
        except IntegrityError:
            # A concurrent receive of one of these bundle ids committed first (SQLite
            # only serialises at BEGIN): the second pass finds its rows.
            if attempt:
                raise
    if prepared.accepted:
        crash_point("after-inbox-commit")
    for index, first in prepared.copies.items():
        outcomes[index] = outcomes[first]
    if stored:
        # One line per batch; each bundle is named by its ledger entry too.
        _log.info(
            "envelopes_received",
            sender=stored[0].facts.sender,
            count=len(stored),
            bundle_ids=[entry.facts.bundle_id for entry in stored],
        )
    if dispatch and any(entry.facts.case_type in PROTOCOL_TYPES for entry in stored):
        _dispatch_protocol_bundles(ctx, now=now)
    return [outcome if outcome is not None else _lost() for outcome in outcomes]


def _verify_pending(
    node: Node,
    keyring: NodeKeyring,
    policy: Policy,
    pending: Sequence[tuple[int, SpooledEnvelope]],
    outcomes: list[ReceiveOutcome | None],
    peer: KeyManifest,
    inline_max: int,
    now: datetime,
    pool: VerifyPool | None,
) -> list[_Accepted]:
    """Step 2 of :func:`receive_batch`: verify each new envelope, in order.

    With a pool and a batch large enough for it (:meth:`VerifyPool.worth_it`),
    the public checks run in the pool and the content key is opened here
    afterwards (:func:`~gateway.core.envelope.check_content_key`); otherwise
    :func:`~gateway.core.envelope.verify_envelope` runs here. Both run the same
    checks in the same order, so the answers are the same. A file whose
    ciphertext hash was taken while it was spooled (``ciphertext``) is not read
    again past its header. Envelopes of at most ``inline_max`` bytes are
    verified from memory (read once, or as the spool kept them). Raises
    :class:`~gateway.node.verify_pool.VerifyWorkerFailed` if a worker died.
    """
    bodies = [
        item.body
        if item.body is not None
        else (item.path.read_bytes() if (item.size or 0) <= inline_max else None)
        for _, item in pending
    ]
    pooled: list[VerifyResult] | None = None
    if pool is not None and pool.worth_it(len(pending)):
        pooled = pool.verify(
            [
                body if body is not None else item.path
                for body, (_, item) in zip(bodies, pending, strict=True)
            ],
            node=keyring.node,
            held_key_ids=frozenset(keyring.encryption_keys),
            peer_manifest=peer,
            limits=policy.limits,
            now=now,
        )
    accepted: list[_Accepted] = []
    for position, (index, item) in enumerate(pending):
        body = bodies[position]
        path, sha, size = item.path, item.sha256 or "", item.size or 0
        try:
            if pooled is not None:
                result = pooled[position]
                if isinstance(result, GatewayError):
                    raise result
                header = result
                check_content_key(header, keyring=keyring)
            else:
                with io.BytesIO(body) if body is not None else path.open("rb") as stream:
                    header = verify_envelope(
                        stream,
                        keyring=keyring,
                        peer_manifest=peer,
                        policy=policy,
                        now=now,
                        known=item.ciphertext if body is None else None,
                    )
            if header.recipient != keyring.node or header.recipient != node.node_id:
                raise WrongRecipient(
                    f"envelope {header.bundle_id} is addressed to {header.recipient!r}, "
                    f"not to this node {node.node_id!r}"
                )
        except (VerificationError, RefusedError, InvalidInput) as exc:
            outcomes[index] = ReceiveOutcome(error=exc)
            continue
        accepted.append(_Accepted(index, sha, size, _facts(header), path, body))
    return accepted


def _check_replies(
    node: Node, accepted: list[_Accepted], outcomes: list[ReceiveOutcome | None]
) -> list[_Accepted]:
    """Refuse replies that answer no bundle this node sent to their sender (one read
    for the batch, and only when it holds replies); they leave no trace."""

    replies = [
        a for a in accepted if a.facts.reply_to is not None or a.facts.case_type in REPLY_TARGETS
    ]
    if not replies:
        return accepted
    refused: set[int] = set()
    with node.db.transaction() as session:
        for item in replies:
            try:
                check_reply_target(
                    session, item.facts.case_type, item.facts.reply_to, peer=item.facts.sender,
                    direction="sent",
                )  # fmt: skip
            except RefusedError as exc:
                outcomes[item.index] = ReceiveOutcome(error=exc)
                refused.add(item.index)
    return [a for a in accepted if a.index not in refused]


_SYNC_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="inbox-sync")


def _sync_spooled(path: Path) -> None:
    """Flush a spooled file's data to disk.

    Raises :class:`StorageError` when the disk did not take it: the kernel
    reports a failed write-back to the first sync that asks after it and not
    again, so the sync that stores the file would not hear of it (nothing of
    the batch is then accepted; the sender tries again)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise envelope_not_written(exc) from exc


def envelope_not_written(exc: OSError) -> StorageError:
    """The error of a received envelope whose bytes the disk did not take (``exc``,
    from a write, flush or sync): retryable, and nothing of it is accepted."""
    return StorageError(
        f"a received envelope could not be written to disk ({exc.strerror or exc}); "
        "nothing of it was accepted and the sender tries again"
    )


def _lost() -> ReceiveOutcome:
    return ReceiveOutcome(error=StorageError("envelope was not processed", reason="internal"))


def _dispatch_protocol_bundles(ctx: NodeContext, *, now: datetime) -> None:
    """Store received consent requests, grants, denials, revocations and refusal notices
    with their ledger entries. The receipts stand whatever happens here; anything left
    pending is applied before the next consent decision anyway."""

    try:
        apply_pending(ctx, now=now)
    except GatewayError as exc:
        _log.warning("consent_apply_deferred", error=type(exc).__name__, reason=exc.reason)


def _commit_batch(
    node: Node,
    signer: InboxSigner,
    accepted: Sequence[_Accepted],
    outcomes: list[ReceiveOutcome | None],
    *,
    now: datetime,
    manifest_id: int | None,
) -> list[_Accepted]:
    """The one transaction of a batch; fills ``outcomes`` and returns what was stored.

    Raises :class:`BatchOutdated` when the pinned peer manifest is no longer the one
    the batch was verified against (read under a shared lock of the pinned row, which
    a pin locks for update: a pin that comes later waits, and then marks this batch's
    rows as it marks every stored row)."""

    if not accepted:
        return []
    answers: dict[int, ReceiveOutcome] = {}
    evidence: list[tuple[_Accepted, Equivocation]] = []
    stored: list[_Accepted] = []
    with node.db.transaction() as session, session.no_autoflush:
        # The pinned manifest held first (a pin locks it, then the ledger), then the
        # ledger lock, which serialises receivers: one of each for the batch.
        current_manifest = pinned_manifest_id(session, hold=True)
        ledger.lock_for_append(session)
        if current_manifest != manifest_id:
            raise BatchOutdated(
                "the peer's key manifest changed while the batch was being verified; send it again"
            )
        ids = sorted({a.facts.bundle_id for a in accepted})
        known: dict[tuple[str, str], InboxEntry | _FreshRow] = {
            (row.sender, row.bundle_id): row
            for row in session.scalars(select(InboxEntry).where(InboxEntry.bundle_id.in_(ids)))
        }
        channels: dict[str, _ChannelGaps] = {}
        fresh: list[_FreshRow] = []
        events: list[ledger.Event] = []
        checkpoint: list[Checkpoint | None] = []
        for item in accepted:
            facts = item.facts
            prior = known.get((facts.sender, facts.bundle_id))
            if prior is not None and prior.envelope_sha256 == item.sha:
                answers[item.index] = ReceiveOutcome(receipt=bytes(prior.receipt), replayed=True)
                continue
            if prior is not None:
                if item.body is not None:
                    # Evidence is a whole envelope in the store: written and synced
                    # before the row naming it commits.
                    if not item.path.exists():
                        write_spooled_envelope(item.path, item.body)  # the spool kept it in memory
                    adopt_envelope_file(node.settings.blob_dir, item.path, item.sha)
                record = _record_equivocation(session, prior, facts, item.sha, now, events)
                evidence.append((item, record))
                continue
            channel = channel_name(facts.sender, facts.recipient)
            events.append(
                ledger.Event(
                    kind="bundle-received",
                    actor=SYSTEM,
                    now=now,
                    bundle_id=facts.bundle_id,
                    body={
                        "sender": facts.sender,
                        "type": facts.case_type,
                        "sequence": facts.sequence,
                        "marking": facts.marking,
                        "envelope_sha256": item.sha,
                        **({"replaces": facts.replaces} if facts.replaces else {}),
                    },
                )
            )
            replaced = _replaced_in_batch(session, known, facts)
            if replaced is not None:
                replaced.replaced_by = facts.bundle_id
            gaps = channels.get(channel)
            if gaps is None:
                gaps = channels[channel] = _load_gaps(session, channel)
            gaps.receive(facts.sequence, now)
            if not checkpoint:
                checkpoint.append(ledger_checkpoint(session))
            receipt = issue_receipt(
                signer,
                bundle_id=facts.bundle_id,
                envelope_hash=item.sha,
                received_at=now,
                receiver=facts.recipient,
                sender=facts.sender,
                checkpoint=checkpoint[0],
            )
            entry = _FreshRow(
                sender=facts.sender,
                bundle_id=facts.bundle_id,
                channel=channel,
                sequence=facts.sequence,
                case_type=facts.case_type,
                marking=facts.marking,
                reply_to=facts.reply_to,
                signing_key_id=facts.signing_key_id,
                created_at=facts.created_at,
                received_at=now,
                envelope_sha256=item.sha,
                envelope_size=item.size,
                envelope_body=item.body,
                receipt=receipt,
                replaces=facts.replaces,
                replaced_by=None,
            )
            known[(facts.sender, facts.bundle_id)] = entry
            fresh.append(entry)
            stored.append(item)
            answers[item.index] = ReceiveOutcome(receipt=receipt)
        for channel, gaps in channels.items():
            _write_gaps(session, channel, gaps)
        if fresh:
            # One multi-row insert; the rows were never added to the session (a flush
            # would insert them one at a time on SQLite, to learn each row's id), and
            # into the table itself: the ORM's bulk path adds nothing the rows need.
            session.execute(insert(_INBOX), fresh)
        # Every entry of the batch in one append: one head read, one write.
        ledger.append_entries(session, events)
        session.flush()
    for item, record in evidence:
        _log.warning(
            "equivocation_refused",
            sender=item.facts.sender,
            bundle_id=item.facts.bundle_id,
            first_sha256=record.first_envelope_sha256,
            other_sha256=item.sha,
        )
        answers[item.index] = ReceiveOutcome(
            error=EquivocationRefused(
                f"bundle {item.facts.bundle_id} from {item.facts.sender} was received before "
                "with another envelope; the new one is refused and recorded as equivocation"
            )
        )
    for index, outcome in answers.items():
        outcomes[index] = outcome
    return stored


_INBOX: Final = cast(Table, InboxEntry.__table__)


class _FreshRow(dict[str, Any]):
    """A new inbox row of the batch being committed: the values its multi-row insert
    takes, read (and, for ``replaced_by``, written) like a stored
    :class:`InboxEntry`. Cheaper than a mapped object, which the insert never needs."""

    id = None

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self:
            raise AttributeError(name)
        self[name] = value


def _replaced_in_batch(
    session: Session, known: dict[tuple[str, str], InboxEntry | _FreshRow], facts: EnvelopeFacts
) -> InboxEntry | _FreshRow | None:
    """:func:`_replaced_entry`, also finding an original stored earlier in the same batch."""
    if facts.replaces is None:
        return None
    pending = known.get((facts.sender, facts.replaces))
    if pending is not None and pending.id is None:
        if pending.case_type != facts.case_type or pending.replaced_by:
            _log.warning(
                "replacement_not_linked",
                sender=facts.sender,
                bundle_id=facts.bundle_id,
                replaces=facts.replaces,
                known=True,
            )
            return None
        return pending
    return _replaced_entry(session, facts)
