"""Users of a node: creation, listing, disabling, and token authentication.

One authorization layer serves the CLI and the local API alike:
:func:`authenticate` turns a presented token into an :class:`Actor`, and
:func:`authorize` adds the role check of :mod:`gateway.core.roles`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.core.roles import Actor, Role, authorize_role
from gateway.core.tokens import IssuedToken, issue_token, parse_token, token_hash, token_matches
from gateway.errors import AccessDenied, AlreadyExists, InvalidInput, NotFound
from gateway.log import get_logger
from gateway.node import ledger
from gateway.store.models_users import UserRecord

__all__ = [
    "NewUser",
    "UserView",
    "add_user",
    "authenticate",
    "authorize",
    "check_new_user",
    "disable_user",
    "is_approver",
    "list_users",
    "record_user_added",
    "reissue_token",
    "rotate_own_token",
    "set_approver",
    "token_issued_by",
]

_NAME = re.compile(r"^[a-z0-9][a-z0-9._@-]{0,63}$")
# Compared against when the token id is unknown, so both paths cost the same.
_DUMMY_DIGEST = token_hash("0" * 16, "x" * 43)
_log = get_logger("users")


@dataclass(frozen=True)
class UserView:
    name: str
    role: str
    created_at: datetime
    created_by: str
    disabled: bool
    approver: bool = False
    token_issued_by: str = ""
    """Who issued the user's current token (the user themself after a rotation)."""

    def to_dict(self) -> dict[str, Any]:
        """One row of ``gateway users list`` and ``GET /api/v1/users`` (never a token)."""
        return {
            "name": self.name,
            "role": self.role,
            "created_at": self.created_at,
            "created_by": self.created_by,
            "disabled": self.disabled,
            "approver": self.approver,
            "token_issued_by": self.token_issued_by,
        }


@dataclass(frozen=True)
class NewUser:
    name: str
    role: Role
    token: IssuedToken
    approver: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The answer to adding a user; it holds the token, shown this once."""
        return {
            "name": self.name,
            "role": self.role.value,
            "approver": self.approver,
            "token": self.token.text,
        }


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise InvalidInput(
            f"user name {name!r} is not allowed: use 1-64 lower-case letters, digits, '.', '_', '@', '-'"
        )
    return name


def _role(role: str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise InvalidInput(f"role must be admin, officer or compliance, not {role!r}") from None


def check_new_user(session: Session, name: str) -> None:
    """Refuse a name :func:`add_user` would refuse (malformed, or taken); add nothing."""
    _check_name(name)
    if session.scalar(select(UserRecord.id).where(UserRecord.name == name)) is not None:
        raise AlreadyExists(f"user {name!r} exists already")


def _check_approver_role(name: str, role: str) -> None:
    if role != Role.OFFICER.value:
        raise InvalidInput(
            f"only officers hold the approver capability; {name} is {role}: "
            "give it to an officer instead"
        )


def add_user(
    session: Session,
    name: str,
    role: str,
    *,
    created_by: str,
    now: datetime,
    approver: bool = False,
) -> NewUser:
    """Create a user and its first token (the caller shows the token once).

    ``approver`` gives an officer the approver capability (consent grants
    under the two-person rule, docs/consent.md); refused (:class:`InvalidInput`)
    for another role. The first token counts as issued by ``created_by``
    (``token_issued_by``): under k > 1 its holder's approvals count only after
    ``gateway users rotate-token``. The creation is recorded in the ledger
    (:func:`record_user_added`) by the caller, which knows the acting user.
    """
    _check_name(name)
    chosen = _role(role)
    if approver:
        _check_approver_role(name, chosen.value)
    if session.scalar(select(UserRecord.id).where(UserRecord.name == name)) is not None:
        raise AlreadyExists(f"user {name!r} exists already")
    token = issue_token()
    session.add(
        UserRecord(
            name=name,
            role=chosen.value,
            token_id=token.token_id,
            token_hash=token.digest,
            created_at=now,
            created_by=created_by,
            token_issued_at=now,
            token_issued_by=created_by,
            approver=approver,
        )
    )
    session.flush()
    _log.info("user_added", user=name, role=chosen.value, approver=approver, by=created_by)
    return NewUser(name=name, role=chosen, token=token, approver=approver)


def record_user_added(session: Session, made: NewUser, *, actor: Actor, now: datetime) -> None:
    """Ledger entry ``user-added``: body ``{"user", "role", "approver", "by"}``, actor
    ``actor`` (who added the user: the administrator, or the deciding approver of a
    ``users-add-admin`` proposal). Never the token."""
    ledger.record_event(
        session,
        kind="user-added",
        actor=actor,
        now=now,
        body={
            "user": made.name,
            "role": made.role.value,
            "approver": made.approver,
            "by": actor.name,
        },
    )


def _replace_token(user: UserRecord, *, now: datetime, issued_by: str) -> IssuedToken:
    token = issue_token()
    user.token_id = token.token_id
    user.token_hash = token.digest
    user.token_issued_at = now
    user.token_issued_by = issued_by
    return token


def reissue_token(session: Session, name: str, *, now: datetime, by: Actor) -> IssuedToken:
    """An administrator replaces user ``name``'s token: the old one stops working at once.

    The new token counts as issued by ``by`` (``token_issued_by``), so under
    k > 1 its holder's approvals do not count until they run ``gateway users
    rotate-token`` (docs/consent.md, "Approvals"): an administrator who learns
    the token cannot approve in that user's name. Ledger: ``token-reissued``
    (body ``{"user", "by"}``, actor ``by``; never the token). Raises
    :class:`NotFound` for an unknown user.
    """
    user = _get(session, name)
    token = _replace_token(user, now=now, issued_by=by.name)
    ledger.record_event(
        session, kind="token-reissued", actor=by, now=now, body={"user": name, "by": by.name}
    )
    _log.info("user_token_reissued", user=name, by=by.name)
    return token


def rotate_own_token(session: Session, actor: Actor, *, now: datetime) -> IssuedToken:
    """``gateway users rotate-token``: the acting user replaces their own token.

    The old token stops working when this transaction commits; the new one
    counts as issued by the user themself (``token_issued_by = actor.name``),
    which is what makes their approvals count under k > 1. Ledger:
    ``token-rotated`` (body ``{"user"}``, actor the user; never the token).
    Raises :class:`NotFound` when the actor is not a user of this node, and
    :class:`AccessDenied` for a disabled one.
    """
    user = _get(session, actor.name)
    if user.disabled_at is not None:
        raise AccessDenied(f"user {actor.name!r} is disabled", reason="access.disabled")
    token = _replace_token(user, now=now, issued_by=actor.name)
    ledger.record_event(
        session, kind="token-rotated", actor=actor, now=now, body={"user": actor.name}
    )
    _log.info("user_token_rotated", user=actor.name)
    return token


def disable_user(session: Session, name: str, *, now: datetime, by: Actor) -> None:
    """Disable a user: its token is refused from now on. Idempotent.

    Ledger: ``user-disabled`` (body ``{"user", "by"}``, actor ``by``) when it
    changes anything. Raises :class:`NotFound` for an unknown user.
    """
    user = _get(session, name)
    if user.disabled_at is None:
        user.disabled_at = now
        ledger.record_event(
            session, kind="user-disabled", actor=by, now=now, body={"user": name, "by": by.name}
        )
    _log.info("user_disabled", user=name, by=by.name)


def set_approver(session: Session, name: str, on: bool, *, now: datetime, by: Actor) -> bool:
    """Give (``on``) or take the approver capability of officer ``name``.

    Recorded in the ledger (``approver-changed``, body ``{"user", "approver"}``,
    actor ``by``) when it changes anything; returns whether it did. Taking it
    away makes the officer's earlier approvals of pending consent-grant
    proposals stop counting (:mod:`gateway.node.approvals`). Raises
    :class:`NotFound` for an unknown user and :class:`InvalidInput` for one
    who is not an officer.
    """
    user = _get(session, name)
    if on:
        _check_approver_role(name, user.role)
    if user.approver == on:
        return False
    user.approver = on
    ledger.record_event(
        session,
        kind="approver-changed",
        actor=by,
        now=now,
        body={"user": name, "approver": on},
    )
    _log.info("user_approver_changed", user=name, approver=on, by=by.name)
    return True


def token_issued_by(session: Session, name: str) -> str | None:
    """Who issued user ``name``'s current token; ``None`` for an unknown user."""
    return session.scalar(select(UserRecord.token_issued_by).where(UserRecord.name == name))


def is_approver(session: Session, name: str) -> bool:
    """True when ``name`` is an enabled officer holding the approver capability."""
    user = session.scalar(select(UserRecord).where(UserRecord.name == name))
    return (
        user is not None
        and user.disabled_at is None
        and user.role == Role.OFFICER.value
        and user.approver
    )


def list_users(session: Session) -> list[UserView]:
    rows = session.scalars(select(UserRecord).order_by(UserRecord.name)).all()
    return [
        UserView(
            name=row.name,
            role=row.role,
            created_at=row.created_at,
            created_by=row.created_by,
            disabled=row.disabled_at is not None,
            approver=row.approver,
            token_issued_by=row.token_issued_by,
        )
        for row in rows
    ]


def authenticate(session: Session, token_text: str | None) -> Actor:
    """The actor a token belongs to; refuse a missing, wrong or disabled one."""
    if not token_text:
        raise AccessDenied(
            "no user token: set GATEWAY_TOKEN or pass --token-file", reason="access.no-token"
        )
    token_id, secret = parse_token(token_text)
    user = session.scalar(select(UserRecord).where(UserRecord.token_id == token_id))
    digest = user.token_hash if user is not None else _DUMMY_DIGEST
    if not token_matches(digest, token_id, secret) or user is None:
        raise AccessDenied("the token is not valid", reason="access.token")
    if user.disabled_at is not None:
        raise AccessDenied(f"user {user.name!r} is disabled", reason="access.disabled")
    return Actor(name=user.name, role=Role(user.role))


def authorize(session: Session, token_text: str | None, action: str) -> Actor:
    """Authenticate and check the role for ``action`` in one step."""
    actor = authenticate(session, token_text)
    assert actor.role is not None
    authorize_role(actor.role, action)
    return actor


def _get(session: Session, name: str) -> UserRecord:
    user = session.scalar(select(UserRecord).where(UserRecord.name == name))
    if user is None:
        raise NotFound(f"no user named {name!r}")
    return user
