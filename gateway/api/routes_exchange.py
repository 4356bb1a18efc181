"""Local API routes for the exchange (officers): send, inbox, outbox, show.

The same services as ``gateway send | inbox | outbox | show``.
``POST /api/v1/bundles`` takes either a JSON body with base64 attachments
(bounded by 32 MiB, for small callers) or ``multipart/form-data``: a ``meta``
part (the JSON fields, with ``attachments`` naming the files in order) and
one ``file`` part per attachment, spooled part by part to a private folder
within the policy's limits (what ``gateway send --attach`` sends).
``GET /api/v1/bundles/{id}`` decrypts for the acting officer and records the
read in the ledger exactly as ``gateway show`` does;
``GET /api/v1/bundles/{id}/content`` does the same and streams the case and
its attachments as files (:mod:`gateway.client.framing`), whatever their size.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.api.routes_common import (
    ApiRoute,
    Call,
    json_response,
    optional_str,
    refuse_unknown_fields,
    require_str,
)
from gateway.api.streams import (
    abort_stream,
    prepare_file_stream,
    spool_multipart,
    stream_folder,
)
from gateway.core.jsonable import to_jsonable
from gateway.core.retention import Direction
from gateway.errors import InvalidInput, PolicyRefused
from gateway.node.inbox import (
    ReadBundle,
    describe_inbox_entry,
    list_gaps,
    list_inbox,
    read_bundle,
)
from gateway.node.outbox import describe_outbox_entry, list_outbox, refusals_by_peer, send_case
from gateway.node.resend import MAX_RESEND, resend_bundles
from gateway.node.retention import purged_dates_of
from gateway.node.runtime import utc_now

__all__ = ["MAX_INLINE_ATTACHMENT_BYTES", "MAX_SEND_BODY", "ROUTES"]

MAX_SEND_BODY = 32 * 1024 * 1024
"""Largest body of ``POST /api/v1/bundles`` (the case and base64 attachments)."""
MAX_INLINE_ATTACHMENT_BYTES = 16 * 1024 * 1024
"""Largest total of attachments ``GET /api/v1/bundles/{id}?attachments=true`` returns."""
_MAX_NAME_BYTES = 255


def _attachment_name(value: object, index: int) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"attachments[{index}].name is required and must be a non-empty string")
    if (
        "/" in value
        or "\\" in value
        or "\x00" in value
        or value in (".", "..")
        or len(value.encode("utf-8")) > _MAX_NAME_BYTES
    ):
        raise InvalidInput(
            f"attachments[{index}].name must be one plain file name of at most "
            f"{_MAX_NAME_BYTES} bytes (no folders)"
        )
    return value


def _decoded_attachments(body: dict[str, Any]) -> list[tuple[str, bytes]]:
    raw = body.get("attachments", [])
    if not isinstance(raw, list):
        raise InvalidInput("field 'attachments' must be a list")
    decoded: list[tuple[str, bytes]] = []
    names: set[str] = set()
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or set(item) != {"name", "content_base64"}:
            raise InvalidInput(
                f"attachments[{index}] must be an object with exactly 'name' and 'content_base64'"
            )
        name = _attachment_name(item["name"], index)
        if name in names:
            raise InvalidInput(f"attachments[{index}].name {name!r} is given twice")
        names.add(name)
        content = item["content_base64"]
        if not isinstance(content, str):
            raise InvalidInput(f"attachments[{index}].content_base64 must be a string")
        try:
            decoded.append((name, base64.b64decode(content, validate=True)))
        except (binascii.Error, ValueError):
            raise InvalidInput(f"attachments[{index}].content_base64 is not valid base64") from None
    return decoded


def _spool_attachments(attachments: list[tuple[str, bytes]]) -> tuple[Path, list[Path]]:
    """Write attachments to a private folder; the caller removes it afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="gateway-api-send-"))
    try:
        paths = []
        for name, content in attachments:
            path = folder / name
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(content)
            paths.append(path)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder, paths


@dataclass(frozen=True, slots=True)
class _SendFields:
    """The fields of a send request, checked: case type, case, marking, reply."""

    case_type: str
    case: dict[str, Any]
    public: bool
    reply_to: str | None


def _send_fields(body: dict[str, Any], *, allowed: set[str]) -> _SendFields:
    """Check a send request's fields (JSON body or the multipart ``meta`` part).

    Raises :class:`InvalidInput` naming the first field that is missing, unknown
    or of the wrong type.
    """
    refuse_unknown_fields(body, allowed)
    case_type = require_str(body, "type", max_length=64)
    case = body.get("case")
    if not isinstance(case, dict):
        raise InvalidInput("field 'case' is required and must be a JSON object")
    public = body.get("public", False)
    if not isinstance(public, bool):
        raise InvalidInput("field 'public' must be true or false")
    reply_to = optional_str(body, "reply_to", max_length=64)
    return _SendFields(case_type, case, public, reply_to)


def _send(call: Call, fields: _SendFields, paths: list[Path]) -> Any:
    """Seal and queue the case with its attachment files (in a worker thread)."""
    return send_case(
        call.ctx,
        call.actor,
        fields.case_type,
        fields.case,
        paths,
        public=fields.public,
        reply_to=fields.reply_to,
        now=utc_now(),
    )


async def _bundles_send_multipart(call: Call) -> web.StreamResponse:

    limits = (await call.run(lambda: call.ctx.policy)).limits
    spooled = await spool_multipart(
        call.request,
        max_case_bytes=limits.max_case_bytes,
        max_attachments=limits.max_attachments,
        max_attachment_bytes=limits.max_attachment_bytes,
        run=call.run,
    )
    removed: list[bool] = []
    try:
        fields = _send_fields(spooled.meta, allowed={"type", "case", "public", "reply_to"})

        def send_and_remove() -> Any:
            # The spooled files go in the same worker call as the send (one
            # thread hop less per send); the outer ``finally`` covers every
            # way out before it.
            try:
                return _send(call, fields, spooled.paths)
            finally:
                spooled.remove()
                removed.append(True)

        sent = await call.run(send_and_remove)
    finally:
        if not removed:
            await call.run(spooled.remove)
    return json_response(sent.to_dict(), status=201)


async def bundles_send(call: Call) -> web.StreamResponse:
    if call.request.content_type == "multipart/form-data":
        return await _bundles_send_multipart(call)
    body = await call.json_body()
    fields = _send_fields(body, allowed={"type", "case", "attachments", "public", "reply_to"})
    attachments = _decoded_attachments(body)

    def send() -> Any:
        folder, paths = _spool_attachments(attachments)
        try:
            return _send(call, fields, paths)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    sent = await call.run(send)
    return json_response(sent.to_dict(), status=201)


async def inbox_list(call: Call) -> web.StreamResponse:
    if call.query("gaps") in ("true", "1"):
        channels = await call.run(lambda: list_gaps(call.node))
        return json_response({"gaps": [c.to_dict() for c in channels]})
    case_type = call.query("type")
    suspect = _flag(call, "suspect")
    rows = await call.run(lambda: list_inbox(call.node, case_type=case_type, suspect=suspect))
    purged = await call.run(lambda: purged_dates_of(call.node, Direction.RECEIVED))
    return json_response(
        {"bundles": [describe_inbox_entry(r, purged.get(r.bundle_id)) for r in rows]}
    )


def _flag(call: Call, name: str) -> bool:
    """A true/false query parameter (absent: false)."""
    value = call.query(name)
    if value not in (None, "true", "false"):
        raise InvalidInput(f"query parameter {name} must be true or false")
    return value == "true"


async def resend(call: Call) -> web.StreamResponse:
    body = await call.json_body()
    refuse_unknown_fields(body, {"bundle_ids", "suspect"})
    ids = body.get("bundle_ids", [])
    if (
        not isinstance(ids, list)
        or len(ids) > MAX_RESEND
        or not all(isinstance(i, str) and 0 < len(i) <= 64 for i in ids)
    ):
        raise InvalidInput(f"field 'bundle_ids' must be a list of at most {MAX_RESEND} bundle ids")
    suspect = body.get("suspect", False)
    if not isinstance(suspect, bool):
        raise InvalidInput("field 'suspect' must be true or false")
    report = await call.run(
        lambda: resend_bundles(call.ctx, call.actor, ids, suspect=suspect, now=utc_now())
    )
    return json_response(report.to_dict(), status=201 if report.resent else 200)


async def outbox_list(call: Call) -> web.StreamResponse:
    state = call.query("state")
    if state not in (None, "queued", "delivered", "replaced"):
        raise InvalidInput("query parameter state must be queued, delivered or replaced")
    rows = await call.run(lambda: list_outbox(call.node, state=state))
    purged = await call.run(lambda: purged_dates_of(call.node, Direction.SENT))
    refused = await call.run(lambda: refusals_by_peer(call.node))
    return json_response(
        {
            "bundles": [
                describe_outbox_entry(
                    r, purged_at=purged.get(r.bundle_id), refusal=refused.get(r.bundle_id)
                )
                for r in rows
            ]
        }
    )


def _read(call: Call, bundle_id: str, *, accept_suspect: bool, out_dir: Path | None) -> ReadBundle:
    """Decrypt ``bundle_id`` for the acting officer (the read is recorded), blocking.

    The one read of the show and content routes: ``out_dir`` is a temporary
    folder the route removes again (so nothing written there is tracked for
    retention), or None for the case alone.
    """
    return read_bundle(
        call.ctx,
        call.actor,
        bundle_id,
        out_dir=out_dir,
        now=call.ctx.now(),
        track_outputs=False,
        accept_suspect=accept_suspect,
    )


def _read_with_attachments(
    call: Call, bundle_id: str, *, accept_suspect: bool
) -> tuple[ReadBundle, list[dict[str, Any]]]:
    folder = Path(tempfile.mkdtemp(prefix="gateway-api-show-"))
    try:
        shown = _read(call, bundle_id, accept_suspect=accept_suspect, out_dir=folder)
        case_file = f"{shown.bundle_id}.json"
        parts = [path for path in shown.written if path.name != case_file]
        total = sum(path.stat().st_size for path in parts)
        if total > MAX_INLINE_ATTACHMENT_BYTES:
            raise PolicyRefused(
                f"attachments of {total} bytes are more than the API returns inline "
                f"({MAX_INLINE_ATTACHMENT_BYTES}); use 'gateway show {bundle_id} --out DIR'",
                reason="request.too-large",
            )
        attachments = [
            {
                "name": path.name,
                "size": path.stat().st_size,
                "content_base64": base64.b64encode(path.read_bytes()).decode("ascii"),
            }
            for path in parts
        ]
        return shown, attachments
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def bundles_show(call: Call) -> web.StreamResponse:
    bundle_id = call.path("bundle_id")
    with_parts = call.query("attachments")
    if with_parts not in (None, "true", "false"):
        raise InvalidInput("query parameter attachments must be true or false")
    accept_suspect = _flag(call, "accept_suspect")
    attachments: list[dict[str, Any]] | None = None
    if with_parts == "true":
        shown, attachments = await call.run(
            lambda: _read_with_attachments(call, bundle_id, accept_suspect=accept_suspect)
        )
    else:
        shown = await call.run(
            lambda: _read(call, bundle_id, accept_suspect=accept_suspect, out_dir=None)
        )
    data = shown.to_dict()
    if attachments is not None:
        data["attachments"] = attachments
    return json_response(data)


async def bundles_content(call: Call) -> web.StreamResponse:
    """Decrypt for the acting officer (the read is recorded) and stream the files."""
    bundle_id = call.path("bundle_id")
    accept_suspect = _flag(call, "accept_suspect")
    loop = asyncio.get_running_loop()
    response = web.StreamResponse()
    parent = Path(tempfile.mkdtemp(prefix="gateway-api-content-"))
    try:

        def read_and_send() -> None:
            folder = parent / "out"
            folder.mkdir(mode=0o700)
            shown = _read(call, bundle_id, accept_suspect=accept_suspect, out_dir=folder)
            names = [path.relative_to(folder).as_posix() for path in shown.written]
            total = sum(path.stat().st_size for path in shown.written)
            result = shown.to_dict()
            result.pop("case", None)  # the case travels as its file only
            prepare_file_stream(call.request, response, loop, total)
            stream_folder(response, loop, folder, names, to_jsonable(result))

        try:
            await call.run(read_and_send)
        except BaseException:
            if response.prepared:
                raise abort_stream(call.request) from None
            raise
    finally:
        await call.run(lambda: shutil.rmtree(parent, ignore_errors=True))
    await response.write_eof()
    return response


ROUTES = (
    ApiRoute(
        "POST",
        "/api/v1/bundles",
        "send",
        bundles_send,
        "Seal a case for the peer and queue it",
        max_body=MAX_SEND_BODY,
    ),
    ApiRoute("GET", "/api/v1/inbox", "inbox", inbox_list, "Bundles received from the peer"),
    ApiRoute("GET", "/api/v1/outbox", "inbox", outbox_list, "Bundles sent, queued or delivered"),
    ApiRoute(
        "GET",
        "/api/v1/bundles/{bundle_id}",
        "show",
        bundles_show,
        "Decrypt a bundle for the acting officer; the read is recorded",
    ),
    ApiRoute(
        "GET",
        "/api/v1/bundles/{bundle_id}/content",
        "show",
        bundles_content,
        "Decrypt a bundle for the acting officer and stream its case and attachments",
    ),
    ApiRoute(
        "POST",
        "/api/v1/resend",
        "resend",
        resend,
        "Re-seal sent bundles under the current keys, each naming the one it replaces",
    ),
)
