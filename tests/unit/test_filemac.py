"""Keyed file fingerprints: what the ledger records of disclosed files."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from gateway.core.filemac import DisclosedFile, file_mac, file_mac_key, files_record

SEED = bytes(range(32))
CASE = b'{"description":"a case someone could guess"}'
SHA = hashlib.sha256(CASE).hexdigest()


def test_mac_is_keyed_and_purpose_tagged() -> None:
    key = file_mac_key(SEED)
    expected_key = hmac.new(SEED, b"ssw-gateway/file-mac-key/v1\x00", hashlib.sha256).digest()
    assert key == expected_key
    expected = hmac.new(
        key, b"ssw-gateway/file-mac/v1\x00" + bytes.fromhex(SHA), hashlib.sha256
    ).hexdigest()
    assert file_mac(key, SHA) == expected
    assert file_mac(key, SHA) != SHA
    assert file_mac(file_mac_key(bytes(32)), SHA) != file_mac(key, SHA)


@pytest.mark.parametrize(
    ("seed", "sha"),
    [(b"short", SHA), (SEED, "ab"), (SEED, SHA + "00")],
    ids=["seed-too-short", "digest-too-short", "digest-too-long"],
)
def test_wrong_sizes_are_refused(seed: bytes, sha: str) -> None:
    with pytest.raises(ValueError, match=r"32-byte|64 hex"):
        file_mac(file_mac_key(seed), sha)


def test_record_names_positions_and_sizes_never_names_or_plain_hashes() -> None:
    files = [
        DisclosedFile("b-1", "attachment", 1, 10, SHA),
        DisclosedFile("b-1", "case", 0, len(CASE), SHA),
        DisclosedFile("b-0", "attachment", 0, 3, SHA),
    ]
    record = files_record(files, key=file_mac_key(SEED), key_id="k1")
    assert record["files_mac_key_id"] == "k1"
    assert [(f["bundle_id"], f["part"], f["index"]) for f in record["files"]] == [
        ("b-0", "attachment", 0),
        ("b-1", "case", 0),
        ("b-1", "attachment", 1),
    ]
    assert SHA not in repr(record)
    assert {tuple(sorted(f)) for f in record["files"]} == {
        ("bundle_id", "bytes", "hmac_sha256", "index", "part")
    }
