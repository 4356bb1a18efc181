"""Periodic work of a serving node: signing ledger checkpoints, retention, watching keys.

The passes run inside ``gateway serve`` (composed by :mod:`gateway.service`) beside
the peer server and the sender worker; sending a checkpoint to the peer is
:func:`gateway.service.workers.publish_checkpoints`, above the peer layer.

* **Checkpoints** (SPEC §7): every ``[server] checkpoint_interval_seconds`` the
  node signs a checkpoint of its ledger when the ledger grew since the last
  one, and gives its newest checkpoint to the peer, which keeps it as a
  witness. A peer that is unreachable is tried again at the next interval;
  the checkpoint stays signed and recorded meanwhile. A checkpoint is never
  sent while a manifest of this node waits for delivery: after a rotation
  the checkpoint is signed with a key only the new manifest lists, so the
  peer must have that manifest first (the sender worker delivers it, first
  thing in its pass); until then the publisher looks again every
  :data:`MANIFEST_WAIT_SECONDS`.
* **Retention** (SPEC §8a): every ``[server] retention_interval_seconds`` (an
  hour by default) the node runs the same purge as ``gateway purge``, under
  the policy as it is on disk at that moment: envelope bodies and decrypted
  outputs past their period are destroyed (:mod:`gateway.node.retention`). A
  pass that fails is logged and tried again at the next interval.
* **Keys**: ``gateway keys rotate`` / ``revoke`` / ``rotate-root`` run in
  another process and publish a new manifest of this node. A serving process
  notices the newer manifest and asks to be restarted, so that it signs with
  the new keys from then on and never with a revoked one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime

from gateway.core.ledger import SignedCheckpoint
from gateway.errors import GatewayError
from gateway.log import get_logger
from gateway.node.context import NodeContext
from gateway.node.ledger import checkpoint as ledger_checkpoint
from gateway.node.own_keys import own_manifest, pending_manifest_count
from gateway.node.policy import load_policy
from gateway.node.retention import PurgeReport, purge
from gateway.node.runtime import Node, utc_now

__all__ = [
    "MANIFEST_WAIT_SECONDS",
    "checkpoint_once",
    "enforce_retention",
    "manifest_changed",
    "manifests_pending",
    "retention_once",
    "watch_own_keys",
]

_log = get_logger("housekeeping")
KEY_WATCH_SECONDS = 5.0
MANIFEST_WAIT_SECONDS = 0.5
"""How often a checkpoint held back for an undelivered manifest is looked at again."""


def checkpoint_once(ctx: NodeContext, *, now: datetime) -> SignedCheckpoint | None:
    """Sign a checkpoint when the ledger grew since the last one; return the newest.

    Growth means an entry other than witnessing bookkeeping
    (:data:`gateway.node.ledger.checkpoint.BOOKKEEPING_KINDS`): the last
    checkpoint's own ``checkpoint-made`` entry and the ``checkpoint-received``
    entries of the peer's checkpoints do not count, or two idle nodes would
    witness each other's checkpoints forever, two entries per interval.
    """
    node, keyring = ctx.node, ctx.keyring
    with node.db.transaction() as session:
        latest = ledger_checkpoint.latest_checkpoint(session)
        since = 0 if latest is None else latest.checkpoint.size
        if not ledger_checkpoint.grew_since(session, since):
            return latest
        return ledger_checkpoint.make_checkpoint(session, keyring, now)


def retention_once(node: Node, *, now: datetime) -> PurgeReport:
    """One purge pass under the policy as it is on disk now (what ``gateway purge`` does)."""
    policy = load_policy(node.settings)
    return purge(node, policy.retention, now=now)


async def enforce_retention(
    node: Node,
    stop: asyncio.Event,
    *,
    interval: float,
    clock: Callable[[], datetime] = utc_now,
) -> None:
    """Run a purge pass at once, then every ``interval`` seconds, until ``stop`` is set."""
    while not stop.is_set():
        try:
            report = await asyncio.to_thread(retention_once, node, now=clock())
            if report.purged or report.outputs or report.completed:
                _log.info(
                    "retention_enforced",
                    purged=len(report.purged),
                    held=len(report.held),
                    outputs=len(report.outputs),
                    finished=len(report.completed),
                )
        except GatewayError as exc:
            _log.error("retention_failed", reason=exc.reason, error=exc.message)
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
        except TimeoutError:
            continue


def manifests_pending(node: Node) -> bool:
    """True while a manifest of this node has not been accepted by the peer yet."""
    with node.db.transaction() as session:
        return pending_manifest_count(session) > 0


def manifest_changed(ctx: NodeContext) -> bool:
    """True when this node published a manifest newer than the one its keyring holds."""
    node, keyring = ctx.node, ctx.keyring
    with node.db.transaction() as session:
        return own_manifest(session).version != keyring.manifest.version


async def watch_own_keys(
    ctx: NodeContext,
    stop: asyncio.Event,
    on_change: Callable[[], None],
    *,
    interval: float = KEY_WATCH_SECONDS,
) -> None:
    """Call ``on_change`` once when a newer own manifest appears, then return."""
    keyring = ctx.keyring
    while not stop.is_set():
        try:
            if await asyncio.to_thread(manifest_changed, ctx):
                _log.info("own_keys_changed", held_version=keyring.manifest.version)
                on_change()
                return
        except GatewayError as exc:
            _log.warning("key_watch_failed", reason=exc.reason)
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
        except TimeoutError:
            continue
