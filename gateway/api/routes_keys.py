"""Local API routes for this node's key manifest and the pinned peer (administrators).

Key ceremonies that need the root key or the passphrase (rotate, revoke,
rotate the root, export for the peer's administrator) stay on the host's CLI:
the serving process never holds the passphrase or the root key.
"""

from __future__ import annotations

import base64
import binascii

from aiohttp import web

from gateway.api.routes_common import (
    ApiRoute,
    Call,
    json_response,
    refuse_unknown_fields,
    require_str,
)
from gateway.core.keys import MAX_MANIFEST_BYTES
from gateway.errors import InvalidInput
from gateway.node import own_keys, peer_trust
from gateway.node.runtime import utc_now

__all__ = ["ROUTES"]

_MANIFEST_FIELD_CHARS = (MAX_MANIFEST_BYTES + 2) // 3 * 4


async def keys_show(call: Call) -> web.StreamResponse:
    now = utc_now()
    data = await call.in_transaction(lambda session: own_keys.describe_own_keys(session, now=now))
    return json_response(data)


async def peer_show(call: Call) -> web.StreamResponse:
    manifest = await call.in_transaction(peer_trust.pinned_peer_manifest)
    if manifest is None:
        return json_response({"pinned": None})
    return json_response({"pinned": peer_trust.describe_manifest(manifest, now=utc_now())})


async def peer_add(call: Call) -> web.StreamResponse:
    body = await call.json_body()
    refuse_unknown_fields(body, {"manifest_base64", "fingerprint", "replace"})
    encoded = require_str(body, "manifest_base64", max_length=_MANIFEST_FIELD_CHARS)
    expected = require_str(body, "fingerprint", max_length=128)
    replace = body.get("replace", False)
    if not isinstance(replace, bool):
        raise InvalidInput("field 'replace' must be true or false")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("field 'manifest_base64' is not valid base64") from None
    peer_node = peer_trust.peer_node_of(call.node.node_id)
    now = utc_now()
    manifest = await call.in_transaction(
        lambda session: peer_trust.pin_peer(
            session,
            raw,
            node=peer_node,
            expected_fingerprint=expected,
            now=now,
            actor=call.actor,
            replace=replace,
        )
    )
    return json_response(peer_trust.describe_manifest(manifest, now=now), status=201)


ROUTES = (
    ApiRoute("GET", "/api/v1/keys", "keys.show", keys_show, "This node's key manifest"),
    ApiRoute("GET", "/api/v1/peer", "peer.show", peer_show, "The peer's pinned key manifest"),
    ApiRoute(
        "POST",
        "/api/v1/peer",
        "peer.add",
        peer_add,
        "Pin the peer's key manifest after checking its root fingerprint",
        max_body=_MANIFEST_FIELD_CHARS + 4096,
    ),
)
