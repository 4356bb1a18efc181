"""The node policy: limits, markings, internal recipients, consent and retention.

Pure: a validated, immutable value built from the data of ``policies/policy.toml``
(the loader in :mod:`gateway.node.policy` reads the file and names file and key
in its errors). The policy version travels in every envelope header, so both
sides can tell under which rules a bundle was made (MOC item 7: reviewed and
amended by written mutual consent).

Small decisions live here as methods that explain themselves:
:meth:`Policy.is_internal` (is a recipient one of this side's own
authorities?) and :meth:`Limits.check_envelope` (may an envelope of this
shape be accepted?).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from gateway.errors import PolicyRefused

__all__ = [
    "APPROVER_CAPABILITY",
    "APPROVER_ROLES",
    "ENFORCED_APPROVALS",
    "GIB",
    "KIB",
    "MIB",
    "ApprovalRule",
    "ConsentPolicy",
    "Limits",
    "Marking",
    "Policy",
    "Recipient",
    "RetentionPolicy",
]

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

Marking = Literal["confidential", "public"]
RecipientName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,39}$")]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Limits(_Frozen):
    """Hard bounds on what a node builds and accepts; past them: refused, not crashed."""

    max_envelope_bytes: Annotated[int, Field(ge=4 * KIB, le=64 * GIB)] = 4 * GIB
    max_attachments: Annotated[int, Field(ge=0, le=10_000)] = 64
    max_attachment_bytes: Annotated[int, Field(ge=1, le=64 * GIB)] = 2 * GIB
    max_case_bytes: Annotated[int, Field(ge=1 * KIB, le=64 * MIB)] = 1 * MIB
    max_header_bytes: Annotated[int, Field(ge=1 * KIB, le=1 * MIB)] = 64 * KIB
    clock_skew_seconds: Annotated[int, Field(ge=0, le=3600)] = 300
    max_envelope_age_seconds: Annotated[int, Field(ge=60, le=366 * 86400)] = 365 * 86400
    peer_batch_size: Annotated[int, Field(ge=1, le=10_000)] = 100
    peer_requests_per_minute: Annotated[int, Field(ge=1, le=1_000_000)] = 600
    peer_body_bytes: Annotated[int, Field(ge=4 * KIB, le=64 * GIB)] = 4 * GIB

    @property
    def clock_skew(self) -> timedelta:
        return timedelta(seconds=self.clock_skew_seconds)

    @property
    def max_envelope_age(self) -> timedelta:
        return timedelta(seconds=self.max_envelope_age_seconds)

    @model_validator(mode="after")
    def _coherent(self) -> Limits:
        if self.max_attachment_bytes > self.max_envelope_bytes:
            raise ValueError("max_attachment_bytes exceeds max_envelope_bytes")
        if self.max_case_bytes > self.max_envelope_bytes:
            raise ValueError("max_case_bytes exceeds max_envelope_bytes")
        return self

    def check_attachments(self, sizes: list[int]) -> None:
        """Refuse (:class:`PolicyRefused`) too many or too large attachments."""
        if len(sizes) > self.max_attachments:
            raise PolicyRefused(
                f"{len(sizes)} attachments exceed the limit of {self.max_attachments}",
                reason="policy.attachments",
            )
        for index, size in enumerate(sizes):
            if size > self.max_attachment_bytes:
                raise PolicyRefused(
                    f"attachment {index} of {size} bytes exceeds the limit of "
                    f"{self.max_attachment_bytes}",
                    reason="policy.attachment-size",
                )


class Recipient(_Frozen):
    """An authority of one side that may receive the other side's items as internal."""

    name: RecipientName
    display_name: Annotated[str, StringConstraints(min_length=1, max_length=200)]


class ConsentPolicy(_Frozen):
    max_validity_days: Annotated[int, Field(ge=1, le=3660)] = 365
    max_uses_limit: Annotated[int, Field(ge=1, le=1_000_000)] = 1000

    @property
    def max_validity(self) -> timedelta:
        return timedelta(days=self.max_validity_days)


ApprovalAction = Literal[
    "consent-grant",
    "consent-revoke",
    "keys-rotate",
    "keys-revoke",
    "keys-rotate-root",
    "keys-recover",
    "users-add-admin",
]

APPROVER_ROLES: Mapping[str, str] = {
    "consent-grant": "officer",
    "consent-revoke": "officer",
    "keys-rotate": "admin",
    "keys-revoke": "admin",
    "keys-rotate-root": "admin",
    "keys-recover": "admin",
    "users-add-admin": "admin",
}
"""Who may approve each action: officers decide on consent, administrators on keys
and users (docs/consent.md, "Approvals"). The approver must also be an enabled user of this node."""

APPROVER_CAPABILITY: frozenset[str] = frozenset({"consent-grant"})
"""Actions whose approvers must also hold the approver capability (``users.approver``,
given by an administrator): k of the officers holding the capability approve a
consent grant. Proposing needs only the role (docs/consent.md)."""


ENFORCED_APPROVALS = (
    "consent-grant",
    "consent-revoke",
    "keys-rotate",
    "keys-revoke",
    "keys-rotate-root",
    "keys-recover",
    "users-add-admin",
)
"""Actions whose k > 1 this version enforces; a policy asking more of another action
is refused at start rather than silently run by one person."""


class ApprovalRule(_Frozen):
    """How many distinct approvers an action needs, and how long a proposal waits."""

    k: Annotated[int, Field(ge=1, le=9)] = 1
    lifetime_hours: Annotated[int, Field(ge=1, le=24 * 90)] = 72

    @property
    def lifetime(self) -> timedelta:
        return timedelta(hours=self.lifetime_hours)


class RetentionPolicy(_Frozen):
    """How long things are kept; ``None`` means for as long as the node lives.

    Enforced by :mod:`gateway.core.retention` (the rule) and
    :mod:`gateway.node.retention` (``gateway purge`` and ``serve``
    housekeeping). Periods are whole days, at most 100 years.
    """

    envelopes_days: Annotated[int, Field(ge=1, le=36_600)] | None = 3650
    decrypted_output_days: Annotated[int, Field(ge=1, le=36_600)] | None = 30
    ledger_days: None = None
    """The ledger is append-only and never trimmed (MOC item 8: evidence)."""


class Policy(_Frozen):
    """Everything the rules say, for both sides (both nodes load the same files)."""

    version: Annotated[str, StringConstraints(pattern=r"^[0-9A-Za-z][0-9A-Za-z.\-]{0,31}$")]
    default_marking: Marking = "confidential"
    limits: Limits = Limits()
    recipients: dict[Literal["jp", "pk"], list[Recipient]]
    consent: ConsentPolicy = ConsentPolicy()
    retention: RetentionPolicy = RetentionPolicy()
    approvals: dict[ApprovalAction, ApprovalRule] = {}
    """The two-person rule per action (``[approvals.<action>]``); absent: k = 1."""

    @model_validator(mode="after")
    def _both_sides(self) -> Policy:
        for side in ("jp", "pk"):
            entries = self.recipients.get(side)
            if not entries:
                raise ValueError(f"recipients.{side}: at least one internal recipient is needed")
            names = [entry.name for entry in entries]
            if len(set(names)) != len(names):
                raise ValueError(f"recipients.{side}: a recipient name is listed twice")
        for action, rule in self.approvals.items():
            if rule.k > 1 and action not in ENFORCED_APPROVALS:
                raise ValueError(
                    f"approvals.{action}: k > 1 is not enforced by this version (only "
                    f"{', '.join(ENFORCED_APPROVALS)}); set k = 1 or remove the table"
                )
        return self

    def internal_recipients(self, node: str) -> tuple[Recipient, ...]:
        """The internal recipients of ``node``'s side; empty for an unknown node."""
        for side, entries in self.recipients.items():
            if side == node:
                return tuple(entries)
        return ()

    def is_internal(self, node: str, recipient: str) -> bool:
        """True when ``recipient`` (a short name) is one of ``node``'s own authorities."""
        return any(entry.name == recipient for entry in self.internal_recipients(node))

    def approval_rule(self, action: str) -> ApprovalRule:
        """The rule for ``action``; k = 1 (one person, today's behaviour) when unset."""
        for name, rule in self.approvals.items():
            if name == action:
                return rule
        return ApprovalRule()

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Policy:
        """Build from parsed TOML or JSON; raises pydantic's ``ValidationError``."""
        return cls.model_validate(dict(data))
