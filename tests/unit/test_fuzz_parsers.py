"""Fuzz targets for the parsers that read untrusted bytes first.

Each target feeds generated and mutated input to one parser and accepts two
outcomes only: a value, or an error of the project's own tree
(:class:`gateway.errors.GatewayError`). Anything else (``ValueError``,
``OverflowError``, ``RecursionError``, ``RuntimeError``...) fails the test:
that is the class of fault the hostile-input tests are about. Bounded to a
few seconds each so they run with the default suite; a longer run:
``GATEWAY_FUZZ_EXAMPLES=5000 pytest tests/unit/test_fuzz_parsers.py``.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import struct
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import nacl.public
import nacl.signing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.core.canonical import canonical_bytes, parse_bounded_json, parse_canonical
from gateway.core.envelope import MAGIC, read_header
from gateway.core.keys import (
    KeyManifest,
    ManifestKey,
    fingerprint,
    key_id,
    sign_manifest,
    verify_manifest,
)
from gateway.core.peer_auth import (
    HEADER_CONTENT_SHA256,
    HEADER_KEY_ID,
    HEADER_NODE,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIME,
    parse_signed_request,
    sign_request,
    verify_request,
)
from gateway.core.policy import Limits
from gateway.errors import GatewayError
from tests.unit.test_envelope_support import JP, PK, seal_bytes, split

# A few seconds each by default; set GATEWAY_FUZZ_EXAMPLES for a longer run.
FUZZ = settings(
    max_examples=int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)


def only_our_errors(parse: Callable[[], Any]) -> None:
    """Run ``parse``; an error of the project's tree is a fine answer, nothing else is."""
    with contextlib.suppress(GatewayError):
        parse()


# --- mutations of a known-good document --------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """``original`` with a few bytes flipped, cut, inserted or spliced with hostile text."""
    data = bytearray(original)
    hostile = [
        b"9" * 5000,
        b"1e400",
        b"-1e999999999",
        b"NaN",
        b"Infinity",
        b"[" * 200,
        b'"\\ud800"',
        b"\xff\xfe",
        b'"2026-02-30T00:00:00Z"',
        b'"0000-01-01T00:00:00Z"',
        b'"9999-12-31T23:59:60Z"',
        b"null",
        b"{}",
        b'"' + base64.b64encode(bytes(32)) + b'"',
    ]
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "splice"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[at : at + draw(st.integers(0, 16))] = draw(st.sampled_from(hostile))
    return bytes(data)


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
number_literals = st.one_of(
    st.from_regex(
        r"-?(0|[1-9][0-9]{0,6000})(\.[0-9]{1,50})?([eE][+-]?[0-9]{1,12})?", fullmatch=True
    ),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "9" * 4301]),
)


# --- 1. the bounded JSON parser ----------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=2048))
def test_fuzz_bounded_json_parser_on_bytes(data: bytes) -> None:
    only_our_errors(lambda: parse_bounded_json(data, max_bytes=4096, max_depth=8))
    only_our_errors(lambda: parse_canonical(data, max_bytes=4096, max_depth=8))


@FUZZ
@given(value=json_values, literal=number_literals, depth=st.integers(0, 60))
def test_fuzz_bounded_json_parser_on_json(value: Any, literal: str, depth: int) -> None:
    text = json.dumps({"v": value, "n": 0}).replace('"n": 0', f'"n": {literal}')
    text = "[" * depth + text + "]" * depth
    data = text.encode("utf-8", "surrogatepass")
    only_our_errors(lambda: parse_bounded_json(data, max_bytes=1 << 20, max_depth=32))
    only_our_errors(lambda: parse_canonical(data, max_bytes=1 << 20, max_depth=32))


# --- 2. the envelope header reader --------------------------------------------------------

ENVELOPE, _SEALED = seal_bytes(JP, PK, "consent-revocation")
_PREFIX, HEADER, _SIGNATURE, _REST = split(ENVELOPE)
HEADER_BYTES = canonical_bytes(HEADER)


def _framed(header: bytes) -> bytes:
    return MAGIC + struct.pack(">HI", 1, len(header)) + header + bytes(64)


@FUZZ
@given(raw=mutated(HEADER_BYTES))
def test_fuzz_envelope_header_reader_on_mutated_headers(raw: bytes) -> None:
    only_our_errors(lambda: read_header(io.BytesIO(_framed(raw)), Limits()))


@FUZZ
@given(field=st.sampled_from(sorted(HEADER)), value=json_values | number_literals)
def test_fuzz_envelope_header_reader_on_hostile_fields(field: str, value: Any) -> None:
    edited = dict(HEADER)
    edited[field] = value
    try:
        raw = canonical_bytes(edited)
    except GatewayError:  # a value canonical JSON cannot carry: splice its text instead
        raw = HEADER_BYTES.replace(
            json.dumps(field).encode() + b":",
            json.dumps(field).encode() + b":" + str(value).encode() + b',"x":',
            1,
        )
    only_our_errors(lambda: read_header(io.BytesIO(_framed(raw)), Limits()))


@FUZZ
@given(envelope=mutated(ENVELOPE[:400]))
def test_fuzz_envelope_header_reader_on_mutated_prefixes(envelope: bytes) -> None:
    only_our_errors(lambda: read_header(io.BytesIO(envelope), Limits()))


# --- 3. the manifest verifier ---------------------------------------------------------------

ROOT = nacl.signing.SigningKey(bytes([5]) * 32)
YEAR = timedelta(days=365)


def _manifest(sign_public: bytes, box_public: bytes, **fields: Any) -> bytes:
    draft = KeyManifest(
        node="jp",
        version=1,
        issued_at=NOW,
        expires_at=NOW + YEAR,
        root_public=bytes(ROOT.verify_key),
        keys=(
            ManifestKey(key_id(sign_public), "sign", sign_public, NOW, NOW + YEAR),
            ManifestKey(key_id(box_public), "encrypt", box_public, NOW, NOW + YEAR),
        ),
        revocations=(),
        raw=b"",
    )
    payload = draft.payload_json()
    payload.update(fields)
    try:
        payload_bytes = canonical_bytes(payload)
    except GatewayError:
        payload_bytes = json.dumps(payload, default=str).encode()
    return sign_manifest(payload_bytes, [ROOT])


GOOD_MANIFEST = _manifest(
    bytes(nacl.signing.SigningKey(bytes([6]) * 32).verify_key),
    bytes(nacl.public.PrivateKey(bytes([7]) * 32).public_key),
)
ROOT_FINGERPRINT = fingerprint(bytes(ROOT.verify_key))


def _verify(raw: bytes) -> None:
    verify_manifest(
        raw, node="jp", pinned=None, expected_fingerprint=ROOT_FINGERPRINT, now=NOW + timedelta(1)
    )


def test_the_manifest_fuzz_seed_is_accepted() -> None:
    _verify(GOOD_MANIFEST)


@FUZZ
@given(raw=mutated(GOOD_MANIFEST))
def test_fuzz_manifest_verifier_on_mutated_documents(raw: bytes) -> None:
    only_our_errors(lambda: _verify(raw))


@FUZZ
@given(
    sign_public=st.binary(min_size=32, max_size=32),
    box_public=st.binary(min_size=32, max_size=32),
    field=st.sampled_from(["version", "issued_at", "expires_at", "node", "type", "keys"]),
    value=json_values | number_literals,
)
def test_fuzz_manifest_verifier_on_root_signed_hostile_payloads(
    sign_public: bytes, box_public: bytes, field: str, value: Any
) -> None:
    """Signed by the trusted root, so every check after the signature is reached."""
    only_our_errors(lambda: _verify(_manifest(sign_public, box_public)))
    only_our_errors(lambda: _verify(_manifest(sign_public, box_public, **{field: value})))


# --- 4. the peer request verifier ---------------------------------------------------------

SIGNER_KEY = nacl.signing.SigningKey(bytes([8]) * 32)


class _Signer:
    node = "jp"
    signing_key_id = "jp-op-1"

    def sign(self, purpose: bytes, payload: bytes) -> bytes:
        from gateway.core.domain import tagged  # noqa: PLC0415

        return bytes(SIGNER_KEY.sign(tagged(purpose, payload)).signature)


GOOD_HEADERS = sign_request(
    _Signer(),
    method="POST",
    path="/v1/envelopes",
    body_sha256=bytes(32),
    recipient="pk",
    now=NOW,
    nonce=bytes(16),
)
HEADER_NAMES = (
    HEADER_NODE,
    HEADER_KEY_ID,
    HEADER_TIME,
    HEADER_NONCE,
    HEADER_CONTENT_SHA256,
    HEADER_SIGNATURE,
)


def _verify_request(headers: dict[str, str], method: str, path: str) -> None:
    parsed = parse_signed_request(headers)
    verify_request(
        parsed,
        method=method,
        path=path,
        recipient="pk",
        expected_sender="jp",
        now=NOW,
        lookup_key=lambda _k, _t: bytes(SIGNER_KEY.verify_key),
        remember_nonce=lambda *_a, **_k: True,
        skew=timedelta(minutes=5),
    )


def test_the_request_fuzz_seed_is_accepted() -> None:
    _verify_request(dict(GOOD_HEADERS), "POST", "/v1/envelopes")


hostile_header_text = st.one_of(
    st.text(max_size=300),
    st.sampled_from(
        [
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59Z",
            "0000-00-00T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-11-25T12:00:60Z",
            "9" * 5000,
            "=" * 300,
            "\x00",
            "jp\r\nX: y",
        ]
    ),
)


@FUZZ
@given(
    name=st.sampled_from(HEADER_NAMES),
    value=hostile_header_text,
    method=st.sampled_from(["POST", "GET", "post", "", "P" * 300]),
    path=st.one_of(st.just("/v1/envelopes"), st.text(max_size=3000)),
)
def test_fuzz_peer_request_verifier(name: str, value: str, method: str, path: str) -> None:
    headers = dict(GOOD_HEADERS)
    headers[name] = value
    only_our_errors(lambda: _verify_request(headers, method, path))
    only_our_errors(lambda: _verify_request(dict(GOOD_HEADERS), method, path))
