"""Receive a stream of decrypted files into a private folder, all or nothing.

The files arrive as described in :mod:`gateway.client.framing`. They are
written, 0600 each, into a 0700 folder made beside the destination, checked
against the closing list of SHA-256 digests, and only then renamed into place.
A stream cut off, a member that is not a plain file, a name that is not a
plain relative name, or a digest that does not match: the temporary folder is
removed and :class:`~gateway.errors.TransportError` (or
:class:`~gateway.errors.VerificationError`) says so; nothing is left behind.
Memory stays bounded whatever the sizes (64 KiB at a time).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from gateway.client.framing import (
    END_MEMBER,
    MAX_END_MEMBER_BYTES,
    MAX_MEMBERS,
    check_member_name,
)
from gateway.errors import AlreadyExists, InvalidInput, TransportError, VerificationError
from gateway.files import (
    PRIVATE_DIR_MODE,
    create_private_file,
    empty_folder_mode,
    make_private_folders,
    remove_made_folders,
    sync_file,
    sync_folder,
    sync_folders,
    sync_tree,
    take_back,
)

__all__ = [
    "Received",
    "check_destination",
    "receive_files",
]

_CHUNK = 64 * 1024
_PARTIAL_PREFIX = ".ssw-partial-"
_DRAIN_LIMIT = 1024 * 1024


@dataclass(frozen=True)
class Received:
    """What a stream left on disk: the destination and each file (relative name -> path)."""

    folder: Path
    files: dict[str, Path]
    result: Any = None
    """The command's result the node put in the closing list (JSON)."""


def check_destination(out_dir: Path, *, must_be_empty: bool) -> None:
    """Refuse a destination that cannot receive the files, before anything is asked.

    ``must_be_empty``: the folder must not exist, or be an empty folder, and
    its parent must exist (``disclose``); otherwise missing folders above it
    are made 0700 and an existing folder receives new files beside its own,
    never overwriting one (``show``). Raises :class:`InvalidInput`.
    """
    if out_dir.is_symlink():
        raise InvalidInput(f"{out_dir} is a symbolic link; give a real folder")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise InvalidInput(f"{out_dir} exists and is not a folder")
        if must_be_empty and any(out_dir.iterdir()):
            raise InvalidInput(f"{out_dir} exists and is not empty; give a new folder")
    parent = out_dir.absolute().parent
    if not must_be_empty and not os.path.lexists(parent):
        _make_private_parents(parent)
    if not parent.is_dir():
        raise InvalidInput(f"folder {parent} does not exist; make it first")


def _make_private_parents(folder: Path) -> None:
    """Make ``folder`` and each missing one above it, 0700 whatever the umask."""
    try:
        make_private_folders(folder)
    except OSError as exc:
        raise InvalidInput(f"{folder}: cannot be made ({exc.strerror})") from None


def _cut(exc: BaseException) -> TransportError:
    return TransportError(
        f"the stream from the node was cut off ({type(exc).__name__}); nothing was kept: "
        "run the command again",
        reason="client.stream-cut",
    )


def _unpack(
    stream: IO[bytes], staging: Path, progress: Callable[[int], None] | None
) -> tuple[dict[str, tuple[str, int]], Any]:
    """Write each member under ``staging``; return name -> (sha256, size) and check the end."""
    seen: dict[str, tuple[str, int]] = {}
    end: dict[str, Any] | None = None
    with tarfile.open(fileobj=stream, mode="r|") as archive:
        for member in archive:
            if end is not None:
                raise VerificationError(
                    "the stream goes on after its closing list",
                    check="stream",
                    reason="client.stream",
                )
            if len(seen) >= MAX_MEMBERS or not member.isfile():
                raise VerificationError(
                    f"the stream holds a member that is not a plain file ({member.name!r})",
                    check="stream",
                    reason="client.stream",
                )
            source = archive.extractfile(member)
            assert source is not None
            if member.name == END_MEMBER:
                if member.size > MAX_END_MEMBER_BYTES:
                    raise VerificationError(
                        "the stream's closing list is too large",
                        check="stream",
                        reason="client.stream",
                    )
                try:
                    end = json.loads(source.read(member.size).decode("utf-8"))
                except (UnicodeDecodeError, ValueError):
                    raise VerificationError(
                        "the stream's closing list is not JSON",
                        check="stream",
                        reason="client.stream",
                    ) from None
                continue
            try:
                parts = check_member_name(member.name)
            except ValueError as exc:
                raise VerificationError(str(exc), check="stream", reason="client.stream") from None
            if member.name in seen:
                raise VerificationError(
                    f"the stream names {member.name!r} twice",
                    check="stream",
                    reason="client.stream",
                )
            folder = staging
            for part in parts[:-1]:
                folder = folder / part
                if not folder.exists():
                    folder.mkdir(mode=PRIVATE_DIR_MODE)
                    folder.chmod(PRIVATE_DIR_MODE)
            digest = hashlib.sha256()
            size = 0
            with create_private_file(folder / parts[-1]) as out:
                while chunk := source.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    if progress is not None:
                        progress(len(chunk))
                sync_file(out)
            seen[member.name] = (digest.hexdigest(), size)
    if end is None:
        raise TransportError(
            "the stream from the node ended before its closing list; nothing was kept: "
            "run the command again",
            reason="client.stream-cut",
        )
    listed = end.get("files") if isinstance(end, dict) else None
    if not isinstance(listed, dict) or set(listed) != set(seen):
        raise VerificationError(
            "the files received differ from the node's closing list",
            check="stream",
            reason="client.stream",
        )
    for name, (sha, size) in seen.items():
        want = listed[name]
        if not isinstance(want, dict) or want.get("sha256") != sha or want.get("size") != size:
            raise VerificationError(
                f"{name} does not match the node's closing list (SHA-256 or size)",
                check="stream",
                reason="client.stream",
            )
    # The HTTP body must end properly too (the node ends it only once it committed).
    drained = 0
    while chunk := stream.read(_CHUNK):
        drained += len(chunk)
        if drained > _DRAIN_LIMIT:
            raise VerificationError(
                "the stream goes on after its end", check="stream", reason="client.stream"
            )
    return seen, end.get("result")


def _place(staging: Path, out_dir: Path, names: list[str]) -> dict[str, Path]:
    """Move the checked files to ``out_dir``: the whole folder if it is new or empty.
    Every name is synced into its folder before this returns (:mod:`gateway.files`);
    if the disk fails meanwhile, nothing is left in ``out_dir`` (:class:`InvalidInput`)."""
    target = out_dir.absolute()
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        empty_mode = empty_folder_mode(target)
        removed = renamed = False
        try:
            sync_tree(staging)
            if empty_mode is not None:
                target.rmdir()
                removed = True
            staging.rename(target)
            renamed = True
            sync_folder(target.parent)
        except OSError as exc:
            if removed or renamed:  # the user's empty folder stays
                take_back(target, placed=renamed, empty_mode=empty_mode)
            raise _not_written(target, exc) from None
        return {name: target / name for name in names}
    # An existing folder with files of its own (``show --out``): add, never overwrite.
    clashes = [name for name in names if os.path.lexists(target / name)]
    if clashes:
        raise AlreadyExists(
            f"{target} already holds {', '.join(sorted(clashes))}; nothing was written: "
            "give another folder"
        )
    placed: dict[str, Path] = {}
    made: list[Path] = []
    try:
        for name in names:
            destination = target / name
            if not destination.parent.exists():
                made.extend(make_private_folders(destination.parent, sync=False))
            os.link(staging / name, destination)
            placed[name] = destination
        sync_folders([*(path.parent for path in placed.values()), *(f.parent for f in made)])
    except OSError as exc:
        for path in placed.values():
            path.unlink(missing_ok=True)
        remove_made_folders(made)
        raise _not_written(target, exc) from None
    return placed


def _not_written(target: Path, exc: OSError) -> InvalidInput:
    return InvalidInput(
        f"cannot write into {target}: {exc.strerror or exc}; nothing was kept there, "
        "though the node has recorded the command (see the ledger)"
    )


def receive_files(
    stream: IO[bytes],
    out_dir: Path,
    *,
    progress: Callable[[int], None] | None = None,
) -> Received:
    """Unpack the node's file stream into ``out_dir``, all or nothing.

    ``stream`` is the answer body (read in 64 KiB pieces). ``progress`` gets
    the number of bytes of each piece written. Returns the placed files.
    Raises :class:`TransportError` (cut off) or :class:`VerificationError`
    (not the framing of :mod:`gateway.client.framing`); then nothing is kept.
    """
    parent = out_dir.absolute().parent
    staging = Path(tempfile.mkdtemp(prefix=_PARTIAL_PREFIX, dir=parent))
    try:
        staging.chmod(PRIVATE_DIR_MODE)
        try:
            seen, result = _unpack(stream, staging, progress)
        except (tarfile.TarError, EOFError, OSError, http.client.HTTPException) as exc:
            if isinstance(exc, OSError) and exc.filename is not None:
                # A local file could not be written (disk full, permissions), not the link.
                raise InvalidInput(f"cannot write into {parent}: {exc.strerror}") from None
            raise _cut(exc) from None
        names = sorted(seen)
        placed = _place(staging, out_dir, names)
        return Received(out_dir.absolute(), placed, result)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(staging)
