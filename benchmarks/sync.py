"""Sync throughput end to end, beside a bare aiohttp POST of the same bytes, in one run.

Two real nodes on loopback: this process is the sender (``deliver_once`` over
the signed peer client, as ``gateway sync`` runs it) and a ``gateway serve``
process is the receiver (verify every envelope, store it, ledger entry,
signed receipt, one transaction each). The *floor* is the same envelope files
posted in the same batches to a bare aiohttp server in another process that
reads each body and answers 200: no signing, no verification, no database.

Prints bundles per second for small cases (about 4 KiB of case JSON each) and
MB/s for one large attachment, each with the floor and the ratio.
Run: ``.venv/bin/python benchmarks/sync.py [--count 10000] [--mib 256] [--engine sqlite]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
from aiohttp import web

from gateway.core.roles import Actor, Role
from gateway.node.outbox import BATCH_MAX_BYTES, BATCH_MAX_ENVELOPES, deliver_once, send_case
from gateway.node.own_keys import unlock_keyring
from gateway.node.runtime import Node, utc_now
from gateway.peer.client import PeerClient
from gateway.settings import load_settings
from gateway.store.models_exchange import envelope_path
from tests.nodes import free_port, init_pair, stop, wait_ready

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
OFFICER = Actor(name="bench", role=Role.OFFICER)


def bare_server(port: int) -> None:
    """The floor's receiver: read the whole body, answer 200."""

    async def receive(request: web.Request) -> web.Response:
        size = 0
        async for chunk in request.content.iter_chunked(1 << 16):
            size += len(chunk)
        return web.json_response({"bytes": size})

    app = web.Application(client_max_size=1 << 40)
    app.router.add_post("/v1/envelopes", receive)
    print("ready", flush=True)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def case_of_about_4k() -> dict[str, Any]:
    case = dict(json.loads((EXAMPLES / "exam-fraud.json").read_text()))
    case["description"] = ("Observed at the test centre; statements on file. " * 80)[:4000]
    return case


def batches(paths: list[Path]) -> list[list[Path]]:
    out: list[list[Path]] = []
    current: list[Path] = []
    size = 0
    for path in paths:
        length = path.stat().st_size
        if current and (len(current) == BATCH_MAX_ENVELOPES or size + length > BATCH_MAX_BYTES):
            out.append(current)
            current, size = [], 0
        current.append(path)
        size += length
    if current:
        out.append(current)
    return out


async def floor_post(url: str, paths: list[Path]) -> float:
    """Post the files in the same batches as delivery, as plain concatenated bodies."""
    start = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for group in batches(paths):

            async def body(group: list[Path] = group) -> Any:
                for path in group:
                    with path.open("rb") as handle:
                        while chunk := handle.read(1 << 16):
                            yield chunk

            async with session.post(url + "/v1/envelopes", data=body()) as answer:
                await answer.read()
                if answer.status != 200:
                    raise RuntimeError(f"floor server answered {answer.status}")
    return time.perf_counter() - start


async def deliver(node: Node, keyring: Any) -> tuple[float, int]:
    start = time.perf_counter()
    async with PeerClient(node.settings, keyring) as client:
        report = await deliver_once(node, keyring, client, now_fn=utc_now)
    if report.remaining or report.refused or report.retry_later:
        raise RuntimeError(f"delivery incomplete: {report}")
    return time.perf_counter() - start, len(report.delivered)


def line(label: str, ours: float, floor: float, unit: str) -> None:
    print(
        f"{label:<34} {ours:>10.1f} {unit:<10} floor {floor:>10.1f} {unit:<10} ratio {ours / floor:6.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="small bundles (4 KiB cases)")
    parser.add_argument("--mib", type=int, default=256, help="size of the large attachment")
    parser.add_argument("--floor-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 bundles, 4 MiB")
    args = parser.parse_args()
    if args.quick:
        args.count, args.mib = 20, 4
    if args.floor_server:
        bare_server(args.floor_server)
        return

    with tempfile.TemporaryDirectory(prefix="ssw-sync-bench-") as tmp:
        root = Path(tmp)
        homes = init_pair(root)
        jp_home, pk_home = homes["jp"], homes["pk"]
        settings = load_settings(jp_home.home, environ=jp_home.env())
        node = Node.open(settings)
        with node.db.transaction() as session:
            keyring = unlock_keyring(settings, jp_home.passphrase.encode(), session)
        floor_port = free_port()
        floor = subprocess.Popen(
            [sys.executable, __file__, "--floor-server", str(floor_port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        receiver = pk_home.serve()
        try:
            assert floor.stdout is not None
            floor.stdout.readline()
            wait_ready(receiver)
            floor_url = f"http://127.0.0.1:{floor_port}"

            print(f"queueing {args.count} bundles of about 4 KiB ...", file=sys.stderr)
            case = case_of_about_4k()
            small = [
                send_case(
                    node,
                    keyring,
                    OFFICER,
                    "exam-fraud",
                    case,
                    [],
                    public=False,
                    reply_to=None,
                    now=utc_now(),
                )
                for _ in range(args.count)
            ]
            paths = [envelope_path(settings.blob_dir, s.envelope_sha256) for s in small]
            floor_seconds = asyncio.run(floor_post(floor_url, paths))
            ours_seconds, delivered = asyncio.run(deliver(node, keyring))
            assert delivered == args.count
            line(
                "small bundles, end to end",
                args.count / ours_seconds,
                args.count / floor_seconds,
                "bundles/s",
            )

            big_file = root / "attachment.bin"
            with big_file.open("wb") as out:
                block = bytes(range(256)) * 4096
                for _ in range(args.mib):
                    out.write(block)
            print(f"sealing one {args.mib} MiB attachment ...", file=sys.stderr)
            big = send_case(
                node,
                keyring,
                OFFICER,
                "exam-fraud",
                case,
                [big_file],
                public=False,
                reply_to=None,
                now=utc_now(),
            )
            big_path = envelope_path(settings.blob_dir, big.envelope_sha256)
            megabytes = big.envelope_size / 1e6
            floor_big = asyncio.run(floor_post(floor_url, [big_path]))
            ours_big, delivered = asyncio.run(deliver(node, keyring))
            assert delivered == 1
            line(
                f"one {args.mib} MiB attachment",
                megabytes / ours_big,
                megabytes / floor_big,
                "MB/s",
            )
        finally:
            stop(receiver)
            floor.terminate()
            floor.wait(timeout=30)
            node.close()


if __name__ == "__main__":
    main()
