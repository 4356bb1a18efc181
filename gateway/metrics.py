"""Prometheus metrics of one node: the instruments every part of the code increments.

Each opened :class:`~gateway.node.runtime.Node` owns one :class:`NodeMetrics`
with its own :class:`prometheus_client.CollectorRegistry` (never the global
one), so two nodes in one process, and tests, keep their counts apart.
``gateway serve`` exposes it on ``GET /metrics`` of the local API
(docs/operations.md lists every metric and its alert rules).

What is counted here lives in the serving process and starts from zero when
it starts (Prometheus handles counter resets). What lives in the database
(backlog, ledger size, checkpoint age, keys, consent decisions) is read at
scrape time by the collector that :mod:`gateway.node.health` registers.

Labels carry reason codes and check names of this code base, route
templates and channel names, never case content, bundle ids, user names or
addresses; a label value that does not look like a reason code, or one past
:data:`MAX_LABEL_VALUES` distinct values of one metric, is counted as
``other`` (a peer's answer cannot grow the series without bound).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.registry import Collector

__all__ = [
    "MAX_LABEL_VALUES",
    "NAMESPACE",
    "OTHER",
    "UNMATCHED_ROUTE",
    "NodeMetrics",
    "PeerContact",
    "bounded_label",
    "peer_reason",
]

NAMESPACE: Final = "ssw_gateway"
MAX_LABEL_VALUES: Final = 64
"""Distinct values one label of one metric may take; later ones count as ``other``."""
OTHER: Final = "other"
_LABEL: Final = re.compile(r"^[a-z0-9][a-z0-9._:>-]{0,79}$")
_ROUTE: Final = re.compile(r"^(?:/[A-Za-z0-9._{}-]{0,64}){1,12}$")
UNMATCHED_ROUTE: Final = "(unmatched)"
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _LabelGuard:
    """Keeps one metric's label values few and free of anything but codes
    (or, for ``routes``, route templates)."""

    def __init__(self, *, routes: bool = False) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._routes = routes

    def __call__(self, value: str | None) -> str:
        text = (value or "").strip()
        if self._routes:
            if not _ROUTE.fullmatch(text):
                return UNMATCHED_ROUTE
        else:
            text = text.lower()
            if not _LABEL.fullmatch(text):
                return OTHER
        with self._lock:
            if text in self._seen:
                return text
            if len(self._seen) >= MAX_LABEL_VALUES:
                return OTHER
            self._seen.add(text)
            return text


def bounded_label(value: str | None) -> str:
    """``value`` if it looks like a reason code (lower case, dots, dashes), else ``other``."""
    text = (value or "").strip().lower()
    return text if _LABEL.fullmatch(text) else OTHER


def peer_reason(value: object) -> str:
    """A refusal reason the peer sent, as this node keeps and shows it (a bundle's
    last error, a log line, a metric label): :func:`bounded_label` of it, or
    ``unknown`` when it is not text. No free text of the peer's, and no character a
    database refuses (a lone surrogate is valid JSON), gets further."""
    return bounded_label(value) if isinstance(value, str) else "unknown"


class PeerContact:
    """What this process last learnt of the peer link (for ``/readyz`` and a gauge).

    ``ok`` is ``None`` until the first exchange with the peer; ``at`` is the
    Unix time in seconds of that exchange; ``reason`` is the last failure's code.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ok: bool | None = None
        self.at: float | None = None
        self.reason: str | None = None

    def record(self, ok: bool, reason: str | None = None, *, at: float | None = None) -> None:
        with self._lock:
            self.ok = ok
            self.at = time.time() if at is None else at
            self.reason = None if ok else bounded_label(reason)


class NodeMetrics:
    """The instruments of one node, in a registry of its own.

    Counters (``_total`` added by the library on exposition):

    - ``ssw_gateway_delivery_envelopes_sent``: envelopes posted to the peer.
    - ``ssw_gateway_delivery_envelopes_delivered``: envelopes the peer took with a valid receipt.
    - ``ssw_gateway_delivery_failures{kind, reason}``: ``kind`` is ``refused`` (the
      peer refused the envelope), ``retry`` (it asked us to try again),
      ``receipt`` (its receipt did not verify), ``transport`` (a whole pass
      failed to reach the peer: unreachable, TLS, an unusable answer) or
      ``pass`` (a whole pass failed otherwise: the peer refused the request,
      the database); ``reason`` the reason code.
    - ``ssw_gateway_manifests_delivered``: own key manifests the peer accepted.
    - ``ssw_gateway_envelopes_received``: envelopes received, verified and stored.
    - ``ssw_gateway_envelopes_refused{check}``: envelopes refused, by the failed check.
    - ``ssw_gateway_checkpoints_witnessed``: own checkpoints the peer accepted.
    - ``ssw_gateway_tls_handshake_failures{listener, reason}``: refused TLS
      handshakes (``listener`` is ``peer`` or ``api``; ``reason`` a short code
      such as ``no-certificate``, ``unknown-ca``, ``plain-http``).

    Histogram ``ssw_gateway_http_request_duration_seconds{listener, method, route}``:
    request latency per route template (``/api/v1/outbox/{bundle_id}``, never a raw path).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.started_at = time.time()
        self.peer = PeerContact()
        self._witness_lock = threading.Lock()
        self.witnessed_size: int | None = None
        self.witnessed_at: float | None = None
        self._state_collector: Collector | None = None
        self._guards: dict[str, _LabelGuard] = {}
        r = self.registry
        self.envelopes_sent = Counter(
            "delivery_envelopes_sent",
            "Envelopes posted to the peer (each attempt counts).",
            namespace=NAMESPACE,
            registry=r,
        )
        self.envelopes_delivered = Counter(
            "delivery_envelopes_delivered",
            "Envelopes the peer accepted with a receipt that verified.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.delivery_failures = Counter(
            "delivery_failures",
            "Failed deliveries by kind (refused, retry, receipt, transport, pass) and reason code.",
            ["kind", "reason"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.manifests_delivered = Counter(
            "manifests_delivered",
            "Own key manifests the peer accepted.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.envelopes_received = Counter(
            "envelopes_received",
            "Envelopes received from the peer, verified and stored.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.envelopes_refused = Counter(
            "envelopes_refused",
            "Envelopes from the peer refused, by the check that failed.",
            ["check"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.checkpoints_witnessed = Counter(
            "checkpoints_witnessed",
            "Own ledger checkpoints the peer accepted as a witness.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.tls_handshake_failures = Counter(
            "tls_handshake_failures",
            "TLS handshakes refused by this node's listeners, by listener and reason.",
            ["listener", "reason"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.request_seconds = Histogram(
            "http_request_duration_seconds",
            "Time to answer a request, by listener (api, peer), method and route template.",
            ["listener", "method", "route"],
            namespace=NAMESPACE,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def _guard(self, metric: str, value: str | None) -> str:
        guard = self._guards.get(metric)
        if guard is None:
            guard = self._guards.setdefault(metric, _LabelGuard(routes=metric.startswith("route:")))
        return guard(value)

    # -- what the shells call -------------------------------------------------------------

    def delivery_failed(self, kind: str, reason: str | None) -> None:
        """Count one failed delivery (``kind``: refused, retry, receipt or transport)."""
        self.delivery_failures.labels(
            kind=self._guard("kind", kind), reason=self._guard("delivery", reason)
        ).inc()

    def envelope_refused(self, check: str | None) -> None:
        """Count one envelope refused on receipt, by the check that failed."""
        self.envelopes_refused.labels(check=self._guard("check", check)).inc()

    def tls_handshake_failed(self, listener: str, reason: str | None) -> None:
        """Count one refused TLS handshake on ``listener`` (``peer`` or ``api``)."""
        self.tls_handshake_failures.labels(
            listener=self._guard("listener", listener), reason=self._guard("tls", reason)
        ).inc()

    def observe_request(self, listener: str, method: str, route: str, seconds: float) -> None:
        """Record one request's latency; ``route`` must be the route template
        (a path matching no route is counted as ``(unmatched)``)."""
        self.request_seconds.labels(
            listener=self._guard("listener", listener),
            method=method if method in _METHODS else OTHER,
            route=self._guard(f"route:{listener}", route),
        ).observe(max(0.0, seconds))

    def checkpoint_witnessed(self, size: int, *, at: float | None = None) -> None:
        """The peer accepted our checkpoint of ``size`` entries."""
        with self._witness_lock:
            self.witnessed_size = size
            self.witnessed_at = time.time() if at is None else at
        self.checkpoints_witnessed.inc()

    def add_state_collector(self, make: Callable[[], Collector]) -> None:
        """Register the scrape-time collector once (later calls are no-ops)."""
        with self._witness_lock:
            if self._state_collector is not None:
                return
            self._state_collector = make()
        self.registry.register(self._state_collector)
