"""``gateway keys``: this node's key manifest, rotation and revocation (admin role)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from gateway.cli.approvals_cmd import PROPOSAL_ID
from gateway.cli.base import GatewayGroup
from gateway.cli.context import AppContext, pass_app
from gateway.cli.display import manifest_text

if TYPE_CHECKING:
    from gateway.core.keys import KeyManifest
    from gateway.node import own_keys

__all__ = ["keys", "manifest_text"]

_PROPOSAL_OPTION = click.option(
    "--proposal",
    "proposal_id",
    type=PROPOSAL_ID,
    metavar="ID",
    help="The approved proposal this ceremony executes, when the policy's [approvals] "
    "asks more than one administrator (docs/keys.md, two-person rule).",
)
_ROOT_KEY_OPTION = click.option(
    "--root-key",
    "root_key",
    type=click.Path(dir_okay=False, exists=False, path_type=Path),
    help="The root key file, when it is kept offline (default: keys/root-<id>.key).",
)


@click.group(cls=GatewayGroup)
def keys() -> None:
    """This node's keys: show, export, rotate, revoke, rotate the root.

    \b
    The root key only certifies the key manifest; the operational keys sign
    and decrypt. Every change makes a new manifest version, queued for the
    peer. The ceremony is described in docs/keys.md.
    """


@keys.command("show")
@pass_app
def show(app: AppContext) -> None:
    """Show the current key manifest and the root fingerprint.

    Runs through the node's local API; needs your token.
    """
    data = app.client("keys.show").call("GET", "/api/v1/keys")
    pending = data["pending_delivery"]

    def human() -> str:
        text = manifest_text(data, "Key manifest")
        if pending:
            text += f"\n\n  {pending} manifest(s) wait for delivery to the peer."
        return text

    app.emit(data, human)


@keys.command("export")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="File to write the signed manifest to (must not exist).",
)
@pass_app
def export(app: AppContext, out: Path) -> None:
    """Write the signed public key manifest for the peer's administrator.

    Send the file by any channel; read the root fingerprint to the peer's
    administrator by another one (telephone, in person).

    Host operation: run it on the node host with its home and an administrator's token;
    it does not read the keystore passphrase.
    """
    from gateway.node import own_keys  # noqa: PLC0415 - host commands only

    app.actor("keys.export")
    with app.node().db.transaction() as session:
        manifest = own_keys.export_manifest(session, out)
    app.emit(
        {
            "out": out,
            "node": manifest.node,
            "version": manifest.version,
            "root_fingerprint": manifest.root_fingerprint,
        },
        f"Wrote key manifest version {manifest.version} of node {manifest.node!r} to {out}\n"
        f"Root fingerprint (read it to the peer's administrator out of band):\n"
        f"  {manifest.root_fingerprint}",
    )


def _revocation_data(change: own_keys.KeyChange) -> dict[str, Any]:
    """What ``keys revoke`` and ``keys recover`` print: the keys withdrawn and their successors."""
    return {
        "version": change.manifest.version,
        "event": change.event,
        "revoked": change.revoked,
        "added": change.added,
    }


def _change_text(manifest: KeyManifest, lines: list[str]) -> str:

    return "\n".join(
        [
            *lines,
            f"Key manifest version {manifest.version} is queued for delivery to the peer "
            "(gateway sync, or the running server).",
        ]
    )


@keys.command("rotate")
@_ROOT_KEY_OPTION
@_PROPOSAL_OPTION
@pass_app
def rotate(app: AppContext, root_key: Path | None, proposal_id: str | None) -> None:
    """Make new operational keys; the old ones stay valid for a 24-hour overlap.

    Old encryption keys are kept to read what was stored under them.

    Host operation: needs the keystore passphrase.
    """
    from gateway.node import approvals, own_keys  # noqa: PLC0415 - host commands only
    from gateway.node.runtime import utc_now  # noqa: PLC0415 - host commands only

    actor = app.actor("keys.rotate")
    node = app.node()
    passphrase = app.passphrase()
    now = utc_now()
    with node.db.transaction() as session:
        approvals.claim_for_ceremony(
            session, node, actor, "keys-rotate", proposal_id=proposal_id, terms={}, now=now
        )
        change = own_keys.rotate_keys(
            node.settings, session, passphrase, now=now, actor=actor, root_key_file=root_key
        )
    app.emit(
        {"version": change.manifest.version, "event": change.event, "added": change.added},
        lambda: _change_text(
            change.manifest, [f"Rotated: new operational keys {', '.join(change.added)}."]
        ),
    )


def _impact_text(impact: dict[str, Any]) -> str:
    """What a revocation marks suspect at the peer, in words (see ``revocation_impact``)."""
    from gateway.core.keys import format_time  # noqa: PLC0415 - host commands only

    if impact["use"] != "sign":
        return (
            f"Key {impact['key_id']} is an encryption key: the peer stops sealing to it; "
            "nothing stored becomes suspect."
        )
    suspect = impact["suspect_at_peer"]
    queued = len(impact["undelivered"])
    return (
        f"Key {impact['key_id']} is distrusted from {format_time(impact['distrusted_from'])}. "
        f"Of the bundles this node sent under it, {impact['verified_while_trusted_at_peer']} "
        f"stay readable at the peer (verified while trusted) and {suspect} become suspect "
        "there"
        + (
            f"; {queued} still queued under it will be refused by the peer as they are"
            if queued
            else ""
        )
        + (": re-send them with 'gateway resend --suspect'." if suspect or queued else ".")
    )


@keys.command("revoke")
@click.argument("key_id")
@click.option("--reason", required=True, help="Why the key is withdrawn (kept in the manifest).")
@click.option(
    "--compromised-since",
    "compromised_since",
    metavar="TIME",
    help="When the key may have left your control (ISO 8601, UTC if no zone). What the "
    "peer received under it from then on is marked suspect. Default: the revocation time.",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (for scripts).")
@_ROOT_KEY_OPTION
@_PROPOSAL_OPTION
@pass_app
def revoke(
    app: AppContext,
    key_id: str,
    reason: str,
    compromised_since: str | None,
    yes: bool,
    root_key: Path | None,
    proposal_id: str | None,
) -> None:
    """Revoke an operational key for good (compromise, loss), from a given time.

    \b
    A key in use is replaced at once. The peer refuses anything new signed
    with the key from the moment it has the new manifest; what it received
    before the key was distrusted (the revocation time, or --compromised-since)
    stays readable as "verified while trusted", what it received after is
    marked suspect. Before acting, the command says how many of the bundles
    this node sent become suspect at the peer, and asks to confirm (--yes for
    scripts; without a terminal, --yes is required).

    Host operation: needs the keystore passphrase.
    """
    from gateway.node import approvals, own_keys  # noqa: PLC0415 - host commands only
    from gateway.node.ledger.read import parse_since  # noqa: PLC0415 - host commands only
    from gateway.node.runtime import next_whole_second, utc_now  # noqa: PLC0415 - host commands only

    actor = app.actor("keys.revoke")
    node = app.node()
    since = parse_since(compromised_since, option="--compromised-since")
    with node.db.transaction() as session:
        preview = own_keys.preview_revocation(
            node.settings, session, key_id, reason, now=utc_now(), compromised_since=since
        )
    if not yes:
        if app.as_json or not sys.stdin.isatty():
            raise click.UsageError(
                f"revoking {key_id} needs confirmation: {_impact_text(preview.to_dict())} "
                "Run it on a terminal, or add --yes."
            )
        click.echo(_impact_text(preview.to_dict()), err=True)
        click.confirm(f"Revoke key {key_id} for good?", abort=True, err=True)
    passphrase = app.passphrase()
    # Taken after the prompts: a long look at the impact must not back-date the revocation.
    now = utc_now()
    with node.db.transaction() as session:
        approvals.claim_for_ceremony(
            session,
            node,
            actor,
            "keys-revoke",
            proposal_id=proposal_id,
            terms=approvals.ceremony_terms(
                "keys-revoke", key_id=key_id, reason=reason, compromised_since=since
            ),
            now=now,
        )
        change = own_keys.revoke_key(
            node.settings,
            session,
            passphrase,
            key_id,
            reason,
            # Everything stored before this command stays "stored while trusted".
            now=next_whole_second(),
            actor=actor,
            root_key_file=root_key,
            compromised_since=since,
        )
    assert change.impact is not None
    impact = change.impact.to_dict()
    lines = [f"Revoked key {key_id}.", _impact_text(impact)]
    if change.added:
        lines.append(f"Replaced by new key(s) {', '.join(change.added)}.")
    app.emit(
        {**_revocation_data(change), "impact": impact},
        lambda: _change_text(change.manifest, lines),
    )


@keys.command("recover")
@click.option("--reason", required=True, help="What happened to the operational keys.")
@_ROOT_KEY_OPTION
@_PROPOSAL_OPTION
@pass_app
def recover(app: AppContext, reason: str, root_key: Path | None, proposal_id: str | None) -> None:
    """Recover from a lost or damaged operational key file, with the root key.

    Revokes every operational key of the current manifest and makes fresh
    ones that speak for this node, so under [approvals.keys-recover] k > 1 it
    needs an approved proposal (the same --reason). Data sealed to the lost
    encryption keys stays unreadable.

    Host operation: needs the keystore passphrase.
    """
    from gateway.node import approvals, own_keys  # noqa: PLC0415 - host commands only
    from gateway.node.runtime import next_whole_second, utc_now  # noqa: PLC0415 - host only

    actor = app.actor("keys.revoke")
    node = app.node()
    passphrase = app.passphrase()
    with node.db.transaction() as session:
        # Before any key file is written: without the approvals nothing is made.
        approvals.claim_for_ceremony(
            session,
            node,
            actor,
            "keys-recover",
            proposal_id=proposal_id,
            terms=approvals.ceremony_terms("keys-recover", reason=reason),
            now=utc_now(),
        )
        change = own_keys.recover_keys(
            node.settings,
            session,
            passphrase,
            reason,
            now=next_whole_second(),  # the lost keys' revocation, as in revoke
            actor=actor,
            root_key_file=root_key,
        )
    app.emit(
        _revocation_data(change),
        lambda: _change_text(
            change.manifest,
            [
                f"Revoked the lost keys {', '.join(change.revoked)}.",
                f"New operational keys {', '.join(change.added)}.",
            ],
        ),
    )


@keys.command("rotate-root")
@_ROOT_KEY_OPTION
@_PROPOSAL_OPTION
@pass_app
def rotate_root(app: AppContext, root_key: Path | None, proposal_id: str | None) -> None:
    """Replace the root key: the new manifest is signed by the old and the new root.

    Read the new root fingerprint to the peer's administrator; move the new
    root key file offline when the ceremony is over.

    Host operation: needs the keystore passphrase.
    """
    from gateway.node import approvals, own_keys  # noqa: PLC0415 - host commands only
    from gateway.node.runtime import utc_now  # noqa: PLC0415 - host commands only

    actor = app.actor("keys.rotate-root")
    node = app.node()
    passphrase = app.passphrase()
    now = utc_now()
    with node.db.transaction() as session:
        # Before any key file is written: without the approvals nothing is made.
        approvals.claim_for_ceremony(
            session, node, actor, "keys-rotate-root", proposal_id=proposal_id, terms={}, now=now
        )
        change = own_keys.rotate_root(
            node.settings, session, passphrase, now=now, actor=actor, root_key_file=root_key
        )
    removed = own_keys.remove_retired_roots(node.settings, change.manifest.root_key_id)
    app.emit(
        {
            "version": change.manifest.version,
            "event": change.event,
            "root_key_id": change.manifest.root_key_id,
            "root_fingerprint": change.manifest.root_fingerprint,
            "old_root_key_id": change.old_root_key_id,
            "removed": removed,
        },
        lambda: _change_text(
            change.manifest,
            [
                f"New root key {change.manifest.root_key_id} replaces {change.old_root_key_id}.",
                f"New root fingerprint: {change.manifest.root_fingerprint}",
                *(f"Removed the retired root key file {p}." for p in removed),
            ],
        ),
    )
