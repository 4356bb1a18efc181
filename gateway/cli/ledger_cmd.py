"""``gateway ledger``: list, verify, export, checkpoint, audit the peer.

Compliance officers list, verify, export and audit the peer (metadata only,
never case content) as clients of the running node: their token, the node's
local API (:mod:`gateway.client`). ``checkpoint`` is a host operation that
unlocks the node's signing key.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import click

from gateway.cli.base import GatewayGroup
from gateway.cli.context import AppContext, pass_app
from gateway.cli.display import when
from gateway.errors import AlreadyExists, InvalidInput, StorageError, TransportError
from gateway.files import sync_file, sync_folder

if TYPE_CHECKING:
    from gateway.client.transport import ApiClient

__all__ = ["ledger_group"]

MAX_LIST_LIMIT = 100_000
"""Most entries one ``ledger list`` asks for (the node's own bound)."""
_CHUNK = 64 * 1024
_MIN_ENTRIES_FOR_BAR = 100_000
"""Ledgers smaller than this show no bar: their walk ends before one would help."""


def _line(entry: dict[str, Any]) -> str:
    about = " ".join(
        part
        for part in (
            f"bundle={entry['bundle_id']}" if entry.get("bundle_id") else "",
            f"consent={entry['consent_id']}" if entry.get("consent_id") else "",
        )
        if part
    )
    who = entry["actor"] if entry.get("role") is None else f"{entry['actor']} ({entry['role']})"
    return (
        f"{entry['seq']:>8}  {when(entry['time'])}  {entry['kind']:<20} {who:<24} {about}".rstrip()
    )


@click.group(cls=GatewayGroup, name="ledger")
def ledger_group() -> None:
    """The tamper-evident ledger: list, verify, export, checkpoint, audit the peer.

    \b
    list, verify, export, audit-peer: run through the node's local API; need
    your token. checkpoint: host operation: needs the keystore passphrase.
    """


@ledger_group.command(name="list")
@click.option("--bundle", help="Only entries about this bundle id.")
@click.option("--kind", help="Only entries of this kind (e.g. disclosure-blocked).")
@click.option("--since", help="Only entries at or after this time (ISO 8601; UTC if no zone).")
@click.option("--limit", type=click.IntRange(1, MAX_LIST_LIMIT), help="At most N entries.")
@pass_app
def list_command(
    app: AppContext, bundle: str | None, kind: str | None, since: str | None, limit: int | None
) -> None:
    """List ledger entries, oldest first (metadata only).

    Runs through the node's local API; needs your token.
    """
    from gateway.client.transport import path_of  # noqa: PLC0415
    from gateway.core.times import DateMeans, parse_user_time  # noqa: PLC0415

    if since is not None:
        # Checked here too, so a mistake is named as the option it was typed as.
        parse_user_time(since, option="--since", dates=DateMeans.START, zone_required=False)
    query = {
        "bundle": bundle,
        "kind": kind,
        "since": since,
        "limit": str(limit if limit is not None else MAX_LIST_LIMIT),
    }
    entries = app.client("ledger.list").call("GET", path_of("ledger", query=query))
    app.emit(entries, lambda: "\n".join(_line(entry) for entry in entries) or "no entries")


@ledger_group.command()
@pass_app
def verify(app: AppContext) -> None:
    """Verify the chain, the checkpoints and the witnessed peer checkpoints.

    Exit 0 when intact; exit 4 naming the first bad entry otherwise.

    Runs through the node's local API; needs your token.
    """
    report = _verify_streamed(
        app.client("ledger.verify"), show_bar=not app.as_json and sys.stdout.isatty()
    )
    app.emit(
        report,
        f"ledger intact: {report['entries']} entries, root {report['root']}, "
        f"{report['checkpoints']} checkpoint(s), {report['witnessed']} witnessed peer checkpoint(s)"
        + "".join(f"\nnote: {note}" for note in report["notes"]),
    )


def _verify_streamed(client: ApiClient, *, show_bar: bool) -> dict[str, Any]:
    """Ask for the streamed verify answer: a bar from its progress lines, then its outcome.

    The last line is the report, or the error the plain answer would have
    been (a failed check raises :class:`VerificationError`, exit 4, naming the
    first bad entry). A stream that ends without either raises
    :class:`TransportError`.
    """
    from gateway.client.progress import transfer_progress  # noqa: PLC0415
    from gateway.client.transport import error_from_answer  # noqa: PLC0415

    with client.lines("POST", "/api/v1/ledger/verify", {}) as lines:
        first = next(lines, None)
        progress = first.get("progress") if isinstance(first, dict) else None
        total = progress.get("total") if isinstance(progress, dict) else None
        items = lines if progress is not None else iter([first])
        with transfer_progress(
            "verify",
            total if isinstance(total, int) else None,
            enabled=show_bar and progress is not None,
            unit="entries",
            minimum=_MIN_ENTRIES_FOR_BAR,
        ) as advance:
            done = 0
            for item in items:
                if not isinstance(item, dict):
                    break
                step = item.get("progress")
                if isinstance(step, dict) and isinstance(step.get("entries"), int):
                    if advance is not None and step["entries"] > done:
                        advance(step["entries"] - done)
                        done = step["entries"]
                    continue
                if isinstance(item.get("result"), dict):
                    return dict(item["result"])
                if "intact" in item:  # a node that answers plain JSON whatever was asked
                    return item
                error = item.get("error")
                if isinstance(error, dict):
                    status = error.get("status")
                    raise error_from_answer(
                        status if isinstance(status, int) else 500,
                        json.dumps({"error": error}).encode("utf-8"),
                    )
                break
    raise TransportError(
        "the node's verify answer ended without a result; try again, or see the node's log",
        reason="client.answer",
    )


def _write_new_file(out: Path, write: Any) -> int:
    """Write through a temp file in the same folder, then link it into place.

    ``os.link`` fails if ``out`` exists, so an existing file is never
    overwritten, even if one appears while the export runs. The file is
    synced, and its folder once it is named, before the export says done.
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
            sync_file(stream)
        try:
            os.link(temp, out)
        except FileExistsError:
            raise AlreadyExists(f"{out} exists; exports never overwrite a file") from None
        except OSError as exc:
            raise StorageError(f"cannot write {out}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    try:
        sync_folder(directory)
    except OSError as exc:
        out.unlink(missing_ok=True)  # a name that may not survive is not left behind
        raise StorageError(f"cannot write {out}: {exc.strerror}; nothing was kept") from None
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
    """Export every entry as CSV or JSON Lines (streamed from the node).

    Runs through the node's local API; needs your token.
    """
    from gateway.client.transport import path_of  # noqa: PLC0415

    client = app.client("ledger.export")
    client.preflight()
    if out.exists() or out.is_symlink():
        raise AlreadyExists(f"{out} exists; exports never overwrite a file")
    with client.open("GET", path_of("ledger", "export", query={"format": fmt})) as answer:
        announced = answer.getheader("X-Entry-Count") or ""

        def copy(stream: Any) -> int:
            from gateway.client.transport import copy_answer  # noqa: PLC0415

            copy_answer(answer, stream)
            return int(announced) if announced.isdigit() else 0

        count = _write_new_file(out, copy)
    app.emit({"entries": count, "out": out, "format": fmt}, f"exported {count} entries to {out}")


@ledger_group.command()
@click.option("--send", is_flag=True, help="Also give the checkpoint to the peer to witness.")
@pass_app
def checkpoint(app: AppContext, send: bool) -> None:
    """Sign a checkpoint of the ledger as it stands now (unlocks the signing key).

    Host operation: needs the keystore passphrase.
    """
    import asyncio  # noqa: PLC0415

    from gateway.core.roles import SYSTEM  # noqa: PLC0415
    from gateway.node.ledger import checkpoint as ledger_checkpoint  # noqa: PLC0415
    from gateway.node.ledger import witness as ledger_witness  # noqa: PLC0415
    from gateway.node.runtime import utc_now  # noqa: PLC0415

    node = app.node()
    keyring = app.keyring()
    with node.db.transaction() as session:
        signed = ledger_checkpoint.make_checkpoint(session, keyring, utc_now(), actor=SYSTEM)
    sent = False
    if send:
        from gateway.peer.client import PeerClient  # noqa: PLC0415 - only this option talks to the peer
        from gateway.peer.ledger_client import send_checkpoint  # noqa: PLC0415

        async def _send() -> None:
            async with PeerClient(node.settings, keyring) as client:
                await send_checkpoint(
                    client, signed, prove=ledger_witness.consistency_prover(node.db)
                )

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

    Runs through the node's local API; needs your token.
    """
    result = app.client("ledger.audit-peer").call("POST", "/api/v1/ledger/audit-peer", {})
    app.emit(result, result["message"])


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

    Runs through the node's local API; needs your token.
    """
    from gateway.core.accounting import account_csv, account_text  # noqa: PLC0415

    query = "" if bundle is None else "?" + urlencode({"bundle": bundle})
    report = app.client("ledger.account").call("GET", "/api/v1/ledger/account" + query)
    if fmt == "csv":
        click.echo(account_csv(report), nl=False)
    elif fmt == "json":
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        app.emit(report, lambda: account_text(report))
