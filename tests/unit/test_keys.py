"""Key ids, fingerprints, manifest parsing and the keyring: the pure core."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nacl.public
import nacl.signing
import pytest

from gateway.core.canonical import canonical_bytes
from gateway.core.domain import Purpose, tagged
from gateway.core.keys import (
    KeyManifest,
    KeyNotUsable,
    ManifestKey,
    ManifestRejected,
    NodeKeyring,
    Revocation,
    fingerprint,
    fingerprints_match,
    key_id,
    manifest_payload,
    normalise_fingerprint,
    parse_manifest,
    parse_stored_manifest,
    sign_manifest,
    verify_manifest,
)
from gateway.errors import InvalidInput

T0 = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
YEAR = timedelta(days=365)
VECTORS = Path(__file__).parent.parent / "data" / "key_vectors.json"


def seeded_signing(n: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(bytes([n]) * 32)


def seeded_box(n: int) -> nacl.public.PrivateKey:
    return nacl.public.PrivateKey(bytes([n]) * 32)


@dataclass
class Builder:
    """Builds manifests of one node from fixed seeds, as the shell would."""

    node: str = "jp"
    root: nacl.signing.SigningKey = field(default_factory=lambda: seeded_signing(1))
    sign: nacl.signing.SigningKey = field(default_factory=lambda: seeded_signing(2))
    box: nacl.public.PrivateKey = field(default_factory=lambda: seeded_box(3))

    def keys(self, start: datetime = T0, end: datetime | None = None) -> list[ManifestKey]:
        end = end or start + YEAR
        sign_pub = bytes(self.sign.verify_key)
        box_pub = bytes(self.box.public_key)
        return [
            ManifestKey(key_id(sign_pub), "sign", sign_pub, start, end),
            ManifestKey(key_id(box_pub), "encrypt", box_pub, start, end),
        ]

    def manifest(
        self,
        version: int = 1,
        *,
        issued: datetime = T0,
        expires: datetime | None = None,
        keys: list[ManifestKey] | None = None,
        revocations: list[Revocation] | None = None,
        previous_root: nacl.signing.SigningKey | None = None,
        signers: list[nacl.signing.SigningKey] | None = None,
    ) -> bytes:
        payload = manifest_payload(
            node=self.node,
            version=version,
            issued_at=issued,
            expires_at=expires or issued + YEAR,
            root_public=bytes(self.root.verify_key),
            keys=keys if keys is not None else self.keys(),
            revocations=revocations or [],
            previous_root_public=bytes(previous_root.verify_key) if previous_root else None,
        )
        if signers is None:
            signers = [self.root] + ([previous_root] if previous_root else [])
        return sign_manifest(payload, signers)


def test_key_id_is_16_hex_of_tagged_sha256() -> None:
    public = bytes(seeded_signing(2).verify_key)
    assert key_id(public) == key_id(public)
    assert len(key_id(public)) == 16
    assert key_id(public) != key_id(bytes(seeded_signing(1).verify_key))


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_key_id_refuses_wrong_sizes(size: int) -> None:
    with pytest.raises(InvalidInput):
        key_id(b"\x01" * size)


def test_fingerprint_is_eight_groups_of_four_base32() -> None:
    fp = fingerprint(bytes(seeded_signing(1).verify_key))
    groups = fp.split("-")
    assert len(groups) == 8
    assert all(len(g) == 4 and g.isalnum() and g.upper() == g for g in groups)


@pytest.mark.parametrize(
    "typed",
    [
        "{fp}",
        "{fp_lower}",
        "{fp_compact}",
        "{fp_spaced}",
    ],
)
def test_fingerprint_comparison_ignores_case_dashes_and_spaces(typed: str) -> None:
    public = bytes(seeded_signing(1).verify_key)
    fp = fingerprint(public)
    text = typed.format(
        fp=fp,
        fp_lower=fp.lower(),
        fp_compact=fp.replace("-", ""),
        fp_spaced=fp.replace("-", " "),
    )
    assert fingerprints_match(text, public)
    assert normalise_fingerprint(text) == fp


@pytest.mark.parametrize("typed", ["", "ABCD", "ABCD-EFGH-IJKL-MNOP-QRST-UVWX-YZ23-4568", "1" * 32])
def test_malformed_fingerprint_is_named(typed: str) -> None:
    with pytest.raises(InvalidInput, match="root fingerprint is 32"):
        normalise_fingerprint(typed)


def test_known_answer_vectors() -> None:
    """Fixed seeds give fixed ids, fingerprint and manifest bytes (tests/data/key_vectors.json)."""
    vectors = json.loads(VECTORS.read_text())
    builder = Builder()
    raw = builder.manifest()
    root_pub = bytes(builder.root.verify_key)
    assert key_id(root_pub) == vectors["root_key_id"]
    assert fingerprint(root_pub) == vectors["root_fingerprint"]
    assert key_id(bytes(builder.sign.verify_key)) == vectors["signing_key_id"]
    assert key_id(bytes(builder.box.public_key)) == vectors["encryption_key_id"]
    assert base64.b64encode(raw).decode() == vectors["manifest_v1_base64"]


def test_manifest_round_trip_keeps_exact_bytes() -> None:
    raw = Builder().manifest()
    manifest = parse_manifest(raw)
    assert manifest.raw == raw
    assert manifest.node == "jp"
    assert manifest.version == 1
    assert manifest.issued_at == T0
    assert manifest.expires_at == T0 + YEAR
    assert [k.use for k in manifest.keys] == ["sign", "encrypt"]


def test_a_stored_manifest_is_parsed_once_per_exact_bytes() -> None:
    """Equal bytes share one parsed manifest; other bytes are parsed on their own; a
    refused document is refused at every call, never kept."""
    builder = Builder()
    raw = builder.manifest(1)
    first = parse_stored_manifest(bytes(raw))
    assert parse_stored_manifest(bytes(bytearray(raw))) is first  # equal bytes, new object
    assert first == parse_manifest(raw)
    other = parse_stored_manifest(builder.manifest(2, issued=T0 + timedelta(days=1)))
    assert other is not first
    assert other.version == 2
    damaged = raw[:-2] + b"x}"
    for _ in range(2):
        with pytest.raises(ManifestRejected):
            parse_stored_manifest(damaged)


def test_first_pin_with_matching_fingerprint_is_accepted() -> None:
    builder = Builder()
    raw = builder.manifest()
    fp = fingerprint(bytes(builder.root.verify_key))
    manifest = verify_manifest(raw, node="jp", pinned=None, expected_fingerprint=fp, now=T0)
    assert manifest.version == 1


def test_first_pin_without_fingerprint_is_refused() -> None:
    raw = Builder().manifest()
    with pytest.raises(ManifestRejected) as caught:
        verify_manifest(raw, node="jp", pinned=None, expected_fingerprint=None, now=T0)
    assert caught.value.check == "fingerprint"


def test_higher_version_signed_by_pinned_root_is_accepted() -> None:
    builder = Builder()
    pinned = parse_manifest(builder.manifest(1))
    builder.sign = seeded_signing(4)
    raw = builder.manifest(2, issued=T0 + timedelta(days=1))
    got = verify_manifest(
        raw, node="jp", pinned=pinned, expected_fingerprint=None, now=T0 + timedelta(days=2)
    )
    assert got.version == 2


def test_root_rotation_signed_by_old_and_new_root_is_accepted() -> None:
    builder = Builder()
    pinned = parse_manifest(builder.manifest(1))
    old_root = builder.root
    builder.root = seeded_signing(9)
    raw = builder.manifest(2, previous_root=old_root)
    got = verify_manifest(raw, node="jp", pinned=pinned, expected_fingerprint=None, now=T0)
    assert got.root_public == bytes(builder.root.verify_key)
    assert got.previous_root_public == bytes(old_root.verify_key)


def test_node_for_another_node_is_refused() -> None:
    builder = Builder(node="pk")
    raw = builder.manifest()
    fp = fingerprint(bytes(builder.root.verify_key))
    with pytest.raises(ManifestRejected) as caught:
        verify_manifest(raw, node="jp", pinned=None, expected_fingerprint=fp, now=T0)
    assert caught.value.check == "manifest-node"


def test_manifest_issued_in_the_future_is_refused() -> None:
    builder = Builder()
    raw = builder.manifest(issued=T0 + timedelta(hours=1))
    fp = fingerprint(bytes(builder.root.verify_key))
    with pytest.raises(ManifestRejected) as caught:
        verify_manifest(raw, node="jp", pinned=None, expected_fingerprint=fp, now=T0)
    assert caught.value.check == "manifest-future"


# -- key lookups -------------------------------------------------------------------------


def _manifest_with_rotation() -> tuple[KeyManifest, str, str, str]:
    """v2: the first signing key retired at T0+10d, a second one current, one encryption key revoked."""
    builder = Builder()
    old_sign = bytes(builder.sign.verify_key)
    new_sign = bytes(seeded_signing(5).verify_key)
    box_pub = bytes(builder.box.public_key)
    box2_pub = bytes(seeded_box(6).public_key)
    rotated = T0 + timedelta(days=10)
    keys = [
        ManifestKey(key_id(old_sign), "sign", old_sign, T0, rotated),
        ManifestKey(key_id(box_pub), "encrypt", box_pub, T0, rotated),
        ManifestKey(key_id(new_sign), "sign", new_sign, rotated, rotated + YEAR),
        ManifestKey(key_id(box2_pub), "encrypt", box2_pub, rotated, rotated + YEAR),
    ]
    raw = builder.manifest(
        2,
        issued=rotated,
        keys=keys,
        revocations=[Revocation(key_id(box_pub), rotated, "laptop lost")],
    )
    return parse_manifest(raw), key_id(old_sign), key_id(new_sign), key_id(box2_pub)


@pytest.mark.parametrize(
    ("which", "at_days", "usable"),
    [
        ("old", 5, True),  # signed inside its window
        ("old", 10, False),  # window ended at rotation
        ("old", -1, False),  # before its window
        ("new", 5, False),
        ("new", 11, True),
    ],
)
def test_signing_key_respects_window(which: str, at_days: int, usable: bool) -> None:
    manifest, old_id, new_id, _ = _manifest_with_rotation()
    kid = old_id if which == "old" else new_id
    at = T0 + timedelta(days=at_days)
    if usable:
        assert bytes(manifest.signing_key(kid, at=at)) == manifest.key(kid).public
    else:
        with pytest.raises(KeyNotUsable) as caught:
            manifest.signing_key(kid, at=at)
        assert caught.value.check == "signing-key"


def test_signing_key_refuses_unknown_and_encryption_ids() -> None:
    manifest, _, _, box2 = _manifest_with_rotation()
    with pytest.raises(KeyNotUsable, match="not in the key manifest"):
        manifest.signing_key("00" * 8, at=T0)
    with pytest.raises(KeyNotUsable, match="not a signing key"):
        manifest.signing_key(box2, at=T0 + timedelta(days=11))


def test_current_keys_are_the_newest_valid_ones() -> None:
    manifest, old_id, new_id, box2 = _manifest_with_rotation()
    later = T0 + timedelta(days=11)
    assert manifest.current_signing_key(now=later).key_id == new_id
    assert manifest.current_encryption_key(now=later).key_id == box2
    assert manifest.current_signing_key(now=T0 + timedelta(days=1)).key_id == old_id


def test_revoked_encryption_key_is_not_usable_and_never_current() -> None:
    manifest, _, _, _ = _manifest_with_rotation()
    revoked = manifest.revocations[0].key_id
    with pytest.raises(KeyNotUsable) as caught:
        manifest.encryption_key(revoked)
    assert caught.value.check == "encryption-key"
    with pytest.raises(KeyNotUsable):
        manifest.current_encryption_key(now=T0 + timedelta(days=1))


def test_no_current_key_after_expiry_is_named() -> None:
    manifest, *_ = _manifest_with_rotation()
    with pytest.raises(KeyNotUsable, match="no usable sign key"):
        manifest.current_signing_key(now=T0 + 3 * YEAR)


# -- keyring -----------------------------------------------------------------------------


def test_keyring_signs_over_tagged_payload_and_verifies_with_manifest() -> None:
    builder = Builder()
    manifest = parse_manifest(builder.manifest())
    ring = NodeKeyring(
        node="jp",
        manifest=manifest,
        signing_key_id=key_id(bytes(builder.sign.verify_key)),
        signing_key=builder.sign,
        encryption_keys={key_id(bytes(builder.box.public_key)): builder.box},
    )
    signature = ring.sign(Purpose.RECEIPT, b"hello")
    verify = manifest.signing_key(ring.signing_key_id, at=T0)
    assert verify.verify(tagged(Purpose.RECEIPT, b"hello"), signature) == tagged(
        Purpose.RECEIPT, b"hello"
    )
    assert ring.current_encryption_key_id == key_id(bytes(builder.box.public_key))


def test_keyring_repr_holds_no_private_material() -> None:
    builder = Builder()
    ring = NodeKeyring(
        node="jp",
        manifest=parse_manifest(builder.manifest()),
        signing_key_id=key_id(bytes(builder.sign.verify_key)),
        signing_key=builder.sign,
        encryption_keys={key_id(bytes(builder.box.public_key)): builder.box},
    )
    text = repr(ring) + str(ring)
    for secret in (bytes(builder.sign), bytes(builder.box)):
        assert secret.hex() not in text
        assert base64.b64encode(secret).decode() not in text
        assert repr(secret) not in text


def test_keyring_refuses_a_private_key_that_does_not_match_the_manifest() -> None:
    builder = Builder()
    with pytest.raises(KeyNotUsable, match="does not match"):
        NodeKeyring(
            node="jp",
            manifest=parse_manifest(builder.manifest()),
            signing_key_id=key_id(bytes(builder.sign.verify_key)),
            signing_key=seeded_signing(77),
            encryption_keys={},
        )


# -- malformed manifests -----------------------------------------------------------------


def _document(payload: dict[str, object]) -> bytes:
    body = canonical_bytes(payload)
    return sign_manifest(body, [seeded_signing(1)])


def _good_payload() -> dict[str, object]:
    return json.loads(parse_manifest(Builder().manifest()).payload_bytes)


def _mutations() -> list[tuple[str, object]]:
    def drop(key: str) -> object:
        def change(p: dict[str, object]) -> None:
            del p[key]

        return change

    def put(key: str, value: object) -> object:
        def change(p: dict[str, object]) -> None:
            p[key] = value

        return change

    def key_field(name: str, value: object) -> object:
        def change(p: dict[str, object]) -> None:
            keys = p["keys"]
            assert isinstance(keys, list)
            keys[0][name] = value

        return change

    def duplicate_key(p: dict[str, object]) -> None:
        keys = p["keys"]
        assert isinstance(keys, list)
        keys.append(dict(keys[0]))

    return [
        ("missing version", drop("version")),
        ("unknown field", put("extra", 1)),
        ("version zero", put("version", 0)),
        ("version is bool", put("version", True)),
        ("version as text", put("version", "2")),
        ("bad time", put("issued_at", "2026-11-25 12:00:00")),
        ("expires before issued", put("expires_at", "2026-11-24T00:00:00Z")),
        ("wrong type", put("type", "other")),
        ("node uppercase", put("node", "JP")),
        ("no keys", put("keys", [])),
        ("key id mismatch", key_field("key_id", "00" * 8)),
        ("short public", key_field("public", base64.b64encode(b"x" * 31).decode())),
        ("bad use", key_field("use", "both")),
        ("window after expiry", key_field("not_after", "2030-01-01T00:00:00Z")),
        ("empty window", key_field("not_after", "2026-11-25T12:00:00Z")),
        ("duplicate key id", duplicate_key),
        (
            "revocation of unknown key",
            put(
                "revocations",
                [{"key_id": "00" * 8, "revoked_at": "2026-11-25T12:00:00Z", "reason": "x"}],
            ),
        ),
    ]


@pytest.mark.parametrize(("name", "mutate"), _mutations(), ids=[n for n, _ in _mutations()])
def test_malformed_payload_is_refused_as_format(name: str, mutate: object) -> None:
    payload = _good_payload()
    assert callable(mutate)
    mutate(payload)
    with pytest.raises(ManifestRejected) as caught:
        parse_manifest(_document(payload))
    assert caught.value.check == "manifest-format", name


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[]",
        b"{}",
        b'{"format":"ssw-gateway/key-manifest/v1","payload":"","signatures":[]}',
        b" " + b"{}",
        b"x" * 70000,
        b"[" * 100 + b"]" * 100,
    ],
    ids=["empty", "list", "empty-object", "no-signatures", "not-canonical", "too-big", "too-deep"],
)
def test_garbage_documents_are_refused_as_format(raw: bytes) -> None:
    with pytest.raises(ManifestRejected) as caught:
        parse_manifest(raw)
    assert caught.value.check == "manifest-format"


def test_all_keys_revoked_is_refused() -> None:
    builder = Builder()
    keys = builder.keys()
    with pytest.raises(ManifestRejected, match="no unrevoked sign key"):
        builder.manifest(keys=keys, revocations=[Revocation(keys[0].key_id, T0, "compromised")])
