"""``gateway approvals list | approve | reject``: the two-person rule.

Thin clients of the running node: each command calls the node's local API
with the acting user's token. Officers approve consent grants, administrators
key and user changes (the policy's ``[approvals]``). The approval that
completes a proposal makes its action happen (a consent grant is signed and
sent, naming every approver).
"""

from __future__ import annotations

from typing import Any

import click

from gateway.cli.base import GatewayGroup
from gateway.cli.context import AppContext, pass_app
from gateway.cli.display import proposer_note, when

__all__ = ["approvals_group"]


def _path(*segments: str) -> str:
    from gateway.client.transport import path_of  # noqa: PLC0415

    return path_of(*segments)


def describe(proposal: dict[str, Any]) -> str:
    """One proposal in one or two lines: id, action, state, approvals of needed, terms."""
    terms = proposal["terms"]
    what = proposal["action"]
    if what == "consent-grant":
        uses = (
            "unlimited uses" if terms["max_uses"] is None else f"at most {terms['max_uses']} use(s)"
        )
        what += (
            f" for request {terms['request_id']} ({', '.join(terms['items'])}) to "
            f"{terms['third_party']!r} for {terms['purpose']!r}, until "
            f"{when(terms['valid_until'])}, {uses}"
        )
    elif what == "consent-revoke":
        what += (
            f" of consent {terms['consent_id']} (request {terms['request_id']}): "
            f"{terms['reason']!r}"
        )
    approvers = ", ".join(proposal["approvers"]) or "nobody"
    return (
        f"{proposal['proposal_id']}  {proposal['state']:<8} "
        f"{proposal['approvals']} of {proposal['needed']} approvals ({approvers}); "
        f"proposed by {proposal['proposer']}, expires {when(proposal['expires_at'])}\n"
        f"  {what}\n  terms sha256 {proposal['terms_sha256']}"
    )


@click.group(cls=GatewayGroup, name="approvals")
def approvals_group() -> None:
    """List, propose, approve and reject proposals under the two-person rule.

    Runs through the node's local API; needs your token.
    """


@approvals_group.command(name="list")
@click.option(
    "--state",
    type=click.Choice(["pending", "executed", "rejected", "expired"]),
    help="Only proposals in this state.",
)
@pass_app
def list_command(app: AppContext, state: str | None) -> None:
    """Proposals your role approves, newest first, with their terms and approvers."""
    from gateway.client.transport import path_of  # noqa: PLC0415

    listing = app.client("approvals.list").call("GET", path_of("approvals", query={"state": state}))
    app.emit(
        listing,
        lambda: "\n".join(describe(p) for p in listing) if listing else "no proposals",
    )


@approvals_group.command(name="propose")
@click.argument("action", type=click.Choice(["keys-rotate", "keys-revoke", "keys-rotate-root"]))
@click.option("--reason", required=True, help="Why the keys should change (in the ledger).")
@click.option("--key-id", help="The key to revoke (keys-revoke only).")
@pass_app
def propose_command(app: AppContext, action: str, reason: str, key_id: str | None) -> None:
    """Propose a key rotation, revocation or root rotation; other administrators approve it."""
    body = {"action": action, "reason": reason}
    if key_id is not None:
        body["key_id"] = key_id
    made = app.client("approvals.propose").call("POST", "/api/v1/approvals", body)
    app.emit(
        made,
        f"proposal {made['proposal_id']} made: {made['approvals']} of {made['needed']} "
        f"approvals; once approved, run 'gateway keys {action.removeprefix('keys-')} ... "
        f"--proposal {made['proposal_id']}' on the host{proposer_note(made)}",
    )


@approvals_group.command(name="approve")
@click.argument("proposal_id")
@click.option(
    "--terms",
    "terms_sha256",
    metavar="SHA256",
    help="The terms hash you reviewed (from 'approvals list'); refused if they differ.",
)
@pass_app
def approve_command(app: AppContext, proposal_id: str, terms_sha256: str | None) -> None:
    """Approve a proposal; the last approval needed makes the action happen."""
    body = {} if terms_sha256 is None else {"terms_sha256": terms_sha256}
    done = app.client("approvals.approve").call(
        "POST", _path("approvals", proposal_id, "approve"), body
    )
    if done["state"] == "executed":
        result = done.get("result") or {}
        text = f"proposal {proposal_id} approved by {', '.join(done['counted'])}: executed"
        if result.get("consent_id"):
            text += f"; consent {result['consent_id']} signed and queued for the peer"
        if result.get("token"):
            text += (
                f"; added administrator {result['name']}.\nToken (shown once; hand it over in "
                f"person or in a 0600 file):\n  {result['token']}"
            )
    elif done.get("ready"):
        text = (
            f"proposal {proposal_id} approved by {', '.join(done['counted'])}: ready; the "
            f"host ceremony runs it with --proposal {proposal_id}"
        )
    else:
        text = (
            f"proposal {proposal_id}: {done['approvals']} of {done['needed']} approvals; "
            "waiting for another approver"
        )
    app.emit(done, text)


@approvals_group.command(name="reject")
@click.argument("proposal_id")
@click.option("--reason", required=True, help="Why the proposal is rejected (in the ledger).")
@pass_app
def reject_command(app: AppContext, proposal_id: str, reason: str) -> None:
    """Reject a proposal for good; a new proposal is needed to try again."""
    done = app.client("approvals.reject").call(
        "POST", _path("approvals", proposal_id, "reject"), {"reason": reason}
    )
    app.emit(done, f"proposal {proposal_id} rejected")
