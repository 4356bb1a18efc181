"""This node's own keys: create, rotate, revoke, recover; unlock the keyring.

Joins the pure rules of :mod:`gateway.core.keys` with the keystore files
(:mod:`gateway.node.keystore`) and the database. Every function writes inside
the caller's transaction; key files are written (atomically) before the
manifest row, and a file always holds a superset of what the committed
manifest needs, so a failure between the two leaves a node that still unlocks.

Every key event is logged (ids and versions only, never private material) and
recorded in the ledger as a ``key-event`` entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import nacl.public
import nacl.signing
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gateway.core.keys import (
    MAX_KEYS,
    KeyManifest,
    KeyNotUsable,
    ManifestKey,
    ManifestTooLarge,
    NodeKeyring,
    Revocation,
    fingerprint,
    format_time,
    key_id,
    manifest_payload,
    parse_manifest,
    parse_stored_manifest,
    sign_manifest,
)
from gateway.core.roles import SYSTEM, Actor
from gateway.errors import (
    AlreadyExists,
    ConfigError,
    InvalidInput,
    NotFound,
    RefusedError,
    StorageError,
)
from gateway.log import get_logger
from gateway.node import keystore
from gateway.node.keystore import OPERATIONAL_FILE, OperationalKeys, Strength
from gateway.node.ledger.verify import VerifyReport, verify_ledger
from gateway.node.peer_trust import (
    describe_manifest,
    peer_node_of,
    pinned_peer_manifest,
    record_key_event,
)
from gateway.node.revocation import RevocationImpact, revocation_impact
from gateway.node.runtime import utc_now
from gateway.node.setup import InitResult, register_init_step
from gateway.settings import Settings
from gateway.store.models_keys import OwnManifestRecord

__all__ = [
    "MANIFEST_VALIDITY",
    "ROTATION_OVERLAP",
    "KeyChange",
    "create_node_keys",
    "describe_own_keys",
    "export_manifest",
    "mark_manifest_delivered",
    "own_manifest",
    "pending_manifest_count",
    "pending_manifests",
    "preview_revocation",
    "recover_keys",
    "remove_retired_roots",
    "revoke_key",
    "rotate_keys",
    "rotate_root",
    "unlock_keyring",
    "verify_ledger_with_keys",
]

_log = get_logger("keys")


MANIFEST_VALIDITY = timedelta(days=365)
"""How long a new manifest (and the keys it introduces) is valid."""


ROTATION_OVERLAP = timedelta(hours=24)
"""How long keys replaced by an ordinary rotation stay valid, so that running
processes and the peer move over without refusing in-flight work."""


def _second(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("naive datetime refused: pass times in UTC with tzinfo")
    return now.replace(microsecond=0)


def own_manifest(session: Session) -> KeyManifest:
    """This node's current (highest version) manifest."""
    row = session.scalars(
        select(OwnManifestRecord).order_by(OwnManifestRecord.version.desc()).limit(1)
    ).first()
    if row is None:
        raise NotFound("this node has no keys: its home was made without the keys step")
    return parse_stored_manifest(bytes(row.raw))


def pending_manifests(session: Session, *, limit: int | None = None) -> list[tuple[int, bytes]]:
    """Manifests the peer has not accepted yet, oldest (lowest version) first:
    ``(id, raw)``; with ``limit``, only the oldest ``limit`` of them."""
    query = (
        select(OwnManifestRecord.id, OwnManifestRecord.raw)
        .where(OwnManifestRecord.delivered_at.is_(None))
        .order_by(OwnManifestRecord.version)
    )
    if limit is not None:
        query = query.limit(limit)
    return [(int(row.id), bytes(row.raw)) for row in session.execute(query).all()]


def pending_manifest_count(session: Session) -> int:
    """How many manifests the peer has not accepted yet (counted, none read)."""
    count = session.scalar(
        select(func.count())
        .select_from(OwnManifestRecord)
        .where(OwnManifestRecord.delivered_at.is_(None))
    )
    return int(count or 0)


def mark_manifest_delivered(session: Session, manifest_id: int, now: datetime) -> None:
    """Record that the peer accepted manifest ``manifest_id`` (idempotent)."""
    row = session.get(OwnManifestRecord, manifest_id)
    if row is None:
        raise NotFound(f"no published manifest with id {manifest_id}")
    if row.delivered_at is None:
        row.delivered_at = now
        _log.info("manifest_delivered", version=row.version)


def _new_keys(
    start: datetime, end: datetime
) -> tuple[nacl.signing.SigningKey, nacl.public.PrivateKey, list[ManifestKey]]:
    signing = nacl.signing.SigningKey.generate()
    box = nacl.public.PrivateKey.generate()
    sign_pub, box_pub = bytes(signing.verify_key), bytes(box.public_key)
    return (
        signing,
        box,
        [
            ManifestKey(key_id(sign_pub), "sign", sign_pub, start, end),
            ManifestKey(key_id(box_pub), "encrypt", box_pub, start, end),
        ],
    )


def _store_own(
    session: Session,
    raw: bytes,
    *,
    event: str,
    actor: Actor,
    now: datetime,
    delivered: bool,
    parsed: KeyManifest | None = None,
) -> KeyManifest:
    """Store ``raw`` as this node's next manifest; ``parsed`` is ``raw`` parsed already
    (:func:`_prepare` does), else it is parsed here."""
    manifest = parse_manifest(raw) if parsed is None else parsed
    session.add(
        OwnManifestRecord(
            node=manifest.node,
            version=manifest.version,
            root_key_id=manifest.root_key_id,
            event=event,
            raw=raw,
            created_at=now,
            created_by=actor.name,
            delivered_at=now if delivered else None,
        )
    )
    session.flush()
    return manifest


def create_node_keys(
    settings: Settings,
    session: Session,
    passphrase: bytes,
    *,
    now: datetime,
    strength: Strength,
    actor: Actor = SYSTEM,
) -> KeyManifest:
    """Make the root and first operational keys and publish manifest version 1."""
    keystore.check_new_passphrase(passphrase)
    if session.scalar(select(OwnManifestRecord.id).limit(1)) is not None:
        raise AlreadyExists("this node has keys already; use 'gateway keys rotate'")
    node = settings.node_id
    start = _second(now)
    root = nacl.signing.SigningKey.generate()
    signing, box, keys = _new_keys(start, start + MANIFEST_VALIDITY)
    payload = manifest_payload(
        node=node,
        version=1,
        issued_at=start,
        expires_at=start + MANIFEST_VALIDITY,
        root_public=bytes(root.verify_key),
        keys=keys,
    )
    raw = sign_manifest(payload, [root])
    ops, mem = keystore.STRENGTHS[strength]
    root_id = key_id(bytes(root.verify_key))
    keystore.write_root(
        settings.keys_dir / keystore.root_file_name(root_id),
        root,
        node=node,
        passphrase=passphrase,
        strength=strength,
    )
    keystore.write_operational(
        settings.keys_dir / OPERATIONAL_FILE,
        OperationalKeys(
            signing={keys[0].key_id: signing},
            encryption={keys[1].key_id: box},
            opslimit=ops,
            memlimit=mem,
        ),
        node=node,
        passphrase=passphrase,
    )
    manifest = _store_own(session, raw, event="init", actor=actor, now=now, delivered=True)
    record_key_event(
        session,
        actor,
        now,
        {
            "event": "keys-created",
            "manifest_version": 1,
            "root_key_id": root_id,
            "root_fingerprint": fingerprint(bytes(root.verify_key)),
            "key_ids": [k.key_id for k in keys],
        },
    )
    return manifest


def _root_path(settings: Settings, manifest: KeyManifest, root_key_file: Path | None) -> Path:
    path = root_key_file or settings.keys_dir / keystore.root_file_name(manifest.root_key_id)
    if not path.is_file():
        raise ConfigError(
            f"the root key {manifest.root_key_id} is not at {path}: bring the root key "
            "file back from offline storage into keys/, or pass --root-key FILE",
            reason="keystore.root-missing",
        )
    return path


def _load_root(
    settings: Settings, manifest: KeyManifest, passphrase: bytes, root_key_file: Path | None
) -> nacl.signing.SigningKey:
    return keystore.read_root(
        _root_path(settings, manifest, root_key_file),
        passphrase,
        node=settings.node_id,
        expected_key_id=manifest.root_key_id,
    )


def _current_locked(session: Session) -> KeyManifest:
    """The current manifest, read after locking against a concurrent key change.

    On PostgreSQL the lock waits for a concurrent change to commit; the second
    read (a new statement, so a new snapshot under READ COMMITTED) then sees
    the manifest that change made. SQLite serialises with BEGIN IMMEDIATE.
    """
    session.execute(
        select(OwnManifestRecord.id)
        .order_by(OwnManifestRecord.version.desc())
        .limit(1)
        .with_for_update()
    ).first()
    return own_manifest(session)


@dataclass(frozen=True)
class KeyChange:
    """What a key command made, for the administrator."""

    manifest: KeyManifest
    event: str
    added: tuple[str, ...]
    revoked: tuple[str, ...] = ()
    old_root_key_id: str | None = None
    impact: RevocationImpact | None = None
    """For a revocation: the bundles whose copies at the peer it makes suspect."""


def _retire(keys: tuple[ManifestKey, ...], until: datetime) -> list[ManifestKey]:
    """Shorten every window to end by ``until`` (never lengthen one)."""
    return [
        ManifestKey(k.key_id, k.use, k.public, k.not_before, min(k.not_after, until))
        if k.not_after > until
        else k
        for k in keys
    ]


def _prune(
    keys: list[ManifestKey], revocations: list[Revocation], at: datetime
) -> tuple[list[ManifestKey], list[Revocation]]:
    """Drop encryption keys whose window has ended (the peer never seals to them again;
    this node keeps their private keys to read old data). Signing keys stay listed so
    old signatures still verify."""
    kept = [k for k in keys if k.use == "sign" or k.not_after > at]
    ids = {k.key_id for k in kept}
    return kept, [r for r in revocations if r.key_id in ids]


ROTATION_RESERVE = 2
"""Places of the manifest's key list a routine rotation leaves free, so that a revocation
(one replacement key) or a recovery (two new keys) can follow it (within the manifest's
64 KiB, which long revocation reasons also use)."""


@dataclass(frozen=True)
class _Prepared:
    """The next own manifest, built, signed and checked, and nothing written yet."""

    raw: bytes
    manifest: KeyManifest


def _prepare(
    settings: Settings,
    *,
    current: KeyManifest,
    signers: list[nacl.signing.SigningKey],
    root_public: bytes,
    previous_root_public: bytes | None,
    keys: list[ManifestKey],
    revocations: list[Revocation],
    issued: datetime,
    reserve: int = 0,
) -> _Prepared:
    """Build, sign and parse the next own manifest, before any file or row is written.

    Raises :class:`RefusedError` when the manifest would be outside the bounds of
    the manifest format, so that a key change is refused before it touches a key file:
    ``keys.manifest-full`` when it would list more than :data:`MAX_KEYS` keys
    less ``reserve`` (signing keys stay listed for good, :func:`_prune`; each
    rotation or replacement adds one: docs/keys.md, "How many key changes a
    node can make"), ``keys.manifest-refused`` when it would be larger than the
    format's 64 KiB (:class:`~gateway.core.keys.ManifestTooLarge`); any other
    refusal of the format is raised as it is. :class:`InvalidInput` when
    ``issued`` lies before the current manifest's issue time (the clock went back).
    """
    if issued < current.issued_at:
        raise InvalidInput(
            f"this node's clock says {format_time(issued)}, before its current key "
            f"manifest was issued ({format_time(current.issued_at)}): set the clock right "
            "(NTP) before changing keys. Nothing was changed"
        )
    kept, kept_revocations = _prune(keys, revocations, issued)
    limit = MAX_KEYS - reserve
    if len(kept) > limit:
        signing = sum(1 for k in kept if k.use == "sign")
        kept_free = (
            f" (a routine rotation leaves the last {reserve} for a revocation or a recovery)"
            if reserve
            else ""
        )
        raise RefusedError(
            f"this key change would list {len(kept)} keys in the manifest, and it may list "
            f"{limit}{kept_free}. Every signing key this node has used stays listed "
            f"({signing} now), so that what it signed still verifies at the peer and can "
            "still be revoked. Nothing was changed; see docs/keys.md, 'How many key "
            "changes a node can make'",
            reason="keys.manifest-full",
        )
    expires = max(k.not_after for k in kept)
    expires = max(expires, issued + MANIFEST_VALIDITY)
    try:
        payload = manifest_payload(
            node=settings.node_id,
            version=current.version + 1,
            issued_at=issued,
            expires_at=expires,
            root_public=root_public,
            keys=kept,
            revocations=kept_revocations,
            previous_root_public=previous_root_public,
        )
        raw = sign_manifest(payload, signers)
        manifest = parse_manifest(raw)
    except ManifestTooLarge as exc:
        raise RefusedError(
            f"this key change would make a manifest larger than the format allows "
            f"({exc.message}). Nothing was changed. Revocation reasons, those listed and "
            "any given now, stay in the manifest for good and use most of its bytes; see "
            "docs/keys.md, 'How many key changes a node can make'",
            reason="keys.manifest-refused",
        ) from None
    return _Prepared(raw, manifest)


def _prepare_same_root(
    settings: Settings,
    current: KeyManifest,
    root: nacl.signing.SigningKey,
    keys: list[ManifestKey],
    revocations: list[Revocation],
    issued: datetime,
    *,
    reserve: int = 0,
) -> _Prepared:
    """:func:`_prepare` for a change of operational keys, signed by the current root."""
    return _prepare(
        settings,
        current=current,
        signers=[root],
        root_public=current.root_public,
        previous_root_public=None,
        keys=keys,
        revocations=revocations,
        issued=issued,
        reserve=reserve,
    )


def _publish(
    session: Session,
    prepared: _Prepared,
    *,
    event: str,
    actor: Actor,
    now: datetime,
    key_event: str,
    details: Callable[[KeyManifest], dict[str, Any]],
) -> KeyManifest:
    """Publish a prepared manifest and record its key event, in the caller's transaction.

    The ledger's ``key-event`` body is ``{"event": key_event, "manifest_version":
    <the new version>, **details(manifest)}``, so a manifest is never published
    without its entry (or the other way round).
    """
    manifest = _store_own(
        session,
        prepared.raw,
        event=event,
        actor=actor,
        now=now,
        delivered=False,
        parsed=prepared.manifest,
    )
    record_key_event(
        session,
        actor,
        now,
        {"event": key_event, "manifest_version": manifest.version, **details(manifest)},
    )
    return manifest


def rotate_keys(
    settings: Settings,
    session: Session,
    passphrase: bytes,
    *,
    now: datetime,
    actor: Actor,
    root_key_file: Path | None = None,
) -> KeyChange:
    """New operational keys; the old ones stay valid for :data:`ROTATION_OVERLAP`.

    The new manifest (version + 1, signed by the root) waits for delivery to
    the peer. Old encryption private keys are kept to read old data.
    """
    current = _current_locked(session)
    root = _load_root(settings, current, passphrase, root_key_file)
    ops_path = settings.keys_dir / OPERATIONAL_FILE
    held = keystore.read_operational(ops_path, passphrase, node=settings.node_id)
    start = _second(now)
    signing, box, new = _new_keys(start, start + MANIFEST_VALIDITY)
    keys = _retire(current.keys, start + ROTATION_OVERLAP) + new
    prepared = _prepare_same_root(
        settings, current, root, keys, list(current.revocations), start, reserve=ROTATION_RESERVE
    )
    # Keep the signing keys a running process may still use, and every encryption key.
    held.signing = {
        kid: k
        for kid, k in held.signing.items()
        if any(m.key_id == kid and m.not_after > start for m in keys)
    }
    held.signing[new[0].key_id] = signing
    held.encryption[new[1].key_id] = box
    keystore.write_operational(ops_path, held, node=settings.node_id, passphrase=passphrase)
    manifest = _publish(
        session,
        prepared,
        event="rotate",
        actor=actor,
        now=now,
        key_event="keys-rotated",
        details=lambda _manifest: {
            "added": [k.key_id for k in new],
            "overlap_until": format_time(start + ROTATION_OVERLAP),
        },
    )
    return KeyChange(manifest=manifest, event="rotate", added=tuple(k.key_id for k in new))


def revoke_key(
    settings: Settings,
    session: Session,
    passphrase: bytes,
    kid: str,
    reason: str,
    *,
    now: datetime,
    actor: Actor,
    root_key_file: Path | None = None,
    compromised_since: datetime | None = None,
) -> KeyChange:
    """Revoke an operational key for good; replace it at once if it was in use.

    The revocation carries its time and, with ``compromised_since``, the
    earlier moment from which the key may have been in other hands; both
    travel in the signed manifest. The peer keeps reading what it received
    under the key before that moment (verified while trusted) and marks what
    it received after as suspect (docs/keys.md, "Revocation with a time").
    A revoked signing key's private key is destroyed; a revoked encryption
    key's private key is kept so that what was stored under it stays readable.
    Raises :class:`InvalidInput` (bad reason, the root key, a compromise time
    in the future), :class:`NotFound`, :class:`AlreadyExists`.
    """
    current = _current_locked(session)
    start = _second(now)
    revocation = _new_revocation(current, kid, reason, start, compromised_since)
    impact = revocation_impact(settings, session, current, kid, revocation=revocation)
    listed = {k.key_id: k for k in current.keys}
    root = _load_root(settings, current, passphrase, root_key_file)
    ops_path = settings.keys_dir / OPERATIONAL_FILE
    held = keystore.read_operational(ops_path, passphrase, node=settings.node_id)
    revocations = [*current.revocations, revocation]
    revoked_ids = {r.key_id for r in revocations}
    keys = list(current.keys)
    added: list[ManifestKey] = []
    for use in ("sign", "encrypt"):
        # A key only inside its rotation overlap does not count: it ends too soon.
        still = [
            k
            for k in keys
            if k.use == use
            and k.key_id not in revoked_ids
            and k.not_before <= start
            and k.not_after > start + ROTATION_OVERLAP
        ]
        if still:
            continue
        signing, box, new = _new_keys(start, start + MANIFEST_VALIDITY)
        pick = new[0] if use == "sign" else new[1]
        added.append(pick)
        keys.append(pick)
        if use == "sign":
            held.signing[pick.key_id] = signing
        else:
            held.encryption[pick.key_id] = box
    prepared = _prepare_same_root(settings, current, root, keys, revocations, start)
    write_held = OperationalKeys(
        signing={k: v for k, v in held.signing.items() if k != kid},
        encryption=held.encryption,
        opslimit=held.opslimit,
        memlimit=held.memlimit,
    )
    keystore.write_operational(ops_path, write_held, node=settings.node_id, passphrase=passphrase)
    manifest = _publish(
        session,
        prepared,
        event="revoke",
        actor=actor,
        now=now,
        key_event="key-revoked",
        details=lambda _manifest: {
            "key_id": kid,
            "use": listed[kid].use,
            "reason": revocation.reason,
            "revoked_at": format_time(revocation.revoked_at),
            "compromised_since": (
                format_time(revocation.compromised_since)
                if revocation.compromised_since is not None
                else None
            ),
            "suspect_at_peer": len(impact.suspect),
            "verified_while_trusted_at_peer": impact.trusted,
            "replaced_by": [k.key_id for k in added],
        },
    )
    return KeyChange(
        manifest=manifest,
        event="revoke",
        added=tuple(k.key_id for k in added),
        revoked=(kid,),
        impact=impact,
    )


def _new_revocation(
    current: KeyManifest,
    kid: str,
    reason: str,
    start: datetime,
    compromised_since: datetime | None,
) -> Revocation:
    reason = reason.strip()
    if not reason or len(reason) > 500 or not reason.isprintable():
        raise InvalidInput("--reason must be 1 to 500 printable characters")
    if kid in (current.root_key_id,):
        raise InvalidInput(
            f"{kid} is the root key: a root is replaced with 'gateway keys rotate-root'"
        )
    if kid not in {k.key_id for k in current.keys}:
        raise NotFound(f"key {kid!r} is not in this node's manifest (see 'gateway keys show')")
    if current.revocation(kid) is not None:
        raise AlreadyExists(f"key {kid} is revoked already")
    since = None
    if compromised_since is not None:
        since = _second(compromised_since)
        if since > start:
            raise InvalidInput(
                f"--compromised-since {format_time(since)} lies after the revocation "
                f"({format_time(start)}): give the moment the key may have been lost"
            )
    return Revocation(kid, start, reason, since)


def preview_revocation(
    settings: Settings,
    session: Session,
    kid: str,
    reason: str,
    *,
    now: datetime,
    compromised_since: datetime | None = None,
) -> RevocationImpact:
    """What :func:`revoke_key` would mark suspect at the peer, checked as it would be.

    Changes nothing; raises what :func:`revoke_key` raises for bad arguments.
    """
    current = own_manifest(session)
    revocation = _new_revocation(current, kid, reason, _second(now), compromised_since)
    return revocation_impact(settings, session, current, kid, revocation=revocation)


def recover_keys(
    settings: Settings,
    session: Session,
    passphrase: bytes,
    reason: str,
    *,
    now: datetime,
    actor: Actor,
    root_key_file: Path | None = None,
) -> KeyChange:
    """Recover from a lost or damaged ``operational.key`` with the root key.

    Every unrevoked operational key of the current manifest is revoked (its
    private key may be in someone else's hands) and fresh keys are made in a
    new ``operational.key``. A damaged file is kept aside as
    ``operational.key.damaged-<time>``. What was sealed to the lost
    encryption keys stays unreadable: that is what encryption at rest means.
    """
    reason = reason.strip()
    if not reason or len(reason) > 500 or not reason.isprintable():
        raise InvalidInput("--reason must be 1 to 500 printable characters")
    current = _current_locked(session)
    root_path = _root_path(settings, current, root_key_file)
    root = _load_root(settings, current, passphrase, root_key_file)
    ops_path = settings.keys_dir / OPERATIONAL_FILE
    start = _second(now)
    aside: Path | None = None
    if ops_path.exists():
        try:
            keystore.read_operational(ops_path, passphrase, node=settings.node_id)
        except (keystore.KeystoreCorrupt, keystore.KeystoreLocked, ConfigError):
            aside = ops_path.with_name(f"{OPERATIONAL_FILE}.damaged-{start:%Y%m%dT%H%M%SZ}")
        else:
            raise InvalidInput(
                f"{ops_path} opens with this passphrase: nothing to recover "
                "(use 'gateway keys rotate' or 'gateway keys revoke')"
            )
    revocations = list(current.revocations)
    lost = [k.key_id for k in current.keys if current.revocation(k.key_id) is None]
    revocations.extend(Revocation(kid, start, reason) for kid in lost)
    signing, box, new = _new_keys(start, start + MANIFEST_VALIDITY)
    prepared = _prepare_same_root(
        settings, current, root, [*current.keys, *new], revocations, start
    )
    ops, mem = keystore.root_limits(root_path, passphrase, node=settings.node_id)
    if aside is not None:  # only now: a refused recovery leaves the damaged file in place
        ops_path.rename(aside)
        _log.warning("damaged_key_file_kept_aside", path=str(aside))
    keystore.write_operational(
        ops_path,
        OperationalKeys(
            signing={new[0].key_id: signing},
            encryption={new[1].key_id: box},
            opslimit=ops,
            memlimit=mem,
        ),
        node=settings.node_id,
        passphrase=passphrase,
    )
    manifest = _publish(
        session,
        prepared,
        event="revoke",
        actor=actor,
        now=now,
        key_event="keys-recovered",
        details=lambda _manifest: {
            "revoked": lost,
            "added": [k.key_id for k in new],
            "reason": reason,
        },
    )
    return KeyChange(
        manifest=manifest, event="recover", added=tuple(k.key_id for k in new), revoked=tuple(lost)
    )


def rotate_root(
    settings: Settings,
    session: Session,
    passphrase: bytes,
    *,
    now: datetime,
    actor: Actor,
    root_key_file: Path | None = None,
) -> KeyChange:
    """A new root: the next manifest names it and is signed by the old and the new root.

    The new root key file is written beside the others; the old one is removed
    by :func:`remove_retired_roots` once the transaction has committed.
    """
    current = _current_locked(session)
    old_root = _load_root(settings, current, passphrase, root_key_file)
    held = keystore.read_operational(
        settings.keys_dir / OPERATIONAL_FILE, passphrase, node=settings.node_id
    )
    new_root = nacl.signing.SigningKey.generate()
    new_id = key_id(bytes(new_root.verify_key))
    start = _second(now)
    prepared = _prepare(
        settings,
        current=current,
        signers=[new_root, old_root],
        root_public=bytes(new_root.verify_key),
        previous_root_public=current.root_public,
        keys=list(current.keys),
        revocations=list(current.revocations),
        issued=start,
    )
    keystore.write_root(
        settings.keys_dir / keystore.root_file_name(new_id),
        new_root,
        node=settings.node_id,
        passphrase=passphrase,
        strength=(held.opslimit, held.memlimit),
    )
    manifest = _publish(
        session,
        prepared,
        event="rotate-root",
        actor=actor,
        now=now,
        key_event="root-rotated",
        details=lambda published: {
            "old_root_key_id": current.root_key_id,
            "root_key_id": new_id,
            "root_fingerprint": published.root_fingerprint,
        },
    )
    return KeyChange(
        manifest=manifest,
        event="rotate-root",
        added=(new_id,),
        old_root_key_id=current.root_key_id,
    )


def remove_retired_roots(settings: Settings, current_root_key_id: str) -> list[Path]:
    """Delete root key files in ``keys/`` other than the current root's."""
    keep = keystore.root_file_name(current_root_key_id)
    removed: list[Path] = []
    for path in sorted(settings.keys_dir.glob("root-*.key")):
        if path.name != keep:
            path.unlink()
            removed.append(path)
            _log.info("retired_root_removed", path=str(path))
    return removed


def export_manifest(session: Session, out: Path) -> KeyManifest:
    """Write the current signed manifest to ``out`` (never overwrites a file)."""
    manifest = own_manifest(session)
    try:
        with out.open("xb") as handle:
            handle.write(manifest.raw)
    except FileExistsError:
        raise AlreadyExists(f"{out} exists already; choose another --out") from None
    except OSError as exc:
        raise StorageError(f"cannot write {out}: {exc.strerror}") from None
    return manifest


def verify_ledger_with_keys(
    session: Session, *, node_id: str, progress: Callable[[int], None] | None = None
) -> VerifyReport:
    """Verify this node's ledger with its own manifest and the pinned peer's.

    Either manifest may be missing (a node without keys, no peer pinned yet);
    the report then says what could not be checked.
    """
    try:
        own = own_manifest(session)
    except NotFound:
        own = None
    return verify_ledger(
        session,
        own_keys=own,
        peer_keys=pinned_peer_manifest(session),
        peer_node=peer_node_of(node_id),
        progress=progress,
    )


def describe_own_keys(session: Session, *, now: datetime) -> dict[str, Any]:
    """This node's manifest for ``keys show`` and ``GET /api/v1/keys``.

    Adds ``pending_delivery``: how many manifest versions the peer has not
    accepted yet.
    """
    data = describe_manifest(own_manifest(session), now=now)
    data["pending_delivery"] = pending_manifest_count(session)
    return data


def _init_step(settings: Settings, session: Session, now: datetime, result: InitResult) -> None:
    passphrase = keystore.obtain_passphrase(result.environ, new=True)
    strength = keystore.strength_from_environ(result.environ)
    manifest = create_node_keys(settings, session, passphrase, now=now, strength=strength)
    result.made.append(str(settings.keys_dir / keystore.root_file_name(manifest.root_key_id)))
    result.made.append(str(settings.keys_dir / OPERATIONAL_FILE))
    result.facts["root fingerprint"] = manifest.root_fingerprint
    result.facts["key manifest version"] = manifest.version


def unlock_keyring(
    settings: Settings, passphrase: bytes, session: Session, *, now: datetime | None = None
) -> NodeKeyring:
    """Open ``operational.key`` and bind it to the node's current manifest.

    The signing key is the manifest's current signing key at ``now`` when its
    private key is held, else the newest unrevoked one held. Every encryption
    key held is kept, listed or not, so that old data stays readable.
    """
    at = now if now is not None else utc_now()
    manifest = own_manifest(session)
    keys = keystore.read_operational(
        settings.keys_dir / OPERATIONAL_FILE, passphrase, node=settings.node_id
    )
    candidates = [
        entry
        for entry in manifest.keys
        if entry.use == "sign"
        and entry.key_id in keys.signing
        and manifest.revocation(entry.key_id) is None
    ]
    if not candidates:
        raise KeyNotUsable(
            f"the keystore of node {settings.node_id!r} holds no private key for any "
            f"unrevoked signing key of manifest version {manifest.version}"
        )
    valid = [entry for entry in candidates if entry.valid_at(at)] or candidates
    # Ties on not_before go to the key listed last, as KeyManifest.current_signing_key does.
    chosen = valid[0].key_id
    newest = valid[0].not_before
    for entry in valid[1:]:
        if entry.not_before >= newest:
            chosen, newest = entry.key_id, entry.not_before
    ring = NodeKeyring(
        node=settings.node_id,
        manifest=manifest,
        signing_key_id=chosen,
        signing_key=keys.signing[chosen],
        encryption_keys=dict(keys.encryption),
    )
    _log.info(
        "keyring_unlocked",
        manifest_version=manifest.version,
        signing_key_id=chosen,
        encryption_key_ids=sorted(ring.encryption_keys),
    )
    return ring


register_init_step(order=10, name="keys", step=_init_step)
