"""Key rotation and revocation under the two-person rule, through the CLI.

With ``[approvals.keys-rotate] k = 2`` on Tokyo, one administrator cannot
rotate: the host ceremony refuses without a proposal and with one that a
second administrator has not approved, and nothing reaches the peer; once the
second administrator approved, the same ceremony rotates, the approvers are in
the ledger, and the peer takes the new manifest. Every test runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

from gateway.cli.main import cli
from gateway.node import own_keys, peer_trust
from gateway.node.ledger import read as ledger_read
from gateway.node.runtime import Node, utc_now
from gateway.settings import load_settings
from tests.integration.test_keys_cli import PASSPHRASE, Home, _pin, make_home
from tests.node_api import serving_home
from tests.policies import set_approvals


def client(home: Home, token: str, *args: str) -> tuple[int, Any, str]:
    """A user command, as ``token``'s user, while the node serves its local API."""
    env = {"GATEWAY_PASSPHRASE": PASSPHRASE, "GATEWAY_TOKEN": token}
    with serving_home(home.path, env, passphrase=PASSPHRASE):
        result = CliRunner().invoke(
            cli, ["--home", str(home.path), *args, "--json"], env=env, catch_exceptions=False
        )
    body = json.loads(result.stdout) if result.stdout.strip() else None
    return result.exit_code, body, result.stderr


def host(home: Home, *args: str) -> tuple[int, Any, str]:
    code, out, err = home.run(*args, "--json")
    return code, json.loads(out.splitlines()[-1]) if out.strip() else None, err


def set_rule(home: Home, action: str, k: int) -> None:
    set_approvals(home.path / "policies", action, k)


def enrolled(home: Home, name: str, role: str | None = None) -> str:
    """``gateway users enrol`` on the host (the passphrase, no token): the token of
    ``name``, which no one else holds, so ``name``'s approval counts beside the init
    administrator's (docs/consent.md, "Token custody")."""
    args = ["users", "enrol", name] + (["--role", role] if role else [])
    code, made, err = home.run(*args, "--json", env={"GATEWAY_TOKEN": ""})
    assert code == 0, err
    answer = json.loads(made)
    assert answer["name"] == name
    return str(answer["token"])


def peer_version_after_delivery(jp: Home, pk: Home) -> int:
    """Deliver every manifest jp has queued to pk; pk's pinned version."""
    with Node.open(load_settings(jp.path)) as jp_node, Node.open(load_settings(pk.path)) as pk_node:
        with jp_node.db.transaction() as session:
            pending = own_keys.pending_manifests(session)
        for _id, raw in pending:
            with pk_node.db.transaction() as session:
                peer_trust.apply_peer_manifest(session, raw, node="jp", now=utc_now())
        with pk_node.db.transaction() as session:
            return peer_trust.require_pinned_peer(session, needed_for="the test").version


def own_state(home: Home) -> tuple[int, int]:
    """(own manifest version, manifests queued for the peer)."""
    with Node.open(load_settings(home.path)) as node, node.db.transaction() as session:
        return own_keys.own_manifest(session).version, len(own_keys.pending_manifests(session))


def ledger_kinds(home: Home) -> list[Any]:
    with Node.open(load_settings(home.path)) as node, node.db.transaction() as session:
        return [e for e in ledger_read.list_entries(session) if str(e.kind).startswith("approval")]


@pytest.fixture
def homes(
    tmp_path: Path,
    clean_environ: dict[str, str],
    migrated_database_factory: Callable[[str], str],
) -> tuple[Home, Home]:
    """Tokyo and Islamabad homes, each on its own database of the engine under test."""
    return (
        make_home(tmp_path, "jp", migrated_database_factory("jp")),
        make_home(tmp_path, "pk", migrated_database_factory("pk")),
    )


def test_rotation_with_k_2_waits_for_the_second_administrator(
    homes: tuple[Home, Home], tmp_path: Path
) -> None:
    jp, pk = homes
    _pin(jp, pk, tmp_path)
    set_rule(jp, "keys-rotate", 2)
    # the second administrator is enrolled by the host operator: no one else holds the
    # token, so two approvals are two people (docs/consent.md, "Token custody")
    second = enrolled(jp, "second", "admin")

    # one administrator alone: refused without a proposal, nothing changes
    code, answer, _err = host(jp, "keys", "rotate")
    assert code == 1
    assert answer["error"]["reason"] == "approval.pending"
    assert "gateway approvals propose keys-rotate" in answer["error"]["message"]

    code, made, err = client(
        jp, jp.token, "approvals", "propose", "keys-rotate", "--reason", "yearly"
    )
    assert code == 0, err
    assert (made["approvals"], made["needed"]) == (1, 2)
    pid = made["proposal_id"]

    # the proposer approving again does not count; the ceremony still refuses
    code, again, _err = client(jp, jp.token, "approvals", "approve", pid, "--yes")
    assert again["error"]["reason"] == "approval.already-approved"
    code, answer, _err = host(jp, "keys", "rotate", "--proposal", pid)
    assert code == 1
    assert answer["error"]["reason"] == "approval.pending"
    assert "1 of 2 approvals" in answer["error"]["message"]
    assert own_state(jp) == (1, 0)  # no new manifest, nothing queued for the peer
    assert peer_version_after_delivery(jp, pk) == 1  # the peer sees nothing new

    # an officer is no approver of key changes
    code, officer, err = client(jp, jp.token, "users", "add", "clerk", "--role", "officer")
    assert code == 0, err
    code, refused, _err = client(jp, officer["token"], "approvals", "approve", pid, "--yes")
    assert code == 1
    assert refused["error"]["reason"] == "approval.not-approver"

    code, ready, err = client(jp, second, "approvals", "approve", pid, "--yes")
    assert code == 0, err
    assert ready["ready"] is True
    assert ready["counted"] == ["admin", "second"]
    assert own_state(jp) == (1, 0)
    assert peer_version_after_delivery(jp, pk) == 1  # approved, not yet rotated

    code, rotated, err = host(jp, "keys", "rotate", "--proposal", pid)
    assert code == 0, err
    assert rotated["version"] == 2
    assert peer_version_after_delivery(jp, pk) == 2

    # never twice
    code, answer, _err = host(jp, "keys", "rotate", "--proposal", pid)
    assert answer["error"]["reason"] == "approval.decided"
    assert peer_version_after_delivery(jp, pk) == 2
    executed = [e for e in ledger_kinds(jp) if str(e.kind) == "approval-executed"]
    assert len(executed) == 1
    assert json.loads(executed[0].canonical)["body"]["approvers"] == ["admin", "second"]


def test_revocation_needs_the_approved_key_and_reason(
    homes: tuple[Home, Home], tmp_path: Path
) -> None:
    jp, pk = homes
    _pin(jp, pk, tmp_path)
    set_rule(jp, "keys-revoke", 2)
    second = enrolled(jp, "second", "admin")
    with Node.open(load_settings(jp.path)) as node, node.db.transaction() as session:
        sign_key = next(k.key_id for k in own_keys.own_manifest(session).keys if k.use == "sign")
    code, made, err = client(
        jp, jp.token, "approvals", "propose", "keys-revoke", "--reason", "laptop stolen",
        "--key-id", sign_key,
    )  # fmt: skip
    assert code == 0, err
    pid = made["proposal_id"]
    assert client(jp, second, "approvals", "approve", pid, "--yes")[1]["ready"] is True
    code, answer, _err = host(
        jp, "keys", "revoke", sign_key, "--reason", "other reason", "--yes", "--proposal", pid
    )
    assert code == 1
    assert answer["error"]["reason"] == "approval.terms-changed"
    assert peer_version_after_delivery(jp, pk) == 1
    # the compromised-since is part of what was approved: an earlier one would mark
    # more bundles suspect at the peer
    code, answer, _err = host(
        jp, "keys", "revoke", sign_key, "--reason", "laptop stolen", "--yes",
        "--compromised-since", "2020-01-01T00:00:00Z", "--proposal", pid,
    )  # fmt: skip
    assert code == 1
    assert answer["error"]["reason"] == "approval.terms-changed"
    assert "compromised_since" in answer["error"]["message"]
    assert peer_version_after_delivery(jp, pk) == 1
    code, revoked, err = host(
        jp, "keys", "revoke", sign_key, "--reason", "laptop stolen", "--yes", "--proposal", pid
    )
    assert code == 0, err
    assert revoked["revoked"] == [sign_key]
    assert peer_version_after_delivery(jp, pk) == 2
    # a key revoked already, or one that does not exist: refused when proposed
    code, again, _err = client(
        jp, jp.token, "approvals", "propose", "keys-revoke", "--reason", "again",
        "--key-id", sign_key,
    )  # fmt: skip
    assert code != 0
    assert f"key {sign_key} is revoked already" in again["error"]["message"]
    code, unknown, _err = client(
        jp, jp.token, "approvals", "propose", "keys-revoke", "--reason", "typo",
        "--key-id", "0000000000000000",
    )  # fmt: skip
    assert code != 0
    assert "is not in this node's manifest" in unknown["error"]["message"]
    proposed = [e for e in ledger_kinds(jp) if str(e.kind) == "approval-proposed"]
    assert len(proposed) == 1  # neither refused proposal was made
    assert json.loads(proposed[0].canonical)["body"]["reason"] == "laptop stolen"


def test_revocation_with_compromised_since_runs_only_with_the_approved_time(
    homes: tuple[Home, Home], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jp, pk = homes
    _pin(jp, pk, tmp_path)
    set_rule(jp, "keys-revoke", 2)
    second = enrolled(jp, "second", "admin")
    with Node.open(load_settings(jp.path)) as node, node.db.transaction() as session:
        sign_key = next(k.key_id for k in own_keys.own_manifest(session).keys if k.use == "sign")
    since = "2026-01-01T00:00:00Z"
    code, made, err = client(
        jp, jp.token, "approvals", "propose", "keys-revoke", "--reason", "laptop stolen",
        "--key-id", sign_key, "--compromised-since", since,
    )  # fmt: skip
    assert code == 0, err
    pid = made["proposal_id"]
    assert made["terms"]["compromised_since"] == since
    code, shown, err = client(jp, second, "approvals", "show", pid)
    assert code == 0, err
    assert shown["terms"]["key_id"] == sign_key
    assert shown["terms_sha256"] == made["terms_sha256"]
    assert client(jp, second, "approvals", "approve", pid, "--yes")[1]["ready"] is True
    # without the approved --compromised-since: refused, nothing changes
    code, answer, _err = host(
        jp, "keys", "revoke", sign_key, "--reason", "laptop stolen", "--yes", "--proposal", pid
    )
    assert answer["error"]["reason"] == "approval.terms-changed"
    assert own_state(jp) == (1, 0)
    # on a terminal: the proposal is claimed after the question was answered, never before
    answered: list[Any] = []

    def confirm(*_args: Any, **_kw: Any) -> bool:
        answered.append(utc_now())
        return True

    monkeypatch.setattr("gateway.cli.keys_cmd.sys", SimpleNamespace(stdin=_Terminal()))
    monkeypatch.setattr("gateway.cli.keys_cmd.click.confirm", confirm)
    code, out, err = jp.run(
        "keys", "revoke", sign_key, "--reason", "laptop stolen",
        "--compromised-since", since, "--proposal", pid,
    )  # fmt: skip
    assert code == 0, err
    assert f"Revoked key {sign_key}." in out
    (executed,) = [e for e in ledger_kinds(jp) if str(e.kind) == "approval-executed"]
    assert executed.time >= answered[0]


class _Terminal:
    @staticmethod
    def isatty() -> bool:
        return True


def test_recovery_is_a_key_change_under_the_rule(homes: tuple[Home, Home], tmp_path: Path) -> None:
    jp, pk = homes
    _pin(jp, pk, tmp_path)
    set_rule(jp, "keys-recover", 2)
    second = enrolled(jp, "second", "admin")
    code, answer, _err = host(jp, "keys", "recover", "--reason", "disk lost")
    assert code == 1
    assert answer["error"]["reason"] == "approval.pending"
    assert "gateway approvals propose keys-recover" in answer["error"]["message"]
    assert own_state(jp) == (1, 0)
    code, made, err = client(
        jp, jp.token, "approvals", "propose", "keys-recover", "--reason", "disk lost"
    )
    assert code == 0, err
    pid = made["proposal_id"]
    code, answer, _err = host(jp, "keys", "recover", "--reason", "disk lost", "--proposal", pid)
    assert answer["error"]["reason"] == "approval.pending"
    assert client(jp, second, "approvals", "approve", pid, "--yes")[1]["ready"] is True
    code, answer, _err = host(jp, "keys", "recover", "--reason", "other", "--proposal", pid)
    assert answer["error"]["reason"] == "approval.terms-changed"
    assert own_state(jp) == (1, 0)
    (jp.path / "keys" / "operational.key").unlink()  # the loss the approvals were for
    code, recovered, err = host(jp, "keys", "recover", "--reason", "disk lost", "--proposal", pid)
    assert code == 0, err
    assert recovered["added"]
    assert peer_version_after_delivery(jp, pk) == 2
    (executed,) = [e for e in ledger_kinds(jp) if str(e.kind) == "approval-executed"]
    assert json.loads(executed.canonical)["body"]["approvers"] == ["admin", "second"]


def test_root_rotation_with_k_2_writes_nothing_until_approved(
    homes: tuple[Home, Home], tmp_path: Path
) -> None:
    jp, pk = homes
    _pin(jp, pk, tmp_path)
    set_rule(jp, "keys-rotate-root", 2)
    second = enrolled(jp, "second", "admin")
    roots_before = sorted(p.name for p in (jp.path / "keys").glob("root-*.key"))
    code, made, err = client(
        jp, jp.token, "approvals", "propose", "keys-rotate-root", "--reason", "custodian left"
    )
    assert code == 0, err
    pid = made["proposal_id"]
    code, answer, _err = host(jp, "keys", "rotate-root", "--proposal", pid)
    assert answer["error"]["reason"] == "approval.pending"
    assert sorted(p.name for p in (jp.path / "keys").glob("root-*.key")) == roots_before
    assert own_state(jp) == (1, 0)
    assert client(jp, second, "approvals", "approve", pid, "--yes")[1]["ready"] is True
    code, rooted, err = host(jp, "keys", "rotate-root", "--proposal", pid)
    assert code == 0, err
    assert rooted["version"] == 2
    assert peer_version_after_delivery(jp, pk) == 2
    (executed,) = [e for e in ledger_kinds(jp) if str(e.kind) == "approval-executed"]
    assert json.loads(executed.canonical)["body"]["approvers"] == ["admin", "second"]


def test_adding_an_administrator_with_k_2_waits_and_the_deciding_approver_gets_the_token(
    homes: tuple[Home, Home],
) -> None:
    jp, _pk = homes
    # the second administrator is added before the rule is in force
    second = enrolled(jp, "second", "admin")
    set_rule(jp, "users-add-admin", 2)
    # officers are still added by one administrator
    code, clerk, err = client(jp, jp.token, "users", "add", "clerk", "--role", "officer")
    assert code == 0, err
    assert clerk["token"]
    code, made, err = client(jp, jp.token, "users", "add", "third", "--role", "admin")
    assert code == 0, err
    assert made["state"] == "pending"
    assert "token" not in made
    listed = client(jp, jp.token, "users", "list")[1]
    assert "third" not in {u["name"] for u in listed}
    code, done, err = client(jp, second, "approvals", "approve", made["proposal_id"], "--yes")
    assert code == 0, err
    assert done["state"] == "executed"
    token = done["result"]["token"]
    code, who, err = client(jp, token, "users", "list")
    assert code == 0, err
    assert "third" in {u["name"] for u in who}
    (executed,) = [e for e in ledger_kinds(jp) if str(e.kind) == "approval-executed"]
    body = json.loads(executed.canonical)["body"]
    assert body["approvers"] == ["admin", "second"]
    assert token not in executed.canonical.decode()
