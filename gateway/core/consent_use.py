"""Whether a use the peer reported of one of our consents was authorised (pure).

The originator of an item cannot see the discloser's decisions; it sees the
``consent-use`` notices the discloser sends back (SPEC §8a). Each notice is
judged against the written consent as this node signed it, the revocation as
the peer received it, and the uses reported before it. A use that breaks any
of the consent's terms is recorded as a violation (``consent-use-violation``
in the ledger) naming every term it broke; a use within them is recorded as
``consent-used``. Nothing here reads a clock or storage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from gateway.core.consent import ConsentGrant, format_time, normalise_name

__all__ = ["ReportedUse", "judge_reported_use"]


@dataclass(frozen=True, slots=True)
class ReportedUse:
    """One use as the peer reported it (the fields of its ``consent-use`` notice)."""

    consent_id: str
    items: Sequence[str]
    recipient: str
    purpose: str
    used_at: datetime
    use_number: int


def judge_reported_use(
    use: ReportedUse,
    grant: ConsentGrant | None,
    *,
    uses_before: int,
    revocation_received_at: datetime | None,
) -> list[str]:
    """The terms of ``grant`` that ``use`` breaks; empty when it was authorised.

    ``grant`` is the consent this node granted under ``use.consent_id`` (read
    from the signed document), or ``None`` when this node granted none.
    ``uses_before`` counts the uses of it the peer reported earlier.
    ``revocation_received_at`` is when the peer receipted our revocation of
    it, or ``None`` while it is not revoked or the peer has not received it:
    a revocation counts from the moment the peer holds it (docs/consent.md).
    Each finding is a short sentence naming ids, never content.
    """
    if grant is None:
        return [f"unknown consent: this node granted no consent {use.consent_id}"]
    found: list[str] = []
    extra = sorted(set(use.items) - set(grant.items))
    if extra:
        found.append(f"names item(s) the consent does not cover: {', '.join(extra)}")
    if normalise_name(use.recipient) != grant.third_party_key:
        found.append("disclosed to another recipient than the consent names")
    if normalise_name(use.purpose) != grant.purpose_key:
        found.append("disclosed for another purpose than the consent names")
    if use.used_at < grant.valid_from:
        found.append(f"used before the consent was valid (from {format_time(grant.valid_from)})")
    if use.used_at >= grant.valid_until:
        found.append(f"used after the consent expired ({format_time(grant.valid_until)})")
    if revocation_received_at is not None and use.used_at >= revocation_received_at:
        found.append(
            "revoked: used after the peer received the revocation "
            f"({format_time(revocation_received_at)})"
        )
    if grant.max_uses is not None:
        number = max(use.use_number, uses_before + 1)
        if number > grant.max_uses:
            found.append(f"over the limit: use {number} of at most {grant.max_uses}")
    return found
