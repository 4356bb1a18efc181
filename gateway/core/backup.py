"""The backup archive: its trailer, its manifest, and the rules a restore checks.

Pure: bytes and values in, values out or :class:`BackupDamaged` raised; no
file, no clock, no randomness of its own (salt and nonces are parameters).

An archive is a ZIP file (every member stored, never compressed) whose ZIP
comment is a fixed-length **trailer**::

    ssw-gateway/backup/v1 <salt 32 hex> <opslimit 10 digits> <memlimit 12 digits>
        <sha256 64 hex> <mac 64 hex>

``sha256`` is the SHA-256 of every byte before the trailer (the whole ZIP up
to and including the comment's length field); ``mac`` is HMAC-SHA256 over
``tagged(Purpose.BACKUP, b"archive" || sha256)`` under a key derived from the
node's keystore passphrase with Argon2id (salt and limits from the trailer).
So any changed byte is found before anything is parsed: a wrong ``sha256``
says the archive is damaged, a right ``sha256`` with a wrong ``mac`` says it
was made with another passphrase or forged.

Members: ``manifest.json`` (canonical JSON, below), ``database/...`` (the
SQLite online backup or a ``pg_dump`` custom-format file) and ``home/...``
(the node home's files). A file holding a plaintext private key (a TLS key in
PEM) is **sealed**: stored as ``nonce || XChaCha20-Poly1305(plaintext)`` under
a second key derived from the same Argon2id output, its archive path bound as
associated data; the keystore's own files are stored as they are (encrypted
already). The archive therefore holds private keys only encrypted.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any, Final, Literal

import nacl.bindings
import nacl.exceptions
import nacl.pwhash

from gateway.core.canonical import canonical_bytes, parse_canonical
from gateway.core.domain import SHA256_HEX, Purpose, tagged
from gateway.core.times import Precision, format_utc
from gateway.errors import InvalidInput, VerificationError

__all__ = [
    "BACKUP_FORMAT",
    "MANIFEST_MEMBER",
    "MAX_MEMBERS",
    "MAX_PATH_BYTES",
    "NONCE_BYTES",
    "SALT_BYTES",
    "TRAILER_BYTES",
    "ArchiveFile",
    "BackupDamaged",
    "BackupKeys",
    "BackupManifest",
    "Trailer",
    "archive_mac",
    "check_archive",
    "check_member_path",
    "derive_keys",
    "looks_like_plain_private_key",
    "open_sealed",
    "parse_manifest",
    "parse_trailer",
    "seal_file",
]

BACKUP_FORMAT: Final = "ssw-gateway/backup/v1"
MANIFEST_MEMBER: Final = "manifest.json"
MAX_MANIFEST_BYTES: Final = 256 * 1024 * 1024
MAX_MEMBERS: Final = 1_000_000
MAX_PATH_BYTES: Final = 1024
MAX_SEALED_BYTES: Final = 1024 * 1024
SALT_BYTES: Final = nacl.pwhash.argon2id.SALTBYTES
NONCE_BYTES: Final = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
_OPS_RANGE = (nacl.pwhash.argon2id.OPSLIMIT_MIN, nacl.pwhash.argon2id.OPSLIMIT_SENSITIVE)
_MEM_RANGE = (nacl.pwhash.argon2id.MEMLIMIT_MIN, nacl.pwhash.argon2id.MEMLIMIT_SENSITIVE)
_TRAILER_RE = re.compile(
    rb"ssw-gateway/backup/v1 ([0-9a-f]{32}) ([0-9]{10}) ([0-9]{12}) ([0-9a-f]{64}) ([0-9a-f]{64})"
)
TRAILER_BYTES: Final = len(BACKUP_FORMAT) + 1 + 32 + 1 + 10 + 1 + 12 + 1 + 64 + 1 + 64
_PEM_PRIVATE = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
_MEMBER_RE = re.compile(r"[A-Za-z0-9._@+=-]+")
Engine = Literal["sqlite", "postgresql"]


class BackupDamaged(VerificationError):
    """The archive is not intact, not a gateway backup, or breaks a format rule. Exit 4."""

    reason = "backup.damaged"


@dataclass(frozen=True)
class BackupKeys:
    """Keys derived from the passphrase for one archive (never logged or stored)."""

    mac: bytes
    seal: bytes

    def __repr__(self) -> str:
        return "BackupKeys(<secret>)"


@dataclass(frozen=True)
class Trailer:
    """The archive's fixed-length trailer (its ZIP comment)."""

    salt: bytes
    opslimit: int
    memlimit: int
    sha256: bytes
    mac: bytes

    def to_bytes(self) -> bytes:
        text = (
            f"{BACKUP_FORMAT} {self.salt.hex()} {self.opslimit:010d} {self.memlimit:012d} "
            f"{self.sha256.hex()} {self.mac.hex()}"
        ).encode("ascii")
        assert len(text) == TRAILER_BYTES
        return text


def parse_trailer(data: bytes) -> Trailer:
    """Parse and bound-check a trailer; raise :class:`BackupDamaged` naming the fault."""
    match = _TRAILER_RE.fullmatch(data)
    if match is None:
        raise BackupDamaged(
            "not an ssw-gateway backup, or its end is damaged (no valid trailer)", check="trailer"
        )
    opslimit, memlimit = int(match.group(2)), int(match.group(3))
    if not (
        _OPS_RANGE[0] <= opslimit <= _OPS_RANGE[1] and _MEM_RANGE[0] <= memlimit <= _MEM_RANGE[1]
    ):
        raise BackupDamaged("the archive's Argon2id limits are out of range", check="trailer")
    return Trailer(
        salt=bytes.fromhex(match.group(1).decode()),
        opslimit=opslimit,
        memlimit=memlimit,
        sha256=bytes.fromhex(match.group(4).decode()),
        mac=bytes.fromhex(match.group(5).decode()),
    )


def derive_keys(passphrase: bytes, salt: bytes, opslimit: int, memlimit: int) -> BackupKeys:
    """Argon2id(passphrase, salt) split by purpose into the MAC key and the sealing key."""
    if len(salt) != SALT_BYTES:
        raise InvalidInput(f"backup salt must be {SALT_BYTES} bytes")
    master = nacl.pwhash.argon2id.kdf(32, passphrase, salt, opslimit=opslimit, memlimit=memlimit)
    return BackupKeys(
        mac=hmac.new(master, tagged(Purpose.BACKUP, b"mac-key"), hashlib.sha256).digest(),
        seal=hmac.new(master, tagged(Purpose.BACKUP, b"seal-key"), hashlib.sha256).digest(),
    )


def archive_mac(keys: BackupKeys, body_sha256: bytes) -> bytes:
    """The authentication code of an archive whose bytes before the trailer hash to this."""
    return hmac.new(
        keys.mac, tagged(Purpose.BACKUP, b"archive" + body_sha256), hashlib.sha256
    ).digest()


def check_archive(trailer: Trailer, body_sha256: bytes, keys: BackupKeys) -> None:
    """Refuse unless the body hash and then the MAC match (constant-time compares)."""
    if not hmac.compare_digest(trailer.sha256, body_sha256):
        raise BackupDamaged(
            "the archive is damaged: its contents do not match its checksum; "
            "nothing was restored (use another copy of the backup)",
            check="archive-hash",
        )
    if not hmac.compare_digest(trailer.mac, archive_mac(keys, body_sha256)):
        raise BackupDamaged(
            "the archive does not authenticate: it was made with another passphrase, "
            "or altered; nothing was restored",
            check="archive-mac",
        )


def _seal_associated(path: str) -> bytes:
    return tagged(Purpose.BACKUP, b"sealed-file\x00" + path.encode("utf-8"))


def seal_file(keys: BackupKeys, path: str, plaintext: bytes, *, nonce: bytes) -> bytes:
    """``nonce || ciphertext`` of a private file stored at archive ``path``."""
    if len(nonce) != NONCE_BYTES:
        raise InvalidInput(f"nonce must be {NONCE_BYTES} bytes")
    sealed = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        plaintext, _seal_associated(path), nonce, keys.seal
    )
    return nonce + bytes(sealed)


def open_sealed(keys: BackupKeys, path: str, data: bytes) -> bytes:
    """The plaintext of a sealed member; :class:`BackupDamaged` if it does not open."""
    if len(data) < NONCE_BYTES + 16 or len(data) > MAX_SEALED_BYTES:
        raise BackupDamaged(f"sealed member {path} has an impossible size", check="sealed")
    try:
        return bytes(
            nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
                data[NONCE_BYTES:], _seal_associated(path), data[:NONCE_BYTES], keys.seal
            )
        )
    except nacl.exceptions.CryptoError:
        raise BackupDamaged(f"sealed member {path} does not open", check="sealed") from None


def looks_like_plain_private_key(head: bytes) -> bool:
    """True for a file whose first bytes hold a PEM private key block."""
    return _PEM_PRIVATE.search(head) is not None


def check_member_path(path: object) -> str:
    """An archive member name that is safe to extract under a folder, or refuse.

    Relative POSIX path under ``home/`` or ``database/``; each part of ASCII
    letters, digits and ``._@+=-``; no ``.``/``..`` part, no empty part;
    at most :data:`MAX_PATH_BYTES` bytes.
    """
    if not isinstance(path, str) or not path or len(path.encode("utf-8")) > MAX_PATH_BYTES:
        raise BackupDamaged("a member name is empty or too long", check="member-path")
    parts = path.split("/")
    if parts[0] not in ("home", "database") or len(parts) < 2:
        raise BackupDamaged(f"member {path!r} is outside home/ and database/", check="member-path")
    for part in parts:
        if part in ("", ".", "..") or _MEMBER_RE.fullmatch(part) is None:
            raise BackupDamaged(f"member name {path!r} is not allowed", check="member-path")
    assert str(PurePosixPath(path)) == path
    return path


@dataclass(frozen=True)
class ArchiveFile:
    """One member as the manifest lists it."""

    path: str
    size: int
    sha256: str
    mode: int
    sealed: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "mode": self.mode,
            "sealed": self.sealed,
        }


@dataclass(frozen=True)
class BackupManifest:
    """What the archive holds: the node, when, which engine, and every member's hash."""

    node: str
    created_at: str
    software_version: str
    engine: Engine
    database: ArchiveFile
    files: tuple[ArchiveFile, ...]
    not_archived: tuple[str, ...] = ()

    @classmethod
    def build(
        cls,
        *,
        node: str,
        created_at: datetime,
        software_version: str,
        engine: Engine,
        database: ArchiveFile,
        files: list[ArchiveFile],
        not_archived: list[str],
    ) -> BackupManifest:
        return cls(
            node=node,
            created_at=format_utc(created_at, Precision.SECONDS),
            software_version=software_version,
            engine=engine,
            database=database,
            files=tuple(files),
            not_archived=tuple(not_archived),
        )

    def to_bytes(self) -> bytes:
        return canonical_bytes(
            {
                "format": BACKUP_FORMAT,
                "node": self.node,
                "created_at": self.created_at,
                "software_version": self.software_version,
                "engine": self.engine,
                "database": self.database.to_dict(),
                "files": [f.to_dict() for f in self.files],
                "not_archived": list(self.not_archived),
            }
        )

    def members(self) -> dict[str, ArchiveFile]:
        return {f.path: f for f in (self.database, *self.files)}


def _file_entry(raw: object) -> ArchiveFile:
    if not isinstance(raw, dict) or set(raw) != {"path", "size", "sha256", "mode", "sealed"}:
        raise BackupDamaged("a manifest entry has unexpected fields", check="manifest")
    path = check_member_path(raw["path"])
    size, digest, mode, sealed = raw["size"], raw["sha256"], raw["mode"], raw["sealed"]
    if (
        not isinstance(size, int)
        or isinstance(size, bool)
        or size < 0
        or not isinstance(digest, str)
        or SHA256_HEX.fullmatch(digest) is None
        or not isinstance(mode, int)
        or isinstance(mode, bool)
        or not 0 <= mode <= 0o777
        or not isinstance(sealed, bool)
    ):
        raise BackupDamaged(f"manifest entry {path} is malformed", check="manifest")
    return ArchiveFile(path=path, size=size, sha256=digest, mode=mode, sealed=sealed)


def parse_manifest(data: bytes) -> BackupManifest:
    """Parse the manifest with bounds; raise :class:`BackupDamaged` on any fault."""
    try:
        doc = parse_canonical(data, max_bytes=MAX_MANIFEST_BYTES, max_depth=4)
    except InvalidInput as exc:
        raise BackupDamaged(f"the manifest is malformed: {exc.message}", check="manifest") from None
    expected = {
        "format",
        "node",
        "created_at",
        "software_version",
        "engine",
        "database",
        "files",
        "not_archived",
    }
    if not isinstance(doc, dict) or set(doc) != expected:
        raise BackupDamaged("the manifest has unexpected fields", check="manifest")
    if doc["format"] != BACKUP_FORMAT:
        raise BackupDamaged(f"not a {BACKUP_FORMAT} archive", check="manifest")
    if doc["node"] not in ("jp", "pk") or doc["engine"] not in ("sqlite", "postgresql"):
        raise BackupDamaged("the manifest names an unknown node or engine", check="manifest")
    if not isinstance(doc["files"], list) or len(doc["files"]) > MAX_MEMBERS:
        raise BackupDamaged("the manifest's file list is malformed", check="manifest")
    notes = doc["not_archived"]
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise BackupDamaged("the manifest's notes are malformed", check="manifest")
    for key in ("created_at", "software_version"):
        if not isinstance(doc[key], str) or len(doc[key]) > 64:
            raise BackupDamaged(f"the manifest's {key} is malformed", check="manifest")
    database = _file_entry(doc["database"])
    if not database.path.startswith("database/") or database.sealed:
        raise BackupDamaged("the manifest's database entry is malformed", check="manifest")
    files = [_file_entry(raw) for raw in doc["files"]]
    paths = [f.path for f in files]
    if len(set(paths)) != len(paths) or any(not p.startswith("home/") for p in paths):
        raise BackupDamaged("the manifest lists a file twice or outside home/", check="manifest")
    return BackupManifest(
        node=doc["node"],
        created_at=doc["created_at"],
        software_version=doc["software_version"],
        engine=doc["engine"],
        database=database,
        files=tuple(files),
        not_archived=tuple(notes),
    )
