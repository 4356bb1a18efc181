"""``gateway db``: database schema maintenance."""

from __future__ import annotations

import click

from gateway.cli.base import GatewayGroup
from gateway.cli.context import AppContext, pass_app
from gateway.store.db import open_database

__all__ = ["db"]


@click.group(cls=GatewayGroup)
def db() -> None:
    """Database schema maintenance (migrations run by init and on serve start).

    Host operation: run it on the node host with its home; it does not read the
    keystore passphrase.
    """


@db.command()
@pass_app
def upgrade(app: AppContext) -> None:
    """Apply every pending schema migration to the node's database."""
    settings = app.settings()
    database = open_database(settings.database_url)
    try:
        applied = database.upgrade()
        heads = database.current_revisions()
    finally:
        database.dispose()
    app.emit(
        {"applied": applied, "heads": sorted(heads)},
        f"applied {len(applied)} migration(s): {', '.join(applied)}"
        if applied
        else f"schema up to date ({', '.join(sorted(heads))})",
    )


@db.command()
@pass_app
def status(app: AppContext) -> None:
    """Show the schema revisions applied and whether any are pending."""
    settings = app.settings()
    database = open_database(settings.database_url)
    try:
        heads = sorted(database.current_revisions())
        pending = database.pending_revisions()
    finally:
        database.dispose()
    app.emit(
        {"heads": heads, "pending": pending},
        f"applied: {', '.join(heads) or 'none'}; pending: {'yes' if pending else 'no'}",
    )
