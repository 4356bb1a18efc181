"""The encrypted keystore and the key service against real files and both databases."""

from __future__ import annotations

import json
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nacl.public
import nacl.signing
import pytest

from gateway.core.canonical import canonical_bytes
from gateway.core.domain import Purpose, tagged
from gateway.core.keys import KeyNotUsable, ManifestRejected, fingerprint, key_id, parse_manifest
from gateway.core.roles import Actor, Role
from gateway.errors import AlreadyExists, ConfigError, InvalidInput, NotFound
from gateway.node import own_keys, peer_trust
from gateway.node.keystore import (
    OPERATIONAL_FILE,
    KeystoreCorrupt,
    KeystoreLocked,
    OperationalKeys,
    read_operational,
    read_passphrase,
    read_root,
    root_file_name,
    write_operational,
    write_root,
)
from gateway.node.own_keys import unlock_keyring
from gateway.node.runtime import Node
from gateway.node.setup import init_node
from gateway.settings import load_settings

PASSPHRASE = b"a long enough test passphrase"
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
ADMIN = Actor(name="admin", role=Role.ADMIN)


def make_node(home: Path, node_id: str, db_url: str, environ: dict[str, str]) -> Node:
    env = {**environ, "GATEWAY_PASSPHRASE": PASSPHRASE.decode(), "GATEWAY_KEYSTORE_STRENGTH": "min"}
    init_node(home, node_id, now=NOW, db_url=db_url, environ=env)
    return Node.open(load_settings(home, environ=env))


@pytest.fixture
def jp(tmp_path: Path, clean_environ: dict[str, str]) -> Node:
    """A node on SQLite, for what concerns the key files only."""
    node = make_node(tmp_path / "jp", "jp", f"sqlite:///{tmp_path / 'jp.sqlite3'}", clean_environ)
    yield node  # type: ignore[misc]
    node.close()


@pytest.fixture
def jp_any(tmp_path: Path, database_url: str, clean_environ: dict[str, str]) -> Node:
    """A node on each engine in turn, for what the database stores."""
    node = make_node(tmp_path / "jp", "jp", database_url, clean_environ)
    yield node  # type: ignore[misc]
    node.close()


# -- files --------------------------------------------------------------------------------


def test_init_writes_root_and_operational_files_0600(jp: Node) -> None:
    keys_dir = jp.settings.keys_dir
    names = sorted(p.name for p in keys_dir.iterdir())
    with jp.db.transaction() as session:
        manifest = own_keys.own_manifest(session)
    assert names == sorted([OPERATIONAL_FILE, root_file_name(manifest.root_key_id)])
    for path in keys_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(keys_dir.stat().st_mode) == 0o700


def test_unlocked_keyring_matches_the_manifest_and_signs(jp: Node) -> None:
    with jp.db.transaction() as session:
        ring = unlock_keyring(jp.settings, PASSPHRASE, session, now=NOW)
        manifest = own_keys.own_manifest(session)
    assert ring.manifest.version == 1
    assert ring.signing_key_id == manifest.current_signing_key(now=NOW).key_id
    assert ring.current_encryption_key_id == manifest.current_encryption_key(now=NOW).key_id
    signature = ring.sign(Purpose.CHECKPOINT, b"x")
    manifest.signing_key(ring.signing_key_id, at=NOW).verify(
        tagged(Purpose.CHECKPOINT, b"x"), signature
    )


def test_wrong_passphrase_is_a_clear_error(jp: Node) -> None:
    with jp.db.transaction() as session, pytest.raises(KeystoreLocked, match="wrong passphrase"):
        unlock_keyring(jp.settings, b"not the passphrase at all", session)


def test_missing_key_file_is_named(jp: Node) -> None:
    (jp.settings.keys_dir / OPERATIONAL_FILE).unlink()
    with jp.db.transaction() as session, pytest.raises(ConfigError, match="is missing") as caught:
        unlock_keyring(jp.settings, PASSPHRASE, session)
    assert OPERATIONAL_FILE in caught.value.message


def _rewrite(path: Path, change: object) -> None:
    doc = json.loads(path.read_bytes())
    assert callable(change)
    change(doc)
    path.write_bytes(canonical_bytes(doc))


def _set(key: str, value: object) -> object:
    def change(doc: dict[str, object]) -> None:
        doc[key] = value

    return change


def _set_kdf(key: str, value: object) -> object:
    def change(doc: dict[str, dict[str, object]]) -> None:
        doc["kdf"][key] = value

    return change


CORRUPTIONS = [
    ("truncated", None, KeystoreCorrupt),
    ("not json", b"garbage", KeystoreCorrupt),
    ("relabelled as root", _set("kind", "root"), KeystoreCorrupt),
    ("moved to another node", _set("node", "pk"), KeystoreCorrupt),
    ("key ids changed", _set("key_ids", ["00" * 8]), KeystoreLocked),
    ("kdf weakened", _set_kdf("opslimit", 2), KeystoreLocked),
    ("kdf memory absurd", _set_kdf("memlimit", 2**40), KeystoreCorrupt),
    ("salt changed", _set_kdf("salt", "AAAAAAAAAAAAAAAAAAAAAA=="), KeystoreLocked),
    ("ciphertext changed", _set("ciphertext", "AAAA" * 60), KeystoreLocked),
    ("extra field", _set("note", "x"), KeystoreCorrupt),
]


@pytest.mark.parametrize(("name", "change", "error"), CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_or_altered_key_file_is_refused(
    jp: Node, name: str, change: object, error: type[Exception]
) -> None:
    path = jp.settings.keys_dir / OPERATIONAL_FILE
    if change is None:
        path.write_bytes(path.read_bytes()[:50])
    elif isinstance(change, bytes):
        path.write_bytes(change)
    else:
        _rewrite(path, change)
    with jp.db.transaction() as session, pytest.raises(error) as caught:
        unlock_keyring(jp.settings, PASSPHRASE, session)
    assert str(path) in str(caught.value), name
    assert caught.value.exit_code == 1  # type: ignore[attr-defined]


def test_key_files_round_trip_and_check_ids(tmp_path: Path) -> None:
    signing = nacl.signing.SigningKey.generate()
    box = nacl.public.PrivateKey.generate()
    keys = OperationalKeys(
        signing={key_id(bytes(signing.verify_key)): signing},
        encryption={key_id(bytes(box.public_key)): box},
        opslimit=1,
        memlimit=8192,
    )
    path = tmp_path / "k" / OPERATIONAL_FILE
    write_operational(path, keys, node="jp", passphrase=PASSPHRASE)
    back = read_operational(path, PASSPHRASE, node="jp")
    assert bytes(next(iter(back.signing.values()))) == bytes(signing)
    assert bytes(next(iter(back.encryption.values()))) == bytes(box)
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind
    root = nacl.signing.SigningKey.generate()
    root_path = tmp_path / "root.key"
    write_root(root_path, root, node="jp", passphrase=PASSPHRASE, strength="min")
    rid = key_id(bytes(root.verify_key))
    assert bytes(read_root(root_path, PASSPHRASE, node="jp", expected_key_id=rid)) == bytes(root)
    with pytest.raises(KeystoreCorrupt, match="current root"):
        read_root(root_path, PASSPHRASE, node="jp", expected_key_id="00" * 8)


# -- passphrase sources -------------------------------------------------------------------


def test_passphrase_file_wins_and_must_be_private(tmp_path: Path) -> None:
    path = tmp_path / "pass"
    path.write_bytes(b"from the file, long enough\n")
    path.chmod(0o600)
    got = read_passphrase({"GATEWAY_PASSPHRASE": "from env"}, path, prompt=False)
    assert got == b"from the file, long enough"
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_passphrase({}, path, prompt=False)


def test_no_passphrase_anywhere_is_refused_without_prompt() -> None:
    with pytest.raises(ConfigError, match="GATEWAY_PASSPHRASE"):
        read_passphrase({}, None, prompt=False)


def test_short_new_passphrase_is_refused() -> None:
    with pytest.raises(InvalidInput, match="at least 12"):
        read_passphrase({"GATEWAY_PASSPHRASE": "short"}, None, prompt=False, new=True)


def test_init_without_passphrase_leaves_no_home(
    tmp_path: Path, clean_environ: dict[str, str]
) -> None:
    home = tmp_path / "x"
    with pytest.raises(ConfigError, match="no keystore passphrase"):
        init_node(home, "jp", now=NOW, environ=clean_environ)
    assert not home.exists()


# -- the key service ----------------------------------------------------------------------


def test_rotation_keeps_old_encryption_keys_and_queues_the_manifest(jp_any: Node) -> None:
    later = NOW + timedelta(days=30)
    with jp_any.db.transaction() as session:
        before = unlock_keyring(jp_any.settings, PASSPHRASE, session, now=NOW)
        change = own_keys.rotate_keys(jp_any.settings, session, PASSPHRASE, now=later, actor=ADMIN)
    assert change.manifest.version == 2
    with jp_any.db.transaction() as session:
        after = unlock_keyring(
            jp_any.settings, PASSPHRASE, session, now=later + timedelta(seconds=1)
        )
        pending = own_keys.pending_manifests(session)
    assert after.signing_key_id != before.signing_key_id
    assert after.current_encryption_key_id != before.current_encryption_key_id
    assert before.current_encryption_key_id in after.encryption_keys
    assert [raw for _, raw in pending] == [change.manifest.raw]
    old = after.manifest.key(before.signing_key_id)
    assert old.not_after == later + own_keys.ROTATION_OVERLAP
    with jp_any.db.transaction() as session:
        own_keys.mark_manifest_delivered(session, pending[0][0], later)
        assert own_keys.pending_manifests(session) == []


def test_revoking_the_current_signing_key_replaces_it_and_destroys_it(jp_any: Node) -> None:
    with jp_any.db.transaction() as session:
        current = own_keys.own_manifest(session).current_signing_key(now=NOW)
        change = own_keys.revoke_key(
            jp_any.settings,
            session,
            PASSPHRASE,
            current.key_id,
            "laptop stolen",
            now=NOW,
            actor=ADMIN,
        )
    assert change.revoked == (current.key_id,)
    assert len(change.added) == 1
    held = read_operational(jp_any.settings.keys_dir / OPERATIONAL_FILE, PASSPHRASE, node="jp")
    assert current.key_id not in held.signing
    with jp_any.db.transaction() as session:
        ring = unlock_keyring(jp_any.settings, PASSPHRASE, session, now=NOW)
    assert ring.signing_key_id == change.added[0]
    with pytest.raises(KeyNotUsable, match="revoked"):
        ring.manifest.signing_key(current.key_id, at=NOW)


def test_revoking_an_encryption_key_keeps_its_private_key_for_old_data(jp: Node) -> None:
    with jp.db.transaction() as session:
        current = own_keys.own_manifest(session).current_encryption_key(now=NOW)
        change = own_keys.revoke_key(
            jp.settings, session, PASSPHRASE, current.key_id, "suspected leak", now=NOW, actor=ADMIN
        )
    with jp.db.transaction() as session:
        ring = unlock_keyring(jp.settings, PASSPHRASE, session, now=NOW)
    assert current.key_id in ring.encryption_keys
    assert ring.current_encryption_key_id == change.added[0]


@pytest.mark.parametrize(
    ("target", "error", "message"),
    [
        ("root", InvalidInput, "rotate-root"),
        ("unknown", NotFound, "not in this node's manifest"),
    ],
)
def test_revoke_refuses_root_and_unknown_ids(
    jp: Node, target: str, error: type[Exception], message: str
) -> None:
    with jp.db.transaction() as session:
        manifest = own_keys.own_manifest(session)
        kid = manifest.root_key_id if target == "root" else "00" * 8
        with pytest.raises(error, match=message):
            own_keys.revoke_key(jp.settings, session, PASSPHRASE, kid, "x", now=NOW, actor=ADMIN)


def test_revoking_twice_is_refused(jp_any: Node) -> None:
    with jp_any.db.transaction() as session:
        kid = own_keys.own_manifest(session).keys[0].key_id
        own_keys.revoke_key(
            jp_any.settings, session, PASSPHRASE, kid, "first", now=NOW, actor=ADMIN
        )
    with jp_any.db.transaction() as session, pytest.raises(AlreadyExists):
        own_keys.revoke_key(
            jp_any.settings, session, PASSPHRASE, kid, "again", now=NOW, actor=ADMIN
        )


def test_offline_root_is_asked_for(jp: Node, tmp_path: Path) -> None:
    with jp.db.transaction() as session:
        manifest = own_keys.own_manifest(session)
    root_file = jp.settings.keys_dir / root_file_name(manifest.root_key_id)
    offline = tmp_path / "usb-stick" / root_file.name
    offline.parent.mkdir()
    root_file.rename(offline)
    with jp.db.transaction() as session, pytest.raises(ConfigError, match="offline storage"):
        own_keys.rotate_keys(jp.settings, session, PASSPHRASE, now=NOW, actor=ADMIN)
    with jp.db.transaction() as session:
        change = own_keys.rotate_keys(
            jp.settings, session, PASSPHRASE, now=NOW, actor=ADMIN, root_key_file=offline
        )
    assert change.manifest.version == 2


def test_failed_transaction_leaves_a_keystore_that_still_unlocks(jp_any: Node) -> None:
    """Key files are written before the manifest row; a rollback must not strand the node."""

    class Abort(Exception):
        pass

    def rotate_then_fail() -> None:
        with jp_any.db.transaction() as session:
            own_keys.rotate_keys(jp_any.settings, session, PASSPHRASE, now=NOW, actor=ADMIN)
            raise Abort

    with pytest.raises(Abort):
        rotate_then_fail()
    with jp_any.db.transaction() as session:
        ring = unlock_keyring(jp_any.settings, PASSPHRASE, session, now=NOW)
    assert ring.manifest.version == 1


# -- two nodes: pinning and updates -------------------------------------------------------


@pytest.fixture
def pair(
    tmp_path: Path,
    database_url: str,
    pg_database_factory: object,
    engine_name: str,
    clean_environ: dict[str, str],
) -> tuple[Node, Node]:
    second = (
        f"sqlite:///{tmp_path / 'pk.sqlite3'}" if engine_name == "sqlite" else pg_database_factory()  # type: ignore[operator]
    )
    jp = make_node(tmp_path / "jp", "jp", database_url, clean_environ)
    pk = make_node(tmp_path / "pk", "pk", second, clean_environ)
    yield jp, pk  # type: ignore[misc]
    jp.close()
    pk.close()


def _pin(jp: Node, pk: Node) -> None:
    with jp.db.transaction() as session:
        manifest = own_keys.own_manifest(session)
    with pk.db.transaction() as session:
        peer_trust.pin_peer(
            session,
            manifest.raw,
            node="jp",
            expected_fingerprint=fingerprint(manifest.root_public),
            now=NOW,
            actor=ADMIN,
        )


def test_peer_applies_rotation_revocation_and_root_rotation_in_order(
    pair: tuple[Node, Node],
) -> None:
    jp, pk = pair
    _pin(jp, pk)
    t = NOW + timedelta(minutes=1)
    with jp.db.transaction() as session:
        own_keys.rotate_keys(jp.settings, session, PASSPHRASE, now=t, actor=ADMIN)
        first_sign = own_keys.own_manifest(session).keys[0].key_id
    with jp.db.transaction() as session:
        own_keys.revoke_key(
            jp.settings, session, PASSPHRASE, first_sign, "lost", now=t, actor=ADMIN
        )
    with jp.db.transaction() as session:
        own_keys.rotate_root(jp.settings, session, PASSPHRASE, now=t, actor=ADMIN)
        pending = own_keys.pending_manifests(session)
        assert own_keys.pending_manifests(session, limit=2) == pending[:2]  # the oldest
        assert own_keys.pending_manifest_count(session) == 3
    assert len(pending) == 3
    for manifest_id, raw in pending:
        with pk.db.transaction() as session:
            peer_trust.apply_peer_manifest(session, raw, node="jp", now=t)
        with jp.db.transaction() as session:
            own_keys.mark_manifest_delivered(session, manifest_id, t)
    with pk.db.transaction() as session:
        pinned = peer_trust.pinned_peer_manifest(session)
    assert pinned is not None
    assert pinned.version == 4
    with jp.db.transaction() as session:
        assert pinned.root_public == own_keys.own_manifest(session).root_public
    with pytest.raises(KeyNotUsable, match="revoked"):
        pinned.signing_key(first_sign, at=t)


def test_redelivered_manifest_is_a_no_op_but_rollback_is_refused(pair: tuple[Node, Node]) -> None:
    jp, pk = pair
    _pin(jp, pk)
    with jp.db.transaction() as session:
        v1 = own_keys.own_manifest(session).raw
        own_keys.rotate_keys(jp.settings, session, PASSPHRASE, now=NOW, actor=ADMIN)
        v2 = own_keys.own_manifest(session).raw
    with pk.db.transaction() as session:
        peer_trust.apply_peer_manifest(session, v2, node="jp", now=NOW)
    with pk.db.transaction() as session:
        assert peer_trust.apply_peer_manifest(session, v2, node="jp", now=NOW).version == 2
    with pk.db.transaction() as session, pytest.raises(ManifestRejected) as caught:
        peer_trust.apply_peer_manifest(session, v1, node="jp", now=NOW)
    assert caught.value.check == "manifest-rollback"
    with pk.db.transaction() as session:
        pinned = peer_trust.pinned_peer_manifest(session)
    assert pinned is not None
    assert pinned.version == 2


def test_apply_before_pinning_is_refused(pair: tuple[Node, Node]) -> None:
    jp, pk = pair
    with jp.db.transaction() as session:
        raw = own_keys.own_manifest(session).raw
    with pk.db.transaction() as session, pytest.raises(ConfigError, match="peer add"):
        peer_trust.apply_peer_manifest(session, raw, node="jp", now=NOW)


def test_repinning_another_root_needs_replace(
    pair: tuple[Node, Node], tmp_path: Path, clean_environ: dict[str, str]
) -> None:
    jp, pk = pair
    _pin(jp, pk)
    other = make_node(
        tmp_path / "jp2", "jp", f"sqlite:///{tmp_path / 'jp2.sqlite3'}", clean_environ
    )
    try:
        with other.db.transaction() as session:
            fresh = own_keys.own_manifest(session)
    finally:
        other.close()
    fp = fingerprint(fresh.root_public)
    with pk.db.transaction() as session, pytest.raises(ManifestRejected) as caught:
        peer_trust.pin_peer(
            session, fresh.raw, node="jp", expected_fingerprint=fp, now=NOW, actor=ADMIN
        )
    assert caught.value.check == "manifest-root"
    with pk.db.transaction() as session:
        got = peer_trust.pin_peer(
            session,
            fresh.raw,
            node="jp",
            expected_fingerprint=fp,
            now=NOW,
            actor=ADMIN,
            replace=True,
        )
    assert got.root_public == fresh.root_public


# -- recovery from a lost operational key file --------------------------------------------


@pytest.mark.parametrize("loss", ["missing", "damaged"])
def test_recovery_revokes_every_lost_key_and_makes_new_ones(jp: Node, loss: str) -> None:
    ops_path = jp.settings.keys_dir / OPERATIONAL_FILE
    with jp.db.transaction() as session:
        before = own_keys.own_manifest(session)
    if loss == "missing":
        ops_path.unlink()
    else:
        ops_path.write_bytes(b"{}")
    with jp.db.transaction() as session:
        change = own_keys.recover_keys(
            jp.settings, session, PASSPHRASE, "server disk lost", now=NOW, actor=ADMIN
        )
    assert set(change.revoked) == {k.key_id for k in before.keys}
    with jp.db.transaction() as session:
        ring = unlock_keyring(jp.settings, PASSPHRASE, session, now=NOW)
    assert ring.signing_key_id in change.added
    assert ring.current_encryption_key_id in change.added
    for old in before.keys:
        assert ring.manifest.revocation(old.key_id) is not None
    damaged = list(jp.settings.keys_dir.glob(f"{OPERATIONAL_FILE}.damaged-*"))
    assert len(damaged) == (1 if loss == "damaged" else 0)


def test_recovery_is_refused_while_the_key_file_opens(jp: Node) -> None:
    with jp.db.transaction() as session, pytest.raises(InvalidInput, match="nothing to recover"):
        own_keys.recover_keys(jp.settings, session, PASSPHRASE, "why", now=NOW, actor=ADMIN)


def test_concurrent_rotations_serialise_into_consecutive_versions(jp_any: Node) -> None:
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def rotate() -> None:
        try:
            barrier.wait()
            with jp_any.db.transaction() as session:
                own_keys.rotate_keys(jp_any.settings, session, PASSPHRASE, now=NOW, actor=ADMIN)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=rotate) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with jp_any.db.transaction() as session:
        pending = own_keys.pending_manifests(session)
        ring = unlock_keyring(jp_any.settings, PASSPHRASE, session, now=NOW)
    assert [parse_manifest(raw).version for _, raw in pending] == [2, 3]
    assert ring.manifest.version == 3
    assert ring.signing_key_id == ring.manifest.current_signing_key(now=NOW).key_id
