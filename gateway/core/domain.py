"""Domain separation: every signature and hash carries a versioned purpose tag.

A signature made for one purpose can never be replayed as another: the signed
message is ``b"ssw-gateway/<purpose>/v<N>" || 0x00 || payload``.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

__all__ = ["SHA256_HEX", "Purpose", "tagged", "tagged_sha256"]

SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")
"""A SHA-256 digest as the wire and the ledger write it: 64 lowercase hex digits
(use with ``fullmatch``)."""


class Purpose:
    """The purpose tags in use; each is fixed once published."""

    KEY_MANIFEST: Final = b"ssw-gateway/key-manifest/v1"
    KEY_ID: Final = b"ssw-gateway/key-id/v1"
    ENVELOPE_HEADER: Final = b"ssw-gateway/envelope/v1"
    CONTENT_KEY_COMMITMENT: Final = b"ssw-gateway/content-key-commitment/v1"
    RECEIPT: Final = b"ssw-gateway/receipt/v1"
    PEER_REQUEST: Final = b"ssw-gateway/peer-request/v1"
    LEDGER_ENTRY: Final = b"ssw-gateway/ledger-entry/v1"
    CHECKPOINT: Final = b"ssw-gateway/checkpoint/v1"
    CONSENT: Final = b"ssw-gateway/consent/v1"
    KEYSTORE: Final = b"ssw-gateway/keystore/v1"
    USER_TOKEN: Final = b"ssw-gateway/user-token/v1"
    BACKUP: Final = b"ssw-gateway/backup/v1"
    FILE_MAC_KEY: Final = b"ssw-gateway/file-mac-key/v1"
    FILE_MAC: Final = b"ssw-gateway/file-mac/v1"


def tagged(purpose: bytes, payload: bytes) -> bytes:
    """The bytes actually signed or hashed for ``purpose``."""
    if b"\x00" in purpose:
        raise ValueError("purpose tags contain no NUL byte")
    return purpose + b"\x00" + payload


def tagged_sha256(purpose: bytes, payload: bytes) -> bytes:
    """SHA-256 over the tagged payload."""
    return hashlib.sha256(tagged(purpose, payload)).digest()
