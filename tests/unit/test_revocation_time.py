"""Revocation with a time, in the pure core: keys, manifests and envelopes.

A revoked key is refused for anything new, at any claimed time; what a node
stored before the key was distrusted (``revoked_at``, or the earlier
``compromised_since``) is verified while trusted; what it stored after is
suspect unless a person accepts it. The revocation travels signed and, once
pinned, cannot be rewritten. A re-sent envelope names what it replaces in a
signed header field that is absent otherwise.
"""

from __future__ import annotations

import io
import json
from datetime import datetime, timedelta

import pytest
from nacl.signing import SigningKey

from gateway.core.canonical import canonical_bytes
from gateway.core.envelope import EnvelopeInvalid, open_envelope
from gateway.core.keys import (
    KeyManifest,
    KeyNotUsable,
    ManifestKey,
    ManifestRejected,
    Revocation,
    SignatureSuspect,
    StoredTrust,
    key_id,
    manifest_payload,
    parse_manifest,
    sign_manifest,
    verify_manifest,
)
from gateway.errors import InvalidInput
from tests.unit.test_envelope_support import (
    JP,
    NOW,
    PK,
    POLICY,
    T0,
    T1,
    rebuild,
    seal_bytes,
    split,
)

REVOKED_AT = NOW + timedelta(days=10)
COMPROMISED = NOW + timedelta(days=2)
SUCCESSOR = SigningKey(bytes([13]) * 32)


def jp_manifest(
    version: int,
    revocations: list[Revocation],
    *,
    issued: datetime = REVOKED_AT,
) -> bytes:
    """Tokyo's manifest (the keys of ``JP``, a successor signing key) with ``revocations``."""
    keys = [
        *JP.manifest.keys,
        ManifestKey(
            key_id(bytes(SUCCESSOR.verify_key)), "sign", bytes(SUCCESSOR.verify_key), T0, T1
        ),
    ]
    payload = manifest_payload(
        node="jp",
        version=version,
        issued_at=issued,
        expires_at=T1,
        root_public=bytes(JP.root.verify_key),
        keys=keys,
        revocations=revocations,
    )
    return sign_manifest(payload, [JP.root])


def revocation(compromised: datetime | None = None) -> Revocation:
    return Revocation(JP.keyring.signing_key_id, REVOKED_AT, "laptop lost", compromised)


def revoked_jp(compromised: datetime | None = None) -> KeyManifest:
    return parse_manifest(jp_manifest(2, [revocation(compromised)]))


DAY = timedelta(days=1)


@pytest.mark.parametrize(
    ("compromised", "stored_at", "accept", "expected"),
    [
        # revoked without a compromise time: trust ends at the revocation
        (None, NOW, False, StoredTrust.VERIFIED_WHILE_TRUSTED),
        (None, REVOKED_AT - timedelta(seconds=1), False, StoredTrust.VERIFIED_WHILE_TRUSTED),
        (None, REVOKED_AT, False, "suspect"),
        (None, REVOKED_AT + DAY, False, "suspect"),
        (None, REVOKED_AT + DAY, True, StoredTrust.SUSPECT_ACCEPTED),
        # compromised since an earlier moment: trust ends there
        (
            COMPROMISED,
            COMPROMISED - timedelta(seconds=1),
            False,
            StoredTrust.VERIFIED_WHILE_TRUSTED,
        ),
        (COMPROMISED, COMPROMISED, False, "suspect"),
        (COMPROMISED, COMPROMISED + DAY, False, "suspect"),
        (COMPROMISED, COMPROMISED + DAY, True, StoredTrust.SUSPECT_ACCEPTED),
        # accepting changes nothing for what was trusted anyway
        (COMPROMISED, NOW, True, StoredTrust.VERIFIED_WHILE_TRUSTED),
    ],
)
def test_a_stored_signature_is_judged_by_when_it_was_stored(
    compromised: datetime | None, stored_at: datetime, accept: bool, expected: object
) -> None:
    manifest = revoked_jp(compromised)
    kid = JP.keyring.signing_key_id
    if expected == "suspect":
        with pytest.raises(SignatureSuspect) as caught:
            manifest.stored_signing_key(kid, at=NOW, stored_at=stored_at, accept_suspect=accept)
        assert caught.value.check == "suspect"
        assert "--accept-suspect" in caught.value.message
        return
    verify_key, trust = manifest.stored_signing_key(
        kid, at=NOW, stored_at=stored_at, accept_suspect=accept
    )
    assert trust == expected
    assert bytes(verify_key) == bytes(JP.sign.verify_key)


def test_an_unrevoked_key_is_valid_whenever_stored() -> None:
    _key, trust = JP.manifest.stored_signing_key(
        JP.keyring.signing_key_id, at=NOW, stored_at=NOW + DAY
    )
    assert trust == StoredTrust.VALID


@pytest.mark.parametrize("claimed", [T0, NOW, COMPROMISED - DAY, REVOKED_AT + DAY])
def test_a_revoked_key_is_refused_for_anything_new_whatever_time_it_claims(
    claimed: datetime,
) -> None:
    with pytest.raises(KeyNotUsable, match="revoked"):
        revoked_jp(COMPROMISED).signing_key(JP.keyring.signing_key_id, at=claimed)


@pytest.mark.parametrize(
    ("kid", "at", "words"),
    [
        ("0" * 16, NOW, "not in the key manifest"),
        (JP.manifest.current_encryption_key(now=NOW).key_id, NOW, "not a signing key"),
        (None, T1 + DAY, "not at"),  # signed outside the key's window
    ],
)
def test_a_stored_signature_still_passes_every_other_key_check(
    kid: str | None, at: datetime, words: str
) -> None:
    with pytest.raises(KeyNotUsable, match=words):
        revoked_jp().stored_signing_key(
            kid or JP.keyring.signing_key_id, at=at, stored_at=NOW, accept_suspect=True
        )


# --- the manifest carries the time, signed ----------------------------------------------


def test_compromised_since_travels_in_the_signed_manifest() -> None:
    raw = jp_manifest(2, [revocation(COMPROMISED)])
    parsed = parse_manifest(raw)
    assert parsed.revocations == (revocation(COMPROMISED),)
    assert parsed.revocations[0].distrusted_from == COMPROMISED
    assert b"compromised_since" in parsed.payload_bytes


def test_without_compromised_since_the_revocation_is_byte_for_byte_as_before() -> None:
    parsed = parse_manifest(jp_manifest(2, [revocation()]))
    assert parsed.revocations[0].compromised_since is None
    assert parsed.revocations[0].distrusted_from == REVOKED_AT
    assert b"compromised_since" not in parsed.payload_bytes


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("2026-12-06T21:00:01Z", "must not be after revoked_at"),
        ("2026-12-01", "compromised_since must be a time"),
        (17, "compromised_since must be a time"),
    ],
)
def test_a_malformed_or_late_compromise_time_is_refused(value: object, words: str) -> None:
    payload = json.loads(parse_manifest(jp_manifest(2, [revocation()])).payload_bytes)
    payload["revocations"][0]["compromised_since"] = value
    doc = sign_manifest(canonical_bytes(payload), [JP.root])  # re-signed by the real root
    with pytest.raises(ManifestRejected, match=words):
        parse_manifest(doc)


@pytest.mark.parametrize(
    "rewritten",
    [
        Revocation(JP.keyring.signing_key_id, REVOKED_AT, "laptop lost", None),  # dropped
        Revocation(JP.keyring.signing_key_id, REVOKED_AT, "laptop lost", COMPROMISED + DAY),
        Revocation(JP.keyring.signing_key_id, REVOKED_AT, "laptop lost", COMPROMISED - DAY),
        Revocation(JP.keyring.signing_key_id, REVOKED_AT - DAY, "laptop lost", COMPROMISED),
        Revocation(JP.keyring.signing_key_id, REVOKED_AT, "something else", COMPROMISED),
    ],
)
def test_a_pinned_revocation_cannot_be_rewritten_by_a_later_manifest(
    rewritten: Revocation,
) -> None:
    pinned = revoked_jp(COMPROMISED)
    later = jp_manifest(3, [rewritten], issued=REVOKED_AT + DAY)
    with pytest.raises(ManifestRejected) as caught:
        verify_manifest(
            later, node="jp", pinned=pinned, expected_fingerprint=None, now=REVOKED_AT + DAY
        )
    assert caught.value.check == "manifest-revocation"


def test_a_later_manifest_keeping_the_revocation_is_accepted() -> None:
    pinned = revoked_jp(COMPROMISED)
    later = jp_manifest(3, [revocation(COMPROMISED)], issued=REVOKED_AT + DAY)
    accepted = verify_manifest(
        later, node="jp", pinned=pinned, expected_fingerprint=None, now=REVOKED_AT + DAY
    )
    assert accepted.revocations == pinned.revocations


# --- envelopes: stored versus new, and the replaces field ----------------------------------


SMALL, _SEALED = seal_bytes(JP, PK, "exam-fraud")


def open_stored(
    envelope: bytes, peer: KeyManifest, stored_at: datetime | None, *, accept: bool = False
) -> str:
    try:
        opened = open_envelope(
            io.BytesIO(envelope),
            keyring=PK.keyring,
            peer_manifest=peer,
            policy=POLICY,
            now=NOW,
            stored_at=stored_at,
            accept_suspect=accept,
        )
    except EnvelopeInvalid as exc:
        return exc.check
    return opened.trust.value


@pytest.mark.parametrize(
    ("compromised", "stored_at", "accept", "expected"),
    [
        (None, None, False, "signing-key"),  # as on receipt: a revoked key is refused
        (None, NOW, False, "verified-while-trusted"),
        (None, REVOKED_AT, False, "suspect"),
        (None, REVOKED_AT, True, "suspect-accepted"),
        (COMPROMISED, NOW, False, "verified-while-trusted"),
        (COMPROMISED, COMPROMISED, False, "suspect"),
        (COMPROMISED, COMPROMISED, True, "suspect-accepted"),
    ],
)
def test_a_stored_envelope_opens_by_the_trust_it_was_stored_under(
    compromised: datetime | None, stored_at: datetime | None, accept: bool, expected: str
) -> None:
    assert open_stored(SMALL, revoked_jp(compromised), stored_at, accept=accept) == expected


def test_a_stored_envelope_under_an_unrevoked_key_is_valid() -> None:
    assert open_stored(SMALL, JP.manifest, NOW) == "valid"


def test_suspect_does_not_excuse_tampering() -> None:
    tampered = bytearray(SMALL)
    tampered[-1] ^= 1
    assert open_stored(bytes(tampered), revoked_jp(), REVOKED_AT, accept=True) == (
        "ciphertext-hash"
    )


ORIGINAL = _SEALED.bundle_id


def test_a_resent_envelope_names_what_it_replaces_in_its_signed_header() -> None:
    envelope, sealed = seal_bytes(JP, PK, "exam-fraud", replaces=ORIGINAL)
    assert split(envelope)[1]["replaces"] == ORIGINAL
    assert sealed.header.replaces == ORIGINAL
    opened = open_envelope(
        io.BytesIO(envelope), keyring=PK.keyring, peer_manifest=JP.manifest, policy=POLICY, now=NOW
    )
    assert opened.header.replaces == ORIGINAL


def test_an_envelope_that_replaces_nothing_has_no_such_field() -> None:
    assert "replaces" not in split(SMALL)[1]
    assert _SEALED.header.replaces is None


def _other_id(bundle_id: str) -> str:
    last = "0" if bundle_id[-1] != "0" else "1"
    return bundle_id[:-1] + last


@pytest.mark.parametrize(
    ("edit", "signer", "expected"),
    [
        # changing or adding the field without the sender's key breaks the signature
        (lambda h: h.update(replaces=_other_id(h["replaces"])), None, "signature"),
        (lambda h: h.pop("replaces"), None, "signature"),
        # well signed but malformed, or naming itself: refused as format
        (lambda h: h.update(replaces="not-a-bundle-id"), JP.sign, "format"),
        (lambda h: h.update(replaces=h["bundle_id"]), JP.sign, "format"),
        (lambda h: h.update(replaces=None), JP.sign, "format"),
    ],
)
def test_the_replaces_field_is_signed_and_checked(
    edit: object, signer: SigningKey | None, expected: str
) -> None:
    envelope, _ = seal_bytes(JP, PK, "exam-fraud", replaces=ORIGINAL)
    changed = rebuild(envelope, edit, signer=signer)  # type: ignore[arg-type]
    with pytest.raises(EnvelopeInvalid) as caught:
        open_envelope(
            io.BytesIO(changed),
            keyring=PK.keyring,
            peer_manifest=JP.manifest,
            policy=POLICY,
            now=NOW,
        )
    assert caught.value.check == expected


def test_sealing_refuses_a_malformed_replaces() -> None:
    with pytest.raises(InvalidInput, match="replaces must be a bundle id"):
        seal_bytes(JP, PK, "exam-fraud", replaces="../etc/passwd")
