"""Signed peer requests: the signing rule, its known-answer vector, and every refusal."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nacl.signing
import pytest

from gateway.core.domain import Purpose, tagged
from gateway.core.peer_auth import (
    EMPTY_BODY_SHA256,
    HEADER_CONTENT_SHA256,
    HEADER_KEY_ID,
    HEADER_NODE,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIME,
    SIGNED_HEADERS,
    BodyDigest,
    PeerAuthFailed,
    SignedRequest,
    parse_signed_request,
    sign_request,
    signed_statement,
    verify_request,
)
from gateway.errors import NotFound, VerificationError

VECTOR = Path(__file__).parent.parent / "data" / "peer_request_v1.json"
NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
NONCE = bytes(range(16))
BODY = b"one envelope"


@dataclass
class Signer:
    node: str
    signing_key_id: str
    key: nacl.signing.SigningKey

    def sign(self, purpose: bytes, payload: bytes) -> bytes:
        return bytes(self.key.sign(tagged(purpose, payload)).signature)


@dataclass
class Nonces:
    seen: set[tuple[str, bytes]] = field(default_factory=set)

    def remember(self, sender: str, nonce: bytes, _time: datetime) -> bool:
        if (sender, nonce) in self.seen:
            return False
        self.seen.add((sender, nonce))
        return True


JP_KEY = nacl.signing.SigningKey(bytes([7]) * 32)
OTHER_KEY = nacl.signing.SigningKey(bytes([9]) * 32)
JP = Signer("jp", "jp-op-1", JP_KEY)


def lookup(key_id: str, _at: datetime) -> bytes:
    if key_id == "jp-op-1":
        return bytes(JP_KEY.verify_key)
    raise NotFound(f"no key {key_id}")


def headers_for(
    signer: Signer = JP,
    *,
    method: str = "POST",
    path: str = "/v1/envelopes",
    body: bytes = BODY,
    recipient: str = "pk",
    now: datetime = NOW,
    nonce: bytes = NONCE,
) -> dict[str, str]:
    return sign_request(
        signer,
        method=method,
        path=path,
        body_sha256=hashlib.sha256(body).digest(),
        recipient=recipient,
        now=now,
        nonce=nonce,
    )


def verify(
    headers: dict[str, str],
    *,
    method: str = "POST",
    path: str = "/v1/envelopes",
    now: datetime = NOW,
    nonces: Nonces | None = None,
    key_lookup: Callable[[str, datetime], bytes] = lookup,
) -> SignedRequest:
    return verify_request(
        parse_signed_request(headers),
        method=method,
        path=path,
        recipient="pk",
        expected_sender="jp",
        now=now,
        lookup_key=key_lookup,
        remember_nonce=(nonces or Nonces()).remember,
    )


def flip_b64(text: str, index: int = 0) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[index] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


def test_signature_matches_known_answer_vector() -> None:
    vector = json.loads(VECTOR.read_text())
    key = nacl.signing.SigningKey(bytes.fromhex(vector["seed_hex"]))
    signer = Signer(vector["sender"], vector["key_id"], key)
    headers = sign_request(
        signer,
        method=vector["method"],
        path=vector["path"],
        body_sha256=hashlib.sha256(vector["body"].encode()).digest(),
        recipient=vector["recipient"],
        now=datetime.fromisoformat(vector["time"].replace("Z", "+00:00")),
        nonce=bytes.fromhex(vector["nonce_hex"]),
    )
    statement = vector["statement_text"].encode()
    assert (
        signed_statement(
            method=vector["method"],
            path=vector["path"],
            body_sha256=hashlib.sha256(vector["body"].encode()).digest(),
            time_text=vector["time"],
            nonce=bytes.fromhex(vector["nonce_hex"]),
            sender=vector["sender"],
            recipient=vector["recipient"],
            key_id=vector["key_id"],
        )
        == b"ssw-gateway/peer-request/v1\x00" + statement
    )
    assert headers == vector["headers"]


def test_valid_request_verifies_and_records_its_nonce() -> None:
    nonces = Nonces()
    verified = verify(headers_for(), nonces=nonces)
    assert verified.sender == "jp"
    assert verified.key_id == "jp-op-1"
    assert verified.body_sha256 == hashlib.sha256(BODY).digest()
    assert nonces.seen == {("jp", NONCE)}


def test_replayed_request_refused() -> None:
    nonces = Nonces()
    headers = headers_for()
    verify(headers, nonces=nonces)
    with pytest.raises(PeerAuthFailed) as caught:
        verify(headers, nonces=nonces)
    assert caught.value.reason == "auth.replay"


@pytest.mark.parametrize("missing", SIGNED_HEADERS)
def test_request_missing_a_header_refused(missing: str) -> None:
    headers = headers_for()
    del headers[missing]
    with pytest.raises(PeerAuthFailed) as caught:
        verify(headers)
    assert caught.value.reason == "auth.missing"


@pytest.mark.parametrize(
    ("header", "value"),
    [
        (HEADER_TIME, "2026-11-25 12:00:00"),
        (HEADER_TIME, "2026-13-45T12:00:00Z"),
        (HEADER_NONCE, "not base64!"),
        (HEADER_NONCE, base64.b64encode(b"short").decode()),
        (HEADER_SIGNATURE, base64.b64encode(b"x" * 63).decode()),
        (HEADER_CONTENT_SHA256, base64.b64encode(b"x" * 31).decode()),
        (HEADER_KEY_ID, "key id with spaces"),
        (HEADER_KEY_ID, "k" * 300),
    ],
)
def test_malformed_header_refused(header: str, value: str) -> None:
    headers = headers_for()
    headers[header] = value
    with pytest.raises(PeerAuthFailed) as caught:
        verify(headers)
    assert caught.value.reason == "auth.malformed"


@pytest.mark.parametrize(
    ("offset", "accepted"),
    [
        (timedelta(0), True),
        (timedelta(minutes=5), True),
        (timedelta(minutes=-5), True),
        (timedelta(minutes=5, seconds=1), False),
        (timedelta(minutes=-5, seconds=-1), False),
        (timedelta(days=-365), False),
    ],
)
def test_request_time_must_lie_within_skew_window(offset: timedelta, accepted: bool) -> None:
    headers = headers_for(now=NOW + offset)
    if accepted:
        assert verify(headers).time == NOW + offset
    else:
        with pytest.raises(PeerAuthFailed) as caught:
            verify(headers)
        assert caught.value.reason == "auth.stale"


def test_unknown_key_refused() -> None:
    headers = headers_for(Signer("jp", "jp-op-9", JP_KEY))
    with pytest.raises(PeerAuthFailed) as caught:
        verify(headers)
    assert caught.value.reason == "auth.unknown-key"


def test_request_from_a_node_that_is_not_the_peer_refused() -> None:
    headers = headers_for(Signer("pk", "jp-op-1", JP_KEY))
    with pytest.raises(PeerAuthFailed) as caught:
        verify(headers)
    assert caught.value.reason == "auth.unknown-key"


def test_lookup_failure_of_any_kind_refuses() -> None:
    def broken(_key_id: str, _at: datetime) -> bytes:
        raise RuntimeError("key store unreadable")

    with pytest.raises(PeerAuthFailed) as caught:
        verify(headers_for(), key_lookup=broken)
    assert caught.value.reason == "auth.unknown-key"


def tamper_signature(h: dict[str, str]) -> None:
    h[HEADER_SIGNATURE] = flip_b64(h[HEADER_SIGNATURE], 10)


def tamper_digest(h: dict[str, str]) -> None:
    h[HEADER_CONTENT_SHA256] = base64.b64encode(EMPTY_BODY_SHA256).decode()


def tamper_nonce(h: dict[str, str]) -> None:
    h[HEADER_NONCE] = flip_b64(h[HEADER_NONCE])


def tamper_time(h: dict[str, str]) -> None:
    h[HEADER_TIME] = "2026-11-25T12:00:01Z"


@pytest.mark.parametrize(
    ("what", "tamper", "method", "path"),
    [
        ("signature byte flipped", tamper_signature, "POST", "/v1/envelopes"),
        ("body digest swapped", tamper_digest, "POST", "/v1/envelopes"),
        ("nonce changed", tamper_nonce, "POST", "/v1/envelopes"),
        ("time changed", tamper_time, "POST", "/v1/envelopes"),
        ("other method", None, "PUT", "/v1/envelopes"),
        ("other path", None, "POST", "/v1/manifests"),
        ("query added", None, "POST", "/v1/envelopes?batch=1"),
    ],
)
def test_any_change_to_a_signed_request_breaks_its_signature(
    what: str, tamper: Callable[[dict[str, str]], None] | None, method: str, path: str
) -> None:
    headers = headers_for()
    if tamper is not None:
        tamper(headers)
    with pytest.raises(PeerAuthFailed) as caught:
        verify(headers, method=method, path=path)
    assert caught.value.reason == "auth.signature", what


def test_request_made_for_another_recipient_refused() -> None:
    headers = headers_for(recipient="jp")
    with pytest.raises(PeerAuthFailed) as caught:
        verify(headers)
    assert caught.value.reason == "auth.signature"


def test_request_signed_by_another_key_refused() -> None:
    headers = headers_for(Signer("jp", "jp-op-1", OTHER_KEY))
    with pytest.raises(PeerAuthFailed) as caught:
        verify(headers)
    assert caught.value.reason == "auth.signature"


def test_badly_signed_request_does_not_consume_its_nonce() -> None:
    nonces = Nonces()
    headers = headers_for(Signer("jp", "jp-op-1", OTHER_KEY))
    with pytest.raises(PeerAuthFailed):
        verify(headers, nonces=nonces)
    assert nonces.seen == set()
    verify(headers_for(), nonces=nonces)
    assert nonces.seen == {("jp", NONCE)}


def test_peer_auth_failure_is_a_verification_error() -> None:
    with pytest.raises(VerificationError):
        verify({})


@pytest.mark.parametrize(
    ("chunks", "matches"),
    [
        ([b"one ", b"envel", b"ope"], True),
        ([BODY], True),
        ([b"one envelopE"], False),
        ([BODY, b"\x00"], False),
        ([], False),
    ],
)
def test_body_digest_checked_after_streaming(chunks: list[bytes], matches: bool) -> None:
    digest = BodyDigest(hashlib.sha256(BODY).digest())
    for chunk in chunks:
        digest.update(chunk)
    assert digest.size == sum(len(c) for c in chunks)
    if matches:
        digest.check()
    else:
        with pytest.raises(PeerAuthFailed) as caught:
            digest.check()
        assert caught.value.reason == "auth.digest"


def test_signing_refuses_a_nonce_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match="nonce"):
        headers_for(nonce=b"short")


def test_header_names_are_the_documented_ones() -> None:
    assert (HEADER_NODE, HEADER_KEY_ID, HEADER_TIME) == (
        "Gateway-Node",
        "Gateway-Key-Id",
        "Gateway-Time",
    )
    assert Purpose.PEER_REQUEST == b"ssw-gateway/peer-request/v1"
