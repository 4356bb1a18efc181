"""Receive cost per bundle as the inbox grows, in one interleaved run.

Three receivers, each a ``pk`` node paired with its own ``jp`` sender, all
opened in this process on the chosen engine: one whose inbox already holds
``--small`` bundles (10^3), one holding ``--large`` (10^5), and the same large
inbox with the indexes of migration 0011_hot_indexes dropped (the schema
before them). Stored rows are bulk inserted (one multi-row insert per 5,000).
Each round hands one freshly sealed envelope to every receiver in turn
(``receive_envelope``: replay check, verification, ledger entry, sequence
gaps, signed receipt, one transaction), timing only the receive.

Prints the median per-bundle receive time of each receiver over ``--rounds``
and the ratios to the small inbox. Run:
``.venv/bin/python benchmarks/receive.py [--small 1000] [--large 100000] [--rounds 60]
[--engine sqlite|postgresql]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import insert, text

from gateway.node.context import NodeContext
from gateway.node.inbox import receive_envelope
from gateway.node.outbox import send_case
from gateway.node.runtime import utc_now
from gateway.store.models_exchange import InboxEntry
from tests.conftest import create_pg_database, drop_pg_database
from tests.exchange_pair import Pair, Side, open_pair

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
HOT_INDEXES = ("ix_inbox_envelope_sha256", "ix_inbox_bundle_id", "ix_inbox_case_type_received")
INSERT_BATCH = 5000


def case_of_about_4k() -> dict[str, Any]:
    case = dict(json.loads((EXAMPLES / "exam-fraud.json").read_text()))
    case["description"] = ("Observed at the test centre; statements on file. " * 80)[:4000]
    return case


def fill_inbox(side: Side, count: int) -> None:
    """``count`` stored bundles from ``jp``, bulk inserted, on a channel of their own
    numbering (sequences far above what the benchmark sends)."""
    now = utc_now()
    base = 10**9
    with side.node.db.transaction() as session:
        for start in range(0, count, INSERT_BATCH):
            rows = [
                {
                    "sender": "jp",
                    "bundle_id": str(uuid.uuid4()),
                    "channel": "jp-pk",
                    "sequence": base + number,
                    "case_type": ("exam-fraud", "consultation", "broker-misconduct")[number % 3],
                    "marking": "confidential",
                    "reply_to": None,
                    "signing_key_id": "0" * 16,
                    "created_at": now,
                    "received_at": now,
                    "envelope_sha256": os.urandom(32).hex(),
                    "envelope_size": 6000,
                    "receipt": b"r" * 300,
                }
                for number in range(start, min(count, start + INSERT_BATCH))
            ]
            session.execute(insert(InboxEntry), rows)
        if side.node.db.is_sqlite:
            session.execute(text("ANALYZE"))
    if not side.node.db.is_sqlite:
        with side.node.db.engine.connect() as connection:
            connection.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(
                "ANALYZE inbox"
            )


def drop_hot_indexes(side: Side) -> None:
    with side.node.db.transaction() as session:
        for name in HOT_INDEXES:
            session.execute(text(f"DROP INDEX {name}"))


def envelope_for(pair: Pair, case: dict[str, Any]) -> Path:
    sent = send_case(
        NodeContext(pair.jp.node, pair.jp.keyring),
        pair.jp.officer,
        "exam-fraud",
        case,
        [],
        public=False,
        reply_to=None,
        now=utc_now(),
    )
    return pair.jp.envelope_of(sent.bundle_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--engine", choices=("sqlite", "postgresql"), default="sqlite")
    args = parser.parse_args()
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("GATEWAY_") or key == "GATEWAY_TEST_PG_URL"
    }
    labels = (
        f"{args.small:>7} stored",
        f"{args.large:>7} stored",
        f"{args.large:>7} stored, no 0011",
    )
    made: list[str] = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        contexts = []
        pairs: list[Pair] = []
        for index in range(3):
            place = root / f"pair{index}"
            place.mkdir()
            if args.engine == "sqlite":
                urls = {node: f"sqlite:///{place / node}.sqlite3" for node in ("jp", "pk")}
            else:
                urls = {node: create_pg_database() for node in ("jp", "pk")}
                made += urls.values()
            context = open_pair(place, urls, environ)
            contexts.append(context)
            pairs.append(context.__enter__())
        try:
            started = time.perf_counter()
            fill_inbox(pairs[0].pk, args.small)
            fill_inbox(pairs[1].pk, args.large)
            fill_inbox(pairs[2].pk, args.large)
            drop_hot_indexes(pairs[2].pk)
            print(f"filled the inboxes in {time.perf_counter() - started:.1f} s ({args.engine})")
            case = case_of_about_4k()
            times: list[list[float]] = [[], [], []]
            for _ in range(args.rounds):
                for index, pair in enumerate(pairs):
                    path = envelope_for(pair, case)
                    begin = time.perf_counter()
                    receive_envelope(
                        NodeContext(pair.pk.node, pair.pk.keyring), path, now=utc_now()
                    )
                    times[index].append(time.perf_counter() - begin)
        finally:
            for context in contexts:
                context.__exit__(None, None, None)
            for url in made:
                drop_pg_database(url)
    medians = [statistics.median(series) for series in times]
    print(f"per-bundle receive, median of {args.rounds} interleaved rounds:")
    for label, median in zip(labels, medians, strict=True):
        print(f"  {label:<28} {median * 1000:8.2f} ms   ratio {median / medians[0]:5.2f}x")


if __name__ == "__main__":
    main()
