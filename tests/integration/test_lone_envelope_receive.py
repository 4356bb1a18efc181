"""A lone large envelope over the real peer application, on the engine under test.

The receiver spools such a body while worker threads hash it twice (the
signed body digest, the envelope's ciphertext) and write it to disk as it
arrives (through the page cache by default, past it with ``[server]
spool_direct_io``); verification then reads only the header and signature. The answers must be those of
reading the file again: the intact envelope is stored byte for byte, a
tampered one is refused with the same reason and leaves nothing.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from gateway.errors import TransportError
from gateway.node.context import NodeContext
from gateway.node.outbox import send_case
from gateway.node.policy import load_policy
from gateway.node.runtime import utc_now
from gateway.peer import server as peer_server
from gateway.peer.client import EnvelopeResult, PeerClient
from gateway.peer.server import PeerServer, create_node_peer_app, limits_from_policy
from gateway.store.models_exchange import InboxEntry, envelope_path
from tests.exchange_pair import Pair, Side, example, pair  # noqa: F401 - the fixture
from tests.nodes import free_port

ATTACHMENT_BYTES = 20 * 1024 * 1024  # over the sender's 16 MiB batch: posted alone


def _received(side: Side) -> int:
    with side.node.db.transaction() as session:
        return int(session.scalar(select(func.count()).select_from(InboxEntry)) or 0)


def _queued_envelope(jp: Side, tmp_path: Path, size: int = ATTACHMENT_BYTES) -> Path:
    attachment = tmp_path / "scan.bin"
    with attachment.open("wb") as out:
        block = os.urandom(1 << 20)
        for _ in range(size >> 20):
            out.write(block)
    sent = send_case(
        NodeContext(jp.node, jp.keyring), jp.officer, "exam-fraud", example("exam-fraud"),
        [attachment], public=False, reply_to=None, now=utc_now(),
    )  # fmt: skip
    return envelope_path(jp.node.settings.blob_dir, sent.envelope_sha256)


def _post(pair: Pair, path: Path, *, direct: bool = False) -> EnvelopeResult:
    """Post ``path`` to pk's peer application, with ``[server] spool_direct_io`` as
    ``direct`` says."""
    jp, pk = pair.jp, pair.pk
    server_settings = pk.node.settings.server.model_copy(update={"spool_direct_io": direct})
    pk.node.settings = pk.node.settings.model_copy(update={"server": server_settings})

    async def scenario() -> EnvelopeResult:
        limits = limits_from_policy(load_policy(pk.node.settings).limits)
        app = create_node_peer_app(NodeContext(pk.node, pk.keyring), limits)
        assert app[peer_server.PEER_SERVICES].spool_direct is direct
        server = PeerServer(app, limits)
        port = await server.start("127.0.0.1", free_port())
        try:
            url = f"http://127.0.0.1:{port}"
            async with PeerClient(jp.node.settings, jp.keyring, peer_url=url) as client:
                [result] = await client.post_envelopes([path])
                return result
        finally:
            await server.stop()

    return asyncio.run(scenario())


def _as_stored(tmp_path: Path, data: bytes) -> Path:
    """``data`` in a file named by its SHA-256, as the sender's store names envelopes
    (so the client signs exactly these bytes and posts them as the body)."""
    path = tmp_path / "forged" / hashlib.sha256(data).hexdigest()
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path


def _spool_empty(pk: Side) -> bool:
    spool = pk.node.settings.data_dir / "spool"
    return not any(spool.iterdir()) if spool.exists() else True


def _takes_direct_io(directory: Path) -> bool:
    probe = directory / "direct-probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        return peer_server._direct_io(fd, True)
    finally:
        os.close(fd)
        probe.unlink()


@pytest.mark.parametrize(
    ("direct", "refused"),
    [(False, False), (True, False), (True, True)],
    ids=["page-cache", "direct", "direct-refused"],
)
def test_a_lone_large_envelope_is_stored_byte_for_byte(
    pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool, refused: bool
) -> None:
    """Written through the page cache and flushed as it arrives (the default), past
    the page cache (``[server] spool_direct_io``), or plainly after all on a file
    system that refuses O_DIRECT: the same answer and the same stored bytes."""
    if direct and not refused and not _takes_direct_io(tmp_path):
        pytest.skip("this file system does not take O_DIRECT")
    modes: list[bool] = []
    writer = peer_server._SpoolWriter

    class Watched(writer):  # type: ignore[misc,valid-type]
        def __init__(self, fd: int, *, direct: bool = True) -> None:
            super().__init__(fd, direct=direct)
            modes.append(self.direct)

    monkeypatch.setattr(peer_server, "_SpoolWriter", Watched)
    if refused:
        monkeypatch.setattr(peer_server, "_direct_io", lambda _fd, _on: False)
    path = _queued_envelope(pair.jp, tmp_path)
    assert path.stat().st_size > ATTACHMENT_BYTES
    result = _post(pair, path, direct=direct)
    assert modes == [direct and not refused]
    assert result.status == "accepted", result
    stored = envelope_path(pair.pk.node.settings.blob_dir, path.name)
    assert stored.read_bytes() == path.read_bytes()
    assert _received(pair.pk) == 1
    assert _spool_empty(pair.pk)


def _flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def _flip_in_the_middle(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x80]) + data[middle + 1 :]


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (_flip_last, "envelope.ciphertext-hash"),
        (_flip_in_the_middle, "envelope.ciphertext-hash"),
        (lambda data: data[:-1], "envelope.format"),
        (lambda data: data + b"\x00", "envelope.format"),
        (lambda data: data[:7] + b"X" + data[8:], "envelope.format"),
    ],
    ids=["last byte", "middle byte", "truncated", "appended", "magic"],
)
def test_a_tampered_lone_envelope_is_refused_and_leaves_nothing(
    pair: Pair, tmp_path: Path, tamper: Callable[[bytes], bytes], reason: str
) -> None:
    genuine = _queued_envelope(pair.jp, tmp_path)
    result = _post(pair, _as_stored(tmp_path, tamper(genuine.read_bytes())))
    assert (result.status, result.reason) == ("refused", reason)
    assert _received(pair.pk) == 0
    assert not [p for p in pair.pk.node.settings.blob_dir.rglob("*") if p.is_file()]
    assert _spool_empty(pair.pk)


def _failing_sync(
    real: Callable[..., Any], under: Path, failed: list[str], code: int = errno.EIO
) -> Callable[..., Any]:
    """``real`` (``os.fsync``, ``os.fdatasync`` or ``os.write``) failing with ``code`` (EIO,
    as a disk that lost the write-back reports it; ENOSPC, a full disk) for the files
    under ``under``."""

    def call(fd: int, *args: Any) -> Any:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if target.startswith(f"{under}{os.sep}"):
            failed.append(target)
            raise OSError(code, os.strerror(code))
        return real(fd, *args)

    return call


def _nothing_kept(pk: Side) -> bool:
    stored = [p for p in pk.node.settings.blob_dir.rglob("*") if p.is_file()]
    return _received(pk) == 0 and not stored and _spool_empty(pk)


@pytest.mark.parametrize(
    ("call", "code"),
    [("fdatasync", errno.EIO), ("fsync", errno.EIO), ("write", errno.ENOSPC)],
    ids=["background-flush", "final-sync", "disk-full"],
)
def test_a_lone_envelope_the_disk_did_not_take_is_not_accepted(
    pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str, code: int
) -> None:
    """The kernel reports a failed write-back to the first sync that asks after it,
    and not again: a lone envelope whose background flush (every 8 MiB) or final
    sync fails with EIO is not accepted (the sender gets a retryable failure) and nothing of
    it is kept, where the failure used to be passed over and the file stored and
    acknowledged. A full disk is the same retryable failure (it was an internal
    error). Once the disk takes writes again, the same envelope is accepted. The
    failure is injected at the system call: this machine has no failing or full
    disk to give a real one."""
    failed: list[str] = []
    spool = pair.pk.node.settings.data_dir / "spool"
    real = getattr(os, call)
    monkeypatch.setattr(os, call, _failing_sync(real, spool, failed, code))
    path = _queued_envelope(pair.jp, tmp_path)
    with pytest.raises(TransportError) as caught:
        _post(pair, path)
    assert "storage" in str(caught.value), caught.value
    assert failed
    assert _nothing_kept(pair.pk)
    monkeypatch.setattr(os, call, real)
    assert _post(pair, path).status == "accepted"
    assert _received(pair.pk) == 1


def test_a_batch_envelope_the_disk_did_not_take_fails_the_batch(
    pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An envelope of a batch too large to be held in memory is spooled to a file and
    synced before it is stored; when that sync fails with EIO, the envelope is
    answered as a retryable error and nothing of it is kept."""
    failed: list[str] = []
    spool = pair.pk.node.settings.data_dir / "spool"
    monkeypatch.setattr(os, "fsync", _failing_sync(os.fsync, spool, failed))
    path = _queued_envelope(pair.jp, tmp_path, size=1 << 20)  # a batch of one, as a file
    result = _post(pair, path)
    assert (result.status, result.retryable) == ("error", True), result
    assert failed
    assert _nothing_kept(pair.pk)
