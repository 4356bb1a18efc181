"""Pull mode throughput beside push mode, interleaved in one run.

Two real nodes on loopback, bundles travelling jp -> pk both ways of delivery:

- **push**: this process is jp and delivers its outbox with ``deliver_once``
  (as ``gateway sync``) to a ``gateway serve`` process of pk, which verifies,
  stores and receipts each envelope;
- **pull**: a ``gateway serve`` process of jp holds (``peer_delivery = "hold"``)
  and this process is pk, pulling with ``pull_once`` until jp's outbox is
  empty: the same verification, storage and receipts, on the other side of
  the wire, plus the receipts post.

Each repetition queues ``--count`` bundles of about 4 KiB of case JSON at jp
and times their delivery, push and pull alternating; the medians and the
ratio pull/push are printed. Run:
``.venv/bin/python benchmarks/pull.py [--count 500] [--repeat 5] [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import func, select

from gateway import log
from gateway.core.keys import NodeKeyring
from gateway.core.roles import Actor, Role
from gateway.node.context import NodeContext
from gateway.node.outbox import deliver_once, send_case
from gateway.node.own_keys import unlock_keyring
from gateway.node.runtime import Node, utc_now
from gateway.peer.client import PeerClient
from gateway.peer.puller import pull_once
from gateway.settings import load_settings
from gateway.store.models_exchange import OutboxEntry
from tests.nodes import NodeHome, init_pair, stop, wait_ready

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
OFFICER = Actor(name="bench", role=Role.OFFICER)


def case_of_about_4k() -> dict[str, Any]:
    case = dict(json.loads((EXAMPLES / "exam-fraud.json").read_text()))
    case["description"] = ("Observed at the test centre; statements on file. " * 80)[:4000]
    return case


def opened(home: NodeHome) -> tuple[Node, NodeKeyring]:
    settings = load_settings(home.home, environ=home.env())
    node = Node.open(settings)
    with node.db.transaction() as session:
        keyring = unlock_keyring(settings, home.passphrase.encode(), session)
    return node, keyring


def queue(node: Node, keyring: NodeKeyring, count: int) -> None:
    case = case_of_about_4k()
    for _ in range(count):
        send_case(
            NodeContext(node, keyring), OFFICER, "exam-fraud", case, [],
            public=False, reply_to=None, now=utc_now(),
        )  # fmt: skip


def queued(node: Node) -> int:
    with node.db.transaction() as session:
        return int(
            session.scalar(
                select(func.count()).select_from(OutboxEntry).where(OutboxEntry.state == "queued")
            )
            or 0
        )


async def push(node: Node, keyring: NodeKeyring) -> float:
    start = time.perf_counter()
    async with PeerClient(node.settings, keyring) as client:
        report = await deliver_once(NodeContext(node, keyring), client, now_fn=utc_now)
    if report.remaining or report.refused or report.retry_later:
        raise RuntimeError(f"push incomplete: {report}")
    return time.perf_counter() - start


async def pull(puller: Node, keyring: NodeKeyring, host: Node) -> float:
    start = time.perf_counter()
    async with PeerClient(puller.settings, keyring) as client:
        while await asyncio.to_thread(queued, host):
            report = await pull_once(NodeContext(puller, keyring), client, wait=0.0)
            if report.refused:
                raise RuntimeError(f"pull refused: {report.refused}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500, help="bundles per repetition")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions of each mode")
    parser.add_argument("--quick", action="store_true", help="100 bundles, 2 repetitions")
    args = parser.parse_args()
    if args.quick:
        args.count, args.repeat = 100, 2
    log.configure(level="warning", fmt="console")

    with tempfile.TemporaryDirectory(prefix="ssw-pull-bench-") as tmp:
        homes = init_pair(Path(tmp))
        jp, jp_keys = opened(homes["jp"])
        pk, pk_keys = opened(homes["pk"])
        receiver = homes["pk"].serve()  # push: pk receives
        host = homes["jp"].serve(GATEWAY_SERVER_PEER_DELIVERY="hold")  # pull: jp holds
        times: dict[str, list[float]] = {"push": [], "pull": []}
        try:
            wait_ready(receiver)
            wait_ready(host)
            for round_ in range(args.repeat):
                order = ("push", "pull") if round_ % 2 == 0 else ("pull", "push")
                for mode in order:
                    queue(jp, jp_keys, args.count)
                    if mode == "push":
                        seconds = asyncio.run(push(jp, jp_keys))
                    else:
                        seconds = asyncio.run(pull(pk, pk_keys, jp))
                    times[mode].append(seconds)
                    print(
                        f"round {round_ + 1} {mode}: {args.count / seconds:8.1f} bundles/s",
                        file=sys.stderr,
                    )
        finally:
            stop(receiver)
            stop(host)
            jp.close()
            pk.close()
    rates = {mode: args.count / statistics.median(values) for mode, values in times.items()}
    print(f"bundles of about 4 KiB, {args.count} per run, median of {args.repeat} runs each")
    print(f"push (deliver_once -> serve)     {rates['push']:10.1f} bundles/s")
    print(f"pull (serve holds <- pull_once)  {rates['pull']:10.1f} bundles/s")
    print(f"ratio pull/push                  {rates['pull'] / rates['push']:10.3f}")


if __name__ == "__main__":
    main()
