"""``gateway resend``: re-seal sent bundles under the current keys, naming what they replace.

When one of this node's signing keys is revoked, the peer's copies of what this
node sent under it after the key was distrusted are suspect
(:mod:`gateway.node.revocation`). The remedy is to send them again: this node
opens its own archive copy of each original (the content key is sealed to the
sender too), and seals the same case, attachments, marking and ``reply_to``
into a new envelope under the current keys, with a new bundle id, the next
sequence number and the signed header field ``replaces`` naming the original
(``docs/envelope.md``). The peer links the two (``inbox`` shows "replaces X" /
"replaced by Y").

A suspect bundle at the peer that no resend replaces was not in this node's
outbox: it is what a holder of the stolen key forged.

Each resend commits on its own: the new bundle queued, the original's
``replaced_by`` set and a ``bundle-resent`` ledger entry written in one
transaction. An original still queued (never delivered: the peer refuses it
once its key is revoked) becomes ``replaced`` and is no longer sent; its
content travels in the replacement. Consent documents (``consent-*``) are not re-sent: a grant's
signature is bound to the key that signed its envelope, and the consent state
machine keys on bundle ids; a consent is issued anew with the consent commands.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.core.envelope import AttachmentInfo, AttachmentSource, open_envelope, seal
from gateway.core.keys import KeyManifest
from gateway.core.ledger import EntryKind
from gateway.core.policy import Policy
from gateway.core.roles import Actor
from gateway.errors import AlreadyExists, InvalidInput, NotFound
from gateway.log import get_logger
from gateway.node.context import NodeContext
from gateway.node.ledger import record_event
from gateway.node.outbox import Sealed, queue_sealed
from gateway.node.own_keys import own_manifest
from gateway.node.peer_trust import require_pinned_peer
from gateway.node.revocation import outbox_signing_key, suspect_sent
from gateway.node.runtime import Node
from gateway.store.models_exchange import OutboxEntry, OutboxState, envelope_path

__all__ = ["MAX_RESEND", "ResendReport", "Resent", "resend_bundles"]

MAX_RESEND = 10_000
"""Most bundles one ``resend`` re-seals (bounded work per command; run it again)."""

_log = get_logger("resend")


@dataclass(frozen=True, slots=True)
class Resent:
    """One original and the new bundle that replaces it."""

    original: str
    bundle_id: str
    sequence: int
    case_type: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "replaces": self.original,
            "bundle_id": self.bundle_id,
            "sequence": self.sequence,
            "type": self.case_type,
        }


@dataclass(frozen=True)
class ResendReport:
    """What ``resend`` did: the new bundles, and consent documents it left alone."""

    resent: tuple[Resent, ...]
    skipped_consent: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "resent": [r.to_dict() for r in self.resent],
            "skipped_consent": list(self.skipped_consent),
        }


@dataclass(frozen=True, slots=True)
class _Original:
    bundle_id: str
    case_type: str
    envelope_sha256: str
    created_at: datetime
    signing_key_id: str


def _targets(
    node: Node, session: Session, bundle_ids: Sequence[str], *, suspect: bool
) -> tuple[list[_Original], list[str]]:
    if suspect:
        rows = suspect_sent(node.settings, session, own_manifest(session))
    else:
        rows = []
        for bundle_id in dict.fromkeys(bundle_ids):
            row = session.scalars(
                select(OutboxEntry).where(OutboxEntry.bundle_id == bundle_id)
            ).first()
            if row is None:
                raise NotFound(
                    f"no sent bundle with id {bundle_id!r}: resend re-seals bundles this node "
                    "sent (see 'gateway outbox'); the peer resends its own"
                )
            if row.replaced_by is not None:
                raise AlreadyExists(f"bundle {bundle_id} was re-sent already as {row.replaced_by}")
            rows.append(row)
    if len(rows) > MAX_RESEND:
        raise InvalidInput(f"{len(rows)} bundles exceed {MAX_RESEND} per resend; give ids")
    consent = [r.bundle_id for r in rows if r.case_type.startswith("consent-")]
    if consent and not suspect:
        raise InvalidInput(
            f"bundle(s) {', '.join(consent)} are consent documents, which are not re-sent: "
            "issue the consent again with 'gateway consent grant|deny|revoke'"
        )
    return [
        _Original(
            bundle_id=r.bundle_id,
            case_type=r.case_type,
            envelope_sha256=r.envelope_sha256,
            created_at=r.created_at,
            signing_key_id=outbox_signing_key(node.settings, r),
        )
        for r in rows
        if not r.case_type.startswith("consent-")
    ], consent


def resend_bundles(
    ctx: NodeContext,
    actor: Actor,
    bundle_ids: Sequence[str],
    *,
    suspect: bool,
    now: datetime,
) -> ResendReport:
    """Re-seal ``bundle_ids`` (or, with ``suspect``, every suspect sent bundle); queue them.

    Each original is opened from this node's archive copy (its signature is
    our own; a key revoked since is accepted for this purpose, and the
    ``bundle-resent`` ledger entry names the actor) and sealed again under the
    current keys with ``replaces`` naming it. Raises :class:`InvalidInput`
    (neither or both of ids and ``suspect``; consent documents named),
    :class:`NotFound` (not a bundle this node sent), :class:`AlreadyExists`
    (re-sent already), or what sealing raises. Returns one :class:`Resent` per
    bundle, in order (none when ``suspect`` finds nothing), and the consent
    documents ``suspect`` found and left alone.
    """
    node = ctx.node
    if bool(bundle_ids) == suspect:
        raise InvalidInput("give the ids of bundles to resend, or --suspect, not both")
    with node.db.transaction() as session:
        targets, skipped = _targets(node, session, bundle_ids, suspect=suspect)
        peer = require_pinned_peer(session, needed_for="nothing can be sent")
    policy = ctx.policy
    done: list[Resent] = []
    for original in targets:
        done.append(_resend_one(ctx, actor, original, peer=peer, policy=policy, now=now))
    return ResendReport(resent=tuple(done), skipped_consent=tuple(skipped))


def _resend_one(
    ctx: NodeContext,
    actor: Actor,
    original: _Original,
    *,
    peer: KeyManifest,
    policy: Policy,
    now: datetime,
) -> Resent:
    node, keyring = ctx.node, ctx.keyring
    path = envelope_path(node.settings.blob_dir, original.envelope_sha256)
    node.settings.data_dir.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(dir=node.settings.data_dir, prefix=".resend-") as scratch,
        ExitStack() as stack,
    ):
        parts: list[tuple[AttachmentInfo, Path]] = []

        def sink(info: AttachmentInfo) -> BinaryIO:
            part = Path(scratch) / f"part-{info.index}"
            parts.append((info, part))
            return stack.enter_context(part.open("xb"))

        with path.open("rb") as stream:
            opened = open_envelope(
                stream,
                keyring=keyring,
                peer_manifest=peer,
                policy=policy,
                now=original.created_at,
                sink_factory=sink,
                stored_at=original.created_at,
                accept_suspect=True,  # our own record of what we sent; re-signed below
            )
        stack.close()
        header = opened.header
        if header.bundle_id != original.bundle_id or header.sender != node.node_id:
            raise InvalidInput(f"the stored envelope of {original.bundle_id} is not that bundle")
        with ExitStack() as sources_stack:
            sources = [
                AttachmentSource(
                    name=info.name,
                    size=info.size,
                    stream=sources_stack.enter_context(part.open("rb")),
                )
                for info, part in parts
            ]

            def sealer(out: BinaryIO, *, sequence: int) -> Sealed:
                for source in sources:
                    source.stream.seek(0)
                sealed = seal(
                    out,
                    case_type=header.type,
                    case=opened.case,  # validated when it was opened
                    attachments=sources,
                    keyring=keyring,
                    peer_manifest=peer,
                    policy=policy,
                    sequence=sequence,
                    now=now,
                    marking=header.marking,
                    reply_to=header.reply_to,
                    replaces=original.bundle_id,
                )
                return Sealed(
                    bundle_id=sealed.bundle_id,
                    marking=sealed.header.marking,
                    signing_key_id=sealed.header.signing_key_id,
                    replaces=original.bundle_id,
                )

            def link(session: Session, bundle_id: str) -> None:
                row = session.scalars(
                    select(OutboxEntry)
                    .where(OutboxEntry.bundle_id == original.bundle_id)
                    .with_for_update()
                ).one()
                if row.replaced_by is not None:
                    raise AlreadyExists(
                        f"bundle {original.bundle_id} was re-sent already as {row.replaced_by}"
                    )
                row.replaced_by = bundle_id
                was = row.state
                if row.state == OutboxState.QUEUED:
                    # Never delivered: the replacement carries it; stop sending this one.
                    row.state = OutboxState.REPLACED
                record_event(
                    session,
                    kind=EntryKind.BUNDLE_RESENT,
                    actor=actor,
                    now=now,
                    bundle_id=original.bundle_id,
                    body={
                        "replaced_by": bundle_id,
                        "type": header.type,
                        "original_signing_key_id": original.signing_key_id,
                        "signing_key_id": keyring.signing_key_id,
                        "original_state": was,
                    },
                )

            sent = queue_sealed(
                node,
                actor=actor,
                recipient=peer.node,
                case_type=header.type,
                reply_to=header.reply_to,
                seal=sealer,
                now=now,
                in_transaction=link,
            )
    _log.info("bundle_resent", replaces=original.bundle_id, bundle_id=sent.bundle_id)
    return Resent(
        original=original.bundle_id,
        bundle_id=sent.bundle_id,
        sequence=sent.sequence,
        case_type=header.type,
    )
