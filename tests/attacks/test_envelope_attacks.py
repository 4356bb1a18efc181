"""Attacks on the envelope, one test each, named after the attack."""

from __future__ import annotations

import base64
import hashlib
import io
import struct
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

import gateway.core.envelope as envelope_module
from gateway.core.canonical import canonical_bytes
from gateway.core.domain import Purpose, tagged
from gateway.core.envelope import (
    MAGIC,
    PREFIX_BYTES,
    EnvelopeInvalid,
    open_envelope,
    sealed_box,
    verify_envelope,
)
from gateway.core.secretstream import ciphertext_size
from gateway.errors import VerificationError
from tests.unit.test_envelope_support import (
    IMPOSTOR_JP,
    IMPOSTOR_PK,
    JP,
    NOW,
    PK,
    POLICY,
    NodeKeys,
    rebuild,
    seal_bytes,
    split,
)

ENVELOPE, SEALED = seal_bytes(
    JP, PK, "exam-fraud", attachments=[("a.pdf", b"A" * 5000), ("b", b"B")]
)
OTHER, _ = seal_bytes(JP, PK, "exam-fraud", attachments=[("a.pdf", b"C" * 5000), ("b", b"D")])


def refused_by(
    envelope: bytes, reader: NodeKeys = PK, peer: NodeKeys = JP, *, verify_only: bool = False
) -> str:
    """The check that refuses ``envelope`` for ``reader`` (fails the test if accepted)."""
    kwargs: dict[str, Any] = {
        "keyring": reader.keyring,
        "peer_manifest": peer.manifest,
        "policy": POLICY,
        "now": NOW,
    }

    def action() -> object:
        if verify_only:
            return verify_envelope(io.BytesIO(envelope), **kwargs)
        return open_envelope(io.BytesIO(envelope), sink_factory=lambda info: io.BytesIO(), **kwargs)

    with pytest.raises(EnvelopeInvalid) as caught:
        action()
    return caught.value.check


def verified(envelope: bytes) -> None:
    verify_envelope(
        io.BytesIO(envelope), keyring=PK.keyring, peer_manifest=JP.manifest, policy=POLICY, now=NOW
    )


def test_untouched_envelope_opens() -> None:
    opened = open_envelope(
        io.BytesIO(ENVELOPE), keyring=PK.keyring, peer_manifest=JP.manifest, policy=POLICY, now=NOW
    )
    assert opened.header.bundle_id == SEALED.bundle_id


def test_reflected_envelope_refused() -> None:
    """jp's own envelope for pk, sent back to jp's receiver."""
    assert refused_by(ENVELOPE, JP, PK, verify_only=True) == "recipient"


@pytest.mark.parametrize(
    ("reader", "peer", "expected"),
    [
        (IMPOSTOR_PK, JP, "recipient"),  # a pk without pk's keys
        (IMPOSTOR_JP, PK, "recipient"),  # a jp without jp's keys, for the archive copy
    ],
)
def test_envelope_cannot_be_opened_without_the_sealed_keys(
    reader: NodeKeys, peer: NodeKeys, expected: str
) -> None:
    assert refused_by(ENVELOPE, reader, peer) == expected


def test_bundle_for_jp_cannot_be_opened_by_pk_and_vice_versa() -> None:
    to_jp, _ = seal_bytes(PK, JP)
    to_pk, _ = seal_bytes(JP, PK)
    assert refused_by(to_jp, PK, JP, verify_only=True) == "recipient"
    assert refused_by(to_pk, JP, PK, verify_only=True) == "recipient"


def test_unpinned_sender_refused() -> None:
    """An envelope from a jp whose keys we never pinned."""
    forged, _ = seal_bytes(IMPOSTOR_JP, PK)
    assert refused_by(forged) == "signing-key"


def test_resigned_by_third_party_refused() -> None:
    """Someone with their own key re-signs a modified header under the real key id."""
    forged = rebuild(
        ENVELOPE, lambda h: h.update(marking="public"), signer=IMPOSTOR_JP.keyring.signing_key
    )
    assert refused_by(forged) == "signature"


def test_resigned_by_third_party_under_its_own_key_id_refused() -> None:
    def edit(header: dict[str, Any]) -> None:
        header["signing_key_id"] = IMPOSTOR_JP.keyring.signing_key_id

    forged = rebuild(ENVELOPE, edit, signer=IMPOSTOR_JP.keyring.signing_key)
    assert refused_by(forged) == "signing-key"


def _swap(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(header: dict[str, Any]) -> None:
        header[field] = value

    return edit


OTHER_HEADER = split(OTHER)[1]
HEADER_EDITS: list[tuple[str, Any]] = [
    ("bundle_id", OTHER_HEADER["bundle_id"]),
    ("type", "broker-misconduct"),
    ("policy_version", "2027.1"),
    ("sender", "pk"),
    ("recipient", "jp"),
    ("sequence", 2),
    ("created_at", "2026-11-25T21:00:01Z"),
    ("signing_key_id", PK.keyring.signing_key_id),
    ("recipient_key_id", JP.keyring.current_encryption_key_id),
    ("archive_key_id", PK.keyring.current_encryption_key_id),
    ("sealed_key", OTHER_HEADER["sealed_key"]),
    ("archive_sealed_key", OTHER_HEADER["archive_sealed_key"]),
    ("marking", "public"),
    ("reply_to", OTHER_HEADER["bundle_id"]),
    ("key_commitment", OTHER_HEADER["key_commitment"]),
    ("content_size", SEALED.header.content_size + 1),
    ("attachment_sizes", [5001, 1]),
    ("ciphertext_sha256", OTHER_HEADER["ciphertext_sha256"]),
]


@pytest.mark.parametrize(("field", "value"), HEADER_EDITS, ids=[f for f, _ in HEADER_EDITS])
def test_swapped_header_field_refused(field: str, value: Any) -> None:
    """Any header field changed after signing, signature kept."""
    forged = rebuild(ENVELOPE, _swap(field, value))
    assert refused_by(forged) != "accepted"
    with pytest.raises(EnvelopeInvalid):
        verified(forged)


@pytest.mark.parametrize(("field", "value"), HEADER_EDITS, ids=[f for f, _ in HEADER_EDITS])
def test_swapped_header_field_refused_for_the_archive_reader(field: str, value: Any) -> None:
    forged = rebuild(ENVELOPE, _swap(field, value))
    assert refused_by(forged, JP, PK) != "accepted"


def test_surreptitious_forwarding_refused() -> None:
    """pk re-seals the content key to a third party's key and forwards the envelope
    keeping jp's signature: the signature covers recipient and sealed keys."""
    third = IMPOSTOR_PK.keyring
    header = split(ENVELOPE)[1]
    private = PK.keyring.encryption_private(header["recipient_key_id"])
    import nacl.bindings as sodium  # noqa: PLC0415

    content_key = sodium.crypto_box_seal_open(
        base64.b64decode(header["sealed_key"]), bytes(private.public_key), bytes(private)
    )
    third_kid = third.current_encryption_key_id
    third_public = bytes(third.encryption_private(third_kid).public_key)

    def edit(h: dict[str, Any]) -> None:
        h["recipient_key_id"] = third_kid
        h["sealed_key"] = base64.b64encode(
            sealed_box(content_key, third_public, b"\x07" * 32)
        ).decode()

    assert refused_by(rebuild(ENVELOPE, edit), IMPOSTOR_PK, JP) == "signature"


def test_equivocating_sender_sealed_keys_refused() -> None:
    """A dishonest sender seals a different content key to the recipient than the
    one its header commits to (and its archive holds): refused by the commitment."""
    decoy = bytes(range(32))
    recipient_public = PK.manifest.current_encryption_key(now=NOW).public

    def edit(h: dict[str, Any]) -> None:
        h["sealed_key"] = base64.b64encode(
            sealed_box(decoy, recipient_public, b"\x01" * 32)
        ).decode()

    forged = rebuild(ENVELOPE, edit, signer=JP.keyring.signing_key)
    assert refused_by(forged, verify_only=True) == "key-commitment"
    assert refused_by(forged) == "key-commitment"


def test_sealed_key_swapped_from_another_envelope_refused_even_when_resigned() -> None:
    forged = rebuild(
        ENVELOPE, _swap("sealed_key", OTHER_HEADER["sealed_key"]), signer=JP.keyring.signing_key
    )
    assert refused_by(forged) == "key-commitment"


def test_ciphertext_swapped_between_envelopes_refused() -> None:
    assert refused_by(rebuild(ENVELOPE, ciphertext=split(OTHER)[3])) == "ciphertext-hash"


def test_attachments_reordered_by_the_signer_refused() -> None:
    """Each stream has its own key (bound to bundle id and position): streams cannot
    be moved, even by someone who can sign a matching header."""
    header = SEALED.header
    body = split(ENVELOPE)[3]
    content_len = ciphertext_size(header.content_size)
    a_len = ciphertext_size(header.attachment_sizes[0])
    content, a, b = (
        body[:content_len],
        body[content_len : content_len + a_len],
        body[content_len + a_len :],
    )
    moved = content + b + a

    def edit(h: dict[str, Any]) -> None:
        h["attachment_sizes"] = [h["attachment_sizes"][1], h["attachment_sizes"][0]]
        h["ciphertext_sha256"] = hashlib.sha256(moved).hexdigest()

    forged = rebuild(ENVELOPE, edit, signer=JP.keyring.signing_key, ciphertext=moved)
    verified(forged)  # signed and hashed: the receiver stores it as the sender's word
    assert refused_by(forged) in ("decrypt", "content")


def test_garbage_ciphertext_signed_by_the_sender_refused_on_open() -> None:
    body = bytearray(split(ENVELOPE)[3])
    body[-5] ^= 0xFF

    def edit(h: dict[str, Any]) -> None:
        h["ciphertext_sha256"] = hashlib.sha256(bytes(body)).hexdigest()

    forged = rebuild(ENVELOPE, edit, signer=JP.keyring.signing_key, ciphertext=bytes(body))
    verified(forged)
    assert refused_by(forged) == "decrypt"


def test_header_length_bomb_refused_before_reading() -> None:
    bomb = struct.pack(">8sHI", MAGIC, 1, 0xFFFFFFFF)
    assert refused_by(bomb) == "size"


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        (struct.pack(">8sHI", b"SSWG-ENW", 1, 10), "format"),
        (struct.pack(">8sHI", MAGIC, 2, 10), "format"),
        (struct.pack(">8sHI", MAGIC, 0, 10), "format"),
        (b"", "format"),
        (MAGIC, "format"),
    ],
)
def test_unknown_magic_or_version_refused(prefix: bytes, expected: str) -> None:
    assert refused_by(prefix + ENVELOPE[PREFIX_BYTES:]) == expected


def _raw_header_envelope(raw: bytes) -> bytes:
    signature = JP.keyring.sign(Purpose.ENVELOPE_HEADER, raw)
    return struct.pack(">8sHI", MAGIC, 1, len(raw)) + raw + signature + split(ENVELOPE)[3]


def test_non_canonical_header_refused_even_when_signed() -> None:
    raw = split(ENVELOPE)[1]
    import json  # noqa: PLC0415

    spaced = json.dumps(raw, sort_keys=True).encode()
    assert refused_by(_raw_header_envelope(spaced)) == "format"


def test_duplicate_header_key_refused() -> None:
    raw = SEALED.header.raw
    doubled = raw[:-1] + b',"marking":"public"}'
    assert refused_by(_raw_header_envelope(doubled)) == "format"


def test_deeply_nested_header_refused() -> None:
    raw = b"[" * 100 + b"]" * 100
    assert refused_by(_raw_header_envelope(raw)) == "format"


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("attachment_sizes", [3 * 1024**3, 1], "size"),
        ("attachment_sizes", [1] * 65, "size"),
        ("content_size", 50 * 1024**2, "size"),
        ("type", "key-manifest", "format"),
        ("schema_version", "2", "format"),
        ("format", 2, "format"),
        ("chunk_size", 1024, "format"),
        ("sequence", 0, "format"),
        ("sequence", True, "format"),
        ("created_at", "2026-11-25 21:00:00", "format"),
        ("sender", "cn", "format"),
        ("marking", "secret", "format"),
        ("sealed_key", "AAAA", "format"),
        ("key_commitment", "AB" * 32, "format"),
        ("extra", 1, "format"),
    ],
)
def test_header_past_limits_or_malformed_refused_even_when_signed(
    field: str, value: Any, expected: str
) -> None:
    header = split(ENVELOPE)[1]
    header[field] = value
    assert refused_by(_raw_header_envelope(canonical_bytes(header))) == expected


def test_missing_header_field_refused_even_when_signed() -> None:
    header = split(ENVELOPE)[1]
    del header["reply_to"]
    assert refused_by(_raw_header_envelope(canonical_bytes(header))) == "format"


def test_replay_of_an_old_envelope_refused() -> None:
    """An envelope older than the policy's freshness window is refused as stale."""
    strict = POLICY.model_copy(
        update={"limits": POLICY.limits.model_copy(update={"max_envelope_age_seconds": 30 * 86400})}
    )
    old, _ = seal_bytes(JP, PK, now=NOW - timedelta(days=31))
    with pytest.raises(VerificationError) as caught:
        verify_envelope(
            io.BytesIO(old), keyring=PK.keyring, peer_manifest=JP.manifest, policy=strict, now=NOW
        )
    assert caught.value.check == "freshness"


def test_envelope_from_the_future_refused() -> None:
    early, _ = seal_bytes(JP, PK, now=NOW.replace(hour=22))
    assert refused_by(early) == "freshness"


def test_malicious_sender_content_refused_after_decryption(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sender whose software skipped validation: the receiver validates again."""

    class Unchecked:
        def __init__(self, data: dict[str, Any]) -> None:
            self.data = data

        def model_dump(self, mode: str) -> dict[str, Any]:
            return self.data

    monkeypatch.setattr(
        envelope_module, "validate_case", lambda case_type, data, **_: Unchecked(data)
    )
    bad, _ = seal_bytes(JP, PK, "consent-revocation", case={"consent_id": "x", "reason": "r"})
    monkeypatch.undo()
    verified(bad)
    assert refused_by(bad) == "content"


def test_signature_over_another_purpose_is_not_an_envelope_signature() -> None:
    """A receipt-purpose signature over the same bytes does not verify as a header."""
    raw = SEALED.header.raw
    wrong = JP.keyring.signing_key.sign(tagged(Purpose.RECEIPT, raw)).signature
    forged = struct.pack(">8sHI", MAGIC, 1, len(raw)) + raw + wrong + split(ENVELOPE)[3]
    assert refused_by(forged) == "signature"
