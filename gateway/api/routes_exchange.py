"""Local API routes for the exchange (officers): send, inbox, outbox, show.

The same services as ``gateway send | inbox | outbox | show``. Attachments
travel inside the JSON body as base64 and are bounded by the body limit of
``POST /api/v1/bundles`` (32 MiB); larger files go through the CLI, which
streams them. ``GET /api/v1/bundles/{id}`` decrypts for the acting officer and
records the read in the ledger exactly as ``gateway show`` does.
"""

from __future__ import annotations

import base64
import binascii
import os
import shutil
import tempfile
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
from gateway.errors import InvalidInput, PolicyRefused
from gateway.node.inbox import (
    ReadBundle,
    describe_inbox_entry,
    list_gaps,
    list_inbox,
    read_bundle,
)
from gateway.node.outbox import describe_outbox_entry, list_outbox, refusals_by_peer, send_case
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


async def bundles_send(call: Call) -> web.StreamResponse:
    body = await call.json_body()
    refuse_unknown_fields(body, {"type", "case", "attachments", "public", "reply_to"})
    case_type = require_str(body, "type", max_length=64)
    case = body.get("case")
    if not isinstance(case, dict):
        raise InvalidInput("field 'case' is required and must be a JSON object")
    public = body.get("public", False)
    if not isinstance(public, bool):
        raise InvalidInput("field 'public' must be true or false")
    reply_to = optional_str(body, "reply_to", max_length=64)
    attachments = _decoded_attachments(body)
    keyring = call.keyring_provider()

    def send() -> Any:
        folder, paths = _spool_attachments(attachments)
        try:
            return send_case(
                call.node,
                keyring,
                call.actor,
                case_type,
                case,
                paths,
                public=public,
                reply_to=reply_to,
                now=utc_now(),
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    sent = await call.run(send)
    return json_response(sent.to_dict(), status=201)


async def inbox_list(call: Call) -> web.StreamResponse:
    if call.query("gaps") in ("true", "1"):
        channels = await call.run(lambda: list_gaps(call.node))
        return json_response({"gaps": [c.to_dict() for c in channels]})
    case_type = call.query("type")
    rows = await call.run(lambda: list_inbox(call.node, case_type=case_type))
    return json_response({"bundles": [describe_inbox_entry(r) for r in rows]})


async def outbox_list(call: Call) -> web.StreamResponse:
    state = call.query("state")
    if state not in (None, "queued", "delivered"):
        raise InvalidInput("query parameter state must be queued or delivered")
    rows = await call.run(lambda: list_outbox(call.node, state=state))
    refused = await call.run(lambda: refusals_by_peer(call.node))
    return json_response(
        {"bundles": [describe_outbox_entry(r, refused.get(r.bundle_id)) for r in rows]}
    )


def _read_with_attachments(call: Call, bundle_id: str) -> tuple[ReadBundle, list[dict[str, Any]]]:
    keyring = call.keyring_provider()
    folder = Path(tempfile.mkdtemp(prefix="gateway-api-show-"))
    try:
        shown = read_bundle(
            call.node, keyring, call.actor, bundle_id, out_dir=folder, now=utc_now()
        )
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
    attachments: list[dict[str, Any]] | None = None
    if with_parts == "true":
        shown, attachments = await call.run(lambda: _read_with_attachments(call, bundle_id))
    else:
        keyring = call.keyring_provider()
        shown = await call.run(
            lambda: read_bundle(
                call.node, keyring, call.actor, bundle_id, out_dir=None, now=utc_now()
            )
        )
    data = shown.to_dict()
    if attachments is not None:
        data["attachments"] = attachments
    return json_response(data)


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
)
