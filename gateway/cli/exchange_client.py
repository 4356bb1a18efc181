"""The bodies of ``gateway send | inbox | outbox | show``, without click.

Each function takes the invocation's :class:`~gateway.cli.context.AppContext`
and the command's parameters as keywords (the names of its click parameters
in :mod:`gateway.cli.exchange_cmd`, whose callbacks call these and nothing
more), so :mod:`gateway.cli.fast` runs them without importing click. They are
clients of the running node: they reach its local API with the acting
officer's token (:mod:`gateway.client`) and never read the passphrase, the
keys or the database; attachments and decrypted files travel as streams.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.cli.display import day, when
from gateway.errors import InvalidInput

if TYPE_CHECKING:
    from gateway.cli.context import AppContext

__all__ = ["MAX_CASE_FILE_BYTES", "PREFLIGHT_FREE_BYTES", "inbox", "outbox", "send", "show"]

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


def send(
    app: AppContext,
    *,
    case_type: str,
    case_json: str,
    attachments: Sequence[Path],
    public: bool,
    reply_to: str | None,
) -> None:
    """``gateway send``: seal the case of ``case_json`` (a file, or ``-``) and queue it."""
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


def inbox(app: AppContext, *, case_type: str | None, gaps: bool, suspect: bool) -> None:
    """``gateway inbox``: the bundles received (or, with ``gaps``, missing sequence numbers)."""
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


def outbox(app: AppContext, *, state: str | None) -> None:
    """``gateway outbox``: the bundles sent, queued or delivered."""
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


def show(app: AppContext, *, bundle_id: str, out_dir: Path | None, accept_suspect: bool) -> None:
    """``gateway show``: decrypt one bundle for the acting officer (to ``out_dir`` with files)."""
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
