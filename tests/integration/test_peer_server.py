"""The peer server over real sockets: authentication, limits, batches, nothing stored on refusal."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
from sqlalchemy import func, select

from gateway.core.peer_auth import (
    HEADER_SIGNATURE,
    KeyLookup,
    sign_request,
)
from gateway.errors import RefusedError, TransportError
from gateway.node.runtime import utc_now
from gateway.peer import client as peer_client
from gateway.peer.client import PeerClient, PeerRefused
from gateway.peer.server import BATCH_CONTENT_TYPE, BATCH_MAGIC, ENVELOPE_CONTENT_TYPE
from gateway.settings import Settings
from gateway.store.db import Database
from gateway.store.models_peer import PeerNonce
from tests.nodes import (
    TEST_LIMITS,
    EnvelopeStore,
    KeyTable,
    RawSigner,
    ServerThread,
    make_services,
    migrated_database,
    raw_exchange,
    start_test_server,
    status_of,
)

JP = RawSigner.make("jp", "jp-op-1")
PK = RawSigner.make("pk", "pk-op-1")


def jp_settings(tmp_path: Path, url: str) -> Settings:
    return Settings.model_validate(
        {"home": tmp_path / "jp", "node": {"id": "jp"}, "server": {"peer_url": url}}
    )


class Harness:
    def __init__(self, tmp_path: Path, db: Database, server: ServerThread, store: EnvelopeStore):
        self.tmp_path = tmp_path
        self.db = db
        self.server = server
        self.store = store

    def client(self, signer: RawSigner = JP, **kwargs: Any) -> PeerClient:
        return PeerClient(jp_settings(self.tmp_path, self.server.url), signer, **kwargs)

    def nonce_count(self) -> int:
        with self.db.transaction() as session:
            return int(session.scalar(select(func.count()).select_from(PeerNonce)) or 0)

    def spool_empty(self) -> bool:
        spool = self.tmp_path / "spool"
        return not any(spool.iterdir())

    def raw(self, head: str, body: bytes = b"") -> tuple[int, bytes, bool]:
        response, closed = raw_exchange(self.server.port, head.encode() + body)
        return status_of(response), response, closed

    def assert_nothing_stored(self) -> None:
        assert self.store.stored() == []
        assert self.spool_empty()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    db = migrated_database(f"sqlite:///{tmp_path / 'pk.sqlite3'}")
    services, store = make_services(
        tmp_path, db, keys=KeyTable({"jp-op-1": JP.public_key}), receiver=PK
    )
    with start_test_server(services) as server:
        yield Harness(tmp_path, db, server, store)
    db.dispose()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def envelope_files(tmp_path: Path, *contents: bytes) -> list[Path]:
    paths = []
    for index, content in enumerate(contents):
        path = tmp_path / f"out-{index}.env"
        path.write_bytes(content)
        paths.append(path)
    return paths


def signed_head(
    signer: RawSigner,
    body: bytes,
    *,
    path: str = "/v1/envelopes",
    content_type: str = ENVELOPE_CONTENT_TYPE,
    now: datetime | None = None,
    nonce: bytes | None = None,
    extra: str = "",
    length: bool = True,
) -> str:
    headers = sign_request(
        signer,
        method="POST",
        path=path,
        body_sha256=hashlib.sha256(body).digest(),
        recipient="pk",
        now=now or utc_now(),
        nonce=nonce or __import__("os").urandom(16),
    )
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {content_type}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join(lines) + "\r\n" + extra + "\r\n"


def batch(*envelopes: bytes) -> bytes:
    out = BATCH_MAGIC + struct.pack(">I", len(envelopes))
    for envelope in envelopes:
        out += struct.pack(">Q", len(envelope)) + envelope
    return out


def error_reason(response: bytes) -> str:
    body = response.partition(b"\r\n\r\n")[2]
    return str(json.loads(body)["error"]["reason"])


# --- what works -------------------------------------------------------------------------------


def test_health_answers_without_authentication_and_reveals_only_liveness(harness: Harness) -> None:
    status, response, _ = harness.raw(
        "GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status == 200
    assert json.loads(response.partition(b"\r\n\r\n")[2]) == {"status": "ok"}
    head = response.partition(b"\r\n\r\n")[0].lower()
    assert b"aiohttp" not in head
    assert b"python" not in head
    assert run(_health(harness)) == {"status": "ok"}


async def _health(harness: Harness) -> dict[str, Any]:
    async with harness.client() as client:
        return await client.health()


@pytest.mark.parametrize("spent", [False, True], ids=["in-memory", "budget-spent"])
def test_batch_delivered_with_one_receipt_per_envelope(
    harness: Harness, tmp_path: Path, spent: bool
) -> None:
    """Small envelopes of a batch are kept in memory while the server-wide budget
    allows, and spooled to files otherwise: the same answers either way, and every
    byte taken from the budget is given back."""
    from gateway.peer.server import MEMORY_BUDGET  # noqa: PLC0415

    budget = harness.server.app[MEMORY_BUDGET]
    total = budget.free
    if spent:
        budget.free = 0
    paths = envelope_files(tmp_path, b"first envelope", b"second REFUSE envelope", b"third")

    async def send() -> Any:
        async with harness.client() as client:
            return await client.post_envelopes(paths)

    results = run(send())
    assert [r.status for r in results] == ["accepted", "refused", "accepted"]
    assert results[1].reason == "envelope.signature"
    for result, content in ((results[0], b"first envelope"), (results[2], b"third")):
        assert result.receipt is not None
        PK.key.verify_key.verify(
            b"ssw-gateway/receipt/v1\x00" + hashlib.sha256(content).digest(), result.receipt
        )
    assert harness.store.stored() == [b"first envelope", b"third"]
    assert harness.spool_empty()
    assert harness.nonce_count() == 1
    assert budget.free == (0 if spent else total)


def _chunked(body: bytes, piece: int) -> bytes:
    """``body`` in HTTP chunks of ``piece`` bytes (the server reads it piece by piece)."""
    parts = [body[i : i + piece] for i in range(0, len(body), piece)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def _signed_batch(body: bytes, piece: int | None) -> tuple[str, bytes]:
    """The signed head and the bytes to send for a batch ``body``: whole with its
    length, or (``piece``) in HTTP chunks of that many bytes."""
    if piece is None:
        return signed_head(JP, body, content_type=BATCH_CONTENT_TYPE), body
    head = signed_head(
        JP, body, content_type=BATCH_CONTENT_TYPE, length=False,
        extra="Transfer-Encoding: chunked\r\n",
    )  # fmt: skip
    return head, _chunked(body, piece)


@pytest.mark.parametrize("piece", [1, 7, 4096, None], ids=["1-byte", "7-byte", "4k", "whole"])
def test_batch_frames_are_taken_whatever_pieces_the_body_arrives_in(
    harness: Harness, piece: int | None
) -> None:
    """The server takes a batch's frames out of the pieces its body arrives in: a
    length or an envelope split across pieces, several in one piece, envelopes kept
    in memory and (once the memory budget is spent) spooled to files, all give the
    same answers and the same stored bytes."""
    from gateway.peer.server import MEMORY_BUDGET  # noqa: PLC0415

    budget = harness.server.app[MEMORY_BUDGET]
    total = budget.free
    envelopes = [
        b"a" * 5,
        b"second REFUSE envelope",
        bytes(range(256)) * 20,  # 5 KiB: in memory while the budget lasts
        b"c" * 9000,  # past the budget below: spooled to a file
    ]
    budget.free = 5 + 22 + 5120  # the first three fit; the last goes to a file
    body = batch(*envelopes)
    head, sent = _signed_batch(body, piece)
    status, response, _ = harness.raw(head, sent)
    assert status == 200, response
    results = json.loads(response.partition(b"\r\n\r\n")[2])["results"]
    assert [r["status"] for r in results] == [
        "accepted", "refused", "accepted", "accepted",
    ]  # fmt: skip
    assert sorted(harness.store.stored()) == sorted(e for e in envelopes if b"REFUSE" not in e)
    assert harness.spool_empty()
    assert budget.free == 5 + 22 + 5120
    budget.free = total


@pytest.mark.parametrize("piece", [3, None], ids=["3-byte", "whole"])
@pytest.mark.parametrize(
    ("case", "tail"),
    [("trailing bytes", b"x"), ("a length cut short", b"\x00\x00\x00")],
)
def test_bytes_past_the_last_envelope_are_refused_in_any_pieces(
    harness: Harness, piece: int | None, case: str, tail: bytes
) -> None:
    """What follows the last envelope is refused whether it arrives with it or later."""
    body = batch(b"abc", b"defgh") + tail
    head, sent = _signed_batch(body, piece)
    status, response, _ = harness.raw(head, sent)
    assert status == 400, case
    assert error_reason(response) == "request.framing", case
    harness.assert_nothing_stored()


@pytest.mark.parametrize("piece", [1000, None], ids=["1000-byte", "whole"])
def test_a_batch_body_past_the_limit_is_refused_in_any_pieces(
    harness: Harness, piece: int | None
) -> None:
    """Envelopes each within their limit whose batch passes the body limit: refused
    as ``limit.body`` however the body arrives, nothing stored."""
    size = TEST_LIMITS.max_envelope_bytes
    count = TEST_LIMITS.max_body_bytes // size  # with the frames, just past the limit
    body = batch(*[bytes([65 + i]) * size for i in range(count)])
    assert len(body) > TEST_LIMITS.max_body_bytes
    head, sent = _signed_batch(body, piece)
    status, response, _ = harness.raw(head, sent)
    assert status == 413
    assert error_reason(response) == "limit.body"
    harness.assert_nothing_stored()


def test_a_lone_large_stored_envelope_is_posted_as_itself_under_its_name(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An envelope of the store too large for an in-memory batch goes out as the body
    itself, signed with the SHA-256 its file is named by (no read to digest it); one
    whose bytes do not match its name is refused by the digest check, nothing stored."""
    monkeypatch.setattr(peer_client, "_IN_MEMORY_BATCH", 4 * 1024)  # the harness allows 16 KiB
    content = b"large envelope " + os.urandom(12 * 1024)
    sha = hashlib.sha256(content).hexdigest()
    path = tmp_path / sha
    path.write_bytes(content)

    async def send(paths: list[Path]) -> Any:
        async with harness.client() as client:
            return await client.post_envelopes(paths)

    [result] = run(send([path]))
    assert result.status == "accepted"
    assert result.receipt is not None
    PK.key.verify_key.verify(
        b"ssw-gateway/receipt/v1\x00" + hashlib.sha256(content).digest(), result.receipt
    )
    assert harness.store.stored() == [content]

    forged = tmp_path / "forged" / hashlib.sha256(b"other bytes").hexdigest()
    forged.parent.mkdir()
    forged.write_bytes(content)
    with pytest.raises(PeerRefused) as caught:
        run(send([forged]))
    assert (caught.value.status, caught.value.reason) == (401, "auth.digest")
    assert harness.store.stored() == [content]
    assert harness.spool_empty()


def test_single_envelope_with_chunked_body_accepted(harness: Harness) -> None:
    body = b"x" * 3000
    head = signed_head(JP, body, length=False, extra="Transfer-Encoding: chunked\r\n")
    chunked = (
        b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:1000], body[1000:])) + b"0\r\n\r\n"
    )
    status, response, _ = harness.raw(head, chunked)
    assert status == 200, response
    assert json.loads(response.partition(b"\r\n\r\n")[2])["results"][0]["status"] == "accepted"
    assert harness.store.stored() == [body]


def test_generic_signed_request_reaches_an_extra_route(tmp_path: Path) -> None:
    from aiohttp import web  # noqa: PLC0415

    from gateway.peer.server import PEER_AUTH, create_peer_app, read_signed_body  # noqa: PLC0415

    async def echo(request: web.Request) -> web.Response:
        body = await read_signed_body(request, max_bytes=1024)
        return web.json_response({"sender": request[PEER_AUTH].sender, "echo": body.decode()})

    db = migrated_database(f"sqlite:///{tmp_path / 'pk.sqlite3'}")
    services, _ = make_services(
        tmp_path, db, keys=KeyTable({"jp-op-1": JP.public_key}), receiver=PK
    )
    app = create_peer_app(
        services, TEST_LIMITS, extra_routes=lambda a: a.router.add_post("/v1/echo", echo)
    )

    async def call(url: str) -> Any:
        async with PeerClient(jp_settings(tmp_path, url), JP) as client:
            return await client.request_json("POST", "/v1/echo", {"hello": "pk"})

    with ServerThread(app) as server:
        assert run(call(server.url)) == {"sender": "jp", "echo": '{"hello":"pk"}'}
    db.dispose()


# --- authentication refusals --------------------------------------------------------------------


def test_replayed_request_refused(harness: Harness) -> None:
    body = b"an envelope"
    head = signed_head(JP, body)
    first, _, _ = harness.raw(head, body)
    assert first == 200
    status, response, _ = harness.raw(head, body)
    assert status == 401
    assert error_reason(response) == "auth.replay"
    assert harness.store.stored() == [body]
    assert harness.nonce_count() == 1


def test_replay_refused_after_server_restart(tmp_path: Path) -> None:
    db = migrated_database(f"sqlite:///{tmp_path / 'pk.sqlite3'}")
    keys = KeyTable({"jp-op-1": JP.public_key})
    body = b"an envelope"
    head = signed_head(JP, body)
    statuses = []
    for _ in range(2):
        services, _store = make_services(tmp_path, db, keys=keys, receiver=PK)
        with start_test_server(services) as server:
            response, _ = raw_exchange(server.port, head.encode() + body)
            statuses.append((status_of(response), response))
    assert statuses[0][0] == 200
    assert statuses[1][0] == 401
    assert error_reason(statuses[1][1]) == "auth.replay"
    db.dispose()


def test_nonce_store_refuses_a_replay_on_each_engine(database_url: str) -> None:
    from gateway.peer.server import database_nonce_recorder  # noqa: PLC0415

    db = migrated_database(database_url)
    now = utc_now()
    remember = database_nonce_recorder(db, skew=timedelta(minutes=5), clock=lambda: now)
    assert remember("jp", b"n" * 16, now) is True
    assert remember("jp", b"n" * 16, now) is False
    assert remember("pk", b"n" * 16, now) is True
    later = now + timedelta(minutes=6)
    remember_later = database_nonce_recorder(db, skew=timedelta(minutes=5), clock=lambda: later)
    assert remember_later("jp", b"m" * 16, later) is True
    with db.transaction() as session:
        left = session.scalars(select(PeerNonce.nonce)).all()
    assert left == [b"m" * 16]
    db.dispose()


def _headers_without_signature(body: bytes) -> str:
    head = signed_head(JP, body)
    return "\r\n".join(line for line in head.split("\r\n") if not line.startswith(HEADER_SIGNATURE))


@pytest.mark.parametrize(
    ("case", "make_head", "reason"),
    [
        (
            "unsigned",
            lambda body: (
                f"POST /v1/envelopes HTTP/1.1\r\nHost: x\r\nContent-Type: {ENVELOPE_CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n"
            ),
            "auth.missing",
        ),
        ("signature header dropped", _headers_without_signature, "auth.missing"),
        (
            "wrong key",
            lambda body: signed_head(
                RawSigner("jp", "jp-op-1", nacl.signing.SigningKey.generate()), body
            ),
            "auth.signature",
        ),
        (
            "unknown key id",
            lambda body: signed_head(RawSigner("jp", "jp-op-2", JP.key), body),
            "auth.unknown-key",
        ),
        (
            "stale time",
            lambda body: signed_head(JP, body, now=utc_now() - timedelta(minutes=30)),
            "auth.stale",
        ),
        (
            "future time",
            lambda body: signed_head(JP, body, now=utc_now() + timedelta(minutes=30)),
            "auth.stale",
        ),
        (
            "signed for another path",
            lambda body: signed_head(JP, body, path="/v1/manifests").replace(
                "POST /v1/manifests", "POST /v1/envelopes"
            ),
            "auth.signature",
        ),
        (
            "claims to be this node",
            lambda body: signed_head(RawSigner("pk", "jp-op-1", JP.key), body),
            "auth.unknown-key",
        ),
    ],
)
def test_unauthenticated_request_refused_with_401_and_nothing_stored(
    harness: Harness, case: str, make_head: Callable[[bytes], str], reason: str
) -> None:
    body = b"an envelope"
    status, response, closed = harness.raw(make_head(body), body)
    assert status == 401, case
    assert error_reason(response) == reason, case
    assert closed, case
    harness.assert_nothing_stored()
    assert harness.nonce_count() == 0


def test_body_not_matching_signed_digest_refused_and_discarded(harness: Harness) -> None:
    head = signed_head(JP, b"the signed envelope")
    status, response, _ = harness.raw(head, b"the forged envelope")
    assert status == 401
    assert error_reason(response) == "auth.digest"
    harness.assert_nothing_stored()


def test_batch_with_tampered_last_byte_stores_none_of_its_envelopes(harness: Harness) -> None:
    signed = batch(b"one", b"two")
    tampered = signed[:-1] + b"X"
    status, response, _ = harness.raw(
        signed_head(JP, signed, content_type=BATCH_CONTENT_TYPE), tampered
    )
    assert status == 401
    assert error_reason(response) == "auth.digest"
    harness.assert_nothing_stored()


def test_client_turns_a_401_into_peer_refused(harness: Harness, tmp_path: Path) -> None:
    stranger = RawSigner.make("jp", "jp-op-7")
    paths = envelope_files(tmp_path, b"envelope")

    async def send() -> Any:
        async with harness.client(stranger) as client:
            return await client.post_envelopes(paths)

    with pytest.raises(PeerRefused) as caught:
        run(send())
    assert (caught.value.status, caught.value.reason) == (401, "auth.unknown-key")
    assert isinstance(caught.value, RefusedError)
    harness.assert_nothing_stored()


def test_unreachable_peer_is_a_transport_error(tmp_path: Path) -> None:
    from tests.nodes import free_port  # noqa: PLC0415

    async def send() -> Any:
        url = f"http://127.0.0.1:{free_port()}"
        async with PeerClient(jp_settings(tmp_path, url), JP) as client:
            return await client.health()

    with pytest.raises(TransportError) as caught:
        run(send())
    assert caught.value.reason == "transport.refused"


# --- limits ---------------------------------------------------------------------------------------


def test_oversize_content_length_refused_before_reading(harness: Harness) -> None:
    too_big = TEST_LIMITS.max_body_bytes + 1
    head = signed_head(JP, b"").replace("Content-Length: 0", f"Content-Length: {too_big}")
    status, response, closed = harness.raw(head, b"only a few bytes")
    assert status == 413
    assert error_reason(response) == "limit.body"
    assert closed
    harness.assert_nothing_stored()


def test_oversize_chunked_body_refused_while_streaming(harness: Harness) -> None:
    body = b"y" * (TEST_LIMITS.max_envelope_bytes + 10)
    head = signed_head(JP, body, length=False, extra="Transfer-Encoding: chunked\r\n")
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (4096, body[i : i + 4096]) for i in range(0, len(body) - 10, 4096)
    )
    status, response, closed = harness.raw(head, chunks + b"a\r\n" + b"y" * 10 + b"\r\n0\r\n\r\n")
    assert status == 413
    assert error_reason(response) == "limit.envelope"
    assert closed
    harness.assert_nothing_stored()


def test_batch_with_too_many_envelopes_refused(harness: Harness) -> None:
    body = batch(*[b"e%d" % i for i in range(TEST_LIMITS.max_batch_envelopes + 1)])
    status, response, _ = harness.raw(signed_head(JP, body, content_type=BATCH_CONTENT_TYPE), body)
    assert status == 413
    assert error_reason(response) == "limit.batch"
    harness.assert_nothing_stored()


def test_batch_frame_larger_than_envelope_limit_refused(harness: Harness) -> None:
    body = (
        BATCH_MAGIC
        + struct.pack(">I", 1)
        + struct.pack(">Q", TEST_LIMITS.max_envelope_bytes + 1)
        + b"z" * 100
    )
    status, response, _ = harness.raw(signed_head(JP, body, content_type=BATCH_CONTENT_TYPE), body)
    assert status == 413
    assert error_reason(response) == "limit.envelope"
    harness.assert_nothing_stored()


@pytest.mark.parametrize(
    ("case", "body"),
    [
        ("bad magic", b"XXXX" + struct.pack(">I", 1) + struct.pack(">Q", 1) + b"a"),
        ("zero envelopes", BATCH_MAGIC + struct.pack(">I", 0)),
        ("empty envelope", BATCH_MAGIC + struct.pack(">I", 1) + struct.pack(">Q", 0)),
        ("truncated envelope", BATCH_MAGIC + struct.pack(">I", 1) + struct.pack(">Q", 10) + b"abc"),
        ("trailing bytes", batch(b"abc") + b"extra"),
        ("truncated preface", BATCH_MAGIC),
    ],
)
def test_malformed_batch_framing_refused(harness: Harness, case: str, body: bytes) -> None:
    status, response, _ = harness.raw(signed_head(JP, body, content_type=BATCH_CONTENT_TYPE), body)
    assert status == 400, case
    assert error_reason(response) == "request.framing", case
    harness.assert_nothing_stored()


def test_unknown_content_type_refused(harness: Harness) -> None:
    body = b"{}"
    status, response, _ = harness.raw(signed_head(JP, body, content_type="application/json"), body)
    assert status == 415
    assert error_reason(response) == "request.content-type"
    harness.assert_nothing_stored()


def test_request_rate_above_policy_refused_with_429(tmp_path: Path) -> None:
    from dataclasses import replace  # noqa: PLC0415

    limits = replace(TEST_LIMITS, rate_per_second=0.01, rate_burst=3)
    db = migrated_database(f"sqlite:///{tmp_path / 'pk.sqlite3'}")
    services, _ = make_services(
        tmp_path, db, keys=KeyTable({"jp-op-1": JP.public_key}), receiver=PK
    )
    request = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with start_test_server(services, limits) as server:
        statuses = [status_of(raw_exchange(server.port, request)[0]) for _ in range(5)]
        last, _ = raw_exchange(server.port, request)
    assert statuses == [200, 200, 200, 429, 429]
    assert error_reason(last) == "limit.rate"
    db.dispose()


def test_oversized_headers_refused_with_431(harness: Harness) -> None:
    filler = "".join(f"X-Filler-{i}: {'a' * 500}\r\n" for i in range(10))
    status, response, closed = harness.raw(f"GET /v1/health HTTP/1.1\r\nHost: x\r\n{filler}\r\n")
    assert status == 431
    assert error_reason(response) == "limit.headers"
    assert closed


def test_stalled_body_cut_by_read_timeout(harness: Harness) -> None:
    body = b"z" * 100
    head = signed_head(JP, body)
    status, response, closed = harness.raw(head, body[:10])
    assert status == 408
    assert error_reason(response) == "limit.timeout"
    assert closed
    harness.assert_nothing_stored()


# --- manifests after a rotation ------------------------------------------------------------------


class ManifestBook:
    """A real manifest handler for transport tests: a manifest is JSON naming keys,
    "verified" when its "approved_by" equals a key id of the pinned table."""

    def __init__(self, keys: KeyTable) -> None:
        self.keys = keys
        self.applied: list[bytes] = []

    def _verified(self, raw: bytes) -> dict[str, bytes]:
        from gateway.errors import VerificationError  # noqa: PLC0415

        manifest = json.loads(raw)
        if manifest.get("approved_by") not in self.keys.keys:
            raise VerificationError(
                "manifest not signed by the pinned key", reason="manifest.signature"
            )
        return {k: base64.b64decode(v) for k, v in manifest["keys"].items()}

    def preview(self, raw: bytes, *, now: datetime) -> KeyLookup:
        return KeyTable(self._verified(raw)).lookup

    def apply(self, raw: bytes, *, now: datetime) -> None:
        self.keys.keys = self._verified(raw)
        self.applied.append(raw)


def test_request_signed_with_a_key_only_the_new_manifest_lists_accepted(tmp_path: Path) -> None:
    db = migrated_database(f"sqlite:///{tmp_path / 'pk.sqlite3'}")
    keys = KeyTable({"jp-op-1": JP.public_key})
    book = ManifestBook(keys)
    services, _ = make_services(
        tmp_path,
        db,
        keys=keys,
        receiver=PK,
        apply_manifest=book.apply,
        preview_manifest=book.preview,
    )
    rotated = RawSigner.make("jp", "jp-op-2")
    good = json.dumps(
        {
            "approved_by": "jp-op-1",
            "keys": {"jp-op-2": base64.b64encode(rotated.public_key).decode()},
        }
    ).encode()
    forged = json.dumps(
        {
            "approved_by": "someone",
            "keys": {"jp-op-2": base64.b64encode(rotated.public_key).decode()},
        }
    ).encode()
    other = RawSigner.make("jp", "jp-op-2")

    async def post(url: str, signer: RawSigner, raw: bytes) -> None:
        async with PeerClient(jp_settings(tmp_path, url), signer) as client:
            await client.post_manifest(raw)

    with start_test_server(services) as server:
        with pytest.raises(PeerRefused) as forged_refusal:
            run(post(server.url, rotated, forged))
        with pytest.raises(PeerRefused) as wrong_key:
            run(post(server.url, other, good))
        assert book.applied == []
        run(post(server.url, rotated, good))
        assert book.applied == [good]
        assert keys.keys == {"jp-op-2": rotated.public_key}
    assert (forged_refusal.value.status, forged_refusal.value.reason) == (422, "manifest.signature")
    assert (wrong_key.value.status, wrong_key.value.reason) == (401, "auth.signature")
    db.dispose()


def test_unknown_key_on_envelopes_is_not_rescued_by_the_manifest_rule(harness: Harness) -> None:
    body = b"envelope"
    status, response, _ = harness.raw(signed_head(RawSigner("jp", "jp-op-2", JP.key), body), body)
    assert status == 401
    assert error_reason(response) == "auth.unknown-key"
    harness.assert_nothing_stored()


# --- real `gateway serve` processes -----------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from tests.nodes import init_pair  # noqa: PLC0415

    return init_pair(tmp_path_factory.mktemp("pair"))


def _signed_envelope_request(node: Any, body: bytes) -> bytes:
    """A request signed by ``node``'s real operational key, addressed to its peer."""
    keyring = node.keyring()
    headers = sign_request(
        keyring,
        method="POST",
        path="/v1/envelopes",
        body_sha256=hashlib.sha256(body).digest(),
        recipient="pk" if node.node_id == "jp" else "jp",
        now=utc_now(),
        nonce=__import__("os").urandom(16),
    )
    lines = [
        "POST /v1/envelopes HTTP/1.1",
        "Host: 127.0.0.1",
        f"Content-Type: {ENVELOPE_CONTENT_TYPE}",
    ]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_serve_stops_cleanly_with_exit_0(pair: dict[str, Any], sig: str) -> None:
    import signal  # noqa: PLC0415

    from tests.nodes import milestones, stop, wait_health, wait_ready  # noqa: PLC0415

    pk = pair["pk"]
    serve = pk.serve()
    try:
        line = wait_ready(serve)
        assert line.startswith(f"serving pk on http://127.0.0.1:{pk.port} (local API on http://")
        wait_health(pk.url)
    finally:
        code = stop(serve, getattr(signal, sig))
    assert code == 0, serve.stderr_text()
    assert milestones(serve, "stopped") == ["stopped pk"]
    assert '"event": "stopping"' in serve.stderr_text()


@pytest.mark.slow
def test_serve_drains_a_request_in_flight_before_exiting(pair: dict[str, Any]) -> None:
    import signal  # noqa: PLC0415
    import socket  # noqa: PLC0415
    import time  # noqa: PLC0415

    from tests.nodes import stop, wait_ready  # noqa: PLC0415

    jp, pk = pair["jp"], pair["pk"]
    body = b"not an envelope, but a signed request body " * 20
    head = _signed_envelope_request(jp, body)
    serve = pk.serve()
    try:
        wait_ready(serve)
        with socket.create_connection(("127.0.0.1", pk.port), timeout=20) as sock:
            sock.sendall(head + body[:100])
            time.sleep(0.3)
            serve.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert serve.process.poll() is None, "exited with a request in flight"
            sock.sendall(body[100:])
            response = b""
            while b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                response += chunk
    finally:
        code = stop(serve)
    assert status_of(response) == 200, response
    results = json.loads(response.partition(b"\r\n\r\n")[2])["results"]
    assert [r["status"] for r in results] == ["refused"]
    assert code == 0, serve.stderr_text()


@pytest.mark.slow
def test_serve_authenticates_with_the_pinned_manifest_and_refuses_replays(
    pair: dict[str, Any],
) -> None:
    from tests.nodes import stop, wait_ready  # noqa: PLC0415

    jp, pk = pair["jp"], pair["pk"]
    body = b"garbage that the inbox refuses"
    request = _signed_envelope_request(jp, body) + body
    forged = _signed_envelope_request(pk, body) + body
    serve = pk.serve()
    try:
        wait_ready(serve)
        first, _ = raw_exchange(pk.port, request)
        replay, _ = raw_exchange(pk.port, request)
        own_key, _ = raw_exchange(pk.port, forged)
    finally:
        assert stop(serve) == 0
    assert status_of(first) == 200
    assert json.loads(first.partition(b"\r\n\r\n")[2])["results"][0]["status"] == "refused"
    assert (status_of(replay), error_reason(replay)) == (401, "auth.replay")
    assert (status_of(own_key), error_reason(own_key)) == (401, "auth.unknown-key")
    spool = pk.home / "data" / "spool"
    assert not any(spool.iterdir())


# --- failures inside the node never become a crash -------------------------------------------


def test_unexpected_exception_answers_500_with_an_opaque_reason(tmp_path: Path) -> None:
    from aiohttp import web  # noqa: PLC0415

    from gateway.peer.server import create_peer_app  # noqa: PLC0415

    async def broken(_request: web.Request) -> web.Response:
        raise KeyError("secret detail that must not reach the peer")

    db = migrated_database(f"sqlite:///{tmp_path / 'pk.sqlite3'}")
    services, _ = make_services(
        tmp_path, db, keys=KeyTable({"jp-op-1": JP.public_key}), receiver=PK
    )
    app = create_peer_app(
        services, TEST_LIMITS, extra_routes=lambda a: a.router.add_post("/v1/broken", broken)
    )
    with ServerThread(app) as server:
        response, closed = raw_exchange(
            server.port, signed_head(JP, b"", path="/v1/broken").encode()
        )
        health, _ = raw_exchange(
            server.port, b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
    assert status_of(response) == 500
    assert error_reason(response) == "internal"
    assert b"secret detail" not in response
    assert closed
    assert status_of(health) == 200
    db.dispose()


def test_envelope_handler_crash_is_reported_per_envelope(tmp_path: Path) -> None:
    from dataclasses import replace  # noqa: PLC0415

    db = migrated_database(f"sqlite:///{tmp_path / 'pk.sqlite3'}")
    services, store = make_services(
        tmp_path, db, keys=KeyTable({"jp-op-1": JP.public_key}), receiver=PK
    )

    def flaky(path: Path, *, now: datetime) -> bytes:
        if path.read_bytes() == b"boom":
            raise RuntimeError("disk on fire")
        return store(path, now=now)

    body = batch(b"fine", b"boom")
    with start_test_server(replace(services, receive_envelope=flaky)) as server:
        response, _ = raw_exchange(
            server.port,
            signed_head(JP, body, content_type=BATCH_CONTENT_TYPE).encode() + body,
        )
    results = json.loads(response.partition(b"\r\n\r\n")[2])["results"]
    assert [(r["status"], r.get("reason")) for r in results] == [
        ("accepted", None),
        ("error", "internal"),
    ]
    assert results[1]["retryable"] is True
    assert store.stored() == [b"fine"]
    db.dispose()


def test_policy_limits_become_transport_limits() -> None:
    from gateway.core.policy import Limits  # noqa: PLC0415
    from gateway.peer.server import limits_from_policy  # noqa: PLC0415

    limits = limits_from_policy(
        Limits(peer_batch_size=7, peer_requests_per_minute=120, peer_body_bytes=1 << 20)
    )
    assert limits.max_batch_envelopes == 7
    assert limits.max_body_bytes == 1 << 20
    assert limits.rate_per_second == 2.0
    assert limits.rate_burst == 20
    assert limits.clock_skew == timedelta(seconds=300)


@pytest.mark.parametrize(
    "change",
    [
        {"max_body_bytes": 0},
        {"max_batch_envelopes": 0},
        {"rate_per_second": 0.0},
        {"body_idle_timeout": 10.0, "body_total_timeout": 5.0},
    ],
)
def test_nonsensical_transport_limits_refused(change: dict[str, Any]) -> None:
    from dataclasses import replace  # noqa: PLC0415

    with pytest.raises(ValueError, match="must"):
        replace(TEST_LIMITS, **change)


def test_slow_headers_cut_by_the_connection_timeout(harness: Harness) -> None:
    response, closed = raw_exchange(
        harness.server.port, b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: ", timeout=10
    )
    assert closed
    assert response == b""


def test_single_envelope_larger_than_the_body_limit_refused_while_streaming(
    tmp_path: Path,
) -> None:
    from dataclasses import replace  # noqa: PLC0415

    limits = replace(TEST_LIMITS, max_body_bytes=2048, max_envelope_bytes=8192)
    db = migrated_database(f"sqlite:///{tmp_path / 'pk.sqlite3'}")
    services, store = make_services(
        tmp_path, db, keys=KeyTable({"jp-op-1": JP.public_key}), receiver=PK
    )
    body = b"q" * 4096
    head = signed_head(JP, body, length=False, extra="Transfer-Encoding: chunked\r\n")
    with start_test_server(services, limits) as server:
        response, _ = raw_exchange(
            server.port, head.encode() + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        )
    assert status_of(response) == 413
    assert error_reason(response) == "limit.body"
    assert store.stored() == []
    db.dispose()


def test_racing_copies_of_one_nonce_are_admitted_exactly_once(database_url: str) -> None:
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    from gateway.peer.server import database_nonce_recorder  # noqa: PLC0415

    db = migrated_database(database_url)
    now = utc_now()
    remember = database_nonce_recorder(db, skew=timedelta(minutes=5), clock=lambda: now)
    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(lambda _: remember("jp", b"r" * 16, now), range(16)))
    assert outcomes.count(True) == 1
    assert outcomes.count(False) == 15
    db.dispose()
