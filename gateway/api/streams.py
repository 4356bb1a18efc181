"""Files streamed through the local API, both ways, in bounded memory.

Out (node to user): :func:`stream_folder` writes a folder's files to an
``application/x-tar`` answer in the framing of :mod:`gateway.client.framing`
(files, then a closing list of their SHA-256 digests and sizes, plus the
command's result). It runs on a worker thread and hands 256 KiB pieces to the
event loop, waiting for each to be written, so a slow or vanished reader
stops the writer: a client that goes away raises :class:`ConnectionError` in
the writer, which the callers let roll back whatever waited on the delivery.

In (user to node): :func:`spool_multipart` reads ``multipart/form-data``
part by part into a private folder (0700, files 0600), refusing more files
or larger ones than the policy allows before they are read whole.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from aiohttp import BodyPartReader, web

from gateway.client.framing import CONTENT_TYPE, END_MEMBER, TOTAL_BYTES_HEADER
from gateway.core.canonical import parse_bounded_json
from gateway.errors import ClientDisconnected, InvalidInput, PolicyRefused

__all__ = [
    "SpooledSend",
    "abort_stream",
    "folder_files",
    "prepare_file_stream",
    "spool_multipart",
    "stream_folder",
]

_PIECE = 256 * 1024
_WRITE_TIMEOUT = 600.0
_READ_CHUNK = 64 * 1024
_MAX_META_EXTRA = 64 * 1024
_MAX_NAME_BYTES = 255


class _LoopWriter(io.RawIOBase):
    """A write-only file for a worker thread that feeds a prepared aiohttp answer."""

    def __init__(self, response: web.StreamResponse, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._response = response
        self._loop = loop
        self._buffer = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = bytes(data)
        self._buffer += view
        if len(self._buffer) >= _PIECE:
            self.flush()
        return len(view)

    def flush(self) -> None:
        if not self._buffer:
            return
        piece, self._buffer = bytes(self._buffer), bytearray()
        future = asyncio.run_coroutine_threadsafe(self._response.write(piece), self._loop)
        future.result(timeout=_WRITE_TIMEOUT)

    def close(self) -> None:
        """Close without writing what is left.

        A dropped writer is finalised on whichever thread lets it go, possibly
        the event loop's own, where waiting for the loop would freeze it;
        :func:`stream_folder` flushes explicitly once the archive is whole.
        """
        self._buffer = bytearray()
        super().close()


class _Hashing(io.RawIOBase):
    """Reads a file and hashes what was read (for the closing list)."""

    def __init__(self, handle: IO[bytes]) -> None:
        super().__init__()
        self._handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data


def folder_files(folder: Path) -> list[str]:
    """The regular files under ``folder`` as sorted relative POSIX names."""
    return sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and not path.is_symlink()
    )


def prepare_file_stream(
    request: web.Request,
    response: web.StreamResponse,
    loop: asyncio.AbstractEventLoop,
    total: int,
) -> None:
    """From a worker thread: send the headers of a file stream of ``total`` bytes."""
    response.headers["Content-Type"] = CONTENT_TYPE
    response.headers[TOTAL_BYTES_HEADER] = str(total)
    response.enable_chunked_encoding()
    asyncio.run_coroutine_threadsafe(response.prepare(request), loop).result(timeout=_WRITE_TIMEOUT)


def stream_folder(
    response: web.StreamResponse,
    loop: asyncio.AbstractEventLoop,
    folder: Path,
    names: list[str],
    result: Mapping[str, Any],
) -> None:
    """From a worker thread: write ``names`` (under ``folder``) and the closing list.

    The answer must be prepared (:func:`prepare_file_stream`); the caller ends
    it with ``write_eof()`` once whatever depends on the delivery committed.
    Raises :class:`ConnectionError` when the reader went away.
    """
    writer = _LoopWriter(response, loop)
    listed: dict[str, dict[str, Any]] = {}
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        for name in names:
            path = folder / name
            with path.open("rb") as handle:
                info = tarfile.TarInfo(name)
                info.size = os.fstat(handle.fileno()).st_size
                info.mode = 0o600
                hashing = _Hashing(handle)
                archive.addfile(info, hashing)
            listed[name] = {"sha256": hashing.digest.hexdigest(), "size": hashing.size}
        end = json.dumps({"files": listed, "result": result}, sort_keys=True).encode("utf-8")
        info = tarfile.TarInfo(END_MEMBER)
        info.size = len(end)
        info.mode = 0o600
        archive.addfile(info, io.BytesIO(end))
    writer.flush()


def abort_stream(request: web.Request) -> ClientDisconnected:
    """Cut a prepared answer off (no closing chunk: the client keeps nothing)."""
    transport = request.transport
    if transport is not None:
        transport.abort()
    return ClientDisconnected("the file stream was cut off before it was complete")


@dataclass
class SpooledSend:
    """A multipart send, spooled: its ``meta`` object and the files in a private folder."""

    meta: dict[str, Any]
    folder: Path
    paths: list[Path]

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _plain_name(value: object, index: int) -> str:
    if (
        not isinstance(value, str)
        or not value
        or "/" in value
        or "\\" in value
        or "\x00" in value
        or value in (".", "..")
        or len(value.encode("utf-8")) > _MAX_NAME_BYTES
    ):
        raise InvalidInput(
            f"meta.attachments[{index}] must be one plain file name of at most "
            f"{_MAX_NAME_BYTES} bytes (no folders)"
        )
    return value


async def _read_part(part: BodyPartReader, limit: int, what: str) -> bytes:
    data = bytearray()
    while chunk := await part.read_chunk(_READ_CHUNK):
        data += chunk
        if len(data) > limit:
            raise PolicyRefused(f"{what} exceeds {limit} bytes", reason="request.too-large")
    return bytes(data)


async def spool_multipart(
    request: web.Request,
    *,
    max_case_bytes: int,
    max_attachments: int,
    max_attachment_bytes: int,
    run: Any,
) -> SpooledSend:
    """Read ``meta`` and the ``file`` parts of a send into a private folder.

    ``run`` runs blocking file writes off the loop. Raises
    :class:`InvalidInput` for a malformed body (parts missing, out of order,
    names not plain, more files than names) and :class:`PolicyRefused` for
    more or larger files than the policy allows; the folder is removed then.
    """
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError):
        raise InvalidInput(
            "request body must be multipart/form-data with a boundary",
            reason="request.content-type",
        ) from None
    folder = Path(tempfile.mkdtemp(prefix="gateway-api-send-"))
    spooled = SpooledSend({}, folder, [])
    try:
        first = await reader.next()
        if not isinstance(first, BodyPartReader) or first.name != "meta":
            raise InvalidInput("the first part must be 'meta' (the case, as JSON)")
        raw = await _read_part(first, max_case_bytes + _MAX_META_EXTRA, "the meta part")
        try:
            meta = parse_bounded_json(raw, max_bytes=max_case_bytes + _MAX_META_EXTRA)
        except InvalidInput as exc:
            raise InvalidInput(f"meta: {exc.message}", reason="request.json") from None
        if not isinstance(meta, dict):
            raise InvalidInput("meta must be a JSON object", reason="request.json")
        names_value = meta.pop("attachments", [])
        if not isinstance(names_value, list):
            raise InvalidInput("meta.attachments must be a list of file names")
        if len(names_value) > max_attachments:
            raise PolicyRefused(
                f"{len(names_value)} attachments exceed the limit of {max_attachments}",
                reason="policy.attachments",
            )
        names = [_plain_name(value, index) for index, value in enumerate(names_value)]
        if len(set(names)) != len(names):
            raise InvalidInput("meta.attachments names a file twice")
        spooled.meta = meta
        for index, name in enumerate(names):
            part = await reader.next()
            if not isinstance(part, BodyPartReader) or part.name != "file":
                raise InvalidInput(
                    f"meta.attachments names {len(names)} file(s) but part {index + 1} is missing"
                )
            path = folder / name
            handle = await run(lambda p=path: _create(p))
            size = 0
            try:
                while chunk := await part.read_chunk(_READ_CHUNK):
                    size += len(chunk)
                    if size > max_attachment_bytes:
                        raise PolicyRefused(
                            f"attachment {index} exceeds the limit of {max_attachment_bytes} bytes",
                            reason="policy.attachment-size",
                        )
                    await run(lambda c=chunk, h=handle: h.write(c))
            finally:
                await run(handle.close)
            spooled.paths.append(path)
        if await reader.next() is not None:
            raise InvalidInput("the body holds more file parts than meta.attachments names")
    except ConnectionError:
        spooled.remove()
        raise ClientDisconnected("client disconnected before the body was complete") from None
    except BaseException:
        spooled.remove()
        raise
    return spooled


def _create(path: Path) -> IO[bytes]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    return os.fdopen(os.open(path, flags, 0o600), "wb")
