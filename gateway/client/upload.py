"""``send --attach``: the case and its files as one streamed multipart/form-data body.

Parts, in order: ``meta`` (``application/json``: ``type``, ``case``,
``public``, ``reply_to``, ``attachments`` = the file names in order), then one
``file`` part per attachment (``application/octet-stream``), each read from
disk 64 KiB at a time. The length is known before sending, so the body is
sent with a ``Content-Length`` and never held in memory whole.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from gateway.errors import InvalidInput

__all__ = ["MultipartBody", "multipart_send_body"]

_CHUNK = 64 * 1024


class MultipartBody:
    """A streamed multipart body: its content type, exact length and chunk iterator.

    (A plain class: ``dataclasses`` would import ``inspect`` for every ``send``.)
    """

    def __init__(
        self,
        content_type: str,
        length: int,
        files_bytes: int,
        parts: list[tuple[bytes, Path | bytes]],
        tail: bytes,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.content_type = content_type
        self.length = length
        self.files_bytes = files_bytes
        self._parts = parts
        self._tail = tail
        self.progress = progress

    def __iter__(self) -> Iterator[bytes]:
        for head, content in self._parts:
            yield head
            if isinstance(content, bytes):
                yield content
                continue
            with content.open("rb") as handle:
                sent = 0
                size = os.fstat(handle.fileno()).st_size
                while chunk := handle.read(_CHUNK):
                    sent += len(chunk)
                    if sent > size:
                        raise InvalidInput(f"{content} grew while it was being sent")
                    if self.progress is not None:
                        self.progress(len(chunk))
                    yield chunk
                if sent != size:
                    raise InvalidInput(f"{content} changed size while it was being sent")
            yield b"\r\n"
        yield self._tail


def multipart_send_body(meta: dict[str, Any], attachments: Sequence[Path]) -> MultipartBody:
    """The body of ``POST /api/v1/bundles`` for ``meta`` and the files ``attachments``."""
    boundary = "ssw-" + os.urandom(16).hex()  # as secrets.token_hex, without its imports
    names = [path.name for path in attachments]
    meta_bytes = json.dumps({**meta, "attachments": names}, ensure_ascii=False).encode("utf-8")
    meta_head = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="meta"\r\n'
        "Content-Type: application/json\r\n\r\n"
    ).encode("ascii")
    meta_part = meta_bytes + b"\r\n"
    parts: list[tuple[bytes, Path | bytes]] = [(meta_head, meta_part)]
    length = len(meta_head) + len(meta_part)
    files_bytes = 0
    for index, path in enumerate(attachments):
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise InvalidInput(f"{path}: cannot be read ({exc.strerror})") from None
        head = (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="attachment-{index}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode("ascii")
        parts.append((head, path))
        length += len(head) + size + 2
        files_bytes += size
    tail = f"--{boundary}--\r\n".encode("ascii")
    length += len(tail)
    return MultipartBody(
        f"multipart/form-data; boundary={boundary}", length, files_bytes, parts, tail
    )
