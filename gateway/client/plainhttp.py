"""One HTTP/1.1 request and its whole answer over the node's Unix socket.

What the JSON requests of a user command need and nothing more: the request
line and headers, a body of known length (bytes, or chunks with the
``Content-Length`` given), ``Connection: close``, and an answer read with
bounds (status line, at most :data:`MAX_HEADERS` header lines of at most
:data:`MAX_LINE` bytes, a body by ``Content-Length``, chunked, or to the end
of the stream, at most ``limit`` bytes). ``http.client`` does the same, but
importing it loads its e-mail header parser and ``ssl`` (about a sixth of a
client command's start-up, docs/performance.md); TCP and HTTPS targets and
the streamed answers (``show --out``, ``ledger export``) still go through it
(:mod:`gateway.client.transport`).

Errors: :class:`ProtocolError` for an answer that is not HTTP/1.x as
expected, :class:`AnswerTooLarge` past ``limit``; ``OSError`` as the socket
raises it; ``ValueError`` for a header with a line break (as ``http.client``).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import BinaryIO, NamedTuple

__all__ = ["MAX_HEADERS", "MAX_LINE", "Answer", "AnswerTooLarge", "ProtocolError", "exchange"]

MAX_LINE = 64 * 1024
"""Longest status or header line read (bytes), as ``http.client``'s limit."""
MAX_HEADERS = 100
"""Most header lines read, as ``http.client``'s limit."""


class ProtocolError(Exception):
    """The answer is not the HTTP/1.x this client reads (a broken or foreign server)."""


class AnswerTooLarge(Exception):
    """The answer's body is longer than the caller's bound."""


class Answer(NamedTuple):
    """A whole answer: status code, headers (names lower-cased), body."""

    status: int
    headers: dict[str, str]
    body: bytes


_HEX_DIGITS = b"0123456789abcdefABCDEF"


def _is_decimal(text: str) -> bool:
    """True for ASCII digits only: ``str.isdigit`` also takes "²", which ``int`` refuses."""
    return text.isascii() and text.isdigit()


def _line(stream: BinaryIO) -> bytes:
    line = stream.readline(MAX_LINE + 1)
    if len(line) > MAX_LINE:
        raise ProtocolError("a line of the answer is too long")
    if not line:
        raise ProtocolError("the connection closed before the answer was complete")
    return line


def _read_exact(stream: BinaryIO, count: int) -> bytes:
    data = stream.read(count)
    if len(data) != count:
        raise ProtocolError("the connection closed before the answer was complete")
    return data


def _read_chunked(stream: BinaryIO, limit: int) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        size_text = _line(stream).split(b";", 1)[0].strip()
        if not size_text or size_text.strip(_HEX_DIGITS):
            raise ProtocolError("a chunk size of the answer is not a hexadecimal number")
        size = int(size_text, 16)
        if size == 0:
            for _ in range(MAX_HEADERS + 1):  # trailer lines, then the blank line
                if _line(stream) in (b"\r\n", b"\n"):
                    return b"".join(parts)
            raise ProtocolError("the answer's trailer is too long")
        total += size
        if total > limit:
            raise AnswerTooLarge
        parts.append(_read_exact(stream, size))
        if _line(stream) not in (b"\r\n", b"\n"):
            raise ProtocolError("a chunk of the answer does not end where it says")


def _read_answer(stream: BinaryIO, method: str, limit: int) -> Answer:
    status_line = _line(stream).decode("latin-1").rstrip("\r\n")
    version, _, rest = status_line.partition(" ")
    code_text = rest[:3]
    if not version.startswith("HTTP/1.") or not _is_decimal(code_text):
        raise ProtocolError("the answer does not start with an HTTP/1.x status line")
    status = int(code_text)
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        line = _line(stream)
        if line in (b"\r\n", b"\n"):
            break
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise ProtocolError("a header line of the answer has no colon")
        headers[name.strip().lower()] = value.strip()
    else:
        raise ProtocolError("the answer has too many header lines")
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return Answer(status, headers, b"")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return Answer(status, headers, _read_chunked(stream, limit))
    length_text = headers.get("content-length")
    if length_text is not None:
        if not _is_decimal(length_text):
            raise ProtocolError("the answer's Content-Length is not a number")
        length = int(length_text)
        if length > limit:
            raise AnswerTooLarge
        return Answer(status, headers, _read_exact(stream, length))
    body = stream.read(limit + 1)
    if len(body) > limit:
        raise AnswerTooLarge
    return Answer(status, headers, body)


def _connect(socket_path: Path, connect_timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(connect_timeout)
    try:
        sock.connect(str(socket_path))
    except BaseException:
        sock.close()
        raise
    return sock


def exchange(
    method: str,
    path: str,
    *,
    body: bytes | Iterable[bytes] | None,
    headers: Mapping[str, str],
    limit: int,
    socket_path: Path,
    connect_timeout: float,
    timeout: float,
) -> Answer:
    """Send one request to the node's Unix socket ``socket_path`` and read its whole answer.

    ``body`` as bytes gets its ``Content-Length``; a body of chunks must have it
    in ``headers`` (ValueError if not); no body on a POST, PUT or PATCH sends
    ``Content-Length: 0`` (as ``http.client``). The error answer's body is
    bounded by ``limit`` like any other.
    """
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost", "Accept-Encoding: identity"]
    given = {name.lower() for name in headers}
    if isinstance(body, bytes | bytearray):
        if "content-length" not in given:
            lines.append(f"Content-Length: {len(body)}")
    elif body is None:
        if method in ("POST", "PUT", "PATCH") and "content-length" not in given:
            lines.append("Content-Length: 0")
    elif "content-length" not in given:
        raise ValueError("a streamed body needs its Content-Length")
    for name, value in headers.items():
        if any(c in name or c in value for c in "\r\n\0") or ":" in name:
            raise ValueError(f"Invalid header {name!r}")
        lines.append(f"{name}: {value}")
    lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    sock = _connect(socket_path, connect_timeout)
    try:
        sock.settimeout(timeout)
        if isinstance(body, bytes | bytearray):
            sock.sendall(head + body)
        else:
            sock.sendall(head)
            for chunk in body or ():
                sock.sendall(chunk)
        with sock.makefile("rb") as stream:
            return _read_answer(stream, method, limit)
    finally:
        sock.close()
