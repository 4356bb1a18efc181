"""Receiving a batch with and without the verification process pool, interleaved.

One ``jp``/``pk`` pair on the chosen engine. Each round seals two fresh
batches per shape and hands them to ``receive_batch`` (the whole receive:
replay read, verification, store, one transaction, receipts), one with the
pool (``[server] verify_pool_workers`` processes, threshold 2 so it is always
used) and one in the serving process, in alternating order. Shapes:
``--small-counts`` (64,128,256) envelopes of a 4 KiB case (kept inline) and ``--large-count``
envelopes carrying a 1 MiB attachment (spooled files). The pool is started
before the first timed round.

Prints per shape the median batch time of both and the ratio pool / without
(below 1: the pool pays). Run: ``.venv/bin/python benchmarks/verify_pool.py
[--rounds 9] [--quick] [--engine sqlite|postgresql]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.node.context import NodeContext
from gateway.node.inbox import receive_batch
from gateway.node.outbox import send_case
from gateway.node.runtime import utc_now
from gateway.node.verify_pool import VerifyPool, default_workers
from tests.conftest import create_pg_database, drop_pg_database
from tests.exchange_pair import Pair, open_pair

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def case_of_about_4k() -> dict[str, Any]:
    case = dict(json.loads((EXAMPLES / "exam-fraud.json").read_text()))
    case["description"] = ("Observed at the test centre; statements on file. " * 80)[:4000]
    return case


def batch_of(pair: Pair, count: int, attachments: list[Path]) -> list[Path]:
    case = case_of_about_4k()
    paths = []
    for _ in range(count):
        sent = send_case(
            NodeContext(pair.jp.node, pair.jp.keyring),
            pair.jp.officer,
            "exam-fraud",
            case,
            attachments,
            public=False,
            reply_to=None,
            now=utc_now(),
        )
        paths.append(pair.jp.envelope_of(sent.bundle_id))
    return paths


def timed(pair: Pair, batch: list[Path], pool: VerifyPool | None) -> float:
    ctx = NodeContext(pair.pk.node, pair.pk.keyring)
    begin = time.perf_counter()
    outcomes = receive_batch(ctx, batch, now=utc_now(), verify_pool=pool)
    elapsed = time.perf_counter() - begin
    if any(o.error is not None for o in outcomes):
        raise SystemExit("a benchmark envelope was refused")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--small-counts", default="64,128,256")
    parser.add_argument("--large-count", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    parser.add_argument("--engine", choices=("sqlite", "postgresql"), default="sqlite")
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("GATEWAY_") or key == "GATEWAY_TEST_PG_URL"
    }
    workers = default_workers()
    pool = VerifyPool(workers=workers, min_envelopes=2)
    made: list[str] = []
    shapes = {
        **{f"{n} x 4 KiB case": (n, False) for n in map(int, args.small_counts.split(","))},
        f"{args.large_count} x 1 MiB attachment": (args.large_count, True),
    }
    times: dict[str, dict[str, list[float]]] = {s: {"pool": [], "serial": []} for s in shapes}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        big = root / "attachment.bin"
        big.write_bytes(os.urandom(1 << 20))
        if args.engine == "sqlite":
            urls = {node: f"sqlite:///{root / node}.sqlite3" for node in ("jp", "pk")}
        else:
            urls = {node: create_pg_database() for node in ("jp", "pk")}
            made += urls.values()
        try:
            with open_pair(root, urls, environ) as pair:
                timed(pair, batch_of(pair, 2, []), pool)  # start the workers
                for number in range(rounds):
                    for shape, (count, large) in shapes.items():
                        order = ["pool", "serial"] if number % 2 == 0 else ["serial", "pool"]
                        for variant in order:
                            batch = batch_of(pair, count, [big] if large else [])
                            chosen = pool if variant == "pool" else None
                            times[shape][variant].append(timed(pair, batch, chosen))
        finally:
            pool.shutdown()
            for url in made:
                drop_pg_database(url)
    load = os.getloadavg()
    print(
        f"receive_batch, median of {rounds} interleaved rounds, {args.engine}, "
        f"{workers} workers, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}:"
    )
    for shape, series in times.items():
        pooled = statistics.median(series["pool"])
        serial = statistics.median(series["serial"])
        print(
            f"  {shape:<24} without pool {serial * 1000:8.1f} ms   "
            f"with pool {pooled * 1000:8.1f} ms   ratio {pooled / serial:5.2f}x"
        )


if __name__ == "__main__":
    main()
