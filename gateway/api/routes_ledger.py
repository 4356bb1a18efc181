"""Local API routes for the ledger (compliance officers): metadata, never case content."""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Callable
from typing import Any, BinaryIO, cast

from aiohttp import web

from gateway.api.routes_common import ApiRoute, Call, json_response
from gateway.core.accounting import account_csv
from gateway.core.jsonable import to_jsonable
from gateway.errors import GatewayError, InvalidInput, VerificationError, http_status_for
from gateway.log import get_logger
from gateway.node import accounting
from gateway.node.ledger import export as export_service
from gateway.node.ledger import ledger_size
from gateway.node.ledger import read as ledger_read
from gateway.node.ledger import witness as ledger_witness
from gateway.node.ledger.verify import VerifyReport
from gateway.node.own_keys import verify_ledger_with_keys
from gateway.node.peer_trust import peer_node_of, require_pinned_peer
from gateway.node.runtime import utc_now
from gateway.peer.client import PeerClient
from gateway.peer.ledger_client import fetch_consistency
from gateway.request_context import refusal_message

__all__ = ["DEFAULT_LIST_LIMIT", "ROUTES"]

DEFAULT_LIST_LIMIT = 1000
"""Entries a list answers with when the request names no ``limit``."""
_EXPORT_CHUNK = 64 * 1024
_SPOOL_IN_MEMORY = 4 * 1024 * 1024
_EXPORT_TYPES = {"csv": "text/csv", "jsonl": "application/x-ndjson"}
_NDJSON = "application/x-ndjson"
_log = get_logger("api")


def _limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_LIST_LIMIT
    if not text.isdigit() or not 0 < int(text) <= ledger_read.MAX_LIST_LIMIT:
        raise InvalidInput(f"limit must be a number from 1 to {ledger_read.MAX_LIST_LIMIT}")
    return int(text)


async def ledger_list(call: Call) -> web.StreamResponse:
    bundle = call.query("bundle")
    kind = call.query("kind")
    since = ledger_read.parse_since(call.query("since"), option="since")
    limit = _limit(call.query("limit"))
    entries = await call.in_transaction(
        lambda session: ledger_read.list_entries(
            session, bundle=bundle, kind=kind, since=since, limit=limit
        )
    )
    return json_response([entry.to_dict() for entry in entries])


def _wants_lines(request: web.Request) -> bool:
    """Whether the request's ``Accept`` names NDJSON (a streamed answer) among its types."""
    accept = request.headers.get("Accept", "")
    return any(part.split(";")[0].strip().lower() == _NDJSON for part in accept.split(","))


def _line(item: dict[str, Any]) -> bytes:
    return json.dumps(to_jsonable(item), sort_keys=True, separators=(",", ":")).encode() + b"\n"


def _error_line(exc: BaseException, request: web.Request) -> dict[str, Any]:
    """The ``{"error": ...}`` line of a streamed answer: what the plain answer's body holds,
    logged as the plain answer is (:func:`~gateway.request_context.refusal_message`).

    ``status`` is the HTTP status the plain answer would have had (the stream's
    own status, 200, was sent before the outcome was known).
    """
    if not isinstance(exc, GatewayError):
        _log.error("api_internal_error", error_type=type(exc).__name__)
        return {"error": {"reason": "internal", "message": "internal error", "status": 500}}
    error: dict[str, Any] = {
        "reason": exc.reason,
        "message": refusal_message(exc, request, event="api_refused"),
        "status": http_status_for(exc),
    }
    if isinstance(exc, VerificationError):
        error["check"] = exc.check
    return {"error": error}


def _verify_in_snapshot(
    call: Call, node_id: str, progress: Callable[[int], None] | None
) -> VerifyReport:
    """The whole ledger checked as of one moment (``Database.transaction(snapshot=True)``):
    appends committed meanwhile by the running node are not half seen."""
    with call.node.db.transaction(snapshot=True) as session:
        return verify_ledger_with_keys(session, node_id=node_id, progress=progress)


async def ledger_verify(call: Call) -> web.StreamResponse:
    """The whole ledger checked: one JSON answer, or NDJSON progress lines then the outcome.

    With ``Accept: application/x-ndjson`` the answer is streamed: a first line
    ``{"progress": {"entries": 0, "total": N}}``, one such line as the walk
    passes each 100,000 entries, and a last line ``{"result": report}`` or
    ``{"error": {"reason", "message", "check"?, "status"}}`` (the first bad
    entry named as in the plain answer's 422). Otherwise one JSON answer.
    """
    node_id = call.node.node_id
    if not _wants_lines(call.request):
        report = await call.run(lambda: _verify_in_snapshot(call, node_id, None))
        report.raise_for_problem()
        return json_response(report.to_dict())
    total = await call.in_transaction(ledger_size)
    loop = asyncio.get_running_loop()
    passed: asyncio.Queue[int] = asyncio.Queue()

    def progress(entries: int) -> None:
        # Called on the worker thread of the walk: hand the count to the loop.
        loop.call_soon_threadsafe(passed.put_nowait, entries)

    response = web.StreamResponse(headers={"Content-Type": f"{_NDJSON}; charset=utf-8"})
    await response.prepare(call.request)
    await response.write(_line({"progress": {"entries": 0, "total": total}}))
    walk = asyncio.ensure_future(call.run(lambda: _verify_in_snapshot(call, node_id, progress)))
    # A client gone mid-walk ends this handler; the walk still ends on its thread,
    # and its outcome is taken here so that it is not reported as never retrieved.
    walk.add_done_callback(lambda done: done.cancelled() or done.exception())
    while not walk.done():
        waiting = asyncio.ensure_future(passed.get())
        await asyncio.wait({walk, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if waiting.done():
            entries = waiting.result()
            await response.write(_line({"progress": {"entries": entries, "total": total}}))
        else:
            waiting.cancel()
    while not passed.empty():  # counts handed over just before the walk ended
        entries = passed.get_nowait()
        await response.write(_line({"progress": {"entries": entries, "total": total}}))
    try:
        report = walk.result()
        report.raise_for_problem()
    except Exception as exc:  # noqa: BLE001 - the outcome goes into the stream, as its last line
        last = _error_line(exc, call.request)
    else:
        last = {"result": report.to_dict()}
    await response.write(_line(last))
    await response.write_eof()
    return response


async def ledger_export(call: Call) -> web.StreamResponse:
    fmt = call.query("format")
    if fmt not in _EXPORT_TYPES:
        raise InvalidInput("query parameter format must be csv or jsonl")
    chosen = cast(export_service.ExportFormat, fmt)
    spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)  # noqa: SIM115 - closed below
    try:
        count = await call.in_transaction(
            lambda session: export_service.export(session, chosen, cast(BinaryIO, spool))
        )
        response = web.StreamResponse(
            headers={
                "Content-Type": f"{_EXPORT_TYPES[fmt]}; charset=utf-8",
                "Content-Disposition": f'attachment; filename="ledger-{call.node.node_id}.{fmt}"',
                "X-Entry-Count": str(count),
            }
        )
        await response.prepare(call.request)
        spool.seek(0)
        while chunk := await call.run(lambda: spool.read(_EXPORT_CHUNK)):
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        spool.close()


async def ledger_audit_peer(call: Call) -> web.StreamResponse:
    await call.json_body()
    node = call.node
    peer = peer_node_of(node.node_id)
    pinned = await call.in_transaction(
        lambda session: require_pinned_peer(
            session, needed_for="the peer's ledger cannot be audited"
        )
    )
    keyring = call.keyring_provider()
    loop = asyncio.get_running_loop()

    async def ask(first: int) -> ledger_witness.PeerAnswer:
        async with PeerClient(node.settings, keyring) as client:
            return await fetch_consistency(client, first)

    def fetch(first: int) -> ledger_witness.PeerAnswer:
        # audit_peer runs on a worker thread; the request goes out on the server's loop.
        return asyncio.run_coroutine_threadsafe(ask(first), loop).result()

    result = await call.run(
        lambda: ledger_witness.audit_peer(
            node.db, pinned, peer_node=peer, fetch=fetch, now=utc_now, actor=call.actor
        )
    )
    return json_response(result.to_dict())


async def ledger_account(call: Call) -> web.StreamResponse:

    fmt = call.query("format") or "json"
    if fmt not in ("json", "csv"):
        raise InvalidInput("query parameter format must be json or csv")
    bundle = call.query("bundle")
    report = await call.in_transaction(
        lambda session: accounting.account(session, call.node.node_id, bundle=bundle)
    )
    if fmt == "csv":
        return web.Response(
            text=account_csv(report),
            content_type="text/csv",
            charset="utf-8",
            headers={
                "Content-Disposition": f'attachment; filename="account-{call.node.node_id}.csv"'
            },
        )
    return json_response(report)


ROUTES = (
    ApiRoute("GET", "/api/v1/ledger", "ledger.list", ledger_list, "List ledger entries"),
    ApiRoute("POST", "/api/v1/ledger/verify", "ledger.verify", ledger_verify, "Verify the ledger"),
    ApiRoute(
        "GET",
        "/api/v1/ledger/export",
        "ledger.export",
        ledger_export,
        "Export every entry as CSV or JSON Lines",
    ),
    ApiRoute(
        "POST",
        "/api/v1/ledger/audit-peer",
        "ledger.audit-peer",
        ledger_audit_peer,
        "Ask the peer to prove its ledger extends what we witnessed",
    ),
    ApiRoute(
        "GET",
        "/api/v1/ledger/account",
        "ledger.account",
        ledger_account,
        "Disclosure accounting, both ways, with the ledger entries proving each line",
    ),
)
