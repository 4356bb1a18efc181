"""Users on both engines: the first admin, adding users, disabling, token files."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text

from gateway.cli.main import cli
from gateway.core.tokens import parse_token
from tests.node_api import serving_home


def run(*args: str, token: str | None = None) -> tuple[int, str, str]:
    env = {"GATEWAY_PASSPHRASE": "test passphrase, not a secret"}
    if token is not None:
        env["GATEWAY_TOKEN"] = token
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def node(
    tmp_path: Path, database_url: str, clean_environ: dict[str, str]
) -> Iterator[tuple[Path, str]]:
    home = tmp_path / "jp"
    code, out, err = run(
        "--home",
        str(home),
        "init",
        "--node",
        "jp",
        "--db",
        database_url,
        "--admin",
        "root-admin",
        "--json",
    )
    assert code == 0, err
    # User management is a client of the running node: serve it.
    with serving_home(home, {"GATEWAY_DATABASE_URL": database_url}):
        yield home, json.loads(out)["admin_token"]


def test_first_admin_can_add_and_list_users(node: tuple[Path, str]) -> None:
    home, admin = node
    code, out, err = run(
        "--home", str(home), "users", "add", "tanaka", "--role", "officer", "--json", token=admin
    )
    assert code == 0, err
    officer = json.loads(out)["token"]
    assert officer.startswith("ssw_")
    code, out, _ = run("--home", str(home), "users", "list", "--json", token=admin)
    assert code == 0
    names = {u["name"]: u["role"] for u in json.loads(out)}
    assert names == {"root-admin": "admin", "tanaka": "officer"}
    assert officer not in out
    assert admin not in out


def test_officer_cannot_manage_users_and_nothing_changes(node: tuple[Path, str]) -> None:
    home, admin = node
    officer = json.loads(
        run(
            "--home",
            str(home),
            "users",
            "add",
            "tanaka",
            "--role",
            "officer",
            "--json",
            token=admin,
        )[1]
    )["token"]
    code, _out, err = run(
        "--home", str(home), "users", "add", "mallory", "--role", "admin", token=officer
    )
    assert code == 1
    assert "needs the admin role" in err
    names = [
        u["name"]
        for u in json.loads(run("--home", str(home), "users", "list", "--json", token=admin)[1])
    ]
    assert "mallory" not in names


@pytest.mark.parametrize("token", [None, "", "ssw_0000000000000000_" + "A" * 43, "nonsense"])
def test_missing_or_wrong_token_is_refused(node: tuple[Path, str], token: str | None) -> None:
    home, _admin = node
    code, _out, err = run("--home", str(home), "users", "list", token=token)
    assert code == 1
    assert "token" in err


def test_disabled_user_is_refused_and_new_token_replaces_old(node: tuple[Path, str]) -> None:
    home, admin = node
    second = json.loads(
        run("--home", str(home), "users", "add", "sato", "--role", "admin", "--json", token=admin)[
            1
        ]
    )["token"]
    assert run("--home", str(home), "users", "list", token=second)[0] == 0
    fresh = json.loads(
        run("--home", str(home), "users", "new-token", "sato", "--json", token=admin)[1]
    )["token"]
    assert run("--home", str(home), "users", "list", token=second)[0] == 1
    assert run("--home", str(home), "users", "list", token=fresh)[0] == 0
    assert run("--home", str(home), "users", "disable", "sato", token=admin)[0] == 0
    code, _out, err = run("--home", str(home), "users", "list", token=fresh)
    assert code == 1
    assert "disabled" in err


def test_token_file_must_be_private(node: tuple[Path, str], tmp_path: Path) -> None:
    home, admin = node
    path = tmp_path / "token"
    path.write_text(admin + "\n")
    path.chmod(0o644)
    code, _out, err = run("--home", str(home), "--token-file", str(path), "users", "list")
    assert code == 1
    assert "chmod 600" in err
    path.chmod(0o600)
    assert run("--home", str(home), "--token-file", str(path), "users", "list")[0] == 0


def test_tokens_are_stored_only_as_hashes(node: tuple[Path, str], database_url: str) -> None:
    _home, admin = node
    engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT token_id, token_hash FROM users")).all()
    engine.dispose()
    secret = parse_token(admin)[1]
    for token_id, digest in rows:
        assert secret not in token_id
        assert secret.encode() not in bytes(digest)
    if database_url.startswith("sqlite"):
        db_file = Path(database_url.removeprefix("sqlite:///"))
        assert secret.encode() not in db_file.read_bytes()
    assert os.environ.get("GATEWAY_TOKEN") is None


def _approver_changes(home: Path, admin: str) -> list[dict[str, object]]:
    """The ``approver-changed`` entries of the ledger: (actor, body), oldest first."""
    from gateway.node.ledger import read as ledger_read  # noqa: PLC0415
    from gateway.node.runtime import Node  # noqa: PLC0415
    from gateway.settings import load_settings  # noqa: PLC0415

    with Node.open(load_settings(home)) as node, node.db.transaction() as session:
        return [
            {"actor": e.actor_name, **json.loads(e.canonical)["body"]}
            for e in ledger_read.list_entries(session, kind="approver-changed")
        ]


def test_approver_capability_is_given_and_taken_by_an_administrator_in_the_ledger(
    node: tuple[Path, str],
) -> None:
    home, admin = node
    code, out, err = run(
        "--home", str(home), "users", "add", "asma", "--role", "officer", "--approver", "--json",
        token=admin,
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["approver"] is True
    officer = json.loads(out)["token"]
    code, out, err = run(
        "--home", str(home), "users", "add", "bilal", "--role", "officer", "--json", token=admin
    )
    assert json.loads(out)["approver"] is False  # off by default
    # only officers hold it
    code, _out, err = run(
        "--home", str(home), "users", "add", "sato", "--role", "admin", "--approver", token=admin
    )
    assert code == 1
    assert "only officers hold the approver capability" in err
    code, _out, err = run("--home", str(home), "users", "approver", "root-admin", "on", token=admin)
    assert code == 1
    assert "only officers" in err
    # an officer may not give it
    code, _out, err = run("--home", str(home), "users", "approver", "bilal", "on", token=officer)
    assert code == 1
    assert "needs the admin role" in err

    code, out, err = run(
        "--home", str(home), "users", "approver", "bilal", "on", "--json", token=admin
    )
    assert code == 0, err
    assert json.loads(out) == {"name": "bilal", "approver": True, "changed": True}
    code, out, err = run("--home", str(home), "users", "approver", "asma", "off", token=admin)
    assert code == 0, err
    assert "asma no longer holds the approver capability." in out
    code, out, err = run("--home", str(home), "users", "approver", "asma", "off", token=admin)
    assert "(unchanged)" in out
    code, _out, err = run("--home", str(home), "users", "approver", "asma", "maybe", token=admin)
    assert code != 0
    assert "'maybe' is not one of 'on', 'off'" in err
    listed = json.loads(run("--home", str(home), "users", "list", "--json", token=admin)[1])
    assert {u["name"]: u["approver"] for u in listed} == {
        "root-admin": False,
        "asma": False,
        "bilal": True,
    }
    assert _approver_changes(home, admin) == [
        {"actor": "root-admin", "user": "asma", "approver": True},
        {"actor": "root-admin", "user": "bilal", "approver": True},
        {"actor": "root-admin", "user": "asma", "approver": False},
    ]
