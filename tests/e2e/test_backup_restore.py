"""``gateway backup`` of a serving node, ``gateway restore`` into a new home and database.

Real processes on loopback: a bundle travels Tokyo -> Islamabad, Islamabad is
backed up while ``serve`` runs, and the archive is restored into a new home
(and a new database on PostgreSQL), where the ledger verifies, the keys open
and the bundle still decrypts. The archive holds no private key in the
clear; a changed byte anywhere is refused and leaves nothing behind.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from sqlalchemy import create_engine, text

from gateway.core.backup import TRAILER_BYTES, BackupDamaged
from gateway.errors import AlreadyExists, ConfigError, InvalidInput
from gateway.node.backup import make_backup, restore_backup
from gateway.node.runtime import utc_now
from gateway.settings import load_settings
from tests.nodes import NodeHome, init_pair, run_gateway, stop, wait_ready

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
    officers = {
        n: home.run("users", "add", f"officer-{n}", "--role", "officer")["token"]
        for n, home in nodes.items()
    }
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
    compliance = again.run("users", "add", "auditor", "--role", "compliance")["token"]
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


@pytest.fixture
def backed_up(tmp_path: Path) -> tuple[NodeHome, Path]:
    """A SQLite node (not serving) with its archive, for the refusal tests."""
    nodes = init_pair(tmp_path / "homes")
    pk = nodes["pk"]
    _tls_key(pk.home)
    archive = tmp_path / "pk.gwbackup"
    pk.run("backup", "--out", str(archive))
    return pk, archive


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
    backed_up: tuple[NodeHome, Path], tmp_path: Path
) -> None:
    pk, archive = backed_up
    original = archive.read_bytes()
    target = tmp_path / "target"
    target.mkdir()
    for name, position in _positions(original).items():
        damaged = bytearray(original)
        damaged[position] ^= 0x01
        bad = tmp_path / "damaged.gwbackup"
        bad.write_bytes(bytes(damaged))
        with pytest.raises(BackupDamaged):
            restore_backup(bad, target / "pk", passphrase=pk.passphrase.encode(), db_url=None)
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
    backed_up: tuple[NodeHome, Path], tmp_path: Path, damage: str, message: str
) -> None:
    pk, archive = backed_up
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


def test_restore_refuses_a_home_that_is_not_empty(
    backed_up: tuple[NodeHome, Path], tmp_path: Path
) -> None:
    pk, archive = backed_up
    home = tmp_path / "busy"
    home.mkdir()
    (home / "something").write_text("kept")
    with pytest.raises(AlreadyExists):
        restore_backup(archive, home, passphrase=pk.passphrase.encode(), db_url=None)
    assert [p.name for p in home.iterdir()] == ["something"]


def test_a_backup_never_overwrites_and_never_lands_in_the_home(
    backed_up: tuple[NodeHome, Path],
) -> None:
    pk, archive = backed_up
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
    source = pg_database_factory()
    nodes = init_pair(tmp_path / "pg", db_urls={"jp": source, "pk": pg_database_factory()})
    archive = tmp_path / "jp-pg.gwbackup"
    nodes["jp"].run("backup", "--out", str(archive))
    busy = pg_database_factory()
    engine = create_engine(busy)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE kept (x int)"))
    engine.dispose()
    with pytest.raises(AlreadyExists, match="not empty"):
        restore_backup(
            archive,
            tmp_path / "new",
            passphrase=nodes["jp"].passphrase.encode(),
            db_url=busy,
        )
    assert not (tmp_path / "new").exists()
    with pytest.raises(InvalidInput, match="holds a PostgreSQL database"):
        restore_backup(
            archive, tmp_path / "new", passphrase=nodes["jp"].passphrase.encode(), db_url=None
        )
    assert not (tmp_path / "new").exists()


@pytest.mark.postgres
def test_a_postgresql_backup_without_pg_dump_is_refused_naming_it(
    tmp_path: Path, pg_database_factory: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    nodes = init_pair(
        tmp_path / "pg", db_urls={"jp": pg_database_factory(), "pk": pg_database_factory()}
    )
    jp = nodes["jp"]
    no_tools = tmp_path / "bin"
    no_tools.mkdir()
    monkeypatch.setenv("PATH", str(no_tools))
    assert shutil.which("pg_dump") is None
    settings = load_settings(jp.home, environ=jp.env())
    out = tmp_path / "jp.gwbackup"
    with pytest.raises(ConfigError, match="needs pg_dump"):
        make_backup(
            settings,
            passphrase=jp.passphrase.encode(),
            out=out,
            now=utc_now(),
            environ=jp.env(),
        )
    assert not out.exists()
    assert _leftovers(tmp_path) == []
