"""The puller: a node in pull mode fetches what its host holds for it.

With ``[server] peer_mode = "pull"`` a node opens no peer listener. Its own
traffic is pushed to the host by the ordinary sender worker (outbound calls
only); what the host has for it is fetched by this worker, a self-contained
async component beside the sender (:func:`run_puller`, stopped by the same
``stop`` event). Each pass (:func:`pull_once`):

1. ``POST /v1/pull``: a long poll; the host answers at once when it holds
   something, or after ``[server] pull_wait_seconds`` with what it has (maybe
   nothing). Bounded by this node's policy: ``peer_batch_size`` envelopes,
   ``max_envelope_bytes`` each, ``peer_body_bytes`` in all; each envelope is
   hashed as it is read, and kept in memory when small or spooled to a file
   under ``<home>/data/spool/pull-*``.
2. In the answer's order: pin each host manifest (verified against the pinned
   one, as ``POST /v1/manifests`` does); take each run of envelopes between
   them exactly as the peer server takes a pushed batch
   (:func:`gateway.peer.server.receive_spooled`: every envelope verified, then
   one transaction for the run's inbox rows, receipts and ledger entries,
   then protocol bundles applied; the inbox is idempotent, so an envelope
   pulled again gets the identical receipt and stores nothing); keep the
   host's checkpoint as its witness.
3. ``POST /v1/pull/receipts``: the receipts (and refusals) by envelope hash,
   and the hashes of the manifests pinned. The host marks a bundle delivered
   only when the receipt verifies. A lost answer or a crash before this step
   only means the next pull hands out the same envelopes again.

Crash points: ``after-pull-answer`` (the answer is spooled, nothing stored),
``after-pull-store`` (stored and receipted here, receipts not yet posted).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import random
import shutil
import tempfile
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway import log
from gateway.core.keys import parse_manifest
from gateway.core.pull import MAX_ANSWER_MANIFESTS, ItemKind
from gateway.errors import GatewayError, RefusedError
from gateway.node.context import NodeContext
from gateway.node.crash import crash_point
from gateway.node.inbox import SpooledEnvelope
from gateway.node.ledger import witness as ledger_witness
from gateway.node.outbox import run_sender_loop
from gateway.node.peer_trust import apply_peer_manifest, pinned_peer_manifest
from gateway.node.runtime import Node, utc_now
from gateway.node.verify_pool import VerifyPool
from gateway.peer.client import PeerClient, PulledItem
from gateway.peer.ledger_routes import witness_checkpoint
from gateway.peer.pull_routes import PULL_PATH, RECEIPTS_PATH
from gateway.peer.server import node_services, receive_spooled

__all__ = ["PullReport", "pull_once", "run_puller", "sweep_pull_spool"]

_log = log.get_logger("peer.puller")
SMALL_ITEM_BYTES = 4 * 1024 * 1024
"""Largest manifest or checkpoint a pull answer may carry (the server's small-body limit)."""
MAX_PULL_ENVELOPES = 64


@dataclass
class PullReport:
    """What one pull pass did."""

    manifests: int = 0
    accepted: list[str] = field(default_factory=list)
    """Envelope hashes stored (or stored before) and receipted."""
    refused: dict[str, str] = field(default_factory=dict)
    checkpoint: int | None = None
    delivered_at_host: int = 0
    manifests_refused: int = 0
    """Manifests of the answer that could not be pinned (not acknowledged)."""
    answered_at_once: bool = False
    """The answer was the one a host gives at once when more manifests wait than an
    answer carries: :data:`MAX_ANSWER_MANIFESTS` manifests and nothing else."""

    @property
    def stalled(self) -> bool:
        """An at-once answer whose manifests were all refused: the host will give the
        same answer again without waiting, so the next pass should wait
        (:func:`run_puller`). An answer the host gave after its long poll paces
        itself and never stalls."""
        return self.answered_at_once and not self.manifests and not self.accepted

    @property
    def items(self) -> int:
        return self.manifests + len(self.accepted) + len(self.refused)


def _spool_root(node: Node) -> Path:
    return node.settings.data_dir / "spool"


def sweep_pull_spool(node: Node) -> None:
    """Remove the spool folders of pulls a killed process left behind (never stored)."""
    root = _spool_root(node)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    for leftover in root.iterdir():
        if leftover.name.startswith("pull-"):
            shutil.rmtree(leftover, ignore_errors=True)


def _witnessed_size(node: Node, peer: str) -> int | None:

    with node.db.transaction() as session:
        witnessed = ledger_witness.last_witnessed(session, peer)
    return witnessed.size if witnessed is not None else None


def _pin_manifest(node: Node, raw: bytes, peer: str, now: datetime) -> None:
    """Pin a manifest of the host; an older one than the pinned (the host offers
    the manifests it has not seen acknowledged, oldest first, and an
    acknowledgement may have been lost after a newer one was pinned) is
    superseded: acknowledged, not pinned."""

    with node.db.transaction() as session:
        pinned = pinned_peer_manifest(session)
        try:
            offered = parse_manifest(raw)
        except GatewayError:
            offered = None
        if pinned is not None and offered is not None and offered.version < pinned.version:
            _log.info("pulled_manifest_superseded", version=offered.version, pinned=pinned.version)
            return
        apply_peer_manifest(session, raw, node=peer, now=now)


def _take(
    ctx: NodeContext,
    items: list[PulledItem],
    report: PullReport,
    *,
    now_fn: Callable[[], datetime],
    verify_pool: VerifyPool | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Apply one answer in order; the receipts post's results and manifest hashes.

    Consecutive envelopes are taken as one batch (:func:`receive_spooled`); a
    manifest or checkpoint between them ends the run before it, so an envelope
    signed with a key only a manifest of the answer lists is verified after
    that manifest is pinned."""
    node = ctx.node
    peer = "pk" if node.node_id == "jp" else "jp"
    skew = ctx.policy.limits.clock_skew
    # One clock for the whole answer: receipts are dated by it as manifests are pinned.
    services = dataclasses.replace(
        node_services(ctx, skew=skew, verify_pool=verify_pool), clock=now_fn
    )
    results: list[dict[str, Any]] = []
    manifests: list[str] = []
    run: list[SpooledEnvelope] = []

    def take_run() -> None:
        for item, outcome in zip(run, receive_spooled(services, run), strict=True):
            outcome.pop("index", None)
            outcome["envelope_sha256"] = item.sha256
            if outcome["status"] == "accepted":
                report.accepted.append(str(item.sha256))
            else:
                report.refused[str(item.sha256)] = str(outcome.get("reason"))
            results.append(outcome)
        run.clear()

    for item in items:
        if item.kind is ItemKind.ENVELOPE:
            if item.path is not None and item.sha256 is not None and item.size is not None:
                # Hashed and measured as it was read; its bytes when kept in memory.
                run.append(SpooledEnvelope(item.path, item.sha256, item.size, body=item.data))
            continue
        if run:
            take_run()
        if item.kind is ItemKind.MANIFEST and item.data is not None:
            try:
                _pin_manifest(node, item.data, peer, now_fn())
            except GatewayError as exc:
                # Not acknowledged: the host offers it again; envelopes signed with
                # keys only it lists are refused meanwhile and retried by the host.
                _log.warning("pulled_manifest_refused", reason=exc.reason, detail=exc.message)
                report.manifests_refused += 1
                continue
            manifests.append(hashlib.sha256(item.data).hexdigest())
            report.manifests += 1
        elif item.kind is ItemKind.CHECKPOINT and item.data is not None:
            try:
                witnessed = witness_checkpoint(node.db, item.data, peer, now_fn())
            except GatewayError as exc:
                _log.warning("pulled_checkpoint_refused", reason=exc.reason, detail=exc.message)
                continue
            report.checkpoint = int(witnessed["size"])
    if run:
        take_run()
    return results, manifests


async def pull_once(
    ctx: NodeContext,
    client: PeerClient,
    *,
    wait: float | None = None,
    now_fn: Callable[[], datetime] = utc_now,
    stop: asyncio.Event | None = None,
    verify_pool: VerifyPool | None = None,
) -> PullReport:
    """One pull pass (see the module notes); returns what it did.

    ``wait`` is the long poll in seconds (default ``[server] pull_wait_seconds``).
    ``verify_pool``: the serving node's pool, used for a large answer as the peer
    server uses it for a large pushed batch.
    Raises :class:`~gateway.errors.TransportError` when the host cannot be
    reached or answers badly, :class:`~gateway.peer.client.PeerRefused` when it
    refuses (``config.peer-mode``: the host pushes instead of holding); nothing
    of a failed answer is stored. When ``stop`` is set while the answer has not
    come, the pull is abandoned (nothing stored) and the pass returns at once.
    """
    node = ctx.node
    limits = ctx.policy.limits
    peer = "pk" if node.node_id == "jp" else "jp"
    max_envelopes = max(1, min(limits.peer_batch_size, MAX_PULL_ENVELOPES))
    ask = {
        "wait_seconds": node.settings.server.pull_wait_seconds if wait is None else wait,
        "max_envelopes": max_envelopes,
        "max_bytes": limits.peer_body_bytes,
        "witnessed_size": await asyncio.to_thread(_witnessed_size, node, peer),
    }
    # What the host may answer: these envelopes, its oldest manifests, one checkpoint.
    max_items = max_envelopes + MAX_ANSWER_MANIFESTS + 1
    root = _spool_root(node)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="pull-", dir=root))
    report = PullReport()
    try:
        fetch = asyncio.ensure_future(
            client.pull(
                PULL_PATH,
                ask,
                directory,
                max_items=max_items,
                max_envelope_bytes=limits.max_envelope_bytes,
                max_small_bytes=SMALL_ITEM_BYTES,
            )
        )
        if stop is not None:
            stopper = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({fetch, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
            if not fetch.done():
                fetch.cancel()
                with contextlib.suppress(asyncio.CancelledError, GatewayError):
                    await fetch
                return report
        items = await fetch
        if not items:
            return report
        report.answered_at_once = len(items) == MAX_ANSWER_MANIFESTS and all(
            item.kind is ItemKind.MANIFEST for item in items
        )
        crash_point("after-pull-answer")
        results, manifests = await asyncio.to_thread(
            _take, ctx, items, report, now_fn=now_fn, verify_pool=verify_pool
        )
    finally:
        await asyncio.to_thread(shutil.rmtree, directory, True)
    crash_point("after-pull-store")
    if results or manifests:
        answer = await client.request_json(
            "POST", RECEIPTS_PATH, {"results": results, "manifests": manifests}
        )
        if isinstance(answer, dict) and isinstance(answer.get("delivered"), int):
            report.delivered_at_host = answer["delivered"]
    return report


async def run_puller(
    ctx: NodeContext,
    client_factory: Callable[[], AbstractAsyncContextManager[PeerClient]],
    stop: asyncio.Event,
    *,
    now_fn: Callable[[], datetime] = utc_now,
    rng: Callable[[], float] = random.random,
    verify_pool: VerifyPool | None = None,
) -> None:
    """The puller worker of ``gateway serve`` in pull mode: pull until ``stop`` is set
    (``verify_pool``: the serving node's, as for :func:`pull_once`).

    Pulls again at once after each answer (the host's long poll paces an idle
    link); backs off exponentially with jitter (1 s doubling to 5 min) while the
    host cannot be reached or refuses, or while an answer's manifests are all
    refused and nothing else arrives (:attr:`PullReport.stalled`), and never
    gives up. A pass in flight
    when ``stop`` is set finishes first (at most one long poll).
    """
    node = ctx.node

    await asyncio.to_thread(sweep_pull_spool, node)

    async def one(client: PeerClient) -> None:
        report = await pull_once(ctx, client, now_fn=now_fn, stop=stop, verify_pool=verify_pool)
        node.metrics.peer.record(True)
        if report.items or report.checkpoint is not None:
            _log.info(
                "pull_pass",
                manifests=report.manifests,
                accepted=len(report.accepted),
                refused=len(report.refused),
                delivered_at_host=report.delivered_at_host,
                checkpoint=report.checkpoint,
            )
        if report.stalled:
            # The host answers at once while more manifests wait than one answer
            # carries; pulling again at once would fetch the same refused ones.
            raise RefusedError(
                f"{report.manifests_refused} manifest(s) of the host could not be pinned and "
                "nothing else arrived (see the pulled_manifest_refused lines); "
                "pulling again after a pause",
                reason="pull.manifests-refused",
            )

    await run_sender_loop(
        node,
        client_factory,
        stop,
        deliver=one,  # type: ignore[arg-type]
        interval=0.01,
        rng=rng,
    )
