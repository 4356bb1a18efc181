"""The key manifest's bound: a key change that would list more keys than a manifest
may is refused with its cause, before anything is written (docs/keys.md, "How many
key changes a node can make")."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

import gateway.node.own_keys
import gateway.node.policy
from gateway.cli.display import manifest_text
from gateway.core.keys import MAX_KEYS
from gateway.core.roles import Actor, Role
from gateway.errors import InvalidInput, RefusedError
from gateway.node import own_keys
from gateway.node.keystore import OPERATIONAL_FILE
from gateway.node.runtime import Node, utc_now
from gateway.node.setup import init_node
from gateway.settings import load_settings
from gateway.store.models_keys import OwnManifestRecord
from gateway.store.models_ledger import LedgerEntryRow

PASSPHRASE = "correct horse battery staple for tests"
ADMIN = Actor(name="admin", role=Role.ADMIN)
# Importing these registers their stages of node creation (keys, policies).
INIT_STAGES = (gateway.node.own_keys.__name__, gateway.node.policy.__name__)


@pytest.fixture
def node(tmp_path: Path, database_url: str, clean_environ: dict[str, str]) -> Iterator[Node]:
    env = {**clean_environ, "GATEWAY_PASSPHRASE": PASSPHRASE, "GATEWAY_KEYSTORE_STRENGTH": "min"}
    home = tmp_path / "jp"
    init_node(home, "jp", now=utc_now(), db_url=database_url, environ=env)
    opened = Node.open(load_settings(home, environ=env))
    try:
        yield opened
    finally:
        opened.close()


def _written(node: Node) -> tuple[bytes, int, int]:
    """What a key change writes: the operational key file, the manifests, the ledger."""
    with node.db.transaction() as session:
        manifests = session.scalar(select(func.count()).select_from(OwnManifestRecord))
        entries = session.scalar(select(func.count()).select_from(LedgerEntryRow))
    keys_file = (node.settings.keys_dir / OPERATIONAL_FILE).read_bytes()
    return keys_file, int(manifests or 0), int(entries or 0)


def _rotate(node: Node, now: datetime) -> None:
    with node.db.transaction() as session:
        own_keys.rotate_keys(node.settings, session, PASSPHRASE.encode(), now=now, actor=ADMIN)


def _listed(node: Node) -> own_keys.KeyManifest:
    with node.db.transaction() as session:
        return own_keys.own_manifest(session)


def test_rotations_stop_short_of_the_bound_and_leave_room_to_revoke(node: Node) -> None:
    """Monthly rotations: each leaves one more signing key listed for good (retired
    encryption keys leave once their overlap ends). A rotation that would take one of
    the last ROTATION_RESERVE places is refused by its cause and writes nothing; a
    revocation of the key in use still has room. A recovery that would pass the bound
    is refused too, and leaves the damaged key file where it was."""
    now = utc_now()
    limit = MAX_KEYS - own_keys.ROTATION_RESERVE
    rotations = 0
    while len(_listed(node).keys) < limit:
        now += timedelta(days=30)
        _rotate(node, now)
        rotations += 1
    assert rotations == limit - 3  # two keys at creation, one kept in its overlap
    with node.db.transaction() as session:
        full = own_keys.describe_own_keys(session, now=now)
    assert full["keys_limit"] == MAX_KEYS
    assert f"keys listed:      {limit} of at most {MAX_KEYS}" in manifest_text(full, "Keys")

    before = _written(node)
    with pytest.raises(RefusedError) as refused:
        _rotate(node, now + timedelta(days=30))
    assert refused.value.reason == "keys.manifest-full"
    assert f"it may list {limit}" in refused.value.message
    assert "Nothing was changed" in refused.value.message
    assert _written(node) == before

    # The key in use was stolen: its revocation, with a replacement, still fits.
    in_use = max((k for k in _listed(node).keys if k.use == "sign"), key=lambda k: k.not_before)
    with node.db.transaction() as session:
        own_keys.revoke_key(
            node.settings,
            session,
            PASSPHRASE.encode(),
            in_use.key_id,
            "laptop lost",
            now=now + timedelta(hours=1),
            actor=ADMIN,
        )
    assert len(_listed(node).keys) == limit + 1  # its replacement

    # A recovery now would list two keys more, 65: refused, and the damaged file stays.
    keys_file = node.settings.keys_dir / OPERATIONAL_FILE
    keys_file.write_bytes(b"damaged")
    before = _written(node)
    with pytest.raises(RefusedError, match="it may list"), node.db.transaction() as session:
        own_keys.recover_keys(
            node.settings,
            session,
            PASSPHRASE.encode(),
            "disk failure",
            now=now + timedelta(hours=2),
            actor=ADMIN,
        )
    assert _written(node) == before
    assert sorted(p.name for p in node.settings.keys_dir.glob("operational.key*")) == [
        OPERATIONAL_FILE
    ]


def test_a_manifest_past_its_byte_bound_is_refused_before_the_key_file_is_written(
    node: Node,
) -> None:
    """Revocations carry reasons of up to 500 characters, two bytes each here: enough
    of them make the next manifest larger than a manifest may be. The revocation that
    would do so is refused by that cause, and the key file and the manifests stay."""
    now = utc_now()
    for _ in range(45):
        now += timedelta(days=30)
        _rotate(node, now)
    retired = [k.key_id for k in _listed(node).keys if k.use == "sign" and not k.valid_at(now)]
    reason = "é" * 500
    for key in retired:
        now += timedelta(hours=1)
        before = _written(node)
        try:
            with node.db.transaction() as session:
                own_keys.revoke_key(
                    node.settings, session, PASSPHRASE.encode(), key, reason, now=now, actor=ADMIN
                )
        except RefusedError as refused:
            failure = refused
            break
    else:
        pytest.fail("no revocation was refused")
    assert failure.reason == "keys.manifest-refused"
    assert "Nothing was changed" in failure.message
    assert _written(node) == before


def test_a_recovery_whose_reasons_pass_the_byte_bound_is_refused_as_such(node: Node) -> None:
    """A recovery revokes every key still listed, each revocation carrying its reason:
    four-byte characters take the manifest past its bytes at once. Refused by that
    cause (not as a tampered manifest), and the damaged key file stays in place."""
    now = utc_now()
    for _ in range(40):
        now += timedelta(days=30)
        _rotate(node, now)
    keys_file = node.settings.keys_dir / OPERATIONAL_FILE
    keys_file.write_bytes(b"damaged")
    before = _written(node)
    with pytest.raises(RefusedError) as refused, node.db.transaction() as session:
        own_keys.recover_keys(
            node.settings,
            session,
            PASSPHRASE.encode(),
            "\U0001f600" * 500,
            now=now + timedelta(days=2),
            actor=ADMIN,
        )
    assert refused.value.reason == "keys.manifest-refused"
    assert "larger than the format allows" in refused.value.message
    assert _written(node) == before


def test_a_key_change_dated_before_the_current_manifest_is_refused_by_the_clock(
    node: Node,
) -> None:
    """The host's clock went back: the rotation would be issued before the manifest in
    force. Refused as bad input naming both times; nothing is written."""
    later = utc_now() + timedelta(days=30)
    _rotate(node, later)
    before = _written(node)
    with pytest.raises(InvalidInput, match="set the clock right"):
        _rotate(node, later - timedelta(hours=1))
    assert _written(node) == before
