"""Storage of the exchange: outbox, inbox, sequence gaps, equivocations, envelope files.

Envelopes are kept as files in ``<blob_dir>/envelopes``, named by the SHA-256 of
their bytes, so that attachments of any size never pass through the database;
a small received envelope may instead live in its inbox row
(``InboxEntry.envelope_body``), one file and its fsyncs fewer. Readers take
either through :func:`open_stored_envelope`.
A file is written and flushed to disk *before* the row that names it commits:
a crash in between leaves an orphan file (harmless, removed by
:func:`sweep_orphan_envelopes`), never a row without its file.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import (
    BigInteger,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    select,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from gateway.core.domain import SHA256_HEX
from gateway.errors import StorageError
from gateway.files import sync_folder
from gateway.store.base import Base, UTCDateTime

__all__ = [
    "ENVELOPE_DIR",
    "Equivocation",
    "InboxEntry",
    "OutboxEntry",
    "OutboxState",
    "SequenceCounter",
    "SequenceGap",
    "adopt_envelope_file",
    "adopt_envelope_files",
    "destroy_envelope_file",
    "envelope_path",
    "make_store_folder",
    "open_stored_envelope",
    "store_envelope_file",
    "sweep_orphan_envelopes",
]

ENVELOPE_DIR = "envelopes"
_CHUNK = 1 << 20
_ENVELOPE_MAGIC = b"SSWG-ENV"
_PREFIX_BYTES = 14  # magic (8), format version (2), header length (4): docs/envelope.md
_SIGNATURE_BYTES = 64
_MAX_HEADER_REGION = _PREFIX_BYTES + (1 << 20) + _SIGNATURE_BYTES


class OutboxState:
    QUEUED = "queued"
    DELIVERED = "delivered"
    REPLACED = "replaced"
    """Never delivered, and re-sent as another bundle (``gateway resend``): the
    replacement carries the same content, so this one is no longer sent."""


class SequenceCounter(Base):
    """The last sequence number assigned on an outgoing channel (``jp->pk``).

    The row is locked (``FOR UPDATE``) while a bundle is queued, so two
    concurrent ``send`` calls can never take the same number; the unique
    constraint on the outbox is the second line of defence.
    """

    __tablename__ = "exchange_sequence"

    channel: Mapped[str] = mapped_column(String(16), primary_key=True)
    last_sequence: Mapped[int] = mapped_column(BigInteger)


class OutboxEntry(Base):
    """A sealed bundle waiting for, or holding, the peer's signed receipt."""

    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("channel", "sequence", name="uq_outbox_channel_sequence"),
        Index("ix_outbox_state_channel_sequence", "state", "channel", "sequence"),
        Index("ix_outbox_state_next_attempt", "state", "next_attempt_at"),  # 0011_hot_indexes
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    bundle_id: Mapped[str] = mapped_column(String(64), unique=True)
    channel: Mapped[str] = mapped_column(String(16))
    recipient: Mapped[str] = mapped_column(String(8))
    sequence: Mapped[int] = mapped_column(BigInteger)
    case_type: Mapped[str] = mapped_column(String(64))
    marking: Mapped[str] = mapped_column(String(32))
    reply_to: Mapped[str | None] = mapped_column(String(64), nullable=True)
    envelope_sha256: Mapped[str] = mapped_column(String(64))
    envelope_size: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16), default=OutboxState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(String(300), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    receipt: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    actor: Mapped[str] = mapped_column(String(160))
    signing_key_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """The key that signed it (None on rows made before the column: read the header)."""
    replaces: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """The bundle this one re-sends under current keys (``gateway resend``)."""
    replaced_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """The bundle that re-sent this one."""


class InboxEntry(Base):
    """A bundle received from the peer, stored as received (still encrypted)."""

    __tablename__ = "inbox"
    __table_args__ = (
        UniqueConstraint("sender", "bundle_id", name="uq_inbox_sender_bundle_id"),
        Index("ix_inbox_channel_sequence", "channel", "sequence"),
        # 0011_hot_indexes: the replay check, lookups by bundle id alone, lists by type
        Index("ix_inbox_envelope_sha256", "envelope_sha256"),
        Index("ix_inbox_bundle_id", "bundle_id"),
        Index("ix_inbox_case_type_received", "case_type", "received_at", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sender: Mapped[str] = mapped_column(String(8))
    bundle_id: Mapped[str] = mapped_column(String(64))
    channel: Mapped[str] = mapped_column(String(16))
    sequence: Mapped[int] = mapped_column(BigInteger)
    case_type: Mapped[str] = mapped_column(String(64))
    marking: Mapped[str] = mapped_column(String(32))
    reply_to: Mapped[str | None] = mapped_column(String(64), nullable=True)
    signing_key_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    envelope_sha256: Mapped[str] = mapped_column(String(64))
    envelope_size: Mapped[int] = mapped_column(BigInteger)
    receipt: Mapped[bytes] = mapped_column(LargeBinary)
    envelope_body: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, deferred=True)
    """The envelope's bytes when it is small enough to live in the row
    (``[database] inline_envelope_max_bytes``); None: it is a file in the envelope
    store named by ``envelope_sha256`` (0018_inline_envelopes). Read it with
    :func:`open_stored_envelope`; a purge sets it back to None."""
    suspect_since: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    """When this node marked it suspect: its signing key was revoked and distrusted
    from a moment before it was received (docs/keys.md, "Revocation with a time")."""
    replaces: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """The bundle of the same sender this one re-sends (signed header field)."""
    replaced_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """The bundle of the same sender that re-sent this one."""


class SequenceGap(Base):
    """A run of sequence numbers on an incoming channel not received (yet)."""

    __tablename__ = "inbox_gap"
    __table_args__ = (Index("ix_inbox_gap_channel_first", "channel", "first_missing"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    channel: Mapped[str] = mapped_column(String(16))
    first_missing: Mapped[int] = mapped_column(BigInteger)
    last_missing: Mapped[int] = mapped_column(BigInteger)
    noticed_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Equivocation(Base):
    """A second, different envelope the peer sent under a bundle id already received.

    Its signed header is kept here and the whole envelope stays in the
    envelope store (named by ``other_envelope_sha256``) as evidence.
    """

    __tablename__ = "equivocation"
    __table_args__ = (
        UniqueConstraint(
            "sender", "bundle_id", "other_envelope_sha256", name="uq_equivocation_evidence"
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sender: Mapped[str] = mapped_column(String(8))
    bundle_id: Mapped[str] = mapped_column(String(64))
    first_envelope_sha256: Mapped[str] = mapped_column(String(64))
    other_envelope_sha256: Mapped[str] = mapped_column(String(64))
    other_header: Mapped[bytes] = mapped_column(LargeBinary)
    detected_at: Mapped[datetime] = mapped_column(UTCDateTime())


# -- envelope files ---------------------------------------------------------------


def _envelope_dir(blob_dir: Path) -> Path:
    return blob_dir / ENVELOPE_DIR


def envelope_path(blob_dir: Path, sha256_hex: str) -> Path:
    """Where the envelope with this SHA-256 lives (the name is checked, never a path)."""
    if not isinstance(sha256_hex, str) or not SHA256_HEX.fullmatch(sha256_hex):
        raise StorageError("envelope reference is not a SHA-256 hex digest")
    return _envelope_dir(blob_dir) / sha256_hex[:2] / sha256_hex


def open_stored_envelope(blob_dir: Path, sha256_hex: str, body: bytes | None) -> BinaryIO:
    """A binary stream of a stored envelope: its inline ``body`` when the row holds
    one, else the file named by ``sha256_hex`` (``FileNotFoundError`` when it is
    gone, :class:`~gateway.errors.StorageError` for a name that is no hash).
    The caller closes it (it is a context manager either way)."""
    if body is not None:
        return io.BytesIO(body)
    return envelope_path(blob_dir, sha256_hex).open("rb")


_DURABLE_FOLDERS: set[Path] = set()
_FOLDERS_LOCK = threading.Lock()


def make_store_folder(folder: Path, *, root: Path) -> None:
    """Create ``folder`` of the envelope store (0700, with any missing folders between
    it and ``root``, the store's top) and make its entry durable, with every entry
    from ``root`` down: each of those folders is synced into its parent once per
    process, whoever created it, before this process names a file in it. A file's
    sync and its folder's sync do not make the folder's own entry durable, and a
    folder another thread or process has just made may not be synced yet.
    Raises :class:`OSError`; :class:`ValueError` if ``folder`` is not within ``root``.
    """
    if folder in _DURABLE_FOLDERS:
        return
    chain = [folder]
    while chain[-1] != root:
        if chain[-1] == chain[-1].parent:
            raise ValueError(f"{folder} is not within {root}")
        chain.append(chain[-1].parent)
    with _FOLDERS_LOCK:
        for made in reversed(chain):  # the top first
            if made in _DURABLE_FOLDERS:
                continue
            made.mkdir(parents=made == root, exist_ok=True, mode=0o700)
            sync_folder(made.parent)
            _DURABLE_FOLDERS.add(made)


def store_envelope_file(blob_dir: Path, source: BinaryIO) -> tuple[str, int, Path]:
    """Copy an envelope into the store, durably; return (sha256 hex, size, path).

    The bytes go to a temporary file in the store, are flushed and synced, and
    the file is renamed to its hash. Storing the same bytes twice is a no-op.
    """
    target_dir = _envelope_dir(blob_dir)
    try:
        make_store_folder(target_dir, root=blob_dir)
    except OSError as exc:
        raise StorageError(f"envelope could not be stored: {exc.strerror}") from None
    tmp = target_dir / f".tmp-{secrets.token_hex(8)}"
    digest = hashlib.sha256()
    size = 0
    try:
        with tmp.open("xb") as out:
            while chunk := source.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        sha = digest.hexdigest()
        final = envelope_path(blob_dir, sha)
        make_store_folder(final.parent, root=blob_dir)
        tmp.replace(final)
        sync_folder(final.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"envelope could not be stored: {exc.strerror}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return sha, size, final


def adopt_envelope_file(blob_dir: Path, source: Path, sha256_hex: str) -> Path:
    """Put the file ``source`` (whose SHA-256 the caller computed) into the store, durably.

    A hard link when the store is on the same file system (a received
    envelope of any size costs no copy), else a copy checked against the
    hash. The caller must not change ``source`` afterwards.
    """
    final = envelope_path(blob_dir, sha256_hex)
    try:
        make_store_folder(final.parent, root=blob_dir)
    except OSError as exc:
        raise StorageError(f"envelope could not be stored: {exc.strerror}") from None
    tmp = final.parent / f".tmp-{secrets.token_hex(8)}"
    try:
        try:
            os.link(source, tmp)
        except OSError:
            with source.open("rb") as handle:
                copied, _, path = store_envelope_file(blob_dir, handle)
            if copied != sha256_hex:
                raise StorageError("the envelope changed while it was being stored") from None
            return path
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(final)
        sync_folder(final.parent)
    except OSError as exc:
        raise StorageError(f"envelope could not be stored: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _header_region(handle: BinaryIO, size: int) -> int:
    """Bytes from the start of an envelope file up to the end of its signature.

    The header holds the sealed copies of the content key (docs/envelope.md);
    a file that does not start like an envelope is treated as all header, up
    to the largest header a policy allows.
    """
    prefix = handle.read(_PREFIX_BYTES)
    if len(prefix) == _PREFIX_BYTES and prefix[:8] == _ENVELOPE_MAGIC:
        header_length = int.from_bytes(prefix[10:14], "big")
        return min(size, _PREFIX_BYTES + header_length + _SIGNATURE_BYTES, _MAX_HEADER_REGION)
    return min(size, _MAX_HEADER_REGION)


def destroy_envelope_file(blob_dir: Path, sha256_hex: str) -> bool:
    """Destroy the stored envelope with this SHA-256; True if there was one.

    First the header (which holds every sealed copy of the content key) is
    overwritten with zeros in place and synced, so that the ciphertext left on
    the disk until its blocks are reused can no longer be decrypted with any
    key of this node; then the file is unlinked and its folder synced. Links
    are never followed. Idempotent: a missing file is not an error.
    """
    path = envelope_path(blob_dir, sha256_hex)
    try:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StorageError(
            f"envelope {sha256_hex[:12]} cannot be destroyed: {exc.strerror}"
        ) from None
    try:
        with os.fdopen(fd, "r+b") as handle:
            size = os.fstat(handle.fileno()).st_size
            region = _header_region(handle, size)
            handle.seek(0)
            remaining = region
            while remaining:
                step = min(remaining, _CHUNK)
                handle.write(bytes(step))
                remaining -= step
            handle.flush()
            os.fsync(handle.fileno())
        path.unlink(missing_ok=True)
        sync_folder(path.parent)
    except OSError as exc:
        raise StorageError(
            f"envelope {sha256_hex[:12]} cannot be destroyed: {exc.strerror}"
        ) from None
    return True


def _referenced(session: Session) -> set[str]:
    refs: set[str] = set(session.scalars(select(OutboxEntry.envelope_sha256)))
    refs.update(session.scalars(select(InboxEntry.envelope_sha256)))
    refs.update(session.scalars(select(Equivocation.other_envelope_sha256)))
    return refs


_CLOCK_PROBE = ".clock-probe"


def _filesystem_now(root: Path) -> float:
    """The blob store's own idea of now (seconds since the epoch, as in ``st_mtime``).

    A one-byte write stamps the probe the way a write stamps an envelope file, so
    ages are measured on the clock that stamped the files (a network file system's
    server clock, say) and never against the process clock, which may differ.
    """
    probe = root / _CLOCK_PROBE
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, b".")
    finally:
        os.close(fd)
    return probe.stat().st_mtime


def sweep_orphan_envelopes(
    session: Session, blob_dir: Path, *, grace: timedelta = timedelta(hours=1)
) -> list[Path]:
    """Remove envelope files no row names and older than ``grace``; return them.

    The grace period keeps a file that a ``send`` or a receive is about to
    commit: a file is only an orphan once no transaction can still name it.
    Age is file modification time against the blob store's own clock
    (:func:`_filesystem_now`): a process clock ahead of the file system's must
    never make a file being committed look old.
    """
    root = _envelope_dir(blob_dir)
    if not root.is_dir():
        return []
    refs = _referenced(session)
    cutoff = _filesystem_now(root) - grace.total_seconds()
    removed: list[Path] = []
    candidates: Iterable[Path] = (p for p in root.rglob("*") if p.is_file())
    for path in candidates:
        name = path.name
        if name in refs or name == _CLOCK_PROBE:
            continue
        try:
            if path.stat().st_mtime > cutoff:
                continue
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


def adopt_envelope_files(blob_dir: Path, files: Sequence[tuple[Path, str]]) -> None:
    """Put several received files into the store at once, durably (one batch).

    ``files`` pairs each source file with the SHA-256 hex its caller computed
    while the bytes arrived. Same guarantees as :func:`adopt_envelope_file`
    (a hard link, else a checked copy; synced before the caller's row
    commits), but the data syncs of the files run side by side, so the file
    system can commit them together, and each store folder is synced once.
    Raises :class:`~gateway.errors.StorageError` naming the cause; a file
    already in the store is left as it is.
    """
    if not files:
        return
    staged: list[tuple[Path, Path]] = []
    folders: set[Path] = set()
    try:
        for source, sha in files:
            final = envelope_path(blob_dir, sha)
            make_store_folder(final.parent, root=blob_dir)
            tmp = final.parent / f".tmp-{secrets.token_hex(8)}"
            try:
                os.link(source, tmp)
            except OSError:
                adopt_envelope_file(blob_dir, source, sha)  # another file system: a copy
                continue
            staged.append((tmp, final))
            folders.add(final.parent)
        with ThreadPoolExecutor(max_workers=_SYNC_WORKERS) as pool:
            list(pool.map(_fsync_file, [tmp for tmp, _ in staged]))
            for tmp, final in staged:
                tmp.replace(final)
            list(pool.map(sync_folder, sorted(folders)))
    except OSError as exc:
        raise StorageError(f"envelope could not be stored: {exc.strerror}") from None
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


_SYNC_WORKERS = 8


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
