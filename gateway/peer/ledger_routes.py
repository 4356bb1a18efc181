"""Peer routes for ledger witnessing, added to the peer app behind its authentication.

- ``POST /v1/checkpoints``: the peer's signed checkpoint, either bare (the
  first one) or as ``{"checkpoint": <signed>, "from": S, "proof": [...]}``
  with the RFC 9162 consistency proof from the size ``S`` we witnessed last;
  verified against the pinned peer manifest and kept as its witness. A larger
  checkpoint without that proof gets 409 ``ledger.proof-required`` naming
  ``witnessed_size``. Another root for a size already witnessed, or a proof
  that fails, is recorded as an ``equivocation`` entry and refused.
- ``GET /v1/ledger/consistency?first=N[&second=M]``: our signed checkpoint of
  size ``M`` (default: the newest) and the RFC 9162 consistency proof from
  size ``N`` to it.

Use ``create_peer_app(services, limits, extra_routes=ledger_routes(db))``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from aiohttp import web

from gateway.core import merkle
from gateway.core.canonical import canonical_bytes, parse_bounded_json
from gateway.core.keys import KeyManifest
from gateway.core.ledger import EntryKind, SignedCheckpoint, WitnessMismatch
from gateway.core.roles import SYSTEM
from gateway.errors import InvalidInput, NotFound
from gateway.node import ledger
from gateway.node.ledger import checkpoint as ledger_checkpoint
from gateway.node.ledger import witness as ledger_witness
from gateway.node.peer_trust import require_pinned_peer
from gateway.peer.ledger_client import CHECKPOINTS_PATH, CONSISTENCY_PATH
from gateway.peer.server import PEER_SERVICES, read_signed_body
from gateway.store.db import Database

__all__ = [
    "LEDGER_ROUTES",
    "LedgerRoutes",
    "add_ledger_routes",
    "ledger_routes",
    "witness_checkpoint",
]

_MAX_CHECKPOINT_BODY = 8 * 1024
_MAX_SIZE = 2**62


@dataclass(frozen=True)
class LedgerRoutes:
    """What the ledger routes need beyond the peer services: the node's database."""

    db: Database


LEDGER_ROUTES: Final = web.AppKey("ledger_routes", LedgerRoutes)


def _peer_keys(db: Database) -> KeyManifest:
    with db.transaction() as session:
        return require_pinned_peer(session, needed_for="no checkpoint can be verified")


def _split_push(raw: bytes) -> tuple[bytes, int | None, list[bytes] | None]:
    """(signed checkpoint wire bytes, proof's first size, proof) of a push body."""
    value = parse_bounded_json(raw, max_bytes=_MAX_CHECKPOINT_BODY, max_depth=4)
    if not isinstance(value, dict) or "checkpoint" not in value:
        return raw, None, None
    if set(value) != {"checkpoint", "from", "proof"}:
        raise InvalidInput("a checkpoint push is {checkpoint, from, proof}")
    first, items = value["from"], value["proof"]
    if not isinstance(first, int) or isinstance(first, bool) or not 0 < first <= _MAX_SIZE:
        raise InvalidInput("'from' is not a size")
    if not isinstance(items, list) or len(items) > merkle.MAX_PROOF_LENGTH:
        raise InvalidInput("'proof' is not a list of at most 128 hashes")
    proof: list[bytes] = []
    for item in items:
        if not isinstance(item, str):
            raise InvalidInput("a proof hash is not text")
        try:
            proof.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise InvalidInput("a proof hash is not base64") from None
    return canonical_bytes(value["checkpoint"]), first, proof


def _store(db: Database, raw: bytes, peer: str, now: datetime) -> dict[str, Any]:
    keys = _peer_keys(db)
    signed, first, proof = _split_push(raw)
    try:
        with db.transaction() as session:
            newest = ledger_witness.last_witnessed(session, peer)
            if proof is not None and (newest is None or first != newest.size):
                # A proof from another size proves nothing about our witness.
                proof = None
            checkpoint = ledger_witness.store_peer_checkpoint(
                session, signed, keys, peer_node=peer, now=now, proof=proof
            )
    except WitnessMismatch as exc:
        with db.transaction() as session:
            ledger.record_event(
                session,
                kind=EntryKind.EQUIVOCATION,
                actor=SYSTEM,
                now=now,
                body={"node": peer, "problem": exc.message[:500]},
            )
        raise
    return {"status": "witnessed", "size": checkpoint.size, "root": checkpoint.root.hex()}


def witness_checkpoint(db: Database, raw: bytes, peer: str, now: datetime) -> dict[str, Any]:
    """Keep the peer's checkpoint (a body of ``POST /v1/checkpoints``) as its witness.

    What the route does, for a checkpoint that came in a pull answer. Raises
    :class:`~gateway.node.ledger.ConsistencyProofRequired`, a
    :class:`~gateway.errors.VerificationError` (an equivocation is recorded
    first) or :class:`~gateway.errors.InvalidInput`.
    """
    return _store(db, raw, peer, now)


async def _post_checkpoint(request: web.Request) -> web.Response:
    services = request.app[PEER_SERVICES]
    db = request.app[LEDGER_ROUTES].db
    raw = await read_signed_body(request, max_bytes=_MAX_CHECKPOINT_BODY)
    now = services.clock()
    try:
        result = await asyncio.to_thread(_store, db, raw, services.peer_id, now)
    except ledger_witness.ConsistencyProofRequired as exc:
        return web.json_response(
            {
                "error": {
                    "status": 409,
                    "reason": exc.reason,
                    "witnessed_size": exc.witnessed_size,
                }
            },
            status=409,
        )
    return web.json_response(result)


def _size_param(request: web.Request, name: str, *, required: bool) -> int | None:
    text = request.query.get(name)
    if text is None:
        if required:
            raise InvalidInput(f"query parameter {name} is required")
        return None
    if not text.isdigit() or len(text) > 19:
        raise InvalidInput(f"query parameter {name} is not a size")
    value = int(text)
    if value > _MAX_SIZE:
        raise InvalidInput(f"query parameter {name} is too large")
    return value


def _answer(db: Database, first: int, second: int | None) -> dict[str, Any]:
    with db.transaction() as session:
        signed: SignedCheckpoint | None
        if second is None:
            signed = ledger_checkpoint.latest_checkpoint(session)
            if signed is None:
                raise NotFound("this node has published no checkpoint yet")
        else:
            signed = ledger_checkpoint.checkpoint_at(session, second)
        size = signed.checkpoint.size
        if not 0 < first <= size:
            raise InvalidInput(f"no consistency proof from size {first} to size {size}")
        proof = ledger_checkpoint.consistency_proof(session, first, size)
    return {
        "first": first,
        "checkpoint": {
            "body": signed.body.decode("utf-8"),
            "signature": base64.b64encode(signed.signature).decode("ascii"),
        },
        "proof": [base64.b64encode(item).decode("ascii") for item in proof],
    }


async def _get_consistency(request: web.Request) -> web.Response:
    db = request.app[LEDGER_ROUTES].db
    first = _size_param(request, "first", required=True)
    second = _size_param(request, "second", required=False)
    assert first is not None
    return web.json_response(await asyncio.to_thread(_answer, db, first, second))


def add_ledger_routes(app: web.Application) -> None:
    """Add the witnessing routes; ``app[LEDGER_ROUTES]`` must be set first."""
    if LEDGER_ROUTES not in app:
        raise RuntimeError("set app[LEDGER_ROUTES] before adding the ledger routes")
    app.router.add_post(CHECKPOINTS_PATH, _post_checkpoint)
    app.router.add_get(CONSISTENCY_PATH, _get_consistency, allow_head=False)


def ledger_routes(db: Database) -> Callable[[web.Application], None]:
    """The ``extra_routes`` hook for ``create_peer_app``: sets the database, adds the routes."""

    def install(app: web.Application) -> None:
        app[LEDGER_ROUTES] = LedgerRoutes(db=db)
        add_ledger_routes(app)

    return install
