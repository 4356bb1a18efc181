"""``gateway disclose``: release decrypted items to a named recipient, if the rule allows.

A thin client of the running node: it asks the node's local API
(``POST /api/v1/disclosures/stream``) with the acting officer's token and
receives the package as a stream (:mod:`gateway.client.framing`), written
into a private folder beside ``--out`` that takes its name only once the
whole stream arrived and checked. A refusal exits with code 3 (SPEC §8)
naming what is missing for each item; nothing is written to ``--out`` and the
blocked attempt is recorded in the ledger. The node records the disclosure
(``disclosure-made``) only once it sent the whole package.
"""

from __future__ import annotations

from pathlib import Path

import click

from gateway.cli.base import GatewayCommand
from gateway.cli.context import AppContext, pass_app

__all__ = ["disclose"]


@click.command(cls=GatewayCommand)
@click.argument("bundle_ids", metavar="BUNDLE_ID...", nargs=-1, required=True)
@click.option(
    "--recipient", required=True, help="Who receives the items (policy short name or full name)."
)
@click.option("--purpose", required=True, help="What the recipient needs them for.")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder to create (must not exist yet, or be empty).",
)
@pass_app
def disclose(
    app: AppContext, bundle_ids: tuple[str, ...], recipient: str, purpose: str, out_dir: Path
) -> None:
    """Disclose bundles to a recipient; the peer's confidential items need its written consent.

    Runs through the node's local API; needs your token.
    """
    from gateway.client.files import check_destination  # noqa: PLC0415

    client = app.client("disclose")
    client.preflight()
    check_destination(out_dir, must_be_empty=True)
    received, result = client.receive_files(
        "/api/v1/disclosures/stream",
        out_dir,
        payload={"bundle_ids": list(bundle_ids), "recipient": recipient, "purpose": purpose},
        progress_enabled=not app.as_json,
    )
    data = {**result, "out_dir": str(received.folder)}
    consent_id = result.get("consent_id")
    what = f"under consent {consent_id}" if consent_id else "no consent needed"
    app.emit(
        data,
        f"{result.get('kind')}: {len(bundle_ids)} item(s) to {recipient!r} ({what}); "
        f"{len(result.get('files', {}))} file(s) and disclosure.json in {received.folder}; "
        f"ledger entry {result.get('ledger_seq')}",
    )
