"""Chunked XChaCha20-Poly1305 secretstream over file objects, with fixed framing.

One *stream* carries one plaintext (the case content, or one attachment) of a
size known in advance::

    stream  = header(24) || chunk_1 || ... || chunk_n
    chunk_i = secretstream ciphertext of plaintext bytes [(i-1)*C, min(i*C, size))
              (plaintext length + 17 bytes: 1 encrypted tag byte, 16 bytes MAC)

``C`` is the chunk size (64 KiB in envelope format 1); ``n = max(1, ceil(size / C))``;
every chunk but the last carries ``TAG_MESSAGE`` and the last one carries
``TAG_FINAL`` (an empty plaintext still has one, final, chunk). Because sizes
are fixed by the (signed) envelope header, the framing has no length fields to
lie about: a reader knows every chunk boundary before reading it, truncation
and extension are caught by the final tag, and reordering or dropping chunks
by the MAC over the implicit counter.

Memory use is one chunk, whatever the size. Pure: takes file objects that the
caller opened, and the 24-byte stream header (randomness) as a value, so
tests check exact bytes. A stream header is set with libsodium's
``init_pull``, which derives exactly the state ``init_push`` would derive from
that header; the bytes written are those of a standard secretstream and any
libsodium ``init_pull``/``pull`` reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

import nacl.bindings as sodium
import nacl.exceptions

__all__ = [
    "ABYTES",
    "CHUNK_SIZE",
    "HEADER_BYTES",
    "KEY_BYTES",
    "StreamDecryptError",
    "StreamSourceError",
    "chunk_count",
    "ciphertext_size",
    "decrypt_stream",
    "encrypt_stream",
    "read_exact",
]

CHUNK_SIZE = 64 * 1024
HEADER_BYTES: int = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES
ABYTES: int = sodium.crypto_secretstream_xchacha20poly1305_ABYTES
KEY_BYTES: int = sodium.crypto_secretstream_xchacha20poly1305_KEYBYTES
_TAG_MESSAGE: int = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
_TAG_FINAL: int = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL

Write = Callable[[bytes], object]


class StreamSourceError(Exception):
    """The plaintext source gave fewer or more bytes than its stated size."""


class StreamDecryptError(Exception):
    """A chunk failed to authenticate, carried the wrong tag, or the input ended early."""


def chunk_count(size: int, chunk_size: int = CHUNK_SIZE) -> int:
    """Number of chunks for ``size`` plaintext bytes (at least one)."""
    if size < 0:
        raise ValueError("size must not be negative")
    return max(1, -(-size // chunk_size))


def ciphertext_size(size: int, chunk_size: int = CHUNK_SIZE) -> int:
    """Exact number of bytes of the stream for ``size`` plaintext bytes."""
    return HEADER_BYTES + size + ABYTES * chunk_count(size, chunk_size)


def read_exact(source: BinaryIO, count: int) -> bytes:
    """``count`` bytes from ``source``; fewer only if it ends sooner."""
    parts: list[bytes] = []
    missing = count
    while missing > 0:
        part = source.read(missing)
        if not part:
            break
        parts.append(part)
        missing -= len(part)
    return b"".join(parts) if len(parts) != 1 else parts[0]


def _state(key: bytes, header: bytes) -> sodium.crypto_secretstream_xchacha20poly1305_state:
    if len(key) != KEY_BYTES or len(header) != HEADER_BYTES:
        raise ValueError("secretstream key is 32 bytes and header 24 bytes")
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    sodium.crypto_secretstream_xchacha20poly1305_init_pull(state, header, key)
    return state


def encrypt_stream(
    key: bytes,
    header: bytes,
    source: BinaryIO,
    size: int,
    write: Write,
    *,
    chunk_size: int = CHUNK_SIZE,
) -> None:
    """Encrypt exactly ``size`` bytes read from ``source``; pass the stream to ``write``.

    Raises :class:`StreamSourceError` if the source ends early or holds more.
    """
    state = _state(key, header)
    write(header)
    chunks = chunk_count(size, chunk_size)
    remaining = size
    for index in range(chunks):
        want = min(chunk_size, remaining)
        plain = read_exact(source, want) if want else b""
        if len(plain) != want:
            raise StreamSourceError(
                f"source ended {remaining - len(plain)} bytes before its stated size"
            )
        remaining -= want
        last = index == chunks - 1
        if last and source.read(1):
            raise StreamSourceError("source holds more bytes than its stated size")
        write(
            sodium.crypto_secretstream_xchacha20poly1305_push(
                state, plain, None, _TAG_FINAL if last else _TAG_MESSAGE
            )
        )


def decrypt_stream(
    key: bytes,
    source: BinaryIO,
    size: int,
    write: Write,
    *,
    chunk_size: int = CHUNK_SIZE,
) -> None:
    """Read and decrypt one stream of ``size`` plaintext bytes; pass plaintext to ``write``.

    Every chunk is authenticated before its plaintext is handed on; a bad MAC,
    a wrong tag or a short input raises :class:`StreamDecryptError`.
    """
    header = read_exact(source, HEADER_BYTES)
    if len(header) != HEADER_BYTES:
        raise StreamDecryptError("stream ends inside its header")
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    sodium.crypto_secretstream_xchacha20poly1305_init_pull(state, header, key)
    chunks = chunk_count(size, chunk_size)
    remaining = size
    for index in range(chunks):
        want = min(chunk_size, remaining)
        sealed = read_exact(source, want + ABYTES)
        if len(sealed) != want + ABYTES:
            raise StreamDecryptError(f"stream ends inside chunk {index}")
        try:
            plain, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(state, sealed, None)
        except nacl.exceptions.CryptoError:
            raise StreamDecryptError(f"chunk {index} does not authenticate") from None
        expected = _TAG_FINAL if index == chunks - 1 else _TAG_MESSAGE
        if tag != expected:
            raise StreamDecryptError(f"chunk {index} carries an unexpected tag")
        remaining -= want
        write(plain)
