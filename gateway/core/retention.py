"""Retention: which stored envelopes and decrypted copies have outlived the policy.

Pure: values in, decisions out; the clock is the ``now`` argument. The shell
(:mod:`gateway.node.retention`) reads the rows, asks here, and destroys.

**What "older than" measures.** A bundle's age counts from the moment this
node took it in, on this node's own clock:

* a *received* bundle from ``received_at``, the time its signed receipt names
  (never the sender's ``created_at``, which the receiver cannot vouch for);
* a *sent* bundle from ``created_at``, when this node sealed and queued it.

A bundle is due when ``now >= kept_since + envelopes_days``. Two kinds are
kept past that, because purging them would lose something accepted:

* a sent bundle the peer has not receipted yet (``undelivered``): it is
  purged at the first run after its receipt arrives;
* a received ``consent-*`` bundle not yet applied to the consent state
  (``consent-pending``): it is purged once applied.

A decrypted copy written by ``show --out`` or ``disclose --out`` is due when
``now >= written_at + decrypted_output_days``. ``None`` for a period means
"kept for as long as the node lives".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from gateway.core.policy import RetentionPolicy

__all__ = [
    "Direction",
    "HeldBundle",
    "RetentionDecision",
    "Verdict",
    "decide_bundle",
    "envelope_due_at",
    "output_due_at",
]


class Direction(StrEnum):
    """Which side of the exchange a stored bundle is on."""

    RECEIVED = "received"
    SENT = "sent"


class Verdict(StrEnum):
    """What retention says of one stored bundle."""

    PURGE = "purge"
    NOT_DUE = "not-due"
    UNDELIVERED = "undelivered"
    CONSENT_PENDING = "consent-pending"
    KEPT_FOREVER = "kept-forever"


@dataclass(frozen=True, slots=True)
class HeldBundle:
    """The facts about one stored bundle that retention looks at (metadata only)."""

    direction: Direction
    bundle_id: str
    case_type: str
    kept_since: datetime
    """``received_at`` of a received bundle, ``created_at`` of a sent one (UTC)."""
    delivered: bool = True
    """A sent bundle: the peer's receipt is stored. Always true for a received one."""
    awaiting_application: bool = False
    """A received consent-* bundle not yet applied to the consent state."""


@dataclass(frozen=True, slots=True)
class RetentionDecision:
    bundle: HeldBundle
    verdict: Verdict
    due_at: datetime | None

    @property
    def purge(self) -> bool:
        return self.verdict is Verdict.PURGE

    def explain(self) -> str:
        """One line for an operator: why the bundle goes or stays."""
        due = self.due_at.strftime("%Y-%m-%d") if self.due_at is not None else None
        return {
            Verdict.PURGE: f"due since {due}",
            Verdict.NOT_DUE: f"kept until {due}",
            Verdict.UNDELIVERED: f"due since {due}, kept until the peer's receipt arrives",
            Verdict.CONSENT_PENDING: f"due since {due}, kept until the consent bundle is applied",
            Verdict.KEPT_FOREVER: "kept: the policy sets no envelope retention period",
        }[self.verdict]


def _due(start: datetime, days: int | None) -> datetime | None:
    if start.tzinfo is None:
        raise ValueError("retention times must be timezone-aware")
    return None if days is None else start + timedelta(days=days)


def envelope_due_at(retention: RetentionPolicy, kept_since: datetime) -> datetime | None:
    """When a bundle kept since ``kept_since`` is due for purging; ``None``: never."""
    return _due(kept_since, retention.envelopes_days)


def output_due_at(retention: RetentionPolicy, written_at: datetime) -> datetime | None:
    """When a decrypted copy written at ``written_at`` is due for deletion; ``None``: never."""
    return _due(written_at, retention.decrypted_output_days)


def decide_bundle(
    bundle: HeldBundle, retention: RetentionPolicy, *, now: datetime
) -> RetentionDecision:
    """Purge or keep ``bundle`` at ``now`` under ``retention`` (see the module text).

    Raises ``ValueError`` for a naive datetime.
    """
    due = envelope_due_at(retention, bundle.kept_since)
    if now.tzinfo is None:
        raise ValueError("retention times must be timezone-aware")
    if due is None:
        verdict = Verdict.KEPT_FOREVER
    elif now < due:
        verdict = Verdict.NOT_DUE
    elif bundle.direction is Direction.SENT and not bundle.delivered:
        verdict = Verdict.UNDELIVERED
    elif bundle.awaiting_application:
        verdict = Verdict.CONSENT_PENDING
    else:
        verdict = Verdict.PURGE
    return RetentionDecision(bundle=bundle, verdict=verdict, due_at=due)
