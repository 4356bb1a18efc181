"""User tokens: high entropy, shown once, stored only as a hash.

A token reads ``ssw_<token id>_<secret>``: the id (8 random bytes, hex) finds
the user's row; the secret (32 random bytes, base64url) is checked against the
stored hash in constant time. Tokens carry 256 bits of entropy, so a plain
domain-separated SHA-256 is the right hash (a slow password hash buys nothing
here and would slow every request).
"""

from __future__ import annotations

import base64
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from gateway.core.domain import Purpose, tagged_sha256
from gateway.errors import AccessDenied

__all__ = ["IssuedToken", "issue_token", "parse_token", "token_hash", "token_matches"]

_PREFIX = "ssw"
_ID_BYTES = 8
_SECRET_BYTES = 32
_TOKEN = re.compile(r"^ssw_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A token just made: ``text`` is shown to the user once, then forgotten."""

    token_id: str
    text: str
    digest: bytes

    def __repr__(self) -> str:
        return f"IssuedToken(token_id={self.token_id!r}, text=[redacted])"


def token_hash(token_id: str, secret: str) -> bytes:
    return tagged_sha256(Purpose.USER_TOKEN, f"{token_id}:{secret}".encode("ascii"))


def issue_token(*, _random: Callable[[int], bytes] = secrets.token_bytes) -> IssuedToken:
    token_id = _random(_ID_BYTES).hex()
    secret = base64.urlsafe_b64encode(_random(_SECRET_BYTES)).rstrip(b"=").decode("ascii")
    return IssuedToken(
        token_id=token_id,
        text=f"{_PREFIX}_{token_id}_{secret}",
        digest=token_hash(token_id, secret),
    )


def parse_token(text: str) -> tuple[str, str]:
    """Split a presented token into (token id, secret); refuse anything malformed."""
    match = _TOKEN.fullmatch(text.strip())
    if match is None:
        raise AccessDenied("the token is malformed", reason="access.token")
    return match.group(1), match.group(2)


def token_matches(stored_digest: bytes, token_id: str, secret: str) -> bool:
    """Constant-time comparison of a presented secret with the stored hash."""
    return hmac.compare_digest(stored_digest, token_hash(token_id, secret))
