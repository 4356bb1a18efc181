"""Receipts: known-answer vectors, and every way a receipt must be refused."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from gateway.core.canonical import canonical_bytes
from gateway.core.domain import Purpose, tagged
from gateway.core.keys import (
    KeyManifest,
    ManifestKey,
    Revocation,
    key_id,
    manifest_payload,
    parse_manifest,
    sign_manifest,
)
from gateway.core.receipt import (
    MAX_RECEIPT_BYTES,
    Checkpoint,
    ReceiptInvalid,
    envelope_sha256,
    issue_receipt,
    parse_receipt,
    verify_receipt,
)
from gateway.errors import InvalidInput

VECTORS = json.loads((Path(__file__).parent.parent / "data" / "receipt_vectors.json").read_text())[
    "vectors"
]
WHEN = datetime(2026, 11, 25, 21, 30, 0, 123456, tzinfo=UTC)
BUNDLE = "01JDQ0000000000000000000AB"
HASH = "cd" * 32


T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = datetime(2027, 1, 1, tzinfo=UTC)
ROOT = SigningKey(bytes(range(100, 132)))


class Signer:
    """A receiver's signing key seen through the keyring's ``sign(purpose, payload)``."""

    def __init__(self, seed: bytes, kid: str | None = None) -> None:
        self.key = SigningKey(seed)
        self.signing_key_id = kid if kid is not None else key_id(bytes(self.key.verify_key))

    def sign(self, purpose: bytes, payload: bytes) -> bytes:
        return bytes(self.key.sign(tagged(purpose, payload)).signature)


def manifest_for(
    node: str, signers: list[Signer], revoked: dict[str, datetime] | None = None
) -> KeyManifest:
    """A real root-signed key manifest listing ``signers`` (and one encryption key)."""
    enc = PrivateKey(bytes(range(200, 232))).public_key
    keys = [
        ManifestKey(s.signing_key_id, "sign", bytes(s.key.verify_key), T0, T1) for s in signers
    ] + [ManifestKey(key_id(bytes(enc)), "encrypt", bytes(enc), T0, T1)]
    revocations = [Revocation(kid, at, "compromised") for kid, at in (revoked or {}).items()]
    payload = manifest_payload(
        node=node,
        version=1,
        issued_at=T0,
        expires_at=T1,
        root_public=bytes(ROOT.verify_key),
        keys=keys,
        revocations=revocations,
    )
    return parse_manifest(sign_manifest(payload, [ROOT]))


SIGNER = Signer(bytes(range(32)))
SPARE = Signer(bytes(range(50, 82)))
PEER = manifest_for("pk", [SIGNER, SPARE])
OTHER_SIGNER = Signer(bytes(range(1, 33)))


def issue(**overrides: Any) -> bytes:
    fields: dict[str, Any] = {
        "bundle_id": BUNDLE,
        "envelope_hash": HASH,
        "received_at": WHEN,
        "receiver": "pk",
        "sender": "jp",
        "checkpoint": None,
    }
    fields.update(overrides)
    signer = fields.pop("signer", SIGNER)
    return issue_receipt(signer, **fields)


def rewrap(
    raw: bytes, *, payload: dict[str, Any] | None = None, sign_with: Signer | None = None
) -> bytes:
    """A receipt whose payload was replaced, signed by ``sign_with`` (or keeping the old signature)."""
    outer = json.loads(raw)
    if payload is not None:
        body = canonical_bytes(payload)
        outer["payload"] = base64.urlsafe_b64encode(body).rstrip(b"=").decode()
        if sign_with is not None:
            sig = sign_with.sign(Purpose.RECEIPT, body)
            outer["signature"] = base64.urlsafe_b64encode(sig).rstrip(b"=").decode()
    return canonical_bytes(outer)


def body_of(raw: bytes) -> dict[str, Any]:
    return dict(json.loads(parse_receipt(raw).payload))


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_known_answer_vectors_are_reproduced_and_verify(vector: dict[str, Any]) -> None:
    signer = Signer(bytes.fromhex(vector["signing_seed_hex"]))
    assert signer.signing_key_id == vector["receiver_key_id"]
    cp = vector["checkpoint"]
    raw = issue_receipt(
        signer,
        bundle_id=vector["bundle_id"],
        envelope_hash=vector["envelope_sha256"],
        received_at=WHEN,
        receiver=vector["receiver"],
        sender=vector["sender"],
        checkpoint=None if cp is None else Checkpoint(size=cp["size"], root=cp["root"]),
    )
    assert raw == vector["receipt"].encode()
    assert bytes(signer.key.verify_key).hex() == vector["verify_key_hex"]
    peer = manifest_for("pk", [signer])
    receipt = verify_receipt(
        raw,
        peer_manifest=peer,
        expected_bundle_id=vector["bundle_id"],
        expected_envelope_hash=vector["envelope_sha256"],
    )
    assert receipt.received_at == WHEN
    assert receipt.raw == raw
    assert receipt.checkpoint == (None if cp is None else Checkpoint(cp["size"], cp["root"]))


def test_a_valid_receipt_verifies_and_keeps_its_bytes() -> None:
    raw = issue(checkpoint=Checkpoint(size=7, root="ef" * 32))
    receipt = verify_receipt(
        raw,
        peer_manifest=PEER,
        expected_bundle_id=BUNDLE,
        expected_envelope_hash=HASH,
        expected_sender="jp",
    )
    assert (receipt.bundle_id, receipt.envelope_sha256, receipt.receiver, receipt.sender) == (
        BUNDLE,
        HASH,
        "pk",
        "jp",
    )
    assert receipt.receiver_key_id == SIGNER.signing_key_id
    assert receipt.checkpoint == Checkpoint(size=7, root="ef" * 32)


def test_envelope_sha256_is_plain_sha256_hex() -> None:
    assert (
        envelope_sha256(b"abc")
        == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def _flip_signature(raw: bytes) -> bytes:
    outer = json.loads(raw)
    sig = bytearray(base64.urlsafe_b64decode(outer["signature"] + "=="))
    sig[0] ^= 1
    outer["signature"] = base64.urlsafe_b64encode(bytes(sig)).rstrip(b"=").decode()
    return canonical_bytes(outer)


@pytest.mark.parametrize(
    ("name", "make", "check"),
    [
        ("flipped-signature", lambda: _flip_signature(issue()), "receipt-signature"),
        (
            "payload-changed-signature-kept",
            lambda: rewrap(issue(), payload={**body_of(issue()), "bundle_id": "OTHER"}),
            "receipt-signature",
        ),
        (
            "signed-by-a-stranger",
            lambda: issue(signer=Signer(bytes(range(1, 33)), SIGNER.signing_key_id)),
            "receipt-signature",
        ),
        (
            "unknown-key-id",
            lambda: issue(signer=OTHER_SIGNER),
            "receipt-key",
        ),
        ("receiver-is-not-the-peer", lambda: issue(receiver="jp", sender="pk"), "receipt-receiver"),
        (
            "other-bundle-id",
            lambda: issue(bundle_id="01JDQ0000000000000000000ZZ"),
            "receipt-bundle",
        ),
        ("other-envelope-hash", lambda: issue(envelope_hash="ce" * 32), "receipt-envelope-hash"),
        ("not-json", lambda: b"not a receipt", "receipt-format"),
        ("not-canonical", lambda: issue().replace(b'{"format"', b'{ "format"'), "receipt-format"),
        (
            "extra-outer-field",
            lambda: canonical_bytes({**json.loads(issue()), "x": 1}),
            "receipt-format",
        ),
        (
            "wrong-format-tag",
            lambda: canonical_bytes({**json.loads(issue()), "format": "ssw-gateway/receipt/v2"}),
            "receipt-format",
        ),
        (
            "extra-payload-field",
            lambda: rewrap(issue(), payload={**body_of(issue()), "x": 1}, sign_with=SIGNER),
            "receipt-format",
        ),
        (
            "wrong-version",
            lambda: rewrap(
                issue(), payload={**body_of(issue()), "receipt_version": 2}, sign_with=SIGNER
            ),
            "receipt-format",
        ),
        (
            "bad-time",
            lambda: rewrap(
                issue(), payload={**body_of(issue()), "received_at": "yesterday"}, sign_with=SIGNER
            ),
            "receipt-format",
        ),
        (
            "bad-checkpoint",
            lambda: rewrap(
                issue(),
                payload={**body_of(issue()), "checkpoint": {"size": -1, "root": "00" * 32}},
                sign_with=SIGNER,
            ),
            "receipt-format",
        ),
        ("oversized", lambda: b" " * (MAX_RECEIPT_BYTES + 1), "receipt-size"),
        (
            "short-signature",
            lambda: canonical_bytes({**json.loads(issue()), "signature": "AAAA"}),
            "receipt-format",
        ),
    ],
)
def test_bad_receipts_are_refused_naming_the_check(name: str, make: Any, check: str) -> None:
    with pytest.raises(ReceiptInvalid) as caught:
        verify_receipt(
            make(), peer_manifest=PEER, expected_bundle_id=BUNDLE, expected_envelope_hash=HASH
        )
    assert caught.value.check == check, name
    assert caught.value.exit_code == 4


def test_receipt_by_a_revoked_key_is_refused() -> None:
    revoked = manifest_for("pk", [SIGNER, SPARE], {SIGNER.signing_key_id: T0})
    with pytest.raises(ReceiptInvalid) as caught:
        verify_receipt(
            issue(), peer_manifest=revoked, expected_bundle_id=BUNDLE, expected_envelope_hash=HASH
        )
    assert caught.value.check == "receipt-key"


def test_receipt_for_another_sender_is_refused_when_the_sender_is_expected() -> None:
    with pytest.raises(ReceiptInvalid) as caught:
        verify_receipt(
            issue(),
            peer_manifest=PEER,
            expected_bundle_id=BUNDLE,
            expected_envelope_hash=HASH,
            expected_sender="pk",
        )
    assert caught.value.check == "receipt-sender"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("bundle_id", "has space"),
        ("envelope_hash", "AB" * 32),
        ("receiver", "JPN"),
        ("received_at", datetime(2026, 1, 1)),
    ],
)
def test_issuing_refuses_malformed_fields(field: str, value: Any) -> None:
    with pytest.raises((InvalidInput, ValueError)):
        issue(**{field: value})
