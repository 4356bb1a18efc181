"""The retention rule (pure): when a stored bundle or a decrypted copy is due, and what is kept."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gateway.core.policy import RetentionPolicy
from gateway.core.retention import (
    Direction,
    HeldBundle,
    Verdict,
    decide_bundle,
    envelope_due_at,
    output_due_at,
)

T0 = datetime(2026, 1, 10, 9, 30, tzinfo=UTC)
POLICY = RetentionPolicy(envelopes_days=30, decrypted_output_days=7)
DAY = timedelta(days=1)
TICK = timedelta(microseconds=1)


def bundle(
    direction: Direction = Direction.RECEIVED,
    *,
    delivered: bool = True,
    awaiting_application: bool = False,
) -> HeldBundle:
    return HeldBundle(
        direction=direction,
        bundle_id="b-1",
        case_type="exam-fraud",
        kept_since=T0,
        delivered=delivered,
        awaiting_application=awaiting_application,
    )


@pytest.mark.parametrize(
    ("held", "now", "verdict"),
    [
        (bundle(), T0 + 30 * DAY - TICK, Verdict.NOT_DUE),
        (bundle(), T0 + 30 * DAY, Verdict.PURGE),
        (bundle(), T0 + 400 * DAY, Verdict.PURGE),
        (bundle(Direction.SENT), T0 + 30 * DAY, Verdict.PURGE),
        (bundle(Direction.SENT, delivered=False), T0 + 30 * DAY, Verdict.UNDELIVERED),
        (bundle(Direction.SENT, delivered=False), T0 + 29 * DAY, Verdict.NOT_DUE),
        (bundle(awaiting_application=True), T0 + 31 * DAY, Verdict.CONSENT_PENDING),
        # "delivered" means nothing for a received bundle: it was accepted and receipted.
        (bundle(Direction.RECEIVED, delivered=False), T0 + 31 * DAY, Verdict.PURGE),
    ],
)
def test_bundle_is_purged_only_when_due_delivered_and_applied(
    held: HeldBundle, now: datetime, verdict: Verdict
) -> None:
    decision = decide_bundle(held, POLICY, now=now)
    assert decision.verdict is verdict
    assert decision.purge is (verdict is Verdict.PURGE)
    assert decision.due_at == T0 + 30 * DAY


def test_no_envelope_period_keeps_every_bundle() -> None:
    forever = RetentionPolicy(envelopes_days=None, decrypted_output_days=None)
    decision = decide_bundle(bundle(), forever, now=T0 + 10_000 * DAY)
    assert (decision.verdict, decision.due_at) == (Verdict.KEPT_FOREVER, None)
    assert output_due_at(forever, T0) is None
    assert "no envelope retention period" in decision.explain()


@pytest.mark.parametrize(
    ("verdict_of", "words"),
    [
        (T0 + 31 * DAY, "due since 2026-02-09"),
        (T0 + DAY, "kept until 2026-02-09"),
    ],
)
def test_decisions_explain_themselves_with_the_date(verdict_of: datetime, words: str) -> None:
    assert decide_bundle(bundle(), POLICY, now=verdict_of).explain() == words


def test_undelivered_explanation_names_the_receipt() -> None:
    held = bundle(Direction.SENT, delivered=False)
    assert "receipt" in decide_bundle(held, POLICY, now=T0 + 31 * DAY).explain()


def test_due_times_add_whole_days_to_the_start() -> None:
    assert envelope_due_at(POLICY, T0) == T0 + 30 * DAY
    assert output_due_at(POLICY, T0) == T0 + 7 * DAY


@pytest.mark.parametrize("naive", ["kept_since", "now"])
def test_naive_times_are_refused(naive: str) -> None:
    plain = T0.replace(tzinfo=None)
    held = HeldBundle(
        Direction.RECEIVED, "b-1", "exam-fraud", plain if naive == "kept_since" else T0
    )
    with pytest.raises(ValueError, match="timezone-aware"):
        decide_bundle(held, POLICY, now=plain if naive == "now" else T0 + DAY)


@pytest.mark.parametrize("days", [0, -1, 36_601])
def test_retention_periods_out_of_bounds_are_refused(days: int) -> None:
    with pytest.raises(ValueError, match="envelopes_days"):
        RetentionPolicy(envelopes_days=days)
