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
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from gateway.core.roles import Actor, Role
from gateway.errors import InvalidInput
from gateway.node import ledger
from gateway.node.crash import CRASH_ENV
from gateway.node.ledger import read as ledger_read
from gateway.node.ledger import verify as ledger_verify
from gateway.node.ledger.group import Change, GroupCommitAppender
from gateway.store.db import Database
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


@pytest.mark.parametrize(
    "point",
    ["ledger-group-before-commit", "ledger-group-after-commit", "ledger-group-after-ack"],
)
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
    if point == "ledger-group-before-commit":
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
