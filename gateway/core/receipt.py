"""Signed delivery receipts (SPEC §6): pure, no I/O, no clock.

A receipt is the receiver's signed statement "I stored the envelope with this
hash under this bundle id at this time, and my ledger stood here". The sender
counts a bundle as delivered only once a receipt verifies against the peer's
pinned key manifest and names exactly the bundle id and the envelope hash it
sent.

Wire form (UTF-8, RFC 8785 canonical JSON, at most :data:`MAX_RECEIPT_BYTES`)::

    {"format": "ssw-gateway/receipt/v1",
     "payload": "<base64url of the canonical payload bytes>",
     "signature": "<base64url of the Ed25519 signature>"}

The signature is over ``tagged(Purpose.RECEIPT, payload_bytes)``; the payload
bytes are kept and verified as they are, never re-serialised. The payload::

    {"bundle_id": ..., "checkpoint": null | {"root": "<hex>", "size": N},
     "envelope_sha256": "<hex>", "receipt_version": 1, "received_at": "<RFC 3339 Z>",
     "receiver": "pk", "receiver_key_id": ..., "sender": "jp"}
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.signing import VerifyKey

from gateway.core.canonical import canonical_bytes, parse_canonical
from gateway.core.domain import SHA256_HEX, Purpose, tagged
from gateway.core.times import Precision, format_utc, parse_utc
from gateway.errors import InvalidInput, VerificationError

__all__ = [
    "MAX_RECEIPT_BYTES",
    "RECEIPT_FORMAT",
    "Checkpoint",
    "Receipt",
    "ReceiptInvalid",
    "ReceiptSigner",
    "ReceiptVerifyKeys",
    "envelope_sha256",
    "issue_receipt",
    "parse_receipt",
    "receipt_payload",
    "verify_receipt",
]

RECEIPT_FORMAT = "ssw-gateway/receipt/v1"
RECEIPT_VERSION = 1
MAX_RECEIPT_BYTES = 4096
_MAX_PAYLOAD_BYTES = 2048
_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_NODE = re.compile(r"[a-z]{2}")
_PAYLOAD_KEYS = frozenset(
    {
        "bundle_id",
        "checkpoint",
        "envelope_sha256",
        "receipt_version",
        "received_at",
        "receiver",
        "receiver_key_id",
        "sender",
    }
)


class ReceiptInvalid(VerificationError):
    """A receipt that does not verify; ``check`` names the failed step."""

    reason = "receipt"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The receiver's ledger size and Merkle root when it issued the receipt."""

    size: int
    root: str


@dataclass(frozen=True, slots=True)
class Receipt:
    """A parsed receipt; ``raw`` is exactly the bytes received or issued."""

    bundle_id: str
    envelope_sha256: str
    received_at: datetime
    receiver: str
    receiver_key_id: str
    sender: str
    checkpoint: Checkpoint | None
    payload: bytes
    signature: bytes
    raw: bytes


class ReceiptSigner(Protocol):
    """What issuing a receipt needs of the receiver's keyring (a ``NodeKeyring``)."""

    @property
    def signing_key_id(self) -> str: ...

    def sign(self, purpose: bytes, payload: bytes) -> bytes: ...


class ReceiptVerifyKeys(Protocol):
    """What verifying a receipt needs of the peer's pinned key manifest (a ``KeyManifest``).

    ``signing_key(key_id, at=...)`` returns the verify key the peer may have
    signed with at that time, or raises when the key is unknown, revoked or
    outside its validity window.
    """

    @property
    def node(self) -> str: ...

    def signing_key(self, key_id: str, *, at: datetime) -> VerifyKey: ...


def envelope_sha256(data: bytes) -> str:
    """The hex SHA-256 of an envelope's bytes, as receipts and the store name it."""
    return hashlib.sha256(data).hexdigest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ReceiptInvalid(f"receipt {what} is not base64url", check="receipt-format")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ReceiptInvalid(f"receipt {what} is not base64url", check="receipt-format") from None


def _format_time(moment: datetime) -> str:
    return format_utc(moment, Precision.MICROSECONDS)


def _receipt_format(message: str) -> ReceiptInvalid:
    return ReceiptInvalid(f"receipt {message}", check="receipt-format")


def _parse_time(text: Any) -> datetime:
    return parse_utc(text, field="time", precision=Precision.MICROSECONDS, error=_receipt_format)


def receipt_payload(
    *,
    bundle_id: str,
    envelope_hash: str,
    received_at: datetime,
    receiver: str,
    receiver_key_id: str,
    sender: str,
    checkpoint: Checkpoint | None,
) -> bytes:
    """The canonical payload bytes a receiver signs."""
    if not _ID.fullmatch(bundle_id):
        raise InvalidInput("receipt bundle id is malformed")
    if not SHA256_HEX.fullmatch(envelope_hash):
        raise InvalidInput("receipt envelope hash must be 64 lowercase hex digits")
    if not (_NODE.fullmatch(receiver) and _NODE.fullmatch(sender)):
        raise InvalidInput("receipt node ids must be two lowercase letters")
    if checkpoint is not None and (
        checkpoint.size < 0 or not SHA256_HEX.fullmatch(checkpoint.root)
    ):
        raise InvalidInput("receipt checkpoint needs a size >= 0 and a 64-hex root")
    body: dict[str, Any] = {
        "bundle_id": bundle_id,
        "checkpoint": None
        if checkpoint is None
        else {"root": checkpoint.root, "size": checkpoint.size},
        "envelope_sha256": envelope_hash,
        "receipt_version": RECEIPT_VERSION,
        "received_at": _format_time(received_at),
        "receiver": receiver,
        "receiver_key_id": receiver_key_id,
        "sender": sender,
    }
    return canonical_bytes(body)


def issue_receipt(
    signer: ReceiptSigner,
    *,
    bundle_id: str,
    envelope_hash: str,
    received_at: datetime,
    receiver: str,
    sender: str,
    checkpoint: Checkpoint | None = None,
) -> bytes:
    """Sign a receipt with the receiver's current operational key; return its wire bytes."""
    payload = receipt_payload(
        bundle_id=bundle_id,
        envelope_hash=envelope_hash,
        received_at=received_at,
        receiver=receiver,
        receiver_key_id=signer.signing_key_id,
        sender=sender,
        checkpoint=checkpoint,
    )
    signature = signer.sign(Purpose.RECEIPT, payload)
    return canonical_bytes(
        {"format": RECEIPT_FORMAT, "payload": _b64(payload), "signature": _b64(signature)}
    )


def parse_receipt(raw: bytes) -> Receipt:
    """Parse a receipt's structure (no signature check): bounded, canonical, exact keys."""
    if len(raw) > MAX_RECEIPT_BYTES:
        raise ReceiptInvalid(
            f"receipt of {len(raw)} bytes exceeds {MAX_RECEIPT_BYTES}", check="receipt-size"
        )
    try:
        outer = parse_canonical(raw, max_bytes=MAX_RECEIPT_BYTES, max_depth=2)
    except InvalidInput as exc:
        raise ReceiptInvalid(
            f"receipt is not canonical JSON: {exc}", check="receipt-format"
        ) from None
    if not isinstance(outer, dict) or set(outer) != {"format", "payload", "signature"}:
        raise ReceiptInvalid(
            "receipt must hold exactly format, payload, signature", check="receipt-format"
        )
    if outer["format"] != RECEIPT_FORMAT:
        raise ReceiptInvalid("receipt format is not ssw-gateway/receipt/v1", check="receipt-format")
    payload = _unb64(outer["payload"], "payload")
    signature = _unb64(outer["signature"], "signature")
    if len(signature) != 64:
        raise ReceiptInvalid("receipt signature is not 64 bytes", check="receipt-format")
    try:
        body = parse_canonical(payload, max_bytes=_MAX_PAYLOAD_BYTES, max_depth=2)
    except InvalidInput as exc:
        raise ReceiptInvalid(f"receipt payload: {exc}", check="receipt-format") from None
    if not isinstance(body, dict) or set(body) != _PAYLOAD_KEYS:
        raise ReceiptInvalid("receipt payload has missing or extra fields", check="receipt-format")
    if body["receipt_version"] != RECEIPT_VERSION:
        raise ReceiptInvalid("receipt version is not 1", check="receipt-format")
    for key, pattern in (
        ("bundle_id", _ID),
        ("envelope_sha256", SHA256_HEX),
        ("receiver", _NODE),
        ("sender", _NODE),
        ("receiver_key_id", _ID),
    ):
        value = body[key]
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise ReceiptInvalid(f"receipt field {key} is malformed", check="receipt-format")
    checkpoint: Checkpoint | None = None
    raw_cp = body["checkpoint"]
    if raw_cp is not None:
        if (
            not isinstance(raw_cp, dict)
            or set(raw_cp) != {"root", "size"}
            or not isinstance(raw_cp["size"], int)
            or isinstance(raw_cp["size"], bool)
            or raw_cp["size"] < 0
            or not isinstance(raw_cp["root"], str)
            or not SHA256_HEX.fullmatch(raw_cp["root"])
        ):
            raise ReceiptInvalid("receipt checkpoint is malformed", check="receipt-format")
        checkpoint = Checkpoint(size=raw_cp["size"], root=raw_cp["root"])
    return Receipt(
        bundle_id=body["bundle_id"],
        envelope_sha256=body["envelope_sha256"],
        received_at=_parse_time(body["received_at"]),
        receiver=body["receiver"],
        receiver_key_id=body["receiver_key_id"],
        sender=body["sender"],
        checkpoint=checkpoint,
        payload=payload,
        signature=signature,
        raw=raw,
    )


def verify_receipt(
    raw: bytes,
    *,
    peer_manifest: ReceiptVerifyKeys,
    expected_bundle_id: str,
    expected_envelope_hash: str,
    expected_sender: str | None = None,
) -> Receipt:
    """Verify a receipt from the peer; return it, or raise :class:`ReceiptInvalid`.

    Checks, in order: structure; the receiver is the pinned peer; the key was
    the peer's and valid when the receipt says it received the envelope; the
    signature; then that it names exactly the bundle and envelope we sent
    (compared in constant time).
    """
    receipt = parse_receipt(raw)
    if receipt.receiver != peer_manifest.node:
        raise ReceiptInvalid(
            f"receipt is from node {receipt.receiver!r}, not the pinned peer {peer_manifest.node!r}",
            check="receipt-receiver",
        )
    try:
        verify_key = peer_manifest.signing_key(receipt.receiver_key_id, at=receipt.received_at)
    except Exception as exc:  # noqa: BLE001 - any failure to find a valid key refuses
        raise ReceiptInvalid(
            f"receipt key {receipt.receiver_key_id} is not a valid signing key of the peer: {exc}",
            check="receipt-key",
        ) from None
    try:
        verify_key.verify(tagged(Purpose.RECEIPT, receipt.payload), receipt.signature)
    except (BadSignatureError, CryptoError, ValueError, TypeError):
        raise ReceiptInvalid(
            "receipt signature does not verify", check="receipt-signature"
        ) from None
    if expected_sender is not None and receipt.sender != expected_sender:
        raise ReceiptInvalid("receipt names another sender", check="receipt-sender")
    if not hmac.compare_digest(receipt.bundle_id.encode(), expected_bundle_id.encode()):
        raise ReceiptInvalid("receipt names another bundle id", check="receipt-bundle")
    if not hmac.compare_digest(receipt.envelope_sha256.encode(), expected_envelope_hash.encode()):
        raise ReceiptInvalid(
            "receipt names another envelope hash than the one sent",
            check="receipt-envelope-hash",
        )
    return receipt
