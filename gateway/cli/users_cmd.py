"""``gateway users``: the people who act on this node, one role each.

Thin clients of the running node: an administrator's token, the node's local
API (:mod:`gateway.client`); no passphrase, no database.
"""

from __future__ import annotations

import click

from gateway.cli.base import GatewayGroup
from gateway.cli.context import AppContext, pass_app
from gateway.cli.display import when


def _path(*segments: str) -> str:
    from gateway.client.transport import path_of  # noqa: PLC0415

    return path_of(*segments)


__all__ = ["users"]


@click.group(cls=GatewayGroup)
def users() -> None:
    """Manage users: administrators, officers and compliance officers.

    \b
    Roles:
      admin       keys, peer, users, node
      officer     send, inbox, show, consent, disclose
      compliance  ledger list, verify, export, audit-peer (metadata only)

    Runs through the node's local API; needs your token.
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
    created = app.client("users.add").call("POST", "/api/v1/users", {"name": name, "role": role})
    if created["state"] != "executed":
        app.emit(
            created,
            f"proposal {created['proposal_id']} made to add administrator {name}: "
            f"{created['approvals']} of {created['needed']} approvals (two-person rule); the "
            "administrator whose approval completes it receives the token, once",
        )
        return
    app.emit(
        created,
        f"Added {created['name']} ({created['role']}).\n"
        "Token (shown once; keep it secret, e.g. in a 0600 file):\n"
        f"  {created['token']}",
    )


@users.command("list")
@pass_app
def list_(app: AppContext) -> None:
    """List users with their role and state (never their tokens)."""
    data = app.client("users.list").call("GET", "/api/v1/users")

    def human() -> str:
        lines = [f"{'NAME':<24} {'ROLE':<11} {'STATE':<9} CREATED"]
        for r in data:
            state = "disabled" if r["disabled"] else "active"
            created = when(r["created_at"])[:16].replace("T", " ")
            lines.append(
                f"{r['name']:<24} {r['role']:<11} {state:<9} {created} by {r['created_by']}"
            )
        return "\n".join(lines)

    app.emit(data, human)


@users.command("disable")
@click.argument("name")
@pass_app
def disable(app: AppContext, name: str) -> None:
    """Disable a user: its token is refused from now on."""
    app.client("users.disable").call("POST", _path("users", name, "disable"), {})
    app.emit({"name": name, "disabled": True}, f"Disabled {name}.")


@users.command("new-token")
@click.argument("name")
@pass_app
def new_token(app: AppContext, name: str) -> None:
    """Replace a user's token (the old one stops working) and print the new one once."""
    answer = app.client("users.add").call("POST", _path("users", name, "token"), {})
    app.emit(
        {"name": name, "token": answer["token"]},
        f"New token for {name} (shown once; the old one no longer works):\n  {answer['token']}",
    )
