"""``gateway send | sync | inbox | outbox | show | resend``: the exchange with the peer.

``send``, ``inbox``, ``outbox``, ``show`` and ``resend`` are clients of the
running node: they reach its local API with the acting officer's token
(:mod:`gateway.client`) and never read the passphrase, the keys or the
database; attachments and decrypted files travel as streams. ``sync`` is a
host operation (the node's keys, no user token).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from gateway.cli.base import GatewayCommand
from gateway.cli.context import AppContext, pass_app
from gateway.cli.display import day, when
from gateway.errors import InvalidInput

if TYPE_CHECKING:
    from gateway.node.outbox import DeliveryReport

__all__ = ["COMMANDS", "inbox", "outbox", "resend", "send", "show", "sync"]

MAX_CASE_FILE_BYTES = 4 * 1024 * 1024
PREFLIGHT_FREE_BYTES = 64 * 1024
"""A ``send`` body up to this size (bytes) goes out without asking the node who the
token is first: it fits the socket's buffers, so a refusal arrives as the node's
answer (the same exit code and message as the preflight's); a larger body is
preceded by ``GET /api/v1/whoami``."""


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
    from gateway.core.canonical import parse_bounded_json  # noqa: PLC0415

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
    commands (gateway consent ...). Attachments are streamed to the node.

    Runs through the node's local API; needs your token.
    """
    from gateway.client.progress import transfer_progress  # noqa: PLC0415
    from gateway.client.upload import multipart_send_body  # noqa: PLC0415

    client = app.client("send")
    try:
        case = _read_case(case_json)
        meta: dict[str, Any] = {"type": case_type, "case": case, "public": public}
        if reply_to is not None:
            meta["reply_to"] = reply_to
        body = multipart_send_body(meta, list(attachments))
    except InvalidInput:
        client.preflight()  # a refused user hears about the token or role first
        raise
    if body.length > PREFLIGHT_FREE_BYTES:
        # The node refuses a token before it reads the body, but a refusal
        # while a large body is still being written reaches the command as a
        # broken connection: ask first, before anything is streamed.
        client.preflight()
    with transfer_progress("send", body.files_bytes, enabled=not app.as_json) as progress:
        body.progress = progress
        sent = client.send_stream(
            "POST",
            "/api/v1/bundles",
            body,
            headers={"Content-Type": body.content_type, "Content-Length": str(body.length)},
        )
    app.emit(sent, sent["bundle_id"])


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


def _time(value: Any) -> str:
    return when(value)


def _purged_note(purged_at: Any) -> str:
    return f"  purged {day(purged_at)}" if purged_at is not None else ""


def _links(row: dict[str, Any]) -> str:
    """The flags of an inbox or outbox row: suspect, and the resend links."""
    parts = []
    if row.get("suspect_since") is not None:
        parts.append("SUSPECT")
    if row.get("replaces"):
        parts.append(f"replaces {row['replaces']}")
    if row.get("replaced_by"):
        parts.append(f"replaced by {row['replaced_by']}")
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

    Runs through the node's local API; needs your token.
    """
    from gateway.client.transport import path_of  # noqa: PLC0415

    client = app.client("inbox")
    if gaps:
        answer = client.call("GET", path_of("inbox", query={"gaps": "true"}))
        channels = answer["gaps"]

        def gap_text() -> str:
            if not channels:
                return "nothing received yet"
            lines = []
            for c in channels:
                missing = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in c["missing"])
                lines.append(
                    f"{c['channel']}: highest {c['highest']}; missing: {missing or 'none'}"
                )
            return "\n".join(lines)

        app.emit(answer, gap_text)
        return
    query = {"type": case_type, "suspect": "true" if suspect else None}
    data = client.call("GET", path_of("inbox", query=query))
    rows = data["bundles"]

    def text() -> str:
        if not rows:
            return "no suspect bundles" if suspect else "inbox is empty"
        return "\n".join(
            f"{r['bundle_id']}  {r['type']:<22} from {r['sender']}  #{r['sequence']:<6} "
            f"{_time(r['created'])}  {r['marking']}" + _purged_note(r.get("purged")) + _links(r)
            for r in rows
        )

    app.emit(data, text)


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

    Runs through the node's local API; needs your token.
    """
    from gateway.client.transport import path_of  # noqa: PLC0415

    data = app.client("inbox").call("GET", path_of("outbox", query={"state": state}))
    rows = data["bundles"]

    def text() -> str:
        if not rows:
            return "outbox is empty"
        lines = []
        for r in rows:
            if r["state"] == "delivered":
                status = f"delivered {_time(r['delivered'])}, receipt verified"
            else:
                status = f"queued, {r['attempts']} attempt(s), next {_time(r['next_attempt'])}" + (
                    f", last error: {r['last_error']}" if r["last_error"] else ""
                )
            refusal = r.get("refused_by_peer")
            if refusal is not None:
                status += (
                    f"; then refused by {refusal['by']}: {refusal['reason']} "
                    f"({refusal['detail']}) at {_time(refusal['refused_at'])}"
                )
            lines.append(
                f"{r['bundle_id']}  {r['type']:<22} to {r['recipient']}  #{r['sequence']:<6} {status}"
                + _purged_note(r.get("purged"))
                + _links(r)
            )
        return "\n".join(lines)

    app.emit(data, text)


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

    Runs through the node's local API; needs your token.
    """
    from gateway.client.transport import path_of  # noqa: PLC0415

    client = app.client("show")
    query = {"accept_suspect": "true" if accept_suspect else None}
    written: list[Path] = []
    if out_dir is None:
        shown = client.call("GET", path_of("bundles", bundle_id, query=query))
    else:
        from gateway.client.files import check_destination  # noqa: PLC0415

        client.preflight()
        check_destination(out_dir, must_be_empty=False)
        received, shown = client.receive_files(
            path_of("bundles", bundle_id, "content", query=query),
            out_dir,
            progress_enabled=not app.as_json,
        )
        written = list(received.files.values())
        case_file = received.files.get(f"{shown['bundle_id']}.json")
        if case_file is not None:
            with case_file.open("rb") as handle:
                shown["case"] = json.loads(handle.read(MAX_CASE_FILE_BYTES + 1))
    data = {**shown, "written": [str(p) for p in written]}
    notes = {
        "verified-while-trusted": "its signing key was revoked later: verified while trusted",
        "suspect-accepted": "SUSPECT: opened on your acceptance, recorded in the ledger",
    }

    def text() -> str:
        lines = [
            f"bundle {shown['bundle_id']}: {shown['type']} from {shown['sender']} "
            f"({shown['marking']}), created {_time(shown['created'])}",
            *([notes[shown["trust"]]] if shown.get("trust") in notes else []),
            *([f"replaces {shown['replaces']}"] if shown.get("replaces") else []),
            json.dumps(shown.get("case"), indent=2, ensure_ascii=False, sort_keys=True),
        ]
        lines += [f"written: {p}" for p in written]
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
