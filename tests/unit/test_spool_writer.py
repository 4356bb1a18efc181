"""The lone envelope's spool writer keeps exactly the bytes it is fed.

Past the page cache (``O_DIRECT``, whole aligned blocks from an aligned
buffer, the unaligned end written plainly), plainly from the start, or
plainly from the moment the file system refuses a direct write: the file
holds the same bytes, whatever the sizes of the pieces and of the whole.
Any other write error is not swallowed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.peer import server
from gateway.peer.server import _DIRECT_ALIGN, _DIRECT_BLOCK, _direct_io, _SpoolWriter

SIZES = [
    1,
    _DIRECT_ALIGN - 1,
    _DIRECT_ALIGN,
    _DIRECT_ALIGN + 1,
    _DIRECT_BLOCK - 1,
    _DIRECT_BLOCK,
    _DIRECT_BLOCK + 1,
    3 * _DIRECT_BLOCK + 12_345,
]
_REAL_WRITE = os.write


def _spool(path: Path, data: bytes, *, direct: bool, seed: int = 0) -> bool:
    """Feed ``data`` in pieces of random sizes; whether the writer began past the cache."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    writer = _SpoolWriter(fd, direct=direct)
    began_direct = writer.direct
    pieces = random.Random(seed)
    try:
        position = 0
        while position < len(data):
            step = pieces.randint(1, 300_000)
            writer.write(data[position : position + step])
            position += step
        writer.finish()
        os.fsync(fd)
    finally:
        writer.close()
    return began_direct


def _direct_allowed(directory: Path) -> bool:
    probe = directory / "probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        return _direct_io(fd, True)
    finally:
        os.close(fd)
        probe.unlink()


def _is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "plain"])
@pytest.mark.parametrize("size", SIZES)
def test_the_file_holds_exactly_the_bytes_fed(tmp_path: Path, size: int, direct: bool) -> None:
    data = os.urandom(size)
    began_direct = _spool(tmp_path / "envelope", data, direct=direct, seed=size)
    assert began_direct == (direct and _direct_allowed(tmp_path))
    assert (tmp_path / "envelope").read_bytes() == data


def test_direct_writes_are_whole_aligned_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not _direct_allowed(tmp_path):
        pytest.skip("this file system does not take O_DIRECT")
    direct_writes: list[int] = []

    def watching(fd: int, data: bytes | memoryview) -> int:
        if _is_direct(fd):
            direct_writes.append(len(data))
        return _REAL_WRITE(fd, data)

    monkeypatch.setattr(server.os, "write", watching)
    data = os.urandom(2 * _DIRECT_BLOCK + 3 * _DIRECT_ALIGN + 77)
    assert _spool(tmp_path / "envelope", data, direct=True)
    monkeypatch.undo()
    assert direct_writes == [_DIRECT_BLOCK, _DIRECT_BLOCK, 3 * _DIRECT_ALIGN]
    assert (tmp_path / "envelope").read_bytes() == data


def _refusing(after: int, refuse: Callable[[int, memoryview], int]) -> Callable[..., int]:
    """``os.write`` whose direct writes after the first ``after`` go to ``refuse``."""
    seen = [0]

    def write(fd: int, data: bytes | memoryview) -> int:
        if _is_direct(fd):
            seen[0] += 1
            if seen[0] > after:
                return refuse(fd, memoryview(data))
        return _REAL_WRITE(fd, data)

    return write


def _einval(_fd: int, _data: memoryview) -> int:
    raise OSError(errno.EINVAL, "Invalid argument")


def _short(fd: int, data: memoryview) -> int:
    return _REAL_WRITE(fd, data[: 3 * _DIRECT_ALIGN])


@pytest.mark.parametrize("after", [0, 1, 3])
@pytest.mark.parametrize("refuse", [_einval, _short], ids=["refused", "short"])
def test_a_file_system_refusing_midway_gets_the_rest_plainly(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    after: int,
    refuse: Callable[[int, memoryview], int],
) -> None:
    if not _direct_allowed(tmp_path):
        pytest.skip("this file system does not take O_DIRECT")
    monkeypatch.setattr(server.os, "write", _refusing(after, refuse))
    data = os.urandom(4 * _DIRECT_BLOCK + 5_000)
    assert _spool(tmp_path / "envelope", data, direct=True, seed=after)
    monkeypatch.undo()
    assert (tmp_path / "envelope").read_bytes() == data


def test_other_write_errors_are_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not _direct_allowed(tmp_path):
        pytest.skip("this file system does not take O_DIRECT")

    def full(_fd: int, _data: memoryview) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(server.os, "write", _refusing(1, full))
    open_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError) as raised:
        _spool(tmp_path / "envelope", os.urandom(3 * _DIRECT_BLOCK), direct=True)
    assert raised.value.errno == errno.ENOSPC
    assert len(os.listdir("/proc/self/fd")) == open_before  # the file was closed all the same
