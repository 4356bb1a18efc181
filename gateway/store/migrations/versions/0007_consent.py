"""Consent: requests, grants (signed bytes kept), denials, revocations, uses, disclosures.

Revision ID: 0007_consent
Revises: 0001_foundation
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from gateway.store.base import UTCDateTime

revision = "0007_consent"
down_revision = "0001_foundation"
branch_labels = ("consent",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "consent_request",
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("direction", sa.String(16), nullable=False),
        sa.Column("requester_node", sa.String(8), nullable=False),
        sa.Column("originator_node", sa.String(8), nullable=False),
        sa.Column("items_json", sa.Text(), nullable=False),
        sa.Column("third_party", sa.String(200), nullable=False),
        sa.Column("purpose", sa.Text(), nullable=False),
        sa.Column("requesting_officer", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("decided_at", UTCDateTime(), nullable=True),
        sa.Column("consent_id", sa.String(128), nullable=True),
        sa.Column("actor", sa.String(160), nullable=False),
        sa.PrimaryKeyConstraint("request_id", name="pk_consent_request"),
    )
    op.create_table(
        "consent_grant",
        sa.Column("consent_id", sa.String(128), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("direction", sa.String(16), nullable=False),
        sa.Column("granting_node", sa.String(8), nullable=False),
        sa.Column("key_id", sa.String(128), nullable=False),
        sa.Column("document", sa.LargeBinary(), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.Column("third_party", sa.String(500), nullable=False),
        sa.Column("purpose", sa.Text(), nullable=False),
        sa.Column("valid_from", UTCDateTime(), nullable=False),
        sa.Column("valid_until", UTCDateTime(), nullable=False),
        sa.Column("max_uses", sa.Integer(), nullable=True),
        sa.Column("bundle_id", sa.String(64), nullable=False),
        sa.Column("recorded_at", UTCDateTime(), nullable=False),
        sa.Column("actor", sa.String(160), nullable=False),
        sa.PrimaryKeyConstraint("consent_id", name="pk_consent_grant"),
    )
    op.create_index("ix_consent_grant_request_id", "consent_grant", ["request_id"])
    op.create_table(
        "consent_grant_item",
        sa.Column("consent_id", sa.String(128), nullable=False),
        sa.Column("bundle_id", sa.String(128), nullable=False),
        sa.ForeignKeyConstraint(
            ["consent_id"],
            ["consent_grant.consent_id"],
            name="fk_consent_grant_item_consent_id_consent_grant",
        ),
        sa.PrimaryKeyConstraint("consent_id", "bundle_id", name="pk_consent_grant_item"),
    )
    op.create_index("ix_consent_grant_item_bundle_id", "consent_grant_item", ["bundle_id"])
    op.create_table(
        "consent_denial",
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("direction", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("denying_officer", sa.String(200), nullable=False),
        sa.Column("denied_at", UTCDateTime(), nullable=False),
        sa.Column("bundle_id", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(160), nullable=False),
        sa.PrimaryKeyConstraint("request_id", name="pk_consent_denial"),
    )
    op.create_table(
        "consent_revocation",
        sa.Column("consent_id", sa.String(128), nullable=False),
        sa.Column("direction", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("revoking_officer", sa.String(200), nullable=False),
        sa.Column("revoked_at", UTCDateTime(), nullable=False),
        sa.Column("bundle_id", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(160), nullable=False),
        sa.PrimaryKeyConstraint("consent_id", name="pk_consent_revocation"),
    )
    op.create_table(
        "consent_disclosure",
        sa.Column("disclosure_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("allowed", sa.Boolean(), nullable=False),
        sa.Column("recipient", sa.String(500), nullable=False),
        sa.Column("purpose", sa.Text(), nullable=False),
        sa.Column("items_json", sa.Text(), nullable=False),
        sa.Column("decision_json", sa.Text(), nullable=False),
        sa.Column("consent_id", sa.String(128), nullable=True),
        sa.Column("decided_at", UTCDateTime(), nullable=False),
        sa.Column("actor", sa.String(160), nullable=False),
        sa.Column("ledger_seq", sa.Integer(), nullable=True),
        sa.Column("ledger_hash", sa.String(128), nullable=True),
        sa.PrimaryKeyConstraint("disclosure_id", name="pk_consent_disclosure"),
    )
    op.create_index("ix_consent_disclosure_decided_at", "consent_disclosure", ["decided_at"])
    op.create_table(
        "consent_use",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("consent_id", sa.String(128), nullable=False),
        sa.Column("disclosure_id", sa.String(64), nullable=False),
        sa.Column("used_at", UTCDateTime(), nullable=False),
        sa.Column("actor", sa.String(160), nullable=False),
        sa.ForeignKeyConstraint(
            ["consent_id"],
            ["consent_grant.consent_id"],
            name="fk_consent_use_consent_id_consent_grant",
        ),
        sa.ForeignKeyConstraint(
            ["disclosure_id"],
            ["consent_disclosure.disclosure_id"],
            name="fk_consent_use_disclosure_id_consent_disclosure",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_consent_use"),
        sa.UniqueConstraint("disclosure_id", name="uq_consent_use_disclosure_id"),
    )
    op.create_index("ix_consent_use_consent_id", "consent_use", ["consent_id"])
    op.create_table(
        "consent_applied",
        sa.Column("sender", sa.String(8), nullable=False),
        sa.Column("bundle_id", sa.String(64), nullable=False),
        sa.Column("case_type", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("detail", sa.String(500), nullable=False),
        sa.Column("applied_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("sender", "bundle_id", name="pk_consent_applied"),
    )


def downgrade() -> None:
    op.drop_table("consent_applied")
    op.drop_index("ix_consent_use_consent_id", table_name="consent_use")
    op.drop_table("consent_use")
    op.drop_index("ix_consent_disclosure_decided_at", table_name="consent_disclosure")
    op.drop_table("consent_disclosure")
    op.drop_table("consent_revocation")
    op.drop_table("consent_denial")
    op.drop_index("ix_consent_grant_item_bundle_id", table_name="consent_grant_item")
    op.drop_table("consent_grant_item")
    op.drop_index("ix_consent_grant_request_id", table_name="consent_grant")
    op.drop_table("consent_grant")
    op.drop_table("consent_request")
