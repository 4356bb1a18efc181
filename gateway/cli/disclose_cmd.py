"""``gateway disclose``: release decrypted items to a named recipient, if the rule allows.

Thin: parses, calls :func:`consent_disclosure.disclose`, prints. A refusal
exits with code 3 (SPEC §8) naming what is missing for each item; nothing is
written to ``--out`` and the blocked attempt is recorded in the ledger.
"""

from __future__ import annotations

from pathlib import Path

import click

from gateway.cli.base import GatewayCommand
from gateway.cli.context import AppContext, pass_app
from gateway.node.consent import disclosure as consent_disclosure
from gateway.node.runtime import utc_now

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
    """Disclose bundles to a recipient; the peer's confidential items need its written consent."""
    actor = app.actor("disclose")
    node = app.node()
    result = consent_disclosure.disclose(
        node, app.keyring(), actor, list(bundle_ids), recipient, purpose, out_dir, now=utc_now()
    )
    what = f"under consent {result.consent_id}" if result.consent_id else "no consent needed"
    app.emit(
        result.to_dict(),
        f"{result.kind}: {len(bundle_ids)} item(s) to {recipient!r} ({what}); "
        f"{len(result.files)} file(s) and disclosure.json in {result.out_dir}; "
        f"ledger entry {result.ledger_seq}",
    )
