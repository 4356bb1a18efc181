"""The two-person rule on this node: proposals, approvals, rejection, expiry, execution.

The rule itself is pure (:func:`gateway.core.approvals.decide`); this shell
stores proposals (``approval_proposal``) and approvals (``approval_vote``),
records every step in the ledger (``approval-proposed``, ``approval-given``,
``approval-rejected``, ``approval-expired``, ``approval-executed``, each
with its actor) and executes an action on its deciding approval.

**Exactly once.** The deciding approval is recorded in the same transaction
that executes the action (for a consent grant: the transaction that queues
the signed grant for the peer), after the proposal row was locked (``SELECT
... FOR UPDATE`` on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` admits one
writer). The state is checked again under the lock, so of two approvers
racing for the last place one executes the action and the other is told the
proposal was executed already; nothing of the loser's attempt is kept.

Actions under the rule in this version: ``consent-grant``
(:func:`grant_consent`), ``consent-revoke`` (:func:`revoke_consent`) and
``users-add-admin`` (:func:`add_user_or_propose`), each executed by the
deciding approval, and the key ceremonies
``keys-rotate``, ``keys-revoke`` and ``keys-rotate-root`` (:func:`propose_key_change`;
the deciding approval makes the proposal ready, and the host ceremony, which
alone holds the passphrase and the root key, claims it with
:func:`claim_for_ceremony` in the transaction that changes the keys).
``consent-revoke`` defaults to k = 1 (revoking must stay fast); a policy may
raise it.
"""

from __future__ import annotations

import hmac
import json
import secrets
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.core.approvals import (
    ACTIONS,
    Approval,
    ProposalState,
    check_distinct,
    decide,
    holders_json,
    parse_holders,
    terms_hash,
)
from gateway.core.canonical import canonical_bytes
from gateway.core.consent import format_time, parse_time, validate_text
from gateway.core.domain import SHA256_HEX
from gateway.core.policy import APPROVER_CAPABILITY, APPROVER_ROLES, ApprovalRule, Policy
from gateway.core.roles import SYSTEM, Actor, Role
from gateway.errors import InvalidInput, NotFound, RefusedError
from gateway.node import ledger, own_keys
from gateway.node.consent import protocol as consent_protocol
from gateway.node.consent.common import node_policy
from gateway.node.context import NodeContext
from gateway.node.runtime import Node
from gateway.node.users import (
    actor_holders,
    add_user,
    check_new_user,
    is_approver,
    record_user_added,
)
from gateway.store.models_approvals import ApprovalProposal, ApprovalVote
from gateway.store.models_ledger import LedgerEntryRow
from gateway.store.models_users import UserRecord

CEREMONY_ACTIONS = ("keys-rotate", "keys-revoke", "keys-rotate-root", "keys-recover")
"""Actions a host ceremony executes once their proposal is approved."""

__all__ = [
    "CEREMONY_ACTIONS",
    "MAX_REASON",
    "ProposalView",
    "add_user_or_propose",
    "approve",
    "ceremony_terms",
    "claim_for_ceremony",
    "grant_consent",
    "list_proposals",
    "parse_proposal_id",
    "parse_terms_hash",
    "propose_key_change",
    "reject",
    "revoke_consent",
    "show_proposal",
]

MAX_REASON = 2000
"""Longest reason (characters) of a proposal or a rejection; the API's bound too."""
_NONCE_BYTES = 16
"""Random bytes (hex in the terms' ``nonce``) that keep a proposal's terms hash unguessable."""


@dataclass(frozen=True, slots=True)
class ProposalView:
    """A proposal as the approvers see it: its terms, who approved and what is missing."""

    proposal_id: str
    action: str
    terms: dict[str, Any]
    terms_sha256: str
    proposer: str
    created_at: datetime
    expires_at: datetime
    state: str
    needed: int
    approvers: tuple[str, ...]
    counted: tuple[str, ...]
    reason: str | None
    result: dict[str, Any] | None = None
    warning: str | None = None
    """At proposal time: fewer users could ever approve it than it needs."""

    def to_dict(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.warning is not None:
            extra["warning"] = self.warning
        return {
            **extra,
            "proposal_id": self.proposal_id,
            "action": self.action,
            "terms": self.terms,
            "terms_sha256": self.terms_sha256,
            "proposer": self.proposer,
            "created_at": format_time(self.created_at),
            "expires_at": format_time(self.expires_at),
            "state": self.state,
            "needed": self.needed,
            "approvals": len(self.counted),
            "approvers": list(self.approvers),
            "counted": list(self.counted),
            "reason": self.reason,
            "result": self.result,
            **extra,
        }


def parse_proposal_id(value: object) -> str:
    """A proposal id from outside (API path, CLI argument): a UUID, as its canonical
    lower-case text. Raises :class:`InvalidInput` for anything else (bounded: at
    most 64 characters are looked at)."""
    if not isinstance(value, str) or len(value) > 64:
        raise InvalidInput(
            "a proposal id is a UUID (36 characters, as 'gateway approvals list' shows it)"
        )
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidInput(
            f"{value!r} is no proposal id: a proposal id is a UUID, as 'gateway approvals "
            "list' shows it"
        ) from None


def _needed(policy: Policy, row: ApprovalProposal) -> int:
    """k of a proposal: the larger of the k stored with it and the policy's now."""
    return max(row.needed, policy.approval_rule(row.action).k)


def _enabled(session: Session, name: str) -> bool:
    user = session.scalars(select(UserRecord).where(UserRecord.name == name)).first()
    return user is not None and user.disabled_at is None


def _check_proposer(session: Session, row: ApprovalProposal) -> None:
    """Refuse to go on with a proposal whose proposer was disabled since proposing."""
    if not _enabled(session, row.proposer):
        raise RefusedError(
            f"proposal {row.proposal_id} was made by {row.proposer}, who is disabled now: "
            "it no longer executes; reject it, and have an enabled user propose it again",
            reason="approval.proposer-disabled",
        )


def _proposal(session: Session, proposal_id: str, *, lock: bool) -> ApprovalProposal:
    proposal_id = parse_proposal_id(proposal_id)
    query = select(ApprovalProposal).where(ApprovalProposal.proposal_id == proposal_id)
    if lock:
        query = query.with_for_update()
    row = session.scalars(query.execution_options(populate_existing=True)).first()
    if row is None:
        raise NotFound(
            f"no proposal {proposal_id!r}: 'gateway approvals list' shows the pending ones"
        )
    return row


def _votes(session: Session, proposal_id: str) -> list[ApprovalVote]:
    return list(
        session.scalars(
            select(ApprovalVote)
            .where(ApprovalVote.proposal_id == proposal_id)
            .order_by(ApprovalVote.approved_at, ApprovalVote.approver)
        )
    )


def _approvals(session: Session, action: str, votes: list[ApprovalVote]) -> list[Approval]:
    """The votes as the rule sees them: with each approver's standing *now*, and who
    could hold their token when they approved (``holders``, fixed then: a token
    reissued later does not undo an approval, docs/consent.md "Token custody")."""
    names = {v.approver for v in votes}
    users = {
        u.name: u for u in session.scalars(select(UserRecord).where(UserRecord.name.in_(names)))
    }
    wanted = APPROVER_ROLES[action]
    capability = action in APPROVER_CAPABILITY
    found = []
    for vote in votes:
        user = users.get(vote.approver)
        found.append(
            Approval(
                approver=vote.approver,
                terms_hash=vote.terms_hash,
                approved_at=vote.approved_at,
                enabled=user is not None and user.disabled_at is None,
                authorised=user is not None
                and user.role == wanted
                and (user.approver or not capability),
                holders=parse_holders(vote.holders, vote.approver),
            )
        )
    return found


def _vote(session: Session, actor: Actor, row: ApprovalProposal, *, now: datetime) -> ApprovalVote:
    """A new, unsaved approval of ``row``'s terms by ``actor``, with who could hold
    the token ``actor`` acts with (its user row locked, the token checked:
    :func:`gateway.node.users.actor_holders`)."""
    held = actor_holders(session, actor)
    return ApprovalVote(
        proposal_id=row.proposal_id,
        approver=actor.name,
        terms_hash=row.terms_hash,
        approved_at=now,
        holders=holders_json(held),
    )


def _view(
    session: Session, row: ApprovalProposal, policy: Policy, *, now: datetime
) -> ProposalView:
    votes = _votes(session, row.proposal_id)
    needed = _needed(policy, row)
    decision = decide(
        k=needed,
        terms=row.terms_hash,
        approvals=_approvals(session, row.action, votes),
        expires_at=row.expires_at,
        now=now,
        proposer_enabled=_enabled(session, row.proposer),
    )
    result = None if row.result_ref is None else {"ref": row.result_ref}
    return ProposalView(
        proposal_id=row.proposal_id,
        action=row.action,
        terms=dict(json.loads(row.terms_json)),
        terms_sha256=row.terms_hash,
        proposer=row.proposer,
        created_at=row.created_at,
        expires_at=row.expires_at,
        state=row.state,
        needed=needed,
        approvers=tuple(v.approver for v in votes),
        counted=decision.counted,
        reason=row.reason,
        result=result,
    )


def _record(
    session: Session,
    kind: str,
    actor: Actor,
    row: ApprovalProposal,
    now: datetime,
    **extra: Any,
) -> None:
    body: dict[str, Any] = {
        "proposal_id": row.proposal_id,
        "action": row.action,
        "terms_sha256": row.terms_hash,
        "needed": row.needed,
        **extra,
    }
    request_id = json.loads(row.terms_json).get("request_id")
    if request_id is not None:
        body["request_id"] = request_id
    ledger.record_event(session, kind=kind, actor=actor, now=now, body=body)


def note_rules(session: Session, policy: Policy, *, now: datetime) -> None:
    """Ledger entry ``approval-rules`` (body ``{"policy_version", "k"}``: k per action
    under the rule, actor ``system``) when the policy's rules differ from the last
    entry of that kind, or none exists yet. Called before every action the rule
    governs, so a policy edit that changes k (lowering it included) is on record
    before the first action taken under it (docs/consent.md, "Approvals")."""
    rules = {action: policy.approval_rule(action).k for action in ACTIONS}
    last = session.scalar(
        select(LedgerEntryRow.canonical)
        .where(LedgerEntryRow.kind == "approval-rules")
        .order_by(LedgerEntryRow.seq.desc())
        .limit(1)
    )
    body = {"policy_version": policy.version, "k": rules}
    if last is not None and json.loads(last).get("body") == body:
        return
    ledger.record_event(session, kind="approval-rules", actor=SYSTEM, now=now, body=body)


def _expire_due(session: Session, *, now: datetime) -> None:
    """Mark every pending proposal past its expiry expired (ledger: ``approval-expired``),
    and every pending consent grant whose validity (``valid_until``) has passed: the
    grant it would sign could never be used (its ``reason`` says so)."""
    grants = session.scalars(
        select(ApprovalProposal)
        .where(
            ApprovalProposal.state == ProposalState.PENDING,
            ApprovalProposal.action == "consent-grant",
            ApprovalProposal.expires_at > now,
        )
        .with_for_update()
    ).all()
    for row in grants:
        valid_until = json.loads(row.terms_json).get("valid_until")
        if valid_until is None or parse_time(valid_until, field="valid_until") > now:
            continue
        row.state = ProposalState.EXPIRED
        row.decided_at = now
        row.decided_by = SYSTEM.name
        row.reason = (
            f"the grant's validity (until {valid_until}) passed before it was approved; "
            "nothing was sent"
        )
        _record(session, "approval-expired", SYSTEM, row, now, valid_until=valid_until)
    due = session.scalars(
        select(ApprovalProposal)
        .where(
            ApprovalProposal.state == ProposalState.PENDING,
            ApprovalProposal.expires_at <= now,
        )
        .with_for_update()
    ).all()
    for row in due:
        row.state = ProposalState.EXPIRED
        row.decided_at = now
        row.decided_by = SYSTEM.name
        _record(session, "approval-expired", SYSTEM, row, now)


def _check_approver(actor: Actor, action: str) -> None:
    wanted = APPROVER_ROLES[action]
    if actor.role is None or actor.role.value != wanted:
        raise RefusedError(
            f"a {action} proposal is approved by users of the {wanted} role; "
            f"{actor.name} is {actor.role.value if actor.role else 'the node'}",
            reason="approval.not-approver",
        )


def _check_capability(session: Session, actor: Actor, action: str) -> None:
    """Refuse an approval of ``action`` by an officer without the approver capability."""
    if action in APPROVER_CAPABILITY and not is_approver(session, actor.name):
        raise RefusedError(
            f"a {action} proposal is approved by officers holding the approver capability; "
            f"{actor.name} does not hold it: an administrator gives it with "
            f"'gateway users approver {actor.name} on'",
            reason="approval.not-approver",
        )


def _check_distinct(
    session: Session,
    policy: Policy,
    row: ApprovalProposal,
    votes: list[ApprovalVote],
    mine: ApprovalVote,
) -> list[Approval]:
    """Refuse (``approval.not-distinct``, 403) an approval ``mine`` of a k > 1 proposal
    that one person could have given together with one of the recorded ``votes``
    that counts already (:func:`gateway.core.approvals.check_distinct`). Returns the
    approvals as the rule sees them: the recorded ones, then ``mine``."""
    k = _needed(policy, row)
    existing = _approvals(session, row.action, votes)
    (approval,) = _approvals(session, row.action, [mine])
    counted = decide(
        k=k,
        terms=row.terms_hash,
        approvals=existing,
        expires_at=row.expires_at,
        now=mine.approved_at,
        proposer_enabled=True,
    ).counted
    check_distinct(k=k, approval=approval, counted=[a for a in existing if a.approver in counted])
    return [*existing, approval]


def _check_pending(row: ApprovalProposal) -> None:
    if row.state == ProposalState.EXPIRED and row.reason:
        raise RefusedError(
            f"proposal {row.proposal_id} expired: {row.reason}; propose the grant again "
            "with a later validity if it is still wanted",
            reason="approval.expired",
        )
    if row.state != ProposalState.PENDING:
        hint = (
            "propose it again if it is still wanted"
            if row.state in (ProposalState.EXPIRED, ProposalState.REJECTED)
            else "nothing more to do"
        )
        raise RefusedError(
            f"proposal {row.proposal_id} was {row.state} already: {hint}",
            reason="approval.expired" if row.state == ProposalState.EXPIRED else "approval.decided",
        )


def list_proposals(
    node: Node, actor: Actor, *, now: datetime, state: str | None = None
) -> list[ProposalView]:
    """Proposals of the actions ``actor``'s role approves, newest first; pending ones
    past their expiry are marked expired first (recorded in the ledger)."""
    with node.db.transaction() as session:
        _expire_due(session, now=now)
        actions = [
            a for a, role in APPROVER_ROLES.items() if actor.role and actor.role.value == role
        ]
        query = select(ApprovalProposal).where(ApprovalProposal.action.in_(actions))
        if state is not None:
            query = query.where(ApprovalProposal.state == state)
        rows = session.scalars(query.order_by(ApprovalProposal.created_at.desc())).all()
        policy = node_policy(node)
        return [_view(session, row, policy, now=now) for row in rows]


def show_proposal(node: Node, actor: Actor, proposal_id: str, *, now: datetime) -> ProposalView:
    """One proposal of an action ``actor``'s role approves, in full (``gateway approvals
    show``). Raises :class:`InvalidInput` for an id that is no UUID, :class:`NotFound`
    for an unknown one, ``approval.not-approver`` (403) for a proposal of an action
    the role does not approve (its terms are not shown)."""
    with node.db.transaction() as session:
        _expire_due(session, now=now)
        row = _proposal(session, proposal_id, lock=False)
        _check_approver(actor, row.action)
        return _view(session, row, node_policy(node), now=now)


def _could_approve(session: Session, action: str) -> int:
    """How many users could ever approve ``action`` now: enabled, of its approving role,
    holding the approver capability where the action asks it."""
    query = select(UserRecord).where(
        UserRecord.role == APPROVER_ROLES[action], UserRecord.disabled_at.is_(None)
    )
    if action in APPROVER_CAPABILITY:
        query = query.where(UserRecord.approver.is_(True))
    return len(session.scalars(query).all())


def _propose(
    session: Session,
    *,
    action: str,
    terms: dict[str, Any],
    actor: Actor,
    rule: ApprovalRule,
    policy: Policy,
    now: datetime,
    approves: bool = True,
) -> ProposalView:
    """Store a pending proposal for ``rule``'s k approvals; with ``approves`` the
    proposer's own approval too (with who could hold the proposer's token).
    Proposals past their expiry are closed first.

    A random ``nonce`` joins the terms before they are hashed, so the terms hash
    in the ledger cannot be confirmed by guessing the terms (docs/ledger.md).
    The answer carries a ``warning`` when fewer users could ever approve the
    proposal than it needs."""
    _expire_due(session, now=now)
    terms = {**terms, "nonce": secrets.token_hex(_NONCE_BYTES)}
    digest = terms_hash(terms)
    row = ApprovalProposal(
        proposal_id=str(uuid.uuid4()),
        action=action,
        terms_json=canonical_bytes(terms).decode("utf-8"),
        terms_hash=digest,
        needed=rule.k,
        proposer=actor.name,
        created_at=now,
        expires_at=now + timedelta(hours=rule.lifetime_hours),
        state=ProposalState.PENDING,
    )
    session.add(row)
    session.flush()
    proposed: dict[str, Any] = {"expires_at": format_time(row.expires_at)}
    if isinstance(terms.get("reason"), str):
        proposed["reason"] = terms["reason"][:MAX_REASON]
    _record(session, "approval-proposed", actor, row, now, **proposed)
    if approves:
        session.add(_vote(session, actor, row, now=now))
        _record(session, "approval-given", actor, row, now, approvals=1)
    view = _view(session, row, policy, now=now)
    able = _could_approve(session, action)
    if able < view.needed:
        view = replace(
            view,
            warning=(
                f"{action} needs {view.needed} approvers but only {able} user(s) could ever "
                f"approve it (enabled {APPROVER_ROLES[action]}s"
                + (" holding the approver capability" if action in APPROVER_CAPABILITY else "")
                + f"): {view.needed - able} more must be added or enabled before it expires"
            ),
        )
    return view


def grant_consent(
    ctx: NodeContext,
    actor: Actor,
    request_id: str,
    *,
    valid_until: datetime | None,
    max_uses: int | None,
    conditions: str,
    now: datetime,
) -> dict[str, Any]:
    """``gateway consent grant``: grant at once when the policy's k is 1, else propose.

    k = 1: exactly :func:`gateway.node.consent.protocol.grant` (the answer is
    its :class:`SentConsent`, with ``state: "executed"``). k > 1: the terms
    are checked as a grant would check them, then stored as a pending
    proposal; any officer may propose, and the proposal carries the
    proposer's approval only when the proposer holds the approver capability
    (``users.approver``). The answer names the proposal and ``approvals`` of
    ``needed``.
    """
    node = ctx.node
    rule = ctx.policy.approval_rule("consent-grant")
    with node.db.transaction() as session:
        note_rules(session, ctx.policy, now=now)
    if rule.k == 1:
        sent = consent_protocol.grant(
            ctx,
            actor,
            request_id,
            valid_until=valid_until,
            max_uses=max_uses,
            conditions=conditions,
            now=now,
        )
        return {**sent.to_dict(), "state": ProposalState.EXECUTED}
    _check_approver(actor, "consent-grant")
    terms = consent_protocol.grant_terms(
        ctx,
        request_id,
        valid_until=valid_until,
        max_uses=max_uses,
        conditions=conditions,
        now=now,
    )
    with node.db.transaction() as session:
        view = _propose(
            session,
            action="consent-grant",
            terms=terms.to_dict(),
            actor=actor,
            rule=rule,
            policy=ctx.policy,
            now=now,
            approves=is_approver(session, actor.name),
        )
        return {**view.to_dict(), "request_id": request_id}


def revoke_consent(
    ctx: NodeContext,
    actor: Actor,
    consent_id: str,
    *,
    reason: str,
    now: datetime,
) -> dict[str, Any]:
    """``gateway consent revoke``: revoke at once when the policy's k is 1, else propose.

    k = 1 (the default: revoking must stay fast): exactly
    :func:`gateway.node.consent.protocol.revoke` (its :class:`SentConsent`,
    with ``state: "executed"``). k > 1: the revocation is checked as a
    revocation would be (:func:`~gateway.node.consent.protocol.revocation_terms`),
    then stored as a pending proposal carrying the proposer's approval; the
    k-th officer's approval records the revocation and queues it for the peer,
    the proposer as the revoking officer. Any officer approves a revocation
    (no approver capability is needed: it withdraws, never gives).
    """
    rule = ctx.policy.approval_rule("consent-revoke")
    with ctx.node.db.transaction() as session:
        note_rules(session, ctx.policy, now=now)
    if rule.k == 1:
        sent = consent_protocol.revoke(ctx, actor, consent_id, reason=reason, now=now)
        return {**sent.to_dict(), "state": ProposalState.EXECUTED}
    _check_approver(actor, "consent-revoke")
    terms = consent_protocol.revocation_terms(ctx, consent_id, reason=reason)
    with ctx.node.db.transaction() as session:
        view = _propose(
            session,
            action="consent-revoke",
            terms=terms,
            actor=actor,
            rule=rule,
            policy=ctx.policy,
            now=now,
        )
        return {**view.to_dict(), "consent_id": consent_id}


def approve(
    ctx: NodeContext,
    actor: Actor,
    proposal_id: str,
    *,
    terms_sha256: str | None,
    now: datetime,
) -> dict[str, Any]:
    """Approve a pending proposal; on the k-th counting approval the action happens.

    ``terms_sha256``, when given, is the hash of the terms the approver
    reviewed: a proposal with other terms is refused (``approval.terms-changed``).
    Refused: an unknown proposal (404), one decided or expired already
    (``approval.decided`` 409, ``approval.expired`` 410), an approver of
    the wrong role (``approval.not-approver`` 403), one that one person could
    have given together with an approval counted already while k > 1
    (``approval.not-distinct`` 403: someone could hold both tokens,
    docs/consent.md "Token custody"; checked again under the proposal lock
    before the action executes), a second approval by the same user
    (``approval.already-approved`` 409).
    """
    node = ctx.node
    policy = ctx.policy
    proposal_id = parse_proposal_id(proposal_id)
    with node.db.transaction() as session:
        _expire_due(session, now=now)
        note_rules(session, policy, now=now)
    with node.db.transaction() as session:
        row = _proposal(session, proposal_id, lock=True)
        _check_pending(row)
        _check_approver(actor, row.action)
        _check_capability(session, actor, row.action)
        _check_proposer(session, row)
        if terms_sha256 is not None and not hmac.compare_digest(terms_sha256, row.terms_hash):
            raise RefusedError(
                f"proposal {proposal_id} has other terms than the ones you reviewed "
                f"(terms {row.terms_hash[:12]}...): review it again with 'gateway approvals "
                f"show {proposal_id}'",
                reason="approval.terms-changed",
            )
        votes = _votes(session, proposal_id)
        if any(v.approver == actor.name for v in votes):
            raise RefusedError(
                f"{actor.name} approved proposal {proposal_id} already: "
                "another approver has to approve it",
                reason="approval.already-approved",
            )
        mine = _vote(session, actor, row, now=now)
        approvals = _check_distinct(session, policy, row, votes, mine)
        decision = decide(
            k=_needed(policy, row),
            terms=row.terms_hash,
            approvals=approvals,
            expires_at=row.expires_at,
            now=now,
            proposer_enabled=True,  # checked above, under the lock
        )
        if decision.executes and row.action == "users-add-admin":
            return _add_admin(session, row, mine, decision.counted, actor, policy, now)
        if not decision.executes or row.action in CEREMONY_ACTIONS:
            session.add(mine)
            _record(session, "approval-given", actor, row, now, approvals=len(decision.counted))
            session.flush()
            ready = decision.executes and row.action in CEREMONY_ACTIONS
            return {**_view(session, row, policy, now=now).to_dict(), "ready": ready}
        action, terms = row.action, dict(json.loads(row.terms_json))
        proposer = row.proposer
    # The deciding approval: recorded in the transaction that executes the action.
    outcome: dict[str, Any] = {}
    consent_ids: dict[str, str] = {}

    def decide_here(session: Session, ref: str) -> None:
        # a grant hands over the new consent's id, a revocation its bundle's id
        consent_id = consent_ids.get("revoked", ref)
        locked = _proposal(session, proposal_id, lock=True)
        _check_pending(locked)
        _check_proposer(session, locked)
        again = _votes(session, proposal_id)
        if any(v.approver == actor.name for v in again):
            raise RefusedError(
                f"{actor.name} approved proposal {proposal_id} already",
                reason="approval.already-approved",
            )
        # Again under the lock, with who could hold the token now: a token reissued
        # since the first look can refuse this approval (docs/consent.md).
        late = _vote(session, actor, locked, now=now)
        _check_distinct(session, policy, locked, again, late)
        session.add(late)
        session.flush()
        final = decide(
            k=_needed(policy, locked),
            terms=locked.terms_hash,
            approvals=_approvals(session, action, _votes(session, proposal_id)),
            expires_at=locked.expires_at,
            now=now,
            proposer_enabled=True,  # checked above, under the lock
        )
        if final.counted != decision.counted or not final.executes:
            raise RefusedError(
                f"the approvals of proposal {proposal_id} changed meanwhile: approve it again",
                reason="approval.decided",
            )
        _record(session, "approval-given", actor, locked, now, approvals=len(final.counted))
        locked.state = ProposalState.EXECUTED
        locked.decided_at = now
        locked.decided_by = actor.name
        locked.result_ref = consent_id
        _record(
            session,
            "approval-executed",
            actor,
            locked,
            now,
            approvers=list(final.counted),
            consent_id=consent_id,
        )
        outcome["view"] = _view(session, locked, policy, now=now)

    if action == "consent-revoke":
        consent_ids["revoked"] = str(terms["consent_id"])
        sent = consent_protocol.revoke(
            ctx,
            Actor(name=proposer, role=Role.OFFICER),
            str(terms["consent_id"]),
            reason=str(terms["reason"]),
            now=now,
            in_transaction=decide_here,
        )
    elif action == "consent-grant":
        sent = consent_protocol.grant(
            ctx,
            Actor(name=proposer, role=Role.OFFICER),
            str(terms["request_id"]),
            valid_until=parse_time(terms["valid_until"], field="valid_until"),
            max_uses=terms["max_uses"],
            conditions=str(terms["conditions"]),
            now=now,
            approvers=decision.counted,
            approved=terms,
            in_transaction=decide_here,
        )
    else:  # pragma: no cover - every other action is a ceremony or users-add-admin
        raise RefusedError(f"{action} is not executed through approvals", reason="approval.decided")
    view: ProposalView = outcome["view"]
    return {**view.to_dict(), "result": sent.to_dict()}


def _add_admin(
    session: Session,
    row: ApprovalProposal,
    mine: ApprovalVote,
    counted: tuple[str, ...],
    actor: Actor,
    policy: Policy,
    now: datetime,
) -> dict[str, Any]:
    """The deciding approval of ``users-add-admin``: add the administrator, in this
    transaction (the proposal row is locked), and hand its token to this approver once.
    The token is issued by this approver (``created_by``): whoever could hold their
    token could hold the new administrator's too (docs/consent.md, "Token custody")."""
    session.add(mine)
    session.flush()
    name = str(json.loads(row.terms_json)["name"])
    made = add_user(session, name, Role.ADMIN.value, created_by=actor.name, now=now, issuer=actor)
    record_user_added(session, made, actor=actor, now=now)
    _record(session, "approval-given", actor, row, now, approvals=len(counted))
    row.state = ProposalState.EXECUTED
    row.decided_at = now
    row.decided_by = actor.name
    row.result_ref = name
    _record(session, "approval-executed", actor, row, now, approvers=list(counted), user=name)
    session.flush()
    return {**_view(session, row, policy, now=now).to_dict(), "result": made.to_dict()}


def add_user_or_propose(
    node: Node, actor: Actor, name: str, role: str, *, now: datetime, approver: bool = False
) -> dict[str, Any]:
    """``gateway users add``: add at once, or propose a new administrator (two-person rule).

    With ``[approvals.users-add-admin]`` k > 1 and ``role == "admin"``, the
    name is checked and a pending proposal carrying the proposer's approval
    is made (the answer has ``state: "pending"``); the k-th administrator's
    approval adds the user and its answer carries the token, shown once.
    Otherwise the user is added now (``state: "executed"``, the token in the
    answer), as before; ``approver`` gives a new officer the approver
    capability at once (ledger: ``approver-changed`` with ``actor``), and is
    refused (:class:`InvalidInput`) for another role.
    """
    policy = node_policy(node)
    rule = policy.approval_rule("users-add-admin")
    with node.db.transaction() as session:
        note_rules(session, policy, now=now)
        if role != Role.ADMIN.value or rule.k == 1:
            made = add_user(
                session, name, role, created_by=actor.name, now=now, approver=approver, issuer=actor
            )
            record_user_added(session, made, actor=actor, now=now)
            if approver:
                ledger.record_event(
                    session,
                    kind="approver-changed",
                    actor=actor,
                    now=now,
                    body={"user": name, "approver": True},
                )
            return {**made.to_dict(), "state": ProposalState.EXECUTED}
        if approver:
            raise InvalidInput(
                f"only officers hold the approver capability; {name} would be admin: "
                "give it to an officer instead"
            )
        _check_approver(actor, "users-add-admin")
        check_new_user(session, name)
        view = _propose(
            session,
            action="users-add-admin",
            terms={"name": name, "role": Role.ADMIN.value},
            actor=actor,
            rule=rule,
            policy=policy,
            now=now,
        )
        return view.to_dict()


def ceremony_terms(
    action: str,
    *,
    reason: str | None = None,
    key_id: str | None = None,
    compromised_since: datetime | None = None,
) -> dict[str, Any]:
    """What a key ceremony does, as the terms its proposal carries and its run must match.

    ``keys-revoke``: ``{"key_id", "reason", "compromised_since"}`` (RFC 3339 text
    to the whole second, or ``None`` for "from the revocation"); ``keys-recover``:
    ``{"reason"}`` (it is written into the manifest); ``keys-rotate`` and
    ``keys-rotate-root``: ``{}`` (the proposal's reason is the proposer's
    explanation; the ceremony takes none). Raises :class:`InvalidInput` for an
    option the action does not take.
    """
    if action == "keys-revoke":
        if key_id is None or reason is None:
            raise InvalidInput("keys-revoke: name the key to revoke (key_id) and the reason")
        since = None if compromised_since is None else compromised_since.replace(microsecond=0)
        return {
            "key_id": key_id,
            "reason": reason,
            "compromised_since": None if since is None else format_time(since),
        }
    if key_id is not None or compromised_since is not None:
        raise InvalidInput(f"{action} takes no key id and no compromised-since: only keys-revoke")
    if action == "keys-recover":
        if reason is None:
            raise InvalidInput("keys-recover: give the reason written into the manifest")
        return {"reason": reason}
    return {}


def propose_key_change(
    node: Node,
    actor: Actor,
    action: str,
    *,
    reason: str,
    key_id: str | None,
    now: datetime,
    compromised_since: datetime | None = None,
) -> dict[str, Any]:
    """An administrator proposes a key ceremony (two-person rule).

    Terms: ``{"reason"}`` and what :func:`ceremony_terms` gives (for
    ``keys-revoke`` the key, the reason and ``compromised_since``); the
    proposer's approval is recorded. Once k administrators approved,
    ``gateway keys rotate|revoke|rotate-root|recover ... --proposal ID`` on
    the host executes it with exactly these options. Refused when the policy
    asks one approver only (nothing to propose), the terms are malformed, or
    (``keys-revoke``) the revocation would be refused now: a key not in the
    manifest (:class:`NotFound`), revoked already (:class:`AlreadyExists`),
    the root key, a compromised-since in the future (:class:`InvalidInput`).
    """
    if action not in CEREMONY_ACTIONS:
        raise InvalidInput(
            f"action must be one of {', '.join(CEREMONY_ACTIONS)}; consent grants are "
            "proposed by 'gateway consent grant'"
        )
    _check_approver(actor, action)
    validate_text(reason, field="reason", max_chars=MAX_REASON)
    if key_id is not None:
        validate_text(key_id, field="key_id", max_chars=64)
    terms: dict[str, Any] = {
        "reason": reason,
        **ceremony_terms(action, reason=reason, key_id=key_id, compromised_since=compromised_since),
    }
    policy = node_policy(node)
    rule = policy.approval_rule(action)
    if rule.k == 1:
        raise InvalidInput(
            f"the policy asks one approver for {action}: run 'gateway keys "
            f"{action.removeprefix('keys-')}' on the host without a proposal"
        )
    with node.db.transaction() as session:
        note_rules(session, policy, now=now)
        if action == "keys-revoke" and key_id is not None:
            # checked as the ceremony will check it, so a doomed proposal is never made
            own_keys.preview_revocation(
                node.settings,
                session,
                key_id,
                reason,
                now=now,
                compromised_since=compromised_since,
            )
        view = _propose(
            session,
            action=action,
            terms=terms,
            actor=actor,
            rule=rule,
            policy=policy,
            now=now,
        )
        return view.to_dict()


def claim_for_ceremony(
    session: Session,
    node: Node,
    actor: Actor,
    action: str,
    *,
    proposal_id: str | None,
    terms: dict[str, Any],
    now: datetime,
) -> tuple[str, ...]:
    """Before a key ceremony changes anything: check and consume its approval.

    Runs in the ceremony's own transaction, so the proposal is executed
    exactly when the keys change (and stays pending if the ceremony fails).
    With the policy's k = 1 and no proposal: nothing to check, returns ``()``.
    Otherwise the proposal must be of ``action``, pending, unexpired, made by
    a proposer still enabled, approved by k distinct enabled administrators
    (k: the larger of the proposal's and the policy's now), and its terms must
    equal ``terms`` (:func:`ceremony_terms` of the ceremony's options: for
    ``keys-revoke`` the key, the reason and the compromised-since). Returns
    the approvers, recorded in ``approval-executed``. Refused with
    ``approval.pending`` (409), ``approval.terms-changed``,
    ``approval.proposer-disabled``, ``approval.expired`` or ``approval.decided``.
    """
    policy = node_policy(node)
    rule = policy.approval_rule(action)
    note_rules(session, policy, now=now)
    if proposal_id is None:
        if rule.k == 1:
            return ()
        raise RefusedError(
            f"{action} needs {rule.k} administrators' approval (policy [approvals.{action}]): "
            f"propose it with 'gateway approvals propose {action} --reason ...', have "
            f"{rule.k - 1} other administrator(s) approve it, then run this again with "
            "--proposal ID",
            reason="approval.pending",
        )
    _expire_due(session, now=now)
    row = _proposal(session, proposal_id, lock=True)
    if row.action != action:
        raise InvalidInput(f"proposal {proposal_id} is a {row.action}, not a {action}")
    _check_pending(row)
    _check_proposer(session, row)
    stored = dict(json.loads(row.terms_json))
    compared = {key: stored.get(key) for key in terms}
    if compared != terms:
        approved = ", ".join(f"{key} {value!r}" for key, value in compared.items())
        asked = ", ".join(f"{key} {value!r}" for key, value in terms.items())
        raise RefusedError(
            f"proposal {proposal_id} approved {action} with {approved}; this ceremony asks "
            f"{asked}: run it with the approved options, or propose again; nothing was changed",
            reason="approval.terms-changed",
        )
    needed = _needed(policy, row)
    decision = decide(
        k=needed,
        terms=row.terms_hash,
        approvals=_approvals(session, action, _votes(session, proposal_id)),
        expires_at=row.expires_at,
        now=now,
        proposer_enabled=True,  # checked above, under the lock
    )
    if not decision.executes:
        raise RefusedError(
            f"proposal {proposal_id} has {len(decision.counted)} of {needed} approvals: "
            "another administrator has to run 'gateway approvals approve "
            f"{proposal_id}' first; nothing was changed",
            reason="approval.pending",
        )
    row.state = ProposalState.EXECUTED
    row.decided_at = now
    row.decided_by = actor.name
    _record(session, "approval-executed", actor, row, now, approvers=list(decision.counted))
    return decision.counted


def reject(
    node: Node, actor: Actor, proposal_id: str, *, reason: str, now: datetime
) -> dict[str, Any]:
    """Reject a pending proposal for good (ledger: ``approval-rejected`` with the reason).

    Any user who may approve the action may reject it, the proposer included.
    """
    validate_text(reason, field="reason", max_chars=MAX_REASON)
    proposal_id = parse_proposal_id(proposal_id)
    with node.db.transaction() as session:
        _expire_due(session, now=now)
    with node.db.transaction() as session:
        row = _proposal(session, proposal_id, lock=True)
        _check_pending(row)
        _check_approver(actor, row.action)
        row.state = ProposalState.REJECTED
        row.decided_at = now
        row.decided_by = actor.name
        row.reason = reason
        _record(session, "approval-rejected", actor, row, now, reason=reason)
        session.flush()
        return _view(session, row, node_policy(node), now=now).to_dict()


def parse_terms_hash(value: object) -> str | None:
    """An optional ``terms_sha256`` field: 64 lower-case hex digits or absent."""
    if value is None:
        return None
    if not isinstance(value, str) or not SHA256_HEX.fullmatch(value):
        raise InvalidInput("field 'terms_sha256' must be 64 lower-case hex digits")
    return value
