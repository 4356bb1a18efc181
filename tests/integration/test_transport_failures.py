"""Every way the peer link fails, produced with real sockets and the test PKI.

Each case makes the failure for real (a certificate from another CA, an
expired one, a name mismatch, our certificate refused, TLS against plain HTTP
and the reverse, nothing listening, a name that does not resolve, a silent
port) and checks that the error names the cause by its reason code and in its
message, and that the server logs the handshake it refused.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from gateway.errors import TransportError
from gateway.peer.client import PeerClient, PeerUnreachable
from gateway.peer.tls_listener import HandshakeLog
from gateway.settings import ServerSettings, Settings
from gateway.tls import server_ssl_context
from tests.nodes import (
    KeyTable,
    RawSigner,
    ServerThread,
    free_port,
    make_services,
    migrated_database,
    start_test_server,
)
from tests.pki import Authority, Issued

JP = RawSigner.make("jp", "jp-op-1")
PK = RawSigner.make("pk", "pk-op-1")


@dataclass
class Pki:
    ca: Authority
    rogue: Authority
    old: Authority
    server: Issued
    client: Issued
    rogue_client: Issued
    expired_server: Issued
    other_name_server: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = Authority(folder, "gateway")
    rogue = Authority(folder, "rogue")
    # A CA whose certificates were issued five days ago for one day: all expired now.
    old = Authority(folder, "old", now=datetime.now(UTC) - timedelta(days=5))
    return Pki(
        ca=ca,
        rogue=rogue,
        old=old,
        server=ca.issue("pk-server", server=True, client=True),
        client=ca.issue("jp-client", server=True, client=True),
        rogue_client=rogue.issue("rogue-client", server=False),
        expired_server=old.issue("expired-server", server=True),
        other_name_server=ca.issue("other-name", server=True, dns="pk.other.example"),
    )


def _settings(tmp_path: Path, url: str, *, cert: Issued | None, ca: Path | None) -> Settings:
    server: dict[str, Any] = {"peer_url": url}
    if ca is not None:
        server["tls_ca"] = ca
    if cert is not None:
        server |= {"tls_cert": cert.cert, "tls_key": cert.key}
    return Settings.model_validate(
        {"home": tmp_path / "jp", "node": {"id": "jp"}, "server": server}
    )


@pytest.fixture
def serve_with(tmp_path: Path) -> Iterator[Any]:
    """Start a peer server with the given TLS settings (None: plain HTTP)."""
    db = migrated_database(f"sqlite:///{tmp_path / 'pk.sqlite3'}")
    running: list[ServerThread] = []

    def start(server: ServerSettings | None) -> ServerThread:
        services, _ = make_services(
            tmp_path, db, keys=KeyTable({"jp-op-1": JP.public_key}), receiver=PK
        )
        context = server_ssl_context(server, host="127.0.0.1") if server is not None else None
        thread = start_test_server(services, ssl_context=context).__enter__()
        running.append(thread)
        return thread

    yield start
    for thread in running:
        thread.__exit__(None, None, None)
    db.dispose()


def _health(settings: Settings, *, timeout: float = 10.0) -> Any:
    async def go() -> Any:
        limit = aiohttp.ClientTimeout(
            total=None, connect=timeout, sock_connect=timeout, sock_read=timeout
        )
        async with PeerClient(settings, JP, timeout=limit) as client:
            return await client.health()

    return asyncio.run(go())


def _mtls(pki: Pki, issued: Issued | None = None) -> ServerSettings:
    chosen = issued or pki.server
    return ServerSettings(tls_cert=chosen.cert, tls_key=chosen.key, tls_ca=pki.ca.path)


# Each row: how the peer serves, how we connect, the reason code, words the message must hold.
CASES: list[tuple[str, str, str, str, tuple[str, ...]]] = [
    (
        "unknown issuer",
        "mtls",
        "rogue-ca",
        "transport.tls.unknown-issuer",
        ("certificate verify failed", "unknown issuer", "tls_ca"),
    ),
    (
        "expired",
        "expired",
        "old-ca",
        "transport.tls.expired",
        ("certificate verify failed", "expired"),
    ),
    (
        "name mismatch",
        "other-name",
        "localhost",
        "transport.tls.name-mismatch",
        ("name mismatch", "'localhost'", "peer_url"),
    ),
    (
        "our certificate from another CA",
        "mtls",
        "rogue-cert",
        "transport.tls.certificate-refused",
        ("refused our TLS client certificate", "tls_ca does not hold the CA"),
    ),
    (
        "no client certificate",
        "mtls",
        "no-cert",
        "transport.tls.certificate-refused",
        ("refused our TLS client certificate", "sent none"),
    ),
    (
        "TLS spoken to plain HTTP",
        "plain",
        "https",
        "transport.tls.peer-speaks-http",
        ("we speak TLS", "plain HTTP"),
    ),
    (
        "plain HTTP spoken to TLS",
        "mtls",
        "http",
        "transport.tls.peer-speaks-tls",
        ("plain HTTP", "port that speaks TLS", "https://"),
    ),
]


@pytest.mark.parametrize(
    ("peer", "we", "reason", "words"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_tls_failures_name_their_cause(
    serve_with: Any,
    pki: Pki,
    tmp_path: Path,
    peer: str,
    we: str,
    reason: str,
    words: tuple[str, ...],
) -> None:
    served = {
        "mtls": lambda: _mtls(pki),
        "expired": lambda: ServerSettings(
            tls_cert=pki.expired_server.cert, tls_key=pki.expired_server.key
        ),
        "other-name": lambda: ServerSettings(
            tls_cert=pki.other_name_server.cert, tls_key=pki.other_name_server.key
        ),
        "plain": lambda: None,
    }[peer]()
    running = serve_with(served)
    port = running.port
    settings = {
        "rogue-ca": lambda: _settings(
            tmp_path, f"https://127.0.0.1:{port}", cert=pki.client, ca=pki.rogue.path
        ),
        "old-ca": lambda: _settings(
            tmp_path, f"https://127.0.0.1:{port}", cert=pki.client, ca=pki.old.path
        ),
        "localhost": lambda: _settings(
            tmp_path, f"https://localhost:{port}", cert=pki.client, ca=pki.ca.path
        ),
        "rogue-cert": lambda: _settings(
            tmp_path, f"https://127.0.0.1:{port}", cert=pki.rogue_client, ca=pki.ca.path
        ),
        "no-cert": lambda: _settings(
            tmp_path, f"https://127.0.0.1:{port}", cert=None, ca=pki.ca.path
        ),
        "https": lambda: _settings(
            tmp_path, f"https://127.0.0.1:{port}", cert=pki.client, ca=pki.ca.path
        ),
        "http": lambda: _settings(tmp_path, f"http://127.0.0.1:{port}", cert=None, ca=None),
    }[we]()
    with pytest.raises(PeerUnreachable) as caught:
        _health(settings)
    error = caught.value
    assert error.reason == reason, error.message
    assert error.message.startswith(f"peer at {settings.server.peer_url.split('//')[1]}: ")
    for word in words:
        assert word in error.message, error.message
    # The cause is kept for --debug, not dropped.
    assert error.__cause__ is not None


def _closed_port() -> int:
    return free_port()


def test_connection_refused_names_the_address(tmp_path: Path) -> None:
    port = _closed_port()
    settings = _settings(tmp_path, f"http://127.0.0.1:{port}", cert=None, ca=None)
    with pytest.raises(PeerUnreachable) as caught:
        _health(settings)
    assert caught.value.reason == "transport.refused"
    assert f"connection refused: nothing listens on 127.0.0.1:{port}" in caught.value.message
    assert "gateway serve" in caught.value.message


def test_dns_failure_names_the_host(tmp_path: Path) -> None:
    settings = _settings(tmp_path, "http://no-such-peer.invalid:8701", cert=None, ca=None)
    settings = settings.model_copy(
        update={"server": settings.server.model_copy(update={"insecure_http": True})}
    )
    with pytest.raises(PeerUnreachable) as caught:
        _health(settings)
    assert caught.value.reason == "transport.dns"
    assert "DNS failure" in caught.value.message
    assert "'no-such-peer.invalid'" in caught.value.message


def test_a_silent_port_is_a_timeout(tmp_path: Path, pki: Pki) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        settings = _settings(tmp_path, f"https://127.0.0.1:{port}", cert=pki.client, ca=pki.ca.path)
        with pytest.raises(PeerUnreachable) as caught:
            _health(settings, timeout=0.5)
    assert caught.value.reason == "transport.timeout"
    assert "timeout" in caught.value.message


def test_a_peer_unreachable_is_a_transport_error_with_exit_code_1(tmp_path: Path) -> None:
    settings = _settings(tmp_path, f"http://127.0.0.1:{_closed_port()}", cert=None, ca=None)
    with pytest.raises(TransportError) as caught:
        _health(settings)
    assert caught.value.exit_code == 1


# --- the server's log of refused handshakes ----------------------------------------------------


@pytest.mark.parametrize(
    ("we", "reason"),
    [
        ("rogue-cert", "tls.client-certificate-unknown-issuer"),
        ("no-cert", "tls.no-client-certificate"),
        ("http", "tls.plain-http"),
    ],
)
def test_the_server_logs_each_refused_handshake_with_address_and_reason(
    serve_with: Any, pki: Pki, tmp_path: Path, we: str, reason: str
) -> None:
    running = serve_with(_mtls(pki))
    port = running.port
    settings = {
        "rogue-cert": _settings(
            tmp_path, f"https://127.0.0.1:{port}", cert=pki.rogue_client, ca=pki.ca.path
        ),
        "no-cert": _settings(tmp_path, f"https://127.0.0.1:{port}", cert=None, ca=pki.ca.path),
        "http": _settings(tmp_path, f"http://127.0.0.1:{port}", cert=None, ca=None),
    }[we]
    with capture_logs() as logs, pytest.raises(PeerUnreachable):
        _health(settings)
    lines = [line for line in logs if line["event"] == "tls_handshake_failed"]
    # The client's diagnostic probe may meet the same refusal: one line per minute per address.
    assert len(lines) == 1, logs
    assert lines[0]["log_level"] == "warning"
    assert lines[0]["remote"] == "127.0.0.1"
    assert lines[0]["reason"] == reason
    assert lines[0]["listener"] == "peer"
    assert running._server is not None
    assert running._server.handshakes.failures >= 1


def test_a_good_client_passes_the_logged_tls_listener(
    serve_with: Any, pki: Pki, tmp_path: Path
) -> None:
    running = serve_with(_mtls(pki))
    settings = _settings(tmp_path, running.url, cert=pki.client, ca=pki.ca.path)
    with capture_logs() as logs:
        assert _health(settings) == {"status": "ok"}
    assert not [line for line in logs if line["event"] == "tls_handshake_failed"]


def test_handshake_log_lines_are_rate_limited_per_address_and_count_what_they_left_out() -> None:
    now = [1000.0]
    counted: list[tuple[str, str]] = []
    handshakes = HandshakeLog(
        "peer", window=60.0, clock=lambda: now[0], on_refused=lambda *seen: counted.append(seen)
    )
    failure = ConnectionResetError("gone")
    with capture_logs() as logs:
        written = [handshakes.refused("192.0.2.1", failure) for _ in range(5)]
        other = handshakes.refused("192.0.2.2", failure)
        now[0] += 61
        again = handshakes.refused("192.0.2.1", failure)
    assert written == [True, False, False, False, False]
    assert other is True
    assert again is True
    assert handshakes.failures == 7
    # Every refusal reaches the metric, the ones the log leaves out included.
    assert len(counted) == 7
    assert {listener for listener, _ in counted} == {"peer"}
    assert all(reason for _, reason in counted)
    lines = [(line["remote"], line["suppressed"]) for line in logs]
    assert lines == [("192.0.2.1", 0), ("192.0.2.2", 0), ("192.0.2.1", 4)]
