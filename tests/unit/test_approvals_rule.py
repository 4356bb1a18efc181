"""The two-person rule as a pure decision (gateway.core.approvals), over k = 1, 2, 3."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gateway.core.approvals import (
    Approval,
    check_distinct,
    custody_after_issue,
    decide,
    terms_hash,
)
from gateway.errors import InvalidInput, RefusedError

T0 = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
EXPIRES = T0 + timedelta(hours=72)
TERMS = terms_hash({"request_id": "r1", "items": ["b1"], "max_uses": 2})
OTHER = terms_hash({"request_id": "r1", "items": ["b1"], "max_uses": 3})


def ok(
    name: str,
    *,
    minutes: int = 0,
    terms: str = TERMS,
    held_by: tuple[str, ...] = (),
    **kw: bool,
) -> Approval:
    return Approval(
        approver=name,
        terms_hash=terms,
        approved_at=T0 + timedelta(minutes=minutes),
        enabled=kw.get("enabled", True),
        authorised=kw.get("authorised", True),
        holders=frozenset({name, *held_by}),
    )


CASES = [
    # (k, approvals, executes)
    (1, [ok("ana")], True),
    (1, [], False),
    (2, [ok("ana")], False),
    (2, [ok("ana"), ok("ana", minutes=1)], False),  # the same approver twice counts once
    (2, [ok("ana"), ok("bo")], True),
    (2, [ok("ana"), ok("bo", terms=OTHER)], False),  # other terms do not count
    (2, [ok("ana"), ok("bo", enabled=False)], False),  # disabled since approving
    (2, [ok("ana"), ok("bo", authorised=False)], False),  # wrong role
    (2, [ok("ana"), ok("bo", minutes=72 * 60)], False),  # approved at expiry
    (3, [ok("ana"), ok("bo")], False),
    (3, [ok("ana"), ok("bo"), ok("cy")], True),
    (3, [ok("ana"), ok("bo"), ok("cy", enabled=False), ok("di")], True),
    (3, [ok("ana"), ok("bo"), ok("bo", minutes=5), ok("cy", terms=OTHER)], False),
    # one person who could hold two approvers' tokens counts once (token custody)
    (2, [ok("ana", held_by=("adm",)), ok("bo", held_by=("adm",))], False),  # one issuer
    (2, [ok("ana", held_by=("adm",)), ok("bo", held_by=("ana",))], False),  # issued by ana
    (2, [ok("ana"), ok("bo", held_by=("ana",))], False),
    (2, [ok("ana", held_by=("adm",)), ok("bo", held_by=("root",))], True),  # two issuers
    (2, [ok("ana", held_by=("adm",)), ok("adm")], False),  # adm as themself and as ana
    (2, [ok("ana", held_by=("adm",)), ok("bo", held_by=("adm",)), ok("cy", minutes=1)], True),
    (3, [ok("ana", held_by=("x",)), ok("bo", held_by=("y",)), ok("cy", held_by=("x", "y"))], False),
    (3, [ok("ana"), ok("bo", held_by=("ana",)), ok("cy"), ok("di")], True),
    # an overlapping approval is skipped, and not itself a blocker for a later one
    (2, [ok("ana"), ok("bo", held_by=("ana",), minutes=1), ok("cy", minutes=2)], True),
    # a one-person office keeps working: at k = 1 who could hold the token does not matter
    (1, [ok("ana", held_by=("adm",))], True),
]


@pytest.mark.parametrize(("k", "approvals", "executes"), CASES)
def test_executes_exactly_with_k_distinct_enabled_authorised_approvals(
    k: int, approvals: list[Approval], executes: bool
) -> None:
    decision = decide(
        k=k, terms=TERMS, approvals=approvals, expires_at=EXPIRES, now=T0, proposer_enabled=True
    )
    assert decision.executes is executes
    assert len(decision.counted) == len(set(decision.counted))
    assert (len(decision.counted) >= k) is executes
    assert decision.missing == max(0, k - len(decision.counted))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_never_after_expiry(k: int) -> None:
    approvals = [ok(name) for name in ("ana", "bo", "cy")]
    before = decide(
        k=k,
        terms=TERMS,
        approvals=approvals,
        expires_at=EXPIRES,
        now=EXPIRES - timedelta(seconds=1),
        proposer_enabled=True,
    )
    after = decide(
        k=k,
        terms=TERMS,
        approvals=approvals,
        expires_at=EXPIRES,
        now=EXPIRES,
        proposer_enabled=True,
    )
    assert before.executes
    assert not after.executes
    assert after.expired


@pytest.mark.parametrize("k", [1, 2, 3])
def test_proposal_of_a_disabled_proposer_never_executes(k: int) -> None:
    approvals = [ok(name) for name in ("ana", "bo", "cy")]
    decision = decide(
        k=k, terms=TERMS, approvals=approvals, expires_at=EXPIRES, now=T0, proposer_enabled=False
    )
    assert not decision.executes
    assert len(decision.counted) == 3  # the approvals are there; the proposer is not


def test_terms_hash_is_canonical_and_sensitive() -> None:
    assert terms_hash({"a": 1, "b": [1, 2]}) == terms_hash({"b": [1, 2], "a": 1})
    assert terms_hash({"a": 1}) != terms_hash({"a": 2})
    assert len(TERMS) == 64


@pytest.mark.parametrize("k", [0, 10, True])
def test_k_out_of_range_is_refused(k: int) -> None:
    with pytest.raises(InvalidInput, match="approvals needed"):
        decide(k=k, terms=TERMS, approvals=[], expires_at=EXPIRES, now=T0, proposer_enabled=True)


def test_the_approvals_that_count_share_no_holder() -> None:
    approvals = [
        ok("ana", held_by=("adm",)),
        ok("bo", held_by=("adm",), minutes=1),
        ok("cy", held_by=("root",), minutes=2),
        ok("di", minutes=3),
    ]
    decision = decide(
        k=3, terms=TERMS, approvals=approvals, expires_at=EXPIRES, now=T0, proposer_enabled=True
    )
    assert decision.counted == ("ana", "cy", "di")  # bo shares adm with ana, who came first
    assert decision.executes


def test_custody_after_issue_keeps_every_holder_of_the_issuers_token() -> None:
    assert custody_after_issue("ana", None) == {"ana"}  # the host operator issued it
    assert custody_after_issue("ana", ()) == {"ana"}
    assert custody_after_issue("ana", {"adm"}) == {"ana", "adm"}
    # adm's own token was issued by root: whoever holds it could hold ana's too
    assert custody_after_issue("ana", custody_after_issue("adm", {"root"})) == {
        "ana",
        "adm",
        "root",
    }


DISTINCT_CASES = [
    # (k, approval, counted before it, refused)
    (1, ok("bo", held_by=("adm",)), [ok("ana", held_by=("adm",))], False),
    (2, ok("bo", held_by=("adm",)), [ok("ana", held_by=("adm",))], True),
    (2, ok("bo"), [ok("ana", held_by=("bo",))], True),
    (2, ok("bo", held_by=("root",)), [ok("ana", held_by=("adm",))], False),
    (2, ok("bo"), [], False),
    (3, ok("cy", held_by=("adm",)), [ok("ana"), ok("bo", held_by=("adm",))], True),
    (9, ok("cy"), [ok("ana"), ok("bo")], False),
]


@pytest.mark.parametrize(("k", "approval", "counted", "refused"), DISTINCT_CASES)
def test_an_approval_one_person_could_give_with_a_counted_one_is_refused_at_k_above_one(
    k: int, approval: Approval, counted: list[Approval], refused: bool
) -> None:
    if not refused:
        check_distinct(k=k, approval=approval, counted=counted)
        return
    with pytest.raises(RefusedError) as caught:
        check_distinct(k=k, approval=approval, counted=counted)
    assert caught.value.reason == "approval.not-distinct"
    text = str(caught.value)
    assert f"{approval.approver}'s approval would not be a second person's" in text
    assert "gateway users enrol" in text
