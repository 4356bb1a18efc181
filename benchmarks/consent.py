"""Consent-check latency beside a bare indexed lookup, in the same run, as ratios.

Claim measured here: deciding a disclosure (the check ``gateway disclose``
runs: in a read transaction, the consent generation, then every received
consent naming the items with its revocation and uses, from the rows the
database keeps for the check (``consent_check``), each grant's terms read
from its compact record (bound to the signed document by its digest), then
the rule) costs a small
constant factor over the floor, a bare indexed lookup of the consent ids
naming one bundle with the plain driver (``sqlite3``, ``psycopg``).

Run alone: ``.venv/bin/python benchmarks/consent.py [--consents N] [--checks N]
[--engine sqlite|postgresql]`` (PostgreSQL: with ``PYTHONPATH=.``, on a fresh
database of the test server).
It is also a section of ``benchmarks/ledger.py`` (:func:`section_consent_check`),
run on that benchmark's database.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import nacl.signing
from sqlalchemy import func, insert, select, text

from gateway.core.consent import (
    ConsentGrant,
    DisclosureItem,
    decide_disclosure,
    sign_grant,
    terms_record,
)
from gateway.node.consent.queries import check_consent_states
from gateway.store.db import Database, open_database
from gateway.store.models import NodeRecord
from gateway.store.models_consent import (
    CONSENT_GENERATION_ID,
    ConsentGenerationRow,
    ConsentGrantItem,
    ConsentGrantRecord,
    ConsentRevocationRecord,
    ConsentUse,
    DisclosureRecord,
)

MOVE_GENERATION = (
    f"UPDATE {ConsentGenerationRow.__tablename__} SET generation = generation + 1"
    f" WHERE id = {CONSENT_GENERATION_ID}"
)
"""What a grant, revocation, use or suspect mark does to the consent generation."""
T0 = datetime(2026, 11, 25, tzinfo=UTC)
NOW = T0 + timedelta(days=10)
RECIPIENTS = ("Embassy of Example", "Press Agency", "Labour Attache")
PURPOSES = ("visa screening", "broker investigation")
INTERNAL = ("moj-isa", "mofa", "mhlw", "npa")
ITEMS_PER_CONSENT = 3


class _Ctx(Protocol):
    db: Database
    path: Path
    results: list[tuple[str, str]]


@dataclass
class Context:
    db: Database
    path: Path
    results: list[tuple[str, str]] = field(default_factory=list)


def populate(db: Database, consents: int, *, seed: int = 7) -> list[str]:
    """``consents`` received grants from pk (signed), a tenth revoked, some uses; return bundle ids.

    Each grant row is written as ``store_grant`` writes it, with its terms record.
    """
    rng = random.Random(seed)
    key = nacl.signing.SigningKey(bytes(32))
    bundles = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(consents * 2)]
    grants, items, revocations, disclosures, uses = [], [], [], [], []
    for index in range(consents):
        chosen = tuple(sorted(rng.sample(bundles, ITEMS_PER_CONSENT)))
        consent_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        written = ConsentGrant(
            consent_id=consent_id,
            request_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            items=chosen,
            third_party=rng.choice(RECIPIENTS),
            purpose=rng.choice(PURPOSES),
            valid_from=T0,
            valid_until=T0 + timedelta(days=rng.randint(5, 60)),
            max_uses=rng.choice((None, 1, 3)),
            conditions="",
            granting_officer="bilal",
            granting_node="pk",
            key_id="k-bench",
        )
        signed = sign_grant(written, lambda message: key.sign(message).signature)
        grants.append(
            {
                "consent_id": consent_id,
                "request_id": written.request_id,
                "direction": "received",
                "granting_node": "pk",
                "key_id": "k-bench",
                "document": signed.document,
                "signature": signed.signature,
                "third_party": written.third_party,
                "purpose": written.purpose,
                "valid_from": written.valid_from,
                "valid_until": written.valid_until,
                "max_uses": written.max_uses,
                "bundle_id": str(uuid.uuid4()),
                "recorded_at": T0,
                "actor": "system",
                "terms": terms_record(written, signed.document),
            }
        )
        items += [{"consent_id": consent_id, "bundle_id": b} for b in chosen]
        if index % 10 == 0:
            revocations.append(
                {
                    "consent_id": consent_id,
                    "direction": "received",
                    "reason": "bench",
                    "revoking_officer": "bilal",
                    "revoked_at": T0,
                    "bundle_id": str(uuid.uuid4()),
                    "actor": "system",
                }
            )
        if index % 7 == 0:
            disclosure_id = str(uuid.uuid4())
            disclosures.append(
                {
                    "disclosure_id": disclosure_id,
                    "kind": "disclosure-made",
                    "allowed": True,
                    "recipient": written.third_party,
                    "purpose": written.purpose,
                    "items_json": "[]",
                    "decision_json": "{}",
                    "consent_id": consent_id,
                    "decided_at": T0,
                    "actor": "bilal (officer)",
                    "ledger_seq": None,
                    "ledger_hash": None,
                }
            )
            uses.append(
                {
                    "consent_id": consent_id,
                    "disclosure_id": disclosure_id,
                    "used_at": T0,
                    "actor": "bilal (officer)",
                }
            )
    with db.transaction() as session:
        for table, rows in (
            (ConsentGrantRecord, grants),
            (ConsentGrantItem, items),
            (ConsentRevocationRecord, revocations),
            (DisclosureRecord, disclosures),
            (ConsentUse, uses),
        ):
            for start in range(0, len(rows), 5000):
                session.execute(insert(table), rows[start : start + 5000])
    return bundles


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return p50, p99


def _floor_connection(db: Database, path: Path | None) -> tuple[Any, str]:
    """A bare driver connection to the same database and its parameter mark."""
    if db.is_sqlite:
        return sqlite3.connect(path if path is not None else str(db.engine.url.database)), "?"
    import psycopg  # noqa: PLC0415 - only for PostgreSQL runs

    url = db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    return psycopg.connect(url, autocommit=True), "%s"


def section_consent_check(
    ctx: _Ctx, *, consents: int = 20_000, checks: int = 2_000, repeats: int = 3
) -> None:
    """Consent check (generation, cache, rows, rule) against a bare indexed lookup, p50 and p99.

    Each ask runs the floor and the check back to back, each timed on two
    clocks: the wall clock (``perf_counter_ns``) and this thread's CPU time
    (``thread_time_ns``), which time spent waiting for a core does not
    inflate. On SQLite all the work runs in this thread; on PostgreSQL the
    server's share is in the wall clock only. Three passes over the
    same asks: *cold* (the first check of each ask reads its grants' rows
    and terms records; the consent generation has not moved), *warm*
    (the same asks again: the generation read and the cached states) and
    *moved* (the same asks once more after the consent generation moved, as
    any grant, revocation, use or suspect mark moves it: every ask's rows
    are read again, and each consent's checked terms are taken from the
    cache when its record and document bytes are unchanged).
    The passes run ``repeats`` times, each on a newly opened
    :class:`Database` (so with empty caches: every cold pass is cold); the
    figures are the medians of the repetitions' percentiles.
    """
    with ctx.db.transaction() as session:
        held = int(session.scalar(select(func.count()).select_from(ConsentGrantRecord)) or 0)
    if held == 0:
        print(f"adding {consents:,} received consents ...", file=sys.stderr)
        populate(ctx.db, consents)
    with ctx.db.transaction() as session:
        bundles = sorted(set(session.scalars(select(ConsentGrantItem.bundle_id))))
    rng = random.Random(11)
    asks = [rng.sample(bundles, rng.randint(1, 2)) for _ in range(checks)]
    wanted = [(rng.choice(RECIPIENTS), rng.choice(PURPOSES)) for _ in asks]
    connection, mark = _floor_connection(ctx.db, ctx.path)
    floor_sql = f"SELECT consent_id FROM consent_grant_item WHERE bundle_id = {mark}"

    def floor(ask: list[str]) -> None:
        for bundle_id in ask:
            connection.execute(floor_sql, (bundle_id,)).fetchall()

    def check(db: Database, ask: list[str], recipient: str, purpose: str) -> bool:
        states = check_consent_states(db, ask)
        return decide_disclosure(
            [DisclosureItem(b, "pk", "confidential") for b in ask],
            recipient,
            purpose,
            own_node="jp",
            internal_recipients=INTERNAL,
            consents=states,
            now=NOW,
        ).allowed

    wall = time.perf_counter_ns
    cpu = time.thread_time_ns

    def one_pass(db: Database) -> tuple[tuple[list[float], ...], list[bool]]:
        """Floor and check times (seconds) of every ask (wall floor, wall check, CPU
        floor, CPU check), and whether each check allowed its ask."""
        times: tuple[list[float], ...] = ([], [], [], [])
        allowed: list[bool] = []
        for ask, (recipient, purpose) in zip(asks, wanted, strict=True):
            # Both clocks around each call: the wall clock includes any wait for a
            # core (which a shared machine's scheduler adds to either side at
            # random); this thread's CPU time does not.
            wall_start, cpu_start = wall(), cpu()
            floor(ask)
            cpu_middle, wall_middle = cpu(), wall()
            allowed.append(check(db, ask, recipient, purpose))
            cpu_end, wall_end = cpu(), wall()
            for samples, seconds in zip(
                times,
                (
                    wall_middle - wall_start,
                    wall_end - wall_middle,
                    cpu_middle - cpu_start,
                    cpu_end - cpu_middle,
                ),
                strict=True,
            ):
                samples.append(seconds / 1e9)
        return times, allowed

    # Per pass and clock: one (floor p50, floor p99, check p50, check p99) per repetition.
    passes: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
    outcomes = {True: 0, False: 0}
    try:
        for repetition in range(repeats):
            db = open_database(ctx.db.url)
            try:
                for name in ("cold", "warm", "moved"):
                    if name == "moved":
                        with ctx.db.transaction() as session:
                            session.execute(text(MOVE_GENERATION))
                    (floor_wall, check_wall, floor_cpu, check_cpu), allowed = one_pass(db)
                    if name == "cold" and repetition == 0:
                        for answer in allowed:
                            outcomes[answer] += 1
                    for clock, floor_times, check_times in (
                        ("wall", floor_wall, check_wall),
                        ("cpu", floor_cpu, check_cpu),
                    ):
                        passes.setdefault((name, clock), []).append(
                            (*_percentiles(floor_times), *_percentiles(check_times))
                        )
            finally:
                db.dispose()
    finally:
        connection.close()
    for (name, clock), runs in passes.items():
        floor_p50, floor_p99, check_p50, check_p99 = (
            statistics.median(run[index] for run in runs) for index in range(4)
        )
        ctx.results += [
            (
                f"{name}, {clock}: bare indexed lookup p50 / p99 (floor)",
                f"{floor_p50 * 1e6:8.1f} / {floor_p99 * 1e6:8.1f} us",
            ),
            (
                f"{name}, {clock}: consent check p50 / p99",
                f"{check_p50 * 1e6:8.1f} / {check_p99 * 1e6:8.1f} us",
            ),
            (
                f"{name}, {clock}: ratio check / floor, p50 / p99",
                f"{check_p50 / floor_p50:8.1f} / {check_p99 / floor_p99:8.1f} x",
            ),
        ]
    ctx.results.append(
        ("checks allowed / refused (first cold pass)", f"{outcomes[True]} / {outcomes[False]}")
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--consents", type=int, default=20_000)
    parser.add_argument("--checks", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=3, help="cold and warm passes, each")
    parser.add_argument("--engine", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--quick", action="store_true", help="smoke run: 200 consents, 50 checks")
    args = parser.parse_args(argv)
    if args.quick:
        args.consents, args.checks = 200, 50
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "consent-bench.sqlite3"
        pg_url = None
        if args.engine == "postgresql":
            from tests.conftest import create_pg_database  # noqa: PLC0415

            pg_url = create_pg_database()
            db = open_database(pg_url)
        else:
            db = open_database(f"sqlite:///{path}")
        db.upgrade()
        with db.transaction() as session:
            session.add(NodeRecord(node_id="jp", created_at=T0, software_version="bench"))
        ctx: Any = Context(db=db, path=path)
        try:
            section_consent_check(
                ctx, consents=args.consents, checks=args.checks, repeats=args.repeats
            )
        finally:
            db.dispose()
            if pg_url is not None:
                from tests.conftest import drop_pg_database  # noqa: PLC0415

                drop_pg_database(pg_url)
    width = max(len(name) for name, _ in ctx.results)
    one, five, fifteen = os.getloadavg()
    print(f"consent benchmarks, {args.consents:,} received consents on {args.engine}")
    print(
        f"  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, load average {one:.2f} {five:.2f} "
        f"{fifteen:.2f} on {os.cpu_count()} cores"
    )
    for name, value in ctx.results:
        print(f"  {name:<{width}}  {value}")


if __name__ == "__main__":
    main()
