"""Consent terms: each grant's terms as a compact record beside its signed document.

``consent_grant.terms`` holds what the disclosure rule reads of a grant (its
consent id, granting node, items, recipient, purpose, validity and maximum
uses) as the canonical JSON record of
:func:`gateway.core.consent.terms_record`, bound to the document by the
SHA-256 of its exact bytes. A consent check reads it instead of parsing the
signed document (docs/consent.md, "How a check stays fast"). New grants get it
in the transaction that stores them; existing rows get it here, each from its
own document. A row whose document does not read as a grant for its consent
id is left without a record, as is any row a later writer stores without one:
a check then parses the document, as before, and the document decides.

The column is added in place (no table copy), so the triggers of
``0016_consent_generation`` on ``consent_grant`` stay; the fill moves the
generation once per row, which only empties the caches.

Revision ID: 0022_consent_terms
Revises: 0016_consent_generation
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from gateway.core.canonical import parse_bounded_json
from gateway.core.consent import MAX_GRANT_BYTES, ConsentGrant, terms_record
from gateway.errors import InvalidInput

revision = "0022_consent_terms"
down_revision = "0016_consent_generation"
branch_labels = None
depends_on = None

_BATCH = 1000


def _record(consent_id: str, document: bytes) -> bytes | None:
    """The terms record of a stored document, or None when it does not read as this grant."""
    try:
        written = ConsentGrant.from_document(
            parse_bounded_json(document, max_bytes=MAX_GRANT_BYTES)
        )
    except InvalidInput:
        return None
    if written.consent_id != consent_id:
        return None
    return terms_record(written, document)


def upgrade() -> None:
    op.add_column("consent_grant", sa.Column("terms", sa.LargeBinary(), nullable=True))
    bind = op.get_bind()
    after = ""
    while True:
        rows = bind.execute(
            sa.text(
                "SELECT consent_id, document FROM consent_grant WHERE consent_id > :after "
                "ORDER BY consent_id LIMIT :batch"
            ),
            {"after": after, "batch": _BATCH},
        ).all()
        if not rows:
            break
        filled = [
            {"consent_id": consent_id, "terms": record}
            for consent_id, document in rows
            if (record := _record(consent_id, bytes(document))) is not None
        ]
        if filled:
            bind.execute(
                sa.text("UPDATE consent_grant SET terms = :terms WHERE consent_id = :consent_id"),
                filled,
            )
        after = rows[-1][0]


def downgrade() -> None:
    op.drop_column("consent_grant", "terms")
