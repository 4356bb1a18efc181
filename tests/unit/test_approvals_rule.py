"""The two-person rule as a pure decision (gateway.core.approvals), over k = 1, 2, 3."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gateway.core.approvals import Approval, check_own_token, decide, terms_hash, token_is_own
from gateway.errors import InvalidInput, RefusedError

T0 = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
EXPIRES = T0 + timedelta(hours=72)
TERMS = terms_hash({"request_id": "r1", "items": ["b1"], "max_uses": 2})
OTHER = terms_hash({"request_id": "r1", "items": ["b1"], "max_uses": 3})


def ok(name: str, *, minutes: int = 0, terms: str = TERMS, **kw: bool) -> Approval:
    return Approval(
        approver=name,
        terms_hash=terms,
        approved_at=T0 + timedelta(minutes=minutes),
        enabled=kw.get("enabled", True),
        authorised=kw.get("authorised", True),
        own_token=kw.get("own_token", True),
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
    # a token an administrator issued (and may hold a copy of) does not count at k > 1
    (2, [ok("ana"), ok("bo", own_token=False)], False),
    (2, [ok("ana", own_token=False), ok("bo", own_token=False)], False),
    (3, [ok("ana"), ok("bo", own_token=False), ok("cy"), ok("di")], True),
    # a one-person office keeps working: at k = 1 who issued the token does not matter
    (1, [ok("ana", own_token=False)], True),
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


OWN_TOKEN_CASES = [
    # (k, approver, token issued by, counts)
    (1, "ana", "admin", True),
    (1, "ana", None, True),
    (2, "ana", "ana", True),
    (2, "ana", "admin", False),
    (2, "ana", "init", False),
    (2, "ana", None, False),
    (2, "ana", "Ana", False),
    (9, "ana", "ana", True),
]


@pytest.mark.parametrize(("k", "approver", "issued_by", "counts"), OWN_TOKEN_CASES)
def test_an_approval_counts_at_k_above_one_only_with_the_approvers_own_token(
    k: int, approver: str, issued_by: str | None, counts: bool
) -> None:
    assert token_is_own(k=k, approver=approver, token_issued_by=issued_by) is counts
    if counts:
        check_own_token(k=k, approver=approver, token_issued_by=issued_by)
        return
    with pytest.raises(RefusedError) as caught:
        check_own_token(k=k, approver=approver, token_issued_by=issued_by)
    assert caught.value.reason == "approval.token-not-own"
    assert "run `gateway users rotate-token`" in str(caught.value)
    assert "then approve again" in str(caught.value)
