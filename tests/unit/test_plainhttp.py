"""The socket client of JSON requests reads every answer shape the node may give,
within its bounds, and refuses what is not HTTP: a real Unix socket, one thread
playing the node with raw bytes."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from gateway.client import plainhttp
from gateway.client.transport import ApiClient, NodeNotRunning, Target
from gateway.errors import AccessDenied, TransportError


class RawNode:
    """Answers each connection with ``answer`` after reading the request head and body."""

    def __init__(self, path: Path, answer: bytes) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                while len(body) < length:
                    body += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + body)
                conn.sendall(self.answer)

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "api.sock"


def ask(
    path: Path, *, body: bytes | list[bytes] | None = None, limit: int = 1024
) -> plainhttp.Answer:
    headers = {"Authorization": "Bearer t"}
    if isinstance(body, list):
        headers["Content-Length"] = str(sum(len(c) for c in body))
    return plainhttp.exchange(
        "POST" if body is not None else "GET",
        "/api/v1/whoami",
        body=body,
        headers=headers,
        limit=limit,
        socket_path=path,
        connect_timeout=5,
        timeout=5,
    )


@pytest.mark.parametrize(
    ("raw", "status", "body"),
    [
        (b'HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{"a":1}', 200, b'{"a":1}'),
        (
            b'HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{"a\r\n4;x=y\r\n":1}\r\n0\r\n\r\n',
            201,
            b'{"a":1}',
        ),
        (b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n[1,2]", 200, b"[1,2]"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", 204, b""),
        (b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\n{}", 401, b"{}"),
    ],
)
def test_answers_of_every_framing_are_read_whole(
    sock_path: Path, raw: bytes, status: int, body: bytes
) -> None:
    node = RawNode(sock_path, raw)
    try:
        answer = ask(sock_path)
    finally:
        node.close()
    assert (answer.status, answer.body) == (status, body)


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", plainhttp.ProtocolError),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", plainhttp.ProtocolError),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", plainhttp.ProtocolError),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", plainhttp.ProtocolError),
        # int() takes these; the framing does not: a sign, a 0x prefix, an underscore
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+2\r\nab\r\n0\r\n\r\n",
            plainhttp.ProtocolError,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\nab\r\n0\r\n\r\n",
            plainhttp.ProtocolError,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0_2\r\nab\r\n0\r\n\r\n",
            plainhttp.ProtocolError,
        ),
        # str.isdigit() takes a superscript two (latin-1 0xb2); int() refuses it
        (b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nab", plainhttp.ProtocolError),
        (b"HTTP/1.1 2\xb200 OK\r\nContent-Length: 0\r\n\r\n", plainhttp.ProtocolError),
        (b"HTTP/1.1 200 OK\r\nbroken header\r\n\r\n", plainhttp.ProtocolError),
        (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n", plainhttp.ProtocolError),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 4096\r\n\r\n" + b"x" * 4096,
            plainhttp.AnswerTooLarge,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n"
            + b"x" * 2048
            + b"\r\n0\r\n\r\n",
            plainhttp.AnswerTooLarge,
        ),
        (b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 2048, plainhttp.AnswerTooLarge),
    ],
)
def test_answers_that_are_not_http_or_too_large_are_refused(
    sock_path: Path, raw: bytes, error: type[Exception]
) -> None:
    node = RawNode(sock_path, raw)
    try:
        with pytest.raises(error):
            ask(sock_path)
    finally:
        node.close()


def test_bodies_are_sent_with_their_length(sock_path: Path) -> None:
    node = RawNode(sock_path, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    try:
        ask(sock_path, body=b"abc")
        ask(sock_path, body=[b"ab", b"cd"])
    finally:
        node.close()
    first, second = node.requests
    assert b"Content-Length: 3\r\n" in first
    assert first.endswith(b"\r\n\r\nabc")
    assert b"Content-Length: 4\r\n" in second
    assert second.endswith(b"\r\n\r\nabcd")
    assert first.startswith(b"POST /api/v1/whoami HTTP/1.1\r\nHost: localhost\r\n")


@pytest.mark.parametrize("value", ["t\r\nX-Injected: 1", "t\nx", "t\x00"])
def test_header_values_with_line_breaks_are_refused(sock_path: Path, value: str) -> None:
    with pytest.raises(ValueError, match="Invalid header"):
        plainhttp.exchange(
            "GET",
            "/",
            body=None,
            headers={"Authorization": value},
            limit=10,
            socket_path=sock_path,
            connect_timeout=1,
            timeout=1,
        )


def test_client_maps_socket_answers_to_the_exception_tree(sock_path: Path) -> None:
    client = ApiClient(Target(socket_path=sock_path, home=sock_path.parent), "tok")
    with pytest.raises(NodeNotRunning):
        client.call("GET", "/api/v1/whoami")
    refusal = b'{"error": {"reason": "access.disabled", "message": "token disabled"}}'
    node = RawNode(
        sock_path,
        b"HTTP/1.1 401 Unauthorized\r\nContent-Length: %d\r\n\r\n" % len(refusal) + refusal,
    )
    try:
        with pytest.raises(AccessDenied, match="token disabled"):
            client.call("GET", "/api/v1/whoami")
    finally:
        node.close()
    sock_path.unlink()
    node = RawNode(sock_path, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nnope!")
    try:
        with pytest.raises(TransportError, match="not JSON"):
            client.call("GET", "/api/v1/whoami")
    finally:
        node.close()
