"""One administrator cannot be two approvers by reissuing a colleague's token.

An administrator may replace any user's token (``gateway users new-token``)
and so learns it; with ``[approvals.keys-rotate] k = 2`` that used to let one
person approve as two. Now an approval under k > 1 counts only with a token
its holder issued (``gateway users rotate-token``): the reissued token is
refused with ``approval.token-not-own`` and nothing happens; once the owner
replaces it with their own, their approval counts. Every step leaves a ledger
entry naming its actor and never any token material. Both engines.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import select

from gateway.core.tokens import parse_token, token_hash
from gateway.node.ledger import read as ledger_read
from gateway.node.runtime import Node
from gateway.settings import load_settings
from gateway.store.models_users import UserRecord
from tests.integration.test_key_approvals import (  # noqa: F401 - homes is a fixture
    client,
    homes,
    host,
    own,
    own_state,
    set_rule,
)
from tests.integration.test_keys_cli import Home, _pin


def ledger(home: Home, *kinds: str) -> list[tuple[str, str, dict[str, Any], str]]:
    """(kind, actor, body, canonical text) of the entries of ``kinds``, oldest first."""
    with Node.open(load_settings(home.path)) as node, node.db.transaction() as session:
        return [
            (
                str(e.kind),
                str(e.actor_name),
                dict(json.loads(e.canonical)["body"]),
                e.canonical.decode(),
            )
            for e in ledger_read.list_entries(session)
            if str(e.kind) in kinds
        ]


def every_entry_text(home: Home) -> str:
    with Node.open(load_settings(home.path)) as node, node.db.transaction() as session:
        return "\n".join(e.canonical.decode() for e in ledger_read.list_entries(session))


def assert_no_token_material(home: Home, *tokens: str) -> None:
    """No token, secret, token id or token hash appears in any ledger entry."""
    text = every_entry_text(home)
    for token in tokens:
        token_id, secret = parse_token(token)
        for part in (token, secret, token_id, token_hash(token_id, secret).hex()):
            assert part not in text


def issuers(home: Home) -> dict[str, str]:
    with Node.open(load_settings(home.path)) as node, node.db.transaction() as session:
        return dict(session.execute(select(UserRecord.name, UserRecord.token_issued_by)).all())


def test_an_administrator_who_reissues_a_colleagues_token_cannot_approve_as_them(
    homes: tuple[Home, Home], tmp_path: Path
) -> None:
    jp, pk = homes
    _pin(jp, pk, tmp_path)
    set_rule(jp, "keys-rotate", 2)
    code, added, err = client(jp, jp.token, "users", "add", "second", "--role", "admin")
    assert code == 0, err
    jp.token = own(jp, jp.token)
    own(jp, added["token"])  # the colleague's own token, which the administrator never saw
    code, made, err = client(
        jp, jp.token, "approvals", "propose", "keys-rotate", "--reason", "yearly"
    )
    assert code == 0, err
    pid = made["proposal_id"]
    assert (made["approvals"], made["needed"]) == (1, 2)

    # the attack: reissue the colleague's token, learn it, approve as the colleague
    code, reissued, err = client(jp, jp.token, "users", "new-token", "second")
    assert code == 0, err
    assert issuers(jp)["second"] == "admin"
    code, answer, _err = client(jp, reissued["token"], "approvals", "approve", pid, "--yes")
    assert code == 1
    assert answer["error"]["reason"] == "approval.token-not-own"
    assert "run `gateway users rotate-token`" in answer["error"]["message"]
    assert "then approve again" in answer["error"]["message"]
    # nothing counted, nothing executes: the ceremony still refuses
    listed = client(jp, jp.token, "approvals", "list")[1]
    assert [(p["proposal_id"], p["approvers"]) for p in listed] == [(pid, ["admin"])]
    code, refused, _err = host(jp, "keys", "rotate", "--proposal", pid)
    assert code == 1
    assert refused["error"]["reason"] == "approval.pending"
    assert own_state(jp) == (1, 0)
    assert not ledger(jp, "approval-given", "approval-executed")[1:]

    # the colleague replaces the token with their own: now their approval counts
    theirs = own(jp, reissued["token"])
    assert issuers(jp)["second"] == "second"
    code, ready, err = client(jp, theirs, "approvals", "approve", pid, "--yes")
    assert code == 0, err
    assert (ready["ready"], ready["counted"]) == (True, ["admin", "second"])
    code, _rotated, err = host(jp, "keys", "rotate", "--proposal", pid)
    assert code == 0, err
    assert own_state(jp)[0] == 2

    entries = ledger(jp, "token-reissued", "token-rotated")
    assert [(kind, actor, body) for kind, actor, body, _text in entries] == [
        ("token-rotated", "admin", {"user": "admin"}),
        ("token-rotated", "second", {"user": "second"}),
        ("token-reissued", "admin", {"user": "second", "by": "admin"}),
        ("token-rotated", "second", {"user": "second"}),
    ]
    assert_no_token_material(jp, jp.token, added["token"], reissued["token"], theirs)


def test_user_changes_are_recorded_with_their_actor_and_no_token(homes: tuple[Home, Home]) -> None:
    jp, _pk = homes
    code, added, err = client(
        jp, jp.token, "users", "add", "asma", "--role", "officer", "--approver"
    )
    assert code == 0, err
    assert added["approver"] is True
    code, _done, err = client(jp, jp.token, "users", "disable", "asma")
    assert code == 0, err
    code, _again, err = client(jp, jp.token, "users", "disable", "asma")  # idempotent
    assert code == 0, err
    entries = ledger(jp, "user-added", "approver-changed", "user-disabled")
    assert [(kind, actor, body) for kind, actor, body, _text in entries] == [
        (
            "user-added",
            "admin",
            {"user": "asma", "role": "officer", "approver": True, "by": "admin"},
        ),
        ("approver-changed", "admin", {"user": "asma", "approver": True}),
        ("user-disabled", "admin", {"user": "asma", "by": "admin"}),
    ]
    assert_no_token_material(jp, added["token"])
    listed = client(jp, jp.token, "users", "list")[1]
    assert {u["name"]: u["token_issued_by"] for u in listed} == {"admin": "init", "asma": "admin"}


def test_a_rotated_token_replaces_the_old_one_at_once(homes: tuple[Home, Home]) -> None:
    jp, _pk = homes
    code, added, err = client(jp, jp.token, "users", "add", "tanaka", "--role", "compliance")
    assert code == 0, err
    code, rotated, err = client(jp, added["token"], "users", "rotate-token")
    assert code == 0, err
    assert rotated["name"] == "tanaka"
    code, refused, _err = client(jp, added["token"], "users", "rotate-token")
    assert code == 1
    assert refused["error"]["reason"] == "access.token"
    code, again, err = client(jp, rotated["token"], "users", "rotate-token")
    assert code == 0, err
    assert len({added["token"], rotated["token"], again["token"]}) == 3
    assert issuers(jp)["tanaka"] == "tanaka"
