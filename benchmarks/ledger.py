"""Ledger benchmarks, each beside its baseline in the same run, reported as ratios.

Claims measured here (SQLite, the durable settings a node runs with):

* ``verify``: ``gateway ledger verify`` over N entries (default 10^6) costs a
  small constant factor over the floor, a bare hash-chain walk over the same
  rows with the plain ``sqlite3`` module (read bytes, hash, compare links; no
  parsing, no column checks, no Merkle tree, no checkpoints).
* ``checkpoint``: signing a checkpoint after one new entry costs about the
  same at 10^3 entries as at N: it is incremental, never a re-walk.
* ``appends``: durable appends from concurrent writers (``--writers``, 32)
  through the group commit, beside one append per transaction and beside
  the floor: the bare driver writing the same rows into the same table and
  indexes, as many per durable commit as there are writers (no lock, no head,
  no hashing). On SQLite and PostgreSQL (``--engine``); the ledger is
  verified after the rounds.

Product and baseline are interleaved in one run, several repetitions; the
medians and their ratios are printed.

Run: ``.venv/bin/python benchmarks/ledger.py [--quick] [--entries N] [--db PATH]
[--only SECTION] [--engine sqlite|postgresql|both] [--writers N]``
(``--quick``: 10^3 entries and fewer repetitions, a smoke run; ``--only
appends`` builds no big ledger).

Sections are functions registered in ``SECTIONS``; each takes the shared
:class:`Context` and adds result rows. Other claims about the ledger (e.g.
consent-check latency) add a section function and register it.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import resource
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nacl.signing
from sqlalchemy import text

from gateway.core import merkle
from gateway.core.domain import Purpose, tagged
from gateway.core.ledger import GENESIS_PREV_HASH
from gateway.core.roles import Actor, Role
from gateway.node import ledger
from gateway.node.ledger import checkpoint as ledger_checkpoint
from gateway.node.ledger import verify as ledger_verify
from gateway.node.ledger.group import GroupCommitAppender
from gateway.store.db import Database, open_database
from gateway.store.models import NodeRecord

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.conftest: PostgreSQL

T0 = datetime(2026, 11, 25, tzinfo=UTC)
OFFICER = Actor("aiko", Role.OFFICER)
KINDS = ("bundle-received", "bundle-read", "consent-requested", "disclosure-blocked")
_ENTRY_PREFIX = Purpose.LEDGER_ENTRY + b"\x00"


class Signer:
    """A fixed Ed25519 key standing in for the node keyring (same sign/key-id contract)."""

    signing_key_id = "bench-key"

    def __init__(self) -> None:
        self.key = nacl.signing.SigningKey(b"b" * 32)

    def sign(self, purpose: bytes, payload: bytes) -> bytes:
        return bytes(self.key.sign(tagged(purpose, payload)).signature)


@dataclass
class Context:
    """What every section shares: the populated database, its size, the run's settings."""

    db: Database
    path: Path
    entries: int
    repeats: int
    scratch: Path
    quick: bool
    engines: tuple[str, ...] = ("sqlite",)
    """Engines the appends section runs on (the others use the SQLite ledger above)."""
    writers: int = 32
    """Concurrent writers of the appends section."""
    results: list[tuple[str, str]] = field(default_factory=list)


def _entry_canonical(seq: int, prev: bytes) -> tuple[bytes, str]:
    moment = T0 + timedelta(milliseconds=seq)
    time_text = moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    fields = {
        "v": 1,
        "seq": seq,
        "time": time_text,
        "kind": KINDS[seq % len(KINDS)],
        "actor": {"name": OFFICER.name, "role": "officer"},
        "bundle_id": f"jp-2026-{seq // 4:08d}",
        "consent_id": None,
        "body": {"envelope_sha256": hashlib.sha256(seq.to_bytes(8, "big")).hexdigest()},
        "prev_hash": prev.hex(),
    }
    # ASCII strings and small integers only: sorted compact JSON is the RFC 8785 form.
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return canonical, moment.strftime("%Y-%m-%d %H:%M:%S.%f")


def build_ledger(path: Path, entries: int, *, batch: int = 50_000) -> Database:
    """A node database on SQLite holding ``entries`` realistic entries.

    The bulk path: the schema comes from the migrations, the rows go in with
    ``executemany`` through the plain ``sqlite3`` module (entries built with
    the C JSON encoder), and the head state is written once at the end, as
    the appends would have left it. ``ledger verify`` checks all of it.
    """
    db = open_database(f"sqlite:///{path}")
    db.upgrade()
    with db.transaction() as session:
        session.add(NodeRecord(node_id="jp", created_at=T0, software_version="bench"))
    connection = sqlite3.connect(path)
    compact = merkle.CompactRange()
    prev = GENESIS_PREV_HASH
    seq = 0
    try:
        while seq < entries:
            rows = []
            for _ in range(min(batch, entries - seq)):
                canonical, stored_time = _entry_canonical(seq, prev)
                digest = hashlib.sha256(_ENTRY_PREFIX + canonical).digest()
                rows.append(
                    (
                        seq,
                        stored_time,
                        KINDS[seq % len(KINDS)],
                        OFFICER.name,
                        "officer",
                        f"jp-2026-{seq // 4:08d}",
                        None,
                        prev,
                        digest,
                        canonical,
                    )
                )
                compact.append_leaf_hash(merkle.leaf_hash(digest))
                prev = digest
                seq += 1
            with connection:
                connection.executemany(
                    "INSERT INTO ledger_entry (seq, time, kind, actor_name, actor_role, "
                    "bundle_id, consent_id, prev_hash, entry_hash, canonical) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
            print(f"  built {seq:,}/{entries:,} entries", file=sys.stderr, end="\r")
        with connection:
            connection.execute(
                "UPDATE ledger_state SET size = ?, head_hash = ?, compact = ? WHERE id = 1",
                (compact.size, prev, compact.to_bytes()),
            )
    finally:
        connection.close()
    print(file=sys.stderr)
    return db


def bare_chain_walk(path: Path) -> int:
    """The floor: read each row's bytes, hash them, check the link. Nothing else."""
    connection = sqlite3.connect(path)
    try:
        cursor = connection.execute(
            "SELECT canonical, entry_hash, prev_hash FROM ledger_entry ORDER BY seq"
        )
        prev = GENESIS_PREV_HASH
        count = 0
        for canonical, entry_hash, prev_hash in cursor:
            digest = hashlib.sha256(_ENTRY_PREFIX + canonical).digest()
            if not (hmac.compare_digest(digest, entry_hash) and prev_hash == prev):
                raise SystemExit(f"floor walk found a broken chain at {count}")
            prev = digest
            count += 1
        return count
    finally:
        connection.close()


def _timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def _interleaved(
    repeats: int, product: Callable[[], object], baseline: Callable[[], object]
) -> tuple[float, float]:
    """Median seconds of each, run alternately ``repeats`` times."""
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(repeats):
        theirs.append(_timed(baseline))
        ours.append(_timed(product))
    return statistics.median(ours), statistics.median(theirs)


def _cpu_seconds() -> float:
    """CPU time of this process and of its children waited for (the walk's workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def section_verify(ctx: Context) -> None:
    """``ledger verify`` (the service the command calls) against the bare chain walk.

    Twice: as the command runs it (across worker processes on a large ledger)
    and in one process (the serial walk).
    """

    def run_verify(parallel: ledger_verify.Parallelism) -> None:
        with ctx.db.transaction() as session:
            report = ledger_verify.verify_ledger(session, parallel=parallel)
        if not report.ok or report.entries < ctx.entries:
            raise SystemExit(f"verify failed on the benchmark ledger: {report.problem}")

    if bare_chain_walk(ctx.path) < ctx.entries:
        raise SystemExit("the floor walk did not see every entry")
    # Interleaved, each on two clocks: the wall clock, and the CPU time of this
    # process and its worker processes, which waiting for a core on a shared
    # machine does not inflate.
    serial = ledger_verify.Parallelism(workers=1)
    # The command's processes, whatever the load (the command itself walks
    # serially while the load average leaves no core free).
    workers = ledger_verify.PARALLEL.workers
    parallel = ledger_verify.Parallelism(workers=workers)
    sides: tuple[tuple[str, Callable[[], object]], ...] = (
        ("floor", lambda: bare_chain_walk(ctx.path)),
        ("verify", lambda: run_verify(parallel)),
        ("serial", lambda: run_verify(serial)),
    )
    walls: dict[str, list[float]] = {side: [] for side, _ in sides}
    cpus: dict[str, list[float]] = {side: [] for side, _ in sides}
    for _ in range(ctx.repeats):
        for side, action in sides:
            wall_start, cpu_start = time.perf_counter(), _cpu_seconds()
            action()
            cpus[side].append(_cpu_seconds() - cpu_start)
            walls[side].append(time.perf_counter() - wall_start)
    wall = {side: statistics.median(times) for side, times in walls.items()}
    cpu = {side: statistics.median(times) for side, times in cpus.items()}
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n = ctx.entries
    ctx.results += [
        ("bare hash-chain walk (floor), wall", f"{wall['floor']:8.2f} s  {n / wall['floor']:>10,.0f} entries/s"),
        (f"ledger verify ({workers} processes), wall", f"{wall['verify']:8.2f} s  {n / wall['verify']:>10,.0f} entries/s"),
        ("ledger verify (one process), wall", f"{wall['serial']:8.2f} s  {n / wall['serial']:>10,.0f} entries/s"),
        ("ratio verify / floor, wall", f"{wall['verify'] / wall['floor']:8.2f} x"),
        ("ratio one-process verify / floor, wall", f"{wall['serial'] / wall['floor']:8.2f} x"),
        ("bare hash-chain walk (floor), CPU", f"{cpu['floor']:8.2f} s"),
        (f"ledger verify ({workers} processes), CPU", f"{cpu['verify']:8.2f} s"),
        ("ledger verify (one process), CPU", f"{cpu['serial']:8.2f} s"),
        ("ratio verify / floor, CPU", f"{cpu['verify'] / cpu['floor']:8.2f} x"),
        ("ratio one-process verify / floor, CPU", f"{cpu['serial'] / cpu['floor']:8.2f} x"),
        # Linux reports KiB. Building the ledger peaks first; streaming verify stays below it.
        ("peak RSS of the whole run", f"{peak_rss / 1024:8.1f} MiB"),
    ]  # fmt: skip


def _one_more_then_checkpoint(db: Database, signer: Signer, step: list[int]) -> Callable[[], None]:
    def act() -> None:
        step[0] += 1
        now = T0 + timedelta(days=30, seconds=step[0])
        with db.transaction() as session:
            ledger.record_event(session, kind="bundle-read", actor=OFFICER, now=now)
        start = time.perf_counter()
        with db.transaction() as session:
            signed = ledger_checkpoint.make_checkpoint(session, signer, now)
        step.append(int((time.perf_counter() - start) * 1e9))
        if signed.checkpoint.size < 2:
            raise SystemExit("the checkpoint did not cover the ledger")

    return act


def section_checkpoint(ctx: Context) -> None:
    """A checkpoint after one new entry, at 10^3 entries and at the full size."""
    signer = Signer()
    small_path = ctx.scratch / "ledger-small.sqlite3"
    small_path.unlink(missing_ok=True)
    small = build_ledger(small_path, 1_000)
    try:
        for db in (small, ctx.db):  # the first checkpoint of each: a full walk, not timed
            with db.transaction() as session:
                ledger_checkpoint.make_checkpoint(session, signer, T0 + timedelta(days=29))
        big_steps: list[int] = [0]
        small_steps: list[int] = [0]
        repeats = max(ctx.repeats * 3, 5)
        _interleaved(
            repeats,
            _one_more_then_checkpoint(ctx.db, signer, big_steps),
            _one_more_then_checkpoint(small, signer, small_steps),
        )
        big = statistics.median(big_steps[1:]) / 1e9
        little = statistics.median(small_steps[1:]) / 1e9
    finally:
        small.dispose()
    ctx.results += [
        ("checkpoint after 1 new entry, 10^3", f"{little * 1e3:8.2f} ms"),
        (f"checkpoint after 1 new entry, {ctx.entries:,}", f"{big * 1e3:8.2f} ms"),
        ("ratio big / small", f"{big / little:8.2f} x"),
    ]


def _fresh_node_database(engine: str, scratch: Path, name: str) -> tuple[Database, str]:
    """An empty node database on ``engine`` (a file in ``scratch``, or a new PostgreSQL one)."""
    if engine == "sqlite":
        path = scratch / f"{name}.sqlite3"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        url = f"sqlite:///{path}"
    else:
        from tests.conftest import create_pg_database  # noqa: PLC0415

        url = create_pg_database()
    db = open_database(url)
    db.upgrade()
    with db.transaction() as session:
        session.add(NodeRecord(node_id="jp", created_at=T0, software_version="bench"))
    return db, url


FloorRow = tuple[int, datetime, str, str, str, str | None, str | None, bytes, bytes, bytes]


def _floor_rows(count: int) -> list[FloorRow]:
    """Ready-made ledger rows (hashed beforehand): what the floor writes."""
    rows: list[FloorRow] = []
    prev = GENESIS_PREV_HASH
    for seq in range(count):
        canonical, _stored_time = _entry_canonical(seq, prev)
        digest = hashlib.sha256(_ENTRY_PREFIX + canonical).digest()
        moment = T0 + timedelta(milliseconds=seq)
        rows.append((seq, moment, "bundle-read", OFFICER.name, "officer", None, None, prev, digest,
                     canonical))  # fmt: skip
        prev = digest
    return rows


_FLOOR_INSERT = (
    "INSERT INTO ledger_entry (seq, time, kind, actor_name, actor_role, bundle_id, consent_id, "
    "prev_hash, entry_hash, canonical) VALUES ({marks})"
)


def _bare_group_commits(engine: str, url: str, rows: list[FloorRow], group: int) -> None:
    """The floor: the same rows into the same table and indexes, ``group`` per durable commit.

    The bare driver, nothing else: no lock, no head read, no hashing, no
    Merkle state; SQLite with WAL and ``synchronous=FULL`` as a node runs,
    PostgreSQL with its default (synchronous) commit.
    """
    if engine == "sqlite":
        connection = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            insert = _FLOOR_INSERT.format(marks=", ".join("?" * 10))
            for start in range(0, len(rows), group):
                connection.execute("BEGIN IMMEDIATE")
                chunk = rows[start : start + group]
                connection.executemany(
                    insert, [(r[0], f"{r[1]:%Y-%m-%d %H:%M:%S.%f}", *r[2:]) for r in chunk]
                )
                connection.execute("COMMIT")
        finally:
            connection.close()
        return
    import psycopg  # noqa: PLC0415

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as connection:
        insert = _FLOOR_INSERT.format(marks=", ".join(["%s"] * 10))
        for start in range(0, len(rows), group):
            with connection.cursor() as cursor:
                cursor.executemany(insert, rows[start : start + group])
            connection.commit()


def _floor_database(engine: str, scratch: Path) -> str:
    """A node database for the floor, whose rows may be deleted between rounds."""
    db, url = _fresh_node_database(engine, scratch, "ledger-appends-floor")
    trigger = "ledger_entry_no_delete" if engine == "sqlite" else "ledger_entry_append_only"
    on_table = "" if engine == "sqlite" else " ON ledger_entry"
    with db.transaction() as session:
        session.execute(text(f"DROP TRIGGER {trigger}{on_table}"))
    db.dispose()
    return url


def _empty_floor(url: str) -> None:
    db = open_database(url)
    try:
        with db.transaction() as session:
            session.execute(text("DELETE FROM ledger_entry"))
    finally:
        db.dispose()


def _appends_on(ctx: Context, engine: str) -> None:
    """Group commit, one append per transaction and the bare floor, interleaved, on ``engine``."""
    db, url = _fresh_node_database(engine, ctx.scratch, "ledger-appends")
    floor_url = _floor_database(engine, ctx.scratch)
    writers = ctx.writers
    per_writer = 10 if ctx.quick else 100
    singles = 50 if ctx.quick else 300
    floor_rows = _floor_rows(writers * per_writer)
    groups: list[float] = []

    def one_per_transaction() -> None:
        for index in range(singles):
            with db.transaction() as session:
                ledger.record_event(
                    session, kind="bundle-read", actor=OFFICER, now=T0, body={"i": index}
                )

    def group_commit() -> None:
        with GroupCommitAppender(db) as appender:

            def writer(number: int) -> None:
                for index in range(per_writer):
                    appender.append(
                        ledger.Event("bundle-read", OFFICER, T0, body={"w": number, "i": index})
                    )

            threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            groups.append(writers * per_writer / appender.groups)

    floor_times: list[float] = []
    single_times: list[float] = []
    group_times: list[float] = []
    try:
        for _ in range(ctx.repeats):
            floor_times.append(
                _timed(lambda: _bare_group_commits(engine, floor_url, floor_rows, writers))
            )
            _empty_floor(floor_url)
            single_times.append(_timed(one_per_transaction))
            group_times.append(_timed(group_commit))
        with db.transaction() as session:
            report = ledger_verify.verify_ledger(session)
        if not report.ok:
            raise SystemExit(f"appends left a broken ledger on {engine}: {report.problem}")
    finally:
        db.dispose()
        if engine == "postgresql":
            from tests.conftest import drop_pg_database  # noqa: PLC0415

            drop_pg_database(url)
            drop_pg_database(floor_url)
    total = writers * per_writer
    group_rate = total / statistics.median(group_times)
    single_rate = singles / statistics.median(single_times)
    floor_rate = total / statistics.median(floor_times)
    label = "SQLite" if engine == "sqlite" else "PostgreSQL"
    ctx.results += [
        (f"{label}: bare driver, {writers} rows a commit", f"{floor_rate:>10,.0f} /s  (floor)"),
        (f"{label}: one append per transaction", f"{single_rate:>10,.0f} /s"),
        (
            f"{label}: group commit, {writers} writers",
            f"{group_rate:>10,.0f} /s  ({statistics.median(groups):.1f} entries a commit)",
        ),
        (f"{label}: ratio group / single", f"{group_rate / single_rate:8.2f} x"),
        (f"{label}: ratio group / floor", f"{group_rate / floor_rate:8.2f} x"),
    ]


def section_appends(ctx: Context) -> None:
    """Durable appends: group commit from concurrent writers, one per transaction, the floor.

    On each engine of ``--engine``; every round checks the ledger afterwards.
    """
    for engine in ctx.engines:
        if engine == "postgresql":
            from tests.conftest import _pg_unavailable_reason  # noqa: PLC0415

            reason = _pg_unavailable_reason()
            if reason is not None:
                print(f"  skipping PostgreSQL: {reason}", file=sys.stderr)
                continue
        print(f"  appends on {engine} ...", file=sys.stderr)
        _appends_on(ctx, engine)


def section_consent(ctx: Context) -> None:
    """Consent-check latency beside a bare indexed lookup (``benchmarks/consent.py``)."""
    from consent import section_consent_check  # noqa: PLC0415 - the script beside this one

    section_consent_check(ctx, repeats=ctx.repeats)


SECTIONS: dict[str, Callable[[Context], None]] = {
    "verify": section_verify,
    "checkpoint": section_checkpoint,
    "appends": section_appends,
    "consent": section_consent,
}
"""Benchmark sections, run in order on the same database. Add new ones here."""


def _load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, help="Ledger size (default 10^6; 10^3 --quick).")
    parser.add_argument("--quick", action="store_true", help="Small and few: a smoke run.")
    parser.add_argument("--repeats", type=int, help="Repetitions of each measurement.")
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append", help="Sections.")
    parser.add_argument("--db", type=Path, help="Reuse (or create) this SQLite file.")
    parser.add_argument(
        "--engine",
        choices=("sqlite", "postgresql", "both"),
        default="both",
        help="Engines of the appends section (PostgreSQL: the test server, see tests/conftest.py).",
    )
    parser.add_argument("--writers", type=int, default=32, help="Concurrent appending threads.")
    args = parser.parse_args(argv)
    chosen = args.only or list(SECTIONS)
    # The appends section makes its own databases: no big ledger for it alone.
    entries = (
        0 if set(chosen) <= {"appends"} else args.entries or (1_000 if args.quick else 1_000_000)
    )
    repeats = args.repeats or (2 if args.quick else 3)
    engines = ("sqlite", "postgresql") if args.engine == "both" else (args.engine,)
    with tempfile.TemporaryDirectory() as scratch:
        path = args.db or Path(scratch) / "ledger-bench.sqlite3"
        if path.exists():
            db = open_database(f"sqlite:///{path}")
            applied = db.upgrade()  # a file built by an older tree: this tree's schema
            if applied:
                print(f"migrated {path}: {', '.join(applied)}", file=sys.stderr)
            with db.transaction() as session:
                existing = ledger.ledger_size(session)
            if existing < entries:
                raise SystemExit(f"{path} holds {existing} entries, fewer than {entries}")
        else:
            print(f"building a ledger of {entries:,} entries ...", file=sys.stderr)
            db = build_ledger(path, entries)
        ctx = Context(db, path, entries, repeats, Path(scratch), args.quick, engines, args.writers)
        try:
            for name, section in SECTIONS.items():
                if name in chosen:
                    print(f"running {name} ...", file=sys.stderr)
                    section(ctx)
        finally:
            db.dispose()
    width = max(len(name) for name, _ in ctx.results)
    what = f"{entries:,} entries on SQLite" if entries else "appends"
    print(f"ledger benchmarks, {what}, medians of {repeats} runs")
    print(f"  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, load average {_load_average()}")
    for name, value in ctx.results:
        print(f"  {name:<{width}}  {value}")


if __name__ == "__main__":
    main()
