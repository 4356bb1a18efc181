"""Peer trust: the peer's manifest pinned by its root fingerprint, and updates to it.

``gateway peer add`` pins the first manifest (:func:`pin_peer`); later ones
arrive from the peer and must verify against the pinned one
(:func:`apply_peer_manifest`, rollback and root-rotation rules of
:mod:`gateway.core.keys`). Work that needs the peer asks for it with
:func:`require_pinned_peer`, which refuses in one way when none is pinned.
Every change is logged (ids and versions only) and recorded in the ledger as a
``key-event`` entry (:func:`record_key_event`, also used by
:mod:`gateway.node.own_keys`).
"""

from __future__ import annotations

import hmac
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gateway.core.keys import (
    MAX_KEYS,
    KeyManifest,
    parse_stored_manifest,
    verify_manifest,
)
from gateway.core.ledger import EntryKind
from gateway.core.roles import SYSTEM, Actor
from gateway.errors import ConfigError, RefusedError
from gateway.log import get_logger
from gateway.node.ledger import record_event
from gateway.node.revocation import mark_peer_revocations
from gateway.store.models_keys import PeerManifestRecord

__all__ = [
    "PeerNotPinned",
    "apply_peer_manifest",
    "describe_manifest",
    "peer_node_of",
    "pin_peer",
    "pinned_peer_manifest",
    "record_key_event",
    "require_pinned_peer",
]

_log = get_logger("keys")


_PEERS = {"jp": "pk", "pk": "jp"}


def peer_node_of(node: str) -> str:
    """The other node of the pair."""
    try:
        return _PEERS[node]
    except KeyError:
        raise ConfigError(f"node {node!r} has no peer (expected jp or pk)") from None


def record_key_event(session: Session, actor: Actor, now: datetime, body: dict[str, Any]) -> None:
    fields = {("key_event" if k == "event" else k): v for k, v in body.items()}
    _log.info("key_event", actor=actor.label, **fields)
    record_event(session, kind=EntryKind.KEY_EVENT, actor=actor, now=now, body=body)


def pinned_peer_manifest(session: Session) -> KeyManifest | None:
    """The peer's pinned manifest (the latest accepted), or None before ``peer add``."""
    row = session.scalars(
        select(PeerManifestRecord).order_by(PeerManifestRecord.id.desc()).limit(1)
    ).first()
    return None if row is None else parse_stored_manifest(bytes(row.raw))


def pinned_manifest_id(session: Session, *, hold: bool = False) -> int | None:
    """The row id of the peer's pinned manifest (:func:`pinned_peer_manifest`); it changes
    with every manifest pinned, revocations included. None before ``peer add``.

    ``hold``: first take a shared lock on that row, which a transaction pinning a
    new manifest takes for update before anything else (:func:`_peer_locked`): the
    id read after it is final until this transaction ends, and a pin waits for it.
    Take it before the ledger lock, in the order a pin takes both."""
    if hold:
        _lock_pinned_row(session, shared=True)
    return session.scalar(select(func.max(PeerManifestRecord.id)))


def _lock_pinned_row(session: Session, *, shared: bool) -> None:
    """Lock the pinned manifest's row (shared or for update) until the transaction ends;
    SQLite serialises writers at ``BEGIN IMMEDIATE`` instead."""
    session.execute(
        select(PeerManifestRecord.id)
        .order_by(PeerManifestRecord.id.desc())
        .limit(1)
        .with_for_update(read=shared)
    ).first()


class PeerNotPinned(RefusedError):
    """No manifest of the peer is pinned yet, so nothing can be sent, received or checked."""

    reason = "peer.unpinned"


def require_pinned_peer(session: Session, *, needed_for: str) -> KeyManifest:
    """The peer's pinned manifest, or :class:`PeerNotPinned` when ``peer add`` never ran.

    The one place that refuses work needing the peer's keys: ``needed_for``
    says what cannot be done (``"nothing can be received"``) and the message
    names the next step. The peer server turns it into its own 401 (an
    unknown sender), as it does for any key it cannot find.
    """
    manifest = pinned_peer_manifest(session)
    if manifest is None:
        raise PeerNotPinned(
            f"no peer is pinned, {needed_for}: import the peer's key manifest with "
            "'gateway peer add MANIFEST_FILE --fingerprint FP' first"
        )
    return manifest


def _peer_locked(session: Session) -> KeyManifest | None:
    """The pinned peer manifest, read after locking as :func:`_current_locked` does."""
    _lock_pinned_row(session, shared=False)
    return pinned_peer_manifest(session)


def _store_peer(
    session: Session, manifest: KeyManifest, *, source: str, actor: Actor, now: datetime
) -> None:
    session.add(
        PeerManifestRecord(
            node=manifest.node,
            version=manifest.version,
            root_key_id=manifest.root_key_id,
            source=source,
            raw=manifest.raw,
            accepted_at=now,
            accepted_by=actor.name,
        )
    )
    session.flush()


def pin_peer(
    session: Session,
    raw: bytes,
    *,
    node: str,
    expected_fingerprint: str,
    now: datetime,
    actor: Actor,
    replace: bool = False,
) -> KeyManifest:
    """Pin the peer's manifest after checking its root fingerprint (read out of band).

    With a peer pinned already, a manifest with the same root must be newer
    (it is then an ordinary update); one with another root is refused unless
    ``replace`` is given (the peer lost its root and was set up anew).
    """
    pinned = _peer_locked(session)
    if pinned is not None and not replace:
        manifest = verify_manifest(
            raw, node=node, pinned=pinned, expected_fingerprint=expected_fingerprint, now=now
        )
        source = "update"
    else:
        manifest = verify_manifest(
            raw, node=node, pinned=None, expected_fingerprint=expected_fingerprint, now=now
        )
        source = "pinned" if pinned is None else "re-pinned"
    _store_peer(session, manifest, source=source, actor=actor, now=now)
    mark_peer_revocations(session, before=pinned, after=manifest, now=now)
    record_key_event(
        session,
        actor,
        now,
        {
            "event": "peer-pinned" if source != "update" else "peer-manifest-accepted",
            "peer": node,
            "manifest_version": manifest.version,
            "root_key_id": manifest.root_key_id,
            "root_fingerprint": manifest.root_fingerprint,
            "replaced_root_key_id": pinned.root_key_id if pinned and replace else None,
        },
    )
    return manifest


def apply_peer_manifest(session: Session, raw: bytes, *, node: str, now: datetime) -> KeyManifest:
    """Verify a manifest the peer sent against the pinned one, and pin it.

    The exact bytes of the pinned manifest again are accepted as a no-op (a
    redelivery after a lost answer); anything else must pass every rule of
    :func:`gateway.core.keys.verify_manifest`.
    """
    pinned = _peer_locked(session)
    if pinned is None:
        raise ConfigError(
            f"no manifest of node {node!r} is pinned: an administrator must first run "
            "'gateway peer add MANIFEST_FILE --fingerprint FP'",
            reason="keys.not-pinned",
        )
    if len(raw) == len(pinned.raw) and hmac.compare_digest(raw, pinned.raw):
        return pinned
    manifest = verify_manifest(raw, node=node, pinned=pinned, expected_fingerprint=None, now=now)
    _store_peer(session, manifest, source="update", actor=SYSTEM, now=now)
    mark_peer_revocations(session, before=pinned, after=manifest, now=now)
    record_key_event(
        session,
        SYSTEM,
        now,
        {
            "event": "peer-manifest-accepted",
            "peer": node,
            "manifest_version": manifest.version,
            "root_key_id": manifest.root_key_id,
            "root_rotated": manifest.root_key_id != pinned.root_key_id,
            "revoked": sorted(r.key_id for r in manifest.revocations),
        },
    )
    return manifest


def describe_manifest(manifest: KeyManifest, *, now: datetime) -> dict[str, Any]:
    """A manifest as plain data for ``keys show`` / ``peer show`` (public values only)."""
    keys = []
    for k in manifest.keys:
        revoked = manifest.revocation(k.key_id)
        if revoked is not None:
            state = "revoked"
        elif k.valid_at(now):
            state = "valid"
        elif now < k.not_before:
            state = "not yet valid"
        else:
            state = "retired"
        keys.append(
            {
                "key_id": k.key_id,
                "use": k.use,
                "state": state,
                "not_before": k.not_before,
                "not_after": k.not_after,
                "revoked_at": revoked.revoked_at if revoked else None,
                "revocation_reason": revoked.reason if revoked else None,
                "compromised_since": revoked.compromised_since if revoked else None,
            }
        )
    return {
        "node": manifest.node,
        "version": manifest.version,
        "issued_at": manifest.issued_at,
        "expires_at": manifest.expires_at,
        "expired": now >= manifest.expires_at,
        "root_key_id": manifest.root_key_id,
        "root_fingerprint": manifest.root_fingerprint,
        "keys": keys,
        "keys_limit": MAX_KEYS,
    }
