"""``gateway init --tls-cert/--tls-key/--tls-ca`` and the https:// peer URL rule of init and serve."""

from __future__ import annotations

import stat
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from gateway.cli.main import cli
from gateway.settings import load_settings
from tests.pki import Authority

PASSPHRASE = "test passphrase, not a secret"


def run(*args: str, env: dict[str, str] | None = None) -> Any:
    base = {"GATEWAY_PASSPHRASE": PASSPHRASE, "GATEWAY_KEYSTORE_STRENGTH": "min"}
    return CliRunner().invoke(cli, list(args), env={**base, **(env or {})})


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("pki")
    ca = Authority(folder, "pair")
    old = Authority(folder, "old", now=datetime.now(UTC) - timedelta(days=5))
    return {
        "ca": ca,
        "node": ca.issue("jp", server=True, client=True),
        "other": ca.issue("other", server=True, client=True),
        "server-only": ca.issue("server-only", server=True, client=False),
        "expired": old.issue("expired", server=True, client=True),
        "old-ca": old,
    }


def _tls_args(pki: dict[str, Any], cert: str = "node", key: str | None = None) -> list[str]:
    return [
        "--tls-cert",
        str(pki[cert].cert),
        "--tls-key",
        str(pki[key or cert].key),
        "--tls-ca",
        str(pki["ca"].path),
    ]


def test_init_copies_the_tls_material_with_safe_modes_and_names_it_in_the_settings(
    tmp_path: Path, database_url: str, clean_environ: dict[str, str], pki: dict[str, Any]
) -> None:
    home = tmp_path / "jp"
    done = run(
        "--home",
        str(home),
        "init",
        "--node",
        "jp",
        "--db",
        database_url,
        "--peer-url",
        "https://pk.example.org:8701",
        *_tls_args(pki),
    )
    assert done.exit_code == 0, done.output
    folder = home / "keys" / "tls"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "node.key").stat().st_mode) == 0o600
    for name in ("node.crt", "ca.crt"):
        assert not stat.S_IMODE((folder / name).stat().st_mode) & 0o022
    assert (folder / "node.crt").read_bytes() == pki["node"].cert.read_bytes()
    assert (folder / "node.key").read_bytes() == pki["node"].key.read_bytes()
    assert (folder / "ca.crt").read_bytes() == pki["ca"].path.read_bytes()
    written = tomllib.loads((home / "gateway.toml").read_text())["server"]
    assert written["tls_cert"] == "keys/tls/node.crt"
    assert written["tls_key"] == "keys/tls/node.key"
    assert written["tls_ca"] == "keys/tls/ca.crt"
    settings = load_settings(home, environ={})
    assert settings.server.tls_cert == home / "keys" / "tls" / "node.crt"
    assert settings.server.tls_ca == home / "keys" / "tls" / "ca.crt"


@pytest.mark.parametrize(
    ("material", "extra", "words"),
    [
        ({"cert": "expired"}, [], "expired at"),
        ({"cert": "node", "key": "other"}, [], "key mismatch"),
        ({"cert": "server-only"}, [], "lacks clientAuth"),
        ({"cert": "node"}, ["--listen", "jp.example.org:8701"], "do not include jp.example.org"),
    ],
    ids=["expired", "key of another certificate", "no clientAuth", "listen host not named"],
)
def test_init_refuses_tls_material_that_fails_and_leaves_nothing(
    tmp_path: Path,
    clean_environ: dict[str, str],
    pki: dict[str, Any],
    material: dict[str, str],
    extra: list[str],
    words: str,
) -> None:
    home = tmp_path / "jp"
    args = _tls_args(pki, material["cert"], material.get("key"))
    done = run(
        "--home",
        str(home),
        "init",
        "--node",
        "jp",
        "--insecure-http",
        "--peer-url",
        "https://pk.example.org:8701",
        *extra,
        *args,
    )
    assert done.exit_code == 1
    assert "the TLS material given is not usable" in done.stderr
    assert words in done.stderr
    assert not home.exists()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--tls-cert", "CERT"], "--tls-cert and --tls-key must be given together"),
        (["--tls-key", "KEY"], "--tls-cert and --tls-key must be given together"),
        (["--tls-ca", "CA"], "--tls-ca needs --tls-cert and --tls-key"),
    ],
)
def test_init_refuses_half_given_tls_options(
    tmp_path: Path,
    clean_environ: dict[str, str],
    pki: dict[str, Any],
    args: list[str],
    words: str,
) -> None:
    paths = {"CERT": pki["node"].cert, "KEY": pki["node"].key, "CA": pki["ca"].path}
    home = tmp_path / "jp"
    done = run("--home", str(home), "init", "--node", "jp", *[str(paths.get(a, a)) for a in args])
    assert done.exit_code == 1
    assert words in done.stderr
    assert not home.exists()


def test_init_refuses_an_https_peer_url_without_tls(
    tmp_path: Path, clean_environ: dict[str, str]
) -> None:
    home = tmp_path / "jp"
    done = run("--home", str(home), "init", "--node", "jp", "--peer-url", "https://pk.example:8701")
    assert done.exit_code == 1
    assert "is https:// but this node has no TLS certificate" in done.stderr
    assert "--tls-cert" in done.stderr
    assert not home.exists()


def test_init_accepts_an_https_peer_url_without_tls_when_told_insecure(
    tmp_path: Path, clean_environ: dict[str, str]
) -> None:
    home = tmp_path / "jp"
    done = run(
        "--home",
        str(home),
        "init",
        "--node",
        "jp",
        "--peer-url",
        "https://pk.example:8701",
        "--insecure-http",
    )
    assert done.exit_code == 0, done.output
    assert load_settings(home, environ={}).server.insecure_http is True


def test_init_takes_tls_settings_from_the_environment_as_compose_does(
    tmp_path: Path, clean_environ: dict[str, str], pki: dict[str, Any]
) -> None:
    home = tmp_path / "jp"
    env = {
        "GATEWAY_SERVER_TLS_CERT": str(pki["node"].cert),
        "GATEWAY_SERVER_TLS_KEY": str(pki["node"].key),
        "GATEWAY_SERVER_TLS_CA": str(pki["ca"].path),
    }
    done = run(
        "--home",
        str(home),
        "init",
        "--node",
        "jp",
        "--peer-url",
        "https://pk.example:8701",
        env=env,
    )
    assert done.exit_code == 0, done.output


def test_serve_refuses_an_https_peer_url_without_tls_before_opening_anything(
    tmp_path: Path, clean_environ: dict[str, str]
) -> None:
    home = tmp_path / "jp"
    assert run("--home", str(home), "init", "--node", "jp").exit_code == 0
    done = run(
        "--home", str(home), "serve", env={"GATEWAY_SERVER_PEER_URL": "https://pk.example:8701"}
    )
    assert done.exit_code == 1
    assert "is https:// but this node has no TLS certificate" in done.stderr
    assert "serving" not in done.output
