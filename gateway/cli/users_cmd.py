"""``gateway users``: the people who act on this node, one role each."""

from __future__ import annotations

import click

from gateway.cli.base import GatewayGroup
from gateway.cli.context import AppContext, pass_app
from gateway.node.runtime import utc_now
from gateway.node.users import add_user, disable_user, list_users, reissue_token

__all__ = ["users"]


@click.group(cls=GatewayGroup)
def users() -> None:
    """Manage users: administrators, officers and compliance officers.

    \b
    Roles:
      admin       keys, peer, users, node
      officer     send, inbox, show, consent, disclose
      compliance  ledger list, verify, export, audit-peer (metadata only)
    """


@users.command("add")
@click.argument("name")
@click.option(
    "--role",
    type=click.Choice(["admin", "officer", "compliance"]),
    required=True,
    help="The one role this user holds.",
)
@pass_app
def add(app: AppContext, name: str, role: str) -> None:
    """Add a user and print its token once.

    \b
    Example:
      gateway users add tanaka --role officer
    """
    actor = app.actor("users.add")
    with app.node().db.transaction() as session:
        created = add_user(session, name, role, created_by=actor.name, now=utc_now())
    app.emit(
        created.to_dict(),
        f"Added {created.name} ({created.role.value}).\n"
        "Token (shown once; keep it secret, e.g. in a 0600 file):\n"
        f"  {created.token.text}",
    )


@users.command("list")
@pass_app
def list_(app: AppContext) -> None:
    """List users with their role and state (never their tokens)."""
    app.actor("users.list")
    with app.node().db.transaction() as session:
        rows = list_users(session)
    data = [r.to_dict() for r in rows]

    def human() -> str:
        lines = [f"{'NAME':<24} {'ROLE':<11} {'STATE':<9} CREATED"]
        for r in rows:
            state = "disabled" if r.disabled else "active"
            lines.append(
                f"{r.name:<24} {r.role:<11} {state:<9} {r.created_at:%Y-%m-%d %H:%M} by {r.created_by}"
            )
        return "\n".join(lines)

    app.emit(data, human)


@users.command("disable")
@click.argument("name")
@pass_app
def disable(app: AppContext, name: str) -> None:
    """Disable a user: its token is refused from now on."""
    actor = app.actor("users.disable")
    with app.node().db.transaction() as session:
        disable_user(session, name, now=utc_now(), by=actor.name)
    app.emit({"name": name, "disabled": True}, f"Disabled {name}.")


@users.command("new-token")
@click.argument("name")
@pass_app
def new_token(app: AppContext, name: str) -> None:
    """Replace a user's token (the old one stops working) and print the new one once."""
    actor = app.actor("users.add")
    with app.node().db.transaction() as session:
        token = reissue_token(session, name, now=utc_now(), by=actor.name)
    app.emit(
        {"name": name, "token": token.text},
        f"New token for {name} (shown once; the old one no longer works):\n  {token.text}",
    )
