"""``gateway backup`` and ``gateway restore``: host operations with the keystore passphrase."""

from __future__ import annotations

from pathlib import Path

import click

from gateway.cli.base import GatewayCommand
from gateway.cli.context import AppContext, pass_app
from gateway.node.backup import describe, make_backup, restore_backup
from gateway.node.runtime import utc_now

__all__ = ["backup", "restore"]


@click.command(cls=GatewayCommand)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    metavar="FILE",
    help="Archive to create (never overwritten; outside the home).",
)
@pass_app
def backup(app: AppContext, out: Path) -> None:
    """Write one archive of the node home and its database, while the node runs.

    \b
    The database is copied first, as one consistent snapshot (SQLite: the
    online backup API; PostgreSQL: pg_dump, which must be on PATH), then the
    home's files: gateway.toml, keys/ (the key files stay encrypted as they
    are), policies/ and the envelope store. A plaintext private key in the
    home (a TLS key) is sealed under the passphrase. A manifest lists every
    member's SHA-256; the whole archive is authenticated with a key derived
    from the keystore passphrase, so restore refuses any changed byte.

    \b
    Keep the passphrase apart from the archive: whoever holds both holds the
    node's keys. The archive is written to a temporary file and appears only
    when complete.

    \b
    Example:
      gateway backup --home /srv/gw-jp --out /backup/jp-$(date -u +%F).gwbackup

    Host operation: needs the keystore passphrase.
    """
    settings = app.settings()
    passphrase = app.passphrase()
    report = make_backup(
        settings,
        passphrase=passphrase,
        out=out,
        now=utc_now(),
        environ=dict(app.environ),
        progress=app.progress,
    )

    def human() -> str:
        lines = [
            f"backup of node {report.node!r} written to {report.archive}",
            f"  database: {report.engine}; files: {report.files} "
            f"({report.sealed} private key file(s) sealed); {report.size} bytes",
            f"  sha256: {report.sha256}",
        ]
        lines += [f"  not in the archive: {note}" for note in report.not_archived]
        return "\n".join(lines)

    app.emit(describe(report), human)


@click.command(cls=GatewayCommand)
@click.argument("archive", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--db",
    "db_url",
    metavar="URL",
    help="Database to restore into: for a PostgreSQL archive a new, empty database "
    "(required); for SQLite a new file (default: data/ in the new home).",
)
@pass_app
def restore(app: AppContext, archive: Path, db_url: str | None) -> None:
    """Restore ARCHIVE (from `gateway backup`) into a new home given with --home.

    \b
    Before it writes anything, restore checks the whole archive against its
    checksum and the passphrase's authentication code: a damaged or altered
    archive, or one made under another passphrase, is refused (exit 4). It
    then writes the files into a new home, restores the database (a
    PostgreSQL database must be empty; pg_restore must be on PATH), applies
    pending migrations, verifies the ledger and opens the keys with the
    passphrase. If any step fails, nothing is left behind: no home, and the
    database as empty as it was.

    \b
    A restored node is the node as it was at the backup: tell the peer's
    administrator before you start it (docs/operations.md, "Backup and
    restore").

    \b
    Example:
      gateway restore /backup/jp-2026-11-29.gwbackup --home /srv/gw-jp-restored \\
          --db postgresql://gateway@db/gateway_restored

    Host operation: needs the keystore passphrase.
    """
    home = app.home()
    passphrase = app.passphrase()
    report = restore_backup(
        archive, home, passphrase=passphrase, db_url=db_url, progress=app.progress
    )

    def human() -> str:
        lines = [
            f"restored node {report.node!r} (backup of {report.created_at}) into {report.home}",
            f"  database: {report.engine} at {report.database_url}; files: {report.files}",
            f"  migrations applied: {', '.join(report.migrations) or 'none'}",
            f"  ledger intact: {report.ledger_entries} entries, root {report.ledger_root}",
            "  keys open with the passphrase",
        ]
        lines += [f"  note: {note}" for note in report.notes]
        return "\n".join(lines)

    app.emit(describe(report), human)
