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

**Token custody** (:func:`custody_after_issue`, :func:`check_distinct`): k
approvals are k people only if no one person could have given two of them. A
token is known to whoever issued it, so each user carries the set of users
who could hold their current token (``holders``): themself, and, for a token an
administrator issued (``users add``, ``users new-token``), that administrator
and everyone who could hold the administrator's token then. Replacing one's
own token (``users rotate-token``) changes nothing: the request was made with
the old token, by any of its holders. A token the host operator issued
(``init``, ``users enrol`` on the node host, with the keystore passphrase) is
held by its user alone: the host operator can sign as the node anyway and
stands outside the rule. Two approvals count as two people exactly when their
holder sets, fixed when each approval was given, share no one (for k sets, no
fewer than k people could have given them exactly when they are pairwise
disjoint). A token reissued after an approval does not undo it.
"""

from __future__ import annotations

import hashlib
import json
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
    "NOT_DISTINCT_ADVICE",
    "Approval",
    "Decision",
    "ProposalState",
    "check_distinct",
    "custody_after_issue",
    "decide",
    "holders_json",
    "parse_holders",
    "shared_holders",
    "terms_hash",
]

NOT_DISTINCT_ADVICE: Final = (
    "another approver whose token no one of them could hold has to approve; or the host "
    "operator issues you a token only you hold ('gateway users enrol NAME' on the node "
    "host) and you approve again"
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
    holders: frozenset[str] = frozenset()
    """Who could hold the approver's token when they approved (the approver
    always counts among them, listed or not; :func:`custody_after_issue`)."""

    @property
    def people(self) -> frozenset[str]:
        """:attr:`holders` with the approver: the people who could have given it."""
        return self.holders | {self.approver}


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


def custody_after_issue(user: str, issuer_holders: Iterable[str] | None) -> frozenset[str]:
    """Who could hold the token just issued to ``user``: ``user``, and every holder
    of the issuing administrator's token (``issuer_holders``, the administrator
    among them). ``None`` for a token the host operator issued (``init``, ``users
    enrol``): ``user`` alone. A rotation by the user keeps the holders as they were
    (the module docstring says why)."""
    return frozenset({user, *(issuer_holders or ())})


def holders_json(holders: Iterable[str]) -> str:
    """The stored form of a holder set (``users.token_holders``,
    ``approval_vote.holders``): a sorted JSON list of names."""
    return json.dumps(sorted(set(holders)))


def parse_holders(text: str, owner: str) -> frozenset[str]:
    """A holder set as :func:`holders_json` stored it, always with ``owner`` (the
    user whose token it is) among them. Raises :class:`InvalidInput` for text that
    is not a JSON list of names."""
    found = json.loads(text or "[]")
    if not isinstance(found, list) or not all(isinstance(h, str) for h in found):
        raise InvalidInput(f"the stored token holders of {owner!r} are not a list of names")
    return frozenset({owner, *found})


def shared_holders(one: Approval, others: Iterable[Approval]) -> tuple[str, frozenset[str]] | None:
    """The first of ``others`` that one person could have given together with
    ``one``, and who that could be; ``None`` when ``one`` shares no holder with any."""
    for other in others:
        common = one.people & other.people
        if common and other.approver != one.approver:
            return other.approver, common
    return None


def check_distinct(*, k: int, approval: Approval, counted: Iterable[Approval]) -> None:
    """Refuse (:class:`RefusedError`, ``approval.not-distinct``, 403) an approval that
    one person could have given together with an approval that already counts,
    when ``k > 1`` (at ``k = 1`` one person acts alone anyway). The message names
    the approver it overlaps with and who could hold both tokens, never a token."""
    if k == 1:
        return
    found = shared_holders(approval, counted)
    if found is None:
        return
    other, common = found
    who = ", ".join(sorted(common))
    raise RefusedError(
        f"{approval.approver}'s approval would not be a second person's: {who} could hold "
        f"both {approval.approver}'s token and {other}'s, who approved already, so one "
        f"person could have given both (two-person rule, k = {k}): {NOT_DISTINCT_ADVICE}",
        reason="approval.not-distinct",
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
    each approver once, taken in order of approval, and each only when no
    person could hold both its token and the token of one already counted
    (:attr:`Approval.people` pairwise disjoint; the module docstring says why).
    Executes when at least ``k`` count and ``now`` is
    before ``expires_at`` and the proposer (``proposer_enabled``) is still
    an enabled user. Raises :class:`InvalidInput` for ``k`` outside
    1..:data:`MAX_APPROVERS`.
    """
    if isinstance(k, bool) or not 1 <= k <= MAX_APPROVERS:
        raise InvalidInput(f"approvals needed must be from 1 to {MAX_APPROVERS}, not {k!r}")
    expired = now >= expires_at
    taken: list[Approval] = []
    for a in sorted(approvals, key=lambda a: (a.approved_at, a.approver)):
        if not (a.enabled and a.authorised and a.terms_hash == terms):
            continue
        if a.approved_at >= expires_at or any(t.approver == a.approver for t in taken):
            continue
        if shared_holders(a, taken) is None:
            taken.append(a)
    counted = sorted(a.approver for a in taken)
    return Decision(
        executes=not expired and proposer_enabled and len(counted) >= k,
        counted=tuple(counted),
        needed=k,
        expired=expired,
    )
