"""What the consent protocol's modules share: bundle types, the peer, sending a step.

A consent step is a protocol bundle queued through
:func:`gateway.node.outbox.send_protocol_bundle` in the same transaction as its
record and ledger entry (:func:`send_consent_bundle`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from gateway.core.canonical import canonical_bytes
from gateway.core.consent import format_time
from gateway.core.keys import KeyManifest
from gateway.core.policy import Policy
from gateway.core.roles import Actor
from gateway.node.consent import uses as consent_uses
from gateway.node.context import NodeContext
from gateway.node.outbox import send_protocol_bundle
from gateway.node.peer_trust import require_pinned_peer
from gateway.node.policy import load_policy
from gateway.node.runtime import Node

__all__ = [
    "APPLIED_TYPES",
    "CONSENT_TYPES",
    "GRANT_ATTACHMENT",
    "MAX_REASON",
    "REFUSAL_TYPE",
    "SentConsent",
    "internal_names",
    "items_json",
    "node_policy",
    "peer_manifest",
    "peer_of",
    "send_consent_bundle",
]

CONSENT_TYPES = ("consent-request", "consent-grant", "consent-denial", "consent-revocation")
REFUSAL_TYPE = "bundle-refusal"
APPLIED_TYPES = (*CONSENT_TYPES, REFUSAL_TYPE, consent_uses.USE_TYPE)
"""Protocol bundles applied after their receipt (:func:`~gateway.node.consent.receive.apply_pending`)."""
GRANT_ATTACHMENT = "consent-grant.signed.json"
MAX_REASON = 20_000


@dataclass(frozen=True, slots=True)
class SentConsent:
    """What a consent step sent: the bundle and the ids it concerns."""

    bundle_id: str
    request_id: str
    consent_id: str | None = None
    valid_until: datetime | None = None
    max_uses: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle_id": self.bundle_id,
            "request_id": self.request_id,
            "consent_id": self.consent_id,
            "valid_until": None if self.valid_until is None else format_time(self.valid_until),
            "max_uses": self.max_uses,
        }


def peer_of(node_id: str) -> str:
    return "pk" if node_id == "jp" else "jp"


def node_policy(node: Node) -> Policy:
    return load_policy(node.settings)


def peer_manifest(session: Session) -> KeyManifest:
    return require_pinned_peer(session, needed_for="no consent document can be checked")


def internal_names(policy: Policy, node_id: str) -> list[str]:
    names: list[str] = []
    for entry in policy.internal_recipients(node_id):
        names += [entry.name, entry.display_name]
    return names


def items_json(items: Iterable[str]) -> str:
    return canonical_bytes(sorted(items)).decode("utf-8")


def send_consent_bundle(
    ctx: NodeContext,
    actor: Actor,
    case_type: str,
    case: dict[str, Any],
    attachments: Sequence[Path],
    now: datetime,
    record: Callable[[Session, str], None],
    *,
    reply_to: str | None = None,
) -> str:
    sent = send_protocol_bundle(
        ctx, actor, case_type, case, attachments,
        reply_to=reply_to, now=now, in_transaction=record,
    )  # fmt: skip
    return sent.bundle_id
