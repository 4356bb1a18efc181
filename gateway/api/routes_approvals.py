"""Local API routes of the two-person rule: list, approve, reject proposals.

The same services as ``gateway approvals ...``. Which proposals a user sees and
may approve follows the policy (officers: consent; administrators: keys and
users). The approval that completes a proposal executes its action in the same
transaction and answers with the proposal and the action's result.
"""

from __future__ import annotations

from aiohttp import web

from gateway.api.routes_common import (
    ApiRoute,
    Call,
    json_response,
    optional_str,
    refuse_unknown_fields,
    require_str,
)
from gateway.core.approvals import ProposalState
from gateway.errors import InvalidInput
from gateway.node import approvals
from gateway.node.ledger.read import parse_since
from gateway.node.runtime import utc_now

__all__ = ["ROUTES"]

_STATES = {state.value for state in ProposalState}


async def approvals_list(call: Call) -> web.StreamResponse:
    state = call.query("state")
    if state is not None and state not in _STATES:
        raise InvalidInput(f"query 'state' must be one of {', '.join(sorted(_STATES))}")
    views = await call.run(
        lambda: approvals.list_proposals(call.node, call.actor, now=utc_now(), state=state)
    )
    return json_response([view.to_dict() for view in views])


async def approvals_show(call: Call) -> web.StreamResponse:
    proposal_id = approvals.parse_proposal_id(call.path("proposal_id"))
    view = await call.run(
        lambda: approvals.show_proposal(call.node, call.actor, proposal_id, now=utc_now())
    )
    return json_response(view.to_dict())


async def approvals_propose(call: Call) -> web.StreamResponse:
    body = await call.json_body()
    refuse_unknown_fields(body, {"action", "reason", "key_id", "compromised_since"})
    action = require_str(body, "action", max_length=32)
    reason = require_str(body, "reason", max_length=approvals.MAX_REASON)
    key_id = optional_str(body, "key_id", max_length=64)
    since = parse_since(
        optional_str(body, "compromised_since", max_length=64), option="compromised_since"
    )
    made = await call.run(
        lambda: approvals.propose_key_change(
            call.node,
            call.actor,
            action,
            reason=reason,
            key_id=key_id,
            compromised_since=since,
            now=utc_now(),
        )
    )
    return json_response(made, status=201)


async def approvals_approve(call: Call) -> web.StreamResponse:
    proposal_id = approvals.parse_proposal_id(call.path("proposal_id"))
    body = await call.json_body()
    refuse_unknown_fields(body, {"terms_sha256"})
    reviewed = approvals.parse_terms_hash(body.get("terms_sha256"))
    if reviewed is None:
        raise InvalidInput(
            "field 'terms_sha256' is required: the terms hash of the proposal as you reviewed "
            f"it ('gateway approvals show {proposal_id}'); nobody approves unseen terms"
        )
    done = await call.run(
        lambda: approvals.approve(
            call.ctx, call.actor, proposal_id, terms_sha256=reviewed, now=utc_now()
        )
    )
    return json_response(done, status=200)


async def approvals_reject(call: Call) -> web.StreamResponse:
    proposal_id = approvals.parse_proposal_id(call.path("proposal_id"))
    body = await call.json_body()
    refuse_unknown_fields(body, {"reason"})
    reason = require_str(body, "reason", max_length=approvals.MAX_REASON)
    done = await call.run(
        lambda: approvals.reject(call.node, call.actor, proposal_id, reason=reason, now=utc_now())
    )
    return json_response(done)


ROUTES = (
    ApiRoute(
        "GET",
        "/api/v1/approvals",
        "approvals.list",
        approvals_list,
        "Proposals under the two-person rule that this user's role approves",
    ),
    ApiRoute(
        "POST",
        "/api/v1/approvals",
        "approvals.propose",
        approvals_propose,
        "Propose a key rotation or revocation for other administrators to approve",
    ),
    ApiRoute(
        "GET",
        "/api/v1/approvals/{proposal_id}",
        "approvals.list",
        approvals_show,
        "One proposal in full: its terms, terms hash, approvers",
    ),
    ApiRoute(
        "POST",
        "/api/v1/approvals/{proposal_id}/approve",
        "approvals.approve",
        approvals_approve,
        "Approve a proposal; the k-th approval executes its action",
    ),
    ApiRoute(
        "POST",
        "/api/v1/approvals/{proposal_id}/reject",
        "approvals.reject",
        approvals_reject,
        "Reject a proposal for good, with a reason",
    ),
)
