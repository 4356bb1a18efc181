"""``gateway users``: the people who act on this node, one role each.

Thin clients of the running node: an administrator's token, the node's local
API (:mod:`gateway.client`); no passphrase, no database. One host operation:
``users enrol`` (the keystore passphrase and the database, no token).
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

    Runs through the node's local API; needs your token. 'users enrol' is
    the host operator's: it needs the keystore passphrase instead.
    """


@users.command("add")
@click.argument("name")
@click.option(
    "--role",
    type=click.Choice(["admin", "officer", "compliance"]),
    required=True,
    help="The one role this user holds.",
)
@click.option(
    "--approver",
    is_flag=True,
    help="Officers only: may approve consent grants under the two-person rule.",
)
@pass_app
def add(app: AppContext, name: str, role: str, approver: bool) -> None:
    """Add a user and print its token once.

    \b
    Examples:
      gateway users add tanaka --role officer
      gateway users add asma --role officer --approver
    """
    body: dict[str, object] = {"name": name, "role": role}
    if approver:
        body["approver"] = True
    created = app.client("users.add").call("POST", "/api/v1/users", body)
    if created["state"] != "executed":
        if created.get("warning"):
            click.echo(f"warning: {created['warning']}", err=True)
        app.emit(
            created,
            f"proposal {created['proposal_id']} made to add administrator {name}: "
            f"{created['approvals']} of {created['needed']} approvals (two-person rule); the "
            "administrator whose approval completes it receives the token, once",
        )
        return
    approving = ", approver" if created.get("approver") else ""
    app.emit(
        created,
        f"Added {created['name']} ({created['role']}{approving}).\n"
        "Token (shown once; keep it secret, e.g. in a 0600 file):\n"
        f"  {created['token']}",
    )


@users.command("list")
@pass_app
def list_(app: AppContext) -> None:
    """List users with their role and state (never their tokens).

    The last column says who issued each user's token and who else could hold
    it: under the two-person rule two approvals count as two people only when
    no one could hold both tokens (docs/consent.md, "Token custody").
    """
    data = app.client("users.list").call("GET", "/api/v1/users")

    def human() -> str:
        lines = [
            f"{'NAME':<24} {'ROLE':<11} {'APPROVER':<8} {'STATE':<9} {'CREATED':<16}  "
            "TOKEN ISSUED BY / ALSO HELD BY"
        ]
        for r in data:
            state = "disabled" if r["disabled"] else "active"
            approver = "yes" if r.get("approver") else "-"
            created = when(r["created_at"])[:16].replace("T", " ")
            others = [h for h in r.get("token_holders", []) if h != r["name"]]
            held = ", ".join(others) if others else "no one else"
            lines.append(
                f"{r['name']:<24} {r['role']:<11} {approver:<8} {state:<9} {created:<16}  "
                f"{r.get('token_issued_by', '?')} / {held}"
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


@users.command("approver")
@click.argument("name")
@click.argument("state", type=click.Choice(["on", "off"]))
@pass_app
def approver_(app: AppContext, name: str, state: str) -> None:
    """Give (on) or take (off) an officer's approver capability; recorded in the ledger.

    Only officers holding it count toward a consent grant under the
    two-person rule (docs/consent.md); taking it away makes their approvals of
    pending proposals stop counting.

    \b
    Examples:
      gateway users approver asma on
      gateway users approver asma off
    """
    answer = app.client("users.approver").call(
        "POST", _path("users", name, "approver"), {"approver": state == "on"}
    )
    held = "holds" if answer["approver"] else "no longer holds"
    note = "" if answer["changed"] else " (unchanged)"
    app.emit(answer, f"{name} {held} the approver capability{note}.")


@users.command("new-token")
@click.argument("name")
@pass_app
def new_token(app: AppContext, name: str) -> None:
    """Replace a user's token (the old one stops working) and print the new one once.

    You could hold the new token too: where the two-person rule asks k > 1,
    an approval by NAME never counts beside one of yours (or of anyone who
    could hold your token). To give someone a token only they hold, the host
    operator runs 'gateway users enrol NAME' on the node host.
    """
    answer = app.client("users.add").call("POST", _path("users", name, "token"), {})
    app.emit(
        {"name": name, "token": answer["token"]},
        f"New token for {name} (shown once; the old one no longer works):\n  {answer['token']}\n"
        f"Hand it over. Under the two-person rule an approval by {name} never counts beside "
        "one of yours: you could hold this token too.",
    )


@users.command("rotate-token")
@pass_app
def rotate_token(app: AppContext) -> None:
    """Replace your own token and print the new one once; the old one stops working.

    Any role. A copy of the old token stops working. Who could hold your
    token for the two-person rule does not change: whoever held the old one
    could have asked for this one (docs/consent.md, "Token custody"). Store
    the new token where GATEWAY_TOKEN or --token-file reads it before running
    another command.

    \b
    Examples:
      gateway users rotate-token
      gateway users rotate-token --json > new-token.json
    """
    answer = app.client("users.rotate-token").call("POST", "/api/v1/me/token", {})
    app.emit(
        {"name": answer["name"], "token": answer["token"]},
        f"New token for {answer['name']} (shown once; the old one no longer works):\n"
        f"  {answer['token']}",
    )


@users.command("enrol")
@click.argument("name")
@click.option(
    "--role",
    type=click.Choice(["admin", "officer", "compliance"]),
    help="The role of a new user (required then; an existing user keeps theirs).",
)
@click.option(
    "--approver",
    is_flag=True,
    help="Officers only: give the approver capability (consent grants under the rule).",
)
@pass_app
def enrol(app: AppContext, name: str, role: str | None, approver: bool) -> None:
    """Issue NAME a token only NAME holds; print it once. Creates NAME when new.

    Host operation: run it on the node host; needs the keystore passphrase
    (the serving node keeps running). A token an administrator issues
    ('users add', 'users new-token') is held by that administrator too, so
    under the two-person rule (k > 1) two approvals count as two people only
    when no one could hold both tokens; the host operator, who can sign as
    the node anyway, stands outside the rule. Hand the token over in person.
    For an existing user the old token stops working. Ledger: user-enrolled.

    \b
    Examples:
      gateway users enrol bilal --role officer --approver
      gateway users enrol second-admin --role admin
      gateway users enrol asma          # a new token for an existing user
    """
    from gateway.node.runtime import utc_now  # noqa: PLC0415 - host operation only
    from gateway.node.users import enrol_user  # noqa: PLC0415 - host operation only

    node = app.node()
    app.keyring()  # the passphrase proves the host operator; a wrong one stops here
    with node.db.transaction() as session:
        made = enrol_user(session, name, now=utc_now(), role=role, approver=approver)
    approving = ", approver" if made.approver else ""
    app.emit(
        made.to_dict(),
        f"Enrolled {made.name} ({made.role.value}{approving}); no one else holds this token.\n"
        "Token (shown once; hand it over in person, keep it in a 0600 file):\n"
        f"  {made.token.text}",
    )
