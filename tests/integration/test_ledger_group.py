"""Group commit and batch appends on SQLite and PostgreSQL, including hard crashes.

Appends from many threads share transactions; an acknowledged entry is
committed; an entry and the change it records commit together; a crash
between any two steps of a group loses nothing acknowledged and duplicates
nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import event, text
from sqlalchemy.orm import Session

from gateway.core.roles import Actor, Role
from gateway.errors import InvalidInput
from gateway.node import ledger
from gateway.node.crash import CRASH_ENV
from gateway.node.ledger import read as ledger_read
from gateway.node.ledger import verify as ledger_verify
from gateway.node.ledger.group import Change, GroupCommitAppender
from gateway.store.db import Database, open_database
from tests.integration.test_ledger import open_node_db

OFFICER = Actor(name="aiko", role=Role.OFFICER)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = open_node_db(database_url, "jp")
    yield database
    database.dispose()


def _event(name: str, *, kind: str = "bundle-read") -> ledger.Event:
    return ledger.Event(kind, OFFICER, datetime.now(UTC), body={"n": name})


def _names_by_seq(db: Database) -> dict[int, str]:
    with db.transaction() as session:
        return {entry.seq: entry.body["n"] for entry in ledger_read.list_entries(session)}


def _intact(db: Database) -> int:
    with db.transaction() as session:
        report = ledger_verify.verify_ledger(session)
    assert report.ok, report.problem
    return report.entries


def test_batch_append_is_one_chain_and_all_or_nothing(db: Database) -> None:
    with db.transaction() as session:
        first = ledger.append_entries(session, [_event("a"), _event("b"), _event("c")])
    assert [entry.seq for entry in first] == [0, 1, 2]
    assert first[1].prev_hash == first[0].entry_hash
    with pytest.raises(InvalidInput, match="unknown ledger entry kind"), db.transaction() as s:
        ledger.append_entries(s, [_event("d"), _event("e", kind="made-up")])
    assert _names_by_seq(db) == {0: "a", 1: "b", 2: "c"}
    assert _intact(db) == 3


def test_concurrent_appends_share_transactions_and_every_one_is_committed(db: Database) -> None:
    writers, each = 8, 25
    seen: dict[str, int] = {}
    lock = threading.Lock()
    with GroupCommitAppender(db) as appender:

        def write(number: int) -> None:
            for index in range(each):
                entry = appender.append(_event(f"{number}-{index}"), timeout=60)
                with lock:
                    seen[f"{number}-{index}"] = entry.seq

        threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        groups = appender.groups
    stored = _names_by_seq(db)
    assert sorted(stored) == list(range(writers * each))
    assert {name: seq for seq, name in stored.items()} == seen
    assert groups < writers * each, "no two appends ever shared a transaction"
    assert _intact(db) == writers * each


def _probe_table(db: Database) -> None:
    with db.transaction() as session:
        session.execute(text("CREATE TABLE probe (name VARCHAR(32) PRIMARY KEY)"))


def _probes(db: Database) -> set[str]:
    with db.transaction() as session:
        return {row[0] for row in session.execute(text("SELECT name FROM probe"))}


def test_an_entry_and_its_change_commit_together_and_a_bad_one_fails_alone(db: Database) -> None:
    _probe_table(db)

    def change(name: str) -> Change:
        def write(session: Session) -> None:
            if name == "broken":
                raise InvalidInput("the change this entry records could not be made")
            session.execute(text("INSERT INTO probe (name) VALUES (:n)"), {"n": name})

        return write

    appender = GroupCommitAppender(db)
    # Queue everything before the writer starts, so it all lands in one group.
    appender.start()
    futures = {
        name: appender.submit(_event(name, kind=kind), change=change(name))
        for name, kind in (
            ("one", "bundle-read"),
            ("broken", "bundle-read"),
            ("refused", "made-up"),
            ("two", "bundle-read"),
        )
    }
    appender.close()
    with pytest.raises(InvalidInput, match="could not be made"):
        futures["broken"].result()
    with pytest.raises(InvalidInput, match="unknown ledger entry kind"):
        futures["refused"].result()
    committed = {futures[name].result().body["n"] for name in ("one", "two")}
    assert committed == {"one", "two"}
    # Neither the failed change nor the refused entry left anything behind.
    assert _probes(db) == {"one", "two"}
    assert set(_names_by_seq(db).values()) == {"one", "two"}
    assert _intact(db) == 2
    with pytest.raises(Exception, match="closed"):
        appender.submit(_event("late"))


_CHILD = """
import os, sys, threading
from datetime import UTC, datetime
from gateway.core.roles import Actor, Role
from gateway.node import ledger
from gateway.node.ledger.group import Change, GroupCommitAppender
from gateway.store.db import open_database

db = open_database(sys.argv[1])
officer = Actor(name="aiko", role=Role.OFFICER)
lock = threading.Lock()

def ack(name, entry):
    with lock:
        print(f"ack {name} {entry.seq}", flush=True)

with GroupCommitAppender(db) as appender:
    for index in range(10):
        name = f"a{index}"
        ack(name, appender.append(ledger.Event("bundle-read", officer, datetime.now(UTC),
                                               body={"n": name})))
    os.environ[sys.argv[2]] = sys.argv[3]

    def write(number):
        for index in range(10):
            name = f"b{number}-{index}"
            ack(name, appender.append(ledger.Event("bundle-read", officer, datetime.now(UTC),
                                                   body={"n": name})))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
print("finished", flush=True)
"""


CRASH_POINTS = [
    "ledger-group-gathered",
    "ledger-append-after-head",
    "ledger-append-after-write",
    "ledger-group-before-commit",
    "ledger-group-after-commit",
    "ledger-group-after-ack",
]
"""Every step of a group, in order; a crash before the commit keeps none of the group."""
BEFORE_COMMIT = set(CRASH_POINTS[: CRASH_POINTS.index("ledger-group-before-commit") + 1])


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_crash_in_a_group_loses_nothing_acknowledged_and_duplicates_nothing(
    db: Database, database_url: str, point: str
) -> None:
    environ = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    environ["PYTHONPATH"] = str(REPO)
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, database_url, CRASH_ENV, point],
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    acknowledged = {
        name: int(seq)
        for _, name, seq in (line.split() for line in child.stdout.splitlines() if line)
    }
    assert "finished" not in child.stdout
    assert len(acknowledged) >= 10  # the first phase, before the crash point was armed
    stored = _names_by_seq(db)
    # Nothing acknowledged is lost: each acknowledged entry is there, at its sequence number.
    for name, seq in acknowledged.items():
        assert stored.get(seq) == name
    # Nothing is duplicated, and the chain has no gap.
    assert max(Counter(stored.values()).values()) == 1
    assert sorted(stored) == list(range(len(stored)))
    if point in BEFORE_COMMIT:
        assert len(stored) == len(acknowledged) == 10
    else:
        assert len(stored) > 10  # the group that committed before the crash is kept
    assert _intact(db) == len(stored)
    # The head state the appends keep is consistent: the next append follows on.
    with db.transaction() as session:
        after = ledger.record_event(
            session, kind="bundle-read", actor=OFFICER, now=datetime.now(UTC)
        )
    assert after.seq == len(stored)
    assert _intact(db) == len(stored) + 1


def test_a_savepoint_that_rolls_back_appends_does_not_leave_its_head_behind(
    db: Database,
) -> None:
    with db.transaction() as session:
        ledger.append_entries(session, [_event("first")])
        savepoint = session.begin_nested()
        ledger.append_entries(session, [_event("undone-1"), _event("undone-2")])
        savepoint.rollback()
        kept = ledger.append_entries(session, [_event("after-rollback")])
        with session.begin_nested():
            inner = ledger.append_entries(session, [_event("in-savepoint")])
        last = ledger.append_entries(session, [_event("after-release")])
    assert [entry.seq for entry in (*kept, *inner, *last)] == [1, 2, 3]
    assert [entry.prev_hash for entry in (*inner, *last)] == [
        kept[0].entry_hash,
        inner[0].entry_hash,
    ]
    assert list(_names_by_seq(db).values()) == [
        "first",
        "after-rollback",
        "in-savepoint",
        "after-release",
    ]
    assert _intact(db) == 4


def _sqlite_statements(session: Session) -> list[str]:
    """Every statement this SQLite transaction sends from now on."""
    sent: list[str] = []
    event.listen(
        session.connection(),
        "before_cursor_execute",
        lambda _c, _cur, statement, *_rest: sent.append(statement),
    )
    return sent


def _traced(session: Session, trace: Path) -> Callable[[], list[list[str]]]:
    """Trace what this PostgreSQL transaction sends (libpq's record of the wire).

    Returns a function that stops the trace and gives the messages sent, as
    the fields of each trace line; pipelined statements are included.
    """
    from psycopg.pq import Trace  # noqa: PLC0415 - PostgreSQL only

    driver = session.connection().connection.driver_connection
    handle = trace.open("w")
    driver.pgconn.trace(handle.fileno())
    driver.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS | Trace.REGRESS_MODE)

    def stop() -> list[list[str]]:
        driver.pgconn.untrace()
        handle.close()
        lines = [line.split("\t") for line in trace.read_text().splitlines()]
        return [fields for fields in lines if fields[0] == "F"]

    return stop


def test_appends_in_one_transaction_lock_and_read_the_head_once(
    db: Database, tmp_path: Path
) -> None:
    with db.transaction() as session:
        ledger.record_event(session, kind="bundle-read", actor=OFFICER, now=datetime.now(UTC))
    count = 12
    with db.transaction() as session:
        if db.is_sqlite:
            sent = _sqlite_statements(session)
        else:
            stop = _traced(session, tmp_path / "libpq.trace")
        ledger.lock_for_append(session)  # as a received batch does first
        for index in range(count):  # then one entry per received bundle
            ledger.record_event(
                session, kind="bundle-read", actor=OFFICER, now=datetime.now(UTC), body={"i": index}
            )
        if not db.is_sqlite:
            wire = stop()
    if db.is_sqlite:
        assert sum("FROM ledger_state" in statement for statement in sent) == 1
        assert sum(statement.startswith("INSERT INTO ledger_entry") for statement in sent) == count
        # The head read, then each entry's row and its head state.
        assert len(sent) == 1 + 2 * count
    else:
        # A statement is a simple Query or an Execute of the extended protocol.
        texts = [fields[3] for fields in wire if fields[2] in ("Query", "Parse")]
        statements = [fields for fields in wire if fields[2] in ("Query", "Execute")]
        assert sum("pg_advisory_xact_lock" in text for text in texts) == 1
        assert sum("FROM ledger_state" in text for text in texts) == 1
        # BEGIN, the lock, the head read, then one statement per entry (rows and head state).
        assert len(statements) == 3 + count
    assert _intact(db) == 1 + count


_WRITER = """
import sys, threading
from datetime import UTC, datetime
from gateway.core.roles import Actor, Role
from gateway.node import ledger
from gateway.node.ledger.group import GroupCommitAppender
from gateway.store.db import open_database

db = open_database(sys.argv[1])
officer = Actor(name="aiko", role=Role.OFFICER)
lock = threading.Lock()
with GroupCommitAppender(db) as appender:
    def write(number):
        for index in range(10_000):
            name = f"{sys.argv[2]}{number}-{index}"
            entry = appender.append(ledger.Event("bundle-read", officer, datetime.now(UTC),
                                                 body={"n": name}))
            with lock:
                print(f"ack {name} {entry.seq}", flush=True)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
"""


def test_kill_9_of_two_concurrent_appending_processes_loses_and_duplicates_nothing(
    db: Database, database_url: str
) -> None:
    """Two processes append through their own group commits; both die by SIGKILL mid-stream."""
    environ = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    environ["PYTHONPATH"] = str(REPO)
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, database_url, prefix],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environ,
        )
        for prefix in ("p", "q")
    ]
    acknowledged: dict[str, int] = {}
    try:
        for index, writer in enumerate(writers):
            assert writer.stdout is not None
            # Kill the first once it has acknowledged a few groups' worth, the
            # second a little later, each at whatever step it happens to be in.
            for seen, line in enumerate(writer.stdout, start=1):
                assert line.endswith("\n"), writer.stderr.read() if writer.stderr else line
                _, name, seq = line.split()
                acknowledged[name] = int(seq)
                if seen >= 150 + index * 50:
                    break
            writer.send_signal(signal.SIGKILL)
        for writer in writers:
            assert writer.stdout is not None
            assert writer.stderr is not None
            # Acknowledged before the kill, read after it (from the same buffered reader).
            for line in writer.stdout.read().splitlines(keepends=True):
                if line.endswith("\n"):
                    _, name, seq = line.split()
                    acknowledged[name] = int(seq)
            assert writer.wait(timeout=60) == -signal.SIGKILL, writer.stderr.read()
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
    stored = _names_by_seq(db)
    for name, seq in acknowledged.items():
        assert stored.get(seq) == name, f"acknowledged {name} at {seq} is not stored there"
    assert max(Counter(stored.values()).values()) == 1
    assert sorted(stored) == list(range(len(stored)))
    assert {name[0] for name in stored.values()} == {"p", "q"}  # both really wrote
    assert _intact(db) == len(stored)
    with db.transaction() as session:
        after = ledger.record_event(
            session, kind="bundle-read", actor=OFFICER, now=datetime.now(UTC)
        )
    assert after.seq == len(stored)


def test_two_appenders_on_their_own_engines_and_single_appends_keep_one_chain(
    db: Database, database_url: str
) -> None:
    """Group commits of two engines (two nodes' processes) and plain appends, all at once."""
    others = [open_database(database_url) for _ in range(2)]  # as other processes
    errors: list[BaseException] = []
    try:
        with GroupCommitAppender(others[0]) as first, GroupCommitAppender(others[1]) as second:

            def through(appender: GroupCommitAppender, prefix: str) -> None:
                try:
                    for index in range(40):
                        appender.append(_event(f"{prefix}{index}"), timeout=120)
                except BaseException as exc:
                    errors.append(exc)

            def singly() -> None:
                try:
                    for index in range(15):
                        with db.transaction() as session:
                            ledger.append_entries(session, [_event(f"s{index}")])
                except BaseException as exc:
                    errors.append(exc)

            threads = [
                *(threading.Thread(target=through, args=(first, f"a{n}-")) for n in range(3)),
                *(threading.Thread(target=through, args=(second, f"b{n}-")) for n in range(3)),
                threading.Thread(target=singly),
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        for other in others:
            other.dispose()
    assert errors == []
    stored = _names_by_seq(db)
    assert len(stored) == 6 * 40 + 15
    assert max(Counter(stored.values()).values()) == 1
    assert _intact(db) == 6 * 40 + 15
