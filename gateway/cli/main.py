"""Entry point of the ``gateway`` command.

Exit codes (SPEC §8): 0 done; 1 error; 2 usage; 3 refused by the consent
ledger; 4 verification failed. The mapping from the exception tree to exit
codes lives here and nowhere else.
"""

from __future__ import annotations

from pathlib import Path

import click

from gateway import __version__, log
from gateway.cli.base import GatewayGroup
from gateway.cli.context import AppContext
from gateway.node import keystore

__all__ = ["cli", "main"]


@click.group(cls=GatewayGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
    User commands (send, inbox, outbox, show, resend, consent, disclose, ledger
    list|verify|export|audit-peer, users, peer show, keys show) run through the
    running node's local API and need only your token. Host operations (init,
    serve, sync, db, keys rotate|revoke|export|..., peer add, purge, backup,
    restore, demo, doctor, ledger checkpoint) need the keystore passphrase.

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
    source = keystore.passphrase_source.set(app.passphrase)
    ctx.call_on_close(lambda: keystore.passphrase_source.reset(source))
    log.configure(level="debug" if verbose else "warning")


def _register() -> None:
    from gateway.cli import db_cmd, demo_cmd, init_cmd, keys_cmd, peer_cmd, users_cmd  # noqa: PLC0415
    from gateway.node import (  # noqa: PLC0415 - importing registers their init steps
        keys,  # noqa: F401 - registers the "keys" init step
        policy,  # noqa: F401 - registers the "policies" init step
    )

    cli.add_command(init_cmd.init)
    cli.add_command(db_cmd.db)
    cli.add_command(demo_cmd.demo)
    cli.add_command(users_cmd.users)
    cli.add_command(keys_cmd.keys)
    cli.add_command(peer_cmd.peer)
    from gateway.cli import ledger_cmd  # noqa: PLC0415

    cli.add_command(ledger_cmd.ledger_group)
    from gateway.cli import serve_cmd  # noqa: PLC0415

    cli.add_command(serve_cmd.serve)
    from gateway.cli import exchange_cmd  # noqa: PLC0415

    for command in exchange_cmd.COMMANDS:
        cli.add_command(command)
    from gateway.cli import consent_cmd, disclose_cmd  # noqa: PLC0415

    cli.add_command(consent_cmd.consent_group)
    cli.add_command(disclose_cmd.disclose)
    from gateway.cli import backup_cmd, doctor_cmd, purge_cmd  # noqa: PLC0415

    cli.add_command(backup_cmd.backup)
    cli.add_command(backup_cmd.restore)
    cli.add_command(purge_cmd.purge_command)
    cli.add_command(doctor_cmd.doctor)


_register()


def main() -> None:
    cli(prog_name="gateway")
