"""The host's side of pull mode: the routes a pulling peer calls.

A node whose peer pulls (``[server] peer_delivery = "hold"``) never posts to
it; what it has for the peer waits in its outbox as always, and the peer
fetches it (docs/protocol.md, "Pull mode"):

- ``POST /v1/pull`` (signed; JSON body ``{"wait_seconds", "max_envelopes",
  "max_bytes", "witnessed_size"}``): answers a frame of items
  (:mod:`gateway.core.pull`) in the order the puller applies them: the key
  manifests the peer has not acknowledged, the queued envelopes that are due
  in the channel's order (at most the smaller of this node's
  ``peer_batch_size``, the puller's ``max_envelopes`` and 64, and at most
  ``max_bytes``), and this node's newest checkpoint when it is larger than the
  one the puller says it witnessed (with the consistency proof from that size).
  When no envelope is due, it waits up to ``wait_seconds`` (at most
  :data:`MAX_WAIT_SECONDS`) for one to be queued, then answers what it has
  (manifests and a checkpoint, or an empty frame). When more manifests wait
  than one answer carries (:data:`~gateway.core.pull.MAX_ANSWER_MANIFESTS`),
  the answer is the oldest of them alone, at once: the envelopes and
  checkpoint may be signed by keys only a later manifest lists.
- ``POST /v1/pull/receipts`` (signed; JSON ``{"results": [...], "manifests": [...]}``):
  the signed receipts of what the puller stored, by envelope SHA-256. A bundle
  counts as delivered only when its receipt verifies, exactly as after a push
  (:func:`gateway.node.outbox.take_peer_results`); refusals count an attempt
  with the same backoff. ``manifests`` lists the SHA-256 of each manifest
  the puller pinned.

Both routes sit behind the peer app's middlewares: signed, fresh, nonce used
once, by the pinned peer only; rate and body limits as for every request. A
node that pushes to its peer (``peer_delivery = "push"``) answers both with
409 ``config.peer-mode`` and logs which setting to change.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from aiohttp import web

from gateway import log
from gateway.core.canonical import canonical_bytes, parse_bounded_json
from gateway.core.domain import SHA256_HEX
from gateway.core.pull import (
    MAX_ANSWER_MANIFESTS,
    PULL_CONTENT_TYPE,
    ItemKind,
    Modes,
    item_preface,
    preface,
)
from gateway.errors import InvalidInput, RefusedError
from gateway.metrics import peer_reason
from gateway.node.ledger import checkpoint as ledger_checkpoint
from gateway.node.outbox import (
    next_batch,
    queue_waiter,
    queued_by_hash,
    record_too_large,
    take_peer_results,
)
from gateway.node.own_keys import mark_manifest_delivered, pending_manifests
from gateway.node.runtime import Node
from gateway.peer.server import (
    NODE,
    PEER_SERVICES,
    TRANSPORT_LIMITS,
    read_signed_body,
    set_summary,
)

__all__ = [
    "MAX_WAIT_SECONDS",
    "PULL_PATH",
    "RECEIPTS_PATH",
    "PullOutcome",
    "add_pull_routes",
]

PULL_PATH: Final = "/v1/pull"
RECEIPTS_PATH: Final = "/v1/pull/receipts"
MAX_WAIT_SECONDS: Final = 25.0
"""Longest wait of a pull with nothing to hand out (below the client's 60 s read timeout)."""
POLL_SECONDS: Final = 1.0
"""How often a waiting pull looks at the outbox again (a ``send`` in another process
wakes no one in this one)."""
_MAX_REQUEST: Final = 1024
_MAX_RESULTS: Final = 1024
_CHUNK: Final = 1 << 16
_log = log.get_logger("peer.pull")


@dataclass(frozen=True, slots=True)
class PullOutcome:
    """The puller's answer for one envelope: what ``take_peer_results`` reads."""

    status: str
    receipt: bytes | None
    reason: str | None


@dataclass(frozen=True, slots=True)
class _PullRequest:
    wait_seconds: float
    max_envelopes: int
    max_bytes: int
    witnessed_size: int | None


def _int_field(value: dict[str, Any], name: str, *, low: int, optional: bool = False) -> int | None:
    item = value.get(name)
    if item is None and optional:
        return None
    if not isinstance(item, int) or isinstance(item, bool) or not low <= item <= 2**62:
        raise InvalidInput(f"pull request field {name} is not an integer of at least {low}")
    return item


def _parse_pull(raw: bytes) -> _PullRequest:
    value = parse_bounded_json(raw, max_bytes=_MAX_REQUEST, max_depth=2)
    if not isinstance(value, dict) or not set(value) <= {
        "wait_seconds",
        "max_envelopes",
        "max_bytes",
        "witnessed_size",
    }:
        raise InvalidInput(
            "a pull request is {wait_seconds, max_envelopes, max_bytes, witnessed_size}"
        )
    wait = value.get("wait_seconds", 0)
    if not isinstance(wait, (int, float)) or isinstance(wait, bool) or not 0 <= wait <= 3600:
        raise InvalidInput("pull request field wait_seconds is not a number of seconds")
    max_envelopes = _int_field(value, "max_envelopes", low=1)
    max_bytes = _int_field(value, "max_bytes", low=1)
    assert max_envelopes is not None
    assert max_bytes is not None
    return _PullRequest(
        wait_seconds=min(float(wait), MAX_WAIT_SECONDS),
        max_envelopes=max_envelopes,
        max_bytes=max_bytes,
        witnessed_size=_int_field(value, "witnessed_size", low=0, optional=True),
    )


def _require_hold(request: web.Request, node: Node) -> None:
    server = node.settings.server
    if server.peer_delivery == "hold":
        return
    peer = request.app[PEER_SERVICES].peer_id
    message = (
        f'{peer} pulls, but this node pushes to it ([server] peer_delivery = "push"): set '
        f'peer_delivery = "hold" here, or peer_mode = "push" on {peer}'
    )
    _log.error("peer_mode_mismatch", detail=message, ours=Modes(server.peer_mode).to_dict())
    raise RefusedError(message, reason="config.peer-mode")


@dataclass
class _Answer:
    manifests: list[bytes]
    envelopes: list[Any]
    checkpoint: bytes | None
    more_manifests: bool = False
    """More manifests wait than this answer carries: it carries nothing else."""

    @property
    def count(self) -> int:
        return len(self.manifests) + len(self.envelopes) + (self.checkpoint is not None)


def _checkpoint_item(node: Node, witnessed: int | None) -> bytes | None:
    """Our newest checkpoint in the body form of ``POST /v1/checkpoints``, when the
    puller has witnessed a smaller one (or none)."""
    with node.db.transaction() as session:
        signed = ledger_checkpoint.latest_checkpoint(session)
        if signed is None:
            return None
        size = signed.checkpoint.size
        if witnessed is not None and witnessed >= size:
            return None
        if not witnessed:
            return signed.to_wire()
        proof = ledger_checkpoint.consistency_proof(session, witnessed, size)
    return canonical_bytes(
        {
            "checkpoint": json.loads(signed.to_wire()),
            "from": witnessed,
            "proof": [base64.b64encode(item).decode("ascii") for item in proof],
        }
    )


def _gather(node: Node, ask: _PullRequest, batch_limit: int, now: datetime) -> _Answer:
    """What one answer hands out now (see the module notes).

    At most :data:`MAX_ANSWER_MANIFESTS` manifests, the oldest. When more wait,
    the answer is those alone: an envelope or checkpoint behind them may be
    signed by a key only a later manifest lists, which the puller cannot know
    yet; the next pull hands out the next manifests.
    """
    with node.db.transaction() as session:
        pending = pending_manifests(session, limit=MAX_ANSWER_MANIFESTS + 1)
    manifests = [raw for _id, raw in pending[:MAX_ANSWER_MANIFESTS]]
    if len(pending) > MAX_ANSWER_MANIFESTS:
        return _Answer(manifests, [], None, more_manifests=True)
    batch = next_batch(node, due_before=now, limit=min(batch_limit, ask.max_envelopes))
    envelopes: list[Any] = []
    total = 0
    for item in batch:
        if item.envelope_size > ask.max_bytes:
            if not envelopes:
                # It alone is beyond the puller's limit: count the attempt so the
                # bundles behind it flow; it stays queued and visible.
                record_too_large(
                    node,
                    item,
                    f"refused: limit.envelope (the peer takes at most {ask.max_bytes} bytes)",
                    now=now,
                )
                continue
            break
        if total + item.envelope_size > ask.max_bytes:
            break
        envelopes.append(item)
        total += item.envelope_size
    checkpoint = _checkpoint_item(node, ask.witnessed_size)
    return _Answer(manifests, envelopes, checkpoint)


async def _post_pull(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    limits = request.app[TRANSPORT_LIMITS]
    raw = await read_signed_body(request, max_bytes=_MAX_REQUEST)
    _require_hold(request, node)
    ask = _parse_pull(raw)
    services = request.app[PEER_SERVICES]

    loop = asyncio.get_running_loop()
    deadline = loop.time() + ask.wait_seconds
    with queue_waiter() as wake:
        while True:
            wake.clear()
            answer = await asyncio.to_thread(
                _gather, node, ask, limits.max_batch_envelopes, services.clock()
            )
            # Only envelopes, or more manifests than one answer carries, end the wait
            # early. A few manifests or a newer checkpoint go out with the answer at the
            # end of it: an idle pair exchanges one answer per wait, even when the
            # puller cannot use what it is offered. Manifests beyond one answer hold
            # back the envelopes behind them, so the next answer must come soon.
            if answer.envelopes or answer.more_manifests:
                break
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                async with asyncio.timeout(min(left, POLL_SECONDS)):
                    await wake.wait()
            except TimeoutError:
                pass
    sizes = [len(m) for m in answer.manifests]
    sizes += [item.envelope_size for item in answer.envelopes]
    if answer.checkpoint is not None:
        sizes.append(len(answer.checkpoint))
    length = 8 + sum(9 + size for size in sizes)
    response = web.StreamResponse(status=200)
    response.content_type = PULL_CONTENT_TYPE
    response.content_length = length
    response.headers["Server"] = "ssw-gateway"
    await response.prepare(request)
    await response.write(preface(answer.count))
    for raw_manifest in answer.manifests:
        await response.write(item_preface(ItemKind.MANIFEST, len(raw_manifest)) + raw_manifest)
    for item in answer.envelopes:
        await response.write(item_preface(ItemKind.ENVELOPE, item.envelope_size))
        with item.path.open("rb") as handle:
            written = 0
            while chunk := await asyncio.to_thread(handle.read, _CHUNK):
                written += len(chunk)
                await response.write(chunk)
        if written != item.envelope_size:
            # The stored file changed under us: cut the answer; the puller sees a
            # short body and stores nothing of it.
            _log.error("pull_envelope_changed", bundle_id=item.bundle_id)
            if request.transport is not None:
                request.transport.close()
            return response
    if answer.checkpoint is not None:
        await response.write(item_preface(ItemKind.CHECKPOINT, len(answer.checkpoint)))
        await response.write(answer.checkpoint)
    await response.write_eof()
    set_summary(
        request,
        f"pull: {len(answer.manifests)} manifests, {len(answer.envelopes)} envelopes"
        + (", checkpoint" if answer.checkpoint is not None else ""),
    )
    return response


def _decode_receipt(value: object, index: int) -> bytes:
    if not isinstance(value, str) or len(value) > 8192:
        raise InvalidInput(f"result {index}: receipt is not base64 text")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise InvalidInput(f"result {index}: receipt is not base64") from None


def _parse_receipts(raw: bytes) -> tuple[list[tuple[str, PullOutcome]], list[str]]:
    value = parse_bounded_json(raw, max_bytes=len(raw) + 1, max_depth=4)
    if not isinstance(value, dict) or not set(value) <= {"results", "manifests"}:
        raise InvalidInput("a receipts post is {results, manifests}")
    items = value.get("results", [])
    manifests = value.get("manifests", [])
    if not isinstance(items, list) or len(items) > _MAX_RESULTS:
        raise InvalidInput(f"results is not a list of at most {_MAX_RESULTS}")
    if not isinstance(manifests, list) or len(manifests) > MAX_ANSWER_MANIFESTS:
        raise InvalidInput(f"manifests is not a list of at most {MAX_ANSWER_MANIFESTS} hashes")
    outcomes: list[tuple[str, PullOutcome]] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise InvalidInput(f"result {index} is not an object")
        sha = _sha256_hex(item.get("envelope_sha256"))
        if sha is None:
            raise InvalidInput(f"result {index}: envelope_sha256 is not a SHA-256 in hex")
        status = item.get("status")
        if status == "accepted":
            outcome = PullOutcome("accepted", _decode_receipt(item.get("receipt"), index), None)
        elif status in ("refused", "error"):
            outcome = PullOutcome(str(status), None, peer_reason(item.get("reason")))
        else:
            raise InvalidInput(f"result {index} has unknown status")
        outcomes.append((sha, outcome))
    hashes = [h for h in map(_sha256_hex, manifests) if h is not None]
    if len(hashes) != len(manifests):
        raise InvalidInput("a manifest hash is not a SHA-256 in hex")
    return outcomes, hashes


def _sha256_hex(value: object) -> str | None:
    """``value`` as 64 lowercase hex digits, or None when it is anything else
    (any other character, non-ASCII included, or another length)."""
    if not isinstance(value, str) or len(value) != 64:
        return None
    lowered = value.lower()
    return lowered if SHA256_HEX.fullmatch(lowered) else None


def _acknowledge_manifests(node: Node, hashes: list[str], now: datetime) -> int:
    """Mark delivered each waiting manifest whose SHA-256 (hex) is in ``hashes``;
    how many were.

    A puller acknowledges only manifests an answer carried, and an answer carries
    the oldest :data:`MAX_ANSWER_MANIFESTS` waiting: a manifest made since joins
    the queue behind them and one acknowledged since leaves it, so those carried
    are still among the oldest that many, and only those are read.
    """
    if not hashes:
        return 0
    done = 0
    with node.db.transaction() as session:
        for manifest_id, raw in pending_manifests(session, limit=MAX_ANSWER_MANIFESTS):
            digest = hashlib.sha256(raw).hexdigest()
            if any(hmac.compare_digest(digest, wanted) for wanted in hashes):
                mark_manifest_delivered(session, manifest_id, now)
                node.metrics.manifests_delivered.inc()
                done += 1
    return done


async def _post_receipts(request: web.Request) -> web.Response:
    node = request.app[NODE]
    limits = request.app[TRANSPORT_LIMITS]
    services = request.app[PEER_SERVICES]
    raw = await read_signed_body(request, max_bytes=limits.max_small_body_bytes)
    _require_hold(request, node)
    outcomes, manifest_hashes = _parse_receipts(raw)

    acknowledged = await asyncio.to_thread(
        _acknowledge_manifests, node, manifest_hashes, services.clock()
    )
    queued = await asyncio.to_thread(queued_by_hash, node, [sha for sha, _ in outcomes])
    batch = []
    results = []
    answers: list[dict[str, Any]] = []
    for sha, outcome in outcomes:
        item = queued.pop(sha, None)
        if item is None:
            # Delivered already (a receipt posted again after a lost answer), or
            # nothing we queued: nothing changes.
            answers.append({"envelope_sha256": sha, "status": "not-queued"})
            continue
        batch.append(item)
        results.append(outcome)
    report = await take_peer_results(node, batch, results, now_fn=services.clock)
    for item in batch:
        if item.bundle_id in report.delivered:
            status = "delivered"
        elif item.bundle_id in report.refused:
            status = "refused"
        else:
            status = "retry"
        answers.append({"envelope_sha256": item.envelope_sha256, "status": status})
    set_summary(request, f"receipts: {len(report.delivered)}/{len(outcomes)} delivered")
    if report.delivered:
        node.metrics.peer.record(True)
    return web.json_response(
        {
            "delivered": len(report.delivered),
            "manifests": acknowledged,
            "results": answers,
        }
    )


def add_pull_routes(app: web.Application) -> None:
    """Add ``POST /v1/pull`` and ``POST /v1/pull/receipts``; ``app[NODE]`` must be set."""
    if NODE not in app:
        raise RuntimeError("set app[NODE] before adding the pull routes")
    app.router.add_post(PULL_PATH, _post_pull)
    app.router.add_post(RECEIPTS_PATH, _post_receipts)
