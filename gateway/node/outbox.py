"""The outbox and the sender: every bundle ``send`` accepted reaches the peer exactly once.

* :func:`send_case` validates the case, seals it to the peer's current
  encryption key and queues it in ONE transaction with its per-channel
  sequence number and a ``bundle-sent`` ledger entry. The envelope file is
  written and synced before that transaction commits; it is never sealed
  again, so every retry sends the very same bytes.
* :func:`deliver_once` first sends any key manifest the peer has not seen,
  then the queued envelopes in sequence order, in batches. A bundle counts as
  delivered only when the receipt that comes back verifies against the
  peer's pinned manifest and names exactly its bundle id and envelope hash.
  Every failed attempt, of one bundle or of the whole pass, updates the
  bundle's attempts, last error and next attempt.
* :func:`run_sender` is the worker inside ``gateway serve``: it calls
  :func:`deliver_once` forever, backing off exponentially with jitter while
  the peer is unreachable, and wakes early when a bundle is queued in this
  process.

Exactly once: the receiver is idempotent on (sender, bundle id, envelope
hash), so a crash anywhere between queueing and storing the receipt only
leads to a resend of identical bytes, answered with the identical receipt.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import secrets
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast

from sqlalchemy import Table, bindparam, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gateway import log
from gateway.core.cases import (
    PROTOCOL_COMMANDS,
    PROTOCOL_TYPES,
    REPLY_TARGETS,
    resolve_reply_to,
    validate_case,
)
from gateway.core.envelope import AttachmentSource, seal
from gateway.core.keys import KeyManifest
from gateway.core.policy import Marking
from gateway.core.receipt import ReceiptInvalid, ReceiptVerifyKeys, verify_receipt
from gateway.core.roles import Actor
from gateway.errors import (
    GatewayError,
    InvalidInput,
    NotFound,
    RefusedError,
    StorageError,
    TransportError,
    message_for_client,
)
from gateway.files import sync_folder
from gateway.node import ledger
from gateway.node.context import NodeContext
from gateway.node.crash import crash_point
from gateway.node.own_keys import mark_manifest_delivered, pending_manifests
from gateway.node.peer_trust import require_pinned_peer
from gateway.node.runtime import Node, utc_now
from gateway.store.models_exchange import (
    ENVELOPE_DIR,
    InboxEntry,
    OutboxEntry,
    OutboxState,
    SequenceCounter,
    envelope_path,
    make_store_folder,
    sweep_orphan_envelopes,
)
from gateway.store.models_refusal import BundleRefusalRecord, RefusalDirection

__all__ = [
    "BATCH_MAX_BYTES",
    "BATCH_MAX_ENVELOPES",
    "DeliveryReport",
    "Sealed",
    "Sealer",
    "SentBundle",
    "check_reply_target",
    "deliver_once",
    "deliver_pending",
    "describe_outbox_entry",
    "list_outbox",
    "next_batch",
    "notify_queued",
    "outbox_entry",
    "peer_answered",
    "queue_sealed",
    "queue_waiter",
    "queued_by_hash",
    "record_too_large",
    "refusals_by_peer",
    "retry_delay",
    "run_sender",
    "run_sender_loop",
    "send_case",
    "send_protocol_bundle",
    "take_peer_results",
]

BATCH_MAX_ENVELOPES = 64
PIPELINE_DEPTH = 3
"""Batches a delivery pass keeps in flight at once."""
PROBE_INTERVAL_SECONDS = 2.0
"""While the peer is unreachable, how often the worker asks ``GET /v1/health`` whether it is back."""
BATCH_MAX_BYTES = 16 * 1024 * 1024
RETRY_BASE_SECONDS = 1.0
RETRY_CAP_SECONDS = 300.0
LAST_ERROR_CHARS = 300
_CHUNK = 1 << 20
_log = log.get_logger("outbox")


@dataclass(frozen=True, slots=True)
class SentBundle:
    """What ``send`` reports: the bundle queued for delivery."""

    bundle_id: str
    sequence: int
    case_type: str
    recipient: str
    marking: str
    envelope_sha256: str
    envelope_size: int
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        """What ``gateway send`` and ``POST /api/v1/bundles`` answer."""
        return {
            "bundle_id": self.bundle_id,
            "sequence": self.sequence,
            "type": self.case_type,
            "recipient": self.recipient,
            "marking": self.marking,
            "envelope_sha256": self.envelope_sha256,
            "envelope_bytes": self.envelope_size,
        }


@dataclass
class DeliveryReport:
    """What one delivery pass did."""

    manifests_sent: int = 0
    delivered: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    retry_later: dict[str, str] = field(default_factory=dict)
    remaining: int = 0

    @property
    def attempted(self) -> int:
        return len(self.delivered) + len(self.refused) + len(self.retry_later)


def _network_retry() -> float:
    return RETRY_BASE_SECONDS


def retry_delay(
    failures: int,
    *,
    base: float = RETRY_BASE_SECONDS,
    cap: float = RETRY_CAP_SECONDS,
    rng: Callable[[], float] = random.random,
) -> float:
    """Exponential backoff with jitter: uniform in [d/2, d], d = min(cap, base * 2^(n-1))."""
    if failures <= 0:
        return 0.0
    ceiling = min(cap, base * (2 ** min(failures - 1, 32)))
    return float(ceiling / 2 + (ceiling / 2) * rng())


# -- queueing ------------------------------------------------------------------------

_waiters_lock = threading.Lock()
_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []


def notify_queued() -> None:
    """Wake every sender worker of this process (a bundle was queued)."""
    with _waiters_lock:
        waiters = list(_waiters)
    for loop, event in waiters:
        if not loop.is_closed():
            loop.call_soon_threadsafe(event.set)


@contextmanager
def queue_waiter() -> Iterator[asyncio.Event]:
    """An event this process sets whenever it queues a bundle (:func:`notify_queued`),
    for as long as the context lasts (the pull route's long-poll waits on it)."""
    wake = asyncio.Event()
    entry = (asyncio.get_running_loop(), wake)
    with _waiters_lock:
        _waiters.append(entry)
    try:
        yield wake
    finally:
        with _waiters_lock:
            _waiters.remove(entry)


def _next_sequence(session: Session, channel: str) -> int:
    """Take the next sequence number of ``channel`` under a row lock."""
    counter = session.get(SequenceCounter, channel, with_for_update=True)
    if counter is None:
        try:
            with session.begin_nested():
                session.add(SequenceCounter(channel=channel, last_sequence=0))
        except IntegrityError:
            pass  # a concurrent first send created it; lock that row below
        counter = session.get(
            SequenceCounter, channel, with_for_update=True, populate_existing=True
        )
        if counter is None:
            raise StorageError(f"sequence counter of channel {channel} could not be created")
    counter.last_sequence += 1
    session.flush()
    return counter.last_sequence


def _ledger_event(
    session: Session,
    *,
    kind: str,
    actor: Actor,
    now: datetime,
    bundle_id: str,
    body: dict[str, object],
) -> None:

    ledger.record_event(session, kind=kind, actor=actor, now=now, bundle_id=bundle_id, body=body)


@dataclass(frozen=True, slots=True)
class Sealed:
    """What a sealer reports of the envelope it wrote."""

    bundle_id: str
    marking: str
    signing_key_id: str | None = None
    replaces: str | None = None
    """The bundle this envelope re-sends (its signed ``replaces`` header field)."""


class Sealer(Protocol):
    """Writes the envelope carrying ``sequence`` to ``out``; says which bundle it is."""

    def __call__(self, out: BinaryIO, *, sequence: int) -> Sealed: ...


def _write_envelope(blob_dir: Path, seal: Sealer, sequence: int) -> tuple[Path, Sealed]:
    directory = blob_dir / ENVELOPE_DIR
    make_store_folder(directory, root=blob_dir)
    tmp = directory / f".tmp-{secrets.token_hex(8)}"
    try:
        with tmp.open("x+b") as out:
            sealed = seal(out, sequence=sequence)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, sealed


def _commit_envelope_file(blob_dir: Path, tmp: Path) -> tuple[str, int]:
    """Rename a synced envelope file to its SHA-256 name in the store; sync the folder."""
    digest = hashlib.sha256()
    size = 0
    with tmp.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    sha = digest.hexdigest()
    final = envelope_path(blob_dir, sha)
    make_store_folder(final.parent, root=blob_dir)
    tmp.replace(final)
    sync_folder(final.parent)
    return sha, size


def queue_sealed(
    node: Node,
    *,
    actor: Actor,
    recipient: str,
    case_type: str,
    reply_to: str | None,
    seal: Sealer,
    now: datetime,
    in_transaction: Callable[[Session, str], None] | None = None,
) -> SentBundle:
    """Assign the sequence number, seal, store and queue in one transaction.

    The envelope file is synced to disk before the row naming it commits; if
    anything fails, the transaction rolls back and at most an orphan file
    (never named by a row) is left for :func:`sweep_orphan_envelopes`.
    ``in_transaction(session, bundle_id)``, when given, runs last inside the
    same transaction, so a feature's own rows commit or roll back with the
    queued bundle (the consent protocol records its requests and grants so).
    """
    channel = f"{node.node_id}->{recipient}"
    blob_dir = node.settings.blob_dir
    with node.db.transaction() as session:
        sequence = _next_sequence(session, channel)
        tmp, sealed = _write_envelope(blob_dir, seal, sequence)
        bundle_id, marking = sealed.bundle_id, sealed.marking
        try:
            sha, size = _commit_envelope_file(blob_dir, tmp)
        finally:
            tmp.unlink(missing_ok=True)
        session.add(
            OutboxEntry(
                bundle_id=bundle_id,
                channel=channel,
                recipient=recipient,
                sequence=sequence,
                case_type=case_type,
                marking=marking,
                reply_to=reply_to,
                envelope_sha256=sha,
                envelope_size=size,
                state=OutboxState.QUEUED,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
                actor=actor.label,
                signing_key_id=sealed.signing_key_id,
                replaces=sealed.replaces,
            )
        )
        _ledger_event(
            session,
            kind="bundle-sent",
            actor=actor,
            now=now,
            bundle_id=bundle_id,
            body={
                "recipient": recipient,
                "type": case_type,
                "sequence": sequence,
                "marking": marking,
                "envelope_sha256": sha,
                "state": OutboxState.QUEUED,
                **({"replaces": sealed.replaces} if sealed.replaces else {}),
            },
        )
        session.flush()
        if in_transaction is not None:
            in_transaction(session, bundle_id)
    crash_point("after-outbox-insert")
    _log.info("bundle_queued", bundle_id=bundle_id, sequence=sequence, type=case_type)
    notify_queued()
    return SentBundle(
        bundle_id=bundle_id,
        sequence=sequence,
        case_type=case_type,
        recipient=recipient,
        marking=marking,
        envelope_sha256=sha,
        envelope_size=size,
        created_at=now,
    )


def send_case(
    ctx: NodeContext,
    actor: Actor,
    case_type: str,
    case_data: Mapping[str, Any],
    attachments: Sequence[Path],
    *,
    public: bool,
    reply_to: str | None,
    now: datetime,
) -> SentBundle:
    """Validate, seal to the pinned peer's current encryption key, and queue a case.

    What ``gateway send`` and ``POST /api/v1/bundles`` do. Bad case data
    raises :class:`~gateway.core.cases.InvalidCase` naming the field, before
    anything is written; an attachment that cannot be read raises
    :class:`~gateway.errors.InvalidInput` naming the file. A type with a
    protocol of its own (:data:`~gateway.core.cases.PROTOCOL_TYPES`: the
    consent bundles and refusal notices) is refused with ``InvalidInput``
    naming the command that makes it.
    """

    if case_type in PROTOCOL_TYPES:
        raise InvalidInput(
            f"{case_type} has its own protocol and is not sent as a case: use "
            f"'{PROTOCOL_COMMANDS[case_type]}' (it names the acting officer and checks the items)"
        )
    return _seal_and_queue(
        ctx, actor, case_type, case_data, attachments,
        public=public, reply_to=reply_to, now=now, in_transaction=None,
    )  # fmt: skip


def send_protocol_bundle(
    ctx: NodeContext,
    actor: Actor,
    case_type: str,
    case_data: Mapping[str, Any],
    attachments: Sequence[Path],
    *,
    reply_to: str | None,
    now: datetime,
    in_transaction: Callable[[Session, str], None],
) -> SentBundle:
    """Queue a bundle of the consent protocol or a refusal notice (confidential).

    For :mod:`gateway.node.consent` only, whose commands build ``case_data``
    from the acting officer and stored records; ``in_transaction`` records
    the step in the same transaction as the queued bundle. Raises
    :class:`~gateway.errors.InvalidInput` for any other type.
    """

    if case_type not in PROTOCOL_TYPES:
        raise InvalidInput(f"{case_type} is not a protocol bundle")
    return _seal_and_queue(
        ctx, actor, case_type, case_data, attachments,
        public=False, reply_to=reply_to, now=now, in_transaction=in_transaction,
    )  # fmt: skip


def _seal_and_queue(
    ctx: NodeContext,
    actor: Actor,
    case_type: str,
    case_data: Mapping[str, Any],
    attachments: Sequence[Path],
    *,
    public: bool,
    reply_to: str | None,
    now: datetime,
    in_transaction: Callable[[Session, str], None] | None,
) -> SentBundle:

    node, keyring = ctx.node, ctx.keyring
    policy = ctx.policy
    validated = validate_case(case_type, dict(case_data), max_bytes=policy.limits.max_case_bytes)
    peer = _pinned_peer_manifest(node)
    reply_to = resolve_reply_to(case_type, validated, reply_to)
    if reply_to is not None:
        with node.db.transaction() as session:
            check_reply_target(session, case_type, reply_to, peer=peer.node, direction="received")
    marking: Marking = "public" if public else "confidential"
    with ExitStack() as stack:
        sources: list[AttachmentSource] = []
        for path in attachments:
            try:
                handle = stack.enter_context(path.open("rb"))
                size = os.fstat(handle.fileno()).st_size
            except OSError as exc:
                raise InvalidInput(f"attachment {path}: cannot be read ({exc.strerror})") from None
            if not path.is_file():
                raise InvalidInput(f"attachment {path}: not a regular file")
            sources.append(AttachmentSource(name=path.name, size=size, stream=handle))

        def sealer(out: BinaryIO, *, sequence: int) -> Sealed:
            for source in sources:
                source.stream.seek(0)
            sealed = seal(
                out,
                case_type=case_type,
                case=validated,  # checked above; seal does not validate it again
                attachments=sources,
                keyring=keyring,
                peer_manifest=peer,
                policy=policy,
                sequence=sequence,
                now=now,
                marking=marking,
                reply_to=reply_to,
            )
            return Sealed(
                bundle_id=sealed.bundle_id,
                marking=sealed.header.marking,
                signing_key_id=sealed.header.signing_key_id,
            )

        return queue_sealed(
            node,
            actor=actor,
            recipient=peer.node,
            case_type=case_type,
            reply_to=reply_to,
            seal=sealer,
            now=now,
            in_transaction=in_transaction,
        )


def check_reply_target(
    session: Session, case_type: str, reply_to: str | None, *, peer: str, direction: str
) -> None:
    """Refuse a bundle that answers nothing: ``reply_to`` must name a bundle of the exchange.

    ``direction="received"`` (we send): a bundle ``peer`` sent us; raises
    :class:`~gateway.errors.InvalidInput`. ``direction="sent"`` (we receive
    from ``peer``): a bundle we sent to ``peer``; raises
    :class:`~gateway.errors.RefusedError` (reason ``reply.unknown``), which the
    peer server answers as a refusal before anything is stored. A type that
    answers a given type (:data:`~gateway.core.cases.REPLY_TARGETS`) must name
    a bundle of that type, and must name one.
    """

    wanted = REPLY_TARGETS.get(case_type)
    found: str | None = None
    if reply_to is not None and direction == "received":
        found = session.scalars(
            select(InboxEntry.case_type).where(
                InboxEntry.bundle_id == reply_to, InboxEntry.sender == peer
            )
        ).first()
    elif reply_to is not None:
        found = session.scalars(
            select(OutboxEntry.case_type).where(
                OutboxEntry.bundle_id == reply_to, OutboxEntry.recipient == peer
            )
        ).first()
    if found is not None and (wanted is None or found == wanted):
        return
    what = wanted or "bundle"
    if direction == "received":
        where = f"{case_type}: {'request_bundle_id' if wanted else '--reply-to'} {reply_to}"
        raise InvalidInput(
            f"{where} names no {what} received from {peer}; check the id with 'gateway inbox'"
        )
    raise RefusedError(
        f"{case_type} from {peer} answers {reply_to or 'nothing'}, which names no {what} "
        f"this node sent to {peer}",
        reason="reply.unknown",
    )


# -- delivery ------------------------------------------------------------------------


class EnvelopeOutcome(Protocol):
    """One result of ``PeerClient.post_envelopes``."""

    @property
    def status(self) -> str: ...

    @property
    def receipt(self) -> bytes | None: ...

    @property
    def reason(self) -> str | None: ...


class DeliveryClient(Protocol):
    """What delivery needs of ``PeerClient``."""

    async def post_envelopes(self, paths: Sequence[Path]) -> Sequence[EnvelopeOutcome]: ...

    async def post_manifest(self, raw: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class _Pending:
    id: int
    bundle_id: str
    sequence: int
    envelope_sha256: str
    envelope_size: int
    attempts: int
    path: Path


def _next_batch(
    node: Node, *, after: int, due_before: datetime | None, limit: int = BATCH_MAX_ENVELOPES
) -> list[_Pending]:
    with node.db.transaction() as session:
        query = (
            select(OutboxEntry)
            .where(OutboxEntry.state == OutboxState.QUEUED, OutboxEntry.id > after)
            .order_by(OutboxEntry.id)
            .limit(max(1, min(limit, BATCH_MAX_ENVELOPES)))
        )
        if due_before is not None:
            query = query.where(OutboxEntry.next_attempt_at <= due_before)
        rows = session.scalars(query).all()
    batch: list[_Pending] = []
    total = 0
    for row in rows:
        if batch and total + row.envelope_size > BATCH_MAX_BYTES:
            break
        path = envelope_path(node.settings.blob_dir, row.envelope_sha256)
        if not path.is_file():
            raise StorageError(
                f"envelope file of queued bundle {row.bundle_id} is missing from the blob store"
            )
        batch.append(
            _Pending(
                row.id,
                row.bundle_id,
                row.sequence,
                row.envelope_sha256,
                row.envelope_size,
                row.attempts,
                path,
            )
        )
        total += row.envelope_size
    return batch


def next_batch(
    node: Node, *, due_before: datetime | None, limit: int = BATCH_MAX_ENVELOPES
) -> list[_Pending]:
    """The queued bundles to deliver next, oldest first (the order of the channel):
    at most ``limit`` (and :data:`BATCH_MAX_ENVELOPES`) envelopes and
    :data:`BATCH_MAX_BYTES` (one larger envelope goes alone). With ``due_before``
    only those whose next attempt has come. Raises :class:`StorageError` when a
    queued envelope's file is missing."""
    return _next_batch(node, after=0, due_before=due_before, limit=limit)


def queued_by_hash(node: Node, hashes: Sequence[str]) -> dict[str, _Pending]:
    """The queued bundles among envelope SHA-256 hex digests ``hashes``, by hash.

    A hash that names no queued bundle (delivered already, or never sent) is
    absent from the answer."""
    if not hashes:
        return {}
    with node.db.transaction() as session:
        rows = session.scalars(
            select(OutboxEntry).where(
                OutboxEntry.state == OutboxState.QUEUED,
                OutboxEntry.envelope_sha256.in_(list(set(hashes))),
            )
        ).all()
    return {
        row.envelope_sha256: _Pending(
            row.id,
            row.bundle_id,
            row.sequence,
            row.envelope_sha256,
            row.envelope_size,
            row.attempts,
            envelope_path(node.settings.blob_dir, row.envelope_sha256),
        )
        for row in rows
    }


def record_too_large(node: Node, item: _Pending, why: str, *, now: datetime) -> None:
    """Count a failed attempt for a bundle the peer's limit cannot take, with backoff."""
    _store_outcomes(node, [], [(item, why)], now=now)


async def take_peer_results(
    node: Node,
    batch: list[_Pending],
    results: Sequence[EnvelopeOutcome],
    *,
    now_fn: Callable[[], datetime] = utc_now,
) -> DeliveryReport:
    """Verify the peer's receipts for ``batch`` (one result each, in order) and store
    every outcome, exactly as after a push: delivered only on a receipt that verifies
    against the pinned peer manifest and names the bundle and its envelope hash.
    The pull route (``POST /v1/pull/receipts``) calls it."""
    report = DeliveryReport()
    manifest = await asyncio.to_thread(_pinned_peer, node)
    await asyncio.to_thread(_take_results, node, batch, results, manifest, report, now=now_fn())
    return report


def _count_queued(node: Node) -> int:
    with node.db.transaction() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(OutboxEntry)
                .where(OutboxEntry.state == OutboxState.QUEUED)
            )
            or 0
        )


_OUTBOX = cast(Table, OutboxEntry.__table__)
_MARK_DELIVERED = (
    _OUTBOX.update()
    .where(_OUTBOX.c.id == bindparam("row_id"), _OUTBOX.c.state == OutboxState.QUEUED)
    .values(
        state=OutboxState.DELIVERED,
        receipt=bindparam("new_receipt"),
        delivered_at=bindparam("now"),
        attempts=_OUTBOX.c.attempts + 1,
        last_error=None,
    )
)
_MARK_RETRY = (
    _OUTBOX.update()
    .where(_OUTBOX.c.id == bindparam("row_id"), _OUTBOX.c.state == OutboxState.QUEUED)
    .values(
        attempts=_OUTBOX.c.attempts + 1,
        last_error=bindparam("why"),
        next_attempt_at=bindparam("next_at"),
    )
)
"""The outcome of one batch, each kind one statement over all its rows (``executemany``:
psycopg sends the rows in one pipeline, not one round trip per bundle)."""


def _store_outcomes(
    node: Node,
    delivered: list[tuple[_Pending, bytes]],
    failed: list[tuple[_Pending, str]],
    *,
    now: datetime,
) -> None:
    with node.db.transaction() as session:
        connection = session.connection()
        if delivered:
            connection.execute(
                _MARK_DELIVERED,
                [{"row_id": item.id, "new_receipt": receipt, "now": now}
                 for item, receipt in delivered],
            )  # fmt: skip
        if failed:
            connection.execute(
                _MARK_RETRY,
                [
                    {
                        "row_id": item.id,
                        "why": why[:LAST_ERROR_CHARS],
                        "next_at": now + timedelta(seconds=retry_delay(item.attempts + 1)),
                    }
                    for item, why in failed
                ],
            )


def _record_failed_pass(
    node: Node,
    *,
    after: int,
    due_before: datetime | None,
    why: str,
    now: datetime,
    network: bool = False,
) -> int:
    """A pass failed as a whole (peer unreachable, refused, ...): every queued bundle
    it would still have tried (id above ``after``, due by ``due_before`` when given)
    counts one more attempt, keeps ``why`` as its last error and gets its next
    attempt by the backoff of :func:`retry_delay`. Returns how many were updated.

    With ``network`` (the peer could not be reached or the connection broke)
    the bundles are due again within a second: the link failed, not they, and
    the worker's own backoff decides when the next pass runs, so nothing waits
    longer than the link is down."""
    with node.db.transaction() as session:
        query = select(OutboxEntry.id, OutboxEntry.attempts).where(
            OutboxEntry.state == OutboxState.QUEUED, OutboxEntry.id > after
        )
        if due_before is not None:
            query = query.where(OutboxEntry.next_attempt_at <= due_before)
        rows = session.execute(query).all()
        if rows:
            session.connection().execute(
                _MARK_RETRY,
                [
                    {
                        "row_id": row_id,
                        "why": why[:LAST_ERROR_CHARS],
                        "next_at": now + timedelta(seconds=_network_retry())
                        if network
                        else now + timedelta(seconds=retry_delay(attempts + 1)),
                    }
                    for row_id, attempts in rows
                ],
            )
    return len(rows)


PeerManifestSource = Callable[[Node], ReceiptVerifyKeys]
ManifestQueue = Callable[[Node], Sequence[tuple[object, bytes]]]
ManifestDone = Callable[[Node, object, datetime], None]


async def deliver_pending(
    node: Node,
    client: DeliveryClient,
    *,
    peer_manifest: PeerManifestSource,
    pending_manifests: ManifestQueue,
    mark_manifest_delivered: ManifestDone,
    now_fn: Callable[[], datetime] = utc_now,
    due_only: bool = False,
    progress: Callable[[DeliveryReport], None] | None = None,
    batch_size: int = BATCH_MAX_ENVELOPES,
    pipeline: int = PIPELINE_DEPTH,
) -> DeliveryReport:
    """One delivery pass: manifests first, then every queued envelope in order.

    Up to ``pipeline`` batches are in flight at once (the next one is posted
    while the peer stores the previous), taken in sequence order and
    answered in that order; their requests start one after the other, so
    the peer stores them in order (its batches take turns by arrival).

    Network failures (:class:`~gateway.errors.TransportError`) and any other
    :class:`~gateway.errors.GatewayError` that ends the pass propagate: the
    caller decides to report (``gateway sync``) or to back off (the worker).
    Before they do, every bundle the pass had not yet had an answer for (of
    those due, with ``due_only``) records the attempt, the error's message as
    ``last_error`` and its next attempt, so ``gateway outbox`` and
    ``GET /api/v1/outbox`` show why it waits.
    """
    report = DeliveryReport()
    after = 0
    answered = False
    in_flight: deque[tuple[list[_Pending], asyncio.Task[Sequence[EnvelopeOutcome]]]] = deque()
    try:
        for handle, raw in await asyncio.to_thread(pending_manifests, node):
            await client.post_manifest(raw)
            await asyncio.to_thread(mark_manifest_delivered, node, handle, now_fn())
            report.manifests_sent += 1
            node.metrics.manifests_delivered.inc()
        manifest = await asyncio.to_thread(peer_manifest, node)
        fetched = 0
        exhausted = False

        async def fill() -> None:
            nonlocal fetched, exhausted
            while not exhausted and len(in_flight) < max(1, pipeline):
                batch = await asyncio.to_thread(
                    _next_batch,
                    node,
                    after=fetched,
                    due_before=now_fn() if due_only else None,
                    limit=batch_size,
                )
                if not batch:
                    exhausted = True
                    return
                fetched = batch[-1].id
                node.metrics.envelopes_sent.inc(len(batch))
                paths = [item.path for item in batch]
                in_flight.append((batch, asyncio.ensure_future(client.post_envelopes(paths))))

        while True:
            await fill()
            if not in_flight:
                break
            batch, posted = in_flight.popleft()
            results = await posted
            answered = True
            # The next batch goes out before this one's receipts are checked and
            # stored, so the peer always has work while this side writes.
            try:
                await fill()
            finally:
                # Stored even when the next batch could not be taken: it was answered.
                await asyncio.to_thread(
                    _take_results, node, batch, results, manifest, report, now=now_fn()
                )
                after = batch[-1].id
            if progress is not None:
                progress(report)
    except GatewayError as exc:
        await _abandon(in_flight)
        # The pass failed before these bundles had an answer: each still records
        # the attempt, why it failed and when it is tried next.
        try:
            await asyncio.to_thread(
                _record_failed_pass,
                node,
                after=after,
                due_before=now_fn() if due_only else None,
                why=message_for_client(exc, None),  # shown to users: no driver text
                now=now_fn(),
                network=isinstance(exc, TransportError),
            )
        except GatewayError as also:
            _log.warning("delivery_state_not_recorded", reason=also.reason, detail=also.message)
        if answered:
            exc.peer_answered = True  # type: ignore[attr-defined]
        raise
    except BaseException:
        await _abandon(in_flight)
        raise
    report.remaining = await asyncio.to_thread(_count_queued, node)
    return report


def peer_answered(error: BaseException) -> bool:
    """True when the pass that raised ``error`` had answers from the peer before it failed
    (the link was up a moment ago): the worker then retries at once, without backoff."""
    return bool(getattr(error, "peer_answered", False))


async def _abandon(
    in_flight: deque[tuple[list[_Pending], asyncio.Task[Sequence[EnvelopeOutcome]]]],
) -> None:
    """Cancel the batches still in flight after a failure; their bundles stay queued
    and are resent byte for byte (the peer answers a resend with the same receipt)."""
    tasks = [task for _, task in in_flight]
    in_flight.clear()
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


def _take_results(
    node: Node,
    batch: list[_Pending],
    results: Sequence[EnvelopeOutcome],
    manifest: ReceiptVerifyKeys,
    report: DeliveryReport,
    *,
    now: datetime,
) -> None:
    """Verify the receipts of one batch and store every bundle's outcome (in a worker
    thread: the signature checks and the commit stay off the event loop)."""
    crash_point("after-send")
    metrics = node.metrics
    delivered: list[tuple[_Pending, bytes]] = []
    failed: list[tuple[_Pending, str]] = []
    for item, result in zip(batch, results, strict=True):
        if result.status == "accepted" and result.receipt is not None:
            try:
                verify_receipt(
                    result.receipt,
                    peer_manifest=manifest,
                    expected_bundle_id=item.bundle_id,
                    expected_envelope_hash=item.envelope_sha256,
                    expected_sender=node.node_id,
                )
            except ReceiptInvalid as exc:
                _log.warning("receipt_refused", bundle_id=item.bundle_id, check=exc.check)
                metrics.delivery_failed("receipt", exc.check)
                failed.append((item, f"receipt refused: {exc.check}"))
                report.retry_later[item.bundle_id] = f"receipt refused: {exc.check}"
                continue
            delivered.append((item, result.receipt))
            report.delivered.append(item.bundle_id)
            metrics.envelopes_delivered.inc()
        else:
            why = f"{result.status}: {result.reason or 'unknown'}"
            failed.append((item, why))
            if result.status == "refused":
                report.refused[item.bundle_id] = why
                metrics.delivery_failed("refused", result.reason)
            else:
                report.retry_later[item.bundle_id] = why
                metrics.delivery_failed("retry", result.reason)
    crash_point("before-receipt-store")
    _store_outcomes(node, delivered, failed, now=now)


async def run_sender_loop(
    node: Node,
    client_factory: Callable[[], AbstractAsyncContextManager[DeliveryClient]],
    stop: asyncio.Event,
    *,
    deliver: Callable[[DeliveryClient], object],
    interval: float,
    rng: Callable[[], float] = random.random,
    probe_interval: float = PROBE_INTERVAL_SECONDS,
) -> None:
    """Call ``deliver`` until ``stop`` is set; back off on failures, never give up.

    The backoff (:func:`retry_delay`) counts network failures of passes the
    timer started; a pass that a local ``send`` started early (:func:`notify_queued`)
    and that fails as well leaves the step as it was and keeps the time
    already scheduled. The step resets as soon as the peer answers: a pass
    that had answers before it failed is followed by another at once. While
    the peer cannot be reached, ``GET /v1/health`` is asked every
    ``probe_interval`` seconds (when the client has ``health``); its answer
    starts a pass at once. Other failures (the database, say) back off on a
    count of their own.
    """
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    entry = (loop, wake)
    with _waiters_lock:
        _waiters.append(entry)
    failures = 0
    local_failures = 0
    woken = False
    due = loop.time()
    try:
        while not stop.is_set():
            wake.clear()
            unreachable = False
            try:
                async with client_factory() as client:
                    result = deliver(client)
                    if asyncio.iscoroutine(result):
                        await result
                failures = local_failures = 0
                delay = interval
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the worker never dies; it backs off
                reason = getattr(exc, "reason", "internal")
                if isinstance(exc, TransportError):
                    node.metrics.peer.record(False, reason)
                    node.metrics.delivery_failed("transport", reason)
                    unreachable = _is_unreachable(exc)
                    if peer_answered(exc):
                        failures = 0
                        delay = 0.0
                    elif woken and failures:
                        delay = max(0.0, due - loop.time())
                    else:
                        failures += 1
                        delay = retry_delay(failures, rng=rng)
                else:
                    node.metrics.delivery_failed("pass", reason)
                    local_failures += 1
                    delay = retry_delay(local_failures, rng=rng)
                _log.warning(
                    "delivery_failed",
                    error_type=type(exc).__name__,
                    reason=reason,
                    detail=str(exc)[:LAST_ERROR_CHARS],
                    failures=failures,
                    local_failures=local_failures,
                    retry_in=round(delay, 2),
                )
            due = loop.time() + delay
            woken = await _wait(
                stop,
                wake,
                delay,
                probe=(lambda: _probe(client_factory)) if unreachable else None,
                probe_interval=probe_interval,
            )
    finally:
        with _waiters_lock:
            _waiters.remove(entry)


def _is_unreachable(error: TransportError) -> bool:
    return error.network_failure or isinstance(error.__cause__, OSError)


async def _probe(
    client_factory: Callable[[], AbstractAsyncContextManager[DeliveryClient]],
) -> bool:
    """True when the peer answers its health route now."""
    try:
        async with client_factory() as client:
            health = getattr(client, "health", None)
            if health is None:
                return False
            await health()
    except (GatewayError, OSError, TimeoutError):
        return False
    return True


async def _wait(
    stop: asyncio.Event,
    wake: asyncio.Event,
    delay: float,
    *,
    probe: Callable[[], Awaitable[bool]] | None,
    probe_interval: float,
) -> bool:
    """Wait ``delay`` seconds, less if stopped, woken or the probe says the peer is back.

    Returns True when a local ``send`` woke it (not the timer, not the probe).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + delay
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0 or stop.is_set():
            return False
        step = min(remaining, probe_interval) if probe is not None else remaining
        stopper = asyncio.ensure_future(stop.wait())
        waker = asyncio.ensure_future(wake.wait())
        try:
            await asyncio.wait({stopper, waker}, timeout=step, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            waker.cancel()
        if stop.is_set():
            return False
        if wake.is_set():
            return True
        if probe is not None and deadline - loop.time() > 0:
            try:
                async with asyncio.timeout(max(0.5, probe_interval)):
                    back = await probe()
            except TimeoutError:
                back = False
            if back:
                return False


# -- the node's own delivery ----------------------------------------------------------


def _pinned_peer(node: Node) -> ReceiptVerifyKeys:
    return _pinned_peer_manifest(node)


def _pinned_peer_manifest(node: Node) -> KeyManifest:

    with node.db.transaction() as session:
        return require_pinned_peer(session, needed_for="nothing can be sent")


def _pending_manifests(node: Node) -> Sequence[tuple[object, bytes]]:

    with node.db.transaction() as session:
        return list(pending_manifests(session))


def _mark_manifest_delivered(node: Node, handle: object, now: datetime) -> None:

    if not isinstance(handle, int):
        raise TypeError("manifest handle must be the id pending_manifests gave")
    with node.db.transaction() as session:
        mark_manifest_delivered(session, handle, now)


async def deliver_once(
    ctx: NodeContext,
    client: DeliveryClient,
    *,
    now_fn: Callable[[], datetime] = utc_now,
    due_only: bool = False,
    progress: Callable[[DeliveryReport], None] | None = None,
) -> DeliveryReport:
    """Deliver what is pending once: new key manifests, then the queued envelopes.

    ``client`` is an open :class:`~gateway.peer.client.PeerClient` (it signs
    with ``keyring``). With ``due_only`` only bundles whose retry time has
    come are tried (the worker); ``gateway sync`` tries every queued bundle.
    """

    node, keyring = ctx.node, ctx.keyring_or_none()
    del keyring  # the client signs; delivery itself needs no private key
    policy = ctx.policy
    return await deliver_pending(
        node,
        client,
        peer_manifest=_pinned_peer,
        pending_manifests=_pending_manifests,
        mark_manifest_delivered=_mark_manifest_delivered,
        now_fn=now_fn,
        due_only=due_only,
        progress=progress,
        batch_size=policy.limits.peer_batch_size,
    )


SWEEP_INTERVAL = timedelta(hours=1)


def _sweep(node: Node) -> int:
    with node.db.transaction() as session:
        return len(sweep_orphan_envelopes(session, node.settings.blob_dir))


async def run_sender(
    ctx: NodeContext,
    client_factory: Callable[[], AbstractAsyncContextManager[DeliveryClient]],
    stop: asyncio.Event,
    *,
    now_fn: Callable[[], datetime] = utc_now,
) -> None:
    """The sender worker of ``gateway serve``: deliver until ``stop`` is set.

    Polls every ``[server] sync_interval_seconds``, wakes at once when this
    process queues a bundle, backs off exponentially with jitter (1 s doubling
    to 5 min) while the peer is unreachable, and never gives up. At start and
    then hourly it removes orphan envelope files (written by a ``send`` whose
    transaction never committed).
    """
    node = ctx.node
    swept_at: list[datetime] = []

    async def deliver(client: DeliveryClient) -> None:
        now = now_fn()
        if not swept_at or now - swept_at[-1] >= SWEEP_INTERVAL:
            swept_at[:] = [now]
            removed = await asyncio.to_thread(_sweep, node)
            if removed:
                _log.info("orphan_envelopes_removed", count=removed)
        report = await deliver_once(ctx, client, now_fn=now_fn, due_only=True)
        if report.attempted or report.manifests_sent:
            node.metrics.peer.record(True)
            _log.info(
                "delivery_pass",
                delivered=len(report.delivered),
                refused=len(report.refused),
                retry_later=len(report.retry_later),
                manifests=report.manifests_sent,
                remaining=report.remaining,
            )

    await run_sender_loop(
        node,
        client_factory,
        stop,
        deliver=deliver,
        interval=node.settings.server.sync_interval_seconds,
    )


# -- listing -------------------------------------------------------------------------


def list_outbox(node: Node, *, state: str | None = None) -> list[OutboxEntry]:
    """Queued and delivered bundles in sequence order."""
    with node.db.transaction() as session:
        query = select(OutboxEntry).order_by(OutboxEntry.channel, OutboxEntry.sequence)
        if state is not None:
            query = query.where(OutboxEntry.state == state)
        return list(session.scalars(query))


def refusals_by_peer(node: Node) -> dict[str, Any]:
    """Bundle id -> the peer's recorded refusal of it (a ``BundleRefusalRecord``).

    A bundle the peer receipted and then refused (a consent request naming
    items it never sent, a grant answering no request of its own...) keeps
    ``state = delivered``: the receipt stands; the refusal travels back as a
    signed notice (docs/protocol.md) and is recorded beside it.
    """

    with node.db.transaction() as session:
        rows = session.scalars(
            select(BundleRefusalRecord).where(
                BundleRefusalRecord.direction == RefusalDirection.RECEIVED
            )
        ).all()
    return {row.bundle_id: row for row in rows}


def describe_outbox_entry(
    entry: OutboxEntry, *, purged_at: datetime | None = None, refusal: Any = None
) -> dict[str, Any]:
    """One row of ``gateway outbox`` and ``GET /api/v1/outbox``; ``purged`` as in the inbox.

    ``refused_by_peer`` is null, or the peer's refusal after delivery
    (``reason`` code, ``detail``, ``refused_at``, ``notice_bundle_id``); pass
    the bundle's entry of :func:`refusals_by_peer` as ``refusal``.
    """
    return {
        "bundle_id": entry.bundle_id,
        "type": entry.case_type,
        "recipient": entry.recipient,
        "sequence": entry.sequence,
        "state": entry.state,
        "created": entry.created_at,
        "attempts": entry.attempts,
        "next_attempt": entry.next_attempt_at if entry.state == "queued" else None,
        "last_error": entry.last_error,
        "delivered": entry.delivered_at,
        "receipt": entry.receipt.decode("utf-8") if entry.receipt is not None else None,
        "purged": purged_at,
        "replaces": entry.replaces,
        "replaced_by": entry.replaced_by,
        "refused_by_peer": None
        if refusal is None
        else {
            "by": refusal.peer,
            "reason": refusal.reason,
            "detail": refusal.detail,
            "refused_at": refusal.refused_at,
            "notice_bundle_id": refusal.notice_bundle_id,
        },
    }


def outbox_entry(node: Node, bundle_id: str) -> OutboxEntry:
    with node.db.transaction() as session:
        entry = session.scalars(
            select(OutboxEntry).where(OutboxEntry.bundle_id == bundle_id)
        ).first()
    if entry is None:
        raise NotFound(f"no sent bundle with id {bundle_id!r}")
    return entry
