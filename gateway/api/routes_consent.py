"""Local API routes for written consent and disclosure (officers, MOC item 3).

The same services as ``gateway consent ...`` and ``gateway disclose``. A
disclosure refused by the consent ledger answers 403 with reason ``consent``
(the CLI's exit code 3), names what is missing, and is recorded in the ledger
as a blocked attempt. An allowed disclosure returns the released files in the
answer (base64), so nothing decrypted stays on the server.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
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
from gateway.api.streams import abort_stream, folder_files, prepare_file_stream, stream_folder
from gateway.core.consent import parse_valid_until
from gateway.core.jsonable import to_jsonable
from gateway.errors import InvalidInput, NotFound, PolicyRefused
from gateway.node import approvals
from gateway.node.consent import disclosure as consent_disclosure
from gateway.node.consent import protocol as consent_protocol
from gateway.node.consent import queries as consent_queries
from gateway.node.inbox import inbox_entry
from gateway.node.outbox import outbox_entry
from gateway.node.runtime import Node, utc_now

__all__ = ["MAX_DISCLOSURE_BYTES", "ROUTES"]

MAX_DISCLOSURE_BYTES = 16 * 1024 * 1024
"""Largest total of envelopes a disclosure through the API may release; larger
ones go through ``gateway disclose --out DIR``. Checked before anything is
decrypted or recorded, so a refusal spends no use of a consent."""
_MAX_ITEMS = 1000


def _bundle_ids(body: dict[str, Any]) -> list[str]:
    value = body.get("bundle_ids")
    if not isinstance(value, list) or not value:
        raise InvalidInput("field 'bundle_ids' is required and must be a non-empty list")
    if len(value) > _MAX_ITEMS:
        raise InvalidInput(f"field 'bundle_ids' names more than {_MAX_ITEMS} bundles")
    if not all(isinstance(item, str) and 0 < len(item) <= 64 for item in value):
        raise InvalidInput("field 'bundle_ids' must hold bundle ids (strings of 1-64 characters)")
    return list(value)


async def consent_request(call: Call) -> web.StreamResponse:
    body = await call.json_body()
    refuse_unknown_fields(body, {"bundle_ids", "recipient", "purpose"})
    bundle_ids = _bundle_ids(body)
    recipient = require_str(body, "recipient", max_length=500)
    purpose = require_str(body, "purpose", max_length=2000)
    sent = await call.run(
        lambda: consent_protocol.request_consent(
            call.ctx, call.actor, bundle_ids, recipient, purpose, now=utc_now()
        )
    )
    return json_response(sent.to_dict(), status=201)


async def consent_grant(call: Call) -> web.StreamResponse:
    request_id = call.path("request_id")
    body = await call.json_body()
    refuse_unknown_fields(body, {"valid_until", "max_uses", "conditions"})
    valid_until = parse_valid_until(
        optional_str(body, "valid_until", max_length=64), option="valid_until"
    )
    max_uses = body.get("max_uses")
    if max_uses is not None and (
        not isinstance(max_uses, int) or isinstance(max_uses, bool) or max_uses < 1
    ):
        raise InvalidInput("field 'max_uses' must be a whole number of at least 1")
    conditions = optional_str(body, "conditions", max_length=4000) or ""
    sent = await call.run(
        lambda: approvals.grant_consent(
            call.ctx,
            call.actor,
            request_id,
            valid_until=valid_until,
            max_uses=max_uses,
            conditions=conditions,
            now=utc_now(),
        )
    )
    # 201: granted and queued; 202: a proposal waits for more approvals (two-person rule).
    return json_response(sent, status=201 if sent["state"] == "executed" else 202)


async def consent_deny(call: Call) -> web.StreamResponse:
    request_id = call.path("request_id")
    body = await call.json_body()
    refuse_unknown_fields(body, {"reason"})
    reason = require_str(body, "reason", max_length=2000)
    sent = await call.run(
        lambda: consent_protocol.deny(
            call.ctx, call.actor, request_id, reason=reason, now=utc_now()
        )
    )
    return json_response(sent.to_dict(), status=201)


async def consent_revoke(call: Call) -> web.StreamResponse:
    consent_id = call.path("consent_id")
    body = await call.json_body()
    refuse_unknown_fields(body, {"reason"})
    reason = require_str(body, "reason", max_length=2000)
    sent = await call.run(
        lambda: approvals.revoke_consent(
            call.ctx, call.actor, consent_id, reason=reason, now=utc_now()
        )
    )
    # 201: revoked and queued; 202: a proposal waits for more approvals (two-person rule).
    return json_response(sent, status=201 if sent["state"] == "executed" else 202)


async def consent_list(call: Call) -> web.StreamResponse:
    listing = await call.run(lambda: consent_queries.list_consents(call.ctx, now=utc_now()))
    return json_response(listing)


def _envelope_bytes(node: Node, bundle_ids: list[str]) -> int:
    """The stored size of the named bundles (unknown ids are left to the service)."""
    total = 0
    for bundle_id in bundle_ids:
        try:
            total += inbox_entry(node, bundle_id).envelope_size
        except NotFound:
            try:
                total += outbox_entry(node, bundle_id).envelope_size
            except NotFound:
                continue
    return total


def _disclose(call: Call, bundle_ids: list[str], recipient: str, purpose: str) -> dict[str, Any]:
    size = _envelope_bytes(call.node, bundle_ids)
    if size > MAX_DISCLOSURE_BYTES:
        raise PolicyRefused(
            f"the bundles hold {size} bytes, more than the API releases inline "
            f"({MAX_DISCLOSURE_BYTES}); use 'gateway disclose ... --out DIR'",
            reason="request.too-large",
        )
    parent = Path(tempfile.mkdtemp(prefix="gateway-api-disclose-"))
    try:
        result = consent_disclosure.disclose(
            call.ctx,
            call.actor,
            bundle_ids,
            recipient,
            purpose,
            parent / "out",
            now=utc_now(),
        )
        data = result.to_dict()
        data.pop("out_dir", None)
        data["contents"] = [
            {
                "name": path.relative_to(result.out_dir).as_posix(),
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "content_base64": base64.b64encode(path.read_bytes()).decode("ascii"),
            }
            for path in sorted(result.out_dir.rglob("*"))
            if path.is_file()
        ]
        return data
    finally:
        shutil.rmtree(parent, ignore_errors=True)


async def disclosures_make(call: Call) -> web.StreamResponse:
    body = await call.json_body()
    refuse_unknown_fields(body, {"bundle_ids", "recipient", "purpose"})
    bundle_ids = _bundle_ids(body)
    recipient = require_str(body, "recipient", max_length=500)
    purpose = require_str(body, "purpose", max_length=2000)
    data = await call.run(lambda: _disclose(call, bundle_ids, recipient, purpose))
    return json_response(data, status=201)


async def disclosures_stream(call: Call) -> web.StreamResponse:
    """Disclose if the consent ledger allows, streaming the package to the caller.

    The ``disclosure-made`` (or ``internal-share``) entry and the consent use
    are committed only after the whole package was written to the caller; the
    answer's final chunk follows the commit. A refusal answers 403 before any
    file is sent.
    """
    body = await call.json_body()
    refuse_unknown_fields(body, {"bundle_ids", "recipient", "purpose"})
    bundle_ids = _bundle_ids(body)
    recipient = require_str(body, "recipient", max_length=500)
    purpose = require_str(body, "purpose", max_length=2000)
    loop = asyncio.get_running_loop()
    response = web.StreamResponse()

    def deliver(folder: Path, result: consent_disclosure.DisclosureResult) -> None:
        names = folder_files(folder)
        total = sum((folder / name).stat().st_size for name in names)
        data = result.to_dict()
        data.pop("out_dir", None)
        prepare_file_stream(call.request, response, loop, total)
        stream_folder(response, loop, folder, names, to_jsonable(data))

    parent = Path(tempfile.mkdtemp(prefix="gateway-api-disclose-"))
    try:
        try:
            await call.run(
                lambda: consent_disclosure.disclose(
                    call.ctx,
                    call.actor,
                    bundle_ids,
                    recipient,
                    purpose,
                    parent / "out",
                    now=utc_now(),
                    deliver=deliver,
                )
            )
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
        "/api/v1/consents/requests",
        "consent.request",
        consent_request,
        "Ask the originating side for consent to pass its bundles to a third party",
    ),
    ApiRoute(
        "POST",
        "/api/v1/consents/requests/{request_id}/grant",
        "consent.grant",
        consent_grant,
        "Give the peer written consent for its request (signed and sent)",
    ),
    ApiRoute(
        "POST",
        "/api/v1/consents/requests/{request_id}/deny",
        "consent.deny",
        consent_deny,
        "Refuse the peer's consent request",
    ),
    ApiRoute(
        "POST",
        "/api/v1/consents/{consent_id}/revoke",
        "consent.revoke",
        consent_revoke,
        "Withdraw a consent this side granted",
    ),
    ApiRoute(
        "GET",
        "/api/v1/consents",
        "consent.list",
        consent_list,
        "Consent requests and consents, both directions, with their state",
    ),
    ApiRoute(
        "POST",
        "/api/v1/disclosures",
        "disclose",
        disclosures_make,
        "Disclose bundles to a recipient if the consent ledger allows",
    ),
    ApiRoute(
        "POST",
        "/api/v1/disclosures/stream",
        "disclose",
        disclosures_stream,
        "Disclose bundles if the consent ledger allows, streaming the package",
    ),
)
