"""Mutual TLS on the peer link, with a CA and certificates this test makes."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import ConfigError, TransportError
from gateway.peer.client import PeerClient
from gateway.settings import ServerSettings, Settings
from gateway.tls import client_ssl_context, server_ssl_context
from tests.nodes import (
    KeyTable,
    RawSigner,
    ServerThread,
    make_services,
    migrated_database,
    start_test_server,
)
from tests.pki import Authority, Issued

JP = RawSigner.make("jp", "jp-op-1")
PK = RawSigner.make("pk", "pk-op-1")
NOW = datetime.now(UTC)


@dataclass
class Pki:
    ca: Authority
    rogue: Authority
    server: Issued
    client: Issued
    rogue_client: Issued
    rogue_server: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = Authority(folder, "gateway")
    rogue = Authority(folder, "rogue")
    return Pki(
        ca=ca,
        rogue=rogue,
        server=ca.issue("pk-server", server=True),
        client=ca.issue("jp-client", server=False),
        rogue_client=rogue.issue("rogue-client", server=False),
        rogue_server=rogue.issue("rogue-server", server=True),
    )


def server_tls(pki: Pki, issued: Issued | None = None) -> ServerSettings:
    chosen = issued or pki.server
    return ServerSettings(
        tls_cert=chosen.cert,
        tls_key=chosen.key,
        tls_ca=pki.ca.path,
    )


def client_settings(tmp_path: Path, url: str, *, cert: Issued | None, ca: Path) -> Settings:
    server: dict[str, Any] = {"peer_url": url, "tls_ca": ca}
    if cert is not None:
        server |= {"tls_cert": cert.cert, "tls_key": cert.key}
    return Settings.model_validate(
        {"home": tmp_path / "jp", "node": {"id": "jp"}, "server": server}
    )


@pytest.fixture
def tls_server(tmp_path: Path, pki: Pki) -> Iterator[ServerThread]:
    db = migrated_database(f"sqlite:///{tmp_path / 'pk.sqlite3'}")
    services, _ = make_services(
        tmp_path, db, keys=KeyTable({"jp-op-1": JP.public_key}), receiver=PK
    )
    context = server_ssl_context(server_tls(pki), host="127.0.0.1")
    with start_test_server(services, ssl_context=context) as running:
        yield running
    db.dispose()


def _post_one(settings: Settings, tmp_path: Path) -> Any:
    envelope = tmp_path / "one.env"
    envelope.write_bytes(b"an envelope over mutual TLS")

    async def go() -> Any:
        async with PeerClient(settings, JP) as client:
            return await client.post_envelopes([envelope])

    return asyncio.run(go())


def test_mutual_tls_client_with_certificate_from_the_ca_is_served(
    tls_server: ServerThread, pki: Pki, tmp_path: Path
) -> None:
    settings = client_settings(tmp_path, tls_server.url, cert=pki.client, ca=pki.ca.path)
    assert tls_server.url.startswith("https://")
    results = _post_one(settings, tmp_path)
    assert [r.status for r in results] == ["accepted"]


@pytest.mark.parametrize("who", ["rogue CA", "no certificate"])
def test_client_certificate_not_from_the_ca_refused_at_handshake(
    tls_server: ServerThread, pki: Pki, tmp_path: Path, who: str
) -> None:
    cert = pki.rogue_client if who == "rogue CA" else None
    settings = client_settings(tmp_path, tls_server.url, cert=cert, ca=pki.ca.path)
    with pytest.raises(TransportError) as caught:
        _post_one(settings, tmp_path)
    assert caught.value.reason == "transport.tls.certificate-refused"
    assert not (tmp_path / "received").exists()


def test_client_refuses_server_certificate_from_another_ca(tmp_path: Path, pki: Pki) -> None:
    db = migrated_database(f"sqlite:///{tmp_path / 'pk.sqlite3'}")
    services, _ = make_services(
        tmp_path, db, keys=KeyTable({"jp-op-1": JP.public_key}), receiver=PK
    )
    rogue = ServerSettings(tls_cert=pki.rogue_server.cert, tls_key=pki.rogue_server.key)
    context = server_ssl_context(rogue, host="127.0.0.1")
    with start_test_server(services, ssl_context=context) as running:
        settings = client_settings(tmp_path, running.url, cert=pki.client, ca=pki.ca.path)
        with pytest.raises(TransportError):
            _post_one(settings, tmp_path)
    assert not (tmp_path / "received").exists()
    db.dispose()


def test_handshake_with_raw_tls_socket_without_client_certificate_fails(
    tls_server: ServerThread, pki: Pki
) -> None:
    import socket  # noqa: PLC0415

    context = ssl.create_default_context(cafile=str(pki.ca.path))

    def talk() -> bytes:
        with (
            socket.create_connection(("127.0.0.1", tls_server.port), timeout=5) as sock,
            context.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = tls.recv(1024)
            if not answer:
                raise ConnectionResetError("closed without an answer")
            return answer

    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        talk()


@pytest.mark.parametrize(
    ("listen_host", "insecure", "allowed"),
    [
        ("127.0.0.1", False, True),
        ("::1", False, True),
        ("localhost", False, True),
        ("0.0.0.0", False, False),
        ("192.0.2.10", False, False),
        ("gateway.example.org", False, False),
        ("0.0.0.0", True, True),
    ],
)
def test_plain_http_refused_off_loopback_without_the_insecure_flag(
    listen_host: str, insecure: bool, allowed: bool
) -> None:
    settings = ServerSettings(insecure_http=insecure)
    if allowed:
        assert server_ssl_context(settings, host=listen_host) is None
    else:
        with pytest.raises(ConfigError, match="refusing plain HTTP") as caught:
            server_ssl_context(settings, host=listen_host)
        assert caught.value.reason == "config.tls"


@pytest.mark.parametrize(
    ("url", "insecure", "allowed"),
    [
        ("http://127.0.0.1:8701", False, True),
        ("http://peer.example.org:8701", False, False),
        ("http://peer.example.org:8701", True, True),
    ],
)
def test_client_refuses_plain_http_to_a_remote_peer(
    url: str, insecure: bool, allowed: bool
) -> None:
    settings = ServerSettings(insecure_http=insecure)
    if allowed:
        assert client_ssl_context(settings, peer_url=url) is None
    else:
        with pytest.raises(ConfigError, match="refusing plain HTTP"):
            client_ssl_context(settings, peer_url=url)


@pytest.mark.parametrize("half", ["cert only", "key only", "ca only"])
def test_half_configured_tls_refused_at_start(pki: Pki, half: str) -> None:
    values: dict[str, Any] = {
        "cert only": {"tls_cert": pki.server.cert},
        "key only": {"tls_key": pki.server.key},
        "ca only": {"tls_ca": pki.ca.path},
    }[half]
    with pytest.raises(ConfigError) as caught:
        server_ssl_context(ServerSettings(**values), host="127.0.0.1")
    assert caught.value.reason == "config.tls"


# --- the real `gateway serve` process ---------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from tests.nodes import init_pair  # noqa: PLC0415

    return init_pair(tmp_path_factory.mktemp("pair"))


def _tls_env(pki: Pki, issued: Issued) -> dict[str, str]:
    return {
        "GATEWAY_SERVER_TLS_CERT": str(issued.cert),
        "GATEWAY_SERVER_TLS_KEY": str(issued.key),
        "GATEWAY_SERVER_TLS_CA": str(pki.ca.path),
    }


@pytest.mark.slow
def test_serve_over_mutual_tls_admits_only_clients_of_the_ca(
    pair: dict[str, Any], pki: Pki, tmp_path: Path
) -> None:
    from tests.nodes import raw_exchange, stop, wait_ready  # noqa: PLC0415

    jp, pk = pair["jp"], pair["pk"]
    serve = pk.serve(**_tls_env(pki, pki.server))
    url = f"https://127.0.0.1:{pk.port}"
    keyring = jp.keyring()
    envelope = tmp_path / "one.env"
    envelope.write_bytes(b"not a real envelope: the inbox refuses it after TLS and auth pass")

    def settings_with(cert: Issued) -> Settings:
        return Settings.model_validate(
            {
                "home": jp.home,
                "node": {"id": "jp"},
                "server": {
                    "peer_url": url,
                    "tls_cert": cert.cert,
                    "tls_key": cert.key,
                    "tls_ca": pki.ca.path,
                },
            }
        )

    async def post(cert: Issued) -> Any:
        async with PeerClient(settings_with(cert), keyring) as client:
            health = await client.health()
            return health, await client.post_envelopes([envelope])

    try:
        serving = wait_ready(serve)
        health, results = asyncio.run(post(pki.client))
        with pytest.raises(TransportError) as rogue:
            asyncio.run(post(pki.rogue_client))
        # Plain HTTP to the local API, which speaks HTTPS with the node's certificate.
        answer, _closed = raw_exchange(pk.api_port, b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
    finally:
        code = stop(serve)
    assert not answer.startswith(b"HTTP/")
    assert health == {"status": "ok"}
    assert [(r.status, r.reason) for r in results] == [("refused", "envelope.format")]
    assert rogue.value.reason == "transport.tls.certificate-refused"
    assert code == 0, serve.stderr_text()
    assert '"mutual_tls": true' in serve.stderr_text()
    refused = [
        json.loads(line) for line in serve.stderr_lines if '"event": "tls_handshake_failed"' in line
    ]
    assert sorted((r["listener"], r["remote"], r["reason"]) for r in refused) == [
        ("api", "127.0.0.1", "tls.plain-http"),
        ("peer", "127.0.0.1", "tls.client-certificate-unknown-issuer"),
    ]
    assert (
        f"on https://127.0.0.1:{pk.port} (local API on https://127.0.0.1:{pk.api_port}" in serving
    )


@pytest.mark.slow
def test_serve_refuses_plain_http_off_loopback_at_start(pair: dict[str, Any]) -> None:
    from tests.nodes import free_port, run_gateway, stop, wait_ready  # noqa: PLC0415

    pk = pair["pk"]
    listen = f"0.0.0.0:{free_port()}"
    refused = run_gateway(pk.home, "serve", env=pk.env(GATEWAY_SERVER_LISTEN=listen), timeout=60)
    assert refused.returncode == 1
    assert "refusing plain HTTP on 0.0.0.0" in refused.stderr
    assert "serving" not in refused.stderr

    allowed = pk.serve(GATEWAY_SERVER_LISTEN=listen, GATEWAY_SERVER_INSECURE_HTTP="true")
    try:
        line = wait_ready(allowed)
    finally:
        code = stop(allowed)
    assert line.startswith(f"serving pk on http://{listen} (local API on http://")
    assert '"event": "insecure_plain_http"' in allowed.stderr_text()
    assert code == 0
