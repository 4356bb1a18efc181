"""Workers of a serving node that need the peer client: sending checkpoints.

Signing a checkpoint is a node pass (:func:`gateway.node.housekeeping.checkpoint_once`);
giving it to the peer as a witness needs the peer client, so the loop that
does both sits here, above :mod:`gateway.peer`, where the layer rules allow it.
"""

from __future__ import annotations

import asyncio

from gateway.errors import GatewayError, TransportError
from gateway.log import get_logger
from gateway.node.context import NodeContext
from gateway.node.housekeeping import MANIFEST_WAIT_SECONDS, checkpoint_once, manifests_pending
from gateway.node.ledger import witness as ledger_witness
from gateway.peer.client import PeerClient
from gateway.peer.ledger_client import send_checkpoint

__all__ = ["publish_checkpoints"]

_log = get_logger("housekeeping")


async def publish_checkpoints(
    ctx: NodeContext,
    client: PeerClient | None,
    stop: asyncio.Event,
    *,
    interval: float,
) -> None:
    """Sign and send checkpoints every ``interval`` seconds until ``stop`` is set.

    A checkpoint is sent only when no manifest of this node waits for
    delivery (see the module notes); a held-back one is tried again every
    :data:`MANIFEST_WAIT_SECONDS` rather than at the next interval. The
    keyring is read from ``ctx`` on every pass, the time from ``ctx.now``.
    """
    node, clock = ctx.node, ctx.now
    sent_size = -1
    held_back = False
    while not stop.is_set():
        delay = interval
        try:
            signed = await asyncio.to_thread(checkpoint_once, ctx, now=clock())
            if signed is not None and client is not None and signed.checkpoint.size != sent_size:
                if await asyncio.to_thread(manifests_pending, node):
                    if not held_back:
                        _log.info("checkpoint_waits_for_manifest", size=signed.checkpoint.size)
                    held_back = True
                    delay = min(interval, MANIFEST_WAIT_SECONDS)
                else:
                    held_back = False
                    await send_checkpoint(
                        client, signed, prove=ledger_witness.consistency_prover(node.db)
                    )
                    sent_size = signed.checkpoint.size
                    node.metrics.checkpoint_witnessed(sent_size)
                    node.metrics.peer.record(True)
                    _log.info("checkpoint_sent", size=sent_size)
        except TransportError as exc:
            node.metrics.peer.record(False, exc.reason)
            _log.warning("checkpoint_send_failed", reason=exc.reason)
        except GatewayError as exc:
            # A ledger that fails its own verification is never signed over: say so loudly.
            _log.error("checkpoint_failed", reason=exc.reason, error=exc.message)
        try:
            await asyncio.wait_for(stop.wait(), timeout=delay)
        except TimeoutError:
            continue
