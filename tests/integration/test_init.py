"""``gateway init`` on both engines: creates a node, refuses to overwrite one."""

from __future__ import annotations

import json
import re
import stat
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.cli.main import cli


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    runner = CliRunner()
    keystore = {"GATEWAY_PASSPHRASE": "test passphrase, not a secret"}
    result = runner.invoke(cli, list(args), env={**keystore, **(env or {})}, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_init_creates_home_config_and_database(
    tmp_path: Path, database_url: str, clean_environ: dict[str, str]
) -> None:
    home = tmp_path / "jp"
    code, out, err = run(
        "--home", str(home), "init", "--node", "jp", "--db", database_url, "--json"
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["node"] == "jp"
    assert "0001_foundation" in data["migrations"]
    assert (home / "gateway.toml").is_file()
    assert stat.S_IMODE((home / "keys").stat().st_mode) == 0o700
    code, out, err = run("db", "status", "--home", str(home), "--json")
    assert code == 0, err
    assert json.loads(out)["pending"] is False


def test_init_twice_is_refused_and_changes_nothing(
    tmp_path: Path, clean_environ: dict[str, str]
) -> None:
    home = tmp_path / "pk"
    assert run("--home", str(home), "init", "--node", "pk")[0] == 0
    before = (home / "gateway.toml").read_bytes()
    code, _out, err = run("--home", str(home), "init", "--node", "jp")
    assert code == 1
    assert "holds a node already" in err
    assert (home / "gateway.toml").read_bytes() == before


def test_init_on_a_database_of_another_node_is_refused_and_leaves_no_home(
    tmp_path: Path, database_url: str, clean_environ: dict[str, str]
) -> None:
    assert run("--home", str(tmp_path / "a"), "init", "--node", "jp", "--db", database_url)[0] == 0
    code, _out, err = run(
        "--home", str(tmp_path / "b"), "init", "--node", "pk", "--db", database_url
    )
    assert code == 1
    assert "belongs to node 'jp'" in err
    assert not (tmp_path / "b").exists()


def test_bad_node_name_is_a_usage_error(tmp_path: Path, clean_environ: dict[str, str]) -> None:
    code, _out, err = run("--home", str(tmp_path / "x"), "init", "--node", "us")
    assert code == 2
    assert "'us' is not one of" in err
    assert not (tmp_path / "x").exists()


def test_bad_listen_address_is_named(tmp_path: Path, clean_environ: dict[str, str]) -> None:
    code, _out, err = run(
        "--home", str(tmp_path / "x"), "init", "--node", "jp", "--listen", "nowhere"
    )
    assert code == 1
    assert "--listen" in err
    assert not (tmp_path / "x").exists()


def test_json_errors_carry_reason_and_exit_code(
    tmp_path: Path, clean_environ: dict[str, str]
) -> None:
    code, out, _err = run("--home", str(tmp_path / "none"), "db", "status", "--json")
    assert code == 1
    error = json.loads(out)["error"]
    assert error["reason"] == "config.missing"
    assert error["exit_code"] == 1


def test_home_from_environment(tmp_path: Path, clean_environ: dict[str, str]) -> None:
    home = tmp_path / "envhome"
    code, _out, err = run("init", "--node", "jp", env={"GATEWAY_HOME": str(home)})
    assert code == 0, err
    assert (home / "gateway.toml").exists()


def _own_policy(folder: Path, version: str) -> Path:
    folder.mkdir()
    shipped = (Path(__file__).resolve().parents[2] / "policies" / "policy.toml").read_text("utf-8")
    text = re.sub(r'(?m)^version = "[^"]*"', f'version = "{version}"', shipped, count=1)
    assert text != shipped
    (folder / "policy.toml").write_text(text, encoding="utf-8")
    return folder


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_a_policy_folder_given_at_init_is_used_as_it_is(
    tmp_path: Path, clean_environ: dict[str, str], how: str
) -> None:
    folder = _own_policy(tmp_path / "agreed", "2031.7")
    home = tmp_path / "jp"
    if how == "flag":
        code, out, err = run(
            "--home", str(home), "init", "--node", "jp", "--policy-dir", str(folder), "--json"
        )
    else:
        code, out, err = run(
            "--home",
            str(home),
            "init",
            "--node",
            "jp",
            "--json",
            env={"GATEWAY_POLICY_DIR": str(folder)},
        )
    assert code == 0, err
    assert json.loads(out)["policy_version"] == "2031.7"
    assert not (home / "policies").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["policy.toml"]
    recorded = tomllib.loads((home / "gateway.toml").read_text("utf-8"))
    assert recorded.get("policy", {}).get("dir") == (str(folder) if how == "flag" else None)


def test_without_a_policy_folder_init_copies_the_shipped_files(
    tmp_path: Path, clean_environ: dict[str, str]
) -> None:
    home = tmp_path / "pk"
    code, _out, err = run("--home", str(home), "init", "--node", "pk", "--json")
    assert code == 0, err
    shipped = Path(__file__).resolve().parents[2] / "policies"
    for name in ("policy.toml", "README.md"):
        assert (home / "policies" / name).read_bytes() == (shipped / name).read_bytes()


def test_a_policy_folder_without_policy_toml_is_a_usage_error(
    tmp_path: Path, clean_environ: dict[str, str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _out, err = run(
        "--home", str(tmp_path / "jp"), "init", "--node", "jp", "--policy-dir", str(empty)
    )
    assert code == 2
    assert "holds no policy.toml" in err
    assert not (tmp_path / "jp").exists()
    assert list(empty.iterdir()) == []
