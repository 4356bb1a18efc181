"""Entry point of the ``gateway`` command.

Exit codes (SPEC §8): 0 done; 1 error; 2 usage; 3 refused by the consent
ledger; 4 verification failed. The mapping from the exception tree to exit
codes lives here and nowhere else.
"""

from __future__ import annotations

from pathlib import Path

import click

from gateway import __version__, log
from gateway.cli.base import LazyCommand, LazyGroup, LazySubgroup
from gateway.cli.context import AppContext
from gateway.node import passphrase

__all__ = ["COMMANDS", "cli", "main"]


def _entry(module: str, attribute: str, summary: str) -> LazyCommand:
    return LazyCommand(f"gateway.cli.{module}:{attribute}", summary)


COMMANDS: dict[str, LazyCommand | LazySubgroup] = {
    "approvals": LazySubgroup(
        "gateway.cli.approvals_cmd:approvals_group",
        "List, propose, approve and reject proposals under the two-person rule.\n"
        "\n"
        "Runs through the node's local API; needs your token.",
        {
            "approve": _entry(
                "approvals_cmd",
                "approve_command",
                "Approve a proposal; the last approval needed makes the action happen.",
            ),
            "list": _entry(
                "approvals_cmd",
                "list_command",
                "Proposals your role approves, newest first, with their terms and approvers.",
            ),
            "propose": _entry(
                "approvals_cmd",
                "propose_command",
                "Propose a key rotation, revocation, root rotation or recovery for approval.",
            ),
            "reject": _entry(
                "approvals_cmd",
                "reject_command",
                "Reject a proposal for good; a new proposal is needed to try again.",
            ),
            "show": _entry(
                "approvals_cmd",
                "show_command",
                "One proposal in full: its action and every term, the terms hash, who approved.",
            ),
        },
    ),
    "backup": _entry(
        "backup_cmd",
        "backup",
        "Write one archive of the node home and its database, while the node runs.",
    ),
    "consent": LazySubgroup(
        "gateway.cli.consent_cmd:consent_group",
        "Ask for, grant, deny, revoke and list written consent to disclose the peer's items.\n"
        "\n"
        "Runs through the node's local API; needs your token.",
        {
            "deny": _entry(
                "consent_cmd",
                "deny_command",
                "Refuse the peer's consent request; the peer is told the reason.",
            ),
            "grant": _entry(
                "consent_cmd",
                "grant_command",
                "Give the peer written consent for its request; it is signed and sent.",
            ),
            "list": _entry(
                "consent_cmd",
                "list_command",
                "Consent requests and consents, both directions, with each consent's state.",
            ),
            "request": _entry(
                "consent_cmd",
                "request_command",
                "Ask the originating side for consent to pass its bundles to a third party.",
            ),
            "revoke": _entry(
                "consent_cmd",
                "revoke_command",
                "Withdraw a consent this side granted; the peer refuses its use once it arrives.",
            ),
        },
    ),
    "db": LazySubgroup(
        "gateway.cli.db_cmd:db",
        "Database schema maintenance (migrations run by init and on serve start).\n"
        "\n"
        "Host operation: run it on the node host with its home; it does not read the\n"
        "keystore passphrase.",
        {
            "status": _entry(
                "db_cmd",
                "status",
                "Show the schema revisions applied and whether any are pending.",
            ),
            "upgrade": _entry(
                "db_cmd",
                "upgrade",
                "Apply every pending schema migration to the node's database.",
            ),
        },
    ),
    "demo": _entry(
        "demo_cmd",
        "demo",
        "Run Tokyo (jp) and Islamabad (pk) on loopback and walk the whole story.",
    ),
    "disclose": _entry(
        "disclose_cmd",
        "disclose",
        "Disclose bundles to a recipient; the peer's confidential items need its written consent.",
    ),
    "doctor": _entry(
        "doctor_cmd",
        "doctor",
        "Check this node's home offline: settings, file modes, TLS certificates,\n"
        "database, keys and policy. Exit 0 when nothing failed (warnings included), "
        "1 otherwise.",
    ),
    "inbox": _entry(
        "exchange_cmd",
        "inbox",
        "List the bundles received from the peer (metadata only; `show` decrypts).",
    ),
    "init": _entry(
        "init_cmd",
        "init",
        "Create a new node home: configuration, database, keys and first admin.",
    ),
    "keys": LazySubgroup(
        "gateway.cli.keys_cmd:keys",
        "This node's keys: show, export, rotate, revoke, rotate the root.\n"
        "\n"
        "\b\n"
        "The root key only certifies the key manifest; the operational keys sign\n"
        "and decrypt. Every change makes a new manifest version, queued for the\n"
        "peer. The ceremony is described in docs/keys.md.",
        {
            "export": _entry(
                "keys_cmd",
                "export",
                "Write the signed public key manifest for the peer's administrator.",
            ),
            "recover": _entry(
                "keys_cmd",
                "recover",
                "Recover from a lost or damaged operational key file, with the root key.",
            ),
            "revoke": _entry(
                "keys_cmd",
                "revoke",
                "Revoke an operational key for good (compromise, loss), from a given time.",
            ),
            "rotate": _entry(
                "keys_cmd",
                "rotate",
                "Make new operational keys; the old ones stay valid for a 24-hour overlap.",
            ),
            "rotate-root": _entry(
                "keys_cmd",
                "rotate_root",
                "Replace the root key: the new manifest is signed by the old and the new root.",
            ),
            "show": _entry(
                "keys_cmd", "show", "Show the current key manifest and the root fingerprint."
            ),
        },
    ),
    "ledger": LazySubgroup(
        "gateway.cli.ledger_cmd:ledger_group",
        "The tamper-evident ledger: list, verify, export, checkpoint, audit the peer.\n"
        "\n"
        "\b\n"
        "list, verify, export, audit-peer: run through the node's local API; need\n"
        "your token. checkpoint: host operation: needs the keystore passphrase.",
        {
            "account": _entry(
                "ledger_cmd",
                "account_command",
                "Disclosure accounting, both ways, each line with the ledger entries proving it.",
            ),
            "audit-peer": _entry(
                "ledger_cmd",
                "audit_peer",
                "Ask the peer to prove its ledger extends the newest checkpoint we witnessed.",
            ),
            "checkpoint": _entry(
                "ledger_cmd",
                "checkpoint",
                "Sign a checkpoint of the ledger as it stands now (unlocks the signing key).",
            ),
            "export": _entry(
                "ledger_cmd",
                "export",
                "Export every entry as CSV or JSON Lines (streamed from the node).",
            ),
            "list": _entry(
                "ledger_cmd", "list_command", "List ledger entries, oldest first (metadata only)."
            ),
            "verify": _entry(
                "ledger_cmd",
                "verify",
                "Verify the chain, the checkpoints and the witnessed peer checkpoints.",
            ),
        },
    ),
    "outbox": _entry(
        "exchange_cmd",
        "outbox",
        "List the bundles sent: queued (with attempts and last error) or delivered (receipted).",
    ),
    "peer": LazySubgroup(
        "gateway.cli.peer_cmd:peer",
        "The peer node: pin its key manifest, show what is pinned, test the link.",
        {
            "add": _entry(
                "peer_cmd",
                "add",
                "Pin the peer's key manifest after checking its root fingerprint.",
            ),
            "ping": _entry(
                "peer_cmd",
                "ping",
                "Test the link to the peer end to end: TLS, a signed request, clocks, manifests.",
            ),
            "show": _entry("peer_cmd", "show", "Show the peer's pinned key manifest."),
        },
    ),
    "purge": _entry(
        "purge_cmd",
        "purge_command",
        "Destroy envelope bodies and decrypted outputs older than the policy's retention.",
    ),
    "resend": _entry(
        "exchange_cmd",
        "resend",
        "Re-seal bundles this node sent under the current keys; each names the one it replaces.",
    ),
    "restore": _entry(
        "backup_cmd",
        "restore",
        "Restore ARCHIVE (from `gateway backup`) into a new home given with --home.",
    ),
    "send": _entry(
        "exchange_cmd",
        "send",
        "Seal a case (CASE_JSON file, or - for stdin) for the peer and queue it; print its id.",
    ),
    "serve": _entry(
        "serve_cmd",
        "serve",
        "Serve the peer protocol and the local API, and deliver the outbox, until stopped.",
    ),
    "show": _entry(
        "exchange_cmd",
        "show",
        "Decrypt a bundle for the acting officer and print its case; the read is logged.",
    ),
    "sync": _entry(
        "exchange_cmd",
        "sync",
        "Deliver the outbox to the peer once, then exit (1 if the peer is unreachable).",
    ),
    "users": LazySubgroup(
        "gateway.cli.users_cmd:users",
        "Manage users: administrators, officers and compliance officers.\n"
        "\n"
        "\b\n"
        "Roles:\n"
        "  admin       keys, peer, users, node\n"
        "  officer     send, inbox, show, consent, disclose\n"
        "  compliance  ledger list, verify, export, audit-peer (metadata only)\n"
        "\n"
        "Runs through the node's local API; needs your token. 'users enrol' is\n"
        "the host operator's: it needs the keystore passphrase instead.",
        {
            "add": _entry("users_cmd", "add", "Add a user and print its token once."),
            "approver": _entry(
                "users_cmd",
                "approver_",
                "Give (on) or take (off) an officer's approver capability; recorded in the ledger.",
            ),
            "disable": _entry(
                "users_cmd", "disable", "Disable a user: its token is refused from now on."
            ),
            "enrol": _entry(
                "users_cmd",
                "enrol",
                "Issue NAME a token only NAME holds; print it once. Creates NAME when new.",
            ),
            "list": _entry(
                "users_cmd",
                "list_",
                "List users with their role and state (never their tokens).",
            ),
            "new-token": _entry(
                "users_cmd",
                "new_token",
                "Replace a user's token (the old one stops working) and print the new one once.",
            ),
            "rotate-token": _entry(
                "users_cmd",
                "rotate_token",
                "Replace your own token and print the new one once; the old one stops working.",
            ),
        },
    ),
}
"""Every ``gateway`` command: name -> where it lives and the summary ``--help`` lists.

A command's module is imported only when the command runs, so ``--version``,
``--help`` and a group's ``--help`` import no command module. A new command is
one entry here; ``tests/unit/test_cli_startup.py`` checks every entry against
the command it names (summary, help, and that nothing is left out).
"""


@click.group(
    cls=LazyGroup, table=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.option("--debug", is_flag=True, help="Print a traceback on errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log debug lines to stderr.")
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File holding the acting user's token (default: $GATEWAY_TOKEN).",
)
@click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File holding the keystore passphrase (default: $GATEWAY_PASSPHRASE, else a prompt).",
)
@click.option(
    "--api-url",
    metavar="URL",
    help="Reach the running node's local API over TCP (http:// or https://) instead of "
    "the socket in the home (default: $GATEWAY_API_URL).",
)
@click.version_option(__version__, prog_name="gateway")
@click.pass_context
def cli(
    ctx: click.Context,
    debug: bool,
    verbose: bool,
    token_file: Path | None,
    passphrase_file: Path | None,
    api_url: str | None,
) -> None:
    """ssw-gateway: signed, encrypted case exchange between the Japan (jp) and
    Pakistan (pk) contact points of the Specified Skilled Worker cooperation.

    \b
    User commands (send, inbox, outbox, show, resend, consent, approvals,
    disclose, ledger list|verify|export|audit-peer|account, users, peer show,
    keys show) run through the running node's local API and need only your
    token. Host operations (init, serve, sync, db, keys rotate|revoke|export|...,
    peer add, peer ping, users enrol, purge, backup, restore, demo, doctor,
    ledger checkpoint) run on the node host; most need the keystore passphrase.

    \b
    Exit codes: 0 done, 1 error, 2 usage, 3 refused by the consent ledger,
    4 verification failed (tampering, bad signature, broken chain).
    """
    app = ctx.ensure_object(AppContext)
    app.debug = debug
    app.verbose = verbose
    app.token_file = token_file
    app.passphrase_file = passphrase_file
    app.api_url = api_url
    source = passphrase.passphrase_source.set(app.passphrase)
    ctx.call_on_close(lambda: passphrase.passphrase_source.reset(source))
    log.configure(level="debug" if verbose else "warning")


def main() -> None:
    cli(prog_name="gateway")
