"""Verification with the ciphertext hash taken while the envelope was spooled.

A receiver that hashes the ciphertext section as the bytes arrive
(:class:`CiphertextHasher`) and hands that hash to :func:`verify_envelope`
must get exactly the answers of the verifier that reads the ciphertext again:
the same accepted envelopes, the same refusals with the same messages.
"""

from __future__ import annotations

import hashlib
import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.core.envelope import (
    PREFIX_BYTES,
    SIGNATURE_BYTES,
    CiphertextHasher,
    EnvelopeInvalid,
    KnownCiphertext,
    verify_envelope,
)
from tests.unit.test_envelope_support import JP, NOW, PK, POLICY, seal_bytes

ENVELOPE, _SEALED = seal_bytes(JP, PK, "consent-revocation", attachments=[("a", b"x" * 70000)])
HEADER_LENGTH = int.from_bytes(ENVELOPE[10:14], "big")
OFFSET = PREFIX_BYTES + HEADER_LENGTH + SIGNATURE_BYTES


def hashed(envelope: bytes, chunk: int) -> KnownCiphertext | None:
    hasher = CiphertextHasher()
    for start in range(0, len(envelope), chunk):
        hasher.update(envelope[start : start + chunk])
    return hasher.result()


def answer(envelope: bytes, known: KnownCiphertext | None) -> str:
    """``accepted``, or the refused check and its message."""
    try:
        verify_envelope(
            io.BytesIO(envelope), keyring=PK.keyring, peer_manifest=JP.manifest, policy=POLICY,
            now=NOW, known=known,
        )  # fmt: skip
    except EnvelopeInvalid as exc:
        return f"{exc.check}: {exc}"
    return "accepted"


@pytest.mark.parametrize("chunk", [1, 7, PREFIX_BYTES, OFFSET, OFFSET + 1, 65536, 1 << 20])
def test_the_hash_is_of_the_ciphertext_whatever_the_chunks(chunk: int) -> None:
    known = hashed(ENVELOPE, chunk)
    assert known == KnownCiphertext(
        OFFSET, hashlib.sha256(ENVELOPE[OFFSET:]).digest(), len(ENVELOPE)
    )
    assert answer(ENVELOPE, known) == "accepted"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(position=st.integers(0, len(ENVELOPE) * 8 - 1), chunk=st.sampled_from([5, 4096, 65536]))
def test_a_flipped_bit_gets_the_same_answer(position: int, chunk: int) -> None:
    tampered = bytearray(ENVELOPE)
    tampered[position // 8] ^= 1 << (position % 8)
    data = bytes(tampered)
    expected = answer(data, None)
    assert expected != "accepted"
    assert answer(data, hashed(data, chunk)) == expected


@settings(max_examples=120, deadline=None)
@given(length=st.integers(0, len(ENVELOPE) - 1))
def test_a_truncated_envelope_gets_the_same_answer(length: int) -> None:
    data = ENVELOPE[:length]
    expected = answer(data, None)
    assert expected != "accepted"
    assert answer(data, hashed(data, 4096)) == expected


@pytest.mark.parametrize("extra", [b"\x00", b"junk" * 10, b"z" * 70000])
def test_appended_bytes_get_the_same_answer(extra: bytes) -> None:
    data = ENVELOPE + extra
    assert answer(data, hashed(data, 4096)) == answer(data, None)
    assert answer(data, hashed(data, 4096)).endswith("bytes follow the end of the envelope")


def test_the_known_hash_is_what_is_compared() -> None:
    """The stream is intact, the hash handed over is not: refused, so the
    ciphertext was not read again (and a wrong hash is never trusted)."""
    known = hashed(ENVELOPE, 65536)
    assert known is not None
    wrong = KnownCiphertext(known.offset, bytes(32), known.envelope_size)
    assert answer(ENVELOPE, wrong).startswith("ciphertext-hash")


def test_a_hash_from_another_offset_is_ignored() -> None:
    """A hash that does not start where this header says the ciphertext starts
    is not used: the ciphertext is read and checked as without one."""
    wrong = KnownCiphertext(OFFSET + 1, bytes(32), len(ENVELOPE))
    assert answer(ENVELOPE, wrong) == "accepted"


@pytest.mark.parametrize(
    "data",
    [b"", b"SSWG-ENV", b"NOT-AN-ENVELOPE-AT-ALL", b"SSWG-ENV\x00\x02" + bytes(100)],
    ids=["empty", "short prefix", "bad magic", "other version"],
)
def test_no_hash_for_what_is_not_an_envelope(data: bytes) -> None:
    assert hashed(data, 3) is None


def test_no_hash_when_the_bytes_end_before_the_ciphertext() -> None:
    assert hashed(ENVELOPE[: OFFSET - 1], 100) is None
    assert hashed(ENVELOPE[:OFFSET], 100) == KnownCiphertext(
        OFFSET, hashlib.sha256(b"").digest(), OFFSET
    )
