"""Private files, and names that survive a crash: the one place that makes them.

A file's bytes are durable once the file is synced; its *name* (the entry a
create, a rename or a link writes into a folder) is durable only once that
folder is synced as well: syncing a file does not sync the folder entry that
names it (Linux fsync(2), which asks for an explicit sync of the folder).
Every file the node or its client leaves for a user or keeps for itself is
written, synced, given its name, and then its folder is synced, before the
command reports success: a crash or a power cut after that cannot take the
file away.

Light on purpose (standard library only): the command-line client imports it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import IO, BinaryIO

PRIVATE_FILE_MODE = 0o600
"""Mode of every file the node or its client writes (owner read and write only)."""
PRIVATE_DIR_MODE = 0o700
"""Mode of every folder the node or its client makes (owner only)."""


def sync_folder(folder: Path) -> None:
    """Make the entries of ``folder`` durable (names created, renamed or removed in it).

    Raises :class:`OSError` (the folder is gone, or the disk failed: a failed
    write-back is reported to the first sync that asks, and only to it).
    """
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_folders(folders: Iterable[Path]) -> None:
    """:func:`sync_folder` of each distinct folder, deepest first (a folder's own entry
    is in its parent, synced after it). Raises :class:`OSError`."""
    for folder in sorted(set(folders), key=lambda path: len(path.parts), reverse=True):
        sync_folder(folder)


def sync_tree(top: Path) -> None:
    """Sync every folder under ``top`` and ``top`` itself, deepest first, links not
    followed: the names of everything staged in ``top`` are durable before ``top`` is
    given its final name. Raises :class:`OSError`."""

    def fail(exc: OSError) -> None:
        raise exc

    for folder, _dirs, _files in os.walk(top, topdown=False, onerror=fail, followlinks=False):
        sync_folder(Path(folder))


def make_private_folders(folder: Path, *, sync: bool = True) -> list[Path]:
    """Make ``folder`` and each missing folder above it, mode 0700 whatever the umask,
    each new entry synced into its parent (``sync=False``: inside a staging folder
    that :func:`sync_tree` syncs whole before it is given its name). Returns the
    folders made, outermost first.

    Raises :class:`OSError` (the caller names the folder to the user).
    """
    missing: list[Path] = []
    here = folder
    while not os.path.lexists(here):
        missing.append(here)
        here = here.parent
    made: list[Path] = []
    try:
        for new in reversed(missing):
            new.mkdir(mode=PRIVATE_DIR_MODE)
            made.append(new)
            new.chmod(PRIVATE_DIR_MODE)
        if sync:
            sync_folders(new.parent for new in made)
    except OSError:
        remove_made_folders(made)  # all or nothing
        raise
    return made


def remove_made_folders(made: Iterable[Path]) -> None:
    """Remove folders a failed step made (innermost first), each only if still empty."""
    for folder in sorted(made, key=lambda path: len(path.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()


def empty_folder_mode(path: Path) -> int | None:
    """The permission bits of ``path`` if it is a folder (not a link) now, else None:
    what :func:`take_back` puts back when a placement over that (empty) folder fails."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None
    return stat.S_IMODE(info.st_mode) if stat.S_ISDIR(info.st_mode) else None


def take_back(path: Path, *, placed: bool, empty_mode: int | None) -> None:
    """Undo a placement at ``path`` that failed: remove what it put there (``placed``:
    only once its rename succeeded, so nothing another process made is touched), and
    put back the empty folder that was there before it (``empty_mode``, from
    :func:`empty_folder_mode`) unless something else has taken the name meanwhile."""
    if placed:
        shutil.rmtree(path, ignore_errors=True)
    if empty_mode is not None and not os.path.lexists(path):
        with contextlib.suppress(OSError):
            path.mkdir(mode=empty_mode)
            path.chmod(empty_mode)


def create_private_file(path: Path) -> BinaryIO:
    """Create ``path`` for writing, mode 0600 whatever the umask; never an existing file,
    never through a link.

    Raises :class:`FileExistsError` if anything (also a dangling link) has that name,
    :class:`OSError` otherwise. The caller syncs the file, then its folder.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise


def sync_file(handle: IO[bytes]) -> None:
    """Flush ``handle``'s buffer and sync the file's bytes. Raises :class:`OSError`."""
    handle.flush()
    os.fsync(handle.fileno())
