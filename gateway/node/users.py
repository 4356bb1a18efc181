"""Users of a node: creation, listing, disabling, and token authentication.

One authorization layer serves the CLI and the local API alike:
:func:`authenticate` turns a presented token into an :class:`Actor`, and
:func:`authorize` adds the role check of :mod:`gateway.core.roles`.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.core.approvals import custody_after_issue, holders_json, parse_holders
from gateway.core.roles import HOST, SYSTEM, Actor, Role, authorize_role
from gateway.core.tokens import IssuedToken, issue_token, parse_token, token_hash, token_matches
from gateway.core.usernames import confusable_with
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
    "enrol_user",
    "is_approver",
    "list_users",
    "record_user_added",
    "reissue_token",
    "rotate_own_token",
    "set_approver",
]

_NAME = re.compile(r"^[a-z0-9][a-z0-9._@-]{0,63}$")
# Names the node writes as actors or issuers for itself and its host operator: a user
# of that name would read as them in the ledger and in token custody.
RESERVED_NAMES = frozenset({"init", HOST.name, SYSTEM.name})
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
    token_holders: tuple[str, ...] = ()
    """Who could hold the current token, the user among them (docs/consent.md)."""

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
            "token_holders": list(self.token_holders),
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
    if name in RESERVED_NAMES:
        raise InvalidInput(
            f"user name {name!r} is reserved: the node records its host operator and itself "
            "under it; choose another name"
        )
    return name


def actor_holders(session: Session, actor: Actor) -> frozenset[str]:
    """Who could hold the token ``actor`` acts with, read from ``actor``'s user row
    locked for this transaction (so a reissue or an enrolment of that user waits for
    it, or happened before). Raises :class:`NotFound` for an unknown user and
    :class:`AccessDenied` (``access.token``) when the row's token is no longer the
    one ``actor`` authenticated with (``Actor.token_id``): it was replaced meanwhile,
    and the holders of the new token say nothing about who sent this request."""
    user = session.scalars(
        select(UserRecord)
        .where(UserRecord.name == actor.name)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).first()
    if user is None:
        raise NotFound(f"{actor.name!r} is not a user of this node")
    if actor.token_id is not None and not hmac.compare_digest(user.token_id, actor.token_id):
        raise AccessDenied(
            f"{actor.name}'s token was replaced while this request ran: "
            "repeat it with the new token",
            reason="access.token",
        )
    return parse_holders(user.token_holders, user.name)


def _role(role: str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise InvalidInput(f"role must be admin, officer or compliance, not {role!r}") from None


def check_new_user(session: Session, name: str) -> None:
    """Refuse a name :func:`add_user` would refuse (malformed, taken, or reading like
    an existing user's); add nothing."""
    _check_name(name)
    if session.scalar(select(UserRecord.id).where(UserRecord.name == name)) is not None:
        raise AlreadyExists(f"user {name!r} exists already")
    _check_not_confusable(session, name)


def _check_not_confusable(session: Session, name: str) -> None:
    """Refuse (:class:`InvalidInput`) a new name that reads like an existing user's
    (:func:`gateway.core.usernames.confusable_with`): the ledger names actors, and
    its account of who did what must not be ambiguous (MOC item 8)."""
    other = confusable_with(name, session.scalars(select(UserRecord.name)))
    if other is not None:
        raise InvalidInput(
            f"user name {name!r} reads like the existing user {other!r} (digits for "
            "letters, 'rn' for 'm', separators): the ledger names every actor, so choose "
            "a name no reader can take for another"
        )


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
    by_host: bool = False,
    issuer: Actor | None = None,
) -> NewUser:
    """Create a user and its first token (the caller shows the token once).

    ``approver`` gives an officer the approver capability (consent grants
    under the two-person rule, docs/consent.md); refused (:class:`InvalidInput`)
    for another role. The first token counts as issued by ``created_by``
    (``token_issued_by``). With ``by_host`` (``init``, ``users enrol``: the host
    operator) it is held by the new user alone; otherwise by the new user and
    every holder of the issuing user's token (``token_holders``, docs/consent.md
    "Token custody"): ``issuer`` when the caller has the acting user's
    :class:`Actor` (its token is checked, :func:`actor_holders`), else the user
    named ``created_by``. The creation is recorded in the ledger
    (:func:`record_user_added`) by the caller, which knows the acting user.
    Raises :class:`InvalidInput` for a malformed or reserved name or role, or a name
    that reads like an existing user's (``gateway.core.usernames``),
    :class:`AlreadyExists` for a taken name, :class:`NotFound` for an unknown
    issuer.
    """
    _check_name(name)
    chosen = _role(role)
    if approver:
        _check_approver_role(name, chosen.value)
    if session.scalar(select(UserRecord.id).where(UserRecord.name == name)) is not None:
        raise AlreadyExists(f"user {name!r} exists already")
    _check_not_confusable(session, name)
    if by_host:
        holders = custody_after_issue(name, None)
    else:
        by = issuer if issuer is not None else Actor(name=created_by, role=None)
        holders = custody_after_issue(name, actor_holders(session, by))
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
            token_holders=holders_json(holders),
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


def _replace_token(
    user: UserRecord, *, now: datetime, issued_by: str, holders: frozenset[str]
) -> IssuedToken:
    token = issue_token()
    user.token_id = token.token_id
    user.token_hash = token.digest
    user.token_issued_at = now
    user.token_issued_by = issued_by
    user.token_holders = holders_json(holders)
    return token


def reissue_token(session: Session, name: str, *, now: datetime, by: Actor) -> IssuedToken:
    """An administrator replaces user ``name``'s token: the old one stops working at once.

    The new token counts as issued by ``by`` (``token_issued_by``) and is held
    by ``name`` and every holder of ``by``'s token (``token_holders``): under
    k > 1 an approval by ``name`` never counts beside one any of them could
    give (docs/consent.md, "Token custody"). Ledger: ``token-reissued`` (body
    ``{"user", "by"}``, actor ``by``; never the token). Raises
    :class:`NotFound` for an unknown user.
    """
    user = _get(session, name)
    holders = custody_after_issue(name, actor_holders(session, by))
    token = _replace_token(user, now=now, issued_by=by.name, holders=holders)
    ledger.record_event(
        session, kind="token-reissued", actor=by, now=now, body={"user": name, "by": by.name}
    )
    _log.info("user_token_reissued", user=name, by=by.name)
    return token


def rotate_own_token(session: Session, actor: Actor, *, now: datetime) -> IssuedToken:
    """``gateway users rotate-token``: the acting user replaces their own token.

    The old token stops working when this transaction commits; the new one
    counts as issued by the user themself (``token_issued_by = actor.name``).
    Whoever could hold the old token could have asked for this one, so the
    holders (``token_holders``) stay as they were: a rotation keeps a copy
    from working, it does not make the token more one's own (docs/consent.md,
    "Token custody"). Ledger: ``token-rotated`` (body ``{"user"}``, actor the
    user; never the token).
    Raises :class:`NotFound` when the actor is not a user of this node, and
    :class:`AccessDenied` for a disabled one.
    """
    user = _get(session, actor.name)
    if user.disabled_at is not None:
        raise AccessDenied(f"user {actor.name!r} is disabled", reason="access.disabled")
    holders = parse_holders(user.token_holders, user.name)
    token = _replace_token(user, now=now, issued_by=actor.name, holders=holders)
    ledger.record_event(
        session, kind="token-rotated", actor=actor, now=now, body={"user": actor.name}
    )
    _log.info("user_token_rotated", user=actor.name)
    return token


def enrol_user(
    session: Session,
    name: str,
    *,
    now: datetime,
    role: str | None = None,
    approver: bool = False,
) -> NewUser:
    """The host operator issues ``name`` a token held by ``name`` alone (``gateway
    users enrol``, a host operation with the keystore passphrase).

    A new user is created with ``role`` (required then) and ``approver``; an
    existing one keeps role and capability (``role`` must match when given;
    ``approver`` may add the capability) and gets a new token, the old one
    stops working. Either way ``token_holders`` becomes ``[name]``: the host
    operator stands outside the two-person rule (docs/consent.md, "Token
    custody"). Ledger: ``user-enrolled`` (body ``{"user", "role",
    "approver", "created"}``, actor ``host``; never the token). Raises
    :class:`InvalidInput` for a bad name or role, a role that differs from an
    existing user's, or the capability for a non-officer; :class:`AccessDenied`
    for a disabled user.
    """
    _check_name(name)
    user = session.scalar(select(UserRecord).where(UserRecord.name == name).with_for_update())
    created = user is None
    if user is None:
        if role is None:
            raise InvalidInput(f"user {name!r} is new: give --role admin, officer or compliance")
        made = add_user(
            session, name, role, created_by=HOST.name, now=now, approver=approver, by_host=True
        )
        token = made.token
        chosen = made.role
    else:
        chosen = Role(user.role)
        if role is not None and _role(role) != chosen:
            raise InvalidInput(
                f"user {name!r} exists with role {user.role}, not {role}: a role never changes; "
                "leave --role out to issue a new token"
            )
        if user.disabled_at is not None:
            raise AccessDenied(f"user {name!r} is disabled", reason="access.disabled")
        if approver and not user.approver:
            _check_approver_role(name, user.role)
            user.approver = True
        token = _replace_token(user, now=now, issued_by=HOST.name, holders=frozenset({name}))
    held = approver or bool(user is not None and user.approver)
    ledger.record_event(
        session,
        kind="user-enrolled",
        actor=HOST,
        now=now,
        body={"user": name, "role": chosen.value, "approver": held, "created": created},
    )
    _log.info("user_enrolled", user=name, role=chosen.value, created=created)
    return NewUser(name=name, role=chosen, token=token, approver=held)


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
            token_holders=tuple(sorted(parse_holders(row.token_holders, row.name))),
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
    return Actor(name=user.name, role=Role(user.role), token_id=user.token_id)


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
