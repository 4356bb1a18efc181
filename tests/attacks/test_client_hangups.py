"""Hostile input, class 5: a client that hangs up mid-body.

A client that closes its connection after part of a declared body is not a
server error: the node writes one structured line (``client disconnected``,
no status, since nothing can be answered), no traceback, and stores nothing.
Walked over every route that reads a body, on the peer server and the local
API, with real sockets.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web
from structlog.testing import capture_logs

from gateway import log
from gateway.api.app import create_api_app
from gateway.node.context import NodeContext
from gateway.peer.ledger_client import CHECKPOINT_CONTENT_TYPE, CHECKPOINTS_PATH
from gateway.peer.server import (
    BATCH_CONTENT_TYPE,
    BATCH_MAGIC,
    ENVELOPE_CONTENT_TYPE,
    MANIFEST_CONTENT_TYPE,
    MANIFESTS_PATH,
)
from gateway.store.models_keys import PeerManifestRecord
from gateway.store.models_ledger import WitnessedCheckpointRow
from gateway.store.models_users import UserRecord
from tests.hostile import (
    Side,
    pair,  # noqa: F401 - the shared fixture
    peer_server,
    signed_head,
)

DISCONNECTED = "client disconnected"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def stdlib_records() -> Iterator[list[logging.LogRecord]]:
    """What aiohttp and asyncio log through the standard library (tracebacks go there)."""
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("aiohttp", "asyncio")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def assert_one_clean_line(
    events: list[dict[str, Any]], records: list[logging.LogRecord], kind: str, what: str
) -> None:
    lines = [e for e in events if e.get("event") == kind]
    assert len(lines) == 1, (what, events)
    line = lines[0]
    assert line.get("reason") == DISCONNECTED, (what, line)
    assert line.get("status") is None or 400 <= line["status"] < 500, (what, line)
    for event in events:
        assert event.get("log_level") not in ("error", "critical", "exception"), (what, event)
        assert "exc_info" not in event, (what, event)
        assert "exception" not in event, (what, event)
    loud = [r for r in records if r.levelno >= logging.WARNING or r.exc_info]
    assert loud == [], (what, [r.getMessage() for r in loud])


def wait_for(events: list[dict[str, Any]], kind: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(e.get("event") == kind for e in events):
            time.sleep(0.2)  # let anything logged after the summary line arrive too
            return
        time.sleep(0.02)
    raise AssertionError(f"no {kind} line within {timeout} s: {events}")


def hang_up(port: int, data: bytes) -> None:
    """Send ``data`` (a head and part of its body) and close the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        time.sleep(0.1)  # the server is now waiting inside the body


# Every peer route that reads a body: (path, content type, whole body, bytes sent).
PEER_ROUTES = {
    "checkpoint, 6 of 28 bytes": (
        CHECKPOINTS_PATH,
        CHECKPOINT_CONTENT_TYPE,
        b'{"body":"x","signature":"y"}',
        6,
    ),
    "manifest, half": (MANIFESTS_PATH, MANIFEST_CONTENT_TYPE, b"m" * 400, 200),
    "single envelope, part": ("/v1/envelopes", ENVELOPE_CONTENT_TYPE, b"e" * 4000, 1000),
    "batch, inside the preface": ("/v1/envelopes", BATCH_CONTENT_TYPE, BATCH_MAGIC + b"\0" * 60, 5),
    "batch, inside an envelope": (
        "/v1/envelopes",
        BATCH_CONTENT_TYPE,
        BATCH_MAGIC + b"\0\0\0\1" + (2000).to_bytes(8, "big") + b"e" * 2000,
        600,
    ),
    "head only, no body byte": (CHECKPOINTS_PATH, CHECKPOINT_CONTENT_TYPE, b"c" * 28, 0),
}
API_ROUTES = {
    "send a bundle": ("/api/v1/bundles", "officer"),
    "add a user": ("/api/v1/users", "admin"),
    "pin the peer": ("/api/v1/peer", "admin"),
    "ask for consent": ("/api/v1/consents/requests", "officer"),
    "grant consent": ("/api/v1/consents/requests/r-1/grant", "officer"),
}


def test_a_client_that_hangs_up_mid_body_is_one_clean_log_line_on_every_route(
    pair: dict[str, Side],
) -> None:
    jp, pk = pair["jp"], pair["pk"]
    log.configure(level="info")  # whatever an earlier test left: the summary lines are info
    stored = (
        jp.count(WitnessedCheckpointRow),
        jp.count(PeerManifestRecord),
        jp.count(UserRecord),
    )
    # The peer server: requests signed by pk's real key, cut short.
    with peer_server(jp) as server:
        for what, (path, content_type, body, sent) in PEER_ROUTES.items():
            with capture_logs() as events, stdlib_records() as records:
                head = signed_head(pk, "jp", path, body, content_type)
                hang_up(server.port, head + body[:sent])
                wait_for(events, "peer_request")
            assert_one_clean_line(events, records, "peer_request", what)
        assert not any((jp.home / "spool").glob("req-*")) if (jp.home / "spool").exists() else True
    # The local API: an authenticated request whose JSON body never arrives whole.
    for what, (path, role) in API_ROUTES.items():

        async def scenario(path: str = path, role: str = role) -> list[dict[str, Any]]:
            app = create_api_app(NodeContext(jp.node, lambda: jp.keyring))
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            try:
                with capture_logs() as events:
                    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.write(
                        (
                            f"POST {path} HTTP/1.1\r\nHost: x\r\n"
                            f"Authorization: Bearer {jp.tokens[role]}\r\n"
                            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                            '{"name": "sato", "ro'
                        ).encode()
                    )
                    await writer.drain()
                    await asyncio.sleep(0.1)
                    writer.close()
                    await asyncio.to_thread(wait_for, events, "api_request")
                    return list(events)
            finally:
                await runner.cleanup()

        with stdlib_records() as records:
            events = asyncio.run(scenario())
        assert_one_clean_line(events, records, "api_request", what)
    assert (
        jp.count(WitnessedCheckpointRow),
        jp.count(PeerManifestRecord),
        jp.count(UserRecord),
    ) == stored
