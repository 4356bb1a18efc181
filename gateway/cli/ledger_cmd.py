"""``gateway ledger``: list, verify, export, checkpoint, audit the peer.

Compliance officers list, verify and export (metadata only, never case
content); ``checkpoint`` is a host operation that unlocks the node's signing
key; ``audit-peer`` asks the peer to prove its history only grew.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import click

from gateway.cli.base import GatewayGroup
from gateway.cli.context import AppContext, pass_app
from gateway.core.ledger import LedgerEntry
from gateway.core.roles import SYSTEM
from gateway.core.times import Precision, format_utc
from gateway.errors import AlreadyExists, ConfigError, InvalidInput, StorageError
from gateway.node import ledger
from gateway.node.keys import peer_node_of, pinned_peer_manifest, verify_ledger_with_keys
from gateway.node.runtime import utc_now

__all__ = ["ledger_group"]


def _line(entry: LedgerEntry) -> str:
    about = " ".join(
        part
        for part in (
            f"bundle={entry.bundle_id}" if entry.bundle_id else "",
            f"consent={entry.consent_id}" if entry.consent_id else "",
        )
        if part
    )
    who = (
        entry.actor_name if entry.actor_role is None else f"{entry.actor_name} ({entry.actor_role})"
    )
    time_text = format_utc(entry.time, Precision.SECONDS)
    return f"{entry.seq:>8}  {time_text}  {entry.kind.value:<20} {who:<24} {about}".rstrip()


@click.group(cls=GatewayGroup, name="ledger")
def ledger_group() -> None:
    """The tamper-evident ledger: list, verify, export, checkpoint, audit the peer."""


@ledger_group.command(name="list")
@click.option("--bundle", help="Only entries about this bundle id.")
@click.option("--kind", help="Only entries of this kind (e.g. disclosure-blocked).")
@click.option("--since", help="Only entries at or after this time (ISO 8601; UTC if no zone).")
@click.option("--limit", type=click.IntRange(1, ledger.MAX_LIST_LIMIT), help="At most N entries.")
@pass_app
def list_command(
    app: AppContext, bundle: str | None, kind: str | None, since: str | None, limit: int | None
) -> None:
    """List ledger entries, oldest first (metadata only)."""
    app.actor("ledger.list")
    node = app.node()
    with node.db.transaction() as session:
        entries = ledger.list_entries(
            session,
            bundle=bundle,
            kind=kind,
            since=ledger.parse_since(since, option="--since"),
            limit=limit,
        )
    app.emit(
        [entry.to_dict() for entry in entries],
        lambda: "\n".join(_line(entry) for entry in entries) or "no entries",
    )


@ledger_group.command()
@pass_app
def verify(app: AppContext) -> None:
    """Verify the chain, the checkpoints and the witnessed peer checkpoints.

    Exit 0 when intact; exit 4 naming the first bad entry otherwise.
    """
    app.actor("ledger.verify")
    node = app.node()
    with node.db.transaction() as session:
        report = verify_ledger_with_keys(
            session,
            node_id=node.node_id,
            progress=lambda n: app.progress(f"verified {n} entries ..."),
        )
    report.raise_for_problem()
    app.emit(
        report.to_dict(),
        f"ledger intact: {report.entries} entries, root {report.root.hex()}, "
        f"{report.checkpoints} checkpoint(s), {report.witnessed} witnessed peer checkpoint(s)"
        + "".join(f"\nnote: {note}" for note in report.notes),
    )


def _write_new_file(out: Path, write: Any) -> int:
    """Write through a temp file in the same folder, then link it into place.

    ``os.link`` fails if ``out`` exists, so an existing file is never
    overwritten, even if one appears while the export runs.
    """
    if out.exists() or out.is_symlink():
        raise AlreadyExists(f"{out} exists; exports never overwrite a file")
    directory = out.parent if str(out.parent) else Path()
    if not directory.is_dir():
        raise InvalidInput(f"folder {directory} does not exist")
    handle, temp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=directory)
    temp = Path(temp_name)
    try:
        with os.fdopen(handle, "wb") as stream:
            count = int(write(stream))
            stream.flush()
            os.fsync(stream.fileno())
        try:
            os.link(temp, out)
        except FileExistsError:
            raise AlreadyExists(f"{out} exists; exports never overwrite a file") from None
        except OSError as exc:
            raise StorageError(f"cannot write {out}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    return count


@ledger_group.command()
@click.option(
    "--format", "fmt", type=click.Choice(["csv", "jsonl"]), required=True, help="Output format."
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="File to create (never overwritten).",
)
@pass_app
def export(app: AppContext, fmt: str, out: Path) -> None:
    """Export every entry as CSV or JSON Lines."""
    app.actor("ledger.export")
    node = app.node()
    with node.db.transaction() as session:
        count = _write_new_file(out, lambda stream: ledger.export(session, fmt, stream))  # type: ignore[arg-type]
    app.emit({"entries": count, "out": out, "format": fmt}, f"exported {count} entries to {out}")


@ledger_group.command()
@click.option("--send", is_flag=True, help="Also give the checkpoint to the peer to witness.")
@pass_app
def checkpoint(app: AppContext, send: bool) -> None:
    """Sign a checkpoint of the ledger as it stands now (unlocks the signing key)."""
    node = app.node()
    keyring = app.keyring()
    with node.db.transaction() as session:
        signed = ledger.make_checkpoint(session, keyring, utc_now(), actor=SYSTEM)
    sent = False
    if send:
        from gateway.peer.client import PeerClient  # noqa: PLC0415 - only this option talks to the peer
        from gateway.peer.ledger_client import send_checkpoint  # noqa: PLC0415

        async def _send() -> None:
            async with PeerClient(node.settings, keyring) as client:
                await send_checkpoint(client, signed, prove=ledger.consistency_prover(node.db))

        asyncio.run(_send())
        sent = True
    done = signed.checkpoint
    app.emit(
        {
            "node": done.node,
            "size": done.size,
            "root": done.root.hex(),
            "key_id": done.key_id,
            "time": done.time,
            "sent": sent,
        },
        f"checkpoint of {done.size} entries, root {done.root.hex()}"
        + (" (sent to the peer)" if sent else ""),
    )


@ledger_group.command(name="audit-peer")
@pass_app
def audit_peer(app: AppContext) -> None:
    """Ask the peer to prove its ledger extends the newest checkpoint we witnessed.

    Exit 4 when the peer's history was rewritten after we witnessed it.
    """
    actor = app.actor("ledger.audit-peer")
    node = app.node()
    peer = peer_node_of(node.node_id)
    with node.db.transaction() as session:
        pinned = pinned_peer_manifest(session)
    if pinned is None:
        raise ConfigError("no peer is pinned: run 'gateway peer add' first", reason="config.peer")
    keyring = app.keyring()
    from gateway.peer.client import PeerClient  # noqa: PLC0415 - the CLI talks to the peer here only
    from gateway.peer.ledger_client import fetch_consistency  # noqa: PLC0415

    def fetch(first: int) -> ledger.PeerAnswer:
        async def _fetch() -> ledger.PeerAnswer:
            async with PeerClient(node.settings, keyring) as client:
                return await fetch_consistency(client, first)

        return asyncio.run(_fetch())

    result = ledger.audit_peer(
        node.db, pinned, peer_node=peer, fetch=fetch, now=utc_now, actor=actor
    )
    app.emit(result.to_dict(), result.message)


@ledger_group.command(name="account")
@click.option("--bundle", help="Only the account of this bundle id.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json", "csv"]),
    default=None,
    help="text (default), json, or csv (one row per event).",
)
@pass_app
def account_command(app: AppContext, bundle: str | None, fmt: str | None) -> None:
    """Disclosure accounting, both ways, each line with the ledger entries proving it.

    Items of the peer held here: arrival, reads, internal shares, disclosures
    and their consents. Items of ours the peer holds: consents granted,
    denied, revoked, and every use the peer reported back.
    """
    from gateway.node import accounting  # noqa: PLC0415

    app.actor("ledger.account")
    node = app.node()
    with node.db.transaction() as session:
        report = accounting.account(session, node.node_id, bundle=bundle)
    if fmt == "csv":
        click.echo(accounting.account_csv(report), nl=False)
    elif fmt == "json":
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        app.emit(report, lambda: accounting.account_text(report))
