"""The peer client: signed requests to the peer node over one session per process.

Use it as an async context manager; it opens one :class:`aiohttp.ClientSession`
with explicit timeouts and the TLS context of the node's settings, and closes
it on exit::

    async with PeerClient(settings, keyring) as client:
        results = await client.post_envelopes([path1, path2])

Failures: the network (refused connection, timeout, TLS failure) raises
:class:`PeerUnreachable`, a :class:`~gateway.errors.TransportError` whose
reason code and message name the cause (:mod:`gateway.peer.failures`); a 5xx
or unreadable answer raises a plain :class:`~gateway.errors.TransportError`;
the sender retries both; a 4xx answer raises :class:`PeerRefused` with the
status and the peer's reason code.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import os
import struct
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import aiohttp

from gateway.core.canonical import parse_bounded_json
from gateway.core.domain import SHA256_HEX
from gateway.core.peer_auth import NONCE_BYTES, RequestSigner, sign_request
from gateway.core.pull import (
    ITEM_PREFACE,
    MAX_ANSWER_MANIFESTS,
    PULL_CONTENT_TYPE,
    PULL_PREFACE,
    ItemKind,
    parse_item_preface,
    parse_preface,
)
from gateway.errors import ConfigError, InvalidInput, RefusedError, TransportError
from gateway.metrics import peer_reason
from gateway.node.runtime import utc_now
from gateway.peer.failures import Failure, classify_client_error, diagnose_disconnect
from gateway.peer.server import (
    BATCH_CONTENT_TYPE,
    BATCH_MAGIC,
    ENVELOPE_CONTENT_TYPE,
    MANIFEST_CONTENT_TYPE,
    MEMORY_ENVELOPE_BYTES,
    MEMORY_PER_REQUEST_BYTES,
    PING_PATH,
)
from gateway.settings import Settings
from gateway.tls import client_ssl_context

__all__ = [
    "EnvelopeResult",
    "PeerClient",
    "PeerRefused",
    "PeerUnreachable",
    "PulledItem",
    "peer_of",
]

_CHUNK = 64 * 1024
MAX_RESPONSE_BYTES: Final = 8 * 1024 * 1024
_RETRYABLE_STATUSES = frozenset({408, 429})


def peer_of(node_id: str) -> str:
    """The other node of the pair."""
    if node_id not in ("jp", "pk"):
        raise ConfigError(f"unknown node {node_id!r}")
    return "pk" if node_id == "jp" else "jp"


class PeerRefused(RefusedError):
    """The peer answered 4xx: ``status`` and the peer's ``reason`` code.

    ``retryable`` is True for answers that may succeed later unchanged (429
    rate limit, 408 slow body).
    """

    reason = "peer.refused"

    def __init__(
        self,
        message: str,
        *,
        status: int,
        reason: str,
        detail: dict[str, Any] | None = None,
        date: str | None = None,
    ) -> None:
        super().__init__(message, reason=reason)
        self.date = date
        """The answer's ``Date`` header (the peer's clock, to the second), if any."""
        self.status = status
        self.retryable = status in _RETRYABLE_STATUSES
        self.detail: dict[str, Any] = detail or {}
        """The other fields of the peer's ``error`` object (e.g. ``witnessed_size``)."""


class PeerUnreachable(TransportError):
    """The peer could not be reached; ``failure`` names the cause.

    ``reason`` is the failure's code (``transport.tls.unknown-issuer``,
    ``transport.refused``... see :mod:`gateway.peer.failures`); the message is
    one line, ``peer at HOST:PORT: CAUSE; NEXT STEP``, the same in the CLI,
    the outbox's last error and the log.
    """

    network_failure = True

    def __init__(self, failure: Failure, *, where: str) -> None:
        super().__init__(failure.describe(where), reason=failure.reason)
        self.failure = failure


@dataclass(frozen=True, slots=True)
class EnvelopeResult:
    """The peer's answer for one envelope of a batch."""

    path: Path
    status: Literal["accepted", "refused", "error"]
    receipt: bytes | None
    reason: str | None
    retryable: bool

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"


@dataclass(frozen=True, slots=True)
class PulledItem:
    """One item of a pull answer.

    A manifest or checkpoint: its bytes in ``data``. An envelope: its SHA-256
    (hex) and size, taken as it was read, and either its bytes in ``data``
    (an envelope of at most :data:`~gateway.peer.server.MEMORY_ENVELOPE_BYTES`,
    while the answer's envelopes kept in memory stay within
    :data:`~gateway.peer.server.MEMORY_PER_REQUEST_BYTES`, the bounds the peer
    server keeps for a pushed batch; no file exists at ``path`` then) or a 0600
    file at ``path``.
    """

    kind: ItemKind
    path: Path | None = None
    data: bytes | None = None
    sha256: str | None = None
    size: int | None = None


PULL_MAX_SMALL_TOTAL: Final = 16 << 20
"""Bytes of one pull answer's manifests and checkpoint together at most (each is small:
a manifest is about 1 KiB; the host sends those not yet acknowledged)."""


def _default_timeout() -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=None, connect=15, sock_connect=15, sock_read=60)


_IN_MEMORY_BATCH = 16 * 1024 * 1024
"""A batch body up to this size is read once into memory (digest and send from the same
bytes); a larger one is streamed from the files, read twice."""


def _file_digest(paths: Sequence[Path]) -> tuple[bytes, int, bytes | None]:
    """SHA-256 and length of the batch body the files make, and the body itself when
    it is small enough to hold (:data:`_IN_MEMORY_BATCH`)."""
    sizes = [path.stat().st_size for path in paths]
    header = BATCH_MAGIC + struct.pack(">I", len(paths))
    if sum(sizes) <= _IN_MEMORY_BATCH:
        parts = [header]
        for path, size in zip(paths, sizes, strict=True):
            data = path.read_bytes()
            if len(data) != size:
                raise TransportError(
                    f"{path} changed while it was being read", reason="transport.file"
                )
            parts.append(struct.pack(">Q", size))
            parts.append(data)
        body = b"".join(parts)
        return hashlib.sha256(body).digest(), len(body), body
    digest = hashlib.sha256()
    digest.update(header)
    total = len(header)
    for path, size in zip(paths, sizes, strict=True):
        prefix = struct.pack(">Q", size)
        digest.update(prefix)
        total += len(prefix)
        with path.open("rb") as handle:
            read = 0
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
                read += len(chunk)
        if read != size:
            raise TransportError(f"{path} changed while it was being read", reason="transport.file")
        total += size
    return digest.digest(), total, None


_STREAM_CHUNK = 1 << 20


def _stored_single(paths: Sequence[Path]) -> tuple[bytes, int] | None:
    """(SHA-256, size) of a lone envelope too large for :data:`_IN_MEMORY_BATCH` whose
    file is named by its SHA-256 (the envelope store's names, checked when it was
    stored), else None: such an envelope needs no read to be digested."""
    if len(paths) != 1:
        return None
    name = paths[0].name
    if not SHA256_HEX.fullmatch(name):
        return None
    try:
        size = paths[0].stat().st_size
    except OSError:
        return None
    if size <= _IN_MEMORY_BATCH:
        return None
    return bytes.fromhex(name), size


async def _batch_body(paths: Sequence[Path]) -> AsyncIterator[bytes]:
    yield BATCH_MAGIC + struct.pack(">I", len(paths))
    for path in paths:
        yield struct.pack(">Q", path.stat().st_size)
        with path.open("rb") as handle:
            while chunk := await asyncio.to_thread(handle.read, _STREAM_CHUNK):
                yield chunk


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def _stored_body(path: Path, length: int) -> AsyncIterator[bytes]:
    """A stored envelope file in chunks; refuses one whose length changed meanwhile.

    Raises :class:`TransportError` (``transport.file``), or :class:`OSError`
    from the read."""
    sent = 0
    with path.open("rb") as handle:
        while chunk := await asyncio.to_thread(handle.read, _STREAM_CHUNK):
            sent += len(chunk)
            yield chunk
    if sent != length:
        raise TransportError(f"{path} changed while it was being sent", reason="transport.file")


class PeerClient:
    """Signed requests to the peer; one session for the life of the context.

    Raises :class:`~gateway.errors.ConfigError` (``config.peer-mode``) on a node
    that holds for a pulling peer (``[server] peer_delivery = "hold"``): such a
    peer listens for no one, so nothing is sent to it, except the link test of
    ``gateway peer ping`` (``link_test=True``), which checks the pairing.
    """

    def __init__(
        self,
        settings: Settings,
        keyring: RequestSigner,
        *,
        peer_url: str | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
        clock: Callable[[], datetime] = utc_now,
        random: Callable[[int], bytes] = os.urandom,
        link_test: bool = False,
    ) -> None:
        if settings.server.peer_delivery == "hold" and not link_test:
            # The peer pulls and listens for no one: nothing is ever sent to it.
            raise ConfigError(
                "this node holds its traffic for the peer to pull ([server] peer_delivery = "
                '"hold"): nothing is sent to the peer from here; it fetches what waits '
                '(a checkpoint with its next pull). Set peer_delivery = "push" if the '
                "peer listens",
                reason="config.peer-mode",
            )
        url = peer_url if peer_url is not None else settings.server.peer_url
        if not url:
            raise ConfigError(
                "no peer URL: set [server] peer_url (or pass --peer-url at init)",
                reason="config.peer-url",
            )
        self._base = url.rstrip("/")
        self._ssl = client_ssl_context(settings.server, peer_url=self._base)
        self._client_certificate = settings.server.tls_cert is not None
        self._recipient = peer_of(settings.node_id)
        self._keyring = keyring
        self._timeout = timeout or _default_timeout()
        self._clock = clock
        self._random = random
        self._session: aiohttp.ClientSession | None = None
        self._body_turn = asyncio.Lock()

    async def __aenter__(self) -> PeerClient:
        connector = aiohttp.TCPConnector(
            ssl=self._ssl if self._ssl is not None else False, limit=8, force_close=False
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, raise_for_status=False
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def base_url(self) -> str:
        return self._base

    def _session_or_fail(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("PeerClient used outside 'async with'")
        return self._session

    def _signed_headers(self, method: str, path: str, body_sha256: bytes) -> dict[str, str]:
        return sign_request(
            self._keyring,
            method=method,
            path=path,
            body_sha256=body_sha256,
            recipient=self._recipient,
            now=self._clock(),
            nonce=self._random(NONCE_BYTES),
        )

    async def _send(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str],
        data: Any,
    ) -> bytes:
        body, _date = await self._exchange(method, path, headers=headers, data=data)
        return body

    async def _exchange(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str],
        data: Any,
    ) -> tuple[bytes, str | None]:
        """One request; the 2xx answer's body and its ``Date`` header."""
        session = self._session_or_fail()
        url = self._base + path
        try:
            async with session.request(method, url, headers=headers, data=data) as response:
                body = await _read_bounded(response)
                status = response.status
                date = response.headers.get("Date")
        except TransportError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            failure = classify_client_error(exc, url=url)
            if failure.ambiguous:
                failure = await diagnose_disconnect(
                    self._base, self._ssl, failure, client_certificate=self._client_certificate
                )
            raise PeerUnreachable(failure, where=urlsplit(url).netloc) from exc
        if status < 400:
            return body, date
        reason = _reason_from(body)
        if status >= 500:
            raise TransportError(
                f"peer answered {status} ({reason}) to {method} {path}", reason="transport.server"
            )
        raise PeerRefused(
            f"peer refused {method} {path}: {status} {reason}",
            status=status,
            reason=reason,
            detail=_error_detail(body),
            date=date,
        )

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        content_type: str = "application/json",
    ) -> bytes:
        """A signed request with a small body; returns the answer's body (2xx only)."""
        headers = self._signed_headers(method, path, hashlib.sha256(body).digest())
        if body or method != "GET":
            headers["Content-Type"] = content_type
        return await self._send(method, path, headers=headers, data=body if body else None)

    async def request_json(self, method: str, path: str, payload: Any = None) -> Any:
        """A signed JSON request; the answer parsed as JSON."""
        body = b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode()
        answer = await self.request(method, path, body)
        try:
            return _answer_json(answer)
        except InvalidInput as exc:
            raise TransportError(
                f"peer answered with malformed JSON ({exc.message})", reason="transport.answer"
            ) from None

    async def health(self) -> dict[str, Any]:
        """``GET /v1/health`` (unsigned): the peer's liveness answer."""
        answer = await self._send("GET", "/v1/health", headers={}, data=None)
        try:
            value = _answer_json(answer)
        except InvalidInput as exc:
            raise TransportError(
                f"peer health answer is not JSON ({exc.message})", reason="transport.answer"
            ) from None
        if not isinstance(value, dict):
            raise TransportError("peer health answer is not an object", reason="transport.answer")
        return value

    async def health_dated(self) -> tuple[dict[str, Any], str | None]:
        """``GET /v1/health`` and the answer's ``Date`` header (the peer's clock)."""
        answer, date = await self._exchange("GET", "/v1/health", headers={}, data=None)
        try:
            value = json.loads(answer)
        except ValueError:
            raise TransportError(
                "peer health answer is not JSON", reason="transport.answer"
            ) from None
        if not isinstance(value, dict):
            raise TransportError("peer health answer is not an object", reason="transport.answer")
        return value, date

    async def ping(self, modes: dict[str, str] | None = None) -> dict[str, Any]:
        """``POST /v1/ping``, signed: the peer's id, clock, pinned manifest version and
        its ``peer_mode`` and ``peer_delivery``. ``modes`` (ours) goes in the body, so
        the peer logs a pairing that cannot work too."""
        value = await self.request_json("POST", PING_PATH, modes)
        if not isinstance(value, dict):
            raise TransportError("peer ping answer is not an object", reason="transport.answer")
        return value

    async def post_envelopes(self, paths: Sequence[Path]) -> list[EnvelopeResult]:
        """Stream envelope files as one batch; one result per file, in order.

        Several calls may run at once (a pipelined sender): their bodies go
        out one after the other, in the order of the calls, while the answers
        are awaited side by side, so the peer receives the batches in order.
        """
        if not paths:
            return []
        single = _stored_single(paths)
        if single is not None:
            return await self._post_stored_envelope(paths[0], *single)
        try:
            digest, length, whole = await asyncio.to_thread(_file_digest, list(paths))
        except OSError as exc:
            raise TransportError(
                f"cannot read an envelope file: {exc.strerror}", reason="transport.file"
            ) from None
        source = _once(whole) if whole is not None else _batch_body(paths)
        answer = await self._post_envelopes(source, digest, length, BATCH_CONTENT_TYPE)
        return _parse_results(answer, paths)

    async def _post_stored_envelope(
        self, path: Path, digest: bytes, length: int
    ) -> list[EnvelopeResult]:
        """One large envelope of the store posted as the body itself: its file name is
        the SHA-256 the request signs, so it is read once, while it streams."""
        try:
            answer = await self._post_envelopes(
                _stored_body(path, length), digest, length, ENVELOPE_CONTENT_TYPE
            )
        except OSError as exc:
            raise TransportError(
                f"cannot read an envelope file: {exc.strerror}", reason="transport.file"
            ) from None
        return _parse_results(answer, [path])

    async def _post_envelopes(
        self, source: AsyncIterator[bytes], digest: bytes, length: int, content_type: str
    ) -> bytes:
        """``POST /v1/envelopes`` with ``source`` as the signed body.

        Holds the client's body turn until the body is sent or the request
        ends, so the bodies of calls made side by side go out one after the
        other, in call order. Raises what :meth:`_send` raises.
        """
        turn = self._body_turn
        await turn.acquire()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                turn.release()

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in source:
                    yield chunk
            finally:
                release()

        try:
            headers = self._signed_headers("POST", "/v1/envelopes", digest)
            headers["Content-Type"] = content_type
            headers["Content-Length"] = str(length)
            return await self._send("POST", "/v1/envelopes", headers=headers, data=body())
        finally:
            release()

    async def pull(
        self,
        path: str,
        ask: dict[str, Any],
        directory: Path,
        *,
        max_items: int,
        max_envelope_bytes: int,
        max_small_bytes: int,
    ) -> list[PulledItem]:
        """A signed pull (``POST /v1/pull``): the host's answer read as it streams.

        Envelopes are hashed as they are read; small ones are kept in memory,
        the others written to 0600 files in ``directory`` (the caller removes
        it; :class:`PulledItem`); manifests and the checkpoint are kept in
        memory, each at most ``max_small_bytes`` and together at most
        :data:`PULL_MAX_SMALL_TOTAL`. Every bound is checked before the bytes it
        guards are read: at most ``max_items`` items, of them at most
        :data:`~gateway.core.pull.MAX_ANSWER_MANIFESTS` manifests (no more than
        one receipts post acknowledges), envelopes of at most
        ``max_envelope_bytes`` each, and no more envelopes or envelope bytes
        than ``ask`` asked for (its ``max_envelopes`` and ``max_bytes``, which
        the host must keep to). A malformed, short or oversized answer raises
        :class:`~gateway.errors.TransportError` (``transport.answer``) and the
        caller stores nothing of it; failures as for every request.
        """
        body = json.dumps(ask, separators=(",", ":")).encode()
        headers = self._signed_headers("POST", path, hashlib.sha256(body).digest())
        headers["Content-Type"] = "application/json"
        session = self._session_or_fail()
        url = self._base + path
        try:
            async with session.request("POST", url, headers=headers, data=body) as response:
                if response.status >= 400:
                    answer = await _read_bounded(response)
                    self._raise_for(response.status, answer, "POST", path, response)
                if response.content_type != PULL_CONTENT_TYPE:
                    raise TransportError(
                        f"peer answered a pull with {response.content_type}",
                        reason="transport.answer",
                    )
                return await _read_pull(
                    response.content,
                    directory,
                    max_items=max_items,
                    max_envelopes=int(ask["max_envelopes"]),
                    max_envelope_total=int(ask["max_bytes"]),
                    max_envelope_bytes=max_envelope_bytes,
                    max_small_bytes=max_small_bytes,
                )
        except (TransportError, PeerRefused):
            raise
        except InvalidInput as exc:
            raise TransportError(
                f"peer's pull answer is unusable: {exc.message}", reason="transport.answer"
            ) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            failure = classify_client_error(exc, url=url)
            if failure.ambiguous:
                failure = await diagnose_disconnect(
                    self._base, self._ssl, failure, client_certificate=self._client_certificate
                )
            raise PeerUnreachable(failure, where=urlsplit(url).netloc) from exc

    def _raise_for(
        self, status: int, body: bytes, method: str, path: str, response: aiohttp.ClientResponse
    ) -> None:
        reason = _reason_from(body)
        if status >= 500:
            raise TransportError(
                f"peer answered {status} ({reason}) to {method} {path}", reason="transport.server"
            )
        raise PeerRefused(
            f"peer refused {method} {path}: {status} {reason}",
            status=status,
            reason=reason,
            detail=_error_detail(body),
            date=response.headers.get("Date"),
        )

    async def post_manifest(self, raw: bytes) -> None:
        """Send this node's new signed key manifest to the peer."""
        await self.request("POST", "/v1/manifests", raw, content_type=MANIFEST_CONTENT_TYPE)


async def _read_exactly(stream: aiohttp.StreamReader, size: int) -> bytes:
    try:
        return await stream.readexactly(size)
    except asyncio.IncompleteReadError:
        raise TransportError("peer's pull answer ended early", reason="transport.answer") from None


async def _read_pull(
    stream: aiohttp.StreamReader,
    directory: Path,
    *,
    max_items: int,
    max_envelopes: int,
    max_envelope_total: int,
    max_envelope_bytes: int,
    max_small_bytes: int,
) -> list[PulledItem]:
    count = parse_preface(await _read_exactly(stream, PULL_PREFACE), max_items=max_items)
    items: list[PulledItem] = []
    held = 0  # envelope bytes kept in memory
    envelopes = envelope_total = small_total = manifests = 0
    for index in range(count):
        kind, length = parse_item_preface(
            await _read_exactly(stream, ITEM_PREFACE),
            max_length=max(max_envelope_bytes, max_small_bytes),
        )
        if kind is ItemKind.MANIFEST:
            manifests += 1
            if manifests > MAX_ANSWER_MANIFESTS:
                raise TransportError(
                    f"the pull answer holds more than {MAX_ANSWER_MANIFESTS} manifests",
                    reason="transport.answer",
                )
        if kind is not ItemKind.ENVELOPE:
            small_total += length
            if length > max_small_bytes or small_total > PULL_MAX_SMALL_TOTAL:
                raise TransportError(
                    f"pulled item {index} of {length} bytes is too large", reason="transport.answer"
                )
            items.append(PulledItem(kind, data=await _read_exactly(stream, length)))
            continue
        envelopes += 1
        envelope_total += length
        if length > max_envelope_bytes:
            raise TransportError(
                f"pulled envelope {index} of {length} bytes exceeds {max_envelope_bytes}",
                reason="transport.answer",
            )
        if envelopes > max_envelopes or envelope_total > max_envelope_total:
            raise TransportError(
                f"the pull answer holds more than the {max_envelopes} envelopes or "
                f"{max_envelope_total} bytes asked for",
                reason="transport.answer",
            )
        target = directory / f"envelope-{index:04d}"
        if length <= MEMORY_ENVELOPE_BYTES and held + length <= MEMORY_PER_REQUEST_BYTES:
            # A small envelope stays in memory: no file to write, read back and remove.
            body = await _read_exactly(stream, length)
            held += length
            digest = hashlib.sha256(body).hexdigest()
            items.append(PulledItem(kind, path=target, data=body, sha256=digest, size=length))
            continue
        hashed = hashlib.sha256()
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            remaining = length
            while remaining:
                chunk = await _read_exactly(stream, min(remaining, _CHUNK))
                hashed.update(chunk)
                await asyncio.to_thread(handle.write, chunk)
                remaining -= len(chunk)
        items.append(PulledItem(kind, path=target, sha256=hashed.hexdigest(), size=length))
    if await stream.read(1):
        raise TransportError("bytes after the last pulled item", reason="transport.answer")
    return items


async def _read_bounded(response: aiohttp.ClientResponse) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(_CHUNK):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise TransportError("peer answer is too large", reason="transport.answer")
        parts.append(chunk)
    return b"".join(parts)


def _answer_json(answer: bytes) -> Any:
    """A peer's answer parsed by the bounded parser (size, depth, numbers): InvalidInput."""
    return parse_bounded_json(answer, max_bytes=MAX_RESPONSE_BYTES)


def _error_detail(body: bytes) -> dict[str, Any]:
    """The scalar fields of a refusal's ``error`` object (bounded; nothing nested)."""
    try:
        error = parse_bounded_json(body[:4096], max_bytes=4096)["error"]
    except (InvalidInput, KeyError, TypeError):
        return {}
    if not isinstance(error, dict):
        return {}
    return {
        str(k)[:64]: v
        for k, v in list(error.items())[:16]
        if isinstance(v, (int, str, bool)) and not (isinstance(v, str) and len(v) > 256)
    }


def _reason_from(body: bytes) -> str:
    try:
        value = parse_bounded_json(body[:4096], max_bytes=4096)
        reason = value["error"]["reason"]
    except (InvalidInput, KeyError, TypeError):
        return "unknown"
    if not isinstance(reason, str) or len(reason) > 64:
        return "unknown"
    return peer_reason(reason)


def _parse_results(answer: bytes, paths: Sequence[Path]) -> list[EnvelopeResult]:
    def bad(why: str) -> TransportError:
        return TransportError(
            f"peer's envelope answer is unusable: {why}", reason="transport.answer"
        )

    try:
        value = _answer_json(answer)
    except InvalidInput as exc:
        raise bad(exc.message) from None
    items = value.get("results") if isinstance(value, dict) else None
    if not isinstance(items, list) or len(items) != len(paths):
        raise bad("not one result per envelope")
    results: list[EnvelopeResult] = []
    for index, (item, path) in enumerate(zip(items, paths, strict=True)):
        if not isinstance(item, dict) or item.get("index") != index:
            raise bad(f"result {index} is malformed")
        status = item.get("status")
        if status == "accepted":
            encoded = item.get("receipt")
            if not isinstance(encoded, str):
                raise bad(f"result {index} has no receipt")
            try:
                receipt = base64.b64decode(encoded.encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError, ValueError):
                raise bad(f"result {index} receipt is not base64") from None
            results.append(EnvelopeResult(path, "accepted", receipt, None, False))
        elif status in ("refused", "error"):
            results.append(
                EnvelopeResult(
                    path, status, None, peer_reason(item.get("reason")), status == "error"
                )
            )
        else:
            raise bad(f"result {index} has unknown status")
    return results
