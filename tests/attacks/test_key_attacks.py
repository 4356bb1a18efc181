"""Attacks on key manifests, each reproduced and shown refused.

Every case builds a manifest an attacker could send and checks that
:func:`verify_manifest` refuses it with the check that names the attack.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import nacl.signing
import pytest

from gateway.core.canonical import canonical_bytes
from gateway.core.keys import (
    FingerprintMismatch,
    KeyManifest,
    KeyNotUsable,
    ManifestKey,
    ManifestRejected,
    Revocation,
    fingerprint,
    key_id,
    parse_manifest,
    verify_manifest,
)
from tests.unit.test_keys import T0, YEAR, Builder, seeded_signing


@dataclass(frozen=True)
class Attack:
    name: str
    offered: Callable[[], bytes]
    pinned: Callable[[], KeyManifest | None]
    fingerprint: Callable[[], str | None]
    check: str
    now_days: int = 1


def _pinned_v(version: int) -> Callable[[], KeyManifest]:
    return lambda: parse_manifest(Builder().manifest(version))


def _genuine_fp() -> str:
    return fingerprint(bytes(Builder().root.verify_key))


def _attacker() -> Builder:
    """The attacker's own root and operational keys, claiming to be node jp."""
    return Builder(root=seeded_signing(66), sign=seeded_signing(67))


def _same_version_other_content() -> bytes:
    builder = Builder(sign=seeded_signing(40))
    return builder.manifest(3)


def _root_rotation_new_root_alone() -> bytes:
    # Payload names the pinned root as the one handed over from, but only the new root signs.
    old = Builder().root
    attacker = _attacker()
    return attacker.manifest(2, previous_root=old, signers=[attacker.root])


def _root_rotation_unannounced() -> bytes:
    # A new root with no hand-over at all, signed by itself.
    return _attacker().manifest(2)


def _root_rotation_forged_old_signature() -> bytes:
    # The attacker claims the pinned root co-signed, using a key of its own under that name.
    old_public = Builder().root
    attacker = _attacker()
    raw = attacker.manifest(2, previous_root=old_public, signers=[attacker.root, attacker.sign])
    doc = json.loads(raw)
    forged = attacker.sign.sign(b"irrelevant").signature
    doc["signatures"][1] = {
        "key_id": key_id(bytes(old_public.verify_key)),
        "sig": base64.b64encode(forged).decode(),
    }
    return canonical_bytes(doc)


def _signature_from_another_manifest() -> bytes:
    genuine = json.loads(Builder().manifest(1))
    forged_payload = json.loads(_attacker().manifest(2))["payload"]
    genuine["payload"] = forged_payload
    return canonical_bytes(genuine)


def _extra_signature() -> bytes:
    builder = Builder()
    return builder.manifest(2, signers=[builder.root, seeded_signing(55)])


def _expired() -> bytes:
    builder = Builder()
    end = T0 + timedelta(days=1)
    return builder.manifest(2, issued=T0, expires=end, keys=builder.keys(T0, end))


ATTACKS = [
    Attack(
        "manifest signed by an unknown root (nothing pinned, fingerprint of the genuine root)",
        lambda: _attacker().manifest(1),
        lambda: None,
        _genuine_fp,
        "fingerprint",
    ),
    Attack(
        "manifest signed by an unknown root (genuine one pinned)",
        lambda: _attacker().manifest(5),
        _pinned_v(1),
        lambda: None,
        "manifest-root",
    ),
    Attack(
        "rollback to an older version",
        lambda: Builder().manifest(2),
        _pinned_v(3),
        lambda: None,
        "manifest-rollback",
    ),
    Attack(
        "replay of the pinned version",
        lambda: Builder().manifest(3),
        _pinned_v(3),
        lambda: None,
        "manifest-replay",
    ),
    Attack(
        "same version with other content",
        _same_version_other_content,
        _pinned_v(3),
        lambda: None,
        "manifest-replay",
    ),
    Attack(
        "expired manifest", _expired, _pinned_v(1), lambda: None, "manifest-expired", now_days=2
    ),
    Attack(
        "fingerprint mismatch at pinning",
        lambda: Builder().manifest(1),
        lambda: None,
        lambda: fingerprint(bytes(seeded_signing(99).verify_key)),
        "fingerprint",
    ),
    Attack(
        "root rotation signed by the new root alone",
        _root_rotation_new_root_alone,
        _pinned_v(1),
        lambda: None,
        "manifest-signature",
    ),
    Attack(
        "root rotation with no hand-over from the pinned root",
        _root_rotation_unannounced,
        _pinned_v(1),
        lambda: None,
        "manifest-root",
    ),
    Attack(
        "root rotation with a forged signature of the old root",
        _root_rotation_forged_old_signature,
        _pinned_v(1),
        lambda: None,
        "manifest-signature",
    ),
    Attack(
        "genuine signature moved onto another payload",
        _signature_from_another_manifest,
        _pinned_v(1),
        lambda: None,
        "manifest-signature",
    ),
    Attack(
        "extra signature by an unknown key",
        _extra_signature,
        _pinned_v(1),
        lambda: None,
        "manifest-signature",
    ),
    Attack(
        "manifest of pk presented as jp",
        lambda: Builder(node="pk").manifest(2),
        _pinned_v(1),
        lambda: None,
        "manifest-node",
    ),
]


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_attack_is_refused(attack: Attack) -> None:
    with pytest.raises(ManifestRejected) as caught:
        verify_manifest(
            attack.offered(),
            node="jp",
            pinned=attack.pinned(),
            expected_fingerprint=attack.fingerprint(),
            now=T0 + timedelta(days=attack.now_days),
        )
    assert caught.value.check == attack.check
    assert caught.value.exit_code == 4


def test_fingerprint_mismatch_is_its_own_error() -> None:
    with pytest.raises(FingerprintMismatch, match="does not match"):
        verify_manifest(
            Builder().manifest(1),
            node="jp",
            pinned=None,
            expected_fingerprint=fingerprint(bytes(seeded_signing(99).verify_key)),
            now=T0,
        )


def test_the_genuine_next_version_passes_where_the_attacks_fail() -> None:
    """The control case: same pinned state, an honest update is accepted."""
    got = verify_manifest(
        Builder().manifest(4), node="jp", pinned=_pinned_v(3)(), expected_fingerprint=None, now=T0
    )
    assert got.version == 4


# -- a revoked key used to sign ------------------------------------------------------------


def _manifest_revoking_signing_key() -> tuple[KeyManifest, str]:
    builder = Builder()
    sign_pub = bytes(builder.sign.verify_key)
    spare = seeded_signing(12)
    keys = [
        *builder.keys(),
        ManifestKey(
            key_id(bytes(spare.verify_key)), "sign", bytes(spare.verify_key), T0, T0 + YEAR
        ),
    ]
    revoked_at = T0 + timedelta(days=10)
    raw = builder.manifest(
        2,
        issued=revoked_at,
        keys=keys,
        revocations=[Revocation(key_id(sign_pub), revoked_at, "key compromised")],
    )
    return parse_manifest(raw), key_id(sign_pub)


@pytest.mark.parametrize(
    "claimed_days",
    [11, 10, 5, 0],
    ids=["after revocation", "at revocation", "back-dated before revocation", "at key start"],
)
def test_revoked_key_used_to_sign_is_refused_at_any_claimed_time(claimed_days: int) -> None:
    manifest, revoked = _manifest_revoking_signing_key()
    with pytest.raises(KeyNotUsable, match="revoked") as caught:
        manifest.signing_key(revoked, at=T0 + timedelta(days=claimed_days))
    assert caught.value.check == "signing-key"


def test_signature_by_revoked_key_cannot_be_verified_through_the_manifest() -> None:
    manifest, revoked = _manifest_revoking_signing_key()
    builder = Builder()
    message = b"bundle header"
    signature = builder.sign.sign(message).signature
    assert nacl.signing.VerifyKey(manifest.key(revoked).public).verify(message, signature)
    with pytest.raises(KeyNotUsable):
        manifest.signing_key(revoked, at=T0).verify(message, signature)


# -- every byte tampered -------------------------------------------------------------------


def _small_manifest() -> tuple[bytes, KeyManifest]:
    builder = Builder()
    sign_pub = bytes(builder.sign.verify_key)
    box_pub = bytes(builder.box.public_key)
    keys = [
        ManifestKey(key_id(sign_pub), "sign", sign_pub, T0, T0 + YEAR),
        ManifestKey(key_id(box_pub), "encrypt", box_pub, T0, T0 + YEAR),
    ]
    return builder.manifest(2, keys=keys), parse_manifest(builder.manifest(1))


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF], ids=["low-bit", "high-bit", "all-bits"])
def test_every_tampered_byte_is_refused(mask: int) -> None:
    raw, pinned = _small_manifest()
    assert verify_manifest(raw, node="jp", pinned=pinned, expected_fingerprint=None, now=T0)
    accepted = []
    for index in range(len(raw)):
        tampered = bytearray(raw)
        tampered[index] ^= mask
        try:
            verify_manifest(
                bytes(tampered), node="jp", pinned=pinned, expected_fingerprint=None, now=T0
            )
        except ManifestRejected:
            continue
        accepted.append(index)
    assert accepted == [], f"tampered bytes accepted at offsets {accepted}"


def test_truncated_manifest_is_refused_at_every_length() -> None:
    raw, pinned = _small_manifest()
    for length in range(len(raw)):
        with pytest.raises(ManifestRejected):
            verify_manifest(
                raw[:length], node="jp", pinned=pinned, expected_fingerprint=None, now=T0
            )
