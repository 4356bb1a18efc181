"""Keyed fingerprints of decrypted files, for metadata that must not reveal content.

The ledger records what a disclosure handed over, and compliance officers
read and export the ledger: they see metadata, never case contents (SPEC §2).
A plain SHA-256 of a small case file lets anyone who can guess the case
confirm the guess, and an attachment's name is itself content. So the
ledger names each file by its position (bundle id, ``case`` or
``attachment`` and index) and size, and fingerprints it with
HMAC-SHA-256 under a key derived from the node's operational signing key,
which only the process holding the unlocked keyring has:

    key = HMAC-SHA-256(signing seed, "ssw-gateway/file-mac-key/v1" || 0x00)
    mac = HMAC-SHA-256(key, "ssw-gateway/file-mac/v1" || 0x00 || SHA-256(file))

The node (and no one without its keys) can recompute a MAC from a file to
match a package against its ledger entry; the package's ``disclosure.json``
carries the same MACs beside the names and plain hashes its recipient needs.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from gateway.core.domain import Purpose, tagged

__all__ = ["DisclosedFile", "file_mac", "file_mac_key", "files_record"]

Part = Literal["case", "attachment"]


@dataclass(frozen=True, slots=True)
class DisclosedFile:
    """One decrypted file handed over: where it sits in its bundle, not what it is called."""

    bundle_id: str
    part: Part
    index: int
    """0 for the case; the attachment's position in the envelope otherwise."""
    size: int
    """Bytes."""
    sha256: str
    """Hex SHA-256 of the bytes handed over (kept out of the ledger)."""


def file_mac_key(signing_seed: bytes) -> bytes:
    """The 32-byte MAC key derived from a 32-byte Ed25519 seed (``ValueError`` otherwise)."""
    if len(signing_seed) != 32:
        raise ValueError("the file MAC key is derived from a 32-byte signing seed")
    return hmac.new(signing_seed, tagged(Purpose.FILE_MAC_KEY, b""), hashlib.sha256).digest()


def file_mac(key: bytes, sha256_hex: str) -> str:
    """Hex HMAC-SHA-256 of a file, given the hex SHA-256 of its bytes."""
    digest = bytes.fromhex(sha256_hex)
    if len(digest) != 32:
        raise ValueError("sha256_hex must be 64 hex digits")
    return hmac.new(key, tagged(Purpose.FILE_MAC, digest), hashlib.sha256).hexdigest()


def files_record(files: Sequence[DisclosedFile], *, key: bytes, key_id: str) -> dict[str, Any]:
    """The ledger's view of disclosed files: positions, sizes and keyed MACs only.

    ``{"files_mac_key_id": key_id, "files": [{"bundle_id", "part", "index",
    "bytes", "hmac_sha256"}, ...]}`` in bundle, part and index order.
    """
    ordered = sorted(files, key=lambda f: (f.bundle_id, f.part != "case", f.index))
    return {
        "files_mac_key_id": key_id,
        "files": [
            {
                "bundle_id": f.bundle_id,
                "part": f.part,
                "index": f.index,
                "bytes": f.size,
                "hmac_sha256": file_mac(key, f.sha256),
            }
            for f in ordered
        ],
    }
