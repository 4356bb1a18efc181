"""One administrator cannot be two approvers by reissuing a colleague's token.

An administrator may replace any user's token (``gateway users new-token``)
and so learns it; with ``[approvals.keys-rotate] k = 2`` that used to let one
person approve as two, and rotating the reissued token first (``gateway users
rotate-token``) did not help, since whoever holds a token can rotate it. Now
each token carries who could hold it (docs/consent.md, "Token custody"): the
reissued token is held by the administrator too, so its approval is refused
with ``approval.not-distinct``, before and after a rotation, and nothing
happens; once the host operator enrols the colleague again (``gateway users
enrol``), their approval counts. Every step leaves a ledger entry naming its
actor and never any token material. Both engines.
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
    enrolled,
    homes,
    host,
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


def holders(home: Home) -> dict[str, list[str]]:
    with Node.open(load_settings(home.path)) as node, node.db.transaction() as session:
        rows = session.execute(select(UserRecord.name, UserRecord.token_holders)).all()
    return {name: json.loads(text) for name, text in rows}


def test_an_administrator_who_reissues_a_colleagues_token_cannot_approve_as_them(
    homes: tuple[Home, Home], tmp_path: Path
) -> None:
    jp, pk = homes
    _pin(jp, pk, tmp_path)
    set_rule(jp, "keys-rotate", 2)
    first = enrolled(jp, "second", "admin")  # held by the colleague alone
    assert holders(jp)["second"] == ["second"]
    code, made, err = client(
        jp, jp.token, "approvals", "propose", "keys-rotate", "--reason", "yearly"
    )
    assert code == 0, err
    pid = made["proposal_id"]
    assert (made["approvals"], made["needed"]) == (1, 2)

    # the attack: reissue the colleague's token, rotate it so it looks like their own,
    # approve as the colleague
    code, reissued, err = client(jp, jp.token, "users", "new-token", "second")
    assert code == 0, err
    assert (issuers(jp)["second"], holders(jp)["second"]) == ("admin", ["admin", "second"])
    code, rotated, err = client(jp, reissued["token"], "users", "rotate-token")
    assert code == 0, err
    assert (issuers(jp)["second"], holders(jp)["second"]) == ("second", ["admin", "second"])
    code, answer, _err = client(jp, rotated["token"], "approvals", "approve", pid, "--yes")
    assert code == 1
    assert answer["error"]["reason"] == "approval.not-distinct"
    assert "admin could hold both second's token and admin's" in answer["error"]["message"]
    assert "gateway users enrol" in answer["error"]["message"]
    # nothing counted, nothing executes: the ceremony still refuses
    listed = client(jp, jp.token, "approvals", "list")[1]
    assert [(p["proposal_id"], p["approvers"]) for p in listed] == [(pid, ["admin"])]
    code, refused, _err = host(jp, "keys", "rotate", "--proposal", pid)
    assert code == 1
    assert refused["error"]["reason"] == "approval.pending"
    assert own_state(jp) == (1, 0)
    assert not ledger(jp, "approval-given", "approval-executed")[1:]

    # the host operator enrols the colleague again: a token only they hold counts
    theirs = enrolled(jp, "second")
    assert (issuers(jp)["second"], holders(jp)["second"]) == ("host", ["second"])
    code, _old, _err = client(jp, rotated["token"], "users", "list")
    assert code == 1  # the token the administrator could hold stopped working
    code, ready, err = client(jp, theirs, "approvals", "approve", pid, "--yes")
    assert code == 0, err
    assert (ready["ready"], ready["counted"]) == (True, ["admin", "second"])
    code, _rotated, err = host(jp, "keys", "rotate", "--proposal", pid)
    assert code == 0, err
    assert own_state(jp)[0] == 2

    entries = ledger(jp, "token-reissued", "token-rotated", "user-enrolled")
    assert [(kind, actor, body) for kind, actor, body, _text in entries] == [
        (
            "user-enrolled",
            "host",
            {"user": "second", "role": "admin", "approver": False, "created": True},
        ),
        ("token-reissued", "admin", {"user": "second", "by": "admin"}),
        ("token-rotated", "second", {"user": "second"}),
        (
            "user-enrolled",
            "host",
            {"user": "second", "role": "admin", "approver": False, "created": False},
        ),
    ]
    assert_no_token_material(jp, jp.token, first, reissued["token"], rotated["token"], theirs)


def test_an_administrator_added_by_another_never_approves_beside_them(
    homes: tuple[Home, Home], tmp_path: Path
) -> None:
    """An administrator added with 'users add' got the first token from the one who
    added them: the two never count as two approvals, rotation or not."""
    jp, pk = homes
    _pin(jp, pk, tmp_path)
    set_rule(jp, "keys-rotate", 2)
    code, added, err = client(jp, jp.token, "users", "add", "second", "--role", "admin")
    assert code == 0, err
    code, rotated, err = client(jp, added["token"], "users", "rotate-token")
    assert code == 0, err
    code, made, err = client(
        jp, rotated["token"], "approvals", "propose", "keys-rotate", "--reason", "yearly"
    )
    assert code == 0, err
    code, answer, _err = client(jp, jp.token, "approvals", "approve", made["proposal_id"], "--yes")
    assert code == 1
    assert answer["error"]["reason"] == "approval.not-distinct"
    assert own_state(jp) == (1, 0)


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
    assert {u["name"]: u["token_holders"] for u in listed} == {
        "admin": ["admin"],
        "asma": ["admin", "asma"],
    }
    code, text, err = jp.run("users", "list")
    assert code == 0, err
    assert "TOKEN ISSUED BY / ALSO HELD BY" in text
    assert "init / no one else" in text
    assert "admin / admin" in text


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
    # whoever held the first token could have rotated it: the holders stay
    assert holders(jp)["tanaka"] == ["admin", "tanaka"]


def test_a_name_that_reads_like_an_existing_users_is_refused(homes: tuple[Home, Home]) -> None:
    """The ledger names every actor: 'bi1al' beside 'bilal' would make it ambiguous. Refused
    through the API and on the host alike, and nothing is written."""
    jp, _pk = homes
    code, _added, err = client(jp, jp.token, "users", "add", "bilal", "--role", "officer")
    assert code == 0, err
    before = len(every_entry_text(jp).splitlines())
    code, answer, _err = client(jp, jp.token, "users", "add", "bi1al", "--role", "officer")
    assert code == 1
    assert "reads like the existing user 'bilal'" in answer["error"]["message"]
    code, _out, err = jp.run("users", "enrol", "b.ilal", "--role", "officer", "--json")
    assert code == 1
    assert "reads like the existing user 'bilal'" in err
    listed = client(jp, jp.token, "users", "list")[1]
    assert {u["name"] for u in listed} == {"admin", "bilal"}
    assert len(every_entry_text(jp).splitlines()) == before
