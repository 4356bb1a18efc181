"""The key manifest's bound: a key change that would list more keys than a manifest
may is refused with its cause, before anything is written (docs/keys.md, "How many
key changes a node can make")."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

import gateway.node.own_keys
import gateway.node.policy
from gateway.cli.display import manifest_text
from gateway.core.keys import MAX_KEYS
from gateway.core.roles import Actor, Role
from gateway.errors import RefusedError
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


def test_a_key_change_past_the_manifests_bound_is_refused_and_writes_nothing(node: Node) -> None:
    """Monthly rotations: each leaves one more signing key listed for good (retired
    encryption keys leave once their overlap ends). The change that would list
    MAX_KEYS + 1 keys is refused by its cause; the rotation before it fills the list."""
    now = utc_now()

    def rotate() -> None:
        with node.db.transaction() as session:
            own_keys.rotate_keys(node.settings, session, PASSPHRASE.encode(), now=now, actor=ADMIN)

    def listed() -> int:
        with node.db.transaction() as session:
            return len(own_keys.own_manifest(session).keys)

    rotations = 0
    while listed() < MAX_KEYS:
        now += timedelta(days=30)
        rotate()
        rotations += 1
    assert rotations == MAX_KEYS - 3  # two keys at creation, one kept in its overlap
    now += timedelta(days=30)
    before = _written(node)
    with pytest.raises(RefusedError) as refused:
        rotate()
    assert refused.value.reason == "keys.manifest-full"
    assert f"at most {MAX_KEYS}" in refused.value.message
    assert "Nothing was changed" in refused.value.message
    assert _written(node) == before
    with node.db.transaction() as session:
        full = own_keys.describe_own_keys(session, now=now)
    assert len(full["keys"]) == MAX_KEYS  # the last rotation that fitted filled the list
    assert full["keys_limit"] == MAX_KEYS
    assert f"keys listed:      {MAX_KEYS} of at most {MAX_KEYS}" in manifest_text(full, "Keys")

    # A revocation that needs a replacement key is refused the same way, as is recovery.
    current_signing = next(
        k["key_id"] for k in full["keys"] if k["use"] == "sign" and k["state"] == "valid"
    )
    before = _written(node)
    with pytest.raises(RefusedError, match="at most"), node.db.transaction() as session:
        own_keys.revoke_key(
            node.settings,
            session,
            PASSPHRASE.encode(),
            current_signing,
            "laptop lost",
            now=now - timedelta(days=30) + timedelta(hours=1),  # in the last overlap
            actor=ADMIN,
        )
    assert _written(node) == before
