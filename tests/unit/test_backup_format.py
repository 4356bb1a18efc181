"""The backup archive's pure rules: member names, trailer, sealing, manifest bounds."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nacl.pwhash
import pytest

from gateway.core.backup import (
    NONCE_BYTES,
    SALT_BYTES,
    TRAILER_BYTES,
    ArchiveFile,
    BackupDamaged,
    BackupManifest,
    Trailer,
    archive_mac,
    check_archive,
    check_member_path,
    derive_keys,
    looks_like_plain_private_key,
    open_sealed,
    parse_manifest,
    parse_trailer,
    seal_file,
)
from gateway.core.canonical import canonical_bytes

OPS, MEM = nacl.pwhash.argon2id.OPSLIMIT_MIN, nacl.pwhash.argon2id.MEMLIMIT_MIN
SALT = bytes(range(SALT_BYTES))
KEYS = derive_keys(b"a passphrase for tests", SALT, OPS, MEM)


@pytest.mark.parametrize(
    "name",
    [
        "home/../etc/passwd",
        "../home/x",
        "/home/x",
        "home//x",
        "home/./x",
        "home/",
        "home",
        "database/../../x",
        "home/a\\b",
        "home/a\x00b",
        "home/a b",
        "other/x",
        "home/" + "a" * 1100,
        "",
        7,
    ],
)
def test_member_names_that_could_leave_the_folder_are_refused(name: object) -> None:
    with pytest.raises(BackupDamaged):
        check_member_path(name)


@pytest.mark.parametrize(
    "name",
    [
        "home/gateway.toml",
        "home/keys/operational.key",
        "home/data/blobs/envelopes/ab/" + "ab" * 32,
        "database/gateway.sqlite3",
    ],
)
def test_member_names_of_a_node_home_are_accepted(name: str) -> None:
    assert check_member_path(name) == name


def test_trailer_round_trips_at_its_fixed_length() -> None:
    trailer = Trailer(SALT, OPS, MEM, b"\x01" * 32, b"\x02" * 32)
    data = trailer.to_bytes()
    assert len(data) == TRAILER_BYTES
    assert parse_trailer(data) == trailer


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: t.replace(b"backup/v1", b"backup/v2"),
        lambda t: t[:-1],
        lambda t: t + b" ",
        lambda t: t.replace(b" 0000000001 ", b" 9999999999 "),
        lambda t: t.replace(b" 000000008192 ", b" 999999999999 "),
        lambda t: t.upper(),
    ],
)
def test_a_malformed_or_unbounded_trailer_is_refused(mutate: object) -> None:
    data = Trailer(SALT, OPS, MEM, b"\x01" * 32, b"\x02" * 32).to_bytes()
    with pytest.raises(BackupDamaged):
        parse_trailer(mutate(data))  # type: ignore[operator]


def test_hash_then_mac_tell_damage_from_another_passphrase() -> None:
    body = hashlib.sha256(b"archive body").digest()
    trailer = Trailer(SALT, OPS, MEM, body, archive_mac(KEYS, body))
    check_archive(trailer, body, KEYS)
    with pytest.raises(BackupDamaged) as damaged:
        check_archive(trailer, hashlib.sha256(b"other body").digest(), KEYS)
    assert damaged.value.check == "archive-hash"
    other = derive_keys(b"another passphrase!", SALT, OPS, MEM)
    with pytest.raises(BackupDamaged) as forged:
        check_archive(trailer, body, other)
    assert forged.value.check == "archive-mac"


def test_a_sealed_file_opens_only_at_its_own_path_with_its_own_key() -> None:
    secret = b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI...\n-----END PRIVATE KEY-----\n"
    sealed = seal_file(KEYS, "home/keys/tls/node.key", secret, nonce=b"\x07" * NONCE_BYTES)
    assert secret not in sealed
    assert open_sealed(KEYS, "home/keys/tls/node.key", sealed) == secret
    with pytest.raises(BackupDamaged):
        open_sealed(KEYS, "home/keys/tls/other.key", sealed)
    with pytest.raises(BackupDamaged):
        open_sealed(
            derive_keys(b"another passphrase!", SALT, OPS, MEM), "home/keys/tls/node.key", sealed
        )
    flipped = bytearray(sealed)
    flipped[-1] ^= 1
    with pytest.raises(BackupDamaged):
        open_sealed(KEYS, "home/keys/tls/node.key", bytes(flipped))


@pytest.mark.parametrize(
    ("head", "private"),
    [
        (b"-----BEGIN PRIVATE KEY-----\nabc", True),
        (b"-----BEGIN EC PRIVATE KEY-----\nabc", True),
        (b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nabc", True),
        (b"-----BEGIN CERTIFICATE-----\nabc", False),
        (b'{"format": "ssw-gateway/keystore/v1"}', False),
    ],
)
def test_pem_private_keys_are_recognised_for_sealing(head: bytes, private: bool) -> None:
    assert looks_like_plain_private_key(head) is private


def _manifest(**change: object) -> bytes:
    entry = ArchiveFile("home/gateway.toml", 3, "0" * 64, 0o600, sealed=False)
    database = ArchiveFile("database/gateway.sqlite3", 3, "1" * 64, 0o600, sealed=False)
    doc = {
        "format": "ssw-gateway/backup/v1",
        "node": "jp",
        "created_at": "2026-11-29T00:00:00Z",
        "software_version": "0.1.0",
        "engine": "sqlite",
        "database": database.to_dict(),
        "files": [entry.to_dict()],
        "not_archived": [],
    }
    doc.update(change)
    return canonical_bytes(doc)


def test_a_well_formed_manifest_parses() -> None:
    manifest = parse_manifest(_manifest())
    assert isinstance(manifest, BackupManifest)
    assert set(manifest.members()) == {"home/gateway.toml", "database/gateway.sqlite3"}


@pytest.mark.parametrize(
    "change",
    [
        {"format": "ssw-gateway/backup/v0"},
        {"node": "us"},
        {"engine": "mysql"},
        {"extra": 1},
        {
            "files": [
                {"path": "home/../x", "size": 1, "sha256": "0" * 64, "mode": 384, "sealed": False}
            ]
        },
        {
            "files": [
                {"path": "home/a", "size": -1, "sha256": "0" * 64, "mode": 384, "sealed": False}
            ]
        },
        {
            "files": [
                {"path": "home/a", "size": 1, "sha256": "0" * 64, "mode": 4096, "sealed": False}
            ]
        },
        {
            "files": [
                {"path": "home/a", "size": 1, "sha256": "0" * 64, "mode": 384, "sealed": False}
            ]
            * 2
        },
        {
            "files": [
                {"path": "database/x", "size": 1, "sha256": "0" * 64, "mode": 384, "sealed": False}
            ]
        },
        {
            "database": {
                "path": "home/db",
                "size": 1,
                "sha256": "0" * 64,
                "mode": 384,
                "sealed": False,
            }
        },
    ],
)
def test_a_manifest_breaking_a_rule_is_refused(change: dict[str, object]) -> None:
    with pytest.raises(BackupDamaged):
        parse_manifest(_manifest(**change))


def test_restore_reads_a_private_copy_so_a_swapped_archive_changes_nothing(
    tmp_path: Path,
) -> None:
    """Restore verifies and parses one anonymous copy through one handle: an archive
    rewritten or swapped on its (shared) storage after the check is never read."""
    from gateway.node.backup import _private_copy  # noqa: PLC0415

    archive = tmp_path / "node.backup"
    archive.write_bytes(b"verified bytes" * 1000)
    folder = tmp_path / "restore-here"
    folder.mkdir()
    with _private_copy(archive, folder) as copy:
        archive.write_bytes(b"forged after the check")
        swapped = tmp_path / "other"
        swapped.write_bytes(b"another archive")
        swapped.replace(archive)
        assert copy.read() == b"verified bytes" * 1000
        assert list(folder.iterdir()) == []  # anonymous: nothing to find or swap
    assert list(folder.iterdir()) == []
