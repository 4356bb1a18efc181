"""The sender after an outage: delivery resumes within seconds of the peer's return.

Two real nodes on the engine under test; jp's sender worker (``run_sender``,
as ``gateway serve`` runs it) posts over real sockets to pk's peer
application, which is down while 100 bundles are queued and then comes up on
the port the sender keeps trying. Local ``send`` calls wake the worker but
never raise its backoff step, and the bundles are not pushed back by the
failed passes: the first bundle arrives within 5 s of the peer answering.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
from sqlalchemy import func, select
from structlog.testing import capture_logs

from gateway.node.context import NodeContext
from gateway.node.outbox import DeliveryClient, list_outbox, run_sender, send_case
from gateway.node.policy import load_policy
from gateway.node.runtime import utc_now
from gateway.peer.client import PeerClient
from gateway.peer.server import PeerServer, create_node_peer_app, limits_from_policy
from gateway.store.models_exchange import InboxEntry
from tests.exchange_pair import Pair, Side, example, pair  # noqa: F401 - the fixture
from tests.nodes import free_port

RESUME_BOUND_SECONDS = 5.0
QUEUED_DURING_OUTAGE = 100


def _received(side: Side) -> int:
    with side.node.db.transaction() as session:
        return int(session.scalar(select(func.count()).select_from(InboxEntry)) or 0)


async def _until(predicate: Callable[[], bool], *, within: float) -> float:
    """Wait for ``predicate`` (polled off the loop); the monotonic time it became true."""
    async with asyncio.timeout(within):
        while not await asyncio.to_thread(predicate):  # noqa: ASYNC110 - polls a database
            await asyncio.sleep(0.05)
    return time.monotonic()


@pytest.mark.slow
def test_delivery_resumes_within_seconds_after_an_outage_with_a_hundred_queued(
    pair: Pair,
) -> None:
    jp, pk = pair.jp, pair.pk
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def client_factory() -> AbstractAsyncContextManager[DeliveryClient]:
        return PeerClient(jp.node.settings, jp.keyring, peer_url=url)

    def queue_all() -> list[str]:
        return [
            send_case(
                NodeContext(jp.node, jp.keyring),
                jp.officer,
                "exam-fraud",
                example("exam-fraud"),
                [],
                public=False,
                reply_to=None,
                now=utc_now(),
            ).bundle_id
            for _ in range(QUEUED_DURING_OUTAGE)
        ]

    async def scenario() -> tuple[list[str], float, float]:
        stop = asyncio.Event()
        worker = asyncio.create_task(
            run_sender(NodeContext(jp.node, jp.keyring), client_factory, stop)
        )
        sent = await asyncio.to_thread(queue_all)  # every send wakes the worker
        await asyncio.sleep(3.0)  # the outage goes on after the last send
        limits = limits_from_policy(load_policy(pk.node.settings).limits)
        server = PeerServer(create_node_peer_app(NodeContext(pk.node, pk.keyring), limits), limits)
        await server.start("127.0.0.1", port)
        back = time.monotonic()
        try:
            first = await _until(lambda: _received(pk) > 0, within=60)
            await _until(lambda: _received(pk) == len(sent), within=120)
            await _until(
                lambda: {r.state for r in list_outbox(jp.node)} == {"delivered"}, within=60
            )
        finally:
            stop.set()
            await asyncio.wait_for(worker, timeout=30)
            await server.stop()
        return sent, first - back, back

    with capture_logs() as logs:
        sent, resume, _ = asyncio.run(scenario())

    assert resume < RESUME_BOUND_SECONDS, f"first bundle arrived {resume:.1f} s after the peer"
    failed: list[dict[str, Any]] = [line for line in logs if line["event"] == "delivery_failed"]
    assert failed, "the outage was never noticed"
    # A hundred sends woke the worker; only the timer's passes raised the step.
    timer_passes_bound = 6
    assert max(line["failures"] for line in failed) <= timer_passes_bound
    assert all(line["retry_in"] <= 2.0**timer_passes_bound for line in failed)
    rows = list_outbox(jp.node)
    assert sorted(r.bundle_id for r in rows) == sorted(sent)
    with pk.node.db.transaction() as session:
        stored = session.scalars(select(InboxEntry.bundle_id)).all()
    assert sorted(stored) == sorted(sent)  # each exactly once
