"""``gateway keys`` and ``gateway peer`` end to end through the CLI."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.cli.main import cli
from gateway.core.keys import key_id
from gateway.node import own_keys, peer_trust
from gateway.node.keystore import OPERATIONAL_FILE, read_operational, read_root
from gateway.node.runtime import Node, utc_now
from gateway.settings import load_settings
from tests.node_api import serving_home

PASSPHRASE = "a passphrase long enough for tests"
USER_COMMANDS = {("keys", "show"), ("peer", "show"), ("users", "add"), ("users", "list")}
"""Commands of this module that are clients of the running node."""


@dataclass
class Home:
    path: Path
    node: str
    token: str = ""
    outputs: list[str] = field(default_factory=list)

    def run(self, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        environment = {"GATEWAY_PASSPHRASE": PASSPHRASE, "GATEWAY_TOKEN": self.token}
        environment.update(env or {})
        argv = ["-v", "--home", str(self.path), *args]
        if tuple(args[:2]) in USER_COMMANDS:
            # A client of the running node: serve this home while it runs.
            with serving_home(self.path, environment, passphrase=PASSPHRASE):
                result = CliRunner().invoke(cli, argv, env=environment, catch_exceptions=False)
        else:
            result = CliRunner().invoke(cli, argv, env=environment, catch_exceptions=False)
        self.outputs.extend([result.stdout, result.stderr])
        return result.exit_code, result.stdout, result.stderr

    def json(self, *args: str) -> dict[str, object]:
        code, out, err = self.run(*args, "--json")
        assert code == 0, err
        value = json.loads(out)
        assert isinstance(value, dict)
        return value


def make_home(tmp_path: Path, node: str, db_url: str | None = None) -> Home:
    home = Home(tmp_path / node, node)
    extra = ["--db", db_url] if db_url else []
    data = home.json("init", "--node", node, *extra)
    home.token = str(data["admin_token"])
    assert str(data["root fingerprint"]).count("-") == 7
    return home


@pytest.fixture
def homes(tmp_path: Path, clean_environ: dict[str, str]) -> tuple[Home, Home]:
    return make_home(tmp_path, "jp"), make_home(tmp_path, "pk")


def _pin(jp: Home, pk: Home, tmp_path: Path) -> str:
    out = tmp_path / "jp-manifest.json"
    exported = jp.json("keys", "export", "--out", str(out))
    fp = str(exported["root_fingerprint"])
    pinned = pk.json("peer", "add", str(out), "--fingerprint", fp.lower().replace("-", " "))
    assert pinned["root_fingerprint"] == fp
    return fp


def test_exchange_and_pin_with_the_fingerprint_read_aloud(
    homes: tuple[Home, Home], tmp_path: Path
) -> None:
    jp, pk = homes
    assert pk.json("peer", "show") == {"pinned": None}
    fp = _pin(jp, pk, tmp_path)
    shown = pk.json("peer", "show")["pinned"]
    assert isinstance(shown, dict)
    assert shown["node"] == "jp"
    assert shown["root_fingerprint"] == fp
    assert jp.json("keys", "show")["root_fingerprint"] == fp


def test_fingerprint_mismatch_refuses_with_exit_4_and_pins_nothing(
    homes: tuple[Home, Home], tmp_path: Path
) -> None:
    jp, pk = homes
    out = tmp_path / "jp.json"
    jp.json("keys", "export", "--out", str(out))
    wrong = "AAAA-BBBB-CCCC-DDDD-EEEE-FFFF-GGGG-HHHH"
    code, _out, err = pk.run("peer", "add", str(out), "--fingerprint", wrong)
    assert code == 4
    assert "does not match" in err
    assert "Traceback" not in err
    assert pk.json("peer", "show") == {"pinned": None}


def test_own_manifest_cannot_be_pinned_as_the_peer(
    homes: tuple[Home, Home], tmp_path: Path
) -> None:
    jp, _pk = homes
    out = tmp_path / "jp.json"
    fp = str(jp.json("keys", "export", "--out", str(out))["root_fingerprint"])
    code, _out, err = jp.run("peer", "add", str(out), "--fingerprint", fp)
    assert code == 4
    assert "expected 'pk'" in err


def test_rotate_revoke_rotate_root_reach_the_peer_through_the_queue(
    homes: tuple[Home, Home], tmp_path: Path
) -> None:
    jp, pk = homes
    _pin(jp, pk, tmp_path)
    rotated = jp.json("keys", "rotate")
    assert rotated["version"] == 2
    first_sign = next(
        k["key_id"]
        for k in jp.json("keys", "show")["keys"]  # type: ignore[union-attr]
        if k["use"] == "sign"
    )
    revoked = jp.json("keys", "revoke", first_sign, "--reason", "laptop stolen", "--yes")
    assert revoked["revoked"] == [first_sign]
    root = jp.json("keys", "rotate-root")
    assert root["version"] == 4
    assert len(list((jp.path / "keys").glob("root-*.key"))) == 1
    shown = jp.json("keys", "show")
    assert shown["pending_delivery"] == 3
    assert shown["root_fingerprint"] == root["root_fingerprint"]

    with Node.open(load_settings(jp.path)) as jp_node, Node.open(load_settings(pk.path)) as pk_node:
        with jp_node.db.transaction() as session:
            pending = own_keys.pending_manifests(session)
        for _id, raw in pending:
            with pk_node.db.transaction() as session:
                peer_trust.apply_peer_manifest(session, raw, node="jp", now=utc_now())
    pinned = pk.json("peer", "show")["pinned"]
    assert isinstance(pinned, dict)
    assert pinned["version"] == 4
    assert pinned["root_fingerprint"] == root["root_fingerprint"]
    states = {k["key_id"]: k["state"] for k in pinned["keys"]}
    assert states[first_sign] == "revoked"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("wrong-passphrase", "wrong passphrase"),
        ("missing-file", "is missing"),
        ("corrupt-file", "is corrupt"),
        ("missing-root", "offline storage"),
    ],
)
def test_keystore_problems_exit_1_with_a_clear_message(
    homes: tuple[Home, Home], damage: str, message: str
) -> None:
    jp, _pk = homes
    keys_dir = jp.path / "keys"
    env = {}
    if damage == "wrong-passphrase":
        env["GATEWAY_PASSPHRASE"] = "this is not the passphrase"
    elif damage == "missing-file":
        (keys_dir / OPERATIONAL_FILE).unlink()
    elif damage == "corrupt-file":
        (keys_dir / OPERATIONAL_FILE).write_bytes(b'{"format":')
    else:
        next(keys_dir.glob("root-*.key")).unlink()
    before = jp.json("keys", "show")["version"]
    code, out, err = jp.run("keys", "rotate", "--json", env=env)
    assert code == 1
    assert message in err
    assert "Traceback" not in err
    assert json.loads(out)["error"]["exit_code"] == 1
    assert jp.json("keys", "show")["version"] == before


def test_key_commands_need_the_admin_role(homes: tuple[Home, Home]) -> None:
    jp, _pk = homes
    officer = jp.json("users", "add", "tanaka", "--role", "officer")["token"]
    for command in (["keys", "show"], ["keys", "rotate"], ["peer", "show"]):
        code, _out, err = jp.run(*command, env={"GATEWAY_TOKEN": str(officer)})
        assert code == 1, command
        assert "admin role" in err


def test_passphrase_file_option(homes: tuple[Home, Home], tmp_path: Path) -> None:
    jp, _pk = homes
    path = tmp_path / "passphrase"
    path.write_text(PASSPHRASE + "\n")
    path.chmod(0o600)
    code, out, err = jp.run(
        "--passphrase-file", str(path), "keys", "rotate", "--json", env={"GATEWAY_PASSPHRASE": ""}
    )
    assert code == 0, err
    assert json.loads(out)["version"] == 2


def _forms(secret: bytes) -> list[bytes]:
    return [
        secret,
        secret.hex().encode(),
        secret.hex().upper().encode(),
        base64.b64encode(secret),
        base64.urlsafe_b64encode(secret).rstrip(b"="),
        base64.b32encode(secret).rstrip(b"="),
    ]


def test_no_private_key_or_passphrase_in_logs_output_database_or_files(
    homes: tuple[Home, Home], tmp_path: Path
) -> None:
    """Every private key this node ever held, in every encoding, is absent from
    what the commands printed or logged, from the database and from the key files."""
    jp, pk = homes
    secrets: set[bytes] = {PASSPHRASE.encode()}

    def collect() -> None:
        keys_dir = jp.path / "keys"
        held = read_operational(keys_dir / OPERATIONAL_FILE, PASSPHRASE.encode(), node="jp")
        for signing in held.signing.values():
            secrets.add(bytes(signing))
            secrets.add(bytes(signing._signing_key))  # seed || public, libsodium's secret key
        for private in held.encryption.values():
            secrets.add(bytes(private))
        for root_file in keys_dir.glob("root-*.key"):
            kid = root_file.name[len("root-") : -len(".key")]
            root = read_root(root_file, PASSPHRASE.encode(), node="jp", expected_key_id=kid)
            assert key_id(bytes(root.verify_key)) == kid
            secrets.add(bytes(root))
            secrets.add(bytes(root._signing_key))

    collect()
    _pin(jp, pk, tmp_path)
    jp.json("keys", "show")
    jp.json("keys", "rotate")
    collect()
    kid = next(
        k["key_id"]
        for k in jp.json("keys", "show")["keys"]  # type: ignore[union-attr]
        if k["use"] == "encrypt"
    )
    jp.json("keys", "revoke", kid, "--reason", "test", "--yes")
    collect()
    jp.json("keys", "rotate-root")
    collect()
    jp.run("keys", "rotate", env={"GATEWAY_PASSPHRASE": "wrong passphrase here"})
    (jp.path / "keys" / "operational.key").write_bytes(b"{}")
    jp.run("keys", "rotate")

    haystacks: dict[str, bytes] = {
        f"output {i}": text.encode() for i, text in enumerate(jp.outputs + pk.outputs)
    }
    for home in (jp, pk):
        for path in (home.path / "data").rglob("*"):
            if path.is_file():
                haystacks[str(path)] = path.read_bytes()
        for path in (home.path / "keys").iterdir():
            haystacks[str(path)] = path.read_bytes()
    for path in tmp_path.glob("*.json"):
        haystacks[str(path)] = path.read_bytes()
    assert any("key_event" in text for text in jp.outputs), "the logs were not captured"
    assert len(secrets) >= 10
    leaks = [
        name
        for name, data in haystacks.items()
        for secret in secrets
        for form in _forms(secret)
        if form in data
    ]
    assert leaks == []
