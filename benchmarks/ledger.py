"""Ledger benchmarks, each beside its baseline in the same run, reported as ratios.

Claim measured here: ``gateway ledger verify`` over 10^6 entries on SQLite
streams (bounded memory) and costs a small constant factor over the floor,
a bare hash-chain walk over the same rows with the plain ``sqlite3`` module
(read bytes, hash, compare links; no parsing, no column checks, no Merkle
tree, no checkpoints).

Run: ``.venv/bin/python benchmarks/ledger.py [--entries N] [--db PATH]``.

Sections are functions registered in ``SECTIONS``; each takes the shared
:class:`Context` and returns result rows. Other claims about the ledger
(e.g. consent-check latency) add a section function and register it.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import resource
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import insert

from gateway.core.domain import Purpose
from gateway.core.ledger import GENESIS_PREV_HASH, make_entry
from gateway.core.roles import Actor, Role
from gateway.node import ledger
from gateway.store.db import Database, open_database
from gateway.store.models import NodeRecord
from gateway.store.models_ledger import LedgerEntryRow

T0 = datetime(2026, 11, 25, tzinfo=UTC)
OFFICER = Actor("aiko", Role.OFFICER)
KINDS = ("bundle-received", "bundle-read", "consent-requested", "disclosure-blocked")


@dataclass
class Context:
    """What every section shares: the populated database and its size."""

    db: Database
    path: Path
    entries: int
    results: list[tuple[str, str]] = field(default_factory=list)


def build_ledger(path: Path, entries: int, *, batch: int = 20_000) -> Database:
    """A node database on SQLite holding ``entries`` realistic entries (through the schema)."""
    db = open_database(f"sqlite:///{path}")
    db.upgrade()
    with db.transaction() as session:
        session.add(NodeRecord(node_id="jp", created_at=T0, software_version="bench"))
    prev = GENESIS_PREV_HASH
    seq = 0
    while seq < entries:
        rows = []
        for _ in range(min(batch, entries - seq)):
            entry = make_entry(
                seq=seq,
                now=T0 + timedelta(milliseconds=seq),
                kind=KINDS[seq % len(KINDS)],
                actor=OFFICER,
                prev_hash=prev,
                bundle_id=f"jp-2026-{seq // 4:08d}",
                body={"envelope_sha256": hashlib.sha256(seq.to_bytes(8, "big")).hexdigest()},
            )
            rows.append(
                {
                    "seq": entry.seq,
                    "time": entry.time,
                    "kind": entry.kind.value,
                    "actor_name": entry.actor_name,
                    "actor_role": entry.actor_role,
                    "bundle_id": entry.bundle_id,
                    "consent_id": entry.consent_id,
                    "prev_hash": entry.prev_hash,
                    "entry_hash": entry.entry_hash,
                    "canonical": entry.canonical,
                }
            )
            prev = entry.entry_hash
            seq += 1
        with db.transaction() as session:
            session.execute(insert(LedgerEntryRow), rows)
        print(f"  built {seq}/{entries} entries", file=sys.stderr, end="\r")
    print(file=sys.stderr)
    return db


def bare_chain_walk(path: Path) -> int:
    """The floor: read each row's bytes, hash them, check the link. Nothing else."""
    prefix = Purpose.LEDGER_ENTRY + b"\x00"
    connection = sqlite3.connect(path)
    try:
        cursor = connection.execute(
            "SELECT canonical, entry_hash, prev_hash FROM ledger_entry ORDER BY seq"
        )
        prev = GENESIS_PREV_HASH
        count = 0
        for canonical, entry_hash, prev_hash in cursor:
            digest = hashlib.sha256(prefix + canonical).digest()
            if not (hmac.compare_digest(digest, entry_hash) and prev_hash == prev):
                raise SystemExit(f"floor walk found a broken chain at {count}")
            prev = digest
            count += 1
        return count
    finally:
        connection.close()


def _timed(action: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    value = action()
    return time.perf_counter() - start, value


def section_verify(ctx: Context) -> None:
    """``ledger verify`` (the service the command calls) against the bare chain walk."""
    floor_seconds, floor_count = _timed(lambda: bare_chain_walk(ctx.path))

    def run_verify() -> object:
        with ctx.db.transaction() as session:
            return ledger.verify_ledger(session)

    verify_seconds, report = _timed(run_verify)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert getattr(report, "ok", False), report
    assert floor_count == ctx.entries
    ratio = verify_seconds / floor_seconds
    ctx.results += [
        (
            "bare hash-chain walk (floor)",
            f"{floor_seconds:8.2f} s  {ctx.entries / floor_seconds:>10,.0f} entries/s",
        ),
        (
            "ledger verify",
            f"{verify_seconds:8.2f} s  {ctx.entries / verify_seconds:>10,.0f} entries/s",
        ),
        ("ratio verify / floor", f"{ratio:8.2f} x"),
        # Linux reports KiB. Building the ledger peaks first; streaming verify stays below it.
        ("peak RSS of the whole run", f"{peak_rss / 1024:8.1f} MiB"),
    ]


def section_consent(ctx: Context) -> None:
    """Consent-check latency beside a bare indexed lookup (``benchmarks/consent.py``)."""
    from consent import section_consent_check  # noqa: PLC0415 - the script beside this one

    section_consent_check(ctx)


SECTIONS: list[Callable[[Context], None]] = [section_verify, section_consent]
"""Benchmark sections, run in order on the same database. Add new ones here."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--db", type=Path, help="Reuse (or create) this SQLite file.")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2,000 entries")
    args = parser.parse_args(argv)
    if args.quick:
        args.entries = 2_000
    with tempfile.TemporaryDirectory() as scratch:
        path = args.db or Path(scratch) / "ledger-bench.sqlite3"
        if path.exists():
            db = open_database(f"sqlite:///{path}")
            with db.transaction() as session:
                existing = ledger.ledger_size(session)
            if existing != args.entries:
                raise SystemExit(f"{path} holds {existing} entries, not {args.entries}")
        else:
            print(f"building a ledger of {args.entries:,} entries ...", file=sys.stderr)
            db = build_ledger(path, args.entries)
        ctx = Context(db=db, path=path, entries=args.entries)
        try:
            for section in SECTIONS:
                section(ctx)
        finally:
            db.dispose()
    width = max(len(name) for name, _ in ctx.results)
    print(f"ledger benchmarks, {args.entries:,} entries on SQLite")
    for name, value in ctx.results:
        print(f"  {name:<{width}}  {value}")


if __name__ == "__main__":
    main()
