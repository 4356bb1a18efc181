"""Attacks on the ledger by someone with the database owner's rights.

The attacker switches the append-only triggers off (as the owner can) and
changes, deletes or inserts rows directly; ``gateway ledger verify`` must exit
4 and name the entry. Each case runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import Connection, make_url

from gateway.cli.main import cli
from gateway.core.domain import Purpose, tagged_sha256
from gateway.core.ledger import parse_entry
from gateway.core.roles import Actor, Role
from gateway.node import ledger
from gateway.node.ledger import verify as ledger_verify
from gateway.node.own_keys import own_manifest
from gateway.store.db import Database, open_database
from gateway.store.models_ledger import LedgerCheckpointRow
from tests.conftest import PG_ADMIN_URL, create_pg_database, drop_pg_database
from tests.node_api import serving_home

T0 = datetime(2026, 11, 25, 21, 0, tzinfo=UTC)
ENV = {
    "GATEWAY_PASSPHRASE": "test passphrase, not a secret",
    "GATEWAY_KEYSTORE_STRENGTH": "interactive",
}
ENTRIES_BEFORE_FIRST_CHECKPOINT = 6
OFFICER = Actor("aiko", Role.OFFICER)


def run(
    home: Path, *args: str, token: str | None = None, db_url: str | None = None
) -> tuple[int, str, str]:
    env = dict(ENV)
    if token is not None:
        env["GATEWAY_TOKEN"] = token
    if db_url is not None:
        env["GATEWAY_DATABASE_URL"] = db_url
    result = CliRunner().invoke(cli, ["--home", str(home), *args], env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@dataclass
class LedgerNode:
    home: Path
    db: Database
    db_url: str | None
    compliance: str
    admin: str

    def run(self, *args: str) -> tuple[int, str, str]:
        return run(self.home, *args, token=self.compliance, db_url=self.db_url)


def _events(db: Database, start: int, count: int) -> None:
    with db.transaction() as session:
        for i in range(start, start + count):
            ledger.record_event(
                session,
                kind="bundle-read" if i % 2 else "bundle-received",
                actor=OFFICER,
                now=T0 + timedelta(seconds=i),
                bundle_id=f"bundle-{i}",
                body={"envelope_sha256": f"{i:064x}"},
            )


@dataclass
class Template:
    home: Path
    pg_url: str | None
    compliance: str
    admin: str


def _build_template(home: Path, pg_url: str | None) -> Template:
    """Entries 0-5, checkpoint 6 (entry 6), entries 7-9, checkpoint 10 (entry 10)."""
    init = ["init", "--node", "jp", "--admin", "root", "--json"]
    if pg_url is not None:
        init += ["--db", pg_url]
    code, out, err = run(home, *init)
    assert code == 0, err
    admin = json.loads(out)["admin_token"]
    env = {**ENV, **({"GATEWAY_DATABASE_URL": pg_url} if pg_url else {})}
    with serving_home(home, env):  # users add is a client of the running node
        code, out, err = run(
            home, "users", "add", "kenji", "--role", "compliance", "--json", token=admin
        )
    assert code == 0, err
    compliance = json.loads(out)["token"]
    db = open_database(pg_url or f"sqlite:///{home / 'data' / 'gateway.sqlite3'}")
    try:
        with db.transaction() as session:
            base = ledger.ledger_size(session)  # init records its key events
        assert base < ENTRIES_BEFORE_FIRST_CHECKPOINT
        _events(db, base, ENTRIES_BEFORE_FIRST_CHECKPOINT - base)
        assert run(home, "ledger", "checkpoint")[0] == 0
        _events(db, 100, 3)
        assert run(home, "ledger", "checkpoint")[0] == 0
    finally:
        db.dispose()
    return Template(home=home, pg_url=pg_url, compliance=compliance, admin=admin)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def template(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Template]:
    """One node per engine, built once; each test works on its own copy."""
    home = tmp_path_factory.mktemp("template") / "jp"
    if request.param == "sqlite":
        yield _build_template(home, None)
        return
    url = create_pg_database()
    try:
        yield _build_template(home, url)
    finally:
        drop_pg_database(url)


@pytest.fixture
def node(
    template: Template,
    tmp_path: Path,
    clean_environ: dict[str, str],
    request: pytest.FixtureRequest,
) -> Iterator[LedgerNode]:
    if template.pg_url is not None:
        request.applymarker(pytest.mark.postgres)
    home = tmp_path / "jp"
    shutil.copytree(template.home, home)
    url: str | None = None
    if template.pg_url is not None:
        url = _clone_pg(template.pg_url)
        db = open_database(url)
    else:
        db = open_database(f"sqlite:///{home / 'data' / 'gateway.sqlite3'}")
    lnode = LedgerNode(
        home=home, db=db, db_url=url, compliance=template.compliance, admin=template.admin
    )
    env = {**ENV, **({"GATEWAY_DATABASE_URL": url} if url else {})}
    try:
        # The ledger commands are clients of the running node: serve it.
        with serving_home(home, env):
            code, out, err = lnode.run("ledger", "verify", "--json")
            assert code == 0, err
            assert json.loads(out)["entries"] == 11
            yield lnode
    finally:
        db.dispose()
        if url is not None:
            drop_pg_database(url)


def _clone_pg(source: str) -> str:
    name = f"gwt_{secrets.token_hex(6)}"
    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            template_name = make_url(source).database
            connection.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template_name}"'))
    finally:
        engine.dispose()
    return make_url(source).set(database=name).render_as_string(hide_password=False)


def tamper(db: Database, action: Callable[[Connection], None]) -> None:
    """Switch the append-only triggers off, as the database owner can, then act."""
    with db.engine.begin() as connection:
        for table in ("ledger_entry", "ledger_checkpoint", "ledger_witnessed"):
            if db.dialect == "postgresql":
                connection.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER USER"))
            else:
                connection.execute(text(f"DROP TRIGGER IF EXISTS {table}_no_update"))
                connection.execute(text(f"DROP TRIGGER IF EXISTS {table}_no_delete"))
        action(connection)


def sql(statement: str, **params: object) -> Callable[[Connection], None]:
    def act(connection: Connection) -> None:
        result = connection.execute(text(statement), params)
        assert result.rowcount == 1, f"tampering touched {result.rowcount} rows"

    return act


def _row(connection: Connection, seq: int) -> dict[str, object]:
    return dict(
        connection.execute(text("SELECT * FROM ledger_entry WHERE seq = :s"), {"s": seq})
        .mappings()
        .one()
    )


def rewrite_body(seq: int, *, rehash: bool) -> Callable[[Connection], None]:
    """Change what entry ``seq`` says; with ``rehash``, also fix its own recorded hash."""

    def act(connection: Connection) -> None:
        row = _row(connection, seq)
        fields = json.loads(bytes(row["canonical"]))  # type: ignore[arg-type]
        fields["body"] = {"envelope_sha256": "0" * 64, "note": "edited"}
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
        values: dict[str, object] = {"c": canonical, "s": seq}
        statement = "UPDATE ledger_entry SET canonical = :c WHERE seq = :s"
        if rehash:
            values["h"] = tagged_sha256(Purpose.LEDGER_ENTRY, canonical)
            statement = "UPDATE ledger_entry SET canonical = :c, entry_hash = :h WHERE seq = :s"
        connection.execute(text(statement), values)

    return act


def rebuild_from(seq: int) -> Callable[[Connection], None]:
    """Rewrite entry ``seq`` and recompute every hash after it: a locally perfect chain."""

    def act(connection: Connection) -> None:
        rows = connection.execute(
            text("SELECT seq, canonical FROM ledger_entry WHERE seq >= :s ORDER BY seq"),
            {"s": seq - 1},
        ).all()
        prev = parse_entry(bytes(rows[0].canonical)).entry_hash
        for row in rows[1:]:
            fields = json.loads(bytes(row.canonical))
            if row.seq == seq:
                fields["body"] = {"envelope_sha256": "f" * 64}
            fields["prev_hash"] = prev.hex()
            canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
            prev = tagged_sha256(Purpose.LEDGER_ENTRY, canonical)
            connection.execute(
                text(
                    "UPDATE ledger_entry SET canonical = :c, entry_hash = :h, prev_hash = :p "
                    "WHERE seq = :s"
                ),
                {"c": canonical, "h": prev, "p": bytes.fromhex(fields["prev_hash"]), "s": row.seq},
            )

    return act


def insert_forged(seq: int, *, prev: bytes | None) -> Callable[[Connection], None]:
    """Insert a well-formed entry at ``seq`` following ``prev`` (default: the real last entry)."""

    def act(connection: Connection) -> None:
        last = _row(connection, 10)
        entry = ledger.make_entry(
            seq=seq,
            now=T0,
            kind="consent-granted",
            actor=Actor("mallory", Role.OFFICER),
            prev_hash=prev if prev is not None else bytes(last["entry_hash"]),  # type: ignore[arg-type]
            consent_id="forged",
        )
        connection.execute(
            text(
                "INSERT INTO ledger_entry (seq, time, kind, actor_name, actor_role, bundle_id, "
                "consent_id, prev_hash, entry_hash, canonical) VALUES (:seq, :time, :kind, "
                ":actor, :role, NULL, :consent, :prev, :hash, :canonical)"
            ),
            {
                "seq": entry.seq,
                "time": entry.time.replace(tzinfo=None)
                if connection.dialect.name == "sqlite"
                else entry.time,
                "kind": entry.kind.value,
                "actor": entry.actor_name,
                "role": entry.actor_role,
                "consent": entry.consent_id,
                "prev": entry.prev_hash,
                "hash": entry.entry_hash,
                "canonical": entry.canonical,
            },
        )

    return act


# (case id, tampering, the entry the report must name, the check, words of the message)
CASES: list[tuple[str, Callable[[Connection], None], int, str, str]] = [
    (
        "change-kind",
        sql("UPDATE ledger_entry SET kind = 'bundle-sent' WHERE seq = 3"),
        3,
        "entry-hash",
        "kind",
    ),
    (
        "change-time",
        sql("UPDATE ledger_entry SET time = :t WHERE seq = 2", t=datetime(2020, 1, 1)),
        2,
        "entry-hash",
        "time",
    ),
    (
        "change-actor",
        sql("UPDATE ledger_entry SET actor_name = 'someone' WHERE seq = 4"),
        4,
        "entry-hash",
        "actor",
    ),
    (
        "change-role",
        sql("UPDATE ledger_entry SET actor_role = 'admin' WHERE seq = 4"),
        4,
        "entry-hash",
        "role",
    ),
    (
        "change-bundle",
        sql("UPDATE ledger_entry SET bundle_id = 'other' WHERE seq = 1"),
        1,
        "entry-hash",
        "bundle_id",
    ),
    (
        "set-consent",
        sql("UPDATE ledger_entry SET consent_id = 'c-9' WHERE seq = 8"),
        8,
        "entry-hash",
        "consent_id",
    ),
    (
        "change-prev-hash",
        sql("UPDATE ledger_entry SET prev_hash = :p WHERE seq = 5", p=b"\x01" * 32),
        5,
        "entry-hash",
        "prev_hash",
    ),
    (
        "change-entry-hash",
        sql("UPDATE ledger_entry SET entry_hash = :h WHERE seq = 7", h=b"\x02" * 32),
        7,
        "entry-hash",
        "recorded hash",
    ),
    ("change-seq", sql("UPDATE ledger_entry SET seq = 1000 WHERE seq = 3"), 3, "chain", "missing"),
    ("change-body", rewrite_body(2, rehash=False), 2, "entry-hash", "recorded hash"),
    ("change-body-and-own-hash", rewrite_body(2, rehash=True), 3, "chain", "entries 2 and 3"),
    ("rebuild-chain-after-edit", rebuild_from(2), 0, "checkpoint", "rewritten"),
    ("delete-first", sql("DELETE FROM ledger_entry WHERE seq = 0"), 0, "chain", "missing"),
    ("delete-middle", sql("DELETE FROM ledger_entry WHERE seq = 5"), 5, "chain", "missing"),
    ("delete-last", sql("DELETE FROM ledger_entry WHERE seq = 10"), 10, "checkpoint", "missing"),
    ("insert-after-gap", insert_forged(14, prev=None), 11, "chain", "missing"),
    ("insert-off-chain", insert_forged(11, prev=b"\x03" * 32), 11, "chain", "does not follow"),
    (
        "delete-checkpoint",
        sql("DELETE FROM ledger_checkpoint WHERE size = 6"),
        6,
        "checkpoint",
        "not in the checkpoint table",
    ),
    (
        "change-checkpoint-root",
        sql("UPDATE ledger_checkpoint SET root = :r WHERE size = 10", r=b"\x04" * 32),
        9,
        "checkpoint",
        "differ",
    ),
    (
        "forge-checkpoint-signature",
        sql("UPDATE ledger_checkpoint SET signature = :s WHERE size = 6", s=b"\x05" * 64),
        5,
        "checkpoint",
        "signature",
    ),
]


@pytest.mark.parametrize(
    ("tampering", "seq", "check", "words"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_verify_names_the_tampered_entry(
    node: LedgerNode, tampering: Callable[[Connection], None], seq: int, check: str, words: str
) -> None:
    tamper(node.db, tampering)
    code, out, err = node.run("ledger", "verify")
    assert code == 4, out
    assert words in err
    code, out, _ = node.run("ledger", "verify", "--json")
    assert code == 4
    error = json.loads(out)["error"]
    assert error["exit_code"] == 4
    with node.db.transaction() as session:
        report = ledger_verify.verify_ledger(session, own_keys=own_manifest(session))
    assert report.problem is not None
    assert (report.problem.seq, report.problem.check) == (seq, check)


def test_untampered_ledger_verifies_and_lists(node: LedgerNode) -> None:
    code, out, err = node.run("ledger", "list", "--json")
    assert code == 0, err
    entries = json.loads(out)
    assert [e["seq"] for e in entries] == list(range(11))
    assert entries[6]["kind"] == "checkpoint-made"
    code, out, _ = node.run("ledger", "verify")
    assert code == 0
    assert "ledger intact: 11 entries" in out


def test_export_refuses_to_overwrite_and_leaves_no_partial_file(node: LedgerNode) -> None:
    target = node.home / "export.jsonl"
    code, _out, err = node.run("ledger", "export", "--format", "jsonl", "--out", str(target))
    assert code == 0, err
    first = target.read_bytes()
    assert len(first.splitlines()) == 11
    code, _out, err = node.run("ledger", "export", "--format", "csv", "--out", str(target))
    assert code == 1
    assert "never overwrite" in err
    assert target.read_bytes() == first
    assert not [p for p in node.home.iterdir() if p.name.endswith(".part")]


def test_ledger_commands_need_the_compliance_role(node: LedgerNode) -> None:
    code, _out, err = run(
        node.home, "ledger", "list", token="ssw_not-a-real-token", db_url=node.db_url
    )
    assert code == 1
    assert "ssw_not-a-real-token" not in err


def test_checkpoints_signed_before_a_key_revocation_still_verify(node: LedgerNode) -> None:
    """Revoking the signing key must not make every earlier checkpoint look forged."""
    with node.db.transaction() as session:
        old_key = own_manifest(session).current_signing_key(now=datetime.now(UTC)).key_id
    for args in (
        ["keys", "rotate"],
        ["keys", "revoke", old_key, "--reason", "laptop stolen", "--yes"],
    ):
        code, _out, err = run(node.home, *args, token=node.admin, db_url=node.db_url)
        assert code == 0, err
    code, out, err = node.run("ledger", "verify", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["intact"] is True
    assert any("revoked later" in note for note in report["notes"])
    # A checkpoint made now is signed by the new key and verifies without a note.
    assert run(node.home, "ledger", "checkpoint", db_url=node.db_url)[0] == 0


@pytest.mark.parametrize(
    ("args", "seqs"),
    [
        (["--kind", "checkpoint-made"], [6, 10]),
        (["--bundle", "bundle-101"], [8]),
        # T0 + 100 s onwards; entries 7-9 are at T0 + 100..102 s (the others are at now).
        (["--since", "2026-11-25T21:01:40Z", "--kind", "bundle-read"], [8]),
        (["--since", "2100-01-01"], []),
        (["--limit", "2"], [0, 1]),
    ],
    ids=["kind", "bundle", "since-and-kind", "since-future", "limit"],
)
def test_list_filters(node: LedgerNode, args: list[str], seqs: list[int]) -> None:
    code, out, err = node.run("ledger", "list", "--json", *args)
    assert code == 0, err
    assert [entry["seq"] for entry in json.loads(out)] == seqs


@pytest.mark.parametrize(
    ("args", "words"),
    [(["--kind", "gossip"], "kinds are"), (["--since", "last week"], "is neither a date")],
    ids=["unknown-kind", "bad-time"],
)
def test_list_refuses_bad_filters(node: LedgerNode, args: list[str], words: str) -> None:
    code, _out, err = node.run("ledger", "list", *args)
    assert code == 1
    assert words in err


# --- the parallel walk: the same findings as the serial one ------------------------

SERIAL = ledger_verify.Parallelism(workers=1)


def _tiny(chunk: int) -> ledger_verify.Parallelism:
    """Worker processes on chunks of ``chunk`` entries, whatever the ledger's size."""
    return ledger_verify.Parallelism(workers=2, chunk=chunk, minimum=0)


@pytest.fixture
def ledger_db(
    template: Template, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Database]:
    """A copy of the template node's database (no node serving it)."""
    if template.pg_url is not None:
        request.applymarker(pytest.mark.postgres)
        url = _clone_pg(template.pg_url)
    else:
        home = tmp_path / "jp"
        shutil.copytree(template.home, home)
        url = f"sqlite:///{home / 'data' / 'gateway.sqlite3'}"
    db = open_database(url)
    try:
        yield db
    finally:
        db.dispose()
        if template.pg_url is not None:
            drop_pg_database(url)


def _reports(
    db: Database, parallel: ledger_verify.Parallelism
) -> tuple[dict[str, object], list[int]]:
    passed: list[int] = []
    with db.transaction() as session:
        report = ledger_verify.verify_ledger(
            session, own_keys=own_manifest(session), progress=passed.append, parallel=parallel
        )
    return report.to_dict(), passed


def _walks(db: Database, parallel: ledger_verify.Parallelism) -> tuple[object, object]:
    """The serial walk's findings beside the parallel walk's (which must have run)."""
    with db.transaction() as session:
        sizes = frozenset(session.scalars(select(LedgerCheckpointRow.size)).all())
        made: dict[int, dict[str, object]] = {}
        serial = ledger_verify._walk(session, sizes, made, None)
        made_parallel: dict[int, dict[str, object]] = {}
        walk = ledger_verify._walk_parallel(session, sizes, made_parallel, None, parallel)
    assert walk is not None, "the parallel walk left the ledger to the serial walk"

    def shape(w: ledger_verify._Walk, m: dict[int, dict[str, object]]) -> object:
        return (w.size, w.root(), w.head_hash, w.roots, w.problem, w.tree.to_bytes(), m)

    return shape(serial, made), shape(walk, made_parallel)


@pytest.mark.parametrize(
    ("tampering", "seq", "check", "words"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_parallel_verify_reports_what_the_serial_walk_does(
    ledger_db: Database,
    tampering: Callable[[Connection], None],
    seq: int,
    check: str,
    words: str,
) -> None:
    tamper(ledger_db, tampering)
    serial, _ = _reports(ledger_db, SERIAL)
    assert serial["problem"] is not None
    for chunk in (1, 4):
        assert _reports(ledger_db, _tiny(chunk))[0] == serial, f"chunks of {chunk}"


@pytest.mark.parametrize("chunk", [1, 4, 8])
@pytest.mark.parametrize(
    "tampering",
    [
        None,
        # Entry 7 altered: a later chunk than the first (entries 4-7 with chunks of 4).
        sql("UPDATE ledger_entry SET entry_hash = :h WHERE seq = 7", h=b"\x02" * 32),
        # Entry 3 rewritten with its own hash fixed: entry 4, first of a chunk, breaks.
        rewrite_body(3, rehash=True),
        # Entry 7 likewise: entry 8 breaks, first of a chunk of 8, 4, 2 or 1.
        rewrite_body(7, rehash=True),
        # A locally perfect chain from entry 2: the roots at sizes 6 and 10, inside
        # chunks, are not the signed ones.
        rebuild_from(2),
        sql("UPDATE ledger_checkpoint SET root = :r WHERE size = 10", r=b"\x04" * 32),
    ],
    ids=["intact", "later-chunk", "link-at-4", "link-at-8", "rebuilt-roots", "checkpoint-root"],
)
def test_parallel_walk_finds_what_the_serial_walk_does(
    ledger_db: Database, tampering: Callable[[Connection], None] | None, chunk: int
) -> None:
    if tampering is not None:
        tamper(ledger_db, tampering)
    serial, parallel = _walks(ledger_db, _tiny(chunk))
    assert parallel == serial
    assert _reports(ledger_db, _tiny(chunk)) == _reports(ledger_db, SERIAL)


def test_parallel_progress_is_the_serial_stream(
    ledger_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_verify, "_PROGRESS_EVERY", 3)
    tamper(ledger_db, rewrite_body(7, rehash=True))
    serial = _reports(ledger_db, SERIAL)
    assert serial[1] == [3, 6, 8]
    assert _reports(ledger_db, _tiny(2)) == serial
