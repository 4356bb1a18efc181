"""Configuration: precedence (flag > environment > file > default) and bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.settings import load_settings, parse_host_port, resolve_home


def write(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "gateway.toml").write_text(text, encoding="utf-8")


def test_defaults_fill_what_the_file_leaves_out(tmp_path: Path) -> None:
    write(tmp_path, '[node]\nid = "jp"\n')
    settings = load_settings(tmp_path, environ={})
    assert settings.node_id == "jp"
    assert settings.server.listen == "127.0.0.1:8701"
    assert settings.database_url == f"sqlite:///{tmp_path.resolve() / 'data' / 'gateway.sqlite3'}"
    assert settings.policy_dir == tmp_path / "policies"


def test_environment_beats_file_and_flag_beats_environment(tmp_path: Path) -> None:
    write(
        tmp_path,
        '[node]\nid = "jp"\n[server]\nlisten = "127.0.0.1:1000"\npeer_url = "http://a:1"\n',
    )
    env = {"GATEWAY_SERVER_LISTEN": "127.0.0.1:2000", "GATEWAY_SERVER_PEER_URL": "http://b:2"}
    settings = load_settings(
        tmp_path, environ=env, overrides={"server": {"listen": "127.0.0.1:3000"}}
    )
    assert settings.server.listen == "127.0.0.1:3000"
    assert settings.server.peer_url == "http://b:2"
    assert load_settings(tmp_path, environ=env).server.listen == "127.0.0.1:2000"
    assert load_settings(tmp_path, environ={}).server.listen == "127.0.0.1:1000"


def test_environment_values_are_typed(tmp_path: Path) -> None:
    write(tmp_path, '[node]\nid = "pk"\n')
    settings = load_settings(tmp_path, environ={"GATEWAY_SERVER_INSECURE_HTTP": "true"})
    assert settings.server.insecure_http is True


def test_relative_paths_resolve_against_the_home(tmp_path: Path) -> None:
    write(
        tmp_path, '[node]\nid = "jp"\n[server]\ntls_cert = "tls/cert.pem"\n[policy]\ndir = "pol"\n'
    )
    settings = load_settings(tmp_path, environ={})
    assert settings.server.tls_cert == tmp_path / "tls/cert.pem"
    assert settings.policy_dir == tmp_path / "pol"


@pytest.mark.parametrize(
    ("toml", "env", "names"),
    [
        ('[node]\nid = "xx"\n', {}, ["gateway.toml", "node.id"]),
        ("[server]\n", {}, ["gateway.toml", "node", "missing"]),
        (
            '[node]\nid = "jp"\n[server]\nlisten = "nowhere"\n',
            {},
            ["gateway.toml", "server.listen", "HOST:PORT"],
        ),
        ('[node]\nid = "jp"\n[server]\nlisten = "1.2.3.4:99999"\n', {}, ["server.listen", "port"]),
        (
            '[node]\nid = "jp"\n[server]\nlistn = "1.2.3.4:1"\n',
            {},
            ["gateway.toml", "server.listn", "unknown"],
        ),
        ('[node]\nid = "jp"\n[surver]\n', {}, ["gateway.toml", "surver"]),
        (
            '[node]\nid = "jp"\n',
            {"GATEWAY_SERVER_LISTEN": "bad"},
            ["GATEWAY_SERVER_LISTEN", "server.listen"],
        ),
        ('[node]\nid = "jp"\n', {"GATEWAY_SERVR_LISTEN": "x"}, ["GATEWAY_SERVR_LISTEN"]),
        ('[node]\nid = "jp"\n', {"GATEWAY_SERVER_LISTN": "x"}, ["GATEWAY_SERVER_LISTN", "listn"]),
        (
            '[node]\nid = "jp"\n',
            {"GATEWAY_DATABASE_URL": "mysql://x"},
            ["GATEWAY_DATABASE_URL", "database.url"],
        ),
        ('[node]\nid = "jp"\n[server]\npeer_url = "ftp://x"\n', {}, ["server.peer_url", "http"]),
        ("[node\n", {}, ["gateway.toml", "TOML"]),
    ],
)
def test_bad_setting_is_named_with_its_source(
    tmp_path: Path, toml: str, env: dict[str, str], names: list[str]
) -> None:
    write(tmp_path, toml)
    with pytest.raises(ConfigError) as caught:
        load_settings(tmp_path, environ=env)
    for name in names:
        assert name in str(caught.value)


def test_missing_config_file_says_to_run_init(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="gateway init"):
        load_settings(tmp_path / "nothing", environ={})


def test_home_comes_from_flag_then_environment(tmp_path: Path) -> None:
    assert resolve_home(tmp_path / "a", {"GATEWAY_HOME": str(tmp_path / "b")}) == tmp_path / "a"
    assert resolve_home(None, {"GATEWAY_HOME": str(tmp_path / "b")}) == tmp_path / "b"
    with pytest.raises(ConfigError, match="GATEWAY_HOME"):
        resolve_home(None, {})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("[::1]:8443", ("::1", 8443)),
        ("host.example:1", ("host.example", 1)),
    ],
)
def test_host_port_parses(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize("text", ["", "host", ":80", "host:", "host:0", "host:x", "[::1]80"])
def test_host_port_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host_port(text)
