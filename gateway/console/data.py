"""What the console's pages show, read from the node services (blocking; run in a thread).

Metadata only, as for every compliance surface: ledger entries (whose bodies
never hold case content), consents, the accounting, verification results,
and, for administrators, key, peer and outbox status. No function here
opens an envelope.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gateway.core import merkle
from gateway.core.accounting import csv_cell
from gateway.core.ledger import EntryKind, LedgerEntry
from gateway.core.times import DateMeans, parse_user_time
from gateway.errors import InvalidInput, NotFound
from gateway.node import accounting, ledger
from gateway.node.consent import queries as consent_queries
from gateway.node.context import NodeContext
from gateway.node.ledger import checkpoint as ledger_checkpoint
from gateway.node.ledger import read as ledger_read
from gateway.node.ledger import witness as ledger_witness
from gateway.node.own_keys import describe_own_keys
from gateway.node.peer_trust import describe_manifest, peer_node_of, pinned_peer_manifest
from gateway.node.runtime import Node
from gateway.store.models_exchange import OutboxEntry

__all__ = [
    "PAGE_SIZE",
    "LedgerFilter",
    "admin_status",
    "consent_register",
    "entry_detail",
    "export_entries",
    "filtered_entries",
    "ledger_page",
    "report",
    "verification_status",
]

PAGE_SIZE = 50
_MAX_FILTER_CHARS = 200


@dataclass(frozen=True)
class LedgerFilter:
    """The timeline's filters, as read from a query string (every field optional)."""

    kind: str | None = None
    bundle: str | None = None
    actor: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    @classmethod
    def from_query(cls, query: Any) -> LedgerFilter:
        def text(name: str) -> str | None:
            value = str(query.get(name, "")).strip()
            if len(value) > _MAX_FILTER_CHARS:
                raise InvalidInput(f"{name}: at most {_MAX_FILTER_CHARS} characters")
            return value or None

        kind = text("kind")
        if kind is not None and kind not in {k.value for k in EntryKind}:
            raise InvalidInput(f"kind: unknown entry kind {kind!r}")
        since = text("since")
        until = text("until")
        return cls(
            kind=kind,
            bundle=text("bundle"),
            actor=text("actor"),
            since=None
            if since is None
            else parse_user_time(since, option="since", dates=DateMeans.START, zone_required=False),
            until=None
            if until is None
            else parse_user_time(until, option="until", dates=DateMeans.END, zone_required=False),
        )

    def query(self) -> dict[str, str]:
        """The filter as query parameters (for links that keep it)."""
        found = {
            "kind": self.kind,
            "bundle": self.bundle,
            "actor": self.actor,
            "since": None if self.since is None else self.since.isoformat(),
            "until": None if self.until is None else self.until.isoformat(),
        }
        return {k: v for k, v in found.items() if v}


def filtered_entries(session: Session, chosen: LedgerFilter) -> Iterator[LedgerEntry]:
    """Entries matching every filter, oldest first (``until`` is exclusive)."""
    wanted_actor = None if chosen.actor is None else chosen.actor.casefold()
    for entry in ledger_read.iter_entries(
        session, bundle=chosen.bundle, kind=chosen.kind, since=chosen.since
    ):
        if chosen.until is not None and entry.time >= chosen.until:
            break
        if wanted_actor is not None and entry.actor_name.casefold() != wanted_actor:
            continue
        yield entry


def ledger_page(session: Session, chosen: LedgerFilter, page: int) -> dict[str, Any]:
    """One page of the timeline (newest last), with the count of matches."""
    if page < 1:
        raise InvalidInput("page: must be 1 or more")
    start = (page - 1) * PAGE_SIZE
    shown: list[LedgerEntry] = []
    total = 0
    for entry in filtered_entries(session, chosen):
        if start <= total < start + PAGE_SIZE:
            shown.append(entry)
        total += 1
    return {
        "entries": shown,
        "total": total,
        "page": page,
        "pages": max(1, -(-total // PAGE_SIZE)),
    }


def entry_detail(session: Session, seq: int) -> dict[str, Any]:
    """One entry, and its inclusion proof against the latest signed checkpoint."""
    found = list(ledger_read.iter_entries(session, since=None))
    entry = next((e for e in found if e.seq == seq), None)
    if entry is None:
        raise NotFound(f"no ledger entry {seq}")
    checkpoint = ledger_checkpoint.latest_checkpoint(session)
    proof: dict[str, Any] = {"state": "no-checkpoint"}
    if checkpoint is not None:
        size = checkpoint.checkpoint.size
        if seq >= size:
            proof = {"state": "after-checkpoint", "size": size}
        else:
            path = ledger_checkpoint.inclusion_proof(session, seq, size)
            leaf = merkle.leaf_hash(entry.entry_hash)
            merkle.verify_inclusion(seq, size, leaf, path, checkpoint.checkpoint.root)
            proof = {
                "state": "proved",
                "size": size,
                "root": checkpoint.checkpoint.root.hex(),
                "time": checkpoint.checkpoint.time,
                "key_id": checkpoint.checkpoint.key_id,
                "leaf": leaf.hex(),
                "path": [h.hex() for h in path],
            }
    return {
        "entry": entry,
        "body": json.dumps(entry.body, indent=2, ensure_ascii=False, sort_keys=True),
        "proof": proof,
    }


def consent_register(node: Node, now: datetime) -> dict[str, Any]:
    """Requests, consents (with their uses) and denials, both directions, as stored.

    Read without applying pending bundles (the console holds no keys for it).
    """
    listing = consent_queries.list_consents(NodeContext(node), now=now)
    with node.db.transaction() as session:
        report = accounting.account(session, node.node_id)
        index: dict[str, list[LedgerEntry]] = {}
        for entry in ledger_read.iter_entries(session):
            if entry.consent_id is not None:
                index.setdefault(entry.consent_id, []).append(entry)
    uses: dict[str, list[dict[str, Any]]] = {}
    for item in report["ours"]:
        for granted in item["consents"]:
            uses.setdefault(granted["consent_id"], [])
            for use in granted["uses"]:
                if use not in uses[granted["consent_id"]]:
                    uses[granted["consent_id"]].append(use)
    for item in report["held"]:
        for share in item["shares"]:
            if share["consent_id"] and share["kind"] == "disclosure-made":
                made = {"used_at": share["time"], "recipient": share["recipient"],
                         "purpose": share["purpose"], "seq": share["seq"], "violation": None}  # fmt: skip
                bucket = uses.setdefault(share["consent_id"], [])
                if made not in bucket:
                    bucket.append(made)
    for row in listing["consents"]:
        row["uses"] = uses.get(row["consent_id"], [])
        row["entries"] = index.get(row["consent_id"], [])
    return listing


def _to_csv(entries: Iterator[LedgerEntry]) -> tuple[bytes, int]:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    columns = (
        "seq",
        "time",
        "kind",
        "actor",
        "role",
        "bundle_id",
        "consent_id",
        "body",
        "entry_hash",
    )
    writer.writerow(columns)
    count = 0
    for entry in entries:
        data = entry.to_dict()
        data["body"] = json.dumps(data["body"], sort_keys=True, ensure_ascii=False)
        writer.writerow([csv_cell(data[c]) for c in columns])
        count += 1
    return out.getvalue().encode("utf-8"), count


def export_entries(session: Session, chosen: LedgerFilter, fmt: str) -> tuple[bytes, int]:
    """The entries of the filter as CSV or JSON Lines; returns (bytes, count)."""
    if fmt == "csv":
        return _to_csv(filtered_entries(session, chosen))
    if fmt != "jsonl":
        raise InvalidInput("format: csv or jsonl")
    lines = [
        json.dumps(e.to_dict(), sort_keys=True, ensure_ascii=False)
        for e in filtered_entries(session, chosen)
    ]
    return ("".join(line + "\n" for line in lines)).encode("utf-8"), len(lines)


def verification_status(session: Session, node_id: str) -> dict[str, Any]:
    """Latest signed checkpoint, what we witnessed of the peer, ledger size."""
    checkpoint = ledger_checkpoint.latest_checkpoint(session)
    peer = peer_node_of(node_id)
    return {
        "size": ledger.ledger_size(session),
        "checkpoint": None if checkpoint is None else checkpoint.checkpoint,
        "peer": peer,
        "witnessed": ledger_witness.last_witnessed(session, peer),
    }


def report(session: Session, node_id: str, since: datetime, until: datetime) -> dict[str, Any]:
    """A printable summary of ``[since, until)``: counts by kind, and every entry."""
    if until <= since:
        raise InvalidInput("to: must be after from")
    entries = list(filtered_entries(session, LedgerFilter(since=since, until=until)))
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry.kind.value] = counts.get(entry.kind.value, 0) + 1
    return {
        "node": node_id,
        "since": since,
        "until": until,
        "entries": entries,
        "counts": dict(sorted(counts.items())),
        "violations": [e for e in entries if e.kind == EntryKind.CONSENT_USE_VIOLATION],
        "status": verification_status(session, node_id),
    }


def admin_status(session: Session, now: datetime) -> dict[str, Any]:
    """Keys, the pinned peer, the outbox backlog and the last delivery error."""
    peer = pinned_peer_manifest(session)
    backlog = {
        str(state): int(count)
        for state, count in session.execute(
            select(OutboxEntry.state, func.count()).group_by(OutboxEntry.state)
        )
    }
    oldest = session.scalar(
        select(func.min(OutboxEntry.created_at)).where(OutboxEntry.state == "queued")
    )
    failing = session.scalars(
        select(OutboxEntry)
        .where(OutboxEntry.last_error.is_not(None))
        .order_by(OutboxEntry.next_attempt_at.desc())
        .limit(1)
    ).first()
    return {
        "own": describe_own_keys(session, now=now),
        "peer": None if peer is None else describe_manifest(peer, now=now),
        "backlog": backlog,
        "oldest_queued": oldest,
        "last_error": None
        if failing is None
        else {
            "bundle_id": failing.bundle_id,
            "error": failing.last_error,
            "attempts": failing.attempts,
            "next_attempt_at": failing.next_attempt_at,
            "state": failing.state,
        },
    }
