"""Malformed and ambiguous HTTP framing, sent as raw bytes: refused with 400, connection closed.

Request smuggling needs two parsers to disagree on where a request ends; the
peer server refuses every message whose framing is ambiguous rather than guess.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nodes import (
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
POST = b"POST /v1/envelopes HTTP/1.1\r\nHost: 127.0.0.1\r\n"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ServerThread, EnvelopeStore]]:
    db = migrated_database(f"sqlite:///{tmp_path / 'pk.sqlite3'}")
    services, store = make_services(
        tmp_path, db, keys=KeyTable({"jp-op-1": JP.public_key}), receiver=PK
    )
    with start_test_server(services) as running:
        yield running, store
    db.dispose()


AMBIGUOUS = [
    (
        "content-length with transfer-encoding",
        POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "transfer-encoding before content-length",
        POST + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    ),
    (
        "duplicate content-length, different",
        POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    ),
    (
        "duplicate content-length, equal",
        POST + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    ),
    ("signed content-length", POST + b"Content-Length: +5\r\n\r\nhello"),
    ("content-length list", POST + b"Content-Length: 5, 5\r\n\r\nhello"),
    ("space before colon", POST + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n"),
    ("bad chunk size", POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"),
    ("obsolete line folding", b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-A: a\r\n  b\r\n\r\n"),
    ("bare LF line endings", b"GET /v1/health HTTP/1.1\nHost: x\n\n"),
]

GARBAGE = [
    ("binary noise", b"\x00\x01\x02\xff garbage\r\n\r\n"),
    ("TLS hello on the plain port", bytes.fromhex("16030100a5010000a10303") + b"\x00" * 40),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    ("request line of spaces", b"     \r\n\r\n"),
    ("header without colon", b"GET /v1/health HTTP/1.1\r\nHost x\r\n\r\n"),
    ("request line too long", b"GET /v1/health?" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
    (
        "too many headers",
        b"GET /v1/health HTTP/1.1\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(300)) + b"\r\n",
    ),
]


@pytest.mark.parametrize(("case", "data"), AMBIGUOUS, ids=[c for c, _ in AMBIGUOUS])
def test_ambiguous_framing_refused_and_connection_closed(
    server: tuple[ServerThread, EnvelopeStore], case: str, data: bytes
) -> None:
    running, store = server
    response, closed = raw_exchange(running.port, data)
    assert status_of(response) == 400, case
    assert closed, case
    assert store.stored() == []


@pytest.mark.parametrize(("case", "data"), GARBAGE, ids=[c for c, _ in GARBAGE])
def test_garbage_bytes_refused_with_400_never_500(
    server: tuple[ServerThread, EnvelopeStore], case: str, data: bytes
) -> None:
    running, store = server
    response, closed = raw_exchange(running.port, data)
    assert status_of(response) == 400, case
    assert closed, case
    assert store.stored() == []


def test_smuggled_second_request_is_never_processed(
    server: tuple[ServerThread, EnvelopeStore],
) -> None:
    running, _ = server
    smuggled = b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"
    data = POST + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled
    response, closed = raw_exchange(running.port, data)
    assert status_of(response) == 400
    assert closed
    assert response.count(b"HTTP/1.") == 1


def test_server_keeps_serving_after_garbage(server: tuple[ServerThread, EnvelopeStore]) -> None:
    running, _ = server
    for _case, data in GARBAGE:
        raw_exchange(running.port, data)
    response, _ = raw_exchange(
        running.port, b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status_of(response) == 200


def test_unknown_route_and_method_answer_json_errors_not_500(
    server: tuple[ServerThread, EnvelopeStore],
) -> None:
    running, _ = server
    for request, expected in (
        (b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n", 401),
        (b"DELETE /v1/health HTTP/1.1\r\nHost: x\r\n\r\n", 401),
        (b"POST /v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 401),
    ):
        response, _ = raw_exchange(running.port, request)
        assert status_of(response) == expected, request
