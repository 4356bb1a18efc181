"""Storage of the exchange: outbox, inbox, sequence gaps, equivocations, envelope files.

Envelopes are kept as files in ``<blob_dir>/envelopes``, named by the SHA-256 of
their bytes, so that attachments of any size never pass through the database.
A file is written and flushed to disk *before* the row that names it commits:
a crash in between leaves an orphan file (harmless, removed by
:func:`sweep_orphan_envelopes`), never a row without its file.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterable
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

from gateway.errors import StorageError
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
    "envelope_path",
    "store_envelope_file",
    "sweep_orphan_envelopes",
]

ENVELOPE_DIR = "envelopes"
_CHUNK = 1 << 20
_HEX64 = frozenset("0123456789abcdef")


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
    if len(sha256_hex) != 64 or not set(sha256_hex) <= _HEX64:
        raise StorageError("envelope reference is not a SHA-256 hex digest")
    return _envelope_dir(blob_dir) / sha256_hex[:2] / sha256_hex


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def store_envelope_file(blob_dir: Path, source: BinaryIO) -> tuple[str, int, Path]:
    """Copy an envelope into the store, durably; return (sha256 hex, size, path).

    The bytes go to a temporary file in the store, are flushed and synced, and
    the file is renamed to its hash. Storing the same bytes twice is a no-op.
    """
    target_dir = _envelope_dir(blob_dir)
    target_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
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
        final.parent.mkdir(exist_ok=True, mode=0o700)
        tmp.replace(final)
        _fsync_dir(final.parent)
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
    final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
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
        _fsync_dir(final.parent)
    except OSError as exc:
        raise StorageError(f"envelope could not be stored: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _referenced(session: Session) -> set[str]:
    refs: set[str] = set(session.scalars(select(OutboxEntry.envelope_sha256)))
    refs.update(session.scalars(select(InboxEntry.envelope_sha256)))
    refs.update(session.scalars(select(Equivocation.other_envelope_sha256)))
    return refs


def sweep_orphan_envelopes(
    session: Session, blob_dir: Path, *, now: datetime, grace: timedelta = timedelta(hours=1)
) -> list[Path]:
    """Remove envelope files no row names and older than ``grace``; return them.

    The grace period keeps a file that a ``send`` or a receive is about to
    commit: a file is only an orphan once no transaction can still name it.
    """
    root = _envelope_dir(blob_dir)
    if not root.is_dir():
        return []
    refs = _referenced(session)
    cutoff = (now - grace).timestamp()
    removed: list[Path] = []
    candidates: Iterable[Path] = (p for p in root.rglob("*") if p.is_file())
    for path in candidates:
        name = path.name
        if name in refs:
            continue
        try:
            if path.stat().st_mtime > cutoff:
                continue
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed
