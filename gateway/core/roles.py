"""Who may do what: the roles and the one table of allowed actions.

One authorization rule serves the CLI and the local API alike: an action name
is looked up here, and a refusal names the role(s) that would be allowed.
Operations on the host itself (``init``, ``serve``, ``sync``, ``purge``, ``db upgrade``,
``demo``) need access to the node home and its passphrase, not a user token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from gateway.errors import AccessDenied

__all__ = ["ACTIONS", "HOST", "SYSTEM", "Actor", "Role", "authorize_role"]


class Role(StrEnum):
    ADMIN = "admin"
    OFFICER = "officer"
    COMPLIANCE = "compliance"


_A = frozenset({Role.ADMIN})
_O = frozenset({Role.OFFICER})
_C = frozenset({Role.COMPLIANCE})
_AO = frozenset({Role.ADMIN, Role.OFFICER})
_ALL = frozenset(Role)

ACTIONS: dict[str, frozenset[Role]] = {
    # administrators: keys, peer, users, node
    "keys.show": _A,
    "keys.export": _A,
    "keys.rotate": _A,
    "keys.rotate-root": _A,
    "keys.revoke": _A,
    "peer.add": _A,
    "peer.show": _A,
    "users.add": _A,
    "users.list": _A,
    "users.disable": _A,
    "users.approver": _A,
    # every user replaces their own token (an administrator's copy stops working)
    "users.rotate-token": _ALL,
    # officers: case handling and consent
    "send": _O,
    "inbox": _O,
    "show": _O,
    "resend": _O,
    "consent.request": _O,
    "consent.grant": _O,
    "consent.deny": _O,
    "consent.revoke": _O,
    "consent.list": _O,
    "disclose": _O,
    # the two-person rule: officers approve consent, administrators keys and users
    # (which proposals a user may approve is the policy's, gateway.core.policy.APPROVER_ROLES)
    "approvals.list": _AO,
    "approvals.propose": _A,
    "approvals.approve": _AO,
    "approvals.reject": _AO,
    # compliance officers: metadata and verification, never case contents
    "ledger.list": _C,
    "ledger.verify": _C,
    "ledger.export": _C,
    "ledger.audit-peer": _C,
    "ledger.account": _C,
    # the web console (/console/): its compliance pages and its administration pages
    "console.compliance": _C,
    "console.admin": _A,
}


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts: a user of this node, or the node itself (``system``)."""

    name: str
    role: Role | None
    token_id: str | None = field(default=None, compare=False, repr=False)
    """The id (public part) of the token the user authenticated with, when one did:
    work that depends on what the token is (token custody) checks it is still the
    user's token in the transaction that relies on it."""

    @property
    def label(self) -> str:
        return self.name if self.role is None else f"{self.name} ({self.role.value})"


SYSTEM = Actor(name="system", role=None)
"""The node acting on its own: the sender worker, the receiver, migrations."""

HOST = Actor(name="host", role=None)
"""The host operator, acting with the keystore passphrase on the node host
(``gateway users enrol``): outside the two-person rule, since they can sign as
the node anyway (docs/consent.md, "Token custody")."""


def authorize_role(role: Role, action: str) -> None:
    """Raise :class:`AccessDenied` unless ``role`` may perform ``action``."""
    allowed = ACTIONS.get(action)
    if allowed is None:
        raise AccessDenied(f"unknown action {action!r} is refused", reason="access.unknown-action")
    if role not in allowed:
        needed = " or ".join(sorted(r.value for r in allowed))
        raise AccessDenied(
            f"'{action}' needs the {needed} role; this user is {role.value}", reason="access.role"
        )
