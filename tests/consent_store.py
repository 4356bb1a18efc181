"""Shared pieces of the consent storage tests: a migrated node database, and a
grant from ``pk`` signed with a fixed test key (no keystore, no clock read)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

import nacl.signing

from gateway.core.consent import ConsentGrant, SignedGrant, sign_grant
from gateway.store.db import Database, open_database
from gateway.store.models import NodeRecord

GRANT_KEY = nacl.signing.SigningKey(bytes(range(32)))
"""The key the test grants are signed with (``key_id`` ``k-test``)."""


@contextmanager
def node_database(url: str, *, created_at: datetime) -> Iterator[Database]:
    """``url`` migrated to the head, holding node ``jp``; disposed on leaving."""
    database = open_database(url)
    try:
        database.upgrade()
        with database.transaction() as session:
            session.add(NodeRecord(node_id="jp", created_at=created_at, software_version="test"))
        yield database
    finally:
        database.dispose()


def signed_grant(
    consent_id: str,
    items: tuple[str, ...],
    *,
    valid_from: datetime,
    third_party: str,
    purpose: str,
    max_uses: int | None = None,
) -> tuple[ConsentGrant, SignedGrant]:
    """A grant by officer ``bilal`` of ``pk``, 30 days from ``valid_from``, signed."""
    written = ConsentGrant(
        consent_id=consent_id,
        request_id=str(uuid.uuid4()),
        items=tuple(sorted(items)),
        third_party=third_party,
        purpose=purpose,
        valid_from=valid_from,
        valid_until=valid_from + timedelta(days=30),
        max_uses=max_uses,
        conditions="",
        granting_officer="bilal",
        granting_node="pk",
        key_id="k-test",
    )
    return written, sign_grant(written, lambda message: GRANT_KEY.sign(message).signature)
