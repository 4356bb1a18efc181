"""A large stored envelope posted alone goes out byte for byte: handed to the kernel
(``sendfile``) on a plain connection, written in blocks over TLS; a file whose
length is not the one the request declares fails the request."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from gateway.peer.client import _StoredEnvelopeBody
from tests.pki import Authority

SIZE = 5 * 1024 * 1024 + 123  # several blocks and an unaligned end


async def _post(
    url: str, path: Path, length: int, *, client_ssl: ssl.SSLContext | None = None
) -> tuple[list[bytes], int, int]:
    """Serve one route at ``url``'s port, post ``path`` with ``length`` declared; the
    bodies the server read, the calls of ``loop.sendfile`` and of ``on_done``."""
    received: list[bytes] = []
    done = [0]
    calls = [0]
    loop = asyncio.get_running_loop()
    real_sendfile = loop.sendfile

    async def counting(*args: Any, **kwargs: Any) -> int:
        calls[0] += 1
        return await real_sendfile(*args, **kwargs)

    loop.sendfile = counting  # type: ignore[method-assign]

    def on_done() -> None:
        done[0] += 1

    body = _StoredEnvelopeBody(path, length, on_done)
    timeout = aiohttp.ClientTimeout(total=60)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(
            url, data=body, headers={"Content-Length": str(length)}, ssl=client_ssl or False
        ) as answer,
    ):
        assert answer.status == 200
        received.append(await answer.read())
    return received, calls[0], done[0]


async def _with_server(
    work: Callable[[str], Awaitable[Any]], *, server_ssl: ssl.SSLContext | None = None
) -> Any:
    async def receive(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/envelopes", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ssl)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    scheme = "https" if server_ssl is not None else "http"
    try:
        return await work(f"{scheme}://127.0.0.1:{port}/v1/envelopes")
    finally:
        await runner.cleanup()


@pytest.fixture
def stored(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(SIZE)
    path = tmp_path / "envelope"
    path.write_bytes(data)
    return path, data


def test_on_a_plain_connection_the_kernel_sends_the_file_whole(
    stored: tuple[Path, bytes],
) -> None:
    path, data = stored
    received, calls, done = asyncio.run(_with_server(lambda url: _post(url, path, SIZE)))
    assert received == [data]
    assert calls == 1
    assert done == 1


def test_over_tls_the_file_is_written_in_blocks_byte_for_byte(
    stored: tuple[Path, bytes], tmp_path: Path
) -> None:
    path, data = stored
    authority = Authority(tmp_path, "send-test")
    issued = authority.issue("server", server=True)
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ssl.load_cert_chain(issued.cert, issued.key)
    client_ssl = ssl.create_default_context(
        cadata=authority.cert.public_bytes(serialization.Encoding.PEM).decode()
    )
    received, calls, done = asyncio.run(
        _with_server(
            lambda url: _post(url, path, SIZE, client_ssl=client_ssl), server_ssl=server_ssl
        )
    )
    assert received == [data]
    assert calls == 0
    assert done == 1


@pytest.mark.parametrize("declared", [SIZE + 10, SIZE - 10])
def test_a_file_of_another_length_than_declared_fails_the_request(
    stored: tuple[Path, bytes], declared: int
) -> None:
    path, _ = stored

    async def work(url: str) -> int:
        done = [0]

        def on_done() -> None:
            done[0] += 1

        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):
                async with session.post(
                    url,
                    data=_StoredEnvelopeBody(path, declared, on_done),
                    headers={"Content-Length": str(declared)},
                ) as answer:
                    await answer.read()
        return done[0]

    assert asyncio.run(_with_server(work)) == 1
