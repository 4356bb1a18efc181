"""Every file the node or its client leaves behind has a durable name.

A synced file can still vanish in a crash if the folder entry naming it was
never synced (Linux fsync(2)). These tests watch the real ``fsync`` calls
(each still reaches the kernel) and record, for every sync of a folder, the
names the folder held at that moment: a file counts as durably named only if
its folder was synced while it held the file's final name.
"""

from __future__ import annotations

import errno
import io
import json
import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.cli.ledger_cmd import _write_new_file
from gateway.client.files import receive_files
from gateway.client.framing import END_MEMBER
from gateway.errors import AlreadyExists, InvalidInput, StorageError
from gateway.files import make_private_folders, sync_tree
from gateway.node.backup import restore_backup
from gateway.node.consent import disclosure as consent_disclosure
from gateway.node.context import NodeContext
from gateway.node.inbox import read_bundle
from gateway.node.ledger.read import list_entries
from gateway.node.outbox import send_case
from gateway.node.runtime import utc_now
from gateway.node.setup import TlsFiles, init_node
from gateway.settings import CONFIG_FILE
from tests.e2e.test_backup_restore import PASSPHRASE as BACKUP_TEXT
from tests.e2e.test_backup_restore import _made as backed_up
from tests.exchange_pair import (
    Pair,
    example,
    pair,  # noqa: F401 - the shared fixture
)

PASSPHRASE = "correct horse battery staple for durable names"
BACKUP_PASSPHRASE = BACKUP_TEXT.encode()


class FolderSyncs:
    """The syncs seen: for each folder (device, inode) the name sets it held, and the
    files synced. ``fail(folder)``: its syncs raise ``EIO`` (a failing disk)."""

    def __init__(self, real: Callable[[int], None]) -> None:
        self._real = real
        self.seen: dict[tuple[int, int], list[frozenset[str]]] = {}
        self.order: list[tuple[int, int]] = []
        self.files: set[tuple[int, int]] = set()
        self._failing: set[tuple[int, int]] = set()
        self._failing_files_in: set[tuple[int, int]] = set()

    def __call__(self, fd: int) -> None:
        info = os.fstat(fd)
        key = (info.st_dev, info.st_ino)
        if stat.S_ISDIR(info.st_mode):
            self.seen.setdefault(key, []).append(frozenset(os.listdir(fd)))
            self.order.append(key)
            if key in self._failing:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        else:
            self.files.add(key)
            folder = os.stat(Path(os.readlink(f"/proc/self/fd/{fd}")).parent)
            if (folder.st_dev, folder.st_ino) in self._failing_files_in:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        self._real(fd)

    def fail(self, folder: Path) -> None:
        info = os.stat(folder)
        self._failing.add((info.st_dev, info.st_ino))

    def fail_files_in(self, folder: Path) -> None:
        info = os.stat(folder)
        self._failing_files_in.add((info.st_dev, info.st_ino))

    def named(self, path: Path) -> bool:
        """True if ``path``'s folder was synced while it held ``path``'s name."""
        folder = os.stat(path.parent)
        held = self.seen.get((folder.st_dev, folder.st_ino), [])
        return any(path.name in names for names in held)

    def synced(self, path: Path) -> bool:
        """True if ``path`` (a folder or a file) was synced at all."""
        info = os.stat(path)
        return (info.st_dev, info.st_ino) in self.files or (info.st_dev, info.st_ino) in self.seen

    def position(self, folder: Path) -> int:
        info = os.stat(folder)
        return self.order.index((info.st_dev, info.st_ino))


@pytest.fixture
def folder_syncs(monkeypatch: pytest.MonkeyPatch) -> FolderSyncs:
    spy = FolderSyncs(os.fsync)
    monkeypatch.setattr(os, "fsync", spy)
    return spy


def test_new_private_folders_are_each_synced_into_their_parent(
    tmp_path: Path, folder_syncs: FolderSyncs
) -> None:
    made = make_private_folders(tmp_path / "a" / "b" / "c")
    assert made == [tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "c"]
    for folder in made:
        assert folder_syncs.named(folder), folder
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    # Deepest first: a folder's entry is synced before the entry naming that folder.
    assert folder_syncs.position(tmp_path / "a" / "b") < folder_syncs.position(tmp_path / "a")


def test_a_synced_tree_holds_every_name_deepest_first(
    tmp_path: Path, folder_syncs: FolderSyncs
) -> None:
    (tmp_path / "top" / "one" / "two").mkdir(parents=True)
    for path in (tmp_path / "top" / "x", tmp_path / "top" / "one" / "y", tmp_path / "top" / "one" / "two" / "z"):  # fmt: skip
        path.write_bytes(b"data")
    sync_tree(tmp_path / "top")
    for path in (tmp_path / "top" / "x", tmp_path / "top" / "one" / "y", tmp_path / "top" / "one" / "two" / "z", tmp_path / "top" / "one"):  # fmt: skip
        assert folder_syncs.named(path), path
    assert folder_syncs.position(tmp_path / "top" / "one" / "two") < folder_syncs.position(
        tmp_path / "top"
    )
    with pytest.raises(FileNotFoundError):
        sync_tree(tmp_path / "gone")


def test_a_ledger_export_is_named_durably(tmp_path: Path, folder_syncs: FolderSyncs) -> None:
    out = tmp_path / "ledger.jsonl"

    def write(stream: io.BufferedWriter) -> int:
        stream.write(b"{}\n")
        return 1

    assert _write_new_file(out, write) == 1
    assert out.read_bytes() == b"{}\n"
    assert folder_syncs.named(out)
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.jsonl"]  # the temp name is gone


def test_an_export_whose_folder_cannot_be_synced_leaves_nothing(
    tmp_path: Path, folder_syncs: FolderSyncs
) -> None:
    folder_syncs.fail(tmp_path)
    with pytest.raises(StorageError, match="nothing was kept"):
        _write_new_file(tmp_path / "ledger.csv", lambda stream: stream.write(b"x") and 1)
    assert list(tmp_path.iterdir()) == []


def _stream(files: dict[str, bytes]) -> io.BytesIO:
    import hashlib  # noqa: PLC0415

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        listed = {}
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
            listed[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        end = json.dumps({"files": listed, "result": {"ok": True}}).encode()
        info = tarfile.TarInfo(END_MEMBER)
        info.size = len(end)
        archive.addfile(info, io.BytesIO(end))
    buffer.seek(0)
    return buffer


def test_files_received_from_the_node_are_named_durably(
    tmp_path: Path, folder_syncs: FolderSyncs
) -> None:
    # A new folder: the staged folder is synced whole, then named in its parent.
    fresh = tmp_path / "fresh"
    received = receive_files(_stream({"case.json": b"{}", "sub/a.bin": b"a"}), fresh)
    assert received.result == {"ok": True}
    for path in (fresh, fresh / "case.json", fresh / "sub", fresh / "sub" / "a.bin"):
        assert folder_syncs.named(path), path
    # A folder holding files of its own: each new name is synced into its folder.
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_bytes(b"mine")
    receive_files(_stream({"case.json": b"{}", "sub/b.bin": b"b"}), kept)
    for path in (kept / "case.json", kept / "sub", kept / "sub" / "b.bin"):
        assert folder_syncs.named(path), path


def test_received_files_whose_folder_cannot_be_synced_are_not_kept(
    tmp_path: Path, folder_syncs: FolderSyncs
) -> None:
    parent = tmp_path / "parent"
    parent.mkdir()
    folder_syncs.fail(parent)
    with pytest.raises(InvalidInput, match="nothing was kept"):
        receive_files(_stream({"case.json": b"{}"}), parent / "fresh")
    assert list(parent.iterdir()) == []  # neither the folder nor a staging folder
    (parent / "empty").mkdir(mode=0o750)  # an empty folder of the user's stays as it was
    with pytest.raises(InvalidInput, match="nothing was kept"):
        receive_files(_stream({"case.json": b"{}"}), parent / "empty")
    assert [p.name for p in parent.iterdir()] == ["empty"]
    assert list((parent / "empty").iterdir()) == []
    assert stat.S_IMODE((parent / "empty").stat().st_mode) == 0o750
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_bytes(b"mine")
    folder_syncs.fail(kept)
    with pytest.raises(InvalidInput, match="nothing was kept"):
        receive_files(_stream({"case.json": b"{}", "sub/b.bin": b"b"}), kept)
    assert sorted(p.name for p in kept.iterdir()) == ["mine.txt"]


def test_init_into_a_folder_with_files_of_its_own_syncs_only_what_it_made(
    tmp_path: Path, folder_syncs: FolderSyncs
) -> None:
    home = tmp_path / "volume"
    (home / "lost+found" / "deep").mkdir(parents=True)
    environ = {"GATEWAY_PASSPHRASE": PASSPHRASE, "GATEWAY_KEYSTORE_STRENGTH": "min"}
    init_node(home, "pk", now=utc_now(), environ=environ)
    for path in (home / CONFIG_FILE, home / "keys", home / "data", home / "policies"):
        assert folder_syncs.named(path), path
    assert not folder_syncs.synced(home / "lost+found")
    assert not folder_syncs.synced(home / "lost+found" / "deep")
    policies = sorted((home / "policies").iterdir())
    assert policies
    for path in policies:  # the copies' bytes, and their names
        assert folder_syncs.synced(path), path
        assert folder_syncs.named(path), path


def test_init_never_overwrites_nor_removes_tls_files_of_the_users(tmp_path: Path) -> None:
    home = tmp_path / "jp"
    (home / "keys" / "tls").mkdir(parents=True)
    (home / "keys" / "tls" / "node.crt").write_bytes(b"the user's own")
    source = tmp_path / "source"
    source.mkdir()
    (source / "cert.pem").write_bytes(b"cert")
    (source / "key.pem").write_bytes(b"key")
    environ = {"GATEWAY_PASSPHRASE": PASSPHRASE, "GATEWAY_KEYSTORE_STRENGTH": "min"}
    with pytest.raises(AlreadyExists, match=r"node\.crt exists already"):
        init_node(
            home, "jp", now=utc_now(), environ=environ,
            tls=TlsFiles(source / "cert.pem", source / "key.pem"),
        )  # fmt: skip
    assert (home / "keys" / "tls" / "node.crt").read_bytes() == b"the user's own"


def test_a_new_home_is_named_durably(tmp_path: Path, folder_syncs: FolderSyncs) -> None:
    home = tmp_path / "made" / "above" / "jp"
    environ = {"GATEWAY_PASSPHRASE": PASSPHRASE, "GATEWAY_KEYSTORE_STRENGTH": "min"}
    init_node(home, "jp", now=utc_now(), environ=environ)
    for path in (tmp_path / "made", home.parent, home, home / CONFIG_FILE, home / "keys", home / "data"):  # fmt: skip
        assert folder_syncs.named(path), path
    assert any(folder_syncs.named(path) for path in (home / "keys").iterdir())


def test_a_restored_home_is_named_durably(tmp_path: Path, folder_syncs: FolderSyncs) -> None:
    archive = backed_up(tmp_path, "pk").archive
    assert folder_syncs.named(archive)
    restored = tmp_path / "restored"
    restore_backup(archive, restored, passphrase=BACKUP_PASSPHRASE, db_url=None)
    for path in (restored, restored / CONFIG_FILE, restored / "keys", restored / "data"):
        assert folder_syncs.named(path), path
    assert folder_syncs.named(restored / "data" / "gateway.sqlite3")
    assert folder_syncs.synced(restored / CONFIG_FILE)
    # A SQLite file given with --db, in folders the restore makes.
    database = tmp_path / "databases" / "made" / "pk.sqlite3"
    restore_backup(
        archive, tmp_path / "other", passphrase=BACKUP_PASSPHRASE, db_url=f"sqlite:///{database}"
    )
    for path in (database, database.parent, database.parent.parent):
        assert folder_syncs.named(path), path
    assert folder_syncs.synced(tmp_path / "other" / CONFIG_FILE)  # rewritten to name it


def test_a_restore_whose_home_cannot_be_named_durably_leaves_nothing(
    tmp_path: Path, folder_syncs: FolderSyncs
) -> None:
    archive = backed_up(tmp_path, "pk").archive
    target = tmp_path / "target"
    target.mkdir()
    database = tmp_path / "databases" / "made" / "pk.sqlite3"
    folder_syncs.fail(target)
    with pytest.raises(StorageError, match=r"Input/output error.*nothing was restored"):
        restore_backup(
            archive, target / "pk", passphrase=BACKUP_PASSPHRASE, db_url=f"sqlite:///{database}"
        )
    assert list(target.iterdir()) == []
    assert not (tmp_path / "databases").exists()  # the folders made for it too
    # Into an empty folder of the user's: the folder is there again, empty, as it was.
    (target / "pk").mkdir(mode=0o750)
    with pytest.raises(StorageError, match="nothing was restored"):
        restore_backup(archive, target / "pk", passphrase=BACKUP_PASSPHRASE, db_url=None)
    assert [p.name for p in target.iterdir()] == ["pk"]
    assert list((target / "pk").iterdir()) == []
    assert stat.S_IMODE((target / "pk").stat().st_mode) == 0o750


def test_a_disclosure_package_and_a_shown_bundle_are_named_durably(
    pair: Pair,
    tmp_path: Path,
    folder_syncs: FolderSyncs,
) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "scan.pdf").write_bytes(b"%PDF-1.7 scan\n")
    sent = send_case(
        NodeContext(pair.jp.node, pair.jp.keyring), pair.jp.officer, "exam-fraud",
        example("exam-fraud"), [source / "scan.pdf"], public=False, reply_to=None, now=utc_now(),
    )  # fmt: skip
    pair.pk.receive_from(pair.jp, sent.bundle_id)
    ctx = NodeContext(pair.pk.node, pair.pk.keyring)

    out = tmp_path / "package"
    made = consent_disclosure.disclose(
        ctx, pair.pk.officer, [sent.bundle_id], "beoe", "case follow-up", out, now=utc_now()
    )
    assert made.out_dir == out
    folder = out / sent.bundle_id
    for path in (out, folder, folder / "case.json", folder / "attachments", folder / "attachments" / "scan.pdf"):  # fmt: skip
        assert folder_syncs.named(path), path
    assert any(folder_syncs.named(path) for path in out.iterdir() if path.is_file())

    shown = tmp_path / "shown"
    shown.mkdir()
    read_bundle(ctx, pair.pk.officer, sent.bundle_id, out_dir=shown, now=utc_now())
    for path in (shown / f"{sent.bundle_id}.json", shown / "scan.pdf"):
        assert folder_syncs.named(path), path


def test_a_disclosure_whose_package_cannot_be_named_durably_records_nothing(
    pair: Pair,
    tmp_path: Path,
    folder_syncs: FolderSyncs,
) -> None:
    sent = send_case(
        NodeContext(pair.jp.node, pair.jp.keyring), pair.jp.officer, "exam-fraud",
        example("exam-fraud"), [], public=False, reply_to=None, now=utc_now(),
    )  # fmt: skip
    pair.pk.receive_from(pair.jp, sent.bundle_id)
    ctx = NodeContext(pair.pk.node, pair.pk.keyring)
    parent = tmp_path / "parent"
    (parent / "package").mkdir(parents=True, mode=0o750)
    folder_syncs.fail(parent)
    with pytest.raises(StorageError, match="nothing was disclosed or recorded"):
        consent_disclosure.disclose(
            ctx, pair.pk.officer, [sent.bundle_id], "beoe", "case follow-up",
            parent / "package", now=utc_now(),
        )  # fmt: skip
    assert [p.name for p in parent.iterdir()] == ["package"]  # no staging folder left
    assert list((parent / "package").iterdir()) == []
    assert stat.S_IMODE((parent / "package").stat().st_mode) == 0o750
    with ctx.node.db.transaction() as session:
        kinds = {entry.kind.value for entry in list_entries(session)}
    assert "internal-share" not in kinds
    assert "disclosure-made" not in kinds
    # A shown case whose file cannot be synced is not left behind, nor recorded as read.
    shown = tmp_path / "shown"
    shown.mkdir()
    folder_syncs.fail_files_in(shown)
    with pytest.raises(StorageError, match="nothing was kept or recorded"):
        read_bundle(ctx, pair.pk.officer, sent.bundle_id, out_dir=shown, now=utc_now())
    assert list(shown.iterdir()) == []
    with ctx.node.db.transaction() as session:
        assert "bundle-read" not in {entry.kind.value for entry in list_entries(session)}
