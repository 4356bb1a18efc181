"""The two-person rule over real nodes and databases (both engines).

Islamabad (pk) originates a case, Tokyo (jp) asks for consent to pass it to a
third party, and pk's officers grant under ``[approvals.consent-grant]``: the
grant happens exactly when k distinct, enabled officers holding the approver
capability approved the same terms before the proposal expired; never
earlier, never twice. A revocation under ``[approvals.consent-revoke]`` the
same way, approved by any officer.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from gateway.cli import approvals_cmd
from gateway.cli.main import cli
from gateway.core.approvals import terms_hash
from gateway.core.roles import Actor, Role
from gateway.errors import ConsentRefused, GatewayError, InvalidInput, RefusedError
from gateway.node import approvals
from gateway.node.consent import protocol as consent_protocol
from gateway.node.consent import queries as consent_queries
from gateway.node.context import NodeContext
from gateway.node.runtime import utc_now
from gateway.node.users import (
    add_user,
    authenticate,
    disable_user,
    enrol_user,
    list_users,
    reissue_token,
    rotate_own_token,
    set_approver,
)
from gateway.store.models_approvals import ApprovalProposal
from gateway.store.models_consent import (
    ConsentApplied,
    ConsentGrantRecord,
    ConsentRequestRecord,
    ConsentRevocationRecord,
)
from gateway.store.models_exchange import OutboxEntry
from tests.integration.test_consent import (  # noqa: F401  (fixtures)
    EMBASSY,
    NOW,
    PASSPHRASE,
    PURPOSE,
    Pair,
    Side,
    _officer_env,
    _run,
    clock,
    deliver,
    do_disclose,
    entries,
    pair,
    send_case_to_peer,
)
from tests.node_api import serve_node
from tests.policies import set_approvals as set_policy_approvals

OFFICERS = ("asma", "bilal", "chaudhry", "dur")
"""Officers holding the approver capability; ``clerk`` is an officer without it."""
ADMIN = Actor(name="root-admin", role=Role.ADMIN)


def set_approvals(side: Side, k: int, hours: int = 72) -> None:
    set_policy_approvals(side.node.settings.policy_dir, "consent-grant", k, hours=hours)


def own_officer_env(side: Side, name: str) -> dict[str, str]:
    """An officer the host operator enrolled (``gateway users enrol``, with the
    passphrase and no token), so no one else holds the token; the CLI environment
    of the officer, with that token and no passphrase."""
    home = str(side.node.settings.home)
    host = {"GATEWAY_HOME": home, "GATEWAY_PASSPHRASE": PASSPHRASE}
    enrolled = _run(host, "users", "enrol", name, "--role", "officer", "--json")
    assert enrolled.exit_code == 0, enrolled.output
    made = json.loads(enrolled.stdout)
    assert (made["name"], made["role"]) == (name, "officer")
    serve_node(side.node, lambda: side.keyring)  # user commands reach the running node
    return {"GATEWAY_HOME": home, "GATEWAY_TOKEN": made["token"]}


def officer(name: str) -> Actor:
    return Actor(name=name, role=Role.OFFICER)


def add_people(side: Side, now: Any) -> None:
    """The officers and an administrator, each enrolled by the host operator
    (``users enrol``), so no one else holds their tokens and their approvals count
    as distinct people."""
    with side.node.db.transaction() as session:
        for name in OFFICERS:
            enrol_user(session, name, now=now, role="officer", approver=True)
        enrol_user(session, "clerk", now=now, role="officer")
        enrol_user(session, "root-admin", now=now, role="admin")


def give_approver(side: Side, name: str, on: bool = True) -> None:
    with side.node.db.transaction() as session:
        set_approver(session, name, on, now=NOW, by=ADMIN)


def asked_of_pk(pair: Pair, *, when: Any = NOW) -> tuple[str, str]:
    """pk sends a case to jp; jp asks pk's consent; the request reaches pk."""
    case_id = send_case_to_peer(pair.pk, pair.jp, when=when)
    asked = consent_protocol.request_consent(
        NodeContext(pair.jp.node, pair.jp.keyring),
        pair.jp.officer,
        [case_id],
        EMBASSY,
        PURPOSE,
        now=when,
    )
    deliver(pair.jp, pair.pk, asked.bundle_id, when=when)
    return case_id, asked.request_id


def propose(pair: Pair, request_id: str, by: str = "asma", **kw: Any) -> dict[str, Any]:
    return approvals.grant_consent(
        NodeContext(pair.pk.node, pair.pk.keyring),
        officer(by),
        request_id,
        valid_until=None,
        max_uses=kw.get("max_uses", 3),
        conditions="Only for the screening named.",
        now=kw.get("now", NOW),
    )


def approve(pair: Pair, proposal_id: str, who: Actor, **kw: Any) -> dict[str, Any]:
    return approvals.approve(
        NodeContext(pair.pk.node, pair.pk.keyring),
        who,
        proposal_id,
        terms_sha256=kw.get("terms"),
        now=kw.get("now", NOW),
    )


def race_to_approve(pair: Pair, proposal_id: str, names: tuple[str, ...]) -> list[Any]:
    """Each named officer approves ``proposal_id`` in a thread of its own, all
    released at once; the answers' states, or the refusals' reasons."""
    start = threading.Barrier(len(names))
    outcomes: list[Any] = []

    def racer(name: str) -> None:
        start.wait()
        try:
            outcomes.append(approve(pair, proposal_id, officer(name))["state"])
        except RefusedError as exc:
            outcomes.append(exc.reason)

    threads = [threading.Thread(target=racer, args=(n,)) for n in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return outcomes


def grants(side: Side) -> int:
    with side.node.db.transaction() as session:
        return int(session.scalar(select(func.count()).select_from(ConsentGrantRecord)) or 0)


def grant_bundles(side: Side) -> int:
    with side.node.db.transaction() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(OutboxEntry)
                .where(OutboxEntry.case_type == "consent-grant")
            )
            or 0
        )


def refused(reason: str, work: Any) -> None:
    with pytest.raises(GatewayError) as caught:
        work()
    assert caught.value.reason == reason, caught.value


@pytest.mark.parametrize("k", [1, 2, 3])
def test_grant_happens_exactly_at_the_kth_distinct_enabled_officer(pair: Pair, k: int) -> None:
    set_approvals(pair.pk, k)
    add_people(pair.pk, NOW)
    _case_id, request_id = asked_of_pk(pair)
    made = propose(pair, request_id)
    if k == 1:
        assert made["state"] == "executed"
        assert made["consent_id"]
        assert grants(pair.pk) == 1
        return
    assert (made["state"], made["approvals"], made["needed"]) == ("pending", 1, k)
    pid = made["proposal_id"]
    assert grants(pair.pk) == 0
    assert grant_bundles(pair.pk) == 0
    # the proposer may not approve twice; an administrator may not approve consent
    refused("approval.already-approved", lambda: approve(pair, pid, officer("asma")))
    refused(
        "approval.not-approver",
        lambda: approve(pair, pid, Actor(name="root-admin", role=Role.ADMIN)),
    )
    refused("approval.terms-changed", lambda: approve(pair, pid, officer("bilal"), terms="0" * 64))
    # an officer without the approver capability may not approve
    refused("approval.not-approver", lambda: approve(pair, pid, officer("clerk")))
    if k == 3:
        # dur approves, then is disabled: dur's approval no longer counts
        assert approve(pair, pid, officer("dur"))["approvals"] == 2
        with pair.pk.node.db.transaction() as session:
            disable_user(session, "dur", now=NOW, by=ADMIN)
        assert approve(pair, pid, officer("bilal"))["state"] == "pending"
        assert grants(pair.pk) == 0
        done = approve(pair, pid, officer("chaudhry"))
        assert done["counted"] == ["asma", "bilal", "chaudhry"]
    else:
        done = approve(pair, pid, officer("bilal"))
        assert done["counted"] == ["asma", "bilal"]
    assert done["state"] == "executed"
    assert grants(pair.pk) == 1
    assert grant_bundles(pair.pk) == 1
    # never twice
    refused("approval.decided", lambda: approve(pair, pid, officer("dur" if k == 2 else "asma")))
    assert grants(pair.pk) == 1
    kinds = [
        str(e.kind)
        for e in entries(pair.pk)
        if str(e.kind).startswith("approval-") and str(e.kind) != "approval-rules"
    ]
    assert kinds[0] == "approval-proposed"
    assert kinds[-1] == "approval-executed"
    assert kinds.count("approval-executed") == 1
    (executed,) = entries(pair.pk, "approval-executed")
    assert executed.actor_name == ("chaudhry" if k == 3 else "bilal")
    assert json.loads(executed.canonical)["body"]["approvers"] == done["counted"]
    listing = consent_queries.list_consents(NodeContext(pair.pk.node, pair.pk.keyring), now=NOW)
    assert listing["consents"][0]["approvers"] == done["counted"]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_only_officers_holding_the_approver_capability_count(pair: Pair, k: int) -> None:
    """Proposing needs only the officer role; approving needs the capability, and
    an approval stops counting when the capability is taken away (docs/consent.md)."""
    set_approvals(pair.pk, k)
    add_people(pair.pk, NOW)
    _case_id, request_id = asked_of_pk(pair)
    made = propose(pair, request_id, by="clerk")
    if k == 1:  # one person: no approval step, the capability is not asked for
        assert made["state"] == "executed"
        assert grants(pair.pk) == 1
        return
    # clerk's proposal carries no approval of clerk's
    assert (made["state"], made["approvals"], made["approvers"]) == ("pending", 0, [])
    pid = made["proposal_id"]
    refused("approval.not-approver", lambda: approve(pair, pid, officer("clerk")))
    # bilal approves, then loses the capability: bilal's approval no longer counts
    assert approve(pair, pid, officer("bilal"))["approvals"] == 1
    give_approver(pair.pk, "bilal", on=False)
    names = OFFICERS[2 : 2 + k - 1]  # chaudhry (and dur)
    for name in names[:-1]:
        assert approve(pair, pid, officer(name))["state"] == "pending"
    last = approve(pair, pid, officer(names[-1]))
    assert last["state"] == "pending"
    assert grants(pair.pk) == 0
    # clerk given the capability now approves and completes it
    give_approver(pair.pk, "clerk")
    done = approve(pair, pid, officer("clerk"))
    assert done["state"] == "executed"
    assert done["counted"] == sorted(["clerk", *names])
    assert grants(pair.pk) == 1
    assert grant_bundles(pair.pk) == 1
    changes = [
        (e.actor_name, json.loads(e.canonical)["body"])
        for e in entries(pair.pk, "approver-changed")
    ]
    assert changes[-2:] == [
        ("root-admin", {"user": "bilal", "approver": False}),
        ("root-admin", {"user": "clerk", "approver": True}),
    ]


def test_expired_and_rejected_proposals_never_execute(pair: Pair) -> None:
    set_approvals(pair.pk, 2, hours=1)
    add_people(pair.pk, NOW)
    _case_id, request_id = asked_of_pk(pair)
    late = propose(pair, request_id)["proposal_id"]
    refused(
        "approval.expired",
        lambda: approve(pair, late, officer("bilal"), now=NOW + timedelta(hours=1)),
    )
    with pair.pk.node.db.transaction() as session:
        assert session.get(ApprovalProposal, late).state == "expired"  # type: ignore[union-attr]
    assert [e.actor_name for e in entries(pair.pk, "approval-expired")] == ["system"]

    turned = propose(pair, request_id, by="bilal")["proposal_id"]
    approvals.reject(pair.pk.node, officer("chaudhry"), turned, reason="wrong purpose", now=NOW)
    refused("approval.decided", lambda: approve(pair, turned, officer("asma")))
    assert grants(pair.pk) == 0
    (rejected,) = entries(pair.pk, "approval-rejected")
    assert rejected.actor_name == "chaudhry"
    assert json.loads(rejected.canonical)["body"]["reason"] == "wrong purpose"


def test_concurrent_approvals_execute_once(pair: Pair) -> None:
    set_approvals(pair.pk, 2)
    add_people(pair.pk, NOW)
    _case_id, request_id = asked_of_pk(pair)
    pid = propose(pair, request_id)["proposal_id"]
    outcomes = race_to_approve(pair, pid, ("bilal", "chaudhry", "dur"))
    assert outcomes.count("executed") == 1, outcomes
    assert all(o in ("executed", "approval.decided", "consent.decided") for o in outcomes)
    assert grants(pair.pk) == 1
    assert grant_bundles(pair.pk) == 1
    assert len(entries(pair.pk, "approval-executed")) == 1
    assert len(entries(pair.pk, "consent-granted")) == 1


@pytest.mark.parametrize("clock", [None], indirect=True)
def test_end_to_end_two_officers_grant_and_tokyo_discloses(pair: Pair, tmp_path: Path) -> None:
    """consent-grant = 2 on Islamabad: one officer's grant waits, Tokyo stays blocked;
    the second officer's approval sends the grant naming both; Tokyo then discloses."""
    set_approvals(pair.pk, 2)
    now = utc_now()
    case_id, request_id = asked_of_pk(pair, when=now)
    first = own_officer_env(pair.pk, "asma")
    second = own_officer_env(pair.pk, "bilal")
    with pair.pk.node.db.transaction() as session:
        # the approver capability, given by an administrator
        for name in ("asma", "bilal"):
            set_approver(session, name, True, now=now, by=ADMIN)

    granted = _run(first, "consent", "grant", request_id, "--max-uses", "2")
    assert granted.exit_code == 0, granted.output
    assert "1 of 2 approvals" in granted.output
    listed = json.loads(_run(second, "approvals", "list", "--json").stdout)
    (proposal,) = listed
    assert (proposal["state"], proposal["approvers"]) == ("pending", ["asma"])
    assert grant_bundles(pair.pk) == 0
    with pytest.raises(ConsentRefused, match="no consent"):
        do_disclose(pair.jp, [case_id], tmp_path / "blocked", now=utc_now())

    again = _run(first, "approvals", "approve", proposal["proposal_id"], "--yes", "--json")
    assert again.exit_code == 1
    assert "approval.already-approved" in again.stdout

    done = _run(
        second,
        "approvals",
        "approve",
        proposal["proposal_id"],
        "--terms",
        proposal["terms_sha256"],
    )
    assert done.exit_code == 0, done.output
    assert "executed" in done.output
    with pair.pk.node.db.transaction() as session:
        (bundle_id,) = session.scalars(
            select(OutboxEntry.bundle_id).where(OutboxEntry.case_type == "consent-grant")
        ).all()
    deliver(pair.pk, pair.jp, bundle_id, when=utc_now())

    result = do_disclose(pair.jp, [case_id], tmp_path / "out", now=utc_now())
    assert result.kind == "disclosure-made"
    held = consent_queries.list_consents(NodeContext(pair.jp.node, pair.jp.keyring), now=utc_now())
    (consent,) = held["consents"]
    assert consent["direction"] == "received"
    assert consent["approvers"] == ["asma", "bilal"]
    assert consent["granting_officer"] == "asma"
    shown = _run(_officer_env(pair.jp, "tanaka"), "consent", "list")
    assert "approved by asma, bilal" in shown.output
    (stored,) = entries(pair.jp, "consent-granted")
    assert json.loads(stored.canonical)["body"]["approvers"] == ["asma", "bilal"]
    kinds = [str(e.kind) for e in entries(pair.pk)]
    assert kinds.count("approval-given") == 2
    assert kinds.count("approval-executed") == 1
    assert stored is not None


# --- consent-revoke: default 1 (revoking stays fast), a policy may raise it ----------


def set_rule(side: Side, action: str, k: int) -> None:
    set_policy_approvals(side.node.settings.policy_dir, action, k)


def revocations(side: Side) -> tuple[int, int]:
    """(revocations recorded, revocation bundles queued for the peer)."""
    with side.node.db.transaction() as session:
        recorded = session.scalar(select(func.count()).select_from(ConsentRevocationRecord))
        queued = session.scalar(
            select(func.count())
            .select_from(OutboxEntry)
            .where(OutboxEntry.case_type == "consent-revocation")
        )
    return int(recorded or 0), int(queued or 0)


def revoke(pair: Pair, consent_id: str, by: str = "asma", reason: str = "purpose ended") -> Any:
    return approvals.revoke_consent(
        NodeContext(pair.pk.node, pair.pk.keyring), officer(by), consent_id, reason=reason, now=NOW
    )


@pytest.mark.parametrize("k", [1, 2])
def test_revocation_happens_exactly_at_the_kth_distinct_officer(pair: Pair, k: int) -> None:
    add_people(pair.pk, NOW)
    _case_id, request_id = asked_of_pk(pair)
    consent_id = propose(pair, request_id)["consent_id"]  # consent-grant k = 1: granted
    set_rule(pair.pk, "consent-revoke", k)
    made = revoke(pair, consent_id, by="clerk")  # any officer; no capability needed
    if k == 1:
        assert made["state"] == "executed"
        assert made["consent_id"] == consent_id
        assert revocations(pair.pk) == (1, 1)
        assert not entries(pair.pk, "approval-proposed")
        return
    assert (made["state"], made["approvals"], made["needed"]) == ("pending", 1, 2)
    terms = dict(made["terms"])
    assert len(terms.pop("nonce")) == 32  # hashed with the terms: the ledger's hash is unguessable
    assert terms == {
        "consent_id": consent_id,
        "request_id": request_id,
        "reason": "purpose ended",
    }
    pid = made["proposal_id"]
    assert revocations(pair.pk) == (0, 0)  # nothing recorded, nothing sent yet
    refused("approval.already-approved", lambda: approve(pair, pid, officer("clerk")))
    refused("approval.not-approver", lambda: approve(pair, pid, ADMIN))
    # a second proposal for the same consent waits too; revoking twice is refused later
    other = revoke(pair, consent_id, by="bilal", reason="other reason")["proposal_id"]
    done = approve(pair, pid, officer("asma"))
    assert done["state"] == "executed"
    assert done["counted"] == ["asma", "clerk"]
    assert revocations(pair.pk) == (1, 1)
    refused("approval.decided", lambda: approve(pair, pid, officer("bilal")))
    # the other proposal cannot revoke again: the consent is revoked already
    refused("consent.revoked", lambda: approve(pair, other, officer("chaudhry")))
    refused("consent.revoked", lambda: revoke(pair, consent_id))
    assert revocations(pair.pk) == (1, 1)
    (executed,) = entries(pair.pk, "approval-executed")
    body = json.loads(executed.canonical)["body"]
    assert (body["approvers"], body["consent_id"], body["action"]) == (
        ["asma", "clerk"],
        consent_id,
        "consent-revoke",
    )
    (revoked,) = entries(pair.pk, "consent-revoked")
    assert revoked.actor_name == "clerk"  # the proposer is the revoking officer


def test_concurrent_revocation_approvals_execute_once(pair: Pair) -> None:
    add_people(pair.pk, NOW)
    _case_id, request_id = asked_of_pk(pair)
    consent_id = propose(pair, request_id)["consent_id"]
    set_rule(pair.pk, "consent-revoke", 2)
    pid = revoke(pair, consent_id)["proposal_id"]
    outcomes = race_to_approve(pair, pid, ("bilal", "chaudhry", "dur"))
    assert outcomes.count("executed") == 1, outcomes
    assert all(o in ("executed", "approval.decided", "consent.revoked") for o in outcomes)
    assert revocations(pair.pk) == (1, 1)
    assert len(entries(pair.pk, "approval-executed")) == 1
    assert len(entries(pair.pk, "consent-revoked")) == 1


@pytest.mark.parametrize("clock", [None], indirect=True)
def test_cli_revocation_with_k_2_answers_with_the_proposal(pair: Pair) -> None:
    now = utc_now()
    _case_id, request_id = asked_of_pk(pair, when=now)
    first = own_officer_env(pair.pk, "asma")
    second = own_officer_env(pair.pk, "bilal")
    granted = json.loads(_run(first, "consent", "grant", request_id, "--json").stdout)
    assert granted["state"] == "executed"
    set_rule(pair.pk, "consent-revoke", 2)
    asked = _run(first, "consent", "revoke", granted["consent_id"], "--reason", "ended")
    assert asked.exit_code == 0, asked.output
    assert "1 of 2 approvals" in asked.output
    assert revocations(pair.pk) == (0, 0)
    (proposal,) = json.loads(_run(second, "approvals", "list", "--json").stdout)
    assert (proposal["action"], proposal["state"]) == ("consent-revoke", "pending")
    shown = _run(second, "approvals", "list").output
    assert f"{proposal['proposal_id']}  consent-revoke  pending" in shown
    lines = [" ".join(line.split()) for line in shown.splitlines()]
    for line in (f"consent {granted['consent_id']}", "reason 'ended'", "approvals 1 of 2 (asma)"):
        assert line in lines, shown
    # not on a terminal and no --yes: nobody approves terms they were not shown
    blind = _run(second, "approvals", "approve", proposal["proposal_id"])
    assert blind.exit_code == 2
    assert "needs you to see its terms" in blind.output
    assert revocations(pair.pk) == (0, 0)
    done = _run(second, "approvals", "approve", proposal["proposal_id"], "--yes")
    assert done.exit_code == 0, done.output
    assert "executed" in done.output
    assert revocations(pair.pk) == (1, 1)


# --- what an approver sees is what they approve; the proposal is checked up front ---------


def raise_k(side: Side, action: str, k: int) -> None:
    """Rewrite the policy's k of ``action`` (the table must be there already)."""
    path = side.node.settings.policy_dir / "policy.toml"
    head, _sep, tail = path.read_text().partition(f"[approvals.{action}]\nk = ")
    rest = tail.split("\n", 1)[1]
    path.write_text(f"{head}[approvals.{action}]\nk = {k}\n# raised while proposals wait\n{rest}")


def test_raising_k_holds_back_a_waiting_proposal(pair: Pair) -> None:
    set_approvals(pair.pk, 2)
    add_people(pair.pk, NOW)
    _case_id, request_id = asked_of_pk(pair)
    pid = propose(pair, request_id)["proposal_id"]
    raise_k(pair.pk, "consent-grant", 3)
    second = approve(pair, pid, officer("bilal"))
    assert (second["state"], second["approvals"], second["needed"]) == ("pending", 2, 3)
    assert grants(pair.pk) == 0
    (listed,) = approvals.list_proposals(pair.pk.node, officer("dur"), now=NOW)
    assert listed.needed == 3
    done = approve(pair, pid, officer("chaudhry"))
    assert done["state"] == "executed"
    assert done["counted"] == ["asma", "bilal", "chaudhry"]
    assert grants(pair.pk) == 1


def test_proposal_of_a_disabled_proposer_never_executes(pair: Pair) -> None:
    set_approvals(pair.pk, 2)
    add_people(pair.pk, NOW)
    _case_id, request_id = asked_of_pk(pair)
    # clerk proposes without approving (no capability); two approvers would complete it
    pid = propose(pair, request_id, by="clerk")["proposal_id"]
    assert approve(pair, pid, officer("bilal"))["state"] == "pending"
    with pair.pk.node.db.transaction() as session:
        disable_user(session, "clerk", now=NOW, by=ADMIN)
    refused("approval.proposer-disabled", lambda: approve(pair, pid, officer("chaudhry")))
    assert grants(pair.pk) == 0
    assert grant_bundles(pair.pk) == 0
    assert not entries(pair.pk, "approval-executed")
    # the proposer's own approval stops counting too, like any disabled approver's
    own = propose(pair, request_id, by="asma")["proposal_id"]
    with pair.pk.node.db.transaction() as session:
        disable_user(session, "asma", now=NOW, by=ADMIN)
    (view,) = [
        v
        for v in approvals.list_proposals(pair.pk.node, officer("dur"), now=NOW)
        if v.proposal_id == own
    ]
    assert view.counted == ()
    refused("approval.proposer-disabled", lambda: approve(pair, own, officer("dur")))
    assert grants(pair.pk) == 0


@pytest.mark.parametrize(("k", "holders", "short"), [(2, 4, 0), (3, 2, 1), (3, 0, 3)])
def test_a_proposal_fewer_users_could_approve_than_it_needs_carries_a_warning(
    pair: Pair, k: int, holders: int, short: int
) -> None:
    set_approvals(pair.pk, k)
    add_people(pair.pk, NOW)
    for name in OFFICERS[holders:]:
        give_approver(pair.pk, name, on=False)
    _case_id, request_id = asked_of_pk(pair)
    made = propose(pair, request_id, by="clerk")
    assert made["state"] == "pending"
    if not short:
        assert "warning" not in made
        return
    assert (
        f"needs {k} approvers but only {holders} user(s) could ever approve it" in (made["warning"])
    )
    assert f"{short} more must be added or enabled" in made["warning"]


def test_a_grant_whose_validity_passed_while_waiting_expires_and_sends_nothing(
    pair: Pair,
) -> None:
    set_approvals(pair.pk, 2, hours=72)
    add_people(pair.pk, NOW)
    _case_id, request_id = asked_of_pk(pair)
    made = approvals.grant_consent(
        NodeContext(pair.pk.node, pair.pk.keyring),
        officer("asma"),
        request_id,
        valid_until=NOW + timedelta(hours=2),
        max_uses=1,
        conditions="",
        now=NOW,
    )
    pid = made["proposal_id"]
    later = NOW + timedelta(hours=3)  # the proposal itself would wait 72 hours
    with pytest.raises(RefusedError) as caught:
        approve(pair, pid, officer("bilal"), now=later)
    assert caught.value.reason == "approval.expired"
    assert pid in str(caught.value)
    assert "validity" in str(caught.value)
    assert "--valid-until" not in str(caught.value)
    with pair.pk.node.db.transaction() as session:
        assert session.get(ApprovalProposal, pid).state == "expired"  # type: ignore[union-attr]
    assert grants(pair.pk) == 0
    assert grant_bundles(pair.pk) == 0
    (expired,) = entries(pair.pk, "approval-expired")
    assert expired.actor_name == "system"
    assert json.loads(expired.canonical)["body"]["proposal_id"] == pid


@pytest.mark.parametrize("bad", ["\x00", "a" * 5000, "not-a-uuid", "1" * 64, ""])
def test_a_proposal_id_that_is_no_uuid_is_refused_before_any_lookup(pair: Pair, bad: str) -> None:
    set_approvals(pair.pk, 2)
    add_people(pair.pk, NOW)
    ctx = NodeContext(pair.pk.node, pair.pk.keyring)
    with pytest.raises(InvalidInput, match="UUID"):
        approvals.approve(ctx, officer("bilal"), bad, terms_sha256=None, now=NOW)
    with pytest.raises(InvalidInput, match="UUID"):
        approvals.reject(pair.pk.node, officer("bilal"), bad, reason="no", now=NOW)
    with pytest.raises(InvalidInput, match="UUID"):
        approvals.show_proposal(pair.pk.node, officer("bilal"), bad, now=NOW)


def _api(url: str, token: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("clock", [None], indirect=True)
def test_api_approval_names_the_reviewed_terms_and_ids_are_uuids(pair: Pair) -> None:
    set_approvals(pair.pk, 2)
    now = utc_now()
    _case_id, request_id = asked_of_pk(pair, when=now)
    first = own_officer_env(pair.pk, "asma")
    second = own_officer_env(pair.pk, "bilal")
    with pair.pk.node.db.transaction() as session:
        for name in ("asma", "bilal"):
            set_approver(session, name, True, now=now, by=ADMIN)
    url = serve_node(pair.pk.node, lambda: pair.pk.keyring).add_tcp()
    token = second["GATEWAY_TOKEN"]
    granted = _run(first, "consent", "grant", request_id, "--json")
    pid = json.loads(granted.stdout)["proposal_id"]
    for bad in ("%00", "a" * 3000, "not-a-uuid", pid + "0"):
        for method, path, body in (
            ("GET", f"/api/v1/approvals/{bad}", None),
            ("POST", f"/api/v1/approvals/{bad}/approve", {"terms_sha256": "0" * 64}),
            ("POST", f"/api/v1/approvals/{bad}/reject", {"reason": "no"}),
        ):
            status, answer = _api(url, token, method, path, body)
            assert (status, answer["error"]["reason"]) == (422, "invalid-input"), (bad, answer)
            assert "UUID" in answer["error"]["message"]
    status, shown = _api(url, token, "GET", f"/api/v1/approvals/{pid}")
    assert status == 200
    terms = dict(shown["terms"])
    nonce = terms.pop("nonce")
    # the hash covers the nonce: the terms alone do not give the ledger's hash
    assert terms_hash({**terms, "nonce": nonce}) == shown["terms_sha256"]
    assert terms_hash(terms) != shown["terms_sha256"]
    (proposed,) = entries(pair.pk, "approval-proposed")
    assert json.loads(proposed.canonical)["body"]["terms_sha256"] == shown["terms_sha256"]
    # an approval must name the terms it approves
    status, answer = _api(url, token, "POST", f"/api/v1/approvals/{pid}/approve", {})
    assert (status, answer["error"]["reason"]) == (422, "invalid-input")
    assert "terms_sha256" in answer["error"]["message"]
    status, answer = _api(
        url, token, "POST", f"/api/v1/approvals/{pid}/approve", {"terms_sha256": "1" * 64}
    )
    assert (status, answer["error"]["reason"]) == (409, "approval.terms-changed")
    assert grant_bundles(pair.pk) == 0
    status, answer = _api(
        url, token, "POST", f"/api/v1/approvals/{pid}/reject", {"reason": "x" * 2001}
    )
    assert (status, answer["error"]["reason"]) == (422, "invalid-input")
    status, done = _api(
        url,
        token,
        "POST",
        f"/api/v1/approvals/{pid}/approve",
        {"terms_sha256": shown["terms_sha256"]},
    )
    assert (status, done["state"]) == (200, "executed")
    assert grant_bundles(pair.pk) == 1


@pytest.mark.parametrize("clock", [None], indirect=True)
def test_cli_list_and_show_print_every_term_and_approve_asks_on_a_terminal(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_approvals(pair.pk, 2)
    now = utc_now()
    _case_id, request_id = asked_of_pk(pair, when=now)
    first = own_officer_env(pair.pk, "asma")
    second = own_officer_env(pair.pk, "bilal")
    with pair.pk.node.db.transaction() as session:
        for name in ("asma", "bilal"):
            set_approver(session, name, True, now=now, by=ADMIN)
    granted = _run(
        first, "consent", "grant", request_id, "--max-uses", "2", "--conditions", "Only visas."
    )
    assert granted.exit_code == 0, granted.output
    (proposal,) = json.loads(_run(second, "approvals", "list", "--json").stdout)
    terms = proposal["terms"]
    listed = _run(second, "approvals", "list").output
    lines = [" ".join(line.split()) for line in listed.splitlines()]
    for expected in (
        f"request {request_id}",
        f"items {', '.join(terms['items'])}",
        f"recipient {terms['third_party']!r}",
        f"purpose {terms['purpose']!r}",
        "uses at most 2",
        "conditions 'Only visas.'",
        "proposed by asma",
        "approvals 1 of 2 (asma)",
        f"terms sha256 {proposal['terms_sha256']}",
    ):
        assert expected in lines, (expected, listed)
    assert any(line.startswith("valid until ") for line in lines)
    assert any(line.startswith("expires ") for line in lines)
    shown = _run(second, "approvals", "show", proposal["proposal_id"])
    assert shown.exit_code == 0, shown.output
    assert f"nonce {terms['nonce']}" in [" ".join(x.split()) for x in shown.output.splitlines()]
    assert json.loads(
        _run(second, "approvals", "show", proposal["proposal_id"], "--json").stdout
    ) == {**proposal}
    bad = _run(second, "approvals", "show", "no-uuid\x00")
    assert bad.exit_code == 2
    assert "is no proposal id" in bad.output
    # on a terminal: the terms are shown and a "no" approves nothing
    terminal = SimpleNamespace(stdin=SimpleNamespace(isatty=lambda: True))
    monkeypatch.setattr(approvals_cmd, "sys", terminal)
    declined = CliRunner().invoke(
        cli, ["approvals", "approve", proposal["proposal_id"]], env=second, input="n\n"
    )
    assert declined.exit_code == 1
    assert proposal["terms_sha256"] in declined.stderr
    assert "Only visas." in declined.stderr
    assert grant_bundles(pair.pk) == 0
    agreed = CliRunner().invoke(
        cli, ["approvals", "approve", proposal["proposal_id"]], env=second, input="y\n"
    )
    assert agreed.exit_code == 0, agreed.output
    assert "executed" in agreed.stdout
    assert grant_bundles(pair.pk) == 1


def test_help_says_a_grant_under_the_rule_becomes_a_proposal_and_where_the_reason_goes() -> None:
    grant = CliRunner().invoke(cli, ["consent", "grant", "--help"])
    assert grant.exit_code == 0
    text = " ".join(grant.output.split())
    assert "k > 1" in text
    assert "becomes a proposal" in text
    assert "gateway approvals list" in text
    propose = CliRunner().invoke(cli, ["approvals", "propose", "--help"])
    assert "approval-proposed entry" in " ".join(propose.output.split())


# --- token custody: one person who could hold two tokens approves once ---------------------


def approval_givers(side: Side) -> list[str]:
    return [str(e.actor_name) for e in entries(side, "approval-given")]


def test_an_administrator_who_adds_two_approvers_cannot_grant_consent_as_both(
    pair: Pair,
) -> None:
    """H1 of the attack review: root-admin adds farah and gul with --approver and, before
    they do, rotates both first tokens. Rotating does not take a token out of its
    issuer's hands: gul's approval of farah's proposal is refused (root-admin could
    hold both tokens) and nothing is granted; an approver no one else could stand in
    for completes it."""
    set_approvals(pair.pk, 2)
    add_people(pair.pk, NOW)
    for name in ("farah", "gul"):
        added = approvals.add_user_or_propose(
            pair.pk.node, ADMIN, name, "officer", now=NOW, approver=True
        )
        assert (added["approver"], added["state"]) == (True, "executed")
        with pair.pk.node.db.transaction() as session:
            rotate_own_token(session, officer(name), now=NOW)
    _case_id, request_id = asked_of_pk(pair)
    made = propose(pair, request_id, by="farah")
    assert (made["state"], made["approvers"]) == ("pending", ["farah"])
    pid = made["proposal_id"]

    refused("approval.not-distinct", lambda: approve(pair, pid, officer("gul")))
    assert (grants(pair.pk), grant_bundles(pair.pk)) == (0, 0)
    assert approval_givers(pair.pk) == ["farah"]
    with pytest.raises(RefusedError, match="root-admin could hold both gul's token"):
        approve(pair, pid, officer("gul"))

    done = approve(pair, pid, officer("asma"))  # enrolled by the host: hers alone
    assert (done["state"], done["counted"]) == ("executed", ["asma", "farah"])
    assert grants(pair.pk) == 1
    (added_entry, _second) = entries(pair.pk, "user-added")
    assert added_entry.actor_name == ADMIN.name
    assert json.loads(added_entry.canonical)["body"] == {
        "user": "farah",
        "role": "officer",
        "approver": True,
        "by": ADMIN.name,
    }
    assert added["token"] not in "".join(e.canonical.decode() for e in entries(pair.pk))


def test_enrolment_by_the_host_gives_a_token_no_one_else_holds(pair: Pair) -> None:
    """The host operator re-enrols an officer an administrator added: the old token stops
    working, only the officer holds the new one, and their approval now counts beside
    one the administrator's other officer gives."""
    set_approvals(pair.pk, 2)
    add_people(pair.pk, NOW)
    for name in ("farah", "gul"):
        approvals.add_user_or_propose(pair.pk.node, ADMIN, name, "officer", now=NOW, approver=True)
    with pair.pk.node.db.transaction() as session:
        again = enrol_user(session, "gul", now=NOW)
    assert (again.role, again.approver) == (Role.OFFICER, True)
    with pair.pk.node.db.transaction() as session:
        views = {v.name: v for v in list_users(session)}
    assert views["gul"].token_holders == ("gul",)
    assert views["gul"].token_issued_by == "host"
    assert views["farah"].token_holders == ("farah", "root-admin")
    _case_id, request_id = asked_of_pk(pair)
    pid = propose(pair, request_id, by="farah")["proposal_id"]
    done = approve(pair, pid, officer("gul"))
    assert (done["state"], done["counted"]) == ("executed", ["farah", "gul"])
    enrolled = entries(pair.pk, "user-enrolled")
    assert len(enrolled) == 7  # the six of add_people, then gul again
    assert {(e.actor_name, e.actor_role) for e in enrolled} == {("host", None)}
    assert json.loads(enrolled[-1].canonical)["body"] == {
        "user": "gul",
        "role": "officer",
        "approver": True,
        "created": False,
    }


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (("nobody-new",), "is new: give --role"),
        (("asma", "--role", "admin"), "exists with role officer"),
        (("system", "--role", "officer"), "is reserved"),
        (("host", "--role", "admin"), "is reserved"),
        (("root-admin", "--approver"), "only officers hold the approver capability"),
    ],
)
def test_enrolment_refuses_what_it_cannot_do_and_writes_nothing(
    pair: Pair, args: tuple[str, ...], reason: str
) -> None:
    add_people(pair.pk, NOW)
    before = len(entries(pair.pk))
    host = {"GATEWAY_HOME": str(pair.pk.node.settings.home), "GATEWAY_PASSPHRASE": PASSPHRASE}
    result = _run(host, "users", "enrol", *args)
    assert result.exit_code == 1, result.output  # invalid input (SPEC exit codes)
    assert reason in result.output
    assert len(entries(pair.pk)) == before


def test_enrolment_needs_the_keystore_passphrase(pair: Pair) -> None:
    home = str(pair.pk.node.settings.home)
    wrong = _run(
        {"GATEWAY_HOME": home, "GATEWAY_PASSPHRASE": "not the passphrase"},
        "users",
        "enrol",
        "zara",
        "--role",
        "officer",
    )
    assert wrong.exit_code != 0
    assert "ssw_" not in wrong.output
    with pair.pk.node.db.transaction() as session:
        assert "zara" not in {v.name for v in list_users(session)}


def test_an_administrator_who_reissues_a_token_cannot_approve_beside_it(pair: Pair) -> None:
    """H2 of the attack review, for consent grants: a token an administrator reissued
    is held by that administrator too, so it never counts beside an approval the
    administrator could give, even after its holder rotated it."""
    set_approvals(pair.pk, 2)
    add_people(pair.pk, NOW)
    with pair.pk.node.db.transaction() as session:
        reissue_token(session, "bilal", now=NOW, by=officer_admin("root-admin"))
        reissue_token(session, "chaudhry", now=NOW, by=officer_admin("root-admin"))
        rotate_own_token(session, officer("bilal"), now=NOW)
    _case_id, request_id = asked_of_pk(pair)
    pid = propose(pair, request_id, by="bilal")["proposal_id"]
    refused("approval.not-distinct", lambda: approve(pair, pid, officer("chaudhry")))
    assert grants(pair.pk) == 0
    done = approve(pair, pid, officer("dur"))
    assert (done["state"], done["counted"]) == ("executed", ["bilal", "dur"])


def officer_admin(name: str) -> Actor:
    return Actor(name=name, role=Role.ADMIN)


def test_one_officer_grants_alone_at_k_1_whoever_issued_the_token(pair: Pair) -> None:
    set_approvals(pair.pk, 1)
    add_people(pair.pk, NOW)
    with pair.pk.node.db.transaction() as session:
        add_user(session, "solo", "officer", created_by="root-admin", now=NOW)
    _case_id, request_id = asked_of_pk(pair)
    made = propose(pair, request_id, by="solo")
    assert made["state"] == "executed"
    assert grants(pair.pk) == 1


def test_a_token_reissued_after_approving_leaves_that_approval_counting(pair: Pair) -> None:
    """An approval is fixed when given: bilal approved with a token only he held; an
    administrator reissuing it later does not undo that approval (docs/consent.md),
    but bilal's later approvals never count beside that administrator's."""
    set_approvals(pair.pk, 3)
    add_people(pair.pk, NOW)
    _case_id, request_id = asked_of_pk(pair)
    pid = propose(pair, request_id)["proposal_id"]
    assert approve(pair, pid, officer("bilal"))["counted"] == ["asma", "bilal"]
    with pair.pk.node.db.transaction() as session:
        reissue_token(session, "bilal", now=NOW, by=ADMIN)
        reissue_token(session, "dur", now=NOW, by=ADMIN)
    _case_id, other_request = asked_of_pk(pair)
    other = propose(pair, other_request, by="dur")["proposal_id"]
    refused("approval.not-distinct", lambda: approve(pair, other, officer("bilal")))
    done = approve(pair, pid, officer("chaudhry"))
    assert (done["state"], done["counted"]) == ("executed", ["asma", "bilal", "chaudhry"])
    reissued = entries(pair.pk, "token-reissued")
    assert [json.loads(e.canonical)["body"] for e in reissued] == [
        {"user": "bilal", "by": ADMIN.name},
        {"user": "dur", "by": ADMIN.name},
    ]
    assert {e.actor_name for e in reissued} == {ADMIN.name}


def test_a_grant_whose_terms_changed_since_approval_is_not_signed(pair: Pair) -> None:
    """The k-th approval signs the grant only when the terms computed at that moment are
    the approved ones: a request row changed under a pending proposal (it never is by
    the node) refuses the execution with approval.terms-changed and sends nothing."""
    set_approvals(pair.pk, 2)
    add_people(pair.pk, NOW)
    _case_id, request_id = asked_of_pk(pair)
    pid = propose(pair, request_id)["proposal_id"]
    with pair.pk.node.db.transaction() as session:
        row = session.scalars(
            select(ConsentRequestRecord).where(ConsentRequestRecord.request_id == request_id)
        ).one()
        row.purpose = "a purpose no approver saw"
    refused("approval.terms-changed", lambda: approve(pair, pid, officer("bilal")))
    assert (grants(pair.pk), grant_bundles(pair.pk)) == (0, 0)
    with pair.pk.node.db.transaction() as session:
        state = session.scalars(
            select(ApprovalProposal.state).where(ApprovalProposal.proposal_id == pid)
        ).one()
    assert state == "pending"
    assert approval_givers(pair.pk) == ["asma"]


def test_a_grant_naming_fewer_approvers_than_the_agreed_policy_is_refused_on_arrival(
    pair: Pair, tmp_path: Path
) -> None:
    """Both nodes load the same policy: a grant Islamabad signed alone, arriving where
    the agreed policy asks two approvers for a consent grant, is refused (fail closed,
    never used, the sender told) and Tokyo's disclosure stays blocked. A grant the
    two approvers gave is accepted."""
    set_approvals(pair.pk, 1)  # Islamabad's copy drifted to one officer...
    set_approvals(pair.jp, 2)  # ...Tokyo's keeps the agreed two
    add_people(pair.pk, NOW)
    case_id, request_id = asked_of_pk(pair)
    assert propose(pair, request_id)["state"] == "executed"
    with pair.pk.node.db.transaction() as session:
        (bundle_id,) = session.scalars(
            select(OutboxEntry.bundle_id).where(OutboxEntry.case_type == "consent-grant")
        ).all()
    deliver(pair.pk, pair.jp, bundle_id)
    with pytest.raises(ConsentRefused, match="no consent"):
        do_disclose(pair.jp, [case_id], tmp_path / "blocked")
    with pair.jp.node.db.transaction() as session:
        applied = session.scalars(
            select(ConsentApplied).where(ConsentApplied.bundle_id == bundle_id)
        ).one()
        assert applied.outcome == "refused"
        assert "names 1 approver(s) where the agreed policy asks 2" in applied.detail
        assert session.scalar(select(func.count()).select_from(ConsentGrantRecord)) == 0
    assert not (tmp_path / "blocked").exists()

    set_approvals(pair.pk, 2)
    _case_id, second_request = asked_of_pk(pair)
    pid = propose(pair, second_request)["proposal_id"]
    assert approve(pair, pid, officer("bilal"))["state"] == "executed"
    with pair.pk.node.db.transaction() as session:
        bundles = session.scalars(
            select(OutboxEntry.bundle_id).where(
                OutboxEntry.case_type == "consent-grant", OutboxEntry.bundle_id != bundle_id
            )
        ).all()
    (accepted,) = bundles
    deliver(pair.pk, pair.jp, accepted)
    held = consent_queries.list_consents(NodeContext(pair.jp.node, pair.jp.keyring), now=NOW)
    assert [c["approvers"] for c in held["consents"]] == [["asma", "bilal"]]


def test_a_policy_edit_that_lowers_k_is_in_the_ledger_before_the_first_grant_under_it(
    pair: Pair,
) -> None:
    set_approvals(pair.pk, 2)
    add_people(pair.pk, NOW)
    _case_id, request_id = asked_of_pk(pair)
    propose(pair, request_id)
    set_approvals(pair.pk, 1)  # the edit: one officer grants alone from now on
    _case_id, other_request = asked_of_pk(pair)
    assert propose(pair, other_request)["state"] == "executed"
    _case_id, third_request = asked_of_pk(pair)
    propose(pair, third_request)  # same rules again: no new entry
    noted = entries(pair.pk, "approval-rules")
    assert [json.loads(e.canonical)["body"]["k"]["consent-grant"] for e in noted] == [2, 1]
    assert {(e.actor_name, e.actor_role) for e in noted} == {("system", None)}
    first, _second = entries(pair.pk, "consent-granted")
    assert noted[0].seq < noted[1].seq < first.seq


def test_an_approval_made_with_a_token_replaced_meanwhile_is_refused(pair: Pair) -> None:
    """The holders an approval records are those of the token it was made with: when the
    token is replaced between authentication and the approval (here the host operator
    enrols the officer again, which would make its holders the officer alone), the
    approval is refused, not recorded with the new token's holders."""
    set_approvals(pair.pk, 2)
    add_people(pair.pk, NOW)
    with pair.pk.node.db.transaction() as session:
        issued = reissue_token(session, "bilal", now=NOW, by=ADMIN)  # root-admin holds a copy
    with pair.pk.node.db.transaction() as session:
        acting = authenticate(session, issued.text)
    _case_id, request_id = asked_of_pk(pair)
    pid = propose(pair, request_id, by="dur")["proposal_id"]
    with pair.pk.node.db.transaction() as session:
        enrol_user(session, "bilal", now=NOW)  # bilal's token now held by bilal alone
    refused("access.token", lambda: approve(pair, pid, acting))
    assert grants(pair.pk) == 0
    assert approval_givers(pair.pk) == ["dur"]
