"""``gateway backup`` of a serving node, ``gateway restore`` into a new home and database.

Real processes on loopback: a bundle travels Tokyo -> Islamabad, Islamabad is
backed up while ``serve`` runs, and the archive is restored into a new home
(and a new database on PostgreSQL), where the ledger verifies, the keys open
and the bundle still decrypts. The archive holds no private key in the
clear; a changed byte anywhere is refused and leaves nothing behind.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nacl.pwhash
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from sqlalchemy import create_engine, text

import gateway.node.policy  # noqa: F401 - registers the "policies" init step
from gateway.core.backup import (
    MANIFEST_MEMBER,
    SALT_BYTES,
    TRAILER_BYTES,
    ArchiveFile,
    BackupDamaged,
    Trailer,
    archive_mac,
    derive_keys,
)
from gateway.core.canonical import canonical_bytes
from gateway.errors import AlreadyExists, ConfigError, InvalidInput, VerificationError
from gateway.node.backup import make_backup, restore_backup
from gateway.node.runtime import utc_now
from gateway.node.setup import init_node
from gateway.settings import load_settings
from gateway.store.db import open_database
from tests.attacks.test_ledger_tampering import sql, tamper
from tests.nodes import NodeHome, gateway_env, init_pair, run_gateway, stop, wait_ready

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "exam-fraud.json"


def _tls_key(home: Path) -> bytes:
    """A plaintext PEM private key in the home, where a deployment keeps its TLS key."""
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    folder = home / "keys" / "tls"
    folder.mkdir(mode=0o700, exist_ok=True)
    (folder / "node.key").write_bytes(pem)
    (folder / "node.key").chmod(0o600)
    return pem


def _raw_private_keys(node: NodeHome, tls_pem: bytes) -> dict[str, bytes]:
    """Every private key of the node in every form it could leak in."""
    ring = node.keyring()
    raw = {"signing": bytes(ring.signing_key)}
    raw |= {f"encryption {kid}": bytes(k) for kid, k in ring.encryption_keys.items()}
    der = serialization.load_pem_private_key(tls_pem, password=None).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    raw["tls der"] = der
    forms: dict[str, bytes] = {"tls pem body": b"".join(tls_pem.splitlines()[1:-1])}
    for name, value in raw.items():
        forms[f"{name} raw"] = value
        forms[f"{name} hex"] = value.hex().encode()
        forms[f"{name} base64"] = base64.b64encode(value).rstrip(b"=")
        forms[f"{name} urlsafe base64"] = base64.urlsafe_b64encode(value).rstrip(b"=")
    return forms


def _wait(what: str, predicate: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".restoring-" in p.name or ".part" in p.name)


@pytest.mark.slow  # several real serve processes for a minute: with the long runs
def test_a_serving_node_is_backed_up_restored_into_a_new_home_and_verifies(
    tmp_path: Path, engine_name: str, pg_database_factory: Callable[[], str]
) -> None:
    db_urls = (
        {"jp": pg_database_factory(), "pk": pg_database_factory()}
        if engine_name == "postgresql"
        else None
    )
    nodes = init_pair(tmp_path / "homes", db_urls=db_urls)
    jp, pk = nodes["jp"], nodes["pk"]
    tls_pem = _tls_key(pk.home)
    officers = {n: home.add_user(f"officer-{n}", "officer") for n, home in nodes.items()}
    processes = [home.serve(GATEWAY_SERVER_SYNC_INTERVAL_SECONDS="0.3") for home in (jp, pk)]
    try:
        for process in processes:
            wait_ready(process)
        sent = jp.run("send", "exam-fraud", str(EXAMPLE), token=officers["jp"])["bundle_id"]
        _wait(
            "the bundle in Islamabad's inbox",
            lambda: (
                sent in [b["bundle_id"] for b in pk.run("inbox", token=officers["pk"])["bundles"]]
            ),
        )
        archive = tmp_path / "pk.gwbackup"
        made = pk.run("backup", "--out", str(archive))
        assert processes[1].process.poll() is None, "serve kept running through the backup"
    finally:
        for process in processes:
            stop(process)
    assert made["node"] == "pk"
    assert made["engine"] == engine_name
    assert made["sealed"] == 1
    assert oct(archive.stat().st_mode & 0o777) == "0o600"

    data = archive.read_bytes()
    leaked = [name for name, form in _raw_private_keys(pk, tls_pem).items() if form in data]
    assert leaked == []
    assert b"ssw-gateway/keystore/v1" in data, "the key files travel in their encrypted form"

    new_home = tmp_path / "restored" / "pk"
    new_home.parent.mkdir()
    args = ["--json", "restore", str(archive)]
    if engine_name == "postgresql":
        args += ["--db", pg_database_factory()]
    done = run_gateway(new_home, *args, env=pk.env())
    assert done.returncode == 0, done.stderr
    restored = json.loads(done.stdout)
    assert restored["node"] == "pk"
    assert restored["ledger_entries"] > 0
    assert (new_home / "keys" / "tls" / "node.key").read_bytes() == tls_pem
    assert oct((new_home / "keys" / "tls" / "node.key").stat().st_mode & 0o777) == "0o600"

    again = NodeHome(
        "pk", new_home, pk.port, pk.api_port, pk.passphrase, pk.admin_token, None, pk.program
    )
    compliance = again.add_user("auditor", "compliance")
    verified = again.run("ledger", "verify", token=compliance)
    assert verified["entries"] == restored["ledger_entries"]
    shown = again.run("show", sent, token=officers["pk"])
    assert shown["case"]["fraud"] == json.loads(EXAMPLE.read_text())["fraud"]
    settings = load_settings(new_home, environ={})
    if engine_name == "postgresql":
        assert settings.database_url == args[-1]
    else:
        assert settings.database_url == f"sqlite:///{new_home / 'data' / 'gateway.sqlite3'}"
    assert _leftovers(new_home.parent) == []


PASSPHRASE = "backup test passphrase"


@dataclass
class Made:
    """A node home made in this process, and its archive."""

    home: Path
    archive: Path
    passphrase: bytes = PASSPHRASE.encode()

    def env(self, **extra: str) -> dict[str, str]:
        return gateway_env(self.home, GATEWAY_PASSPHRASE=PASSPHRASE, **extra)


def _made(folder: Path, node_id: str, db_url: str | None = None) -> Made:
    """``init_node`` and ``make_backup`` in this process (no pairing needed to back up)."""
    environ = {"GATEWAY_PASSPHRASE": PASSPHRASE, "GATEWAY_KEYSTORE_STRENGTH": "min"}
    home = folder / node_id
    init_node(home, node_id, now=utc_now(), db_url=db_url, environ=environ)
    _tls_key(home)
    archive = folder / f"{node_id}.gwbackup"
    make_backup(
        load_settings(home, environ={}),
        passphrase=PASSPHRASE.encode(),
        out=archive,
        now=utc_now(),
        environ=environ,
    )
    return Made(home, archive)


@pytest.fixture
def backed_up(tmp_path: Path) -> Made:
    """A SQLite node (not serving) with its archive, for the refusal tests."""
    return _made(tmp_path, "pk")


def _positions(archive: bytes) -> dict[str, int]:
    """Bytes to flip: every part of the format, and a spread of others."""
    end = len(archive)
    trailer = end - TRAILER_BYTES
    chosen = {
        "first byte": 0,
        "database member": 200,
        "inside the archive": end // 2,
        "central directory": trailer - 150,
        "end record": trailer - 10,
        "trailer magic": trailer + 3,
        "trailer salt": trailer + 25,
        "trailer opslimit": trailer + 60,
        "trailer memlimit": trailer + 70,
        "trailer sha256": trailer + 90,
        "trailer mac": trailer + 170,
        "last byte": end - 1,
    }
    spread = random.Random(1404)
    chosen |= {f"byte {i}": i for i in spread.sample(range(end), 40)}
    return chosen


def test_a_flipped_byte_anywhere_is_refused_and_leaves_nothing(
    backed_up: Made, tmp_path: Path
) -> None:
    pk, archive = backed_up, backed_up.archive
    original = archive.read_bytes()
    target = tmp_path / "target"
    target.mkdir()
    for name, position in _positions(original).items():
        damaged = bytearray(original)
        damaged[position] ^= 0x01
        bad = tmp_path / "damaged.gwbackup"
        bad.write_bytes(bytes(damaged))
        with pytest.raises(BackupDamaged):
            restore_backup(bad, target / "pk", passphrase=pk.passphrase, db_url=None)
        assert list(target.iterdir()) == [], name
    done = run_gateway(tmp_path / "target" / "pk", "restore", str(bad), env=pk.env())
    assert done.returncode == 4
    assert "nothing was restored" in done.stderr
    assert not (target / "pk").exists()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("wrong passphrase", "another passphrase"),
        ("truncated", "damaged"),
        ("not a backup", "not an ssw-gateway backup"),
    ],
)
def test_an_archive_that_does_not_authenticate_is_refused(
    backed_up: Made, tmp_path: Path, damage: str, message: str
) -> None:
    pk, archive = backed_up, backed_up.archive
    env = pk.env()
    if damage == "wrong passphrase":
        env["GATEWAY_PASSPHRASE"] = "another passphrase entirely"
    elif damage == "truncated":
        archive.write_bytes(
            archive.read_bytes()[: -TRAILER_BYTES - 1] + archive.read_bytes()[-TRAILER_BYTES:]
        )
    else:
        archive.write_bytes(b"PK\x03\x04" + os.urandom(4096))
    done = run_gateway(tmp_path / "new", "restore", str(archive), env=env)
    assert done.returncode == 4, done.stderr
    assert message in done.stderr
    assert not (tmp_path / "new").exists()


def test_restore_refuses_a_home_that_is_not_empty(backed_up: Made, tmp_path: Path) -> None:
    pk, archive = backed_up, backed_up.archive
    home = tmp_path / "busy"
    home.mkdir()
    (home / "something").write_text("kept")
    with pytest.raises(AlreadyExists):
        restore_backup(archive, home, passphrase=pk.passphrase, db_url=None)
    assert [p.name for p in home.iterdir()] == ["something"]


def test_a_backup_never_overwrites_and_never_lands_in_the_home(backed_up: Made) -> None:
    pk, archive = backed_up, backed_up.archive
    before = archive.read_bytes()
    again = run_gateway(pk.home, "backup", "--out", str(archive), env=pk.env())
    assert again.returncode == 1
    assert "never overwrites" in again.stderr
    assert archive.read_bytes() == before
    inside = run_gateway(pk.home, "backup", "--out", str(pk.home / "b.gwbackup"), env=pk.env())
    assert inside.returncode == 1
    assert "inside the node home" in inside.stderr


@pytest.mark.postgres
def test_postgresql_restore_refuses_a_database_that_is_not_empty(
    tmp_path: Path, pg_database_factory: Callable[[], str]
) -> None:
    jp = _made(tmp_path, "jp", pg_database_factory())
    busy = pg_database_factory()
    engine = create_engine(busy)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE kept (x int)"))
    engine.dispose()
    with pytest.raises(AlreadyExists, match="not empty"):
        restore_backup(jp.archive, tmp_path / "new", passphrase=jp.passphrase, db_url=busy)
    assert not (tmp_path / "new").exists()
    with pytest.raises(InvalidInput, match="holds a PostgreSQL database"):
        restore_backup(jp.archive, tmp_path / "new", passphrase=jp.passphrase, db_url=None)
    assert not (tmp_path / "new").exists()


@pytest.mark.postgres
def test_a_postgresql_backup_without_pg_dump_is_refused_naming_it(
    tmp_path: Path, pg_database_factory: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    environ = {"GATEWAY_PASSPHRASE": PASSPHRASE, "GATEWAY_KEYSTORE_STRENGTH": "min"}
    home = tmp_path / "jp"
    init_node(home, "jp", now=utc_now(), db_url=pg_database_factory(), environ=environ)
    no_tools = tmp_path / "bin"
    no_tools.mkdir()
    monkeypatch.setenv("PATH", str(no_tools))
    assert shutil.which("pg_dump") is None
    out = tmp_path / "jp.gwbackup"
    with pytest.raises(ConfigError, match="needs pg_dump"):
        make_backup(
            load_settings(home, environ={}),
            passphrase=PASSPHRASE.encode(),
            out=out,
            now=utc_now(),
            environ=environ,
        )
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def _forge(path: Path, members: dict[str, bytes], listed: list[str], *, deflate: str = "") -> None:
    """An archive authenticated with the right passphrase but breaking a format rule
    (what only someone holding the passphrase could make)."""
    entries = [
        ArchiveFile(name, len(data), hashlib.sha256(data).hexdigest(), 0o600, sealed=False)
        for name, data in members.items()
        if name in listed
    ]
    database = next(e for e in entries if e.path.startswith("database/"))
    manifest = {
        "format": "ssw-gateway/backup/v1",
        "node": "pk",
        "created_at": "2026-11-29T00:00:00Z",
        "software_version": "0.1.0",
        "engine": "sqlite",
        "database": database.to_dict(),
        "files": [e.to_dict() for e in entries if e is not database],
        "not_archived": [],
    }
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            method = zipfile.ZIP_DEFLATED if name == deflate else zipfile.ZIP_STORED
            archive.writestr(name, data, compress_type=method)
        archive.writestr(MANIFEST_MEMBER, canonical_bytes(manifest))
        archive.comment = b"\0" * TRAILER_BYTES
    body = path.read_bytes()[:-TRAILER_BYTES]
    salt = b"\x05" * SALT_BYTES
    ops, mem = nacl.pwhash.argon2id.OPSLIMIT_MIN, nacl.pwhash.argon2id.MEMLIMIT_MIN
    keys = derive_keys(PASSPHRASE.encode(), salt, ops, mem)
    digest = hashlib.sha256(body).digest()
    path.write_bytes(body + Trailer(salt, ops, mem, digest, archive_mac(keys, digest)).to_bytes())


FORGED = {
    "a path that climbs out": (
        {"database/gateway.sqlite3": b"x" * 64, "home/../../escaped": b"owned"},
        ["database/gateway.sqlite3", "home/../../escaped"],
        "",
    ),
    "a member the manifest does not list": (
        {"database/gateway.sqlite3": b"x" * 64, "home/extra": b"unlisted"},
        ["database/gateway.sqlite3"],
        "",
    ),
    "a compressed member": (
        {"database/gateway.sqlite3": b"\0" * 100_000, "home/gateway.toml": b"[node]\n"},
        ["database/gateway.sqlite3", "home/gateway.toml"],
        "database/gateway.sqlite3",
    ),
}


@pytest.mark.parametrize("case", list(FORGED))
def test_an_authenticated_archive_breaking_a_format_rule_is_refused_before_writing(
    tmp_path: Path, case: str
) -> None:
    members, listed, deflate = FORGED[case]
    forged = tmp_path / "forged.gwbackup"
    _forge(forged, members, listed, deflate=deflate)
    target = tmp_path / "restore-here"
    target.mkdir()
    with pytest.raises(BackupDamaged) as refused:
        restore_backup(forged, target / "pk", passphrase=PASSPHRASE.encode(), db_url=None)
    assert refused.value.check == {"a path that climbs out": "member-path"}.get(case, "members")
    assert list(target.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forged.gwbackup", "restore-here"]


def _objects_in(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return int(
                connection.execute(
                    text(
                        "SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n"
                        " ON n.oid = c.relnamespace WHERE n.nspname = 'public')"
                        " + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n"
                        " ON n.oid = p.pronamespace WHERE n.nspname = 'public')"
                        " + (SELECT count(*) FROM pg_type t JOIN pg_namespace n"
                        " ON n.oid = t.typnamespace WHERE n.nspname = 'public')"
                    )
                ).scalar_one()
            )
    finally:
        engine.dispose()


def test_a_backup_whose_ledger_fails_verification_is_not_restored_and_leaves_nothing(
    tmp_path: Path, engine_name: str, pg_database_factory: Callable[[], str]
) -> None:
    source_url = pg_database_factory() if engine_name == "postgresql" else None
    environ = {"GATEWAY_PASSPHRASE": PASSPHRASE, "GATEWAY_KEYSTORE_STRENGTH": "min"}
    home = tmp_path / "jp"
    init_node(home, "jp", now=utc_now(), db_url=source_url, environ=environ)
    settings = load_settings(home, environ={})
    db = open_database(settings.database_url)
    try:
        tamper(
            db,
            sql(
                "UPDATE ledger_entry SET actor_name = 'someone else' "
                "WHERE seq = (SELECT min(seq) FROM ledger_entry)"
            ),
        )
    finally:
        db.dispose()
    archive = tmp_path / "jp.gwbackup"
    make_backup(
        settings, passphrase=PASSPHRASE.encode(), out=archive, now=utc_now(), environ=environ
    )
    target_url = pg_database_factory() if engine_name == "postgresql" else None
    target = tmp_path / "restored"
    target.mkdir()
    with pytest.raises(VerificationError) as refused:
        restore_backup(archive, target / "jp", passphrase=PASSPHRASE.encode(), db_url=target_url)
    assert not isinstance(refused.value, BackupDamaged), "the archive itself is intact"
    assert list(target.iterdir()) == []
    if target_url is not None:
        assert _objects_in(target_url) == 0, "the database is left as empty as it was found"


def test_on_a_file_system_without_hard_links_the_archive_still_never_overwrites(
    backed_up: Made, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.node.backup as backup_module  # noqa: PLC0415

    def no_links(*_args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(backup_module.os, "link", no_links)
    environ = {"GATEWAY_PASSPHRASE": PASSPHRASE, "GATEWAY_KEYSTORE_STRENGTH": "min"}
    settings = load_settings(backed_up.home, environ={})
    share = tmp_path / "share"
    share.mkdir()
    out = share / "again.gwbackup"
    made = make_backup(
        settings, passphrase=backed_up.passphrase, out=out, now=utc_now(), environ=environ
    )
    assert out.stat().st_size == made.size > 0
    with pytest.raises(AlreadyExists):
        make_backup(
            settings, passphrase=backed_up.passphrase, out=out, now=utc_now(), environ=environ
        )
    assert out.stat().st_size == made.size
    assert sorted(p.name for p in share.iterdir()) == ["again.gwbackup"]
    (tmp_path / "r").mkdir()
    restored = restore_backup(
        out, tmp_path / "r" / "pk", passphrase=backed_up.passphrase, db_url=None
    )
    assert restored.node == "pk"
