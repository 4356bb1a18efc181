"""``gateway doctor``: a home checked offline; each breakage found, named, and exit 1."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from gateway.cli.main import cli
from tests.pki import Authority

PASSPHRASE = "test passphrase, not a secret"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("pki")
    ca = Authority(folder, "pair")
    old = Authority(folder, "old", now=datetime.now(UTC) - timedelta(days=5))
    return {
        "ca": ca,
        "node": ca.issue("jp", server=True, client=True),
        "other": ca.issue("other", server=True, client=True),
        "expired": old.issue("expired", server=True, client=True),
    }


def run(*args: str, env: dict[str, str] | None = None) -> Any:
    base = {"GATEWAY_PASSPHRASE": PASSPHRASE, "GATEWAY_KEYSTORE_STRENGTH": "min"}
    return CliRunner().invoke(cli, list(args), env={**base, **(env or {})})


@pytest.fixture
def home(
    tmp_path: Path, database_url: str, clean_environ: dict[str, str], pki: dict[str, Any]
) -> Path:
    made = tmp_path / "jp"
    done = run(
        "--home",
        str(made),
        "init",
        "--node",
        "jp",
        "--db",
        database_url,
        "--peer-url",
        "https://pk.example.org:8701",
        "--tls-cert",
        str(pki["node"].cert),
        "--tls-key",
        str(pki["node"].key),
        "--tls-ca",
        str(pki["ca"].path),
    )
    assert done.exit_code == 0, done.output
    return made


def doctor(home: Path, **env: str) -> tuple[int, dict[str, Any], str]:
    done = run("--home", str(home), "--json", "doctor", env=env)
    return done.exit_code, json.loads(done.stdout), done.stderr


def by_name(report: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {check["name"]: check for check in report["checks"]}


def test_a_good_home_passes_every_check(home: Path) -> None:
    code, report, _err = doctor(home)
    assert code == 0, report
    assert report["ok"] is True
    checks = by_name(report)
    assert list(checks) == [
        "settings",
        "tls-settings",
        "modes",
        "tls-cert",
        "tls-key",
        "tls-usage",
        "tls-names",
        "tls-ca",
        "database",
        "keys",
        "peer",
        "policy",
    ]
    assert {c["status"] for c in checks.values()} <= {"ok", "warn"}
    for name in (
        "settings",
        "modes",
        "tls-key",
        "tls-usage",
        "tls-names",
        "tls-ca",
        "database",
        "keys",
        "policy",
    ):
        assert checks[name]["status"] == "ok", checks[name]
    assert checks["tls-settings"]["detail"] == "mutual TLS"
    assert checks["peer"]["status"] == "warn"  # nothing pinned yet


def test_the_human_table_lists_each_check_and_the_verdict(home: Path) -> None:
    done = run("--home", str(home), "doctor")
    assert done.exit_code == 0
    lines = done.stdout.splitlines()
    assert lines[0] == f"doctor {home}"
    assert any(line.startswith("  ok   database") for line in lines)
    assert lines[-1].startswith("home ok")


def _chmod(relative: str, mode: int) -> Callable[[Path], str]:
    def apply(home: Path) -> str:
        target = home / relative if relative else home
        target.chmod(mode)
        return str(target)

    return apply


@pytest.mark.parametrize(
    ("breaker", "mode_text"),
    [
        (_chmod("", 0o755), "0755"),
        (_chmod("keys", 0o750), "0750"),
        (_chmod("keys/operational.key", 0o644), "0644"),
        (_chmod("keys/tls/node.key", 0o640), "0640"),
        (_chmod("gateway.toml", 0o666), "0666"),
    ],
    ids=["home", "keys folder", "operational key", "tls key", "settings writable"],
)
def test_bad_modes_fail_naming_the_file(
    home: Path, breaker: Callable[[Path], str], mode_text: str
) -> None:
    target = breaker(home)
    code, report, err = doctor(home)
    assert code == 1
    check = by_name(report)["modes"]
    assert check["status"] == "fail"
    assert f"{target} is" in check["detail"]
    assert mode_text in check["detail"]
    assert "modes" in err


def _replace(name: str, source: str, which: str) -> Callable[[Path, dict[str, Any]], None]:
    def apply(home: Path, pki: dict[str, Any]) -> None:
        target = home / "keys" / "tls" / name
        target.chmod(0o600)
        shutil.copyfile(getattr(pki[source], which), target)

    return apply


@pytest.mark.parametrize(
    ("breakers", "check", "words"),
    [
        (
            [_replace("node.crt", "expired", "cert"), _replace("node.key", "expired", "key")],
            "tls-cert",
            "expired at",
        ),
        ([_replace("node.key", "other", "key")], "tls-key", "key mismatch"),
    ],
    ids=["expired certificate", "key of another certificate"],
)
def test_bad_certificates_fail_naming_the_problem(
    home: Path,
    pki: dict[str, Any],
    breakers: list[Callable[[Path, dict[str, Any]], None]],
    check: str,
    words: str,
) -> None:
    for breaker in breakers:
        breaker(home, pki)
    code, report, _err = doctor(home)
    assert code == 1
    found = by_name(report)[check]
    assert found["status"] == "fail"
    assert words in found["detail"]


def test_a_certificate_without_the_listen_host_among_its_names_fails(home: Path) -> None:
    code, report, _err = doctor(home, GATEWAY_SERVER_LISTEN="jp.example.org:8701")
    assert code == 1
    names = by_name(report)["tls-names"]
    assert names["status"] == "fail"
    assert "do not include jp.example.org" in names["detail"]


def test_a_database_of_another_node_fails(home: Path, tmp_path: Path, database_url: str) -> None:
    other = tmp_path / "pk"
    assert run("--home", str(other), "init", "--node", "pk").exit_code == 0
    code, report, _err = doctor(other, GATEWAY_DATABASE_URL=database_url)
    assert code == 1
    database = by_name(report)["database"]
    assert database["status"] == "fail"
    assert "belongs to jp, not to node 'pk'" in database["detail"]


def test_an_unreachable_database_fails(home: Path) -> None:
    url = "postgresql+psycopg://postgres@127.0.0.1:1/nothing"
    code, report, _err = doctor(home, GATEWAY_DATABASE_URL=url)
    assert code == 1
    database = by_name(report)["database"]
    assert database["status"] == "fail"
    assert "127.0.0.1:1/nothing" in database["detail"]


def test_a_missing_policy_fails(home: Path) -> None:
    (home / "policies" / "policy.toml").unlink()
    code, report, _err = doctor(home)
    assert code == 1
    policy = by_name(report)["policy"]
    assert policy["status"] == "fail"
    assert "policy file missing" in policy["detail"]


def test_an_https_peer_url_without_tls_fails_the_tls_settings(home: Path) -> None:
    toml = home / "gateway.toml"
    text = toml.read_text()
    toml.write_text("\n".join(line for line in text.splitlines() if "tls_" not in line) + "\n")
    code, report, _err = doctor(home)
    assert code == 1
    tls = by_name(report)["tls-settings"]
    assert tls["status"] == "fail"
    assert "no TLS certificate" in tls["detail"]


def test_broken_settings_fail_alone(tmp_path: Path, clean_environ: dict[str, str]) -> None:
    broken = tmp_path / "broken"
    broken.mkdir(mode=0o700)
    (broken / "gateway.toml").write_text("[node\n")
    code, report, _err = doctor(broken)
    assert code == 1
    assert [c["name"] for c in report["checks"]] == ["settings"]
    assert "not valid TOML" in report["checks"][0]["detail"]


def test_a_missing_sqlite_file_fails_and_is_not_created(
    tmp_path: Path, clean_environ: dict[str, str]
) -> None:
    made = tmp_path / "pk"
    assert run("--home", str(made), "init", "--node", "pk").exit_code == 0
    database = made / "data" / "gateway.sqlite3"
    database.unlink()
    code, report, _err = doctor(made)
    assert code == 1
    found = by_name(report)["database"]
    assert found["status"] == "fail"
    assert "does not exist" in found["detail"]
    assert not database.exists()
