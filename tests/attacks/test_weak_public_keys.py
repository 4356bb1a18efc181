"""Hostile input, class 4: weak public keys in a signed manifest.

A root-signed manifest is trusted for what its root signed, but a signature
says nothing about whether the keys in it are safe to use. An X25519 key of
low order makes every seal's shared secret all zeros (libsodium refuses, so
every seal to the peer failed as an internal error); an Ed25519 key of small
or mixed order, or in a non-canonical encoding, lets one signature verify for
more than one message or key holder. Manifest verification refuses them all
(check ``manifest-weak-key``), for the root, the signing and the encryption
keys, at ``peer add`` (CLI and local API) and on the peer route.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import nacl.bindings as sodium
import nacl.public
import nacl.signing
import pytest

from gateway.core import envelope
from gateway.core.canonical import canonical_bytes
from gateway.core.domain import Purpose, tagged
from gateway.core.keys import (
    MANIFEST_FORMAT,
    X25519_LOW_ORDER_POINTS,
    KeyManifest,
    KeyNotUsable,
    ManifestKey,
    ManifestRejected,
    fingerprint,
    key_id,
    sign_manifest,
    verify_manifest,
)
from gateway.node import keystore, own_keys, peer_trust
from gateway.node.runtime import utc_now
from gateway.peer.server import MANIFEST_CONTENT_TYPE, MANIFESTS_PATH
from tests.hostile import (
    PASSPHRASE,
    Side,
    api_call,
    pair,  # noqa: F401 - the shared fixture
    peer_server,
    post_signed,
)
from tests.unit.test_keys import T0, YEAR

_P = 2**255 - 19


def _le(n: int) -> bytes:
    return n.to_bytes(32, "little")


def _top_bit_cleared(data: bytes) -> bytes:
    return data[:31] + bytes([data[31] & 0x7F])


def _with_top_bit(data: bytes) -> bytes:
    return data[:31] + bytes([data[31] | 0x80])


# --- the class -----------------------------------------------------------------------------

_X25519_ORDER_8 = (
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
)
WEAK_X25519 = {
    "zero (order 4)": _le(0),
    "one (order 1)": _le(1),
    "order 8, first": _le(_X25519_ORDER_8[0]),
    "order 8, second": _le(_X25519_ORDER_8[1]),
    "p - 1 (order 2)": _le(_P - 1),
    "p (zero, unreduced)": _le(_P),
    "p + 1 (one, unreduced)": _le(_P + 1),
    "zero with the top bit set": _with_top_bit(_le(0)),
    "order 8 with the top bit set": _with_top_bit(_le(_X25519_ORDER_8[0])),
    "base point 9, unreduced as p + 9": _le(_P + 9),
    "all ones": b"\xff" * 32,
}
_ED_ORDER_8 = (
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
)
SMALL_ORDER_ED25519 = {
    "identity (order 1)": bytes.fromhex("01" + "00" * 31),
    "y = -1 (order 2)": bytes.fromhex("ec" + "ff" * 30 + "7f"),
    "y = 0 (order 4)": bytes(32),
    "y = 0, x negative (order 4)": bytes(31) + b"\x80",
    "order 8, first": bytes.fromhex(_ED_ORDER_8[0]),
    "order 8, first, x negative": _with_top_bit(bytes.fromhex(_ED_ORDER_8[0])),
    "order 8, second": bytes.fromhex(_ED_ORDER_8[1]),
    "order 8, second, x negative": _with_top_bit(bytes.fromhex(_ED_ORDER_8[1])),
}
NON_CANONICAL_ED25519 = {
    "identity with the sign bit (x = 0 is not negative)": bytes.fromhex("01" + "00" * 30 + "80"),
    "y = p + 1 (identity, unreduced)": _le(_P + 1),
    "y = p (order 4, unreduced)": _le(_P),
}


def _random_scalar() -> bytes:
    return bytes(sodium.crypto_core_ed25519_scalar_reduce(os.urandom(64)))


def _mixed_order() -> tuple[bytes, bytes]:
    """(scalar, public) of a key in the prime-order subgroup plus an order-8 point."""
    scalar = _random_scalar()
    main = sodium.crypto_scalarmult_ed25519_base_noclamp(scalar)
    return scalar, sodium.crypto_core_ed25519_add(main, bytes.fromhex(_ED_ORDER_8[0]))


MIXED_SCALAR, MIXED_ORDER = _mixed_order()
WEAK_ED25519 = {
    **SMALL_ORDER_ED25519,
    **NON_CANONICAL_ED25519,
    "mixed order (a real key plus an order-8 point)": MIXED_ORDER,
}


def test_the_tables_are_what_they_claim() -> None:
    """Checked against libsodium's own arithmetic, not against the code under test."""
    secret = bytes(nacl.public.PrivateKey.generate())
    for point in X25519_LOW_ORDER_POINTS:
        with pytest.raises(RuntimeError):  # an all-zero shared secret, refused
            sodium.crypto_scalarmult(secret, point)
    for name, point in WEAK_X25519.items():
        if _top_bit_cleared(point) not in X25519_LOW_ORDER_POINTS:
            assert int.from_bytes(point, "little") >= _P, name  # then it is non-canonical
    identity = SMALL_ORDER_ED25519["identity (order 1)"]
    for name, point in SMALL_ORDER_ED25519.items():
        eight = point
        for _ in range(3):
            eight = sodium.crypto_core_ed25519_add(eight, eight)
        assert eight == identity, name
    # The mixed-order key is a prime-order key plus an order-8 point checked above.
    main = sodium.crypto_scalarmult_ed25519_base_noclamp(MIXED_SCALAR)
    assert sodium.crypto_core_ed25519_sub(MIXED_ORDER, main) == bytes.fromhex(_ED_ORDER_8[0])


# --- builders that sign what an attacker would (no checks on the way) ----------------------


def _payload(
    *, node: str, version: int, root_public: bytes, sign_public: bytes, box_public: bytes
) -> bytes:
    draft = KeyManifest(
        node=node,
        version=version,
        issued_at=T0,
        expires_at=T0 + YEAR,
        root_public=root_public,
        keys=(
            ManifestKey(key_id(sign_public), "sign", sign_public, T0, T0 + YEAR),
            ManifestKey(key_id(box_public), "encrypt", box_public, T0, T0 + YEAR),
        ),
        revocations=(),
        raw=b"",
    )
    return canonical_bytes(draft.payload_json())


def _sign_as(scalar: bytes, public: bytes, message: bytes) -> bytes:
    """An Ed25519 signature by the holder of ``scalar`` under any ``public`` encoding.

    With a mixed-order public key it verifies one time in eight: try nonces
    until libsodium accepts it, as an attacker would.
    """
    for _ in range(256):
        nonce = _random_scalar()
        commitment = sodium.crypto_scalarmult_ed25519_base_noclamp(nonce)
        challenge = sodium.crypto_core_ed25519_scalar_reduce(
            hashlib.sha512(commitment + public + message).digest()
        )
        response = sodium.crypto_core_ed25519_scalar_add(
            nonce, sodium.crypto_core_ed25519_scalar_mul(challenge, scalar)
        )
        signature = commitment + response
        try:
            nacl.signing.VerifyKey(public).verify(message, signature)
        except Exception:
            continue
        return signature
    raise AssertionError("no signature verified")


def manifest_with(
    *,
    node: str = "jp",
    version: int = 1,
    root: nacl.signing.SigningKey | None = None,
    sign_public: bytes | None = None,
    box_public: bytes | None = None,
) -> tuple[bytes, str]:
    """A manifest signed by ``root`` (a fresh one by default); (raw, root fingerprint)."""
    root = root or nacl.signing.SigningKey.generate()
    payload = _payload(
        node=node,
        version=version,
        root_public=bytes(root.verify_key),
        sign_public=sign_public or bytes(nacl.signing.SigningKey.generate().verify_key),
        box_public=box_public or bytes(nacl.public.PrivateKey.generate().public_key),
    )
    return sign_manifest(payload, [root]), fingerprint(bytes(root.verify_key))


def manifest_with_root(root_public: bytes, scalar: bytes) -> tuple[bytes, str]:
    """A manifest whose root public key is ``root_public``, signed by ``scalar``."""
    payload = _payload(
        node="jp",
        version=1,
        root_public=root_public,
        sign_public=bytes(nacl.signing.SigningKey.generate().verify_key),
        box_public=bytes(nacl.public.PrivateKey.generate().public_key),
    )
    signature = _sign_as(scalar, root_public, tagged(Purpose.KEY_MANIFEST, payload))
    document = {
        "format": MANIFEST_FORMAT,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [
            {"key_id": key_id(root_public), "sig": base64.b64encode(signature).decode()}
        ],
    }
    return canonical_bytes(document), fingerprint(root_public)


# --- the core -----------------------------------------------------------------------------

CORE_CASES: dict[str, Callable[[], tuple[bytes, str]]] = {
    **{
        f"encryption key: {name}": (lambda p=point: manifest_with(box_public=p))
        for name, point in WEAK_X25519.items()
    },
    **{
        f"signing key: {name}": (lambda p=point: manifest_with(sign_public=p))
        for name, point in WEAK_ED25519.items()
    },
    **{
        # Any scalar will do: these keys verify nothing, and the check comes first.
        f"root key: {name}": (lambda p=point: manifest_with_root_unsigned(p))
        for name, point in {**SMALL_ORDER_ED25519, **NON_CANONICAL_ED25519}.items()
    },
    "root key: mixed order, with a signature that verifies": (
        lambda: manifest_with_root(MIXED_ORDER, MIXED_SCALAR)
    ),
}


def manifest_with_root_unsigned(root_public: bytes) -> tuple[bytes, str]:
    payload = _payload(
        node="jp",
        version=1,
        root_public=root_public,
        sign_public=bytes(nacl.signing.SigningKey.generate().verify_key),
        box_public=bytes(nacl.public.PrivateKey.generate().public_key),
    )
    document = {
        "format": MANIFEST_FORMAT,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [
            {"key_id": key_id(root_public), "sig": base64.b64encode(bytes(64)).decode()}
        ],
    }
    return canonical_bytes(document), fingerprint(root_public)


@pytest.mark.parametrize("build", CORE_CASES.values(), ids=list(CORE_CASES))
def test_weak_public_keys_in_a_signed_manifest_are_refused_by_the_core(
    build: Callable[[], tuple[bytes, str]],
) -> None:
    raw, root_fingerprint = build()
    with pytest.raises(ManifestRejected) as caught:
        verify_manifest(
            raw,
            node="jp",
            pinned=None,
            expected_fingerprint=root_fingerprint,
            now=T0 + timedelta(days=1),
        )
    assert caught.value.check == "manifest-weak-key", caught.value


def test_a_sound_manifest_from_the_same_builders_is_accepted() -> None:
    raw, root_fingerprint = manifest_with()
    verified = verify_manifest(
        raw, node="jp", pinned=None, expected_fingerprint=root_fingerprint, now=T0
    )
    assert verified.version == 1


@pytest.mark.parametrize("point", WEAK_X25519.values(), ids=list(WEAK_X25519))
def test_sealing_to_a_weak_key_is_a_named_refusal_not_a_crash(point: bytes) -> None:
    """Defence in depth: a weak key pinned before this check still fails cleanly."""
    if _top_bit_cleared(point) in X25519_LOW_ORDER_POINTS:
        with pytest.raises(KeyNotUsable) as caught:
            envelope.sealed_box(b"content key", point, bytes(32))
        assert caught.value.check == "recipient-key"
    else:  # a non-canonical encoding of a point of large order: libsodium reduces it
        assert len(envelope.sealed_box(b"content key", point, bytes(32))) > 32


# --- the doors: peer add (CLI and local API) and the peer route ---------------------------


def _real_root(side: Side) -> nacl.signing.SigningKey:
    with side.node.db.transaction() as session:
        manifest = own_keys.own_manifest(session)
    path = side.node.settings.keys_dir / keystore.root_file_name(manifest.root_key_id)
    return keystore.read_root(
        path, PASSPHRASE.encode(), node=side.node.node_id, expected_key_id=manifest.root_key_id
    )


def test_weak_public_keys_in_a_signed_manifest_are_refused_at_every_entry_point(
    pair: dict[str, Side], tmp_path: Path
) -> None:
    jp, pk = pair["jp"], pair["pk"]
    root = _real_root(pk)
    with jp.node.db.transaction() as session:
        before = peer_trust.pinned_peer_manifest(session)
    assert before is not None
    members = {
        "zero X25519 key": {"box_public": WEAK_X25519["zero (order 4)"]},
        "order-8 X25519 key": {"box_public": WEAK_X25519["order 8, second"]},
        "identity Ed25519 signing key": {"sign_public": SMALL_ORDER_ED25519["identity (order 1)"]},
        "mixed-order Ed25519 signing key": {"sign_public": MIXED_ORDER},
    }
    for version, (name, weak) in enumerate(members.items(), start=before.version + 1):
        # Signed by pk's real root, newer than the pinned one: only the key is wrong.
        raw, root_fingerprint = manifest_with(node="pk", version=version, root=root, **weak)
        manifest_file = tmp_path / f"pk-manifest-{version}.json"
        manifest_file.write_bytes(raw)
        done = jp.cli(
            "peer", "add", str(manifest_file), "--fingerprint", root_fingerprint, role="admin"
        )
        assert done.returncode == 4, (name, done.stderr)
        assert "internal error" not in done.stderr
        answer = api_call(
            jp,
            "POST",
            "/api/v1/peer",
            role="admin",
            data=canonical_bytes(
                {
                    "manifest_base64": base64.b64encode(raw).decode(),
                    "fingerprint": root_fingerprint,
                }
            ),
        )
        assert answer.status == 422, (name, answer.body)
        assert answer.body["error"]["check"] == "manifest-weak-key", (name, answer.body)
        with peer_server(jp) as server:
            status, body = post_signed(server, pk, "jp", MANIFESTS_PATH, raw, MANIFEST_CONTENT_TYPE)
        assert status == 422, (name, status, body)
    with jp.node.db.transaction() as session:
        after = peer_trust.pinned_peer_manifest(session)
    assert after is not None
    assert after.raw == before.raw
    # And the pinned keys still seal: nothing of the refused manifests was kept.
    assert utc_now() < after.expires_at
