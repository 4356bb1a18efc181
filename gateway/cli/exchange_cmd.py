"""``gateway send | sync | inbox | outbox | show``: the exchange with the peer.

Thin: each command parses, calls :mod:`gateway.node.outbox` or
:mod:`gateway.node.inbox`, and prints. ``send``, ``inbox``, ``outbox`` and
``show`` act as an officer (token); ``sync`` is a host operation (the node's
keys, no user token).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from gateway.cli.base import GatewayCommand
from gateway.cli.context import AppContext, pass_app
from gateway.core.canonical import parse_bounded_json
from gateway.core.retention import Direction
from gateway.core.times import Precision, format_utc
from gateway.errors import ConfigError, InvalidInput
from gateway.node.bundles import make_private_dir
from gateway.node.inbox import describe_inbox_entry, list_gaps, list_inbox, read_bundle
from gateway.node.outbox import (
    DeliveryReport,
    deliver_once,
    describe_outbox_entry,
    list_outbox,
    refusals_by_peer,
    send_case,
)
from gateway.node.resend import resend_bundles
from gateway.node.retention import purged_dates_of
from gateway.node.runtime import utc_now

__all__ = ["COMMANDS", "inbox", "outbox", "resend", "send", "show", "sync"]

MAX_CASE_FILE_BYTES = 4 * 1024 * 1024


def _read_case(source: str) -> dict[str, Any]:
    """The case JSON from a file (or ``-`` for standard input), bounded and strict."""
    if source == "-":
        data = sys.stdin.buffer.read(MAX_CASE_FILE_BYTES + 1)
        where = "standard input"
    else:
        path = Path(source)
        try:
            with path.open("rb") as handle:
                data = handle.read(MAX_CASE_FILE_BYTES + 1)
        except OSError as exc:
            raise InvalidInput(f"{source}: cannot be read ({exc.strerror})") from None
        where = source
    try:
        value = parse_bounded_json(data, max_bytes=MAX_CASE_FILE_BYTES)
    except InvalidInput as exc:
        raise InvalidInput(f"{where}: {exc.message}") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"{where}: the case must be a JSON object")
    return value


@click.command(cls=GatewayCommand)
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
    commands (gateway consent ...).
    """
    actor = app.actor("send")
    case = _read_case(case_json)
    node = app.node()
    sent = send_case(
        node,
        app.keyring(),
        actor,
        case_type,
        case,
        list(attachments),
        public=public,
        reply_to=reply_to,
        now=utc_now(),
    )
    app.emit(sent.to_dict(), sent.bundle_id)


@click.command(cls=GatewayCommand)
@pass_app
def sync(app: AppContext) -> None:
    """Deliver the outbox to the peer once, then exit (1 if the peer is unreachable)."""
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
    node = app.node()
    keyring = app.keyring()

    def progress(report: DeliveryReport) -> None:
        app.progress(
            f"[sync] delivered {len(report.delivered)}, refused {len(report.refused)}, "
            f"to retry {len(report.retry_later)}"
        )

    async def run() -> DeliveryReport:
        async with PeerClient(settings, keyring) as client:
            return await deliver_once(node, keyring, client, now_fn=utc_now, progress=progress)

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


def _time(value: Any) -> str:
    return format_utc(value, Precision.SECONDS) if value is not None else "-"


def _purged_note(purged_at: datetime | None) -> str:
    return f"  purged {purged_at.strftime('%Y-%m-%d')}" if purged_at is not None else ""


def _links(row: Any) -> str:
    """The flags of an inbox or outbox row: suspect, and the resend links."""
    parts = []
    if getattr(row, "suspect_since", None) is not None:
        parts.append("SUSPECT")
    if row.replaces:
        parts.append(f"replaces {row.replaces}")
    if row.replaced_by:
        parts.append(f"replaced by {row.replaced_by}")
    return ("  " + "; ".join(parts)) if parts else ""


@click.command(cls=GatewayCommand)
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
    """
    app.actor("inbox")
    node = app.node()
    if gaps:
        channels = list_gaps(node)
        gap_data = [c.to_dict() for c in channels]

        def gap_text() -> str:
            if not channels:
                return "nothing received yet"
            lines = []
            for c in channels:
                missing = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in c.missing)
                lines.append(f"{c.channel}: highest {c.highest}; missing: {missing or 'none'}")
            return "\n".join(lines)

        app.emit({"gaps": gap_data}, gap_text)
        return
    rows = list_inbox(node, case_type=case_type, suspect=suspect)
    purged = purged_dates_of(node, Direction.RECEIVED)
    data = [describe_inbox_entry(r, purged.get(r.bundle_id)) for r in rows]

    def text() -> str:
        if not rows:
            return "no suspect bundles" if suspect else "inbox is empty"
        return "\n".join(
            f"{r.bundle_id}  {r.case_type:<22} from {r.sender}  #{r.sequence:<6} "
            f"{_time(r.created_at)}  {r.marking}"
            + _purged_note(purged.get(r.bundle_id))
            + _links(r)
            for r in rows
        )

    app.emit({"bundles": data}, text)


@click.command(cls=GatewayCommand)
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
    """
    app.actor("inbox")
    node = app.node()
    rows = list_outbox(node, state=state)
    purged = purged_dates_of(node, Direction.SENT)
    refused = refusals_by_peer(node)
    data = [
        describe_outbox_entry(
            r, purged_at=purged.get(r.bundle_id), refusal=refused.get(r.bundle_id)
        )
        for r in rows
    ]

    def text() -> str:
        if not rows:
            return "outbox is empty"
        lines = []
        for r in rows:
            if r.state == "delivered":
                status = f"delivered {_time(r.delivered_at)}, receipt verified"
            else:
                status = f"queued, {r.attempts} attempt(s), next {_time(r.next_attempt_at)}" + (
                    f", last error: {r.last_error}" if r.last_error else ""
                )
            refusal = refused.get(r.bundle_id)
            if refusal is not None:
                status += (
                    f"; then refused by {refusal.peer}: {refusal.reason} "
                    f"({refusal.detail}) at {_time(refusal.refused_at)}"
                )
            lines.append(
                f"{r.bundle_id}  {r.case_type:<22} to {r.recipient}  #{r.sequence:<6} {status}"
                + _purged_note(purged.get(r.bundle_id))
                + _links(r)
            )
        return "\n".join(lines)

    app.emit({"bundles": data}, text)


@click.command(cls=GatewayCommand)
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
    """
    actor = app.actor("show")
    node = app.node()
    if out_dir is not None:
        try:
            make_private_dir(out_dir)
        except OSError as exc:
            raise InvalidInput(f"{out_dir}: cannot be made ({exc.strerror})") from None
    shown = read_bundle(
        node,
        app.keyring(),
        actor,
        bundle_id,
        out_dir=out_dir,
        now=utc_now(),
        accept_suspect=accept_suspect,
    )
    data = {**shown.to_dict(), "written": [str(p) for p in shown.written]}
    notes = {
        "verified-while-trusted": "its signing key was revoked later: verified while trusted",
        "suspect-accepted": "SUSPECT: opened on your acceptance, recorded in the ledger",
    }

    def text() -> str:
        lines = [
            f"bundle {shown.bundle_id}: {shown.case_type} from {shown.sender} "
            f"({shown.marking}), created {_time(shown.created_at)}",
            *([notes[shown.trust]] if shown.trust in notes else []),
            *([f"replaces {shown.replaces}"] if shown.replaces else []),
            json.dumps(shown.case, indent=2, ensure_ascii=False, sort_keys=True),
        ]
        lines += [f"written: {p}" for p in shown.written]
        return "\n".join(lines)

    app.emit(data, text)


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
    """
    actor = app.actor("resend")
    node = app.node()
    if bool(bundle_ids) == suspect:
        raise click.UsageError("give the ids of bundles to resend, or --suspect, not both")
    report = resend_bundles(
        node, app.keyring(), actor, list(bundle_ids), suspect=suspect, now=utc_now()
    )

    def text() -> str:
        lines = [f"{r.bundle_id}  {r.case_type:<22} replaces {r.original}" for r in report.resent]
        if not lines:
            lines.append("nothing to resend")
        lines += [
            f"not re-sent (consent document, issue it again): {b}" for b in report.skipped_consent
        ]
        if report.resent:
            lines.append(f"{len(report.resent)} bundle(s) queued for the peer")
        return "\n".join(lines)

    app.emit(report.to_dict(), text)


COMMANDS = (send, sync, inbox, outbox, show, resend)
