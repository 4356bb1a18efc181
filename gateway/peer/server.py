"""The peer server: the aiohttp application a node serves to its one peer.

Routes (docs/protocol.md has the byte-level detail):

- ``GET /v1/health``: no authentication, answers ``{"status":"ok"}`` and nothing else.
- ``POST /v1/envelopes``: one envelope (``application/vnd.ssw-gateway.envelope``)
  or a batch (``application/vnd.ssw-gateway.batch``), streamed to spool files
  while the body is hashed; answers one result per envelope (a signed receipt
  or an opaque reason code).
- ``POST /v1/manifests``: the peer's new signed key manifest.
- ``POST /v1/ping``: a signed request with an empty body, the link test of
  ``gateway peer ping``; answers this node's id, its clock (``time``, ISO 8601
  UTC with microseconds) and the version of the caller's manifest it has pinned
  (``pinned_manifest_version``).

Middlewares, outermost first: the request context (request id, one summary
log line, the exception tree mapped to statuses and reason codes, never a
trace to the peer), limits (header size 431, declared body size 413, request
rate 429), and peer authentication (signature checked before the body is
read; the body is checked against the signed digest as it streams).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import shutil
import struct
import tempfile
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import structlog
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage

from gateway import log
from gateway.core.canonical import parse_bounded_json
from gateway.core.envelope import CiphertextHasher, KnownCiphertext
from gateway.core.keys import KeyManifest, verify_manifest
from gateway.core.peer_auth import (
    HEADER_NODE,
    BodyDigest,
    KeyLookup,
    NonceRecorder,
    PeerAuthFailed,
    SignedRequest,
    parse_signed_request,
    verify_request,
)
from gateway.core.policy import Limits as PolicyLimits
from gateway.core.pull import Modes, mode_mismatch
from gateway.core.times import Precision, format_utc
from gateway.errors import (
    STATUS_BY_REASON,
    ClientDisconnected,
    GatewayError,
    InvalidInput,
    NotFound,
    RefusedError,
    StorageError,
    VerificationError,
    http_status_for,
)
from gateway.metrics import NodeMetrics
from gateway.node.consent.receive import apply_pending
from gateway.node.context import NodeContext
from gateway.node.inbox import (
    PreparedBatch,
    ReceiveOutcome,
    SpooledEnvelope,
    commit_batch,
    envelope_not_written,
    prepare_batch,
    receive_envelope,
    write_spooled_envelope,
)
from gateway.node.peer_trust import (
    PeerNotPinned,
    apply_peer_manifest,
    peer_node_of,
    pinned_peer_manifest,
    require_pinned_peer,
)
from gateway.node.runtime import Node, utc_now
from gateway.node.verify_pool import VerifyPool
from gateway.peer.tls_listener import HandshakeLog, LoggedTlsSite
from gateway.store.db import Database
from gateway.store.models_peer import prune_nonces, remember_nonce

__all__ = [
    "BATCH_CONTENT_TYPE",
    "BATCH_MAGIC",
    "CONTEXT",
    "ENVELOPE_CONTENT_TYPE",
    "MANIFEST_CONTENT_TYPE",
    "MEMORY_ENVELOPE_BYTES",
    "MEMORY_PER_REQUEST_BYTES",
    "METRICS",
    "NODE",
    "PEER_AUTH",
    "PEER_SERVICES",
    "PING_PATH",
    "TRANSPORT_LIMITS",
    "BatchPhases",
    "EnvelopeHandler",
    "ManifestHandler",
    "ManifestPreview",
    "PeerServer",
    "PeerServices",
    "TransportLimits",
    "create_node_peer_app",
    "create_peer_app",
    "database_nonce_recorder",
    "limits_from_policy",
    "node_services",
    "read_signed_body",
    "receive_one",
    "receive_spooled",
    "set_summary",
]

ENVELOPE_CONTENT_TYPE: Final = "application/vnd.ssw-gateway.envelope"
BATCH_CONTENT_TYPE: Final = "application/vnd.ssw-gateway.batch"
MANIFEST_CONTENT_TYPE: Final = "application/vnd.ssw-gateway.manifest"
BATCH_MAGIC: Final = b"SGB1"
_CHUNK = 64 * 1024
HEALTH_PATH: Final = "/v1/health"
MANIFESTS_PATH: Final = "/v1/manifests"
PING_PATH: Final = "/v1/ping"

_log = log.get_logger("peer.server")


@dataclass(frozen=True, slots=True)
class TransportLimits:
    """The limits the peer server enforces; built from the node's policy."""

    max_header_bytes: int
    max_body_bytes: int
    max_envelope_bytes: int
    max_batch_envelopes: int
    max_small_body_bytes: int
    rate_per_second: float
    rate_burst: int
    body_idle_timeout: float
    body_total_timeout: float
    clock_skew: timedelta

    def __post_init__(self) -> None:
        for name in (
            "max_header_bytes",
            "max_body_bytes",
            "max_envelope_bytes",
            "max_batch_envelopes",
            "max_small_body_bytes",
            "rate_burst",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"transport limit {name} must be at least 1")
        if self.rate_per_second <= 0 or self.body_idle_timeout <= 0:
            raise ValueError("transport rate and timeouts must be positive")
        if self.body_total_timeout < self.body_idle_timeout:
            raise ValueError("body_total_timeout must not be shorter than body_idle_timeout")


class EnvelopeHandler(Protocol):
    """Receives one spooled envelope; returns the signed receipt bytes.

    Raises :class:`VerificationError` or :class:`RefusedError` to refuse it.
    Runs in a worker thread (it does blocking database and file work).
    """

    def __call__(self, path: Path, *, now: datetime) -> bytes: ...


@dataclass(frozen=True)
class BatchPhases:
    """A batch handler in two halves (:func:`gateway.node.inbox.prepare_batch` and
    :func:`gateway.node.inbox.commit_batch`), so that one request is verified while
    the request before it commits. Each runs in a worker thread; an exception from
    either answers every envelope of the request as a retryable error."""

    prepare: Callable[[Sequence[SpooledEnvelope], datetime], PreparedBatch]
    commit: Callable[[PreparedBatch, datetime], Sequence[ReceiveOutcome]]


class ManifestHandler(Protocol):
    """Verifies the peer's new manifest against the pinned one and pins it.

    Raises :class:`VerificationError` (or :class:`RefusedError`) to refuse.
    """

    def __call__(self, raw: bytes, *, now: datetime) -> None: ...


class ManifestPreview(Protocol):
    """Verifies a manifest against the pinned one *without* storing anything,
    and returns a key lookup over the keys it lists.

    Used when a request is signed with a key only the new manifest lists (the
    first request after a rotation): the request is authenticated with the
    verified new manifest before that manifest is applied.
    """

    def __call__(self, raw: bytes, *, now: datetime) -> KeyLookup: ...


@dataclass(frozen=True)
class PeerServices:
    """What the peer server needs from the node: identities, keys, handlers."""

    node_id: str
    peer_id: str
    spool_dir: Path
    lookup_key: KeyLookup
    remember_nonce: NonceRecorder
    receive_envelope: EnvelopeHandler
    apply_manifest: ManifestHandler | None = None
    preview_manifest: ManifestPreview | None = None
    clock: Callable[[], datetime] = field(default=utc_now)
    pinned_peer_version: Callable[[], int | None] | None = None
    """The version of the peer's manifest this node has pinned (``POST /v1/ping``)."""
    modes: Modes = field(default_factory=Modes)
    """This node's ``[server] peer_mode`` and ``peer_delivery`` (``POST /v1/ping``)."""
    receive_phases: BatchPhases | None = None
    """When set (the node's server), a request's envelopes are received in two calls
    (:func:`gateway.node.inbox.receive_batch` in its halves): ``prepare`` as soon as
    the body is spooled, ``commit`` once every earlier request has committed; else
    one :attr:`receive_envelope` call each."""
    spool_direct: bool = False
    """Write lone envelopes larger than 1 MiB past the page cache (``[server]
    spool_direct_io``; :class:`_SpoolWriter`)."""


def database_nonce_recorder(
    db: Database, *, skew: timedelta, clock: Callable[[], datetime] = utc_now
) -> NonceRecorder:
    """A nonce recorder over the node's database: replays refused across restarts.

    Each call prunes the nonces whose requests are too old to verify any more
    (their time is outside the skew window) in the same transaction, and a
    request whose time is already outside the window by this store's clock is
    refused as a replay: its nonce may be among those pruned.
    """

    def remember(sender: str, nonce: bytes, request_time: datetime) -> bool:
        now = clock()
        if request_time < now - skew:
            # Its nonce may be pruned already, so a replay could not be told
            # from a first use: refused as one (the verifier read its clock
            # earlier, at the edge of the window or before a slow body).
            return False
        with db.transaction() as session:
            prune_nonces(session, older_than=now - skew)
            return remember_nonce(session, sender, nonce, request_time=request_time, now=now)

    return remember


PEER_SERVICES: Final = web.AppKey("peer_services", PeerServices)
METRICS: Final = web.AppKey("metrics", NodeMetrics)
"""The node's metrics, when the app serves an opened node (request latency per route)."""
TRANSPORT_LIMITS: Final = web.AppKey("transport_limits", TransportLimits)
PEER_AUTH: Final = web.RequestKey("peer_auth", SignedRequest)
_Verifier = Callable[[KeyLookup], SignedRequest]
_DEFERRED_AUTH: Final[web.RequestKey[_Verifier]] = web.RequestKey("peer_auth_deferred")
_REASON: Final = web.RequestKey("summary_reason", str)


def set_summary(request: web.Request, text: str) -> None:
    """What the request's ``peer_request`` log line says it did (``reason``)."""
    request[_REASON] = text


class _RateLimiter:
    """A token bucket per remote address (monotonic clock, injected by the caller)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str, now: float) -> bool:
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > 4096:
            self._forget_full(now)
        return True

    def _forget_full(self, now: float) -> None:
        for key, (tokens, last) in list(self._buckets.items()):
            if tokens + (now - last) * self.rate >= self.burst:
                del self._buckets[key]


RATE_LIMITER: Final = web.AppKey("rate_limiter", _RateLimiter)


class _InFlight:
    """Requests being handled now, so that a stop can wait for them."""

    def __init__(self) -> None:
        self.count = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def enter(self) -> None:
        self.count += 1
        self.idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self.idle.set()


IN_FLIGHT: Final = web.AppKey("in_flight", _InFlight)


class _Refusal(Exception):
    """An HTTP refusal with a reason code, raised inside handlers and middlewares."""

    def __init__(self, reason: str, message: str, *, close: bool = True) -> None:
        super().__init__(message)
        self.status = STATUS_BY_REASON[reason]  # transport limits and framing only
        self.reason = reason
        self.close = close


def _error_response(
    status: int, reason: str, request_id: str, *, close: bool, **extra: Any
) -> web.Response:
    body = {"error": {"status": status, "reason": reason, "request_id": request_id, **extra}}
    response = web.json_response(body, status=status)
    if close:
        response.force_close()
    return response


@web.middleware
async def _context_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    request_id = uuid.uuid4().hex
    started = time.monotonic()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    status: int | None = 500
    reason = "ok"
    detail: str | None = None
    in_flight = request.app[IN_FLIGHT]
    in_flight.enter()
    try:
        try:
            response = await handler(request)
        except (ClientDisconnected, ConnectionError):
            # Nothing can be answered: one line, no status, no traceback. The
            # response returned is never sent (aiohttp drops it on a closed transport).
            status, reason = None, "client disconnected"
            response = web.Response(status=400)
            response.force_close()
            return response
        except _Refusal as refusal:
            detail = str(refusal)
            response = _error_response(
                refusal.status, refusal.reason, request_id, close=refusal.close
            )
        except GatewayError as exc:
            detail = exc.diagnostics()
            response = _error_response(http_status_for(exc), exc.reason, request_id, close=True)
        except web.HTTPException as exc:
            code = "not-found" if exc.status == 404 else f"http.{exc.status}"
            if exc.status == 405:
                code = "method-not-allowed"
            response = _error_response(exc.status, code, request_id, close=exc.status >= 400)
        except asyncio.CancelledError:
            reason = "cancelled"
            raise
        except Exception:  # noqa: BLE001 - the peer gets an opaque id, the log keeps the trace
            _log.exception("peer_request_internal_error")
            response = _error_response(500, "internal", request_id, close=True)
        status = response.status
        reason = str(request.get(_REASON, "ok"))
        if status >= 400 and isinstance(response, web.Response):
            reason = _reason_of(response)
        response.headers["X-Request-Id"] = request_id
        # No software or version banner: the peer learns liveness, nothing more.
        response.headers["Server"] = "ssw-gateway"
        return response
    finally:
        in_flight.leave()
        metrics = request.app.get(METRICS)
        if metrics is not None:
            resource = request.match_info.route.resource
            metrics.observe_request(
                "peer",
                request.method,
                resource.canonical if resource is not None else "(no route)",
                time.monotonic() - started,
            )
        auth = request.get(PEER_AUTH)
        _log.info(
            "peer_request",
            method=request.method,
            path=request.path,
            status=status,
            reason=reason,
            peer=auth.sender if isinstance(auth, SignedRequest) else None,
            remote=request.remote,
            detail=detail,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
        structlog.contextvars.unbind_contextvars("request_id")


def _reason_of(response: web.Response) -> str:
    try:
        payload = json.loads(response.body if isinstance(response.body, bytes) else b"{}")
        return str(payload["error"]["reason"])
    except (ValueError, KeyError, TypeError):
        return "error"


@web.middleware
async def _limits_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    limits = request.app[TRANSPORT_LIMITS]
    header_bytes = sum(len(name) + len(value) + 4 for name, value in request.raw_headers)
    if header_bytes > limits.max_header_bytes:
        raise _Refusal(
            "limit.headers",
            f"request headers of {header_bytes} bytes exceed {limits.max_header_bytes}",
        )
    # aiohttp's parser already refuses these; kept as a second line should it ever not.
    lengths = request.headers.getall("Content-Length", [])
    if len(lengths) > 1 or (lengths and "Transfer-Encoding" in request.headers):
        raise _Refusal("request.framing", "ambiguous message framing")
    limiter = request.app[RATE_LIMITER]
    if not limiter.allow(request.remote or "-", time.monotonic()):
        raise _Refusal("limit.rate", "request rate of this peer exceeds the policy")
    declared = request.content_length
    if declared is not None and declared > limits.max_body_bytes:
        raise _Refusal(
            "limit.body",
            f"declared body of {declared} bytes exceeds {limits.max_body_bytes}",
        )
    return await handler(request)


def _verify_headers(
    request: web.Request, services: PeerServices, limits: TransportLimits
) -> Callable[[KeyLookup], SignedRequest]:
    """Parse the headers and return a verifier bound to this request's facts."""
    parsed = parse_signed_request(request.headers)
    now = services.clock()
    path = request.raw_path

    def verify(lookup: KeyLookup) -> SignedRequest:
        return verify_request(
            parsed,
            method=request.method,
            path=path,
            recipient=services.node_id,
            expected_sender=services.peer_id,
            now=now,
            lookup_key=lookup,
            remember_nonce=services.remember_nonce,
            skew=limits.clock_skew,
        )

    return verify


@web.middleware
async def _auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if request.method == "GET" and request.path == HEALTH_PATH:
        return await handler(request)
    services = request.app[PEER_SERVICES]
    verify = _verify_headers(request, services, request.app[TRANSPORT_LIMITS])
    try:
        request[PEER_AUTH] = await asyncio.to_thread(verify, services.lookup_key)
    except PeerAuthFailed as exc:
        # After a rotation the peer signs with a key only its new manifest
        # lists: the manifest route finishes authentication once that
        # manifest verified against the pinned one. Only for the peer's own,
        # fresh request (sender and time are checked before the key): anyone
        # else is refused before a byte of the body is read.
        if (
            exc.reason == "auth.unknown-key"
            and request.headers.get(HEADER_NODE) == services.peer_id
            and request.method == "POST"
            and request.path == MANIFESTS_PATH
            and services.preview_manifest is not None
        ):
            request[_DEFERRED_AUTH] = verify
        else:
            raise
    return await handler(request)


async def _read_chunk(
    request: web.Request, size: int | None, limits: TransportLimits, deadline: float
) -> bytes:
    """Up to ``size`` bytes, or with ``None`` whatever has arrived (at least one
    byte; ``b""`` at the end of the body): no copy when one piece is waiting,
    and never more than the stream buffers (its high-water mark and one socket
    read), however small the HTTP chunks it came in. Idle and total read
    timeouts cut slow bodies."""
    loop_now = asyncio.get_running_loop().time()
    budget = min(limits.body_idle_timeout, deadline - loop_now)
    if budget <= 0:
        raise _Refusal("limit.timeout", "request body took too long")
    try:
        async with asyncio.timeout(budget):
            if size is None:
                return await request.content.readany()
            return await request.content.read(size)
    except TimeoutError:
        raise _Refusal("limit.timeout", "request body stalled") from None
    except ConnectionError:  # aiohttp's "Connection lost": the client hung up mid-body
        raise ClientDisconnected("client disconnected before the body was complete") from None
    except BadHttpMessage as exc:  # a body the HTTP parser refused (chunked framing, length)
        raise _Refusal("request.framing", f"malformed request body: {exc.message}") from None


class _FrameReader:
    """A batch body read in the pieces it arrives in and handed out frame by frame.

    Each piece is fed to the signed digest once, as it arrives, and a frame that
    lies within the piece at hand is a slice of it: no wait and no timer per
    frame (a batch of 100 small envelopes arrives in a handful of pieces, where
    each of its 201 frames used to be a read of its own). Reading stops with a
    ``limit.body`` refusal as soon as the body passes ``limits.max_body_bytes``;
    each read keeps the idle and total timeouts of :func:`_read_chunk`.
    """

    def __init__(
        self, request: web.Request, limits: TransportLimits, deadline: float, digest: BodyDigest
    ) -> None:
        self._request = request
        self._limits = limits
        self._deadline = deadline
        self._digest = digest
        self._piece = b""
        self._at = 0
        self.taken = 0
        """Bytes of the body handed out so far (the digest has seen up to a piece more)."""

    async def _fill(self) -> bool:
        """The next piece of the body, digested; False at the end of the body."""
        piece = await _read_chunk(self._request, None, self._limits, self._deadline)
        if not piece:
            return False
        self._digest.update(piece)
        if self._digest.size > self._limits.max_body_bytes:
            raise _Refusal("limit.body", f"body exceeds {self._limits.max_body_bytes} bytes")
        self._piece, self._at = piece, 0
        return True

    async def some(self, most: int) -> bytes:
        """Between 1 and ``most`` bytes of the body, in order; refuses (``request.framing``)
        at the end of the body."""
        if self._at >= len(self._piece) and not await self._fill():
            raise _Refusal("request.framing", "request body ended inside a frame")
        start = self._at
        end = min(len(self._piece), start + most)
        self._at = end
        self.taken += end - start
        if start == 0 and end == len(self._piece):
            return self._piece
        return self._piece[start:end]

    async def exactly(self, size: int) -> bytes:
        """The next ``size`` bytes of the body; refuses (``request.framing``) if it ends first."""
        first = await self.some(size)
        if len(first) == size:
            return first
        parts, got = [first], len(first)
        while got < size:
            part = await self.some(size - got)
            parts.append(part)
            got += len(part)
        return b"".join(parts)

    async def at_end(self) -> bool:
        """Whether every byte of the body has been handed out (reads on to find out)."""
        return self._at >= len(self._piece) and not await self._fill()


def _expected_digest(request: web.Request) -> bytes:
    auth = request.get(PEER_AUTH)
    if isinstance(auth, SignedRequest):
        return auth.body_sha256
    return parse_signed_request(request.headers).body_sha256


async def read_signed_body(request: web.Request, *, max_bytes: int) -> bytes:
    """Read a small request body whole, bounded, and check it against the signed digest.

    For routes whose body is a small JSON document or manifest (the ledger
    routes use it); large bodies are streamed by the envelope route instead.
    """
    limits = request.app[TRANSPORT_LIMITS]
    cap = min(max_bytes, limits.max_body_bytes)
    declared = request.content_length
    if declared is not None and declared > cap:
        raise _Refusal("limit.body", f"declared body of {declared} bytes exceeds {cap}")
    digest = BodyDigest(_expected_digest(request))
    deadline = asyncio.get_running_loop().time() + limits.body_total_timeout
    parts: list[bytes] = []
    while True:
        chunk = await _read_chunk(request, _CHUNK, limits, deadline)
        if not chunk:
            break
        digest.update(chunk)
        if digest.size > cap:
            raise _Refusal("limit.body", f"body exceeds {cap} bytes")
        parts.append(chunk)
    digest.check()
    return b"".join(parts)


async def _health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


MEMORY_ENVELOPE_BYTES: Final = 64 * 1024
"""An envelope of a batch body (or of a pull answer, read by the client) up to this size
is kept in memory, not spooled to a file (the size an envelope may have to be kept
inline in its inbox row by default)."""
MEMORY_PER_REQUEST_BYTES: Final = 16 << 20
"""Bytes of one request's (or pull answer's) envelopes kept in memory at most; the rest
go to files."""
_MEMORY_TOTAL: Final = 64 << 20
"""Bytes of envelopes kept in memory by all requests together at most."""


def _spool_path(directory: Path, index: int) -> Path:
    """Where the ``index``-th envelope of a request's body is spooled."""
    return directory / f"envelope-{index:04d}"


def _spool_fd(directory: Path, index: int) -> tuple[Path, int]:
    """A new spool file for the ``index``-th envelope of a body (0600, never an existing
    one) and its descriptor, open for writing."""
    path = _spool_path(directory, index)
    return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)


def _spool_file(directory: Path, index: int) -> tuple[Path, Any]:
    path, fd = _spool_fd(directory, index)
    return path, os.fdopen(fd, "wb")


_SPOOL_GROUP: Final = 1 << 20
"""Bytes of a lone envelope's body handed to the spool's workers at a time."""
_SPOOL_AHEAD: Final = 4
"""Groups in the workers' hands at most, per request (bounded memory)."""
_SYNC_ABOVE: Final = 1 << 20
"""A spooled envelope larger than this is flushed to disk as it is spooled: it can
never be kept inline in its row (``inline_envelope_max_bytes`` is at most 1 MiB)."""
_EARLY_SYNC: Final = 8 << 20
"""While a large envelope spools through the page cache, its data is flushed every this
many bytes in the background, so that the sync before its receipt finds little left to
write."""
_DIRECT_BLOCK: Final = 1 << 20
"""Bytes a lone envelope's spool writes at a time past the page cache (``O_DIRECT``)."""
_DIRECT_ALIGN: Final = 4096
"""Alignment of offsets and lengths of those writes (every block size up to a page)."""
_DIGEST_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-digest")
_CIPHERTEXT_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-ciphertext")
_STORE_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-store")
_FLUSH_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-flush")


def _flush(fd: int) -> None:
    """Flush a spool file's data so far (a copy of its descriptor, closed here).

    A failure is raised, to be reported with the file (:meth:`_SpoolWriter.finish`):
    the kernel reports a failed write-back to the first sync that asks after it,
    and not again, so the sync before the receipt would not hear of it."""
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, chunk: bytes | memoryview) -> None:
    view = memoryview(chunk)
    while view:
        view = view[os.write(fd, view) :]


def _direct_io(fd: int, on: bool) -> bool:
    """Turn writing past the page cache on or off for ``fd``; False where the
    platform or the file system does not allow it (nothing changed then)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | flag if on else flags & ~flag)
    except OSError:
        return False
    return True


class _SpoolWriter:
    """Writes one spool file in order (called from one worker thread only).

    By default the bytes go through the page cache, flushed in the background
    every :data:`_EARLY_SYNC` bytes, so that the sync before the receipt finds
    little left to write; a failed flush fails :meth:`finish`. With ``direct``
    (``[server] spool_direct_io``), where the file system allows it, they go
    past the page cache (``O_DIRECT``): gathered into an aligned buffer and
    written in whole blocks of :data:`_DIRECT_BLOCK`, one at a time, so the
    file's data is on the device as it arrives. The last bytes (less than
    :data:`_DIRECT_ALIGN`) are written plainly. A file system that refuses it,
    at the start or at any write, gets plain writes from there on, flushed as
    by default; the file's bytes are the same either way.
    """

    def __init__(self, fd: int, *, direct: bool = False) -> None:
        self._fd = fd
        self._block: mmap.mmap | None = None
        if direct and _direct_io(fd, True):
            self._block = mmap.mmap(-1, _DIRECT_BLOCK)  # page aligned
        self._filled = 0
        self._unflushed = 0
        self._flushes: list[Future[None]] = []

    @property
    def direct(self) -> bool:
        return self._block is not None

    def write(self, chunk: bytes) -> None:
        block = self._block
        if block is None:
            _write_all(self._fd, chunk)
            self._unflushed += len(chunk)
            if self._unflushed >= _EARLY_SYNC:
                self._unflushed = 0
                self._flushes = [f for f in self._flushes if not f.done() or f.exception()]
                self._flushes.append(_FLUSH_WORKER.submit(_flush, os.dup(self._fd)))
            return
        with memoryview(chunk) as view:
            position = 0
            while position < len(view):
                take = min(len(view) - position, _DIRECT_BLOCK - self._filled)
                block[self._filled : self._filled + take] = view[position : position + take]
                self._filled += take
                position += take
                if self._filled < _DIRECT_BLOCK:
                    continue
                if not self._write_block(_DIRECT_BLOCK):
                    _write_all(self._fd, view[position:])  # plain writes from here on
                    return
                self._filled = 0

    def _write_block(self, length: int) -> bool:
        """Write the buffer's first ``length`` bytes (aligned) past the page cache.
        False when the file system refused: everything the buffer holds is then
        written plainly, and so is every later write."""
        block = self._block
        assert block is not None
        written = 0
        with memoryview(block) as view:
            try:
                written = os.write(self._fd, view[:length])
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # the file system's refusal; anything else fails
                    raise
            if written == length:
                return True
            _direct_io(self._fd, False)
            _write_all(self._fd, view[written : self._filled])
        self._release()
        return False

    def finish(self) -> None:
        """Write what the buffer still holds (plainly, its unaligned end), and wait for
        the background flushes: raises :class:`StorageError` if one failed."""
        for flush in self._flushes:
            try:
                flush.result()
            except OSError as exc:
                raise envelope_not_written(exc) from exc
        self._flushes.clear()
        if self._block is None:
            return
        aligned = self._filled - self._filled % _DIRECT_ALIGN
        if aligned and not self._write_block(aligned):
            return
        with memoryview(self._block) as view:
            _direct_io(self._fd, False)
            _write_all(self._fd, view[aligned : self._filled])
        self._release()

    def _release(self) -> None:
        block, self._block = self._block, None
        self._filled = 0
        if block is not None:
            # A view still held (by the traceback of a failed write): freed with it.
            with contextlib.suppress(BufferError):
                block.close()

    def close(self) -> None:
        try:
            self._release()
        finally:
            os.close(self._fd)


async def _done(work: Future[None]) -> None:
    """Wait for a worker's ``work`` (its error raised here); one that is done already
    costs no trip around the event loop (most are, while the workers keep up)."""
    if work.done():
        work.result()
    else:
        await asyncio.wrap_future(work)


class _LoneSpool:
    """The body of a lone envelope, spooled while it arrives: the event loop reads,
    three worker threads take the signed body digest, the ciphertext's hash and
    the writes (:class:`_SpoolWriter`; each in order: one thread each), side by
    side.

    At most :data:`_SPOOL_AHEAD` groups of :data:`_SPOOL_GROUP` bytes are in
    the workers' hands. The file is closed by the writing worker after every
    write it was given, so no write can reach a closed (or reused) descriptor.
    """

    def __init__(self, fd: int, digest: BodyDigest, *, direct: bool) -> None:
        self._fd = fd
        self._digest = digest
        self._ciphertext = CiphertextHasher()
        self._writer = _SpoolWriter(fd, direct=direct)
        self._pending: deque[Future[None]] = deque()
        self.synced = False

    def _hash(self, group: list[bytes]) -> None:
        for chunk in group:
            self._digest.update(chunk)

    def _hash_ciphertext(self, group: list[bytes]) -> None:
        for chunk in group:
            self._ciphertext.update(chunk)

    def _store(self, group: list[bytes]) -> None:
        for chunk in group:
            self._writer.write(chunk)

    def _sync(self) -> None:
        self._writer.finish()
        # A failure is raised here: the kernel reports it to the first sync only, and
        # the sync that stores the file would not hear of it.
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise envelope_not_written(exc) from exc
        self.synced = True

    async def feed(self, group: list[bytes]) -> None:
        self._pending.append(_DIGEST_WORKER.submit(self._hash, group))
        self._pending.append(_CIPHERTEXT_WORKER.submit(self._hash_ciphertext, group))
        self._pending.append(_STORE_WORKER.submit(self._store, group))
        while len(self._pending) > 3 * _SPOOL_AHEAD:
            await _done(self._pending.popleft())

    async def finish(self, *, sync: bool) -> KnownCiphertext | None:
        """Wait for every group; flush the file's data when ``sync``. The
        ciphertext's hash, if the body began like an envelope."""
        self._pending.append(_STORE_WORKER.submit(self._sync if sync else self._writer.finish))
        while self._pending:
            await _done(self._pending.popleft())
        return self._ciphertext.result()

    async def close(self) -> None:
        """Close the file once the writing worker is done with it (a refused body too)."""
        self._pending.clear()
        closing = _STORE_WORKER.submit(self._writer.close)
        await asyncio.shield(asyncio.wrap_future(closing))


async def _spool_lone(
    request: web.Request,
    directory: Path,
    limits: TransportLimits,
    digest: BodyDigest,
    deadline: float,
) -> SpooledEnvelope:
    """The body of ``application/vnd.ssw-gateway.envelope``: one envelope, spooled
    while it is hashed twice (signed digest, ciphertext) in worker threads."""
    path, fd = _spool_fd(directory, 0)
    # Past the page cache only what is declared large: a small envelope may be kept
    # inline in its row and is read back at once.
    try:
        direct = request.app[PEER_SERVICES].spool_direct
        spool = _LoneSpool(
            fd, digest, direct=direct and (request.content_length or 0) > _SYNC_ABOVE
        )
    except BaseException:
        os.close(fd)
        raise
    try:
        size = 0
        group: list[bytes] = []
        grouped = 0
        while True:
            chunk = await _read_chunk(request, None, limits, deadline)
            if not chunk:
                break
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise _Refusal("limit.body", f"body exceeds {limits.max_body_bytes} bytes")
            if size > limits.max_envelope_bytes:
                raise _Refusal("limit.envelope", f"envelope exceeds {limits.max_envelope_bytes}")
            group.append(chunk)
            grouped += len(chunk)
            if grouped >= _SPOOL_GROUP:
                await spool.feed(group)
                group, grouped = [], 0
        if size == 0:
            raise _Refusal("request.framing", "empty request body")
        if group:
            await spool.feed(group)
        known = await spool.finish(sync=size > _SYNC_ABOVE)
    finally:
        await spool.close()
    # The body is the envelope: its signed digest is the envelope's name (one hash).
    return SpooledEnvelope(path, digest.hexdigest(), digest.size, known, spool.synced)


class _MemoryBudget:
    """Bytes of small envelopes the server holds in memory across all requests at once
    (event loop only). A request that finds the budget spent spools to files."""

    def __init__(self, total: int) -> None:
        self.free = total

    def take(self, size: int) -> bool:
        if size > self.free:
            return False
        self.free -= size
        return True

    def give(self, size: int) -> None:
        self.free += size


MEMORY_BUDGET: Final = web.AppKey("memory_budget", _MemoryBudget)


async def _spool_envelopes(
    request: web.Request, directory: Path, limits: TransportLimits, held: list[int]
) -> list[SpooledEnvelope]:
    """Stream the body into one spool file per envelope; check digest and framing.

    Each envelope is hashed (SHA-256) as it is written, so the receiver never
    reads a spooled file again to name it. Small envelopes of a batch are kept in
    memory while the server's :class:`_MemoryBudget` allows; ``held`` gets the
    bytes taken from it, which the caller gives back when the request is done.
    """
    budget = request.app[MEMORY_BUDGET]
    digest = BodyDigest(_expected_digest(request))
    deadline = asyncio.get_running_loop().time() + limits.body_total_timeout
    content_type = request.content_type
    paths: list[SpooledEnvelope] = []
    if content_type == ENVELOPE_CONTENT_TYPE:
        paths.append(await _spool_lone(request, directory, limits, digest, deadline))
    elif content_type == BATCH_CONTENT_TYPE:
        reader = _FrameReader(request, limits, deadline, digest)
        preface = await reader.exactly(8)
        if preface[:4] != BATCH_MAGIC:
            raise _Refusal("request.framing", "batch body does not start with SGB1")
        (count,) = struct.unpack(">I", preface[4:])
        if count == 0:
            raise _Refusal("request.framing", "batch of zero envelopes")
        if count > limits.max_batch_envelopes:
            raise _Refusal(
                "limit.batch",
                f"batch of {count} envelopes exceeds {limits.max_batch_envelopes}",
            )
        for index in range(count):
            (length,) = struct.unpack(">Q", await reader.exactly(8))
            if length == 0:
                raise _Refusal("request.framing", f"envelope {index} is empty")
            if length > limits.max_envelope_bytes:
                raise _Refusal(
                    "limit.envelope",
                    f"envelope {index} of {length} bytes exceeds {limits.max_envelope_bytes}",
                )
            if reader.taken + length > limits.max_body_bytes:
                raise _Refusal("limit.body", f"body exceeds {limits.max_body_bytes} bytes")
            if (
                length <= MEMORY_ENVELOPE_BYTES
                and held[0] + length <= MEMORY_PER_REQUEST_BYTES
                and budget.take(length)
            ):
                # A small envelope stays in memory: no spool file to write, read back
                # and remove (its path is where it is written if it must be a file).
                held[0] += length
                body = await reader.exactly(length)
                paths.append(
                    SpooledEnvelope(
                        _spool_path(directory, index),
                        hashlib.sha256(body).hexdigest(),
                        length,
                        body=body,
                    )
                )
                continue
            path, handle = _spool_file(directory, index)
            own = hashlib.sha256()
            with handle:
                remaining = length
                while remaining:
                    chunk = await reader.some(min(remaining, _CHUNK))
                    own.update(chunk)
                    handle.write(chunk)
                    remaining -= len(chunk)
            paths.append(SpooledEnvelope(path, own.hexdigest(), length))
        if not await reader.at_end():
            raise _Refusal("request.framing", "bytes after the last envelope of the batch")
    else:
        raise _Refusal(
            "request.content-type",
            f"content type must be {ENVELOPE_CONTENT_TYPE} or {BATCH_CONTENT_TYPE}",
        )
    if digest.size > limits.max_body_bytes:
        raise _Refusal("limit.body", f"body exceeds {limits.max_body_bytes} bytes")
    digest.check()
    return paths


def receive_one(services: PeerServices, path: Path, index: int) -> dict[str, Any]:
    """Take one spooled envelope: its result object of ``POST /v1/envelopes``
    (``accepted`` with the receipt in base64, ``refused`` or ``error`` with a reason),
    through the one-envelope handler (peer services without batch phases)."""
    try:
        receipt = services.receive_envelope(path, now=services.clock())
    except (VerificationError, RefusedError, InvalidInput) as exc:
        _log.warning("envelope_refused", index=index, reason=exc.reason, detail=exc.diagnostics())
        return {"index": index, "status": "refused", "reason": exc.reason}
    except GatewayError as exc:
        _log.error("envelope_failed", index=index, reason=exc.reason, detail=exc.diagnostics())
        return {"index": index, "status": "error", "reason": exc.reason, "retryable": True}
    except Exception:  # noqa: BLE001 - one envelope's failure never takes the batch down
        error_id = uuid.uuid4().hex
        _log.exception("envelope_internal_error", index=index, error_id=error_id)
        return {
            "index": index,
            "status": "error",
            "reason": "internal",
            "error_id": error_id,
            "retryable": True,
        }
    return {
        "index": index,
        "status": "accepted",
        "receipt": base64.b64encode(receipt).decode("ascii"),
    }


def _refused_or_failed(index: int, exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, (VerificationError, RefusedError, InvalidInput)):
        _log.warning("envelope_refused", index=index, reason=exc.reason, detail=exc.diagnostics())
        return {"index": index, "status": "refused", "reason": exc.reason}
    if isinstance(exc, GatewayError):
        _log.error("envelope_failed", index=index, reason=exc.reason, detail=exc.diagnostics())
        return {"index": index, "status": "error", "reason": exc.reason, "retryable": True}
    error_id = uuid.uuid4().hex
    _log.error("envelope_internal_error", index=index, error_id=error_id, exc_info=exc)
    return {
        "index": index,
        "status": "error",
        "reason": "internal",
        "error_id": error_id,
        "retryable": True,
    }


_T = TypeVar("_T")


class _Failed:
    """The answers of a request whose batch handler raised: every envelope retryable."""

    def __init__(self, count: int, exc: BaseException) -> None:
        self.results = [_refused_or_failed(index, exc) for index in range(count)]


def _guarded(count: int, work: Callable[[], _T]) -> _T | _Failed:
    """``work()``, or, if it raises, the retryable answers of the ``count`` envelopes."""
    try:
        return work()
    except Exception as exc:  # noqa: BLE001 - a failed batch is answered per envelope, retryable
        return _Failed(count, exc)


def _prepare_all(
    phases: BatchPhases, spooled: list[SpooledEnvelope], now: datetime
) -> PreparedBatch | _Failed:
    """The first half of a request (verification at ``now``, files stored)."""
    return _guarded(len(spooled), lambda: phases.prepare(spooled, now))


def _commit_all(
    phases: BatchPhases, prepared: PreparedBatch, count: int, now: datetime
) -> list[dict[str, Any]]:
    """The second half of a request, in its turn: one transaction dated ``now``, the answers."""
    outcomes = _guarded(count, lambda: phases.commit(prepared, now))
    return outcomes.results if isinstance(outcomes, _Failed) else _results(outcomes, count)


def receive_spooled(
    services: PeerServices, spooled: Sequence[SpooledEnvelope]
) -> list[dict[str, Any]]:
    """Take a run of spooled envelopes as one batch, as a pushed request is taken:
    verified, then recorded in one transaction (:func:`gateway.node.inbox.receive_batch`).

    Returns one result object of ``POST /v1/envelopes`` per envelope, in order
    (``accepted`` with the receipt in base64, ``refused`` with its reason, or a
    retryable ``error``; ``index`` is the position in ``spooled``). A failure of
    the batch as a whole (the database or the envelope store) answers every
    envelope with a retryable ``error`` and records nothing. The pull worker
    takes each answer's envelopes through it. Raises :class:`RuntimeError` for
    services without batch phases (:func:`node_services` always has them).
    """
    phases = services.receive_phases
    if phases is None:
        raise RuntimeError("these peer services take no batches")
    if not spooled:
        return []
    # One time for both halves, as receive_batch takes it: nothing runs between them
    # here, so the batch cannot be outdated by its own verification, however long.
    now = services.clock()
    prepared = _prepare_all(phases, list(spooled), now)
    if isinstance(prepared, _Failed):
        return prepared.results
    return _commit_all(phases, prepared, len(spooled), now)


def _results(outcomes: Sequence[ReceiveOutcome], count: int) -> list[dict[str, Any]]:
    if len(outcomes) != count:
        raise RuntimeError("the batch handler answered a different number of envelopes")
    results: list[dict[str, Any]] = []
    for index, outcome in enumerate(outcomes):
        if outcome.error is not None or outcome.receipt is None:
            error = outcome.error or StorageError("envelope was not processed")
            results.append(_refused_or_failed(index, error))
            continue
        results.append(
            {
                "index": index,
                "status": "accepted",
                "receipt": base64.b64encode(outcome.receipt).decode("ascii"),
            }
        )
    return results


class _ReceiveOrder:
    """Requests of the peer are stored in the order they arrived.

    Each request takes its turn when it enters the handler; its body spools
    while earlier requests are being stored (the sender keeps several batches
    in flight), and it is stored only once every earlier one is done, so a
    channel's bundles are stored in the order they were sent.
    """

    def __init__(self) -> None:
        self._last: asyncio.Future[None] | None = None
        self._before_last: asyncio.Future[None] | None = None

    def take(
        self,
    ) -> tuple[asyncio.Future[None] | None, asyncio.Future[None] | None, asyncio.Future[None]]:
        """(the request two before this one, the one just before, this one's own)."""
        ahead, previous = self._before_last, self._last
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._before_last, self._last = previous, mine
        return ahead, previous, mine


RECEIVE_ORDER: Final = web.AppKey("receive_order", _ReceiveOrder)


async def _post_envelopes(request: web.Request) -> web.Response:
    services = request.app[PEER_SERVICES]
    limits = request.app[TRANSPORT_LIMITS]
    ahead, previous, mine = request.app[RECEIVE_ORDER].take()
    directory: Path | None = None
    held = [0]
    storing: asyncio.Future[list[dict[str, Any]]] | None = None
    try:
        try:
            directory = Path(tempfile.mkdtemp(prefix="req-", dir=services.spool_dir))
            spooled = await _spool_envelopes(request, directory, limits, held)
        except (TimeoutError, ConnectionError):
            raise
        except OSError as exc:  # the spool's own files: a full or failing disk
            raise envelope_not_written(exc) from exc
        phases = services.receive_phases
        if phases is not None:
            # Verified while the request before it commits (never more than one
            # ahead of the committing one); committed in its turn.
            if ahead is not None:
                await asyncio.shield(ahead)
            prepared = await asyncio.to_thread(_prepare_all, phases, spooled, services.clock())
            if previous is not None:
                await asyncio.shield(previous)
            if isinstance(prepared, _Failed):
                results = prepared.results
            else:
                storing = asyncio.ensure_future(
                    asyncio.to_thread(_commit_all, phases, prepared, len(spooled), services.clock())
                )
                results = await asyncio.shield(storing)
        else:
            if previous is not None:
                await asyncio.shield(previous)
            results = []
            for index, item in enumerate(spooled):
                if item.body is not None:  # kept in memory: this handler takes files
                    await asyncio.to_thread(write_spooled_envelope, item.path, item.body)
                results.append(await asyncio.to_thread(receive_one, services, item.path, index))
    finally:
        request.app[MEMORY_BUDGET].give(held[0])

        def release(_: object = None) -> None:
            if not mine.done():
                mine.set_result(None)

        if storing is not None and not storing.done():
            # Cancelled while its batch commits (a stop): the next request waits for
            # the commit, not for this handler, and the spool stays until it is done
            # (a spool left by a stop is removed when the server starts again).
            storing.add_done_callback(release)
            spool = directory
            storing.add_done_callback(lambda _: shutil.rmtree(spool, True) if spool else None)
        else:
            release()
            if directory is not None:
                await asyncio.to_thread(shutil.rmtree, directory, True)
    accepted = sum(1 for result in results if result["status"] == "accepted")
    request[_REASON] = f"accepted {accepted}/{len(results)}"
    return web.json_response({"results": results})


async def _post_manifest(request: web.Request) -> web.Response:
    services = request.app[PEER_SERVICES]
    limits = request.app[TRANSPORT_LIMITS]
    apply = services.apply_manifest
    if apply is None:
        raise NotFound("this node takes no manifests")
    raw = await read_signed_body(request, max_bytes=limits.max_small_body_bytes)
    now = services.clock()
    deferred = request.get(_DEFERRED_AUTH)
    if deferred is not None:
        preview = services.preview_manifest
        if preview is None:
            raise PeerAuthFailed(
                "request key is not in the pinned manifest", reason="auth.unknown-key"
            )
        lookup = await asyncio.to_thread(lambda: preview(raw, now=now))
        request[PEER_AUTH] = await asyncio.to_thread(deferred, lookup)
    if not isinstance(request.get(PEER_AUTH), SignedRequest):
        raise PeerAuthFailed("request was never authenticated", reason="auth.unknown-key")
    await asyncio.to_thread(lambda: apply(raw, now=now))
    request[_REASON] = "manifest applied"
    return web.json_response({"status": "applied"})


async def _ping(request: web.Request) -> web.Response:
    """The link test: reached only through peer authentication (signature, time, nonce)."""
    services = request.app[PEER_SERVICES]
    raw = await read_signed_body(request, max_bytes=1024)
    version = services.pinned_peer_version
    pinned = await asyncio.to_thread(version) if version is not None else None
    now = services.clock()
    request[_REASON] = "ping"
    if raw:
        # The caller's modes (a pull-mode caller says so); an empty body is a
        # caller older than pull mode, which pushes.
        try:
            theirs = Modes.from_answer(parse_bounded_json(raw, max_bytes=1024, max_depth=2))
        except InvalidInput:
            theirs = None
        problem = (
            mode_mismatch(services.modes, theirs, us=services.node_id, peer=services.peer_id)
            if theirs is not None
            else None
        )
        if problem is not None:
            _log.error("peer_mode_mismatch", detail=problem)
            request[_REASON] = "ping: modes do not pair"
    return web.json_response(
        {
            "node": services.node_id,
            "time": format_utc(now, Precision.MICROSECONDS),
            "pinned_manifest_version": pinned,
            **services.modes.to_dict(),
        }
    )


async def _spool_context(app: web.Application) -> AsyncIterator[None]:
    spool = app[PEER_SERVICES].spool_dir
    spool.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Leftovers of a process that died mid-request are never half-received.
    for leftover in spool.iterdir():
        if leftover.name.startswith("req-"):
            shutil.rmtree(leftover, ignore_errors=True)
    yield


def create_peer_app(
    services: PeerServices,
    limits: TransportLimits,
    *,
    extra_routes: Callable[[web.Application], None] | None = None,
) -> web.Application:
    """The peer application of one node (the aiohttp app factory)."""
    app = web.Application(
        middlewares=[_context_middleware, _limits_middleware, _auth_middleware],
        client_max_size=limits.max_small_body_bytes,
    )
    app[PEER_SERVICES] = services
    app[TRANSPORT_LIMITS] = limits
    app[RATE_LIMITER] = _RateLimiter(limits.rate_per_second, limits.rate_burst)
    app[IN_FLIGHT] = _InFlight()
    app[RECEIVE_ORDER] = _ReceiveOrder()
    app[MEMORY_BUDGET] = _MemoryBudget(_MEMORY_TOTAL)
    app.cleanup_ctx.append(_spool_context)
    app.router.add_get(HEALTH_PATH, _health, allow_head=False)
    app.router.add_post("/v1/envelopes", _post_envelopes)
    app.router.add_post(MANIFESTS_PATH, _post_manifest)
    app.router.add_post(PING_PATH, _ping)
    if extra_routes is not None:
        extra_routes(app)
    return app


class _ParserErrorFilter(logging.Filter):
    """One line, no traceback, for malformed requests aiohttp's parser refuses.

    Garbage from the network is expected; a traceback per bad request would let
    anyone fill the log.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        info = record.exc_info
        if info and info[1] is not None and isinstance(info[1], BadHttpMessage):
            _log.info("peer_request_malformed", error=type(info[1]).__name__)
            return False
        return True


def quiet_parser_errors() -> None:
    """Install the filter on aiohttp's server logger (idempotent)."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ParserErrorFilter) for f in logger.filters):
        logger.addFilter(_ParserErrorFilter())


class PeerServer:
    """A running peer application on one listening socket, stopped with draining."""

    def __init__(
        self,
        app: web.Application,
        limits: TransportLimits,
        *,
        drain_timeout: float = 30.0,
    ) -> None:
        self.app = app
        self._limits = limits
        self._drain_timeout = drain_timeout
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=drain_timeout,
            max_line_size=max(8190, limits.max_header_bytes),
            max_field_size=max(8190, limits.max_header_bytes),
            keepalive_timeout=limits.body_idle_timeout,
            # After an early refusal (413, 401) the unread rest of a body is
            # drained for at most this long before the connection is closed.
            lingering_time=min(1.0, limits.body_idle_timeout),
        )
        self._site: web.TCPSite | None = None
        metrics = app.get(METRICS)
        self.handshakes = HandshakeLog(
            "peer", on_refused=metrics.tls_handshake_failed if metrics is not None else None
        )
        """Refused TLS handshakes on this listener: logged (rate-limited) and counted."""
        quiet_parser_errors()
        self.port: int | None = None

    async def start(self, host: str, port: int, *, ssl_context: Any = None) -> int:
        """Start listening; returns the bound port (useful with port 0).

        With ``ssl_context`` the handshakes run in a :class:`LoggedTlsSite`: each
        refused one is logged (``tls_handshake_failed``, rate-limited per remote
        address) and counted in :attr:`handshakes`.
        """
        await self._runner.setup()
        if ssl_context is not None:
            self._site = LoggedTlsSite(
                self._runner, host, port, ssl_context=ssl_context, handshakes=self.handshakes
            )
        else:
            self._site = web.TCPSite(self._runner, host, port, backlog=128)
        await self._site.start()
        bound = [a for a in self._runner.addresses if isinstance(a, tuple) and len(a) >= 2]
        self.port = int(bound[0][1]) if bound else port
        return self.port

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to the drain timeout).

        The listening socket closes first; requests already being handled,
        including those whose bodies are still arriving, may complete; then
        the connections close. aiohttp alone would stop reading bodies at once.
        """
        for site in list(self._runner.sites):
            with contextlib.suppress(RuntimeError):
                await site.stop()
        in_flight = self.app.get(IN_FLIGHT)
        if in_flight is not None and in_flight.count:
            _log.info("draining", requests=in_flight.count)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._drain_timeout):
                    await in_flight.idle.wait()
        with contextlib.suppress(RuntimeError):
            await self._runner.cleanup()


# -- binding to an opened node ----------------------------------------------------------------

HTTP_HEADER_LIMIT: Final = 16 * 1024
"""Bytes of request line plus headers the peer server reads (431 beyond)."""
SMALL_BODY_LIMIT: Final = 4 * 1024 * 1024
"""Largest body of a non-envelope peer request (manifests, ledger documents)."""
BODY_IDLE_TIMEOUT: Final = 60.0
BODY_TOTAL_TIMEOUT: Final = 6 * 3600.0


def limits_from_policy(limits: PolicyLimits) -> TransportLimits:
    """The transport limits of the node's policy (``[limits]`` of ``policy.toml``)."""
    per_minute = limits.peer_requests_per_minute
    return TransportLimits(
        max_header_bytes=HTTP_HEADER_LIMIT,
        max_body_bytes=limits.peer_body_bytes,
        max_envelope_bytes=limits.max_envelope_bytes,
        max_batch_envelopes=limits.peer_batch_size,
        max_small_body_bytes=SMALL_BODY_LIMIT,
        rate_per_second=per_minute / 60.0,
        rate_burst=max(1, min(per_minute, max(10, per_minute // 6))),
        body_idle_timeout=BODY_IDLE_TIMEOUT,
        body_total_timeout=BODY_TOTAL_TIMEOUT,
        clock_skew=limits.clock_skew,
    )


def node_services(
    ctx: NodeContext, *, skew: timedelta, verify_pool: VerifyPool | None = None
) -> PeerServices:
    """The peer services of a node context: its pinned peer, nonce store, inbox.

    The keyring is read from ``ctx`` for every envelope received, so keys the
    serving node swapped in are used at once. ``verify_pool`` checks the
    signatures of large batches (:func:`gateway.node.inbox.receive_batch`).
    """
    node = ctx.node

    peer = peer_node_of(node.node_id)

    def pinned() -> KeyManifest:
        try:
            with node.db.transaction() as session:
                return require_pinned_peer(session, needed_for="no request can be authenticated")
        except PeerNotPinned:
            # To the peer an unpinned sender is an unknown key, like any other.
            raise PeerAuthFailed(
                f"no manifest of node {peer} is pinned", reason="auth.unknown-key"
            ) from None

    def lookup_key(key_id: str, at: datetime) -> bytes:
        return bytes(pinned().signing_key(key_id, at=at))

    def receive(path: Path, *, now: datetime) -> bytes:
        try:
            receipt = receive_envelope(ctx, path, now=now)
        except VerificationError as exc:
            node.metrics.envelope_refused(exc.check)
            raise
        except (RefusedError, InvalidInput) as exc:
            node.metrics.envelope_refused(exc.reason)
            raise
        node.metrics.envelopes_received.inc()
        try:
            apply_pending(ctx, now=now)
        except GatewayError as exc:  # the receipt stands; applied before the next decision
            _log.warning("consent_apply_deferred", error=type(exc).__name__, reason=exc.reason)
        return receipt

    def prepare(envelopes: Sequence[SpooledEnvelope], now: datetime) -> PreparedBatch:
        return prepare_batch(ctx, envelopes, now=now, verify_pool=verify_pool)

    def commit(prepared: PreparedBatch, now: datetime) -> Sequence[ReceiveOutcome]:
        outcomes = commit_batch(ctx, prepared, now=now)
        _count_outcomes(node, outcomes)
        return outcomes

    def preview(raw: bytes, *, now: datetime) -> KeyLookup:
        manifest = verify_manifest(
            raw, node=peer, pinned=pinned(), expected_fingerprint=None, now=now
        )
        return lambda key_id, at: bytes(manifest.signing_key(key_id, at=at))

    def apply(raw: bytes, *, now: datetime) -> None:
        with node.db.transaction() as session:
            apply_peer_manifest(session, raw, node=peer, now=now)

    def pinned_version() -> int | None:
        with node.db.transaction() as session:
            manifest = pinned_peer_manifest(session)
        return manifest.version if manifest is not None else None

    return PeerServices(
        node_id=node.node_id,
        peer_id=peer,
        spool_dir=node.settings.data_dir / "spool",
        lookup_key=lookup_key,
        remember_nonce=database_nonce_recorder(node.db, skew=skew),
        receive_envelope=receive,
        receive_phases=BatchPhases(prepare, commit),
        apply_manifest=apply,
        preview_manifest=preview,
        pinned_peer_version=pinned_version,
        modes=Modes(node.settings.server.peer_mode, node.settings.server.peer_delivery),
        spool_direct=node.settings.server.spool_direct_io,
    )


def _count_outcomes(node: Node, outcomes: Sequence[ReceiveOutcome]) -> None:
    for outcome in outcomes:
        error = outcome.error
        if error is None:
            node.metrics.envelopes_received.inc()
        elif isinstance(error, VerificationError):
            node.metrics.envelope_refused(error.check)
        else:
            node.metrics.envelope_refused(error.reason)


NODE: Final[web.AppKey[Node]] = web.AppKey("node")
CONTEXT: Final[web.AppKey[NodeContext]] = web.AppKey("node_context")


def create_node_peer_app(
    ctx: NodeContext,
    limits: TransportLimits,
    *,
    extra_routes: Callable[[web.Application], None] | None = None,
    verify_pool: VerifyPool | None = None,
) -> web.Application:
    """The peer application of a node context; routes added by ``extra_routes``
    (the pull routes of :mod:`gateway.peer.pull_routes`, the ledger routes,
    chosen by the composition root) find the node and its context under the
    :data:`NODE` and :data:`CONTEXT` app keys."""
    node = ctx.node
    services = node_services(ctx, skew=limits.clock_skew, verify_pool=verify_pool)

    def routes(app: web.Application) -> None:
        app[NODE] = node
        app[METRICS] = node.metrics
        app[CONTEXT] = ctx
        if extra_routes is not None:
            extra_routes(app)

    return create_peer_app(services, limits, extra_routes=routes)
