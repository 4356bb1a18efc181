"""Is this node able to work: the readiness checks and the scrape-time metrics.

Readiness (``GET /readyz`` of the local API) fails when any of these fails:

- ``database``: the node's database answers at its URL and belongs to this node;
- ``keyring``: the serving process holds its unlocked keys, and they are the
  keys of this node's newest manifest;
- ``policy``: the policy files load and validate.

Reported beside them, never failing readiness (a node with its peer down
still takes new bundles into its outbox): ``peer`` (``reachable``,
``unreachable`` or ``unknown``, as learnt by the last exchange of this
process) and ``outbox_queued`` (bundles waiting for delivery).

The scrape-time collector (:class:`NodeStateCollector`) reads, in one short
transaction, what lives in the database: outbox backlog and its oldest age
per channel, ledger size, the age of the newest checkpoint and how long it
has waited for the peer's witness, key manifest versions and days until
expiry, and consent decisions by outcome. Every query is an indexed lookup,
a ``max`` or a ``count`` grouped over a handful of values, so a scrape stays
cheap; a database that does not answer gives ``ssw_gateway_database_up 0``
and no other database-backed series, never a failed scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gateway.core.keys import KeyManifest, NodeKeyring
from gateway.errors import GatewayError
from gateway.log import get_logger
from gateway.metrics import NAMESPACE
from gateway.node import ledger
from gateway.node.own_keys import own_manifest
from gateway.node.peer_trust import pinned_peer_manifest
from gateway.node.policy import load_policy
from gateway.node.runtime import Node, utc_now
from gateway.store.models_consent import DisclosureRecord
from gateway.store.models_exchange import OutboxEntry, OutboxState
from gateway.store.models_ledger import LedgerCheckpointRow

__all__ = ["READY_CHECKS", "NodeStateCollector", "Readiness", "check_readiness"]

READY_CHECKS = ("database", "keyring", "policy")
"""The checks whose failure makes a node not ready, in the order they run."""

_log = get_logger("health")
_SECONDS_PER_DAY = 86400.0


@dataclass
class Readiness:
    """The outcome of the readiness checks: each check ``ok`` or ``failed``, and the reports."""

    checks: dict[str, str] = field(default_factory=dict)
    peer: str = "unknown"
    outbox_queued: int | None = None

    @property
    def ready(self) -> bool:
        return all(self.checks.get(name) == "ok" for name in READY_CHECKS)

    @property
    def failed(self) -> list[str]:
        return [name for name in READY_CHECKS if self.checks.get(name) != "ok"]

    def to_json(self) -> dict[str, Any]:
        """``{"status": "ready"|"not-ready", "checks": {...}, "failed": [...], "peer", "outbox_queued"}``."""
        return {
            "status": "ready" if self.ready else "not-ready",
            "checks": dict(self.checks),
            "failed": self.failed,
            "peer": self.peer,
            "outbox_queued": self.outbox_queued,
        }


def _queued(session: Session) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(OutboxEntry)
            .where(OutboxEntry.state == OutboxState.QUEUED)
        )
        or 0
    )


def check_readiness(node: Node, keyring: Callable[[], NodeKeyring] | None) -> Readiness:
    """Run the readiness checks once (blocking: call it from a worker thread).

    Each failure is logged as one warning naming the check and its reason
    code; the result names only the check, never the cause, so the probe
    tells a stranger nothing about the node.
    """

    result = Readiness()
    own: KeyManifest | None = None
    try:
        owners = node.db.probe()
        if owners != [node.node_id]:
            raise GatewayError("the database belongs to another node", reason="config.database")
        with node.db.transaction() as session:
            own = own_manifest(session)
            result.outbox_queued = _queued(session)
        result.checks["database"] = "ok"
    except GatewayError as exc:
        result.checks["database"] = "failed"
        _log.warning("not_ready", check="database", reason=exc.reason, detail=exc.message)
    except Exception as exc:  # noqa: BLE001 - a probe answers not-ready, never a 500
        result.checks["database"] = "failed"
        _log.warning("not_ready", check="database", reason=type(exc).__name__)
    try:
        if keyring is None:
            raise GatewayError("no keys are unlocked in this process", reason="keys.locked")
        held = keyring()
        if own is not None and held.manifest.version != own.version:
            raise GatewayError("the keys held are not the newest manifest's", reason="keys.stale")
        result.checks["keyring"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure to give the keys means not ready
        result.checks["keyring"] = "failed"
        _log.warning(
            "not_ready", check="keyring", reason=getattr(exc, "reason", type(exc).__name__)
        )
    try:
        load_policy(node.settings)
        result.checks["policy"] = "ok"
    except Exception as exc:  # noqa: BLE001 - a probe answers not-ready, never a 500
        result.checks["policy"] = "failed"
        _log.warning("not_ready", check="policy", reason=getattr(exc, "reason", type(exc).__name__))
    contact = node.metrics.peer
    if contact.ok is not None:
        result.peer = "reachable" if contact.ok else "unreachable"
    return result


def _key_days(manifest: KeyManifest, now: datetime) -> Iterator[tuple[str, float]]:
    """Days until the newest usable key of each use expires, and the manifest itself."""
    revoked = {entry.key_id for entry in manifest.revocations}
    for use in ("sign", "encrypt"):
        ends = [
            key.not_after
            for key in manifest.keys
            if key.use == use and key.key_id not in revoked and key.not_before <= now
        ]
        if ends:
            yield use, (max(ends) - now).total_seconds() / _SECONDS_PER_DAY
    yield "manifest", (manifest.expires_at - now).total_seconds() / _SECONDS_PER_DAY


class NodeStateCollector:
    """Gauges and counters read from the node's database when Prometheus scrapes.

    ``clock`` gives the time ages are measured against (UTC); the witness
    state comes from the node's :class:`~gateway.metrics.NodeMetrics`.
    """

    def __init__(self, node: Node, *, clock: Callable[[], datetime] = utc_now) -> None:
        self._node = node
        self._clock = clock

    def describe(self) -> Iterable[Metric]:
        # Nothing at registration: the database is read only when scraped.
        return []

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            f"{NAMESPACE}_database_up",
            "1 when the node's database answered this scrape, else 0.",
        )
        try:
            families = self._from_database()
        except GatewayError as exc:
            _log.warning("metrics_database_unavailable", reason=exc.reason)
            up.add_metric([], 0)
            return [up, *self._in_process()]
        up.add_metric([], 1)
        return [up, *families, *self._in_process()]

    def _in_process(self) -> list[Metric]:
        metrics = self._node.metrics
        peer_up = GaugeMetricFamily(
            f"{NAMESPACE}_peer_up",
            "1 when the last exchange with the peer succeeded, 0 when it failed "
            "(absent before the first).",
        )
        if metrics.peer.ok is not None:
            peer_up.add_metric([], 1 if metrics.peer.ok else 0)
        return [peer_up]

    def _from_database(self) -> list[Metric]:

        node = self._node
        now = self._clock()
        with node.db.transaction() as session:
            backlog = session.execute(
                select(
                    OutboxEntry.channel,
                    func.count(),
                    func.min(OutboxEntry.created_at),
                )
                .where(OutboxEntry.state == OutboxState.QUEUED)
                .group_by(OutboxEntry.channel)
            ).all()
            size = ledger.ledger_size(session)
            newest = session.execute(
                select(LedgerCheckpointRow.size, LedgerCheckpointRow.time)
                .order_by(LedgerCheckpointRow.size.desc())
                .limit(1)
            ).first()
            decisions = session.execute(
                select(DisclosureRecord.kind, func.count()).group_by(DisclosureRecord.kind)
            ).all()
            own = own_manifest(session)
            peer = pinned_peer_manifest(session)

        queued = GaugeMetricFamily(
            f"{NAMESPACE}_outbox_queued",
            "Bundles queued for delivery, per channel.",
            labels=["channel"],
        )
        oldest = GaugeMetricFamily(
            f"{NAMESPACE}_outbox_oldest_age_seconds",
            "Age of the oldest bundle queued for delivery, per channel (0 when none).",
            labels=["channel"],
        )
        channel = f"{node.node_id}->{'pk' if node.node_id == 'jp' else 'jp'}"
        seen = False
        for name, count, first in backlog:
            seen = seen or name == channel
            queued.add_metric([str(name)], int(count))
            age = (now - _aware(first)).total_seconds() if first is not None else 0.0
            oldest.add_metric([str(name)], max(0.0, age))
        if not seen:
            # The node's own channel is always shown, so a rule sees 0 rather than nothing.
            queued.add_metric([channel], 0)
            oldest.add_metric([channel], 0.0)

        entries = GaugeMetricFamily(f"{NAMESPACE}_ledger_entries", "Entries in this node's ledger.")
        entries.add_metric([], size)
        families: list[Metric] = [queued, oldest, entries]

        checkpoint_age = GaugeMetricFamily(
            f"{NAMESPACE}_checkpoint_age_seconds",
            "Seconds since this node signed its newest ledger checkpoint (absent before the first).",
        )
        lag = GaugeMetricFamily(
            f"{NAMESPACE}_peer_witness_lag_seconds",
            "Seconds the newest checkpoint has waited for the peer's witness (0 once the peer "
            "accepted it from this process; absent before the first checkpoint).",
        )
        if newest is not None:
            made = _aware(newest.time)
            age = max(0.0, (now - made).total_seconds())
            checkpoint_age.add_metric([], age)
            witnessed = node.metrics.witnessed_size
            lag.add_metric([], 0.0 if witnessed is not None and witnessed >= newest.size else age)
        families += [checkpoint_age, lag]
        if node.metrics.witnessed_at is not None:
            last = GaugeMetricFamily(
                f"{NAMESPACE}_peer_witnessed_timestamp_seconds",
                "Unix time the peer last accepted a checkpoint of this node.",
            )
            last.add_metric([], node.metrics.witnessed_at)
            families.append(last)

        consent = CounterMetricFamily(
            f"{NAMESPACE}_consent_decisions",
            "Disclosure decisions recorded, by outcome (made, internal, blocked).",
            labels=["outcome"],
        )
        counted = {str(kind).removeprefix("disclosure-"): int(count) for kind, count in decisions}
        for outcome in ("made", "internal", "blocked"):
            counted.setdefault(outcome, 0)
        for outcome, count in sorted(counted.items()):
            consent.add_metric([outcome], count)
        families.append(consent)

        versions = GaugeMetricFamily(
            f"{NAMESPACE}_key_manifest_version",
            "Version of this node's newest key manifest (side=own) and of the peer's pinned one.",
            labels=["side"],
        )
        days = GaugeMetricFamily(
            f"{NAMESPACE}_key_expiry_days",
            "Days until the newest usable key of each use, or the manifest itself, expires "
            "(negative once expired).",
            labels=["side", "use"],
        )
        for side, manifest in (("own", own), ("peer", peer)):
            if manifest is None:
                continue
            versions.add_metric([side], manifest.version)
            for use, left in _key_days(manifest, now):
                days.add_metric([side, use], round(left, 3))
        families += [versions, days]
        return families


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
