"""Who could hold each user's token, and each approver's when they approved
(docs/consent.md, "Token custody": two approvals count as two people only when no
one could hold both tokens).

``users.token_holders`` is the sorted JSON list of the users who could hold the
user's current token; ``approval_vote.holders`` the same for the approver's token
at the time of the approval. Existing rows are given what can be known now, from
above: the user, whoever created the user or issued the token in use
(``created_by``, ``token_issued_by``), every administrator the ledger names as
having reissued the user's token (``token-reissued``: a rotation afterwards
records the user as issuer but does not take the token out of the reissuer's
hands), and, repeated until nothing changes, everyone who could hold those
users' tokens. ``init`` names the host operator, who stands outside the rule,
unless a user of that name exists. Existing approvals take their approver's
holders.

Revision ID: 0021_token_custody
Revises: 0020_token_issuer, 0015_approvals, 0012_ledger_state
Create Date: 2026-11-30
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0021_token_custody"
down_revision = ("0020_token_issuer", "0015_approvals", "0012_ledger_state")
branch_labels = None
depends_on = None

_HOST = frozenset({"init", "host", "system"})


def _closure(issuers: dict[str, set[str]]) -> dict[str, list[str]]:
    host = _HOST - set(issuers)  # a user of such a name is a user, not the host
    holders = {name: {name} | (found - host) for name, found in issuers.items()}
    changed = True
    while changed:
        changed = False
        for held in holders.values():
            more = set().union(*(holders.get(other, set()) for other in held)) - held
            if more:
                held.update(more)
                changed = True
    return {name: sorted(held) for name, held in holders.items()}


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("token_holders", sa.Text(), nullable=False, server_default="[]"))
    with op.batch_alter_table("approval_vote") as batch:
        batch.add_column(sa.Column("holders", sa.Text(), nullable=False, server_default="[]"))
    bind = op.get_bind()
    rows = bind.execute(sa.text("SELECT name, created_by, token_issued_by FROM users")).all()
    issuers = {name: {created, issued} for name, created, issued in rows}
    reissues = bind.execute(
        sa.text("SELECT canonical FROM ledger_entry WHERE kind = 'token-reissued'")
    ).all()
    for (canonical,) in reissues:
        body = json.loads(bytes(canonical)).get("body", {})
        user, by = body.get("user"), body.get("by")
        if isinstance(user, str) and isinstance(by, str) and user in issuers:
            issuers[user].add(by)
    holders = _closure(issuers)
    for name, held in holders.items():
        bind.execute(
            sa.text("UPDATE users SET token_holders = :held WHERE name = :name"),
            {"held": json.dumps(held), "name": name},
        )
    votes = bind.execute(sa.text("SELECT id, approver FROM approval_vote")).all()
    for vote_id, approver in votes:
        held = holders.get(approver, [approver])
        bind.execute(
            sa.text("UPDATE approval_vote SET holders = :held WHERE id = :id"),
            {"held": json.dumps(held), "id": vote_id},
        )
    # Filled: from now on every writer names the holders; a row without them fails
    # instead of reading as "held by the user alone".
    with op.batch_alter_table("users") as batch:
        batch.alter_column("token_holders", existing_type=sa.Text(), server_default=None)
    with op.batch_alter_table("approval_vote") as batch:
        batch.alter_column("holders", existing_type=sa.Text(), server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("approval_vote") as batch:
        batch.drop_column("holders")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("token_holders")
