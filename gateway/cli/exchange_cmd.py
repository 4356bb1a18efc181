"""``gateway send | sync | inbox | outbox | show | resend``: the exchange with the peer.

``send``, ``inbox``, ``outbox``, ``show`` and ``resend`` are clients of the
running node: they reach its local API with the acting officer's token
(:mod:`gateway.client`) and never read the passphrase, the keys or the
database; attachments and decrypted files travel as streams. ``sync`` is a
host operation (the node's keys, no user token).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from gateway.cli import exchange_client
from gateway.cli.base import GatewayCommand
from gateway.cli.context import AppContext, pass_app

if TYPE_CHECKING:
    from gateway.node.outbox import DeliveryReport

__all__ = ["COMMANDS", "inbox", "outbox", "resend", "send", "show", "sync"]


@click.command(cls=GatewayCommand, runner="gateway.cli.exchange_client:send")
@click.argument("case_type", metavar="TYPE")
@click.argument("case_json", metavar="CASE_JSON")
@click.option(
    "--attach",
    "attachments",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A file to send with the case (repeatable).",
)
@click.option("--public", is_flag=True, help="Mark the bundle public (default: confidential).")
@click.option("--reply-to", help="The id of the bundle this one answers.")
@pass_app
def send(
    app: AppContext,
    case_type: str,
    case_json: str,
    attachments: Sequence[Path],
    public: bool,
    reply_to: str | None,
) -> None:
    """Seal a case (CASE_JSON file, or - for stdin) for the peer and queue it; print its id.

    \b
    Types: broker-misconduct, exam-fraud, consultation, acceptance-suspension,
    return-assistance, information-request, information-reply (its reply_to is
    the request_bundle_id of the case). Consent bundles have their own
    commands (gateway consent ...). Attachments are streamed to the node.

    Runs through the node's local API; needs your token.
    """
    exchange_client.send(
        app,
        case_type=case_type,
        case_json=case_json,
        attachments=attachments,
        public=public,
        reply_to=reply_to,
    )


@click.command(cls=GatewayCommand)
@pass_app
def sync(app: AppContext) -> None:
    """Deliver the outbox to the peer once, then exit (1 if the peer is unreachable).

    Host operation: needs the keystore passphrase.
    """
    import asyncio  # noqa: PLC0415

    from gateway.errors import ConfigError  # noqa: PLC0415
    from gateway.node.outbox import deliver_once  # noqa: PLC0415
    from gateway.node.runtime import utc_now  # noqa: PLC0415
    from gateway.peer.client import PeerClient  # noqa: PLC0415

    settings = app.settings()
    if settings.server.peer_delivery == "hold":
        # The peer pulls and has no listener: nothing is ever posted to it.
        raise ConfigError(
            "this node holds deliveries for its peer to pull ([server] peer_delivery = "
            "\"hold\"): the peer fetches them, nothing is sent from here; 'gateway outbox' "
            "shows what waits",
            reason="config.peer-mode",
        )
    keyring = app.keyring()

    def progress(report: DeliveryReport) -> None:
        app.progress(
            f"[sync] delivered {len(report.delivered)}, refused {len(report.refused)}, "
            f"to retry {len(report.retry_later)}"
        )

    async def run() -> DeliveryReport:
        async with PeerClient(settings, keyring) as client:
            return await deliver_once(app.node_context(), client, now_fn=utc_now, progress=progress)

    app.progress(f"[sync] delivering to {settings.server.peer_url} ...")
    report = asyncio.run(run())
    data = {
        "manifests_sent": report.manifests_sent,
        "delivered": report.delivered,
        "refused": report.refused,
        "retry_later": report.retry_later,
        "remaining": report.remaining,
    }

    def human() -> str:
        lines = [
            f"delivered {len(report.delivered)} bundle(s)"
            + (f", {report.manifests_sent} key manifest(s)" if report.manifests_sent else "")
            + f"; {report.remaining} still queued"
        ]
        lines += [f"  refused {bid}: {why}" for bid, why in sorted(report.refused.items())]
        lines += [f"  to retry {bid}: {why}" for bid, why in sorted(report.retry_later.items())]
        return "\n".join(lines)

    app.emit(data, human)


@click.command(cls=GatewayCommand, runner="gateway.cli.exchange_client:inbox")
@click.option("--type", "case_type", help="Only bundles of this type.")
@click.option("--gaps", is_flag=True, help="Show missing sequence numbers per channel instead.")
@click.option(
    "--suspect",
    is_flag=True,
    help="Only bundles marked suspect: signed by a key the peer revoked, received after "
    "the key was distrusted.",
)
@pass_app
def inbox(app: AppContext, case_type: str | None, gaps: bool, suspect: bool) -> None:
    """List the bundles received from the peer (metadata only; `show` decrypts).

    A bundle is flagged SUSPECT when the peer revoked its signing key with a
    distrust time before the bundle arrived; "replaces X" / "replaced by Y"
    link a bundle the peer re-sent under its new keys (gateway resend).

    Runs through the node's local API; needs your token.
    """
    exchange_client.inbox(app, case_type=case_type, gaps=gaps, suspect=suspect)


@click.command(cls=GatewayCommand, runner="gateway.cli.exchange_client:outbox")
@click.option(
    "--state",
    type=click.Choice(["queued", "delivered", "replaced"]),
    help="Only bundles in this state (replaced: never delivered, re-sent as another).",
)
@pass_app
def outbox(app: AppContext, state: str | None) -> None:
    """List the bundles sent: queued (with attempts and last error) or delivered (receipted).

    A delivered bundle the peer refused afterwards (a consent bundle that did
    not fit) says so, with the peer's signed reason.

    Runs through the node's local API; needs your token.
    """
    exchange_client.outbox(app, state=state)


@click.command(cls=GatewayCommand, runner="gateway.cli.exchange_client:show")
@click.argument("bundle_id")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write the case and its attachments into this folder (made 0700 if missing); "
    "files are 0600.",
)
@click.option(
    "--accept-suspect",
    is_flag=True,
    help="Open a suspect bundle (signed by a key distrusted before it arrived); the "
    "acceptance is recorded in the ledger under your name.",
)
@pass_app
def show(app: AppContext, bundle_id: str, out_dir: Path | None, accept_suspect: bool) -> None:
    """Decrypt a bundle for the acting officer and print its case; the read is logged.

    A bundle whose signing key was revoked after it arrived opens as "verified
    while trusted"; a suspect one is refused (exit 4) unless --accept-suspect.

    Runs through the node's local API; needs your token.
    """
    exchange_client.show(app, bundle_id=bundle_id, out_dir=out_dir, accept_suspect=accept_suspect)


@click.command(cls=GatewayCommand)
@click.argument("bundle_ids", nargs=-1, metavar="[BUNDLE_ID]...")
@click.option(
    "--suspect",
    is_flag=True,
    help="Every sent bundle whose copy at the peer is suspect (signed by a key of ours "
    "revoked with a distrust time before it was made) and not re-sent yet.",
)
@pass_app
def resend(app: AppContext, bundle_ids: Sequence[str], suspect: bool) -> None:
    """Re-seal bundles this node sent under the current keys; each names the one it replaces.

    \b
    The peer links the new bundle to the original ("replaced by" in its inbox).
    A suspect bundle at the peer that no resend replaces was not sent by this
    node. Consent documents are not re-sent: issue the consent again.

    Runs through the node's local API; needs your token.
    """
    if bool(bundle_ids) == suspect:
        raise click.UsageError("give the ids of bundles to resend, or --suspect, not both")
    report = app.client("resend").call(
        "POST", "/api/v1/resend", {"bundle_ids": list(bundle_ids), "suspect": suspect}
    )

    def text() -> str:
        resent = report["resent"]
        lines = [f"{r['bundle_id']}  {r['type']:<22} replaces {r['replaces']}" for r in resent]
        if not lines:
            lines.append("nothing to resend")
        lines += [
            f"not re-sent (consent document, issue it again): {b}"
            for b in report["skipped_consent"]
        ]
        if resent:
            lines.append(f"{len(resent)} bundle(s) queued for the peer")
        return "\n".join(lines)

    app.emit(report, text)


COMMANDS = (send, sync, inbox, outbox, show, resend)
