"""``gateway approvals list | show | propose | approve | reject``: the two-person rule.

Thin clients of the running node: each command calls the node's local API
with the acting user's token. Officers approve consent grants, administrators
key and user changes (the policy's ``[approvals]``). The approval that
completes a proposal makes its action happen (a consent grant is signed and
sent, naming every approver).
"""

from __future__ import annotations

import sys
import uuid
from typing import Any

import click

from gateway.cli.base import GatewayGroup
from gateway.cli.context import AppContext, pass_app
from gateway.cli.display import proposal_text

__all__ = ["PROPOSAL_ID", "approvals_group"]


def _path(*segments: str) -> str:
    from gateway.client.transport import path_of  # noqa: PLC0415

    return path_of(*segments)


def describe(proposal: dict[str, Any]) -> str:
    """One proposal as ``approvals list`` prints it (see :func:`proposal_text`)."""
    return proposal_text(proposal)


class _ProposalId(click.ParamType[str, Any]):
    """A proposal id: a UUID, checked before anything is sent to the node."""

    name = "proposal-id"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        try:
            if len(text) > 64:
                raise ValueError(text)
            return str(uuid.UUID(text))
        except ValueError:
            self.fail(
                f"{text[:64]!r} is no proposal id: a proposal id is a UUID, as "
                "'gateway approvals list' shows it",
                param,
                ctx,
            )


PROPOSAL_ID = _ProposalId()
"""The click type of a proposal id argument or option (also ``keys ... --proposal``)."""


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
        lambda: "\n\n".join(describe(p) for p in listing) if listing else "no proposals",
    )


def _fetch(app: AppContext, proposal_id: str) -> dict[str, Any]:
    shown: dict[str, Any] = app.client("approvals.list").call(
        "GET", _path("approvals", proposal_id)
    )
    return shown


@approvals_group.command(name="show")
@click.argument("proposal_id", type=PROPOSAL_ID)
@pass_app
def show_command(app: AppContext, proposal_id: str) -> None:
    """One proposal in full: its action and every term, the terms hash, who approved."""
    shown = app.client("approvals.list").call("GET", _path("approvals", proposal_id))
    app.emit(shown, lambda: proposal_text(shown, full=True))


def warned(answer: dict[str, Any]) -> None:
    """Print a proposal's warning (too few possible approvers) on standard error."""
    if answer.get("warning"):
        click.echo(f"warning: {answer['warning']}", err=True)


@approvals_group.command(name="propose")
@click.argument(
    "action",
    type=click.Choice(["keys-rotate", "keys-revoke", "keys-rotate-root", "keys-recover"]),
)
@click.option(
    "--reason",
    required=True,
    help="Why the keys should change (in the ledger's approval-proposed entry and the "
    "terms; keys-revoke and keys-recover: the reason the ceremony must give).",
)
@click.option("--key-id", help="The key to revoke (keys-revoke only).")
@click.option(
    "--compromised-since",
    metavar="TIME",
    help="keys-revoke only: when the key may have left your control (ISO 8601, UTC if no "
    "zone); the ceremony must give the same. Default: the revocation time.",
)
@pass_app
def propose_command(
    app: AppContext,
    action: str,
    reason: str,
    key_id: str | None,
    compromised_since: str | None,
) -> None:
    """Propose a key rotation, revocation, root rotation or recovery for approval.

    Other administrators approve it; once approved, the host ceremony runs it with --proposal ID and the same options.
    """
    body = {"action": action, "reason": reason}
    if key_id is not None:
        body["key_id"] = key_id
    if compromised_since is not None:
        body["compromised_since"] = compromised_since
    made = app.client("approvals.propose").call("POST", "/api/v1/approvals", body)
    warned(made)
    app.emit(
        made,
        f"proposal {made['proposal_id']} made: {made['approvals']} of {made['needed']} "
        f"approvals; once approved, run 'gateway keys {action.removeprefix('keys-')} ... "
        f"--proposal {made['proposal_id']}' on the host with the same options",
    )


@approvals_group.command(name="approve")
@click.argument("proposal_id", type=PROPOSAL_ID)
@click.option(
    "--terms",
    "terms_sha256",
    metavar="SHA256",
    help="The terms hash you reviewed (from 'approvals show'); refused if they differ. "
    "Without it the terms are shown and you are asked to confirm.",
)
@click.option(
    "--yes",
    is_flag=True,
    help="Do not ask for confirmation: approve the terms as fetched now (for scripts).",
)
@pass_app
def approve_command(app: AppContext, proposal_id: str, terms_sha256: str | None, yes: bool) -> None:
    """Approve a proposal; the last approval needed makes the action happen.

    \b
    Without --terms the proposal is fetched, its terms and terms hash shown,
    and you confirm on a terminal (--yes to skip); the approval names that
    hash, so terms changed in between are refused (approval.terms-changed).
    """
    if terms_sha256 is None:
        shown = _fetch(app, proposal_id)
        text = proposal_text(shown, full=True)
        if not yes:
            if app.as_json or not sys.stdin.isatty():
                raise click.UsageError(
                    f"approving proposal {proposal_id} needs you to see its terms: run it on "
                    f"a terminal, or review them with 'gateway approvals show {proposal_id}' "
                    "and pass --terms SHA256 (or --yes)"
                )
            click.echo(text, err=True)
            click.confirm(f"Approve proposal {proposal_id} with these terms?", abort=True, err=True)
        terms_sha256 = str(shown["terms_sha256"])
    body = {"terms_sha256": terms_sha256}
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
@click.argument("proposal_id", type=PROPOSAL_ID)
@click.option("--reason", required=True, help="Why the proposal is rejected (in the ledger).")
@pass_app
def reject_command(app: AppContext, proposal_id: str, reason: str) -> None:
    """Reject a proposal for good; a new proposal is needed to try again."""
    done = app.client("approvals.reject").call(
        "POST", _path("approvals", proposal_id, "reject"), {"reason": reason}
    )
    app.emit(done, f"proposal {proposal_id} rejected")
