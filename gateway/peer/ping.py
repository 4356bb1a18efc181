"""``gateway peer ping``: the link to the peer tested end to end, without sending a bundle.

Steps, each reported ``ok``, ``warn`` or ``fail`` with one line of detail:

1. ``pinned``: a manifest of the peer is pinned here (else receipts cannot be
   verified; ``gateway peer add`` first).
2. ``connect``: TCP, the TLS handshake (certificates both ways under mutual
   TLS) and an HTTP answer from ``GET /v1/health``; its ``Date`` header gives
   the peer's clock to the second.
3. ``signed-request``: ``POST /v1/ping`` signed with our operational key; the
   peer verifies signature, time window and nonce, and answers its clock and
   the version of our manifest it has pinned. The round-trip time is measured
   here.
4. ``clock``: the skew between the peer's clock and ours (the midpoint of the
   request), against the policy's ``limits.clock_skew_seconds`` window: ``warn``
   beyond a quarter of it, ``fail`` beyond it.
5. ``manifest``: the peer's pinned version of our manifest against our current
   one: equal ``ok``; older ``warn`` (the newer one waits for delivery, which
   ``sync`` or ``serve`` does first); newer or none ``fail``.
6. ``mode``: our ``[server] peer_mode`` / ``peer_delivery`` against the peer's
   (:func:`gateway.core.pull.mode_mismatch`): two pullers, a puller facing a
   peer that pushes, or a holder facing a peer that does not pull ``fail``
   naming the setting to change. A node that holds for a puller and knows no
   peer URL cannot test the link itself: the step says to ping from the puller.

The report is ``ok`` when no step failed. Time is a parameter (``clock``): the
requests are signed with it and the skew is measured against it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import aiohttp

from gateway.core.pull import Modes, mode_mismatch
from gateway.core.times import Precision, parse_utc
from gateway.errors import GatewayError, TransportError
from gateway.node.context import NodeContext
from gateway.node.own_keys import own_manifest, pending_manifest_count
from gateway.node.peer_trust import pinned_peer_manifest
from gateway.node.policy import load_policy
from gateway.node.runtime import utc_now
from gateway.peer.client import PeerClient, PeerRefused
from gateway.settings import Settings

__all__ = ["PingReport", "PingStep", "ping_peer"]

Status = Literal["ok", "warn", "fail"]


@dataclass(frozen=True, slots=True)
class PingStep:
    """One step of the link test."""

    name: str
    status: Status
    detail: str
    reason: str | None = None
    """The failure's reason code (``transport.tls.unknown-issuer``, ``auth.stale``...)."""


@dataclass
class PingReport:
    """What ``gateway peer ping`` prints. Times in seconds, positive skew: the peer is ahead."""

    peer_url: str
    steps: list[PingStep] = field(default_factory=list)
    round_trip_ms: float | None = None
    clock_skew_seconds: float | None = None
    skew_window_seconds: float | None = None
    our_manifest_version: int | None = None
    peer_pinned_manifest_version: int | None = None

    @property
    def ok(self) -> bool:
        return all(step.status != "fail" for step in self.steps)

    @property
    def failure(self) -> PingStep | None:
        return next((step for step in self.steps if step.status == "fail"), None)

    def to_dict(self) -> dict[str, Any]:
        failure = self.failure
        return {
            "ok": self.ok,
            "peer_url": self.peer_url,
            "reason": failure.reason if failure is not None else None,
            "round_trip_ms": self.round_trip_ms,
            "clock_skew_seconds": self.clock_skew_seconds,
            "skew_window_seconds": self.skew_window_seconds,
            "our_manifest_version": self.our_manifest_version,
            "peer_pinned_manifest_version": self.peer_pinned_manifest_version,
            "steps": [
                {"name": s.name, "status": s.status, "detail": s.detail, "reason": s.reason}
                for s in self.steps
            ],
        }


def _parse_time(value: object) -> datetime | None:
    """The peer's ``time`` (``POST /v1/ping``), or None when it is no wire time."""
    try:
        return parse_utc(value, field="time", precision=Precision.MICROSECONDS)
    except GatewayError:
        return None


def _date_header(value: str | None) -> datetime | None:
    if not value or len(value) > 64:
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _describe_skew(skew: float) -> str:
    if abs(skew) < 0.0005:
        return "the clocks agree"
    side = "ahead of" if skew > 0 else "behind"
    return f"the peer's clock is {abs(skew):.3f} s {side} ours"


def _clock_step(skew: float, window: timedelta, *, coarse: bool) -> PingStep:
    limit = window.total_seconds()
    text = _describe_skew(skew) + (" (to the second, from its Date header)" if coarse else "")
    if abs(skew) > limit:
        return PingStep(
            "clock",
            "fail",
            f"{text}: beyond the policy's window of {limit:.0f} s, signed requests are "
            "refused; fix NTP on both hosts",
            "clock.skew",
        )
    if abs(skew) > limit / 4:
        return PingStep(
            "clock",
            "warn",
            f"{text}: more than a quarter of the policy's {limit:.0f} s window; check NTP",
            "clock.skew",
        )
    return PingStep("clock", "ok", f"{text} (window {limit:.0f} s)")


def _manifest_step(ours: int, pinned: object) -> PingStep:
    if not isinstance(pinned, int) or isinstance(pinned, bool):
        return PingStep(
            "manifest",
            "fail",
            "the peer has pinned no manifest of ours: hand it 'gateway keys export' and "
            "have its administrator run 'gateway peer add'",
            "manifest.unpinned",
        )
    if pinned == ours:
        return PingStep("manifest", "ok", f"the peer holds our manifest version {ours}")
    if pinned < ours:
        return PingStep(
            "manifest",
            "warn",
            f"the peer holds our manifest version {pinned}, ours is {ours}: the newer one "
            "waits for delivery ('gateway sync' or 'gateway serve' sends it first)",
            "manifest.behind",
        )
    return PingStep(
        "manifest",
        "fail",
        f"the peer holds our manifest version {pinned}, newer than ours ({ours}): was this "
        "node restored from an old backup? Reconcile with the peer's administrator",
        "manifest.ahead",
    )


def _refusal_step(
    error: PeerRefused, coarse_skew: float | None, window: timedelta, *, waiting: int | None
) -> PingStep:
    if error.reason == "auth.stale":
        skew = (
            f" ({_describe_skew(coarse_skew)}, window {window.total_seconds():.0f} s)"
            if coarse_skew is not None
            else ""
        )
        detail = f"the peer refused our signed request as outside its time window{skew}"
    elif error.reason == "auth.unknown-key" and waiting is not None:
        detail = (
            f"the peer does not know our signing key yet: our manifest version {waiting} "
            "waits for delivery; run 'gateway sync' (or let 'gateway serve' send it)"
        )
    elif error.reason == "auth.unknown-key":
        detail = (
            "the peer does not know our signing key: it has not pinned our manifest, or "
            "holds an older one; hand it 'gateway keys export' ('gateway peer add' there), "
            "or deliver the newer manifest with 'gateway sync'"
        )
    elif error.status == 404:
        detail = "the peer has no /v1/ping: its software is older than ours"
    else:
        detail = f"the peer refused our signed request: {error.status} {error.reason}"
    return PingStep("signed-request", "fail", detail, error.reason)


async def ping_peer(
    ctx: NodeContext,
    *,
    settings: Settings | None = None,
    clock: Callable[[], datetime] = utc_now,
    limits: aiohttp.ClientTimeout | None = None,
) -> PingReport:
    """Test the link to the peer of ``node``; never raises for a link failure.

    ``settings`` defaults to the node's (tests pass other TLS material);
    ``clock`` signs the requests and is the clock the skew is measured against;
    ``limits`` are the client's timeouts (10 s to connect, 20 s to read by default).
    Raises :class:`~gateway.errors.ConfigError` only when the settings cannot
    make a client at all (no peer URL, plain HTTP off loopback).
    """

    node, keyring = ctx.node, ctx.keyring
    chosen = settings if settings is not None else node.settings
    window = load_policy(chosen).limits.clock_skew
    ours = Modes(chosen.server.peer_mode, chosen.server.peer_delivery)
    if chosen.server.peer_url is None and ours.peer_delivery == "hold":
        peer = "pk" if node.node_id == "jp" else "jp"
        return PingReport(
            peer_url="",
            steps=[
                PingStep(
                    "mode",
                    "ok",
                    f'{peer} pulls from this node ([server] peer_delivery = "hold") and no '
                    f"peer_url is set here: test the link with 'gateway peer ping' on {peer}",
                )
            ],
        )
    with node.db.transaction() as session:
        our_version = own_manifest(session).version
        pinned = pinned_peer_manifest(session)
        waiting = our_version if pending_manifest_count(session) else None
    limit = limits or aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10, sock_read=20)
    client = PeerClient(chosen, keyring, clock=clock, timeout=limit, link_test=True)
    report = PingReport(
        peer_url=client.base_url,
        our_manifest_version=our_version,
        skew_window_seconds=window.total_seconds(),
    )
    if pinned is None:
        report.steps.append(
            PingStep(
                "pinned",
                "fail",
                "no manifest of the peer is pinned here: run 'gateway peer add "
                "MANIFEST_FILE --fingerprint FP' first",
                "config.peer",
            )
        )
    else:
        report.steps.append(
            PingStep("pinned", "ok", f"peer {pinned.node} manifest version {pinned.version}")
        )
    scheme = "TLS" if client.base_url.startswith("https://") else "plain HTTP (loopback)"
    async with client:
        started = time.monotonic()
        try:
            _health, date = await client.health_dated()
        except GatewayError as exc:
            detail = exc.message
            if ours.peer_mode == "pull":
                detail += (
                    '; this node pulls ([server] peer_mode = "pull"): the peer must listen '
                    'and hold for it (peer_mode = "push", peer_delivery = "hold" there)'
                )
            elif ours.peer_delivery == "hold":
                detail += (
                    "; this node holds for the peer to pull ([server] peer_delivery = "
                    '"hold"): the peer needs no listener; ping from it instead'
                )
            report.steps.append(PingStep("connect", "fail", detail, exc.reason))
            return report
        report.steps.append(
            PingStep(
                "connect",
                "ok",
                f"{scheme} to {client.base_url}: answered in "
                f"{(time.monotonic() - started) * 1000:.1f} ms",
            )
        )
        peer_date = _date_header(date)
        coarse = (peer_date - clock()).total_seconds() if peer_date is not None else None
        sent_at = clock()
        started = time.monotonic()
        try:
            answer = await client.ping(ours.to_dict())
        except PeerRefused as exc:
            report.steps.append(_refusal_step(exc, coarse, window, waiting=waiting))
            if coarse is not None:
                report.clock_skew_seconds = round(coarse, 3)
                report.steps.append(_clock_step(coarse, window, coarse=True))
            return report
        except TransportError as exc:
            report.steps.append(PingStep("signed-request", "fail", exc.message, exc.reason))
            return report
        elapsed = time.monotonic() - started
        received_at = sent_at + timedelta(seconds=elapsed)
    report.round_trip_ms = round(elapsed * 1000, 1)
    peer_time = _parse_time(answer.get("time"))
    report.steps.append(
        PingStep(
            "signed-request",
            "ok",
            f"the peer verified our signed request; round trip {report.round_trip_ms} ms",
        )
    )
    if peer_time is None:
        report.steps.append(
            PingStep("clock", "fail", "the peer's answer carries no usable time", "ping.answer")
        )
    else:
        midpoint = sent_at + (received_at - sent_at) / 2
        skew = (peer_time - midpoint).total_seconds()
        report.clock_skew_seconds = round(skew, 3)
        report.steps.append(_clock_step(skew, window, coarse=False))
    pinned_version = answer.get("pinned_manifest_version")
    report.peer_pinned_manifest_version = (
        pinned_version if isinstance(pinned_version, int) else None
    )
    report.steps.append(_manifest_step(our_version, pinned_version))
    report.steps.append(_mode_step(node.node_id, ours, answer))
    return report


def _mode_step(us: str, ours: Modes, answer: dict[str, Any]) -> PingStep:
    peer = "pk" if us == "jp" else "jp"
    theirs = Modes.from_answer(answer) or Modes()
    problem = mode_mismatch(ours, theirs, us=us, peer=peer)
    if problem is not None:
        return PingStep("mode", "fail", problem, "config.peer-mode")
    if ours.peer_mode == "pull":
        text = f"{us} pulls from {peer}, which holds for it"
    elif ours.peer_delivery == "hold":
        text = f"{peer} pulls from {us}, which holds for it"
    else:
        text = "both nodes push"
    return PingStep("mode", "ok", text)
