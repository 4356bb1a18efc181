"""Files in and out of envelopes: attachment sources, output sinks, safe paths.

The envelope core (:mod:`gateway.core.envelope`) takes and gives file objects
only; this shell opens the files.

* :func:`seal_to_file` writes an envelope to a temporary file beside the
  target, flushes it to disk and only then links it into place; a failure
  leaves nothing behind, and an existing file is never overwritten.
* decrypted case data reaches the disk only through :mod:`gateway.files`:
  folders 0700 and files 0600, set explicitly so that no umask (not even 0)
  widens them, and every name synced into its folder.
* :func:`open_to_dir` decrypts an envelope's attachments into temporary files
  in the output folder and moves each into place (under a sanitised name that
  cannot leave the folder, never overwriting) only after the whole envelope
  verified and every final chunk authenticated. On any failure every
  temporary file is removed: nothing half-written is ever visible.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, BinaryIO

from pydantic import BaseModel

from gateway.core.envelope import (
    AttachmentInfo,
    AttachmentSource,
    OpenedEnvelope,
    SealedEnvelope,
    open_envelope,
    seal,
)
from gateway.core.filenames import sanitise_attachment_name
from gateway.core.keys import KeyManifest, NodeKeyring
from gateway.core.policy import Marking, Policy
from gateway.errors import AlreadyExists, InvalidInput
from gateway.files import PRIVATE_FILE_MODE, sync_file, sync_folder

__all__ = [
    "OpenedToDisk",
    "WrittenAttachment",
    "attachment_sources",
    "open_to_dir",
    "safe_output_path",
    "seal_to_file",
]

_PARTIAL_PREFIX = ".ssw-partial-"


def safe_output_path(out_dir: Path, name: str) -> Path:
    """Where attachment ``name`` is written inside ``out_dir``; never outside it.

    The name is sanitised to one path component; if that file exists already
    (or a link of that name does), ``-1``, ``-2``... is added before the
    extension: nothing is ever overwritten, and no existing link is followed.
    """
    if not out_dir.is_dir():
        raise InvalidInput(f"{out_dir}: the output folder does not exist or is not a folder")
    root = out_dir.resolve(strict=True)
    clean = sanitise_attachment_name(name)
    stem, dot, suffix = clean.rpartition(".")
    if not dot or not stem:
        stem, suffix = clean, ""
    for counter in range(10_000):
        if counter == 0:
            candidate_name = clean
        else:
            candidate_name = f"{stem}-{counter}.{suffix}" if suffix else f"{stem}-{counter}"
        candidate = root / candidate_name
        if candidate.parent != root or os.sep in candidate_name or candidate_name in (".", ".."):
            raise InvalidInput("attachment name does not stay inside the output folder")
        if not os.path.lexists(candidate):
            return candidate
    raise InvalidInput(f"too many files named like {clean!r} in {out_dir}")


@contextlib.contextmanager
def attachment_sources(paths: Sequence[Path]) -> Iterator[list[AttachmentSource]]:
    """Open files to attach; the name sent is the file's base name (data only)."""
    with contextlib.ExitStack() as stack:
        sources: list[AttachmentSource] = []
        for path in paths:
            try:
                handle = stack.enter_context(path.open("rb"))
            except OSError as exc:
                raise InvalidInput(f"{path}: cannot be read: {exc.strerror}") from None
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise InvalidInput(f"{path}: not a regular file")
            sources.append(AttachmentSource(name=path.name, size=info.st_size, stream=handle))
        yield sources


def _place(temp: Path, final: Path) -> None:
    """Link ``temp`` to ``final`` (fails if ``final`` exists), then drop ``temp``."""
    try:
        os.link(temp, final)
    except FileExistsError:
        raise AlreadyExists(f"{final} exists already; nothing was overwritten") from None
    temp.unlink()


def seal_to_file(
    target: Path,
    *,
    case_type: str,
    case: dict[str, Any] | BaseModel,
    attachments: Sequence[Path] = (),
    keyring: NodeKeyring,
    peer_manifest: KeyManifest,
    policy: Policy,
    sequence: int,
    now: datetime,
    marking: Marking | None = None,
    reply_to: str | None = None,
) -> SealedEnvelope:
    """Seal into ``target`` atomically: all of it, durable, or nothing."""
    if target.exists():
        raise AlreadyExists(f"{target} exists already; nothing was overwritten")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=_PARTIAL_PREFIX)
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "w+b") as out, attachment_sources(attachments) as sources:
            sealed = seal(
                out,
                case_type=case_type,
                case=case,
                attachments=sources,
                keyring=keyring,
                peer_manifest=peer_manifest,
                policy=policy,
                sequence=sequence,
                now=now,
                marking=marking,
                reply_to=reply_to,
            )
            sync_file(out)
        _place(temp, target)  # mkstemp made it 0600
        sync_folder(target.parent)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return sealed


@dataclass(frozen=True)
class WrittenAttachment:
    index: int
    name: str
    """The name as the sender gave it (data; shown, never used as a path)."""
    path: Path
    size: int
    sha256: str


@dataclass(frozen=True)
class OpenedToDisk:
    envelope: OpenedEnvelope
    files: tuple[WrittenAttachment, ...]


def open_to_dir(
    envelope_path: Path,
    out_dir: Path | None,
    *,
    keyring: NodeKeyring,
    peer_manifest: KeyManifest,
    policy: Policy,
    now: datetime,
    stored_at: datetime | None = None,
    body: bytes | None = None,
) -> OpenedToDisk:
    """Verify and decrypt the envelope at ``envelope_path``.

    With ``out_dir``, attachments are written there (see the module text);
    without it only the case is decrypted. ``stored_at``: when this node
    stored the envelope (see :func:`~gateway.core.envelope.open_envelope`);
    a suspect envelope is refused here, never accepted. ``body``: the envelope's
    bytes when its row holds them inline (then ``envelope_path`` only names it).
    """
    if out_dir is not None and not out_dir.is_dir():
        raise InvalidInput(f"{out_dir}: the output folder does not exist or is not a folder")
    temps: dict[int, tuple[Path, IO[bytes]]] = {}

    def sink_factory(info: AttachmentInfo) -> BinaryIO:
        assert out_dir is not None
        fd, name = tempfile.mkstemp(dir=out_dir, prefix=_PARTIAL_PREFIX)
        os.fchmod(fd, PRIVATE_FILE_MODE)
        handle = os.fdopen(fd, "wb")
        temps[info.index] = (Path(name), handle)
        return handle

    try:
        try:
            with io.BytesIO(body) if body is not None else envelope_path.open("rb") as stream:
                opened = open_envelope(
                    stream,
                    keyring=keyring,
                    peer_manifest=peer_manifest,
                    policy=policy,
                    now=now,
                    sink_factory=sink_factory if out_dir is not None else None,
                    stored_at=stored_at,
                )
        except FileNotFoundError:
            raise InvalidInput(f"{envelope_path}: no such envelope file") from None
        for _path, handle in temps.values():
            sync_file(handle)
            handle.close()
        files: list[WrittenAttachment] = []
        if out_dir is not None:
            for item in opened.written:
                temp, _handle = temps[item.index]
                final = safe_output_path(out_dir, item.name)
                _place(temp, final)
                files.append(
                    WrittenAttachment(
                        index=item.index,
                        name=item.name,
                        path=final,
                        size=item.size,
                        sha256=item.sha256,
                    )
                )
            sync_folder(out_dir)
    except BaseException:
        for temp, handle in temps.values():
            handle.close()
            temp.unlink(missing_ok=True)
        raise
    return OpenedToDisk(envelope=opened, files=tuple(files))
