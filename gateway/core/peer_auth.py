"""Signed peer requests: what is signed, how it travels, how it is verified.

Every request one node sends the other (except ``GET /v1/health``) carries a
signature by the sender's operational Ed25519 key over::

    tagged(Purpose.PEER_REQUEST, canonical_bytes({
        "method", "path", "body_sha256", "time", "nonce",
        "sender", "recipient", "key_id"}))

``path`` includes the query string exactly as sent; ``body_sha256`` is the
base64 SHA-256 of the body (of the empty string when there is none); ``time``
is RFC 3339 UTC to the second; ``nonce`` is 16 random bytes in base64. The
values travel in the ``Gateway-*`` headers named below; the recipient is not a
header because the verifier puts its own node id in the signed statement, so a
request made for one node verifies at no other.

Verification is pure: the clock is the ``now`` argument, the sender's keys
come from a ``lookup_key`` callable, and the replay check is a
``remember_nonce`` callable that records the nonce and says whether it was new.
The order is fixed and fails closed: headers present and well formed, sender is
the expected peer, time within the skew window, key known and usable now,
signature valid, and only then the nonce recorded (so that unsigned junk never
fills the nonce store). The body digest is signed but the body itself is
checked by the caller while it streams (:class:`BodyDigest`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Protocol

import nacl.exceptions
import nacl.signing

from gateway.core.canonical import canonical_bytes
from gateway.core.domain import Purpose, tagged
from gateway.core.times import Precision, format_utc, parse_utc
from gateway.errors import VerificationError

__all__ = [
    "DEFAULT_SKEW",
    "EMPTY_BODY_SHA256",
    "HEADER_CONTENT_SHA256",
    "HEADER_KEY_ID",
    "HEADER_NODE",
    "HEADER_NONCE",
    "HEADER_SIGNATURE",
    "HEADER_TIME",
    "NONCE_BYTES",
    "SIGNED_HEADERS",
    "BodyDigest",
    "KeyLookup",
    "NonceRecorder",
    "PeerAuthFailed",
    "RequestSigner",
    "SignedRequest",
    "format_time",
    "parse_signed_request",
    "sign_request",
    "signed_statement",
    "verify_request",
]

HEADER_NODE: Final = "Gateway-Node"
HEADER_KEY_ID: Final = "Gateway-Key-Id"
HEADER_TIME: Final = "Gateway-Time"
HEADER_NONCE: Final = "Gateway-Nonce"
HEADER_CONTENT_SHA256: Final = "Gateway-Content-SHA256"
HEADER_SIGNATURE: Final = "Gateway-Signature"
SIGNED_HEADERS: Final = (
    HEADER_NODE,
    HEADER_KEY_ID,
    HEADER_TIME,
    HEADER_NONCE,
    HEADER_CONTENT_SHA256,
    HEADER_SIGNATURE,
)

NONCE_BYTES: Final = 16
DEFAULT_SKEW: Final = timedelta(minutes=5)
EMPTY_BODY_SHA256: Final = hashlib.sha256(b"").digest()

_MAX_HEADER_VALUE = 256
_MAX_PATH = 2048
_METHODS = frozenset({"GET", "POST", "PUT", "DELETE"})
_NODES = frozenset({"jp", "pk"})
_KEY_ID_RE = re.compile(r"\A[A-Za-z0-9_.:-]{1,128}\Z")


class PeerAuthFailed(VerificationError):
    """A peer request failed authentication; ``reason`` is the code shown to the peer.

    Reasons: ``auth.missing`` (a header is absent), ``auth.malformed`` (a header
    cannot be parsed), ``auth.unknown-key`` (sender or key not known or not
    usable now), ``auth.stale`` (time outside the skew window), ``auth.signature``
    (signature does not verify), ``auth.replay`` (nonce seen before),
    ``auth.digest`` (body does not match the signed digest).
    """

    check = "peer-auth"
    http_status = 401

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message, check="peer-auth", reason=reason)


class RequestSigner(Protocol):
    """What signs a request: the node's keyring (``NodeKeyring``) fits this."""

    @property
    def node(self) -> str: ...

    @property
    def signing_key_id(self) -> str: ...

    def sign(self, purpose: bytes, payload: bytes) -> bytes: ...


KeyLookup = Callable[[str, datetime], bytes]
"""``lookup_key(key_id, at)``: the 32-byte Ed25519 public key the sender may
sign with at ``at``; raises a :class:`~gateway.errors.GatewayError` (any
family) when the key is unknown, revoked or outside its validity window."""

NonceRecorder = Callable[[str, bytes, datetime], bool]
"""``remember_nonce(sender, nonce, request_time)``: records the nonce and
returns True when it was new, False when it had been seen (a replay)."""


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """The authentication headers of one request, parsed and bounded."""

    sender: str
    key_id: str
    time: datetime
    time_text: str
    nonce: bytes
    body_sha256: bytes
    signature: bytes


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC to the second, the form carried in ``Gateway-Time``."""
    return format_utc(moment, Precision.SECONDS)


def _malformed_time(message: str) -> PeerAuthFailed:
    return PeerAuthFailed(f"header {message}", reason="auth.malformed")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(name: str, text: str, size: int) -> bytes:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise PeerAuthFailed(f"header {name} is not base64", reason="auth.malformed") from None
    if len(raw) != size:
        raise PeerAuthFailed(
            f"header {name} must hold {size} bytes, not {len(raw)}", reason="auth.malformed"
        )
    return raw


def _statement(
    *,
    method: str,
    path: str,
    body_sha256: bytes,
    time_text: str,
    nonce: bytes,
    sender: str,
    recipient: str,
    key_id: str,
) -> bytes:
    statement = {
        "method": method.upper(),
        "path": path,
        "body_sha256": _b64(body_sha256),
        "time": time_text,
        "nonce": _b64(nonce),
        "sender": sender,
        "recipient": recipient,
        "key_id": key_id,
    }
    return canonical_bytes(statement)


def signed_statement(
    *,
    method: str,
    path: str,
    body_sha256: bytes,
    time_text: str,
    nonce: bytes,
    sender: str,
    recipient: str,
    key_id: str,
) -> bytes:
    """The exact bytes a request signature covers (purpose tag included)."""
    return tagged(
        Purpose.PEER_REQUEST,
        _statement(
            method=method,
            path=path,
            body_sha256=body_sha256,
            time_text=time_text,
            nonce=nonce,
            sender=sender,
            recipient=recipient,
            key_id=key_id,
        ),
    )


def sign_request(
    signer: RequestSigner,
    *,
    method: str,
    path: str,
    body_sha256: bytes,
    recipient: str,
    now: datetime,
    nonce: bytes,
) -> dict[str, str]:
    """The ``Gateway-*`` headers that authenticate one request.

    ``nonce`` is the randomness seam: the shell passes 16 fresh random bytes,
    tests pass fixed ones to check exact signatures.
    """
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes")
    if len(body_sha256) != 32:
        raise ValueError("body_sha256 must be a 32-byte SHA-256 digest")
    time_text = format_time(now)
    payload = _statement(
        method=method,
        path=path,
        body_sha256=body_sha256,
        time_text=time_text,
        nonce=nonce,
        sender=signer.node,
        recipient=recipient,
        key_id=signer.signing_key_id,
    )
    signature = signer.sign(Purpose.PEER_REQUEST, payload)
    return {
        HEADER_NODE: signer.node,
        HEADER_KEY_ID: signer.signing_key_id,
        HEADER_TIME: time_text,
        HEADER_NONCE: _b64(nonce),
        HEADER_CONTENT_SHA256: _b64(body_sha256),
        HEADER_SIGNATURE: _b64(signature),
    }


def parse_signed_request(headers: Mapping[str, str]) -> SignedRequest:
    """Read and bound the authentication headers; raise :class:`PeerAuthFailed`."""
    values: dict[str, str] = {}
    for name in SIGNED_HEADERS:
        value = headers.get(name)
        if value is None or value == "":
            raise PeerAuthFailed(f"header {name} is missing", reason="auth.missing")
        if len(value) > _MAX_HEADER_VALUE:
            raise PeerAuthFailed(f"header {name} is too long", reason="auth.malformed")
        values[name] = value
    sender = values[HEADER_NODE]
    if sender not in _NODES:
        raise PeerAuthFailed(f"header {HEADER_NODE} names no node", reason="auth.unknown-key")
    key_id = values[HEADER_KEY_ID]
    if not _KEY_ID_RE.match(key_id):
        raise PeerAuthFailed(f"header {HEADER_KEY_ID} is not a key id", reason="auth.malformed")
    time_text = values[HEADER_TIME]
    moment = parse_utc(
        time_text, field=HEADER_TIME, precision=Precision.SECONDS, error=_malformed_time
    )
    return SignedRequest(
        sender=sender,
        key_id=key_id,
        time=moment,
        time_text=time_text,
        nonce=_unb64(HEADER_NONCE, values[HEADER_NONCE], NONCE_BYTES),
        body_sha256=_unb64(HEADER_CONTENT_SHA256, values[HEADER_CONTENT_SHA256], 32),
        signature=_unb64(HEADER_SIGNATURE, values[HEADER_SIGNATURE], 64),
    )


def verify_request(
    request: SignedRequest,
    *,
    method: str,
    path: str,
    recipient: str,
    expected_sender: str,
    now: datetime,
    lookup_key: KeyLookup,
    remember_nonce: NonceRecorder,
    skew: timedelta = DEFAULT_SKEW,
) -> SignedRequest:
    """Verify a parsed request; return it, or raise :class:`PeerAuthFailed`."""
    if method.upper() not in _METHODS:
        raise PeerAuthFailed(f"method {method!r} is not signed", reason="auth.malformed")
    if len(path) > _MAX_PATH:
        raise PeerAuthFailed("request path is too long", reason="auth.malformed")
    if not hmac.compare_digest(request.sender.encode(), expected_sender.encode()):
        raise PeerAuthFailed(
            f"request claims sender {request.sender!r}; only {expected_sender!r} is a peer",
            reason="auth.unknown-key",
        )
    if abs(now - request.time) > skew:
        raise PeerAuthFailed(
            f"request time {request.time_text} is outside the {int(skew.total_seconds())} s "
            "window around this node's clock",
            reason="auth.stale",
        )
    try:
        public_key = lookup_key(request.key_id, now)
    except PeerAuthFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - any lookup failure refuses (fail closed)
        raise PeerAuthFailed(
            f"key {request.key_id} is not a usable signing key of {request.sender}: "
            f"{type(exc).__name__}",
            reason="auth.unknown-key",
        ) from None
    message = signed_statement(
        method=method,
        path=path,
        body_sha256=request.body_sha256,
        time_text=request.time_text,
        nonce=request.nonce,
        sender=request.sender,
        recipient=recipient,
        key_id=request.key_id,
    )
    try:
        nacl.signing.VerifyKey(public_key).verify(message, request.signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError):
        raise PeerAuthFailed("request signature does not verify", reason="auth.signature") from None
    if not remember_nonce(request.sender, request.nonce, request.time):
        raise PeerAuthFailed("request nonce was used before (replay)", reason="auth.replay")
    return request


class BodyDigest:
    """SHA-256 of a body fed in chunks, compared at the end in constant time."""

    def __init__(self, expected: bytes) -> None:
        self._expected = expected
        self._hash = hashlib.sha256()
        self.size = 0

    def update(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        self.size += len(chunk)

    def hexdigest(self) -> str:
        """The SHA-256 (hex) of what was fed so far."""
        return self._hash.hexdigest()

    def check(self) -> None:
        """Raise ``PeerAuthFailed("auth.digest")`` unless the body matched."""
        if not hmac.compare_digest(self._hash.digest(), self._expected):
            raise PeerAuthFailed(
                "request body does not match its signed digest", reason="auth.digest"
            )
