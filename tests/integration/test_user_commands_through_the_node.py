"""User commands are clients of the running node (SPEC §8, who runs what).

The officer and compliance stories run through the CLI with tokens only: no
GATEWAY_PASSPHRASE, and a home for the CLI that holds nothing but the link to
the node's socket (no keys, no settings, no database). Two nodes for consent,
opened in this process, each serving its local API on its home's socket.
Also: a stream cut mid-way leaves nothing behind (no folder, no
``disclosure-made`` entry), no node running is one line and exit 1, and the
socket and its folder have the modes they are documented with.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select

from gateway.api.unix_socket import bind_api_socket
from gateway.cli.main import cli
from gateway.client.paths import api_socket_path
from gateway.errors import ConfigError
from gateway.node.runtime import utc_now
from gateway.node.users import add_user
from gateway.store.models_ledger import LedgerEntryRow
from tests.exchange_pair import Pair, Side, example, pair  # noqa: F401 - the fixture
from tests.nodes import GATEWAY, REPO
from tests.policies import set_approvals

EMBASSY = "Embassy of Example"
PURPOSE = "visa screening of the broker's workers"


def client_home(side: Side, where: Path) -> Path:
    """A home for the CLI holding only a link to the node's socket: no keys/, no
    gateway.toml, no database; so the command can only reach the running node."""
    side.serve_api()
    home = where / f"client-{side.node.node_id}"
    (home / "run").mkdir(parents=True)
    os.link(api_socket_path(side.home), api_socket_path(home))
    return home


def run(home: Path, token: str, *args: str) -> Result:
    """``gateway --json ARGS`` with a token only (no passphrase in the environment)."""
    env = {"GATEWAY_HOME": str(home), "GATEWAY_TOKEN": token, "GATEWAY_PASSPHRASE": ""}
    return CliRunner().invoke(cli, ["--json", *args], env=env, catch_exceptions=False)


def answer(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def refusal(result: Result) -> str:
    for line in result.stdout.splitlines():
        if line.startswith('{"error"'):
            return str(json.loads(line)["error"]["reason"])
    raise AssertionError(f"no error in: {result.output}")


def kinds(side: Side, kind: str) -> int:
    with side.node.db.transaction() as session:
        rows = session.scalars(select(LedgerEntryRow).where(LedgerEntryRow.kind == kind)).all()
    return len(rows)


def test_officers_and_compliance_act_with_tokens_only(pair: Pair, tmp_path: Path) -> None:
    # This test is about commands acting with tokens only, one officer per side: Tokyo
    # grants with one officer's approval (the two-person rule: test_approvals.py).
    for side in (pair.jp, pair.pk):  # both nodes load the same policy
        set_approvals(side.node.settings.policy_dir, "consent-grant", 1)
    jp_home = client_home(pair.jp, tmp_path)
    pk_home = client_home(pair.pk, tmp_path)
    assert not (jp_home / "keys").exists()
    assert not (jp_home / "gateway.toml").exists()
    jp_officer, pk_officer = pair.jp.tokens["officer"], pair.pk.tokens["officer"]
    pk_auditor = pair.pk.tokens["compliance"]

    # jp's officer sends a case with two attachments, streamed to the node.
    case = tmp_path / "case.json"
    case.write_text(json.dumps(example("broker-misconduct")))
    statement = tmp_path / "statement.txt"
    statement.write_bytes(b"statement of the worker\n" * 1000)
    scan = tmp_path / "scan.bin"
    scan.write_bytes(os.urandom(300_000))
    sent = answer(
        run(
            jp_home,
            jp_officer,
            "send",
            "broker-misconduct",
            str(case),
            "--attach",
            str(statement),
            "--attach",
            str(scan),
        )
    )
    bundle_id = sent["bundle_id"]
    pair.pk.receive_from(pair.jp, bundle_id)

    # pk's officer lists and opens it; the files arrive 0600 in a 0700 folder.
    listed = answer(run(pk_home, pk_officer, "inbox"))
    assert [b["bundle_id"] for b in listed["bundles"]] == [bundle_id]
    out = tmp_path / "opened" / "case"
    shown = answer(run(pk_home, pk_officer, "show", bundle_id, "--out", str(out)))
    assert shown["case"]["summary"] == example("broker-misconduct")["summary"]
    assert (out / "scan.bin").read_bytes() == scan.read_bytes()
    assert (out / "statement.txt").read_bytes() == statement.read_bytes()
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o600}
    assert sorted(shown["written"]) == sorted(str(p) for p in out.iterdir())

    # Without consent the disclosure is refused: exit 3, nothing written, recorded.
    disclose = ["disclose", bundle_id, "--recipient", EMBASSY, "--purpose", PURPOSE]
    blocked = run(pk_home, pk_officer, *disclose, "--out", str(tmp_path / "d1"))
    assert blocked.exit_code == 3, blocked.output
    assert refusal(blocked) == "consent"
    assert not (tmp_path / "d1").exists()
    assert kinds(pair.pk, "disclosure-blocked") == 1

    # A first request is denied, a second granted, the grant used, then revoked.
    ask = ["consent", "request", bundle_id, "--recipient", EMBASSY, "--purpose", PURPOSE]
    first = answer(run(pk_home, pk_officer, *ask))
    pair.jp.receive_from(pair.pk, first["bundle_id"])
    denied = answer(
        run(jp_home, jp_officer, "consent", "deny", first["request_id"], "--reason", "no")
    )
    pair.pk.receive_from(pair.jp, denied["bundle_id"])
    second = answer(run(pk_home, pk_officer, *ask))
    pair.jp.receive_from(pair.pk, second["bundle_id"])
    granted = answer(run(jp_home, jp_officer, "consent", "grant", second["request_id"]))
    pair.pk.receive_from(pair.jp, granted["bundle_id"])
    consents = answer(run(pk_home, pk_officer, "consent", "list"))
    assert granted["consent_id"] in {c["consent_id"] for c in consents["consents"]}

    allowed = run(pk_home, pk_officer, *disclose, "--out", str(tmp_path / "d2"))
    made = answer(allowed)
    assert made["consent_id"] == granted["consent_id"]
    assert (tmp_path / "d2" / "disclosure.json").is_file()
    assert stat.S_IMODE((tmp_path / "d2").stat().st_mode) == 0o700
    assert kinds(pair.pk, "disclosure-made") == 1

    revoked = answer(
        run(jp_home, jp_officer, "consent", "revoke", granted["consent_id"], "--reason", "ended")
    )
    pair.pk.receive_from(pair.jp, revoked["bundle_id"])
    again = run(pk_home, pk_officer, *disclose, "--out", str(tmp_path / "d3"))
    assert again.exit_code == 3, again.output
    assert not (tmp_path / "d3").exists()

    # pk's compliance officer: the ledger, through the node.
    entries = answer(run(pk_home, pk_auditor, "ledger", "list", "--kind", "disclosure-made"))
    assert len(entries) == 1
    assert answer(run(pk_home, pk_auditor, "ledger", "verify"))["intact"] is True
    exported = tmp_path / "ledger.jsonl"
    done = answer(
        run(pk_home, pk_auditor, "ledger", "export", "--format", "jsonl", "--out", str(exported))
    )
    assert done["entries"] == len(exported.read_text().splitlines()) > 0
    audit = run(pk_home, pk_auditor, "ledger", "audit-peer")
    # No peer listens in this test: the node answers, past the token and the role.
    assert audit.exit_code in (0, 1)
    assert not refusal_or_none(audit).startswith("access")

    # Another role's token is refused with today's codes; nothing changes.
    assert refusal(run(pk_home, pk_auditor, "show", bundle_id)) == "access.role"
    assert refusal(run(pk_home, pk_officer, "ledger", "verify")) == "access.role"
    blocked_now = kinds(pair.pk, "disclosure-blocked")
    by_auditor = run(pk_home, pk_auditor, *disclose, "--out", str(tmp_path / "d4"))
    assert by_auditor.exit_code == 1
    assert refusal(by_auditor) == "access.role"
    assert kinds(pair.pk, "disclosure-blocked") == blocked_now

    # A disabled user's token is refused.
    with pair.pk.node.db.transaction() as session:
        admin = add_user(
            session, "root2", "admin", created_by="host", by_host=True, now=utc_now()
        ).token.text
    added = answer(run(pk_home, admin, "users", "add", "kamran", "--role", "officer"))
    assert answer(run(pk_home, added["token"], "inbox"))["bundles"]
    answer(run(pk_home, admin, "users", "disable", "kamran"))
    disabled = run(pk_home, added["token"], "inbox")
    assert disabled.exit_code == 1
    assert refusal(disabled) == "access.disabled"


def refusal_or_none(result: Result) -> str:
    return refusal(result) if result.exit_code else ""


def test_a_stream_cut_mid_way_leaves_no_folder_and_no_disclosure_entry(
    pair: Pair,
    tmp_path: Path,
) -> None:
    """The reader goes away after the first piece: the node rolls the disclosure
    back (no ``disclosure-made``, no consent use) and the client kept nothing."""
    pk_home = client_home(pair.pk, tmp_path)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(8 * 1024 * 1024))
    case = tmp_path / "case.json"
    case.write_text(json.dumps(example("broker-misconduct")))
    # pk's own bundle needs no consent: the disclosure is allowed at once.
    sent = answer(
        run(
            pk_home,
            pair.pk.tokens["officer"],
            "send",
            "broker-misconduct",
            str(case),
            "--attach",
            str(big),
        )
    )
    body = json.dumps(
        {"bundle_ids": [sent["bundle_id"]], "recipient": EMBASSY, "purpose": PURPOSE}
    ).encode()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(api_socket_path(pair.pk.home)))
        sock.sendall(
            b"POST /api/v1/disclosures/stream HTTP/1.1\r\nHost: node\r\n"
            + f"Authorization: Bearer {pair.pk.tokens['officer']}\r\n".encode()
            + b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first[:200]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    # The node notices on its next write and rolls back. A second disclosure waits
    # for the ledger's lock, so it runs after the first one ended either way.
    whole = run(
        pk_home,
        pair.pk.tokens["officer"],
        *disclose_args(sent["bundle_id"]),
        "--out",
        str(tmp_path / "whole"),
    )
    assert answer(whole)["kind"] in ("disclosure-made", "internal-share")
    made = kinds(pair.pk, "disclosure-made") + kinds(pair.pk, "internal-share")
    assert made == 1  # the whole one only: the cut one recorded nothing
    assert (
        tmp_path / "whole" / sent["bundle_id"] / "attachments" / "big.bin"
    ).read_bytes() == big.read_bytes()

    # The client side: a reply cut after the first piece leaves no partial folder.
    from gateway.client.files import receive_files  # noqa: PLC0415

    class CutAfter:
        def __init__(self, data: bytes) -> None:
            self.data, self.at = data, 0

        def read(self, size: int = -1) -> bytes:
            if self.at >= len(self.data):
                raise ConnectionResetError("cut")
            piece = self.data[self.at : self.at + (size if size > 0 else len(self.data))]
            self.at += len(piece)
            return piece

    whole = _tar_of({"a.txt": b"x" * 200_000, "b.txt": b"y" * 10})
    out = tmp_path / "cut"
    with pytest.raises(Exception) as caught:
        receive_files(CutAfter(whole[:70_000]), out)  # type: ignore[arg-type]
    assert "cut off" in str(caught.value)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ssw-partial-")] == []


def disclose_args(bundle_id: str) -> list[str]:
    return ["disclose", bundle_id, "--recipient", EMBASSY, "--purpose", PURPOSE]


def _tar_of(files: dict[str, bytes]) -> bytes:
    import io  # noqa: PLC0415
    import tarfile  # noqa: PLC0415

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_no_node_running_is_one_line_and_exit_1(tmp_path: Path) -> None:
    home = tmp_path / "stopped"
    home.mkdir()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_") and k != "PYTHONPATH"
    }
    env.update(PYTHONPATH=str(REPO), GATEWAY_HOME=str(home), GATEWAY_TOKEN="ssw_x_y")
    done = subprocess.run(
        [*GATEWAY, "inbox"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert f"no node is running at {home / 'run' / 'api.sock'}" in lines[0]
    assert f"gateway serve --home {home}" in lines[0]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_socket_is_0660_in_a_0750_folder_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        listener = bind_api_socket(tmp_path)
    finally:
        os.umask(old)
    try:
        path = api_socket_path(tmp_path)
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert stat.S_IMODE(path.lstat().st_mode) == 0o660
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750
        assert [p.name for p in path.parent.iterdir()] == ["api.sock"]
    finally:
        listener.close()


def test_a_stale_socket_is_replaced_and_a_live_one_is_not_taken(tmp_path: Path) -> None:
    first = bind_api_socket(tmp_path)
    with pytest.raises(ConfigError, match="already answers"):
        bind_api_socket(tmp_path)
    first.close()  # killed: the file stays, nobody answers
    assert api_socket_path(tmp_path).exists()
    second = bind_api_socket(tmp_path)
    second.close()
    api_socket_path(tmp_path).unlink()
    api_socket_path(tmp_path).write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        bind_api_socket(tmp_path)
    assert api_socket_path(tmp_path).read_text() == "not a socket"


def test_user_command_modules_import_no_database_server_or_crypto_library() -> None:
    """The client and the user commands' modules load the standard library and
    the client only: no SQLAlchemy, Alembic, aiohttp, PyNaCl, pydantic or case schemas."""
    modules = [
        "gateway.client.transport",
        "gateway.client.files",
        "gateway.client.upload",
        "gateway.client.progress",
        "gateway.cli.exchange_cmd",
        "gateway.cli.consent_cmd",
        "gateway.cli.disclose_cmd",
        "gateway.cli.ledger_cmd",
        "gateway.cli.users_cmd",
    ]
    probe = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "heavy = ('sqlalchemy', 'alembic', 'aiohttp', 'nacl', 'pydantic', 'gateway.core.cases',"
        " 'gateway.node', 'gateway.store')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or"
        " any(m == h or m.startswith(h + '.') for h in heavy)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [GATEWAY[0], "-c", probe], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout


def test_the_api_url_variables_are_no_settings_so_host_operations_accept_them(
    tmp_path: Path,
) -> None:
    from gateway._settings_models import _env_overrides  # noqa: PLC0415

    values, _origin = _env_overrides(
        {"GATEWAY_API_URL": "https://127.0.0.1:8702", "GATEWAY_API_CA": str(tmp_path / "ca.pem")}
    )
    assert values == {}


def test_a_user_command_reaches_the_node_over_tcp_with_api_url(
    pair: Pair,
) -> None:
    url = pair.jp.serve_api().add_tcp()
    env = {"GATEWAY_TOKEN": pair.jp.tokens["officer"], "GATEWAY_PASSPHRASE": ""}
    done = CliRunner().invoke(
        cli, ["--api-url", url, "--json", "outbox"], env=env, catch_exceptions=False
    )
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout) == {"bundles": []}
    via_env = CliRunner().invoke(
        cli, ["--json", "inbox"], env={**env, "GATEWAY_API_URL": url}, catch_exceptions=False
    )
    assert via_env.exit_code == 0, via_env.output
    refused = CliRunner().invoke(cli, ["--api-url", "ftp://x", "inbox"], env=env)
    assert refused.exit_code == 1
    assert "must be http://HOST:PORT or https://HOST:PORT" in refused.stderr
