"""``gateway backup`` and ``gateway restore``: the node home and its database as one archive.

The archive format and its checks are in :mod:`gateway.core.backup`; this
module does the I/O.

Backup takes the database first (SQLite: the online backup API, one
consistent snapshot while ``serve`` keeps running; PostgreSQL: ``pg_dump``,
one snapshot transaction), then the home's files. The node writes an
envelope file before it commits the row naming it, so every envelope the
snapshot refers to is on disk when the files are read. The archive is
written to a temporary file beside ``--out`` and linked into place only when
complete; an existing file is never overwritten.

Restore checks the whole archive (hash, then the passphrase's MAC) before it
parses anything, extracts into a temporary folder beside the new home,
restores the database (a new SQLite file, or an empty PostgreSQL database in
one transaction), applies pending migrations, verifies the ledger and opens
the keystore with the passphrase, and only then moves the folder into
place. Any failure removes what it made: the new home never exists half
written, and a PostgreSQL database is left empty as it was found.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import sqlite3
import subprocess
import tempfile
import tomllib
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import nacl.utils
import tomli_w
from sqlalchemy import select, text
from sqlalchemy.engine import make_url

import gateway
from gateway.core.backup import (
    MANIFEST_MEMBER,
    MAX_MEMBERS,
    MAX_SEALED_BYTES,
    NONCE_BYTES,
    SALT_BYTES,
    TRAILER_BYTES,
    ArchiveFile,
    BackupDamaged,
    BackupKeys,
    BackupManifest,
    Engine,
    Trailer,
    archive_mac,
    check_archive,
    check_member_path,
    derive_keys,
    looks_like_plain_private_key,
    open_sealed,
    parse_manifest,
    parse_trailer,
    seal_file,
)
from gateway.errors import AlreadyExists, ConfigError, InvalidInput, StorageError
from gateway.files import (
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
from gateway.node.keystore import STRENGTHS, strength_from_environ
from gateway.node.own_keys import unlock_keyring, verify_ledger_with_keys
from gateway.settings import CONFIG_FILE, Settings, default_sqlite_url, load_settings
from gateway.store.db import Database, open_database
from gateway.store.models import NodeRecord

__all__ = ["BackupReport", "RestoreReport", "make_backup", "restore_backup"]

_CHUNK = 1024 * 1024
_PEM_PROBE = 64 * 1024
_SKIPPED_DIRS = ("data/spool",)
Progress = Callable[[str], None]


@dataclass
class BackupReport:
    """What ``gateway backup`` wrote."""

    archive: Path
    node: str
    engine: str
    files: int
    sealed: int
    size: int
    sha256: str
    not_archived: list[str] = field(default_factory=list)


@dataclass
class RestoreReport:
    """What ``gateway restore`` made."""

    home: Path
    node: str
    engine: str
    database_url: str
    created_at: str
    files: int
    migrations: list[str]
    ledger_entries: int
    ledger_root: str
    notes: list[str] = field(default_factory=list)


def _engine_of(url: str) -> Engine:
    if url.startswith(("sqlite:", "sqlite+pysqlite:")):
        return "sqlite"
    if url.startswith(("postgresql:", "postgresql+psycopg:")):
        return "postgresql"
    raise InvalidInput(
        "only sqlite:/// and postgresql:// database URLs are supported", reason="config.value"
    )


def _sqlite_path(url: str) -> Path:
    database = make_url(url).database
    if not database or database == ":memory:":
        raise ConfigError(f"the SQLite URL {url!r} names no database file")
    return Path(database).resolve()


def _libpq_url(url: str) -> str:
    """A URL for libpq programs (``postgresql://``, no driver name), password kept."""
    parsed = make_url(url).set(drivername="postgresql")
    return parsed.render_as_string(hide_password=False)


def _safe_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _program(name: str, purpose: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise ConfigError(
            f"{purpose} needs {name}, which is not on PATH: install the PostgreSQL client "
            f"programs of the server's major version (Debian: postgresql-client), then retry; "
            "nothing was written",
            reason="config.program",
        )
    return found


def _run_pg(argv: list[str], what: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)  # noqa: S603 - a program found on PATH, no shell
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        first = lines[0] if lines else f"exit code {done.returncode}"
        raise StorageError(f"{what} failed: {first}")


# --- backup ------------------------------------------------------------------------------


def _dump_sqlite(url: str, target: Path) -> None:
    """The SQLite online backup API: one consistent copy while writers go on."""
    source_path = _sqlite_path(url)
    if not source_path.is_file():
        raise StorageError(f"the SQLite database {source_path} does not exist")
    source = sqlite3.connect(f"file:{source_path}?mode=ro", uri=True, timeout=15)
    copy = sqlite3.connect(target)
    try:
        source.backup(copy)
        copy.execute("PRAGMA journal_mode=DELETE")
        check = copy.execute("PRAGMA quick_check").fetchone()
        if check is None or check[0] != "ok":
            raise StorageError(f"the database copy fails SQLite's quick_check: {check}")
    except sqlite3.Error as exc:
        raise StorageError(f"SQLite backup of {source_path} failed: {exc}") from None
    finally:
        copy.close()
        source.close()


def _dump_postgres(url: str, target: Path) -> None:
    pg_dump = _program("pg_dump", "a backup of a PostgreSQL node")
    _run_pg(
        [
            pg_dump,
            "--format=custom",
            "--no-owner",
            "--no-privileges",
            f"--file={target}",
            f"--dbname={_libpq_url(url)}",
        ],
        "pg_dump",
    )


class _ZipOut:
    """Members written to a stored (uncompressed) ZIP, each hashed as it goes."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.zip = zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def add_stream(self, name: str, source: IO[bytes], mode: int) -> ArchiveFile:
        digest = hashlib.sha256()
        size = 0
        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        with self.zip.open(info, "w", force_zip64=True) as member:
            while chunk := source.read(_CHUNK):
                digest.update(chunk)
                member.write(chunk)
                size += len(chunk)
        return ArchiveFile(name, size, digest.hexdigest(), mode & 0o777, sealed=False)

    def add_bytes(self, name: str, data: bytes, mode: int, *, sealed: bool) -> ArchiveFile:
        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        self.zip.writestr(info, data)
        return ArchiveFile(name, len(data), hashlib.sha256(data).hexdigest(), mode & 0o777, sealed)


def _home_files(home: Path, skip: set[Path], notes: list[str]) -> Iterator[tuple[Path, str]]:
    """Regular files of the home to archive, in a stable order, with their member names."""
    for folder, dirs, files in os.walk(home):
        base = Path(folder)
        relative_base = base.relative_to(home).as_posix()
        kept = []
        for name in sorted(dirs):
            rel = f"{relative_base}/{name}".removeprefix("./")
            if rel in _SKIPPED_DIRS or (base / name) in skip:
                continue
            if (base / name).is_symlink():
                notes.append(f"{rel}: a symbolic link, not followed")
                continue
            kept.append(name)
        dirs[:] = kept
        for name in sorted(files):
            path = base / name
            rel = f"{relative_base}/{name}".removeprefix("./")
            if path in skip or name.startswith(".tmp-") or name.endswith((".tmp", ".part")):
                continue
            if path.is_symlink() or not path.is_file():
                notes.append(f"{rel}: not a regular file, not archived")
                continue
            member = f"home/{rel}"
            try:
                check_member_path(member)
            except BackupDamaged:
                notes.append(f"{rel}: a name the archive format does not allow, not archived")
                continue
            yield path, member


def _outside_home(settings: Settings) -> list[str]:
    notes = []
    home = settings.home.resolve()
    if not settings.policy_dir.resolve().is_relative_to(home):
        notes.append(
            f"policy folder {settings.policy_dir} is outside the home: keep the agreed "
            "policy files with the deployment"
        )
    for name in ("tls_cert", "tls_key", "tls_ca"):
        value = getattr(settings.server, name)
        if value is not None and not Path(value).resolve().is_relative_to(home):
            notes.append(f"[server] {name} {value} is outside the home: back it up separately")
    return notes


def make_backup(
    settings: Settings,
    *,
    passphrase: bytes,
    out: Path,
    now: datetime,
    environ: dict[str, str],
    progress: Progress | None = None,
) -> BackupReport:
    """Write the archive of the node at ``settings.home`` to ``out`` (never overwritten).

    Raises :class:`AlreadyExists` if ``out`` exists, :class:`InvalidInput` if it
    lies in the home or its folder is missing, the keystore's errors if the
    passphrase does not open the node's keys, :class:`ConfigError` when a
    PostgreSQL node lacks ``pg_dump``, :class:`StorageError` on a failed dump.
    """
    say = progress or (lambda _message: None)
    out = out.expanduser().absolute()
    home = settings.home.resolve()
    if out.exists() or out.is_symlink():
        raise AlreadyExists(f"{out} exists; a backup never overwrites a file")
    if not out.parent.is_dir():
        raise InvalidInput(f"folder {out.parent} does not exist")
    if out.resolve().is_relative_to(home):
        raise InvalidInput(f"{out} lies inside the node home; write the backup elsewhere")
    url = settings.database_url
    engine = _engine_of(url)
    if engine == "postgresql":
        _program("pg_dump", "a backup of a PostgreSQL node")
    db = open_database(url)
    try:
        with db.transaction() as session:
            unlock_keyring(settings, passphrase, session, now=now)
    finally:
        db.dispose()
    ops, mem = STRENGTHS[strength_from_environ(environ)]
    salt = nacl.utils.random(SALT_BYTES)
    keys = derive_keys(passphrase, salt, ops, mem)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".work", dir=out.parent))
    temp = out.parent / f".{out.name}.{secrets.token_hex(6)}.part"
    try:
        dump = staging / "database"
        say(f"[backup] database ({engine}) ...")
        if engine == "sqlite":
            _dump_sqlite(url, dump)
            db_member = "database/gateway.sqlite3"
        else:
            _dump_postgres(url, dump)
            db_member = "database/gateway.pgdump"
        skip: set[Path] = set()
        if engine == "sqlite":
            db_path = _sqlite_path(url)
            skip |= {db_path.with_name(db_path.name + s) for s in ("", "-wal", "-shm", "-journal")}
        notes = _outside_home(settings)
        files: list[ArchiveFile] = []
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w+b") as handle:
            archive = _ZipOut(handle)
            with dump.open("rb") as source:
                database = archive.add_stream(db_member, source, 0o600)
            say("[backup] home files ...")
            for path, member in _home_files(home, skip, notes):
                entry = _archive_file(archive, keys, path, member, notes)
                if entry is not None:
                    files.append(entry)
                    if len(files) > MAX_MEMBERS:
                        raise InvalidInput(f"the home holds more than {MAX_MEMBERS} files")
            manifest = BackupManifest.build(
                node=settings.node_id,
                created_at=now,
                software_version=gateway.__version__,
                engine=engine,
                database=database,
                files=files,
                not_archived=notes,
            )
            archive.add_bytes(MANIFEST_MEMBER, manifest.to_bytes(), 0o600, sealed=False)
            archive.zip.comment = b"\0" * TRAILER_BYTES
            archive.zip.close()
            handle.flush()
            size = handle.seek(0, os.SEEK_END)
            body = _hash_prefix(handle, size - TRAILER_BYTES)
            trailer = Trailer(salt, ops, mem, body, archive_mac(keys, body))
            handle.seek(size - TRAILER_BYTES)
            handle.write(trailer.to_bytes())
            handle.flush()
            os.fsync(handle.fileno())
            handle.seek(0)
            whole = _hash_prefix(handle, size)
        _publish(temp, out)
    finally:
        temp.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    return BackupReport(
        archive=out,
        node=settings.node_id,
        engine=engine,
        files=len(files),
        sealed=sum(1 for f in files if f.sealed),
        size=size,
        sha256=whole.hex(),
        not_archived=notes,
    )


def _publish(temp: Path, out: Path) -> None:
    """Give the finished archive its name without ever replacing a file.

    A hard link fails when ``out`` exists; where the file system has no hard
    links (some network shares), the name is reserved with an exclusive
    create and the archive renamed over that empty reservation.
    """
    try:
        os.link(temp, out)
    except FileExistsError:
        raise AlreadyExists(f"{out} exists; a backup never overwrites a file") from None
    except OSError:
        try:
            os.close(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            raise AlreadyExists(f"{out} exists; a backup never overwrites a file") from None
        temp.replace(out)
    sync_folder(out.parent)


def _archive_file(
    archive: _ZipOut, keys: BackupKeys, path: Path, member: str, notes: list[str]
) -> ArchiveFile | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None  # removed while the backup ran (a temporary or swept file)
    except OSError as exc:
        notes.append(f"{member}: cannot be read ({exc.strerror}), not archived")
        return None
    with os.fdopen(fd, "rb") as source:
        mode = os.fstat(source.fileno()).st_mode
        head = source.read(_PEM_PROBE)
        if looks_like_plain_private_key(head):
            rest = source.read(MAX_SEALED_BYTES + 1 - len(head))
            data = head + rest
            if len(data) > MAX_SEALED_BYTES - NONCE_BYTES - 16:
                raise InvalidInput(f"{path} holds a private key but is too large to seal")
            sealed = seal_file(keys, member, data, nonce=nacl.utils.random(NONCE_BYTES))
            return archive.add_bytes(member, sealed, 0o600, sealed=True)
        source.seek(0)
        return archive.add_stream(member, source, mode)


def _hash_prefix(handle: IO[bytes], length: int) -> bytes:
    handle.seek(0)
    digest = hashlib.sha256()
    left = length
    while left > 0:
        chunk = handle.read(min(_CHUNK, left))
        if not chunk:
            raise StorageError("the archive ended early while it was hashed")
        digest.update(chunk)
        left -= len(chunk)
    return digest.digest()


# --- restore -----------------------------------------------------------------------------


def _private_copy(archive: Path, folder: Path) -> IO[bytes]:
    """A copy of ``archive`` in an anonymous 0600 file in ``folder``, rewound.

    Restore verifies and then parses this copy through one open handle, never
    the path again: an archive on shared storage that is swapped or rewritten
    after its MAC was checked cannot change what is parsed. The file is
    unlinked at once, so nothing is left behind; the disk holds the archive's
    size once more while the restore runs.
    """
    try:
        source = archive.open("rb")
    except FileNotFoundError:
        raise InvalidInput(f"archive {archive} does not exist") from None
    except OSError as exc:
        raise InvalidInput(f"archive {archive} cannot be read: {exc.strerror}") from None
    copy = tempfile.TemporaryFile(dir=folder, prefix=".restore-archive-")  # noqa: SIM115 - the caller closes it
    try:
        with source:
            shutil.copyfileobj(source, copy, _CHUNK)
        copy.flush()
        copy.seek(0)
    except BaseException:
        copy.close()
        raise
    return copy


def _verified_archive(handle: IO[bytes], archive: Path, passphrase: bytes) -> BackupKeys:
    """Hash the archive behind ``handle`` and check its MAC before anything is parsed."""
    size = handle.seek(0, os.SEEK_END)
    if size < TRAILER_BYTES + 22:
        raise BackupDamaged(f"{archive} is too short to be a backup", check="trailer")
    handle.seek(size - TRAILER_BYTES)
    trailer = parse_trailer(handle.read(TRAILER_BYTES))
    handle.seek(0)
    body = _hash_prefix(handle, size - TRAILER_BYTES)
    keys = derive_keys(passphrase, trailer.salt, trailer.opslimit, trailer.memlimit)
    check_archive(trailer, body, keys)
    handle.seek(0)
    return keys


def _read_manifest(zf: zipfile.ZipFile) -> BackupManifest:
    infos = zf.infolist()
    names = [info.filename for info in infos]
    if len(infos) > MAX_MEMBERS + 2 or len(set(names)) != len(names):
        raise BackupDamaged("the archive lists too many or duplicate members", check="members")
    try:
        info = zf.getinfo(MANIFEST_MEMBER)
    except KeyError:
        raise BackupDamaged("the archive holds no manifest", check="manifest") from None
    if info.file_size > 256 * 1024 * 1024:
        raise BackupDamaged("the manifest is too large", check="manifest")
    manifest = parse_manifest(zf.read(info))
    listed = manifest.members()
    if set(names) != {*listed, MANIFEST_MEMBER}:
        raise BackupDamaged("the archive's members differ from its manifest", check="members")
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            raise BackupDamaged(
                f"member {info.filename} is compressed or encrypted", check="members"
            )
        if info.filename != MANIFEST_MEMBER and info.file_size != listed[info.filename].size:
            raise BackupDamaged(f"member {info.filename} has the wrong size", check="members")
    return manifest


def _extract(zf: zipfile.ZipFile, entry: ArchiveFile, target: Path, keys: BackupKeys) -> None:
    """Write one member to ``target`` (a new file), checking its size and hash."""
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    mode = 0o600 if entry.sealed else (entry.mode & 0o777) | 0o600
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out, zf.open(entry.path) as member:
        if entry.sealed:
            data = member.read(MAX_SEALED_BYTES + 1)
            digest.update(data)
            size = len(data)
            if size == entry.size and digest.hexdigest() == entry.sha256:
                out.write(open_sealed(keys, entry.path, data))
        else:
            while chunk := member.read(_CHUNK):
                size += len(chunk)
                if size > entry.size:
                    break
                digest.update(chunk)
                out.write(chunk)
        if size != entry.size or digest.hexdigest() != entry.sha256:
            raise BackupDamaged(f"member {entry.path} does not match its manifest", check="member")
        out.flush()
        os.fsync(out.fileno())
    target.chmod(mode)


def _database_is_empty(url: str) -> None:
    db = Database(url)
    try:
        with db.engine.connect() as connection:
            count = connection.execute(
                text(
                    "SELECT count(*) FROM pg_catalog.pg_class c "
                    "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') "
                    "AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'"
                )
            ).scalar_one()
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any driver failure is "cannot reach"
        raise StorageError(
            f"cannot reach the database {_safe_url(url)}: {type(exc).__name__}"
        ) from None
    finally:
        db.dispose()
    if count:
        raise AlreadyExists(
            f"the database {_safe_url(url)} is not empty ({count} objects); restore needs a "
            "new, empty database (e.g. createdb), nothing was changed"
        )


_RESTORED_OBJECTS = (
    (
        "VIEW",
        "SELECT format('%I.%I', schemaname, viewname) FROM pg_views WHERE schemaname = 'public'",
    ),
    (
        "TABLE",
        "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables WHERE schemaname = 'public'",
    ),
    (
        "SEQUENCE",
        "SELECT format('%I.%I', schemaname, sequencename) FROM pg_sequences "
        "WHERE schemaname = 'public'",
    ),
    (
        "FUNCTION",
        "SELECT p.oid::regprocedure::text FROM pg_proc p "
        "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public'",
    ),
    (
        "TYPE",
        "SELECT format('%I.%I', n.nspname, t.typname) FROM pg_type t "
        "JOIN pg_namespace n ON n.oid = t.typnamespace "
        "WHERE n.nspname = 'public' AND t.typtype IN ('e', 'd', 'c') "
        "AND NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = t.typrelid AND c.relkind <> 'c')",
    ),
)


def _empty_postgres(url: str) -> None:
    """Undo a restore into a database that was empty before it: drop what it made in
    ``public`` (the schema itself and its privileges stay as they were)."""
    db = Database(url)
    try:
        with db.engine.begin() as connection:
            for kind, query in _RESTORED_OBJECTS:
                for (name,) in connection.execute(text(query)).all():
                    connection.execute(text(f"DROP {kind} IF EXISTS {name} CASCADE"))
    finally:
        db.dispose()


def _set_database_url(config: Path, url: str | None) -> None:
    """Record the restored database in ``gateway.toml`` (no key for the default SQLite)."""
    raw = config.read_bytes()
    if len(raw) > 256 * 1024:
        raise BackupDamaged("the archived gateway.toml is too large", check="member")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        raise BackupDamaged("the archived gateway.toml is not valid TOML", check="member") from None
    section = dict(data.get("database") or {})
    if section.get("url") == url or ("url" not in section and url is None):
        return
    if url is None:
        section.pop("url", None)
    else:
        section["url"] = url
    if section:
        data["database"] = section
    else:
        data.pop("database", None)
    temp = config.with_name(config.name + ".part")
    with create_private_file(temp) as out:
        out.write(
            (
                "# ssw-gateway node settings; GATEWAY_<SECTION>_<KEY> variables override.\n"
                "# Database URL set by 'gateway restore'.\n" + tomli_w.dumps(data)
            ).encode("utf-8")
        )
        sync_file(out)
    temp.replace(config)  # its name is synced with the restored home's


def _check_new_home(home: Path) -> None:
    if home.exists() and (not home.is_dir() or any(home.iterdir())):
        raise AlreadyExists(f"{home} exists and is not empty; restore makes a new home")
    if not home.parent.is_dir():
        raise InvalidInput(f"folder {home.parent} does not exist")


def restore_backup(
    archive: Path,
    home: Path,
    *,
    passphrase: bytes,
    db_url: str | None,
    progress: Progress | None = None,
) -> RestoreReport:
    """Restore ``archive`` into the new home ``home`` (and ``db_url`` for PostgreSQL).

    Raises :class:`BackupDamaged` (exit 4) for an archive that is damaged,
    forged or made with another passphrase; :class:`AlreadyExists` for a
    home or database that is not empty; :class:`InvalidInput` for a
    database URL that does not fit the archive; the ledger's verification
    error (exit 4) when the restored ledger does not verify. Nothing is left
    behind on failure.
    """
    say = progress or (lambda _message: None)
    home = home.expanduser().absolute()
    _check_new_home(home)
    say(f"[restore] checking {archive} ...")
    copy = _private_copy(archive, home.parent)
    with copy:
        keys = _verified_archive(copy, archive, passphrase)
        try:
            zf = zipfile.ZipFile(copy)
        except (zipfile.BadZipFile, OSError):
            raise BackupDamaged(
                f"{archive} is not a readable ZIP archive", check="members"
            ) from None
        return _restore_from(zf, keys, home, passphrase=passphrase, db_url=db_url, say=say)


def _restore_from(
    zf: zipfile.ZipFile,
    keys: BackupKeys,
    home: Path,
    *,
    passphrase: bytes,
    db_url: str | None,
    say: Callable[[str], None],
) -> RestoreReport:
    """The restore proper, from an archive already verified (see :func:`restore_backup`)."""
    with zf:
        manifest = _read_manifest(zf)
        engine = manifest.engine
        if engine == "sqlite":
            if db_url is not None and _engine_of(db_url) != "sqlite":
                raise InvalidInput(
                    "this archive holds a SQLite database: --db must be a sqlite:/// URL "
                    "(or left out for the new home's default)"
                )
            sqlite_target = _sqlite_path(db_url) if db_url is not None else None
            if sqlite_target is not None and sqlite_target.exists():
                raise AlreadyExists(f"{sqlite_target} exists; restore makes a new database")
        else:
            if db_url is None or _engine_of(db_url) != "postgresql":
                raise InvalidInput(
                    "this archive holds a PostgreSQL database: give the new, empty database "
                    "with --db postgresql://USER@HOST/DB"
                )
            pg_restore = _program("pg_restore", "a restore of a PostgreSQL node")
            _database_is_empty(db_url)
        staging = home.parent / f".{home.name}.restoring-{secrets.token_hex(6)}"
        staging.mkdir(mode=0o700)
        database_part: Path | None = None
        database_folders: list[Path] = []
        made: list[Path] = []
        home_mode = empty_folder_mode(home)
        postgres_touched = False
        try:
            say(f"[restore] {len(manifest.files)} files ...")
            for entry in manifest.files:
                _extract(zf, entry, staging / entry.path.removeprefix("home/"), keys)
            for sub in ("keys", "data", "data/blobs"):
                (staging / sub).mkdir(mode=0o700, exist_ok=True)
            if not (staging / CONFIG_FILE).is_file():
                raise BackupDamaged(f"the archive holds no {CONFIG_FILE}", check="members")
            say(f"[restore] database ({engine}) ...")
            if engine == "sqlite":
                if sqlite_target is None:
                    database_part = staging / "data" / "gateway.sqlite3"
                    url = default_sqlite_url(home)
                    working_url = default_sqlite_url(staging)
                else:
                    made = make_private_folders(sqlite_target.parent, sync=False)
                    database_folders = [sqlite_target.parent, *(path.parent for path in made)]
                    database_part = sqlite_target.with_name(
                        f".{sqlite_target.name}.{secrets.token_hex(6)}.part"
                    )
                    url = f"sqlite:///{sqlite_target}"
                    working_url = f"sqlite:///{database_part}"
                _extract(zf, manifest.database, database_part, keys)
                recorded: str | None = None if sqlite_target is None else url
            else:
                assert db_url is not None
                dump = staging / ".database.pgdump"
                _extract(zf, manifest.database, dump, keys)
                postgres_touched = True
                _run_pg(
                    [
                        pg_restore,
                        "--no-owner",
                        "--no-privileges",
                        "--single-transaction",
                        "--exit-on-error",
                        f"--dbname={_libpq_url(db_url)}",
                        str(dump),
                    ],
                    "pg_restore",
                )
                dump.unlink()
                url = working_url = recorded = db_url
            _set_database_url(staging / CONFIG_FILE, recorded)
            report = _check_restored(staging, working_url, passphrase, manifest, say)
            # Every restored name durable before the home takes its own, and the home's
            # before this says done; a failure up to the last sync undoes everything.
            sync_tree(staging)
            if database_part is not None and sqlite_target is not None:
                database_part.replace(sqlite_target)
                database_part = sqlite_target  # what an undo removes from here on
                sync_folders(database_folders)
            if home_mode is not None:
                home.rmdir()
            staging.replace(home)
            staging = home  # what an undo removes from here on
            sync_folder(home.parent)
        except zipfile.BadZipFile as exc:
            _undo(staging, database_part, db_url if postgres_touched else None)
            _put_back(home, home_mode, made)
            raise BackupDamaged(f"the archive cannot be read: {exc}", check="members") from None
        except OSError as exc:
            _undo(staging, database_part, db_url if postgres_touched else None)
            _put_back(home, home_mode, made)
            raise StorageError(
                f"restore into {home} failed: {exc.strerror or exc}"
                + (f" ({exc.filename})" if exc.filename else "")
                + "; nothing was restored"
            ) from None
        except BaseException:
            _undo(staging, database_part, db_url if postgres_touched else None)
            _put_back(home, home_mode, made)
            raise
    report.home = home
    report.database_url = _safe_url(url)
    return report


def _put_back(home: Path, home_mode: int | None, made: list[Path]) -> None:
    """After an undo: the empty home folder the restore found (it was replaced), and
    no folder the restore made for a SQLite file."""
    if home_mode is not None:
        take_back(home, placed=False, empty_mode=home_mode)  # the undo removed the placed one
    remove_made_folders(made)


def _undo(staging: Path, database_part: Path | None, postgres_url: str | None) -> None:
    """Remove what a failed restore made; an emptied PostgreSQL database stays empty."""
    shutil.rmtree(staging, ignore_errors=True)
    if database_part is not None:
        database_part.unlink(missing_ok=True)
    if postgres_url is not None:
        with contextlib.suppress(Exception):
            _empty_postgres(postgres_url)


def _check_restored(
    staging: Path,
    url: str,
    passphrase: bytes,
    manifest: BackupManifest,
    say: Progress,
) -> RestoreReport:
    """Migrate, verify the ledger, open the keys: the restored node is whole or refused."""
    settings = load_settings(staging, environ={}, overrides={"database": {"url": url}})
    if settings.node_id != manifest.node:
        raise BackupDamaged(
            f"the archived {CONFIG_FILE} names node {settings.node_id!r}, the manifest "
            f"{manifest.node!r}",
            check="members",
        )
    db = open_database(url)
    try:
        migrations = db.upgrade()
        say("[restore] ledger verify ...")
        with db.transaction() as session:
            owners = session.scalars(select(NodeRecord.node_id)).all()
            if list(owners) != [manifest.node]:
                raise BackupDamaged(
                    f"the archived database belongs to {list(owners)}, not {manifest.node!r}",
                    check="members",
                )
            ledger_report = verify_ledger_with_keys(session, node_id=manifest.node)
            ledger_report.raise_for_problem()
            unlock_keyring(settings, passphrase, session)
    finally:
        db.dispose()
    return RestoreReport(
        home=staging,
        node=manifest.node,
        engine=manifest.engine,
        database_url=url,
        created_at=manifest.created_at,
        files=len(manifest.files),
        migrations=migrations,
        ledger_entries=ledger_report.entries,
        ledger_root=ledger_report.root.hex(),
        notes=list(manifest.not_archived) + list(ledger_report.notes),
    )


def describe(report: BackupReport | RestoreReport) -> dict[str, Any]:
    """A report as plain data for ``--json``."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in report.__dict__.items()}
