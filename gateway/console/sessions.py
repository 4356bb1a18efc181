"""Console sessions: a token sign-in once, then a cookie the server can end.

The cookie holds 32 random bytes; the server keeps only their SHA-256, with
the user, the token id it signed in with, a CSRF token, the viewer's
language and zone, and the expiry. Sign-out deletes the record, so a copy of
the cookie taken earlier opens nothing afterwards. Every request re-reads the
user: disabled, or given a new token, and the session ends.

In memory on purpose: a restart of the node ends every session (the
officers sign in again), and no session secret ever reaches the database or
a backup. Time is a parameter (``now``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from gateway.core.roles import Role

__all__ = ["SESSION_LIFETIME", "ConsoleSession", "SessionStore", "csrf_matches"]

SESSION_LIFETIME = timedelta(hours=8)
"""A session ends this long after sign-in, whatever happens (a working day)."""

IDLE_LIFETIME = timedelta(minutes=30)
"""... or after this long without a request."""

MAX_SESSIONS = 10_000
"""Beyond this many live sessions, the oldest is ended (bounded memory)."""


def _digest(cookie: str) -> bytes:
    return hashlib.sha256(b"ssw-gateway/console-session/v1\x00" + cookie.encode()).digest()


def csrf_matches(expected: str, offered: str | None) -> bool:
    """Constant-time comparison of a form's CSRF token with the session's."""
    if not offered:
        return False
    return hmac.compare_digest(expected.encode(), offered.encode())


@dataclass
class ConsoleSession:
    """One signed-in viewer."""

    user: str
    role: Role
    token_id: str
    csrf: str
    created_at: datetime
    expires_at: datetime
    last_seen: datetime
    lang: str = "en"
    zone: str = "UTC"
    notes: list[str] = field(default_factory=list)


class SessionStore:
    """Live sessions, by the digest of their cookie (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[bytes, ConsoleSession] = {}

    def create(
        self, *, user: str, role: Role, token_id: str, now: datetime, lang: str = "en"
    ) -> tuple[str, ConsoleSession]:
        """A new session; returns the cookie value (shown once) and the record."""
        cookie = secrets.token_urlsafe(32)
        made = ConsoleSession(
            user=user,
            role=role,
            token_id=token_id,
            csrf=secrets.token_urlsafe(32),
            created_at=now,
            expires_at=now + SESSION_LIFETIME,
            last_seen=now,
            lang=lang,
        )
        with self._lock:
            if len(self._sessions) >= MAX_SESSIONS:
                oldest = min(self._sessions, key=lambda k: self._sessions[k].last_seen)
                del self._sessions[oldest]
            self._sessions[_digest(cookie)] = made
        return cookie, made

    def find(self, cookie: str | None, *, now: datetime) -> ConsoleSession | None:
        """The live session of ``cookie``, or None (unknown, ended, expired, idle)."""
        if not cookie or len(cookie) > 128:
            return None
        key = _digest(cookie)
        with self._lock:
            found = self._sessions.get(key)
            if found is None:
                return None
            if now >= found.expires_at or now - found.last_seen >= IDLE_LIFETIME:
                del self._sessions[key]
                return None
            found.last_seen = now
            return found

    def end(self, cookie: str | None) -> bool:
        """End the session of ``cookie``; True if there was one."""
        if not cookie:
            return False
        with self._lock:
            return self._sessions.pop(_digest(cookie), None) is not None

    def end_user(self, user: str) -> int:
        """End every session of ``user``; returns how many."""
        with self._lock:
            keys = [k for k, s in self._sessions.items() if s.user == user]
            for key in keys:
                del self._sessions[key]
            return len(keys)
