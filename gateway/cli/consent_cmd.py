"""``gateway consent request | grant | deny | revoke | list``: written consent (MOC item 3).

Thin clients of the running node: each command parses, calls the node's
local API with the acting officer's token (:mod:`gateway.client`), and
prints. The node signs with its keys: the request, the grant, the denial and
the revocation travel to the peer as bundles, and every step is recorded in
the ledger under the acting officer's name.
"""

from __future__ import annotations

from typing import Any

import click

from gateway.cli.approvals_cmd import warned
from gateway.cli.base import GatewayGroup
from gateway.cli.context import AppContext, pass_app
from gateway.cli.display import when

__all__ = ["consent_group"]


def _when(value: Any) -> str:
    return when(value)


def _path(*segments: str) -> str:
    from gateway.client.transport import path_of  # noqa: PLC0415

    return path_of(*segments)


@click.group(cls=GatewayGroup, name="consent")
def consent_group() -> None:
    """Ask for, grant, deny, revoke and list written consent to disclose the peer's items.

    Runs through the node's local API; needs your token.
    """


@consent_group.command(name="request")
@click.argument("bundle_ids", metavar="BUNDLE_ID...", nargs=-1, required=True)
@click.option("--recipient", required=True, help="The third party the items would go to.")
@click.option("--purpose", required=True, help="What the third party needs them for.")
@pass_app
def request_command(
    app: AppContext, bundle_ids: tuple[str, ...], recipient: str, purpose: str
) -> None:
    """Ask the originating side for consent to pass its bundles to a third party."""
    sent = app.client("consent.request").call(
        "POST",
        "/api/v1/consents/requests",
        {"bundle_ids": list(bundle_ids), "recipient": recipient, "purpose": purpose},
    )
    app.emit(
        sent,
        f"consent request {sent['request_id']} queued for the peer "
        f"({len(bundle_ids)} item(s), recipient {recipient!r})",
    )


@consent_group.command(name="grant")
@click.argument("request_id")
@click.option(
    "--valid-until",
    metavar="DATE",
    help="Last day (YYYY-MM-DD, UTC) or exact end time; default and maximum: the policy's.",
)
@click.option("--max-uses", type=click.IntRange(1), help="How many disclosures it allows.")
@click.option("--conditions", default="", help="Conditions the recipient must keep.")
@pass_app
def grant_command(
    app: AppContext,
    request_id: str,
    valid_until: str | None,
    max_uses: int | None,
    conditions: str,
) -> None:
    """Give the peer written consent for its request; it is signed and sent.

    \b
    Under the policy's [approvals.consent-grant] k > 1 (two-person rule) the
    grant is not sent yet: it becomes a proposal with these exact terms, and
    is signed and sent when k officers holding the approver capability have
    approved it. See and approve proposals with 'gateway approvals list',
    'gateway approvals show ID' and 'gateway approvals approve ID'.
    """
    from gateway.core.times import DateMeans, parse_user_time  # noqa: PLC0415

    body: dict[str, Any] = {"conditions": conditions} if conditions else {}
    if valid_until is not None:
        # Checked here too, so a mistake is named as the option it was typed as.
        parse_user_time(valid_until, option="--valid-until", dates=DateMeans.END)
        body["valid_until"] = valid_until
    if max_uses is not None:
        body["max_uses"] = max_uses
    sent = app.client("consent.grant").call(
        "POST", _path("consents", "requests", request_id, "grant"), body
    )
    if sent["state"] != "executed":
        warned(sent)
        app.emit(
            sent,
            f"proposal {sent['proposal_id']} made for request {request_id}: "
            f"{sent['approvals']} of {sent['needed']} approvals (two-person rule); another "
            f"approver runs 'gateway approvals approve {sent['proposal_id']}'",
        )
        return
    uses = "unlimited uses" if sent["max_uses"] is None else f"at most {sent['max_uses']} use(s)"
    app.emit(
        sent,
        f"consent {sent['consent_id']} granted for request {request_id}, valid until "
        f"{_when(sent['valid_until'])}, {uses}; queued for the peer",
    )


@consent_group.command(name="deny")
@click.argument("request_id")
@click.option("--reason", required=True, help="Why consent is refused (sent to the peer).")
@pass_app
def deny_command(app: AppContext, request_id: str, reason: str) -> None:
    """Refuse the peer's consent request; the peer is told the reason."""
    sent = app.client("consent.deny").call(
        "POST", _path("consents", "requests", request_id, "deny"), {"reason": reason}
    )
    app.emit(sent, f"consent request {request_id} denied; queued for the peer")


@consent_group.command(name="revoke")
@click.argument("consent_id")
@click.option("--reason", required=True, help="Why consent is withdrawn (sent to the peer).")
@pass_app
def revoke_command(app: AppContext, consent_id: str, reason: str) -> None:
    """Withdraw a consent this side granted; the peer refuses its use once it arrives."""
    sent = app.client("consent.revoke").call(
        "POST", _path("consents", consent_id, "revoke"), {"reason": reason}
    )
    if sent["state"] != "executed":
        warned(sent)
        app.emit(
            sent,
            f"proposal {sent['proposal_id']} made to revoke consent {consent_id}: "
            f"{sent['approvals']} of {sent['needed']} approvals (two-person rule); another "
            f"officer runs 'gateway approvals approve {sent['proposal_id']}'",
        )
        return
    app.emit(sent, f"consent {consent_id} revoked; queued for the peer")


@consent_group.command(name="list")
@pass_app
def list_command(app: AppContext) -> None:
    """Consent requests and consents, both directions, with each consent's state."""
    listing = app.client("consent.list").call("GET", "/api/v1/consents")

    def text() -> str:
        lines = ["requests:"] if listing["requests"] else ["requests: none"]
        for r in listing["requests"]:
            arrow = "we asked" if r["direction"] == "outgoing" else "peer asked"
            lines.append(
                f"  {r['request_id']}  {arrow:<10} {r['status']:<8} "
                f"to {r['third_party']!r} for {r['purpose']!r}: {', '.join(r['items'])}"
            )
        lines.append("consents:" if listing["consents"] else "consents: none")
        for c in listing["consents"]:
            side = "granted by us" if c["direction"] == "issued" else "granted to us"
            uses = (
                f"{c['uses_spent']} used"
                if c["max_uses"] is None
                else f"{c['uses_spent']}/{c['max_uses']} used"
            )
            if c.get("use_violations"):
                uses += f" ({c['use_violations']} VIOLATION(S))"
            lines.append(
                f"  {c['consent_id']}  {side:<13} {c['state']:<8} until {_when(c['valid_until'])}"
                f"  {uses}  to {c['third_party']!r} for {c['purpose']!r}: {', '.join(c['items'])}"
            )
            if c.get("approvers"):
                lines.append(f"    approved by {', '.join(c['approvers'])} (two-person rule)")
        for b in listing["refused_bundles"]:
            lines.append(f"refused bundle {b['bundle_id']} ({b['type']}): {b['detail']}")
        return "\n".join(lines)

    app.emit(listing, text)
