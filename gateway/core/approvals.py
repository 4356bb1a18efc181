"""The two-person rule: an action happens only after k distinct approvers approved it.

Pure: no I/O, no clock. The node's shell (:mod:`gateway.node.approvals`) stores
proposals and approvals and asks :func:`decide` whether a proposal executes.

**Terms.** A proposal carries the exact terms of its action (for a consent
grant: request, items, recipient, purpose, validity, uses, conditions). The
terms are hashed (:func:`terms_hash`: SHA-256 over the canonical JSON, RFC
8785), and every approval records the hash of the terms its approver saw.
An approval of other terms does not count: any change starts over.

**The rule** (:func:`decide`, source: MOC item 3 "written
consent"): a proposal executes exactly when, before it expires, ``k``
distinct approvers approved its terms, each of whom is, at the time of the
decision, enabled and holds a role allowed to approve that action. The
proposer's own approval counts once, like any other; a user who was disabled
since approving no longer counts. A proposal whose proposer was disabled
since proposing never executes: the action would be done in the name of a
user the node no longer trusts. ``k = 1`` is today's one-person behaviour:
the proposer's own approval executes the action at once.

**k is the larger of the proposal's and the policy's.** The shell passes the
largest of the ``k`` stored with the proposal and the policy's current one,
so raising ``k`` also holds back proposals that wait.

**Own tokens** (:func:`token_is_own`, :func:`check_own_token`): where k > 1,
an approval counts only when the approver's token, at the time of the
approval, was issued by the approver themself (``gateway users
rotate-token``), not by an administrator who could have kept a copy (``users
add``, ``users new-token``). Otherwise one administrator could reissue a
colleague's token and approve as both, and k = 2 would be one person.
Whether an approval was made with an own token is fixed when it is given: a
token reissued later does not undo it (the approval was the person's own).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Final

from gateway.core.canonical import canonical_bytes
from gateway.errors import InvalidInput, RefusedError

__all__ = [
    "ACTIONS",
    "MAX_APPROVERS",
    "NOT_OWN_ADVICE",
    "Approval",
    "Decision",
    "ProposalState",
    "check_own_token",
    "decide",
    "terms_hash",
    "token_is_own",
]

NOT_OWN_ADVICE: Final = (
    "run `gateway users rotate-token` to replace the token an administrator issued you, "
    "then approve again"
)

ACTIONS: Final = (
    "consent-grant",
    "consent-revoke",
    "keys-rotate",
    "keys-revoke",
    "keys-rotate-root",
    "keys-recover",
    "users-add-admin",
)
"""Actions the policy's ``[approvals]`` table may put under the rule."""

MAX_APPROVERS: Final = 9
"""Largest ``k`` a policy may ask for."""


class ProposalState(StrEnum):
    PENDING = "pending"
    EXECUTED = "executed"
    REJECTED = "rejected"
    EXPIRED = "expired"


def terms_hash(terms: Mapping[str, Any]) -> str:
    """SHA-256 (hex, 64 characters) of the canonical JSON of ``terms``.

    Raises :class:`InvalidInput` for terms that are not plain JSON values.
    """
    try:
        data = canonical_bytes(dict(terms))
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"proposal terms are not plain JSON: {exc}") from None
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class Approval:
    """One approver's approval as the decision sees it."""

    approver: str
    terms_hash: str
    approved_at: datetime
    enabled: bool
    """The approver is still an enabled user now."""
    authorised: bool
    """The approver holds a role (and capability) allowed to approve the action now."""
    own_token: bool = True
    """The approver's token was issued by the approver themself when they approved
    (:func:`token_is_own`); under k > 1 an approval without it does not count."""


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether a proposal executes now, and who counts toward it."""

    executes: bool
    counted: tuple[str, ...]
    """The distinct approvers that count, sorted by name."""
    needed: int
    expired: bool

    @property
    def missing(self) -> int:
        return max(0, self.needed - len(self.counted))


def token_is_own(*, k: int, approver: str, token_issued_by: str | None) -> bool:
    """Does an approval by ``approver``, whose current token was issued by
    ``token_issued_by``, count toward a proposal needing ``k`` approvers?

    Always at ``k = 1`` (one person acts alone anyway); for ``k > 1`` exactly
    when the approver issued their own token (source: the two-person rule
    needs k *people*; an administrator who issued a token may hold a copy).
    """
    return k == 1 or (token_issued_by is not None and token_issued_by == approver)


def check_own_token(*, k: int, approver: str, token_issued_by: str | None) -> None:
    """Refuse (:class:`RefusedError`, ``approval.token-not-own``, 403) an approval
    that :func:`token_is_own` would not count; the message says what to do."""
    if not token_is_own(k=k, approver=approver, token_issued_by=token_issued_by):
        raise RefusedError(
            f"{approver}'s token was issued by {token_issued_by or 'someone else'}, not by "
            f"{approver}: under the two-person rule (k = {k}) an approval counts only with "
            f"a token its holder issued: {NOT_OWN_ADVICE}",
            reason="approval.token-not-own",
        )


def decide(
    *,
    k: int,
    terms: str,
    approvals: Iterable[Approval],
    expires_at: datetime,
    now: datetime,
    proposer_enabled: bool,
) -> Decision:
    """Does a proposal with terms hash ``terms`` execute at ``now``?

    ``approvals`` are every approval recorded for it (in any order, possibly
    from the same approver twice); only those of enabled, authorised
    approvers, of exactly these terms and given before ``expires_at`` count,
    each approver once; for ``k > 1`` only those made with an own token
    (:attr:`Approval.own_token`). Executes when at least ``k`` count and ``now`` is
    before ``expires_at`` and the proposer (``proposer_enabled``) is still
    an enabled user. Raises :class:`InvalidInput` for ``k`` outside
    1..:data:`MAX_APPROVERS`.
    """
    if isinstance(k, bool) or not 1 <= k <= MAX_APPROVERS:
        raise InvalidInput(f"approvals needed must be from 1 to {MAX_APPROVERS}, not {k!r}")
    expired = now >= expires_at
    counted = sorted(
        {
            a.approver
            for a in approvals
            if a.enabled
            and a.authorised
            and (a.own_token or k == 1)
            and a.terms_hash == terms
            and a.approved_at < expires_at
        }
    )
    return Decision(
        executes=not expired and proposer_enabled and len(counted) >= k,
        counted=tuple(counted),
        needed=k,
        expired=expired,
    )
